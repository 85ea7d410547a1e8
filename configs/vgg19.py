"""Net E (VGG19, 19 weight layers) with the paper's training recipe on ImageNet.

Reproduces: Table 3, net E, S=256, Q=256: 27.3% top-1, 9.0% top-5 error
(S=384: 26.9 / 8.7; S in [256, 512], Q=384: 25.5 / 8.0).

  python -m vgg_jax.main --config=configs/vgg19.py --workdir=$HOME/runs/vgg19 \
      --config.manual_dir=$HOME/imagenet

The paper initialised this net from a trained net A (configs/vgg11.py): its first four
conv layers and last three FC layers, the rest random. It later found that Glorot
initialisation trains the deep nets without that pre-training, which this config does.

ImageNet must be prepared from its manual download first (see README.md). The paper
trained each net for 2-3 weeks on four Titan Black GPUs.
"""

from configs import default


def get_config():
  config = default.get_config()
  config.model = "E"
  config.init = "glorot"
  return config
