"""Pretrained VGG weights from torchvision or Keras as vgg_jax checkpoints.

Nothing is downloaded: bring the file, and convert it once:

  python -m vgg_jax.convert --from=torchvision --model=D \
      --input=vgg16-397923af.pth --output=$HOME/weights/vgg16_torchvision
  python -m vgg_jax.convert --from=keras --model=D \
      --input=vgg16_weights_tf_dim_ordering_tf_kernels.h5 \
      --output=$HOME/weights/vgg16_keras [--rgb]

The output is a parameters-only checkpoint (`checkpointing.save_params`) that
evaluation reads and that a training run starts from (config.init_from, rule "all" or
"all_but_fc8"). Its meta names the net (model, num_classes, width, fc_width,
crop_size) and the *input convention* the source was trained with, which differs from
ours and must be applied to the images (`pipeline_fields` for the input pipeline,
`apply_input_convention` for raw arrays):

- torchvision: RGB scaled to 0..1, normalised with mean (0.485, 0.456, 0.406) and std
  (0.229, 0.224, 0.225);
- Keras VGG16/19 ("caffe" mode): BGR, 0..255, minus the BGR mean (103.939, 116.779,
  123.68), no std. The convs were trained on BGR input; we keep them as they are and
  store BGR in the convention (rather than flipping conv1_1's input channels), so the
  converted parameters stay identical to Keras's and the stored convention says
  exactly what Keras's own `preprocess_input` does. `--rgb` flips them instead (for
  the input pipeline, which feeds RGB): the result then takes the paper's own input,
  RGB 0..255 minus the ImageNet mean RGB, like the nets trained here.

Layouts (generic over Table 1, derived from `models.layer_specs`):
- torchvision: `features.{i}.weight` [out, in, kh, kw] where i counts the modules of the
  sequence conv, ReLU, [max-pool] (VGG16: 0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26,
  28); `classifier.{0,3,6}.weight` [out, in]. classifier.0's inputs are flattened
  from an NCHW (512, 7, 7) map; ours from NHWC (7, 7, 512), so its columns are
  reordered (`fc6_kernel_from_nchw`). torchvision's adaptive average pool to 7x7 is the
  identity at 224x224 crops, the size these weights were trained on; at other sizes
  use dense evaluation. Batch-norm variants (vgg16_bn) are not the paper's nets and
  are refused.
- Keras: layers block{b}_conv{i} (kernel [kh, kw, in, out]), fc1, fc2, predictions
  (kernel [in, out]), in the Keras 2 HDF5 layout (`save_weights` files such as
  vgg16_weights_tf_dim_ordering_tf_kernels.h5, or `model_weights/` of `model.save`),
  the Keras 3 `.weights.h5` layout (`layers/<class>/vars/{0,1}` with the layer's
  name as an attribute) or a `.keras` archive. Keras flattens channels-last (7, 7,
  512) maps, so fc1 needs no reordering. "notop" files (convolutions only) convert
  to a checkpoint without fc6-fc8, for the surgery rule "convs".
"""

from __future__ import annotations

import io
import math
import os
import re
import zipfile
from typing import Any, Mapping

from absl import app
from absl import flags
from absl import logging
import jax
import jax.numpy as jnp
import numpy as np

from vgg_jax import checkpointing
from vgg_jax import cli
from vgg_jax import models

Params = dict[str, dict[str, np.ndarray]]

# Input conventions, as stored in a converted checkpoint's meta["input_convention"].
# Applied to RGB 0..255 images: flip to `channel_order`, multiply by `scale`, subtract
# `mean` and divide by `std` (per channel, in `channel_order`; None: skip).
TORCHVISION = dict(name="torchvision", channel_order="RGB", scale=1 / 255,
                   mean=[0.485, 0.456, 0.406], std=[0.229, 0.224, 0.225])
KERAS_CAFFE = dict(name="keras_caffe", channel_order="BGR", scale=1.0,
                   mean=[103.939, 116.779, 123.68], std=None)
# Nets trained by vgg_jax: the input pipeline's own normalisation applies
# (config.mean_rgb, config.normalize_std); apply_input_convention is the identity.
NATIVE = dict(name="vgg_jax", channel_order="RGB", scale=1.0, mean=None, std=None)
CONVENTIONS = {"torchvision": TORCHVISION, "keras": KERAS_CAFFE}

# torchvision's classifier: Linear, ReLU, Dropout, Linear, ReLU, Dropout, Linear.
TORCHVISION_CLASSIFIER = {"fc6": 0, "fc7": 3, "fc8": 6}
KERAS_HEAD = {"fc1": "fc6", "fc2": "fc7", "predictions": "fc8"}
_KERAS_CONV = re.compile(r"^block(\d+)_conv(\d+)$")


# ---------------------------------------------------------------- input conventions


def input_convention(meta: Mapping[str, Any] | None) -> dict:
  """The input convention of a checkpoint's meta (NATIVE for nets trained here)."""
  convention = dict((meta or {}).get("input_convention") or NATIVE)
  for key, value in NATIVE.items():
    convention.setdefault(key, value)
  if convention["channel_order"] not in ("RGB", "BGR"):
    raise ValueError(f"Unknown channel_order {convention['channel_order']!r} in the "
                     f"input convention {convention}; expected 'RGB' or 'BGR'.")
  return convention


def is_native(convention: Mapping[str, Any]) -> bool:
  """True when the input pipeline's own normalisation applies (nets trained here)."""
  return convention.get("name", NATIVE["name"]) == NATIVE["name"]


def apply_input_convention(images_rgb_0_255, convention: Mapping[str, Any]):
  """Turns raw RGB 0..255 images [..., 3] into what a converted net expects.

  Pure and array-agnostic (numpy in, numpy out; jax in, jax out), so evaluation and
  the input pipeline can use it eagerly or under jit.
  """
  convention = input_convention({"input_convention": dict(convention)})
  xp = jnp if isinstance(images_rgb_0_255, jax.Array) else np
  x = xp.asarray(images_rgb_0_255).astype(xp.float32)
  if convention["channel_order"] == "BGR":
    x = x[..., ::-1]
  x = x * xp.float32(convention["scale"])
  if convention["mean"] is not None:
    x = x - xp.asarray(convention["mean"], xp.float32)
  if convention["std"] is not None:
    x = x / xp.asarray(convention["std"], xp.float32)
  return x


def pipeline_fields(convention: Mapping[str, Any]) -> dict:
  """The data config fields (mean_rgb, normalize_std) that make vgg_jax's input
  pipeline, which subtracts a mean (and divides by a std) on the 0..255 RGB scale,
  produce a convention's input. The pipeline's std is ImageNet's
  (58.393, 57.12, 57.375), torchvision's to 3e-5. BGR conventions have no such
  fields: convert with `rgb=True` (--rgb) first, or apply `apply_input_convention` to
  raw arrays."""
  convention = input_convention({"input_convention": dict(convention)})
  if is_native(convention):
    return {}
  if convention["channel_order"] != "RGB":
    raise ValueError(f"The input pipeline feeds RGB; the convention "
                     f"{convention['name']!r} is {convention['channel_order']}. Convert "
                     f"with --rgb (flips conv1_1's input channels).")
  scale = convention["scale"]
  mean = [0.0, 0.0, 0.0] if convention["mean"] is None else convention["mean"]
  return dict(mean_rgb=",".join(f"{round(m / scale, 4):g}" for m in mean),
              normalize_std=convention["std"] is not None)


def bgr_to_rgb(params: Params, convention: Mapping[str, Any]) -> tuple[Params, dict]:
  """Flips conv1_1's input channels so a net trained on BGR input takes RGB input, and
  returns the RGB convention that goes with it (the mean flipped likewise). The
  outputs are unchanged: conv1_1 sees the same pixels through the same weights."""
  convention = input_convention({"input_convention": dict(convention)})
  if convention["channel_order"] != "BGR":
    raise ValueError(f"The convention {convention['name']!r} is already RGB.")
  params = dict(params)
  params["conv1_1"] = dict(params["conv1_1"],
                           kernel=np.asarray(params["conv1_1"]["kernel"])[:, :, ::-1])
  flipped = lambda v: None if v is None else list(v)[::-1]
  convention = dict(convention, name=convention["name"] + "_rgb", channel_order="RGB",
                    mean=flipped(convention["mean"]), std=flipped(convention["std"]))
  return params, convention


# ------------------------------------------------------------------- torchvision


def torchvision_conv_indices(model: str) -> dict[str, int]:
  """conv name -> index in torchvision's `features` Sequential, for any Table 1 net.

  torchvision builds `features` as conv, ReLU for every conv and one MaxPool2d per
  pool (an LRN counts as one module), so VGG16's convs sit at 0, 2, 5, 7, 10, ...
  """
  indices, i = {}, 0
  for spec in models.layer_specs(model):
    if isinstance(spec, models.ConvSpec):
      indices[spec.name] = i
      i += 2
    else:
      i += 1
  return indices


def fc6_kernel_from_nchw(weight: np.ndarray, channels: int) -> np.ndarray:
  """torchvision's classifier.0.weight [out, C*H*W] (inputs flattened from an NCHW
  map) -> our fc6 kernel [H*W*C, out] (inputs flattened in (H, W, C) order)."""
  out, inputs = weight.shape
  window = math.isqrt(inputs // channels)
  if window * window * channels != inputs:
    raise ValueError(f"fc6 has {inputs} inputs, not a square map of {channels} "
                     f"channels.")
  return (np.asarray(weight).reshape(out, channels, window, window)
          .transpose(2, 3, 1, 0).reshape(inputs, out))


def fc6_kernel_to_nchw(kernel: np.ndarray, channels: int) -> np.ndarray:
  """The inverse of `fc6_kernel_from_nchw`."""
  inputs, out = kernel.shape
  window = math.isqrt(inputs // channels)
  return (np.asarray(kernel).reshape(window, window, channels, out)
          .transpose(3, 2, 0, 1).reshape(out, inputs))


def _strip_prefix(state_dict: Mapping[str, Any]) -> dict[str, Any]:
  """Drops wrappers' prefixes ("module." of DataParallel, "model.")."""
  out = {}
  for key, value in state_dict.items():
    for prefix in ("module.", "model."):
      if key.startswith(prefix) and not key.startswith(("features.", "classifier.")):
        key = key[len(prefix):]
    out[key] = value
  return out


def convert_torchvision(state_dict: Mapping[str, np.ndarray], model: str) -> Params:
  """Our params from a torchvision VGG state dict (numpy arrays) of net `model`."""
  model = models.canonical_name(model)
  sd = {k: np.asarray(v, np.float32) for k, v in _strip_prefix(state_dict).items()}
  if any(k.endswith(("running_mean", "running_var")) for k in sd):
    raise ValueError("This state dict has batch normalisation (a torchvision vgg*_bn "
                     "model); the paper's nets have none and vgg_jax cannot load it.")
  indices = torchvision_conv_indices(model)
  found = sorted(int(m.group(1)) for k in sd
                 if (m := re.match(r"^features\.(\d+)\.weight$", k)))
  if found != sorted(indices.values()):
    raise ValueError(
        f"The state dict's convs sit at features.{found} but net {model} has them at "
        f"features.{sorted(indices.values())}: is --model right? (torchvision vgg11: "
        f"A, vgg13: B, vgg16: D, vgg19: E.)")
  params: Params = {}
  for name, i in indices.items():
    weight = sd[f"features.{i}.weight"]
    if weight.ndim != 4:
      raise ValueError(f"features.{i}.weight ({name}) should be [out, in, kh, kw], got "
                       f"shape {weight.shape}.")
    params[name] = dict(kernel=weight.transpose(2, 3, 1, 0),
                        bias=sd[f"features.{i}.bias"])
  head = {n: i for n, i in TORCHVISION_CLASSIFIER.items()
          if f"classifier.{i}.weight" in sd}
  if head and len(head) != len(TORCHVISION_CLASSIFIER):
    raise ValueError(f"The state dict has classifier layers {sorted(head.values())}; "
                     f"expected all of 0, 3, 6 (or none).")
  last_channels = params[list(indices)[-1]]["kernel"].shape[-1]
  for name, i in head.items():
    weight = sd[f"classifier.{i}.weight"]
    kernel = fc6_kernel_from_nchw(weight, last_channels) if name == "fc6" else weight.T
    params[name] = dict(kernel=kernel, bias=sd[f"classifier.{i}.bias"])
  return params


def read_torchvision(path: str) -> dict[str, np.ndarray]:
  """A torchvision state dict as numpy arrays, from .safetensors or .pth/.pt.

  .pth files are read with `torch.load(weights_only=True)` (never an unrestricted
  pickle) and need torch installed; safetensors files need only `safetensors`.
  """
  if path.endswith(".safetensors"):
    from safetensors.numpy import load_file
    return dict(load_file(path))
  try:
    import torch
  except ImportError as e:
    raise ImportError(
        f"Reading {path!r} needs PyTorch (pip install torch), or convert the file to "
        f".safetensors first.") from e
  state = torch.load(path, map_location="cpu", weights_only=True)
  if isinstance(state, Mapping) and "state_dict" in state:
    state = state["state_dict"]
  if not isinstance(state, Mapping):
    raise ValueError(f"{path!r} holds a {type(state).__name__}, not a state dict.")
  return {k: v.detach().cpu().float().numpy() for k, v in state.items()
          if hasattr(v, "detach")}


# ------------------------------------------------------------------------- Keras


def _keras_layer_of(h5_path: str, obj) -> str | None:
  """The Keras layer name a dataset belongs to: the nearest enclosing group whose name,
  or whose `name` attribute (Keras 3), is block{b}_conv{i}, fc1, fc2 or predictions."""
  parts = h5_path.split("/")
  group = obj.parent
  for part in reversed(parts[:-1]):
    attr = group.attrs.get("name")
    if isinstance(attr, bytes):
      attr = attr.decode()
    for candidate in (part, attr):
      if isinstance(candidate, str) and (_KERAS_CONV.match(candidate)
                                         or candidate in KERAS_HEAD):
        return candidate
    group = group.parent
  return None


def read_keras(h5) -> dict[str, dict[str, np.ndarray]]:
  """Keras layer name -> {"kernel", "bias"} from an HDF5 file, group or .keras archive.

  Tolerant of the layouts Keras wrote over the years: datasets are found anywhere
  under their layer's group (optimizer state is skipped) and told apart by rank
  (kernels have two or more axes, biases one).
  """
  import h5py
  if isinstance(h5, (str, os.PathLike)):
    if zipfile.is_zipfile(h5):  # Keras 3 .keras archive
      with zipfile.ZipFile(h5) as archive:
        data = archive.read("model.weights.h5")
      with h5py.File(io.BytesIO(data), "r") as f:
        return read_keras(f)
    with h5py.File(h5, "r") as f:
      return read_keras(f)
  layers: dict[str, dict[str, np.ndarray]] = {}

  def visit(path, obj):
    if not isinstance(obj, h5py.Dataset):
      return
    if any(p.startswith("optimizer") for p in path.split("/")):
      return
    layer = _keras_layer_of(path, obj)
    if layer is None:
      return
    kind = "kernel" if obj.ndim >= 2 else "bias"
    if kind in layers.setdefault(layer, {}):
      raise ValueError(f"Two {kind}s for Keras layer {layer!r} in {h5.file.filename!r} "
                       f"(at {path!r}).")
    layers[layer][kind] = np.asarray(obj[()], np.float32)

  h5.visititems(visit)
  if not layers:
    raise ValueError(f"No VGG layers (block1_conv1, ..., fc1, fc2, predictions) found "
                     f"in the HDF5 file {h5.file.filename!r}.")
  return layers


def convert_keras(h5, model: str) -> Params:
  """Our params from a Keras VGG16/VGG19 weights file (path or h5py group)."""
  model = models.canonical_name(model)
  layers = h5 if _is_layer_dict(h5) else read_keras(h5)
  convs = {f"conv{m.group(1)}_{m.group(2)}": k for k in layers
           if (m := _KERAS_CONV.match(k))}
  expected = models.conv_names(model)
  if sorted(convs) != sorted(expected):
    raise ValueError(
        f"The Keras file has convs {', '.join(sorted(convs.values()))} but net {model} "
        f"has {len(expected)} ({', '.join(expected)}): is --model right? (Keras VGG16: "
        f"D, VGG19: E.)")
  params: Params = {}
  for name in expected:
    layer = layers[convs[name]]
    if set(layer) != {"kernel", "bias"}:
      raise ValueError(f"Keras layer {convs[name]!r} has {sorted(layer)}; expected a "
                       f"kernel and a bias.")
    kernel = layer["kernel"]
    if kernel.ndim != 4 or kernel.shape[0] != kernel.shape[1]:
      raise ValueError(f"Keras layer {convs[name]!r}: kernel shape {kernel.shape} is not "
                       f"[kh, kw, in, out] (Theano-ordered files are not supported).")
    params[name] = dict(kernel=kernel, bias=layer["bias"])
  head = {ours: k for k, ours in KERAS_HEAD.items() if k in layers}
  if head and len(head) != len(KERAS_HEAD):
    raise ValueError(f"The Keras file has {', '.join(head.values())} but not all of "
                     f"fc1, fc2, predictions.")
  for ours in models.HEAD:
    if ours in head:
      params[ours] = dict(kernel=layers[head[ours]]["kernel"],
                          bias=layers[head[ours]]["bias"])
  return params


def _is_layer_dict(obj) -> bool:
  return isinstance(obj, dict) and all(isinstance(v, dict) for v in obj.values())


# ----------------------------------------------------------------- checkpoint meta


def converted_architecture(params: Params, model: str) -> dict:
  """The architecture fields (`models.ARCHITECTURE_FIELDS`: width, channels, and with a
  head num_classes, fc_width, crop_size) of converted params, read from their shapes
  and checked against the net `models.create_model` builds with them."""
  model = models.canonical_name(model)
  convs = [s for s in models.layer_specs(model) if isinstance(s, models.ConvSpec)]
  width = params[convs[0].name]["kernel"].shape[-1] / convs[0].features
  meta = dict(model=model, width=width, channels=params[convs[0].name]["kernel"].shape[2],
              filter_size=None, head="fc8" in params)
  if "fc8" in params:
    channels = params[convs[-1].name]["kernel"].shape[-1]
    window = math.isqrt(params["fc6"]["kernel"].shape[0] // channels)
    meta.update(num_classes=int(params["fc8"]["kernel"].shape[-1]),
                fc_width=int(params["fc6"]["kernel"].shape[-1]),
                crop_size=window * 2 ** models.NUM_POOLS)
  net = models.create_model(model, num_classes=meta.get("num_classes", 1000),
                            width=width, fc_width=meta.get("fc_width", 4096))
  size = meta.get("crop_size", models.MIN_IMAGE_SIZE)
  expected = models.param_shapes(net, (size, size, meta["channels"]))
  if "fc8" not in params:  # conv-only weights: the head is not theirs to fit
    expected = {k: v for k, v in expected.items() if k not in models.HEAD}
  wrong = models.param_differences(expected, params)
  if wrong:
    raise ValueError(f"The converted weights do not fit net {model} (width {width:g}):"
                     f"\n  " + "\n  ".join(wrong))
  return meta


def convert_file(source_format: str, model: str, input_path: str,
                 output: str | None = None, *, rgb: bool = False) -> tuple[Params, dict]:
  """(params, meta) of a torchvision or Keras file; saved to `output` when given.

  `rgb=True` turns a BGR net (Keras) into one that takes RGB input (`bgr_to_rgb`),
  whose convention the input pipeline's config fields can express (`pipeline_fields`).
  """
  if source_format not in CONVENTIONS:
    raise ValueError(f"--from must be one of {', '.join(CONVENTIONS)}, got "
                     f"{source_format!r}.")
  if not os.path.exists(input_path):
    raise FileNotFoundError(f"No such weights file: {input_path!r}.")
  if output is not None:
    checkpointing.check_output_free(output)
  try:
    weights = (read_torchvision(input_path) if source_format == "torchvision"
               else read_keras(input_path))
  except (ImportError, ValueError):
    raise
  except Exception as e:  # pylint: disable=broad-except (pickle, HDF5, safetensors, zip)
    raise ValueError(f"Cannot read {input_path!r} as {source_format} weights "
                     f"({type(e).__name__}: {e}). Give the file as its source saved it "
                     f"(torchvision: .pth or .safetensors; Keras: .h5 or .keras).") from e
  params = (convert_torchvision(weights, model) if source_format == "torchvision"
            else convert_keras(weights, model))
  params = jax.tree_util.tree_map(np.ascontiguousarray, params)
  meta = converted_architecture(params, model)
  convention = dict(CONVENTIONS[source_format])
  if rgb and convention["channel_order"] == "BGR":
    params, convention = bgr_to_rgb(params, convention)
  meta.update(source=source_format, source_file=os.path.basename(input_path),
              input_convention=convention)
  if output is not None:
    checkpointing.save_params(output, params, meta)
  return params, meta


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  FLAGS = flags.FLAGS
  if not FLAGS["verbosity"].present:  # orbax's info logs would bury the report
    logging.set_verbosity(logging.WARNING)
  params, meta = convert_file(FLAGS["from"].value, FLAGS.model, FLAGS.input, FLAGS.output,
                              rgb=FLAGS.rgb)
  print(f"Converted {FLAGS.input} ({FLAGS['from'].value}) to net {meta['model']} with "
        f"{models.count_params(params):,} parameters: {meta}")
  print(f"Wrote {FLAGS.output}. Input convention: {meta['input_convention']}")
  if meta["input_convention"]["channel_order"] == "RGB":
    fields = " ".join(f"--config.{k}={v}"
                      for k, v in pipeline_fields(meta["input_convention"]).items())
    print(f"To train or evaluate it with vgg_jax's input pipeline: {fields}")


def _define_flags() -> None:
  flags.DEFINE_enum("from", None, list(CONVENTIONS), "Where the weights come from.")
  flags.DEFINE_string("model", "D", "Table 1 name or alias (D = vgg16, E = vgg19).")
  flags.DEFINE_string("input", None,
                      "torchvision .safetensors/.pth, or Keras .h5/.keras.")
  flags.DEFINE_string("output", None, "Directory for the vgg_jax checkpoint.")
  flags.DEFINE_bool("rgb", False, "Flip conv1_1's input channels of a BGR net (Keras) "
                    "so that it takes RGB input.")
  flags.mark_flags_as_required(["from", "input", "output"])


if __name__ == "__main__":
  _define_flags()
  cli.run(main)
