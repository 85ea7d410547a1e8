"""Fine-tunes a pretrained or grafted VGG16 on your own image folder (new classes).

The folder holds DIR/train/<class>/*.jpg and DIR/val/<class>/*.jpg; its number of
classes sets fc8, which starts fresh (rule "all_but_fc8"), every other layer comes from
the checkpoint. With ImageNet weights converted from torchvision:

  python -m vgg_jax.convert --from=torchvision --model=D \
      --input=vgg16-397923af.pth --output=$HOME/weights/vgg16_torchvision
  python -m vgg_jax.main --config=configs/finetune_folder.py \
      --workdir=$HOME/runs/flowers \
      --config.dataset=folder:$HOME/data/flowers \
      --config.init_from.checkpoint=$HOME/weights/vgg16_torchvision

The data fields below reproduce torchvision's input convention (RGB, mean
(0.485, 0.456, 0.406) and std (0.229, 0.224, 0.225) of the 0..1 scale), which the
converted weights expect. For Keras weights, convert with --rgb and add
--config.mean_rgb=123.68,116.779,103.939 --config.normalize_std=False: Keras's
"caffe" convention flipped to RGB is the paper's own (RGB 0..255 minus the ImageNet
mean RGB), that of nets trained with vgg_jax too (e.g. --config.init_from.checkpoint=
$HOME/runs/vgg16), which take the same two flags. vgg_jax.convert prints the flags
for the file it converts.
"""

from configs import default


def get_config():
  config = default.get_config()
  config.model = "D"
  config.init = "glorot"           # only fc8 is drawn fresh
  config.dataset = "folder:/path/to/images"  # set --config.dataset=folder:DIR
  config.init_from.checkpoint = "/path/to/pretrained"  # convert/surgery output, workdir
  config.init_from.rule = "all_but_fc8"
  # torchvision's input convention on the 0..255 scale (vgg_jax.convert.pipeline_fields).
  config.mean_rgb = "123.675,116.28,103.53"
  config.normalize_std = True
  # Fine-tuning: a small learning rate, a few epochs, smaller batches for one GPU.
  config.learning_rate = 1e-3
  config.batch_size = 64
  config.num_epochs = 20
  config.color_shift_std = 0.0
  config.checkpoint_every_steps = 200
  config.log_every_steps = 20
  return config
