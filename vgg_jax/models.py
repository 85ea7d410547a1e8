"""The paper's ConvNet configurations (section 2, Table 1) as Flax modules.

The architecture is data: `TABLE_1` spells every net the way the paper's Table 1 does,
one entry per layer ("conv3-64" is a 3x3 convolution with 64 filters, "LRN" AlexNet's
local response normalisation, "maxpool" a 2x2 max-pool of stride 2). One `VGG` module
builds any of them, and `create_model` is the public entry point:

    model = create_model("D", num_classes=1000)            # VGG16
    variables = model.init(rng, images, train=False)       # images: [N, H, W, C]
    logits = model.apply(variables, images, train=False)   # [N, num_classes]
    scores = model.apply(variables, big_images, dense=True)  # [N, h, w, classes]
    fc7 = model.apply(variables, big_images, dense=True, until="fc7")  # [N, h, w, 4096]

A run's config describes its net by `ARCHITECTURE_FIELDS`; `from_config` builds that
net, `init_params` draws its parameters as a run does, and `architecture_differences`
and `param_differences` say why a checkpoint does not fit a net.

Parameter names follow the original Caffe release: conv{stage}_{index} for the
convolutions (conv1_1 ... conv5_4) and fc6, fc7, fc8 for the fully connected head.
Checkpoint surgery and weight conversion rely on these names.

Dense application (section 3.2): the fully connected layers are applied as convolutions
(fc6 as a 7x7 conv at 224 training crops, fc7 and fc8 as 1x1 convs) by reshaping the
very same kernels, so one set of parameters serves both crops and whole images.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import re
from typing import Any, Callable, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from vgg_jax import layers

Array = jax.Array

MAXPOOL = "maxpool"
LRN = "LRN"

# Table 1 of the paper, read left to right. B-5x5 is the ablation net of section 4.1:
# B with each pair of 3x3 convolutions replaced by one 5x5 convolution.
TABLE_1: dict[str, tuple[str, ...]] = {
    "A": ("conv3-64", MAXPOOL,
          "conv3-128", MAXPOOL,
          "conv3-256", "conv3-256", MAXPOOL,
          "conv3-512", "conv3-512", MAXPOOL,
          "conv3-512", "conv3-512", MAXPOOL),
    "A-LRN": ("conv3-64", LRN, MAXPOOL,
              "conv3-128", MAXPOOL,
              "conv3-256", "conv3-256", MAXPOOL,
              "conv3-512", "conv3-512", MAXPOOL,
              "conv3-512", "conv3-512", MAXPOOL),
    "B": ("conv3-64", "conv3-64", MAXPOOL,
          "conv3-128", "conv3-128", MAXPOOL,
          "conv3-256", "conv3-256", MAXPOOL,
          "conv3-512", "conv3-512", MAXPOOL,
          "conv3-512", "conv3-512", MAXPOOL),
    "C": ("conv3-64", "conv3-64", MAXPOOL,
          "conv3-128", "conv3-128", MAXPOOL,
          "conv3-256", "conv3-256", "conv1-256", MAXPOOL,
          "conv3-512", "conv3-512", "conv1-512", MAXPOOL,
          "conv3-512", "conv3-512", "conv1-512", MAXPOOL),
    "D": ("conv3-64", "conv3-64", MAXPOOL,
          "conv3-128", "conv3-128", MAXPOOL,
          "conv3-256", "conv3-256", "conv3-256", MAXPOOL,
          "conv3-512", "conv3-512", "conv3-512", MAXPOOL,
          "conv3-512", "conv3-512", "conv3-512", MAXPOOL),
    "E": ("conv3-64", "conv3-64", MAXPOOL,
          "conv3-128", "conv3-128", MAXPOOL,
          "conv3-256", "conv3-256", "conv3-256", "conv3-256", MAXPOOL,
          "conv3-512", "conv3-512", "conv3-512", "conv3-512", MAXPOOL,
          "conv3-512", "conv3-512", "conv3-512", "conv3-512", MAXPOOL),
    "B-5x5": ("conv5-64", MAXPOOL,
              "conv5-128", MAXPOOL,
              "conv5-256", MAXPOOL,
              "conv5-512", MAXPOOL,
              "conv5-512", MAXPOOL),
}

# The head of every net (Table 1, bottom rows): FC-4096, FC-4096, FC-classes.
HEAD = ("fc6", "fc7", "fc8")
# Its hidden layers, whose activations serve as image features (appendix B: fc7).
FEATURE_LAYERS = HEAD[:-1]

ALIASES = {
    "vgg11": "A",
    "vgg11_lrn": "A-LRN",
    "vgg13": "B",
    "vgg16_conv1": "C",
    "vgg16": "D",
    "vgg19": "E",
    "vgg13_5x5": "B-5x5",
}

# The layers a run trains (`trainable_mask`).
TRAINABLE_LAYERS = ("all", "fc")
# What fc8 predicts: class scores (None), or boxes (appendix A's SCR and PCR).
BOX_REGRESSIONS = (None, "single_class", "per_class")

# AlexNet's local response normalisation (Krizhevsky et al. 2012, section 3.3):
# b_c = a_c / (k + alpha * sum_{|j - c| <= size // 2} a_j^2) ** beta.
# Note that alpha multiplies the plain sum; Caffe's LRN layer divides alpha by `size`.
ALEXNET_LRN = dict(size=5, alpha=1e-4, beta=0.75, k=2.0)

NUM_POOLS = 5
MIN_IMAGE_SIZE = 2 ** NUM_POOLS

_CONV_RE = re.compile(r"^conv(\d+)-(\d+)$")


@dataclasses.dataclass(frozen=True)
class ConvSpec:
  """One convolution of a net, after the knobs (width, filter size) are applied."""
  name: str
  filter_size: int
  features: int


@dataclasses.dataclass(frozen=True)
class PoolSpec:
  name: str


@dataclasses.dataclass(frozen=True)
class LRNSpec:
  name: str


LayerSpec = ConvSpec | PoolSpec | LRNSpec


def canonical_name(name: str) -> str:
  """Maps an alias (vgg16) or a config name in any case (d, a-lrn) to Table 1's name."""
  if name in TABLE_1:
    return name
  if name.lower() in ALIASES:
    return ALIASES[name.lower()]
  for key in TABLE_1:
    if key.lower() == name.lower():
      return key
  known = sorted(TABLE_1) + sorted(ALIASES)
  raise ValueError(f"Unknown VGG configuration {name!r}; known names: {', '.join(known)}.")


def scaled_width(features: int, width: float) -> int:
  """Number of filters after applying the width multiplier (at least one)."""
  return max(1, int(round(features * width)))


def layer_specs(name: str, *, width: float = 1.0,
                filter_size: int | None = None) -> tuple[LayerSpec, ...]:
  """Expands a Table 1 entry into named layers, applying the width and filter knobs.

  Layers get Caffe's names: conv{stage}_{index} (stages are separated by max-pools),
  pool{stage} and norm{stage}. `filter_size` replaces the size of every 3x3 conv
  (1x1 convs of net C stay 1x1, as their job is a channel projection).
  """
  check_knobs(width=width, filter_size=filter_size)
  specs: list[LayerSpec] = []
  stage, index = 1, 0
  for entry in TABLE_1[canonical_name(name)]:
    if entry == MAXPOOL:
      specs.append(PoolSpec(f"pool{stage}"))
      stage, index = stage + 1, 0
    elif entry == LRN:
      specs.append(LRNSpec(f"norm{stage}"))
    else:
      size, features = (int(g) for g in _CONV_RE.match(entry).groups())
      if filter_size is not None and size == 3:
        size = filter_size
      index += 1
      specs.append(ConvSpec(f"conv{stage}_{index}", size, scaled_width(features, width)))
  return tuple(specs)


def check_knobs(*, width: float = 1.0, filter_size: int | None = None,
                fc_width: int = 4096, num_classes: int = 1000,
                dropout_rate: float = 0.5) -> None:
  """Raises ValueError naming the bad knob and what is allowed."""
  if not width > 0:
    raise ValueError(f"width must be > 0 (a multiplier of the paper's filter counts), "
                     f"got {width!r}.")
  if filter_size is not None and (filter_size < 1 or filter_size % 2 == 0):
    raise ValueError(f"filter_size must be a positive odd integer (3, 5, 7, ...) so that "
                     f"'same' padding keeps the spatial size; got {filter_size!r}.")
  if fc_width < 1:
    raise ValueError(f"fc_width must be a positive integer, got {fc_width!r}.")
  if num_classes < 1:
    raise ValueError(f"num_classes must be a positive integer, got {num_classes!r}.")
  if not 0.0 <= dropout_rate < 1.0:
    raise ValueError(f"dropout_rate must be in [0, 1), got {dropout_rate!r}.")


def check_feature_layer(layer: str | None) -> None:
  """Raises ValueError unless LAYER is None or one of FEATURE_LAYERS."""
  if layer is not None and layer not in FEATURE_LAYERS:
    raise ValueError(f"Unknown feature layer {layer!r}: choose one of "
                     f"{', '.join(FEATURE_LAYERS)} (the head's hidden layers; the paper's "
                     f"features are fc7's).")


def num_outputs(num_classes: int, box_regression: str | None = None) -> int:
  """fc8's width: class scores, or a localisation net's boxes (appendix A): one box
  (centre x, centre y, width, height) for all classes ("single_class", SCR) or one per
  class ("per_class", PCR; class c's box is outputs 4c..4c+3)."""
  if box_regression not in BOX_REGRESSIONS:
    raise ValueError(f"box_regression must be one of {BOX_REGRESSIONS}, got "
                     f"{box_regression!r}.")
  return {None: num_classes, "single_class": 4, "per_class": 4 * num_classes}[
      box_regression]


def check_image_size(height: int, width: int) -> None:
  """Five 2x2 max-pools need at least 32x32 pixels."""
  if height < MIN_IMAGE_SIZE or width < MIN_IMAGE_SIZE:
    raise ValueError(
        f"Input of {height}x{width} pixels is too small for VGG's {NUM_POOLS} max-pools: "
        f"each side must be at least {MIN_IMAGE_SIZE} pixels (the paper trains on "
        f"224x224 crops). Rescale the images (e.g. the data config's crop size).")


# Initialisers (section 3.1). "paper": zero-mean normal with std 0.01 and zero biases, as
# net A was trained (the paper's text says "variance 1e-2"; std 0.01 is Caffe's
# practice, which its released models followed); "glorot": Glorot & Bengio (2010),
# which the paper later found trains the deep nets without net A; "he": He et al.
# (2015), the usual choice for ReLU nets now.
INITIALIZERS: dict[str, Callable[..., Any]] = {
    "paper": nn.initializers.normal(stddev=0.01),
    "glorot": nn.initializers.glorot_uniform(),
    "he": nn.initializers.he_normal(),
}


def kernel_initializer(name: str):
  if name not in INITIALIZERS:
    raise ValueError(f"Unknown init {name!r}; choose one of {', '.join(INITIALIZERS)}.")
  return INITIALIZERS[name]


class FullyConnected(nn.Module):
  """A fully connected layer that can also run as a convolution (dense evaluation).

  The kernel is stored as an ordinary [inputs, features] matrix, with inputs flattened
  in (height, width, channels) order. Applied to an [N, h, w, C] feature map:
  - `dense=False`: the map is flattened and multiplied, giving [N, features];
  - `dense=True`: the kernel is reshaped to a [window, window, C, features] conv kernel
    and slid over the map, giving [N, h - window + 1, w - window + 1, features].
  """
  features: int
  kernel_init: Callable[..., Any]
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array, *, dense: bool = False) -> Array:
    channels = x.shape[-1]
    if dense and self.has_variable("params", "kernel"):
      kernel = self.get_variable("params", "kernel")
    else:
      inputs = math.prod(x.shape[1:]) if not dense else channels * x.shape[1] * x.shape[2]
      kernel = self.param("kernel", self.kernel_init, (inputs, self.features),
                          self.param_dtype)
    bias = self.param("bias", nn.initializers.zeros, (self.features,), self.param_dtype)
    x, kernel, bias = (v.astype(self.dtype) for v in (x, kernel, bias))
    if not dense:
      return x.reshape(x.shape[0], -1) @ kernel + bias
    window = math.isqrt(kernel.shape[0] // channels)
    if window * window * channels != kernel.shape[0]:
      raise ValueError(
          f"{self.name}: a kernel of {kernel.shape[0]} inputs is not a square window "
          f"over {channels} channels; dense application needs square training crops.")
    if x.shape[1] < window or x.shape[2] < window:
      raise ValueError(
          f"{self.name}: the feature map is {x.shape[1]}x{x.shape[2]} but the layer was "
          f"trained on {window}x{window} maps: dense evaluation needs images at least "
          f"as large as the training crop.")
    conv_kernel = kernel.reshape(window, window, channels, self.features)
    y = jax.lax.conv_general_dilated(
        x, conv_kernel, window_strides=(1, 1), padding="VALID",
        dimension_numbers=("NHWC", "HWIO", "NHWC"))
    return y + bias


class VGG(nn.Module):
  """A VGG net built from a Table 1 entry (see `create_model` for the knobs)."""
  net: str = "D"  # a Table 1 name
  num_classes: int = 1000
  width: float = 1.0
  filter_size: int | None = None
  fc_width: int = 4096
  dropout_rate: float = 0.5
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  initializer: str = "paper"  # a key of INITIALIZERS (`init` would shadow Module.init)
  lrn: dict = dataclasses.field(default_factory=lambda: dict(ALEXNET_LRN))
  box_regression: str | None = None  # a localisation net's fc8 (BOX_REGRESSIONS)
  conv_lowering: str = "auto"  # how the convs are computed (layers.CONV_LOWERINGS)

  @nn.compact
  def __call__(self, images: Array, *, train: bool = False, dense: bool = False,
               until: str | None = None) -> Array:
    """Class scores: logits [N, classes], or with `dense=True` the map [N, h, w, classes]
    (a localisation net's boxes instead: [N, `num_outputs`], or their map).

    With `dense=True` the head runs fully-convolutionally (section 3.2) on images of any
    size at least the training crop; dropout is then off whatever `train` says. The conv
    trunk's output is sown as intermediates["features"] for feature extraction.
    UNTIL, a hidden layer of the head (`FEATURE_LAYERS`: "fc6" or "fc7"), returns that
    layer's activations after its ReLU instead ([N, fc_width], or the map [N, h, w,
    fc_width] with `dense=True`): the paper's transfer features (appendix B).
    """
    check_knobs(width=self.width, filter_size=self.filter_size, fc_width=self.fc_width,
                num_classes=self.num_classes, dropout_rate=self.dropout_rate)
    check_feature_layer(until)
    check_image_size(images.shape[1], images.shape[2])
    kernel_init = kernel_initializer(self.initializer)
    conv = layers.conv_general_dilated(self.conv_lowering)
    x = images.astype(self.dtype)
    for spec in layer_specs(self.net, width=self.width, filter_size=self.filter_size):
      if isinstance(spec, ConvSpec):
        x = nn.Conv(spec.features, (spec.filter_size, spec.filter_size), padding="SAME",
                    kernel_init=kernel_init, bias_init=nn.initializers.zeros,
                    dtype=self.dtype, param_dtype=self.param_dtype, name=spec.name,
                    conv_general_dilated=conv)(x)
        x = nn.relu(x)
      elif isinstance(spec, LRNSpec):
        x = layers.local_response_norm(x, **self.lrn)
      else:
        x = layers.max_pool_2x2(x)
    self.sow("intermediates", "features", x)
    deterministic = not train or dense
    outputs = num_outputs(self.num_classes, self.box_regression)
    for name, features in zip(HEAD, (self.fc_width, self.fc_width, outputs)):
      x = FullyConnected(features, kernel_init, dtype=self.dtype,
                         param_dtype=self.param_dtype, name=name)(x, dense=dense)
      if name != HEAD[-1]:
        x = nn.relu(x)
        if name == until:
          return x.astype(jnp.float32)
        x = nn.Dropout(self.dropout_rate, deterministic=deterministic)(x)
    return x.astype(jnp.float32)


def create_model(name: str = "D", *, num_classes: int = 1000, width: float = 1.0,
                 filter_size: int | None = None, fc_width: int = 4096,
                 dropout_rate: float = 0.5, dtype: Any = jnp.float32,
                 init: str = "paper", lrn: dict | None = None,
                 box_regression: str | None = None, conv_lowering: str = "auto"
                 ) -> VGG:
  """Returns the VGG module for a Table 1 name ("A", ..., "E", "B-5x5") or an alias.

  Args:
    name: "A", "A-LRN", "B", "C", "D", "E", "B-5x5", or vgg11, vgg11_lrn, vgg13,
      vgg16_conv1, vgg16, vgg19, vgg13_5x5.
    num_classes: outputs of fc8 (1000 for ILSVRC).
    width: multiplier of every conv's filter count (1/8 gives CPU-sized nets).
    filter_size: replaces the 3x3 filters (5 or 7 for the depth-vs-filter-size study).
    fc_width: width of fc6 and fc7 (4096 in the paper).
    dropout_rate: dropout after fc6 and fc7 (0.5 in the paper).
    dtype: compute dtype (jnp.bfloat16 for mixed precision); parameters stay float32.
    init: "paper" (normal, std 0.01, zero biases), "glorot" or "he".
    lrn: AlexNet LRN hyperparameters for A-LRN (defaults to ALEXNET_LRN).
    box_regression: None (a classification net), or a localisation net's fc8:
      "single_class" (4 outputs) or "per_class" (4 x num_classes); see `num_outputs`.
    conv_lowering: how the convs are computed (`layers.CONV_LOWERINGS`): "auto"
      (on CPU, taps for the image layer and im2col on maps smaller than the filter;
      XLA's convolution elsewhere), "xla", "im2col" or "taps"; the same values to float
      rounding.
  """
  check_knobs(width=width, filter_size=filter_size, fc_width=fc_width,
              num_classes=num_classes, dropout_rate=dropout_rate)
  kernel_initializer(init)
  num_outputs(num_classes, box_regression)
  layers.check_conv_lowering(conv_lowering)
  return VGG(net=canonical_name(name), num_classes=num_classes, width=width,
             filter_size=filter_size, fc_width=fc_width, dropout_rate=dropout_rate,
             dtype=jnp.dtype(dtype), initializer=init, lrn=dict(lrn or ALEXNET_LRN),
             box_regression=box_regression, conv_lowering=conv_lowering)


def trainable_mask(params: Mapping[str, Any], layers: str = "all") -> dict:
  """True for each parameter a run trains: of every layer (LAYERS "all"), or of the
  head only ("fc": fc6, fc7, fc8; the conv layers frozen, appendix A's OverFeat
  variant)."""
  if layers not in TRAINABLE_LAYERS:
    raise ValueError(f"trainable_layers must be one of {', '.join(TRAINABLE_LAYERS)}, "
                     f"got {layers!r}.")
  return {name: jax.tree_util.tree_map(lambda _, n=name: layers == "all" or n in HEAD,
                                       tree)
          for name, tree in params.items()}


def count_params(params: Any) -> int:
  """Total number of scalars in a parameter tree."""
  return sum(math.prod(p.shape) for p in jax.tree_util.tree_leaves(params))


def conv_names(name: str) -> Sequence[str]:
  """The conv layer names of a net, in order (conv1_1, conv1_2, ...)."""
  return [s.name for s in layer_specs(name) if isinstance(s, ConvSpec)]


# ------------------------------------------------------------- a run's net, from its config

# Fields of a run's config that fix the shapes of the parameters: a checkpoint fits only a
# net that agrees on all of them. (A checkpoint written without a config, by surgery or
# conversion, names them in its meta.)
ARCHITECTURE_FIELDS = ("model", "width", "filter_size", "fc_width", "num_classes",
                       "channels", "crop_size", "box_regression")


def from_config(config, num_classes: int | None = None) -> VGG:
  """The net of a run's config (model, width, filter_size, fc_width, dropout_rate, dtype,
  init, box_regression, conv_lowering) for NUM_CLASSES classes (default
  config.num_classes)."""
  return create_model(
      config.model, num_classes=num_classes or config.num_classes, width=config.width,
      filter_size=config.filter_size, fc_width=config.fc_width,
      dropout_rate=config.dropout_rate, dtype=jnp.dtype(config.dtype), init=config.init,
      box_regression=config.get("box_regression"),
      conv_lowering=config.get("conv_lowering", "auto"))


def input_shape(config) -> tuple[int, int, int]:
  """(height, width, channels) of the images a run's net is built for: its training
  crops. (fc6's inputs, and so the parameters' shapes, depend on it.)"""
  return (config.crop_size, config.crop_size, config.channels)


def architecture(config) -> dict:
  """The ARCHITECTURE_FIELDS of a config (a ConfigDict or a dict), as a plain dict."""
  fields = config.to_dict() if hasattr(config, "to_dict") else dict(config)
  return {k: fields[k] for k in ARCHITECTURE_FIELDS if k in fields}


def architecture_differences(stored: Mapping, wanted: Mapping,
                             ) -> list[tuple[str, Any, Any]]:
  """(field, stored, wanted) for each architecture field of STORED that WANTED sets
  otherwise. Nets are compared by their Table 1 name ("vgg16" and "D" agree), and a
  num_classes left None in WANTED (to be read from the dataset) agrees with any."""
  out = []
  for key in ARCHITECTURE_FIELDS:
    if key not in stored:
      continue
    a, b = stored[key], wanted.get(key)
    if key == "model" and a is not None and b is not None:
      same = canonical_name(a) == canonical_name(b)
    else:
      same = a == b or (key == "num_classes" and b is None)
    if not same:
      out.append((key, a, b))
  return out


def seed_keys(seed: int) -> tuple[jax.Array, jax.Array]:
  """(parameter initialisation key, dropout key) of a run with SEED."""
  init_key, dropout_key = jax.random.split(jax.random.key(seed))
  return init_key, dropout_key


def init_params(model: VGG, rng: jax.Array, image_shape: Sequence[int]) -> Any:
  """Fresh parameters of MODEL for images of IMAGE_SHAPE (H, W, C), drawn with RNG."""
  @jax.jit
  def init(rng):
    return model.init(rng, jnp.zeros((1,) + tuple(image_shape), jnp.float32),
                      train=False)["params"]
  return init(rng)


def param_shapes(model: VGG, image_shape: Sequence[int]) -> Any:
  """The parameters' shapes and dtypes (jax.ShapeDtypeStruct), nothing allocated."""
  images = jax.ShapeDtypeStruct((1,) + tuple(image_shape), jnp.float32)
  return jax.eval_shape(functools.partial(model.init, train=False), jax.random.key(0),
                        images)["params"]


def param_differences(expected: Any, params: Any) -> list[str]:
  """What keeps PARAMS from fitting the tree EXPECTED (e.g. `param_shapes`): parameters
  missing, unexpected, or of another shape, one line each; empty when they fit."""
  def flat(tree):
    return {jax.tree_util.keystr(path): tuple(np.shape(leaf)) for path, leaf
            in jax.tree_util.tree_flatten_with_path(tree)[0]}
  want, have = flat(expected), flat(params)
  problems = [f"missing {k} {want[k]}" for k in sorted(set(want) - set(have))]
  problems += [f"unexpected {k} {have[k]}" for k in sorted(set(have) - set(want))]
  problems += [f"{k}: {have[k]} given, {want[k]} in the net"
               for k in sorted(set(want) & set(have)) if want[k] != have[k]]
  return problems
