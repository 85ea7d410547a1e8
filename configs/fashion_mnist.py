"""The full-length Fashion-MNIST run: a wider VGG, trained until the plateau schedule
ends it (the paper's recipe, scaled to 28x28 images).

  python -m vgg_jax.main --config=configs/fashion_mnist.py --workdir=runs/fashion_mnist

Measured on 2 CPU cores: see README.md ("The demo").
"""

from configs import demo


def get_config():
  config = demo.get_config()
  config.model = "A"
  config.width = 1 / 4            # 16, 32, 64, 128, 128 filters
  config.fc_width = 512
  config.learning_rate = 0.02
  config.num_epochs = 24.0        # a cap; the plateau schedule usually ends it sooner
  config.eval_every_steps = None  # once per epoch
  config.plateau.patience = 3
  config.plateau.threshold = 2e-3
  config.checkpoint_every_steps = 1000
  return config
