"""Net D trained at the fixed scale S=384, fine-tuned from the S=256 net (section 3.1).

Reproduces: Table 3, net D, S=384, Q=384: 26.8% top-1, 8.7% top-5 error.

The third step of the paper's schedule: "to speed up training of the S = 384 network,
it was initialised with the weights pre-trained with S = 256, and we used a smaller
initial learning rate of 1e-3". After configs/vgg16_from_a.py (or configs/vgg16.py):

  python -m vgg_jax.main --config=configs/vgg16_s384.py --workdir=$HOME/runs/vgg16_s384 \
      --config.manual_dir=$HOME/imagenet \
      --config.init_from.checkpoint=$HOME/runs/vgg16

Every layer is copied (rule "all": the same architecture, 224x224 crops at both
scales); the copy happens only when the run starts, never when it resumes.
"""

import os

from configs import default


def get_config():
  config = default.get_config()
  config.model = "D"
  config.train_scale_min = 384
  config.train_scale_max = 384
  config.eval_scale = 384
  config.learning_rate = 1e-3
  config.init_from.checkpoint = os.path.expanduser("~/runs/vgg16")  # the S=256 net
  config.init_from.rule = "all"
  return config
