"""The demo: a width-reduced VGG on real Fashion-MNIST, on a CPU, offline.

The paper's recipe scaled down: momentum SGD, weight decay 5e-4, dropout 0.5, the
learning rate divided by 10 on validation plateaus, scale jittering (S in [32, 36],
random 32x32 crops, flips), mean subtraction. Images come from Debian's
dataset-fashion-mnist package through our TFDS builder (vgg_jax/fashion_mnist.py).

  python -m vgg_jax.main --config=configs/demo.py --workdir=runs/demo

Measured on 2 CPU cores: see README.md ("The demo").
"""

from configs import default


def get_config():
  config = default.get_config()
  config.model = "A"
  config.width = 3 / 16           # 12, 24, 48, 96, 96 filters
  config.fc_width = 256
  config.init = "he"              # "paper" (std 0.01) trains net A too, more slowly

  config.dataset = "fashion_mnist_local"
  config.train_split = "train"    # 60,000 images
  config.eval_split = "test"      # 10,000 images
  config.channels = 1
  config.train_scale_min = 32     # S in [32, 36]: the paper's jittering, scaled to 28 px
  config.train_scale_max = 36
  config.crop_size = 32
  config.eval_scale = 32          # Q
  config.color_shift_std = 0.0    # gray images: no colour to shift
  config.mean_rgb = "compute"     # the training split's mean, cached beside the data
  config.normalize_std = True
  config.cache = True

  config.batch_size = 128
  config.learning_rate = 0.02
  config.num_epochs = 12.0        # a cap; the plateau schedule may end the run sooner
  config.eval_every_steps = 234   # twice an epoch (468 steps)
  # 1.5 epochs without a 0.3% gain divide the rate by 10. With 2 (one epoch), one noisy
  # evaluation at the first rate could trigger the drops early: 89.4% in one run.
  config.plateau.patience = 3
  config.plateau.threshold = 3e-3
  config.checkpoint_every_steps = 500
  config.log_every_steps = 100
  return config
