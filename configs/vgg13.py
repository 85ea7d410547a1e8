"""Net B (13 weight layers) with the paper's training recipe on ImageNet.

Reproduces: Table 3, net B, S=256, Q=256: 28.7% top-1, 9.9% top-5 error.

  python -m vgg_jax.main --config=configs/vgg13.py --workdir=$HOME/runs/vgg13 \
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
  config.model = "B"
  config.init = "glorot"
  return config
