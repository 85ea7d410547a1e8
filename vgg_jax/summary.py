"""Per-layer summary of a VGG net (Table 1 and 2): shapes, parameters, multiply-adds.

Computed from `models.layer_specs`, the single layer specification, with shapes and
arithmetic only: no net is allocated, so even E summarises in well under a second.

    python -m vgg_jax.summary --model=D
    python -m vgg_jax.summary --model=vgg19 --image_size=384 --batch_size=32 \
        --dtype=bfloat16

prints one row per layer (name, type, output shape, parameters, multiply-adds, memory
of the layer's output for the batch at the compute dtype) and ends with the line

    total: params=138,357,544 macs=15,470,264,320

Counting conventions: multiply-adds (MACs) count the convolutions (out_h * out_w * k * k
* c_in * c_out) and the fully connected layers (inputs * outputs) of one image; pooling,
ReLU and LRN are not counted, and biases are not MACs. A conv row's output includes its
ReLU (applied in place). fc6 sees the conv trunk's (H // 32) x (W // 32) x C map, as in
`models.VGG`, so off the 224 training size its parameter count changes with the image:
such a summary describes a different FC net, not the paper's dense evaluation of the
224-trained net at a larger Q (where fc6 is applied as a 7x7 conv).

Library use (benchmark, experiment reports):

    from vgg_jax import summary
    rows = summary.layer_table("D", image_size=224)       # list[LayerRow]
    summary.count_params_from_spec("D")                    # 138_357_544
    summary.count_macs("D")                                # 15_470_264_320
    summary.totals("D")                                    # Totals(params, macs, ...)
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Sequence

from absl import app
from absl import flags
import numpy as np

from vgg_jax import cli
from vgg_jax import models

_POOL_WINDOW = 2


@dataclasses.dataclass(frozen=True)
class LayerRow:
  """One row of the summary; shapes and counts are for a single image.

  Attributes:
    name: the layer's parameter name (conv3_1, fc6) or pool{stage} / norm{stage}.
    kind: a short description: "conv3x3-256", "maxpool 2x2", "LRN", "fc-4096".
    output_shape: (height, width, channels) of a conv / pool / LRN output, or
      (features,) of a fully connected layer.
    params: trainable scalars (kernel and bias); 0 for pools and LRN.
    macs: multiply-adds of this layer for one image; 0 for pools and LRN.
  """
  name: str
  kind: str
  output_shape: tuple[int, ...]
  params: int
  macs: int

  @property
  def activations(self) -> int:
    """Scalars in this layer's output for one image."""
    return math.prod(self.output_shape)

  def activation_bytes(self, batch_size: int = 1, dtype: Any = "float32") -> int:
    """Bytes of this layer's output for `batch_size` images stored as `dtype`."""
    return batch_size * self.activations * np.dtype(_dtype(dtype)).itemsize


@dataclasses.dataclass(frozen=True)
class Totals:
  """Sums over a net's layers (one image; see `LayerRow`)."""
  params: int
  macs: int
  activations: int  # scalars of all layer outputs, the input image excluded


def _dtype(dtype: Any):
  """Accepts "bfloat16" and friends as well as numpy / jax dtypes."""
  if isinstance(dtype, str):
    import ml_dtypes  # a dependency of jax: numpy itself knows no bfloat16.
    if hasattr(ml_dtypes, dtype):
      return getattr(ml_dtypes, dtype)
  return dtype


def _image_hw(image_size: int | Sequence[int]) -> tuple[int, int]:
  if isinstance(image_size, int):
    return image_size, image_size
  height, width = image_size
  return int(height), int(width)


def layer_table(name: str, *, image_size: int | Sequence[int] = 224, channels: int = 3,
                num_classes: int = 1000, width: float = 1.0,
                filter_size: int | None = None, fc_width: int = 4096) -> list[LayerRow]:
  """The per-layer rows of net `name` ("A" ... "E", "B-5x5" or an alias such as vgg16).

  Args:
    name: a Table 1 name or alias, as for `models.create_model`.
    image_size: side of the square input, or (height, width); at least 32 pixels.
    channels: channels of the input image (3 for RGB).
    num_classes, width, filter_size, fc_width: the knobs of `models.create_model`.

  Raises:
    ValueError: on the same bad knobs and image sizes as `models.create_model` /
      `models.VGG`, with the same messages.
  """
  models.check_knobs(width=width, filter_size=filter_size, fc_width=fc_width,
                     num_classes=num_classes)
  height, width_px = _image_hw(image_size)
  models.check_image_size(height, width_px)
  if channels < 1:
    raise ValueError(f"channels must be a positive integer (3 for RGB), "
                     f"got {channels!r}.")

  rows: list[LayerRow] = []
  h, w, c = height, width_px, channels
  for spec in models.layer_specs(name, width=width, filter_size=filter_size):
    if isinstance(spec, models.ConvSpec):
      k, cout = spec.filter_size, spec.features
      rows.append(LayerRow(spec.name, f"conv{k}x{k}-{cout}", (h, w, cout),
                           params=k * k * c * cout + cout, macs=h * w * k * k * c * cout))
      c = cout  # "same" padding, stride 1: the spatial size is kept.
    elif isinstance(spec, models.LRNSpec):
      rows.append(LayerRow(spec.name, "LRN", (h, w, c), params=0, macs=0))
    else:
      h, w = h // _POOL_WINDOW, w // _POOL_WINDOW  # 2x2, stride 2, "valid".
      rows.append(LayerRow(spec.name, f"maxpool {_POOL_WINDOW}x{_POOL_WINDOW}", (h, w, c),
                           params=0, macs=0))

  inputs = h * w * c
  for layer, features in zip(models.HEAD, (fc_width, fc_width, num_classes)):
    rows.append(LayerRow(layer, f"fc-{features}", (features,),
                         params=inputs * features + features, macs=inputs * features))
    inputs = features
  return rows


def totals(name: str, **knobs) -> Totals:
  """Parameter, multiply-add and activation totals; takes `layer_table`'s arguments."""
  rows = layer_table(name, **knobs)
  return Totals(params=sum(r.params for r in rows), macs=sum(r.macs for r in rows),
                activations=sum(r.activations for r in rows))


def run_totals(config) -> Totals:
  """`totals` of a run's net, from its architecture fields (`models.ARCHITECTURE_FIELDS`
  of its config; num_classes None counts as ImageNet's 1000)."""
  arch = models.architecture(config)
  return totals(arch["model"], image_size=arch["crop_size"], channels=arch["channels"],
                num_classes=arch.get("num_classes") or 1000, width=arch["width"],
                filter_size=arch.get("filter_size"), fc_width=arch["fc_width"])


def count_params_from_spec(name: str, **knobs) -> int:
  """Trainable parameters of net `name`, equal to `models.count_params` of its init.

  Takes `layer_table`'s arguments; e.g. count_params_from_spec("D") == 138_357_544.
  """
  return totals(name, **knobs).params


def count_macs(name: str, **knobs) -> int:
  """Multiply-adds of one forward pass of one image (convs and FC layers only).

  Takes `layer_table`'s arguments; e.g. count_macs("D") == 15_470_264_320.
  """
  return totals(name, **knobs).macs


def human_bytes(num_bytes: float) -> str:
  """1536 -> "1.5 KiB" (binary units)."""
  for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
    if abs(num_bytes) < 1024 or unit == "TiB":
      return f"{num_bytes:.0f} {unit}" if unit == "B" else f"{num_bytes:.1f} {unit}"
    num_bytes /= 1024
  raise AssertionError("unreachable")


def format_table(rows: Sequence[LayerRow], *, batch_size: int = 1,
                 dtype: Any = "float32") -> str:
  """Renders `layer_table`'s rows as text; the last line is the `total:` line.

  Activation memory is each layer's output for `batch_size` images at `dtype`;
  parameters are counted as float32 (the models keep float32 parameters).
  """
  if batch_size < 1:
    raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}.")
  dtype_name = np.dtype(_dtype(dtype)).name
  header = ("layer", "type", "output shape", "params", "MACs",
            f"activations (batch {batch_size}, {dtype_name})")
  table = [header]
  for r in rows:
    table.append((r.name, r.kind, "x".join(str(d) for d in r.output_shape),
                  f"{r.params:,}", f"{r.macs:,}",
                  human_bytes(r.activation_bytes(batch_size, dtype))))
  widths = [max(len(line[i]) for line in table) for i in range(len(header))]
  right = (False, False, True, True, True, True)

  def render(line):
    cells = [cell.rjust(n) if r else cell.ljust(n)
             for cell, n, r in zip(line, widths, right)]
    return "  ".join(cells).rstrip()

  lines = [render(header), "-" * len(render(header))]
  lines += [render(line) for line in table[1:]]
  params = sum(r.params for r in rows)
  macs = sum(r.macs for r in rows)
  act_bytes = sum(r.activation_bytes(batch_size, dtype) for r in rows)
  lines += [
      "-" * len(lines[0]),
      f"parameter memory: {human_bytes(4 * params)} (float32)",
      f"activation memory: {human_bytes(act_bytes)} (all layer outputs, forward pass, "
      f"batch {batch_size}, {dtype_name})",
      f"total: params={params:,} macs={macs:,}",
  ]
  return "\n".join(lines)


# Flags are defined only when this module runs as a program, so that library users
# (benchmark, reports) can import it next to their own --model flags.
FLAGS = flags.FLAGS


def define_flags(flag_values: flags.FlagValues = FLAGS) -> None:
  """The command-line knobs, mirroring `models.create_model`."""
  kw = dict(flag_values=flag_values)
  flags.DEFINE_string("model", "D", "Table 1 name (A, A-LRN, B, C, D, E, B-5x5) or "
                      "alias (vgg11, vgg16, ...).", **kw)
  flags.DEFINE_integer("num_classes", 1000, "Outputs of fc8.", **kw)
  flags.DEFINE_integer("image_size", 224, "Side of the square input in pixels.", **kw)
  flags.DEFINE_float("width", 1.0, "Multiplier of every conv's filter count.", **kw)
  flags.DEFINE_integer("filter_size", None, "Replaces the 3x3 filters (odd).", **kw)
  flags.DEFINE_integer("fc_width", 4096, "Width of fc6 and fc7.", **kw)
  flags.DEFINE_integer("channels", 3, "Channels of the input image.", **kw)
  flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16", "float16"],
                    "Compute dtype, for activation memory.", **kw)
  flags.DEFINE_integer("batch_size", 1, "Images per batch, for activation memory.", **kw)


def main(argv: Sequence[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {' '.join(argv[1:])}")
  try:
    rows = layer_table(FLAGS.model, image_size=FLAGS.image_size, channels=FLAGS.channels,
                       num_classes=FLAGS.num_classes, width=FLAGS.width,
                       filter_size=FLAGS.filter_size, fc_width=FLAGS.fc_width)
    text = format_table(rows, batch_size=FLAGS.batch_size, dtype=FLAGS.dtype)
  except ValueError as e:
    raise app.UsageError(str(e)) from e
  print(f"VGG {models.canonical_name(FLAGS.model)}: {FLAGS.image_size}x{FLAGS.image_size}"
        f"x{FLAGS.channels} input, {FLAGS.num_classes} classes")
  print(text)


if __name__ == "__main__":
  define_flags()
  cli.run(main)
