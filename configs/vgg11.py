"""Net A (11 weight layers) with the paper's training recipe on ImageNet.

Reproduces: Table 3, net A, S=256, Q=256: 29.6% top-1, 10.4% top-5 error.
Net A is trained from random initialisation (normal, std 0.01: Caffe's reading of the
paper's "variance 1e-2"); it is the source of the deeper nets' initial layers.

  python -m vgg_jax.main --config=configs/vgg11.py --workdir=$HOME/runs/vgg11 \
      --config.manual_dir=$HOME/imagenet

ImageNet must be prepared from its manual download first (see README.md). The paper
trained each net for 2-3 weeks on four Titan Black GPUs.
"""

from configs import default


def get_config():
  config = default.get_config()
  config.model = "A"
  return config
