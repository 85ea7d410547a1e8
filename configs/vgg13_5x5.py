"""Net B-5x5 (net B with each pair of 3x3 convs replaced by one 5x5 conv) with the paper's training recipe on ImageNet.

Reproduces: Section 4.1: its top-1 error (centre crop) was 7% higher than B's; the paper's
evidence that a deep net with small filters beats a shallow one with larger filters.

  python -m vgg_jax.main --config=configs/vgg13_5x5.py --workdir=$HOME/runs/vgg13_5x5 \
      --config.manual_dir=$HOME/imagenet

The paper does not say how this net was initialised; this config uses Glorot
initialisation, which the paper found trains its deeper nets without net A (net A's
layers could not be grafted anyway: B-5x5's convs are 5x5 and it has no conv3_2).

ImageNet must be prepared from its manual download first (see README.md). The paper
trained each net for 2-3 weeks on four Titan Black GPUs.
"""

from configs import default


def get_config():
  config = default.get_config()
  config.model = "B-5x5"
  config.init = "glorot"
  return config
