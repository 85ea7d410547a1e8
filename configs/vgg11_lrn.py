"""Net A-LRN (net A with AlexNet's LRN after conv1_1) with the paper's training recipe on ImageNet.

Reproduces: Table 3, net A-LRN, S=256, Q=256: 29.7% top-1, 10.5% top-5 error
(LRN does not improve on A).

  python -m vgg_jax.main --config=configs/vgg11_lrn.py --workdir=$HOME/runs/vgg11_lrn \
      --config.manual_dir=$HOME/imagenet

ImageNet must be prepared from its manual download first (see README.md). The paper
trained each net for 2-3 weeks on four Titan Black GPUs.
"""

from configs import default


def get_config():
  config = default.get_config()
  config.model = "A-LRN"
  return config
