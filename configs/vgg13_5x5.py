"""Net B-5x5 (net B with each pair of 3x3 convs replaced by one 5x5 conv) with the paper's training recipe on ImageNet.

Reproduces: Section 4.1: its top-1 error (centre crop) was 7% higher than B's; the paper's
evidence that a deep net with small filters beats a shallow one with larger filters.

  python -m vgg_jax.main --config=configs/vgg13_5x5.py --workdir=$HOME/runs/vgg13_5x5 \
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
  config.model = "B-5x5"
  config.init = "glorot"
  return config
