"""Net D (VGG16) initialised from a trained net A, as the paper did (section 3.1).

Reproduces: Table 3, net D, S=256, Q=256: 27.0% top-1, 8.8% top-5 error.

The second step of the paper's schedule. Train net A first (configs/vgg11.py), then:

  python -m vgg_jax.main --config=configs/vgg16_from_a.py --workdir=$HOME/runs/vgg16 \
      --config.manual_dir=$HOME/imagenet \
      --config.init_from.checkpoint=$HOME/runs/vgg11

The rule "net_a" copies A's conv1_1, conv2_1, conv3_1, conv3_2, fc6, fc7 and fc8 into
the layers of the same names of D; the other nine layers are drawn from the paper's
initialisation (normal, std 0.01, zero biases) with the run's seed, and all layers
train at the normal learning rate. The copy happens only when the run starts: running
the command again resumes the run and does not copy again. To inspect the grafted
net first: python -m vgg_jax.surgery --source=$HOME/runs/vgg11 \
    --config=configs/vgg16_from_a.py --rule=net_a --output=/tmp/vgg16_from_a
"""

import os

from configs import default


def get_config():
  config = default.get_config()
  config.model = "D"
  config.init = "paper"
  config.init_from.checkpoint = os.path.expanduser("~/runs/vgg11")  # net A's workdir
  config.init_from.rule = "net_a"
  return config
