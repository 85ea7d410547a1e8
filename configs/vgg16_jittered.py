"""Net D with scale jittering, S in [256, 512], fine-tuned from the S=384 net (3.1).

Reproduces: Table 3, net D, S in [256; 512], Q=384: 25.6% top-1, 8.1% top-5 error
(Table 4, Q in {256, 384, 512}: 24.8 / 7.5 with vgg_jax.evaluate).

The last step of the paper's schedule: "multi-scale models were trained by fine-tuning
all layers of a single-scale model with the same configuration, pre-trained with fixed
S = 384". After configs/vgg16_s384.py:

  python -m vgg_jax.main --config=configs/vgg16_jittered.py \
      --workdir=$HOME/runs/vgg16_jittered --config.manual_dir=$HOME/imagenet \
      --config.init_from.checkpoint=$HOME/runs/vgg16_s384

Each training image is rescaled to an S drawn from [256, 512]; every layer is copied
from the S=384 net (rule "all"), when the run starts only, and trained at a learning
rate of 1e-3: the paper gives that rate for the S=384 fine-tuning and does not state
one for the jittered nets, so this is our choice.
"""

import os

from configs import default


def get_config():
  config = default.get_config()
  config.model = "D"
  config.train_scale_min = 256
  config.train_scale_max = 512
  config.eval_scale = 384
  config.learning_rate = 1e-3
  config.init_from.checkpoint = os.path.expanduser("~/runs/vgg16_s384")
  config.init_from.rule = "all"
  return config
