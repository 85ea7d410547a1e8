"""Net D (VGG16, 16 weight layers) with the paper's training recipe on ImageNet.

Reproduces: Table 3, net D, S=256, Q=256: 27.0% top-1, 8.8% top-5 error
(S=384: 26.8 / 8.7; S in [256, 512], Q=384: 25.6 / 8.1).

  python -m vgg_jax.main --config=configs/vgg16.py --workdir=$HOME/runs/vgg16 \
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
  config.model = "D"
  config.init = "glorot"
  return config
