"""Net D as a localisation net (appendix A): per-class box regression, all layers tuned.

Reproduces: appendix A's first protocol (the centre crop, the ground-truth class's box),
PCR with every layer fine-tuned: 33.1% localisation error on ILSVRC-2012 validation
(PCR, FC layers only: 34.3%; SCR, FC layers only: 36.4%). Evaluated, also with the
paper's dense protocol and greedy merging, by `python -m vgg_jax.localize`.

The net is the classification net trained at the same scale S=256 (configs/vgg16.py)
with fc8 replaced by a box regressor: 4 numbers (centre x, centre y, width, height, in
units of the crop) per class, 4000 outputs. The Euclidean loss penalises only the
ground-truth class's box. Every layer but fc8 is copied from the classification net;
the learning rate starts at 1e-3. One fixed scale, no jittering.

The boxes: ILSVRC-2012's bounding boxes (PASCAL-VOC-style XML, one file per image)
converted once to our CSV form beside the extracted JPEGs:

  python -m vgg_jax.box_files --xml_dir=$HOME/imagenet/bbox/train \
      --image_dir=$HOME/imagenet/train --output=$HOME/imagenet/boxes/train.csv
  python -m vgg_jax.box_files --xml_dir=$HOME/imagenet/bbox/val \
      --image_dir=$HOME/imagenet/val --output=$HOME/imagenet/boxes/val.csv
  python -m vgg_jax.main --config=configs/vgg16_localization.py \
      --workdir=$HOME/runs/vgg16_loc_pcr_all

Variants: --config.box_regression=single_class (SCR), --config.trainable_layers=fc (the
convs frozen, as OverFeat).
"""

import os

from configs import default


def get_config():
  config = default.get_config()
  config.model = "D"
  config.dataset = "boxes:" + os.path.expanduser("~/imagenet/boxes")
  config.eval_split = "val"
  config.box_regression = "per_class"
  config.trainable_layers = "all"
  config.train_scale_min = 256    # S = 256, no jittering
  config.train_scale_max = 256
  config.eval_scale = 256
  config.learning_rate = 1e-3
  config.init_from.checkpoint = os.path.expanduser("~/runs/vgg16")  # classification, S=256
  config.init_from.rule = "all_but_fc8"
  return config
