"""The paper's training recipe (section 3.1) as the default config of every run.

Every other file in configs/ imports this one and overrides a few fields, so that a
config reads like the paper's hyperparameter table. Any field can be overridden on the
command line:

  python -m vgg_jax.main --config=configs/vgg16.py --workdir=/tmp/vgg16 \
      --config.batch_size=128
"""

import ml_collections
from ml_collections import config_dict


def get_config() -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()

  # Model (section 2, Table 1). See vgg_jax.models.create_model for the knobs.
  config.model = "D"
  config.width = 1.0              # multiplier of the filter counts 64, 128, 256, 512, 512
  config.filter_size = config_dict.placeholder(int)  # None: Table 1's sizes; 5, 7: ablation
  config.fc_width = 4096
  config.dropout_rate = 0.5
  config.init = "paper"           # normal(0, 0.01), zero biases; "glorot" or "he"
  config.dtype = "float32"        # compute dtype; "bfloat16" keeps float32 parameters
  config.num_classes = config_dict.placeholder(int)  # None: taken from the dataset
  # Localisation (appendix A): fc8 regresses boxes with a Euclidean loss, one for all
  # classes ("single_class") or one per class ("per_class"); None: classification.
  config.box_regression = config_dict.placeholder(str)
  config.trainable_layers = "all"  # or "fc": fc6-fc8 only, the convs frozen (OverFeat)

  # Data (section 3.1): isotropic rescale of the smallest side to S, random crop, flip,
  # AlexNet's colour shift, training-set mean subtraction.
  config.dataset = "imagenet2012"  # a TFDS name, "folder:<dir>" or "fashion_mnist_local"
  config.data_dir = config_dict.placeholder(str)    # TFDS data_dir (None: TFDS default)
  config.manual_dir = config_dict.placeholder(str)  # where ILSVRC2012_img_*.tar live
  config.train_split = "train"
  config.eval_split = "validation"
  config.train_scale_min = 256    # S; scale jittering when train_scale_max > min
  config.train_scale_max = 256    # the paper's multi-scale nets use [256, 512]
  config.crop_size = 224
  config.eval_scale = 256         # Q for the centre-crop validation during training
  config.random_flip = True
  config.color_shift_std = 0.1    # AlexNet's PCA lighting noise; 0 turns it off
  config.mean_rgb = "imagenet"    # "imagenet" (known constant), "compute" (train split)
                                  # or numbers: "123.68,116.78,103.94"
  config.normalize_std = False    # also divide by the per-channel std (not in the paper;
                                  # computed with "compute", else ImageNet's)
  config.channels = 3             # gray datasets are replicated to 3 channels, or 1
  config.shuffle_buffer = 16_384
  config.cache = False            # cache decoded training images in memory
  config.prefetch_to_device = 2   # batches copied to the devices ahead of the step

  # Optimisation (section 3.1).
  config.batch_size = 256         # global, over all devices and hosts
  config.learning_rate = 1e-2
  config.momentum = 0.9
  config.nesterov = False
  config.weight_decay = 5e-4      # L2 on conv and FC kernels; biases are not decayed
  config.num_epochs = 74.0        # cap; the plateau schedule usually stops earlier
  config.seed = 0

  # Learning-rate schedule: divide by 10 when validation top-1 accuracy stops improving.
  config.plateau = ml_collections.ConfigDict()
  config.plateau.factor = 0.1
  config.plateau.patience = 2     # evaluations without improvement before a drop
  config.plateau.threshold = 1e-3  # an improvement must beat the best by this much
  config.plateau.max_drops = 3    # the paper divided three times
  config.plateau.stop_after_last = True  # a plateau after the last drop ends training

  # Evaluation, checkpoints, logs.
  config.eval_every_steps = config_dict.placeholder(int)  # None: once per epoch
  config.checkpoint_every_steps = 1000
  config.keep_checkpoints = 3     # the newest few; the best one is kept as well
  config.log_every_steps = 100
  # At the end, the paper's test protocols (vgg_jax.protocols.PROTOCOLS), e.g.
  # "center_crop,dense,multi_crop,dense+multi_crop"; empty: none.
  config.final_eval_protocols = ""
  config.profile = False          # capture a profiler trace of a few steps

  # Devices. "pmap" or "shard_map": the same per-device step, mapped two ways.
  config.mapping = "pmap"
  # How the conv layers are computed (vgg_jax.layers.CONV_LOWERINGS): "auto" is XLA's
  # convolution, but on CPU taps for the image layer and im2col for maps smaller than
  # the filter; "xla", "im2col", "taps". The same values to float rounding.
  config.conv_lowering = "auto"
  config.distributed = False      # call jax.distributed.initialize() (multi-host)

  # Start from other weights (section 3.1): a checkpoint (a workdir, or the output of
  # vgg_jax.surgery / vgg_jax.convert) and a rule naming the layers to copy
  # (vgg_jax.surgery.RULES; "net_a": the paper's layers of net A, "all": every layer,
  # from a checkpoint of the same architecture). Applied only when a run starts fresh,
  # never over a resumed run.
  config.init_from = ml_collections.ConfigDict()
  config.init_from.checkpoint = config_dict.placeholder(str)
  config.init_from.rule = "net_a"

  return config
