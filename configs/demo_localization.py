"""Appendix A at demo scale: localisation nets on real photos, on a CPU, offline.

The images: Fashion-MNIST objects pasted onto crops of 20 real ImageNet photos, with
their bounding boxes (experiments/localization_data.py writes them). First a
classification net, then localisation nets initialised from it, as the paper did:

  python -m experiments.localization_data --out_dir=data/localization \
      --num_train=12000 --num_val=1000
  python -m vgg_jax.main --config=configs/demo_localization.py:classifier \
      --workdir=runs/localization/classifier
  python -m vgg_jax.main --config=configs/demo_localization.py:pcr_all \
      --workdir=runs/localization/pcr_all
  python -m vgg_jax.localize --workdirs=runs/localization/pcr_all \
      --classifier=runs/localization/classifier

The variants: "scr_fc", "scr_all", "pcr_fc", "pcr_all" (single- or per-class box
regression; the FC layers only, or every layer fine-tuned). experiments/localization.py
runs all of them and writes the table. The paper's recipe scaled down: one training
scale (S = 40, 32x32 crops: the paper's 256 and 224, shrunk), no jittering, the
localisation nets from the classification net (every layer but fc8), their learning
rate a tenth of the classifier's (the paper: 1e-3 after 1e-2).
"""

from configs import default

VARIANTS = {
    "classifier": dict(),
    "scr_fc": dict(box_regression="single_class", trainable_layers="fc"),
    "scr_all": dict(box_regression="single_class", trainable_layers="all"),
    "pcr_fc": dict(box_regression="per_class", trainable_layers="fc"),
    "pcr_all": dict(box_regression="per_class", trainable_layers="all"),
}
CLASSIFIER_WORKDIR = "runs/localization/classifier"


def get_config(variant: str = "classifier"):
  if variant not in VARIANTS:
    raise ValueError(f"Unknown variant {variant!r}: use one of {', '.join(VARIANTS)}, "
                     "e.g. --config=configs/demo_localization.py:pcr_all.")
  config = default.get_config()
  config.model = "A"
  config.width = 3 / 16           # 12, 24, 48, 96, 96 filters
  config.fc_width = 256
  config.init = "he"

  config.dataset = "boxes:data/localization"
  config.train_split = "train"
  config.eval_split = "val"
  config.train_scale_min = 40     # S, fixed
  config.train_scale_max = 40
  config.crop_size = 32
  config.eval_scale = 40          # Q of the validation (the centre crop)
  config.mean_rgb = "compute"
  config.normalize_std = True
  config.cache = True

  config.batch_size = 64
  config.learning_rate = 0.02
  config.num_epochs = 20.0
  config.plateau.patience = 2
  config.plateau.threshold = 3e-3
  config.checkpoint_every_steps = 0  # at every validation (once an epoch)
  config.log_every_steps = 50
  if variant != "classifier":
    config.update(VARIANTS[variant])
    config.learning_rate = 0.002
    config.num_epochs = 5.0
    config.init_from.checkpoint = CLASSIFIER_WORKDIR
    config.init_from.rule = "all_but_fc8"
  return config
