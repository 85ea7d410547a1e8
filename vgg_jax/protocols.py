"""The paper's test protocols (section 3.2) and how their posteriors combine (section 4).

Every protocol ends in softmax posteriors per image, so that protocols, test scales and
nets combine by averaging posteriors, as the paper does:

  * centre crop: one crop_size crop in the middle of the image rescaled to Q (the
    validation run during training);
  * dense: the whole image rescaled to Q through the fully-convolutional net, the class
    score map averaged spatially, softmax; the same for the mirrored image, and the two
    posteriors averaged;
  * multi-crop: a 5x5 regular grid of crops over the image rescaled to Q and their
    mirror images (50 crops per scale), posteriors averaged;
  * multi-scale: the posteriors of several Q averaged; the paper's sets are the
    presets (`paper_scales`: fixed S -> {S-32, S, S+32}; jittered S ->
    {Smin, (Smin+Smax)/2, Smax});
  * dense + multi-crop: their posteriors averaged;
  * ensembles (ConvNet fusion): the posteriors of several checkpoints averaged, which
    may be of different nets (D and E in Table 6).

The per-image functions (`center_crop_posteriors`, `dense_posteriors`,
`multi_crop_posteriors`) run on one device on a batch of images of one shape; `PASSES`
names them for `vgg_jax.evaluate`, which runs them over a split, and `PROTOCOLS` says
which passes each protocol averages.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Sequence

from absl import logging
import jax
import jax.numpy as jnp
import numpy as np
import tensorflow as tf

from vgg_jax import metrics
from vgg_jax import models

GRID = 5                 # multi-crop: a 5x5 grid of crops per scale, and their flips

Array = jax.Array


# ------------------------------------------------------------ per-image protocols


def center_crop_posteriors(model: models.VGG, params: Any, images: Array, *,
                           flip: bool = False) -> Array:
  """Softmax posteriors [N, classes] of centre crops [N, crop, crop, C] (with their
  mirror images averaged in when FLIP)."""
  n = images.shape[0]
  if flip:  # one batch through the net: one program, better filled devices
    images = jnp.concatenate([images, images[:, :, ::-1]])
  p = jax.nn.softmax(model.apply({"params": params}, images, train=False))
  return (p[:n] + p[n:]) / 2 if flip else p


def dense_posteriors(model: models.VGG, params: Any, images: Array, *,
                     flip: bool = True) -> Array:
  """Dense evaluation (section 3.2) of whole images [N, h, w, C] of one shape.

  The fully-convolutional net gives a class score map [N, h', w', classes]; it is
  averaged spatially into class scores and turned into posteriors by a softmax. With
  FLIP the posteriors of the mirrored images are averaged in.
  """
  n = images.shape[0]
  if flip:  # one batch through the net: one program, better filled devices
    images = jnp.concatenate([images, images[:, :, ::-1]])
  scores = model.apply({"params": params}, images, train=False, dense=True)
  p = jax.nn.softmax(jnp.mean(scores, axis=(1, 2)))
  return (p[:n] + p[n:]) / 2 if flip else p


def _grid_positions(side, crop_size: int, grid: int, xp):
  """GRID evenly spaced offsets from 0 to SIDE - CROP_SIZE, rounded half up (integer
  arithmetic, so that numpy on the host and TF in the pipeline agree)."""
  span = side - crop_size
  if grid == 1:
    return xp.reshape(span // 2, [1])
  k = tf.range(grid) if xp is tf else np.arange(grid)
  return (2 * k * span + (grid - 1)) // (2 * (grid - 1))


def crop_boxes(height: int, width: int, crop_size: int, grid: int = GRID) -> np.ndarray:
  """(top, left) int32 [GRID * GRID, 2] of the multi-crop grid over a HEIGHT x WIDTH
  image: GRID rows by GRID columns of CROP_SIZE crops, from one corner to the other."""
  if height < crop_size or width < crop_size:
    raise ValueError(f"A {height}x{width} image has no {crop_size}x{crop_size} crops: "
                     f"the test scale Q must be at least the crop size.")
  tops = _grid_positions(height, crop_size, grid, np)
  lefts = _grid_positions(width, crop_size, grid, np)
  return np.stack(np.meshgrid(tops, lefts, indexing="ij"), -1).reshape(-1, 2).astype(
      np.int32)


def crop_boxes_tf(height, width, crop_size: int, grid: int) -> tf.Tensor:
  tops = _grid_positions(tf.cast(height, tf.int32), crop_size, grid, tf)
  lefts = _grid_positions(tf.cast(width, tf.int32), crop_size, grid, tf)
  t, l = tf.meshgrid(tops, lefts, indexing="ij")
  return tf.reshape(tf.stack([t, l], -1), [grid * grid, 2])


def multi_crop_posteriors(model: models.VGG, params: Any, images: Array,
                          boxes: Array | None = None, *, crop_size: int,
                          grid: int = GRID, flip: bool = True) -> Array:
  """Multi-crop evaluation (section 3.2): posteriors [N, classes] averaged over the
  GRID x GRID crops of each image and their mirror images (50 crops).

  IMAGES [N, h, w, C]; BOXES int [N, K, 2] (top, left) of each image's crops, which
  lets images smaller than their canvas be padded (default: `crop_boxes` of the whole
  h x w). The crops are gathered on the device and all N * 2K go through the net as
  one batch.
  """
  n, height, width, channels = images.shape
  if boxes is None:
    boxes = jnp.broadcast_to(jnp.asarray(crop_boxes(height, width, crop_size, grid)),
                             (n, grid * grid, 2))

  def crop(image, box):
    return jax.lax.dynamic_slice(image, (box[0], box[1], 0),
                                 (crop_size, crop_size, channels))

  crops = jax.vmap(lambda image, b: jax.vmap(lambda x: crop(image, x))(b))(images, boxes)
  if flip:
    crops = jnp.concatenate([crops, crops[:, :, :, ::-1]], axis=1)
  per_image = crops.shape[1]
  logits = model.apply({"params": params},
                       crops.reshape((n * per_image, crop_size, crop_size, channels)),
                       train=False)
  return jax.nn.softmax(logits).reshape(n, per_image, -1).mean(axis=1)


# -------------------------------------------------------- posteriors over a split


@dataclasses.dataclass
class Posteriors:
  """One evaluation's softmax posteriors over a split, indexed by position in it.

  `seen` marks the images this process evaluated (undecodable images and, with several
  processes, the other processes' images are not). `seconds`: the time of the passes
  behind these numbers.
  """
  probs: np.ndarray     # float32 [num_examples, classes]
  labels: np.ndarray    # int32 [num_examples]
  seen: np.ndarray      # bool [num_examples]
  seconds: float = 0.0


def average(posteriors: Sequence[Posteriors]) -> Posteriors:
  """The mean of several evaluations of the same images (their seconds add up)."""
  if not posteriors:
    raise ValueError("Nothing to average.")
  first = posteriors[0]
  for p in posteriors[1:]:
    if p.probs.shape != first.probs.shape:
      raise ValueError(f"Cannot average posteriors of shapes {first.probs.shape} and "
                       f"{p.probs.shape}: another split or number of classes.")
    both = first.seen & p.seen
    if not np.array_equal(first.labels[both], p.labels[both]):
      raise ValueError("Cannot average posteriors of different images (labels differ).")
  seen = np.logical_and.reduce([p.seen for p in posteriors])
  probs = np.mean([p.probs for p in posteriors], axis=0, dtype=np.float32)
  return Posteriors(probs, first.labels, seen, sum(p.seconds for p in posteriors))


def multi_scale(per_scale: Sequence[Posteriors]) -> Posteriors:
  """Multi-scale evaluation (section 4.2): posteriors at several Q averaged."""
  return average(per_scale)


def ensemble(per_net: Sequence[Posteriors]) -> Posteriors:
  """ConvNet fusion (section 4.4): the posteriors of several nets averaged."""
  return average(per_net)


def errors(posteriors: Posteriors) -> dict:
  """Top-1 and top-5 error over the seen images (of all processes), and their number.

  Ties count against, as in training's evaluation."""
  probs, labels = posteriors.probs[posteriors.seen], posteriors.labels[posteriors.seen]
  counts = np.array([int(np.sum(metrics.correct_top_k(probs, labels, k))) for k in (1, 5)]
                    + [len(labels)], np.int64)
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    counts = np.asarray(multihost_utils.process_allgather(counts)).sum(0)
  top1, top5, images = (int(c) for c in counts)
  if images == 0:
    raise ValueError("No image was evaluated: the split is empty or undecodable.")
  return dict(top1_error=1 - top1 / images, top5_error=1 - top5 / images, images=images)


# ----------------------------------------------------------- the passes (registry)


@dataclasses.dataclass(frozen=True)
class Pass:
  """One evaluation pass over a split at one Q: what the pipeline gives per image, and
  the per-device function fn(model, params, batch, crop_size) -> posteriors [n, C]."""
  name: str
  fn: Callable[..., Array]
  center_crop: bool = False   # the pipeline cuts the centre crop (else: whole images)
  crops_per_image: int = 1    # crop-sized inputs through the net per image (its cost)
  by_area: bool = False       # ... times the image's area in crops (dense)


def _center_crop_pass(model, params, batch, crop_size):
  del crop_size
  return center_crop_posteriors(model, params, batch["image"])


def _dense_pass(model, params, batch, crop_size):
  del crop_size
  return dense_posteriors(model, params, batch["image"])


def _multi_crop_pass(model, params, batch, crop_size):
  return multi_crop_posteriors(model, params, batch["image"], batch["boxes"],
                               crop_size=crop_size)


PASSES: dict[str, Pass] = {
    "center_crop": Pass("center_crop", _center_crop_pass, center_crop=True),
    "dense": Pass("dense", _dense_pass, crops_per_image=2, by_area=True),
    "multi_crop": Pass("multi_crop", _multi_crop_pass, crops_per_image=2 * GRID * GRID),
}

# A protocol averages the posteriors of its passes (at each Q, then over the Q).
PROTOCOLS: dict[str, tuple[str, ...]] = {
    "center_crop": ("center_crop",),
    "dense": ("dense",),
    "multi_crop": ("multi_crop",),
    "dense+multi_crop": ("dense", "multi_crop"),
}


def parse_protocols(protocols: str | Sequence[str] | None) -> tuple[str, ...]:
  """A comma-separated string or a list of names (None, "" or "all": every protocol)."""
  if protocols is None or protocols == "all":
    return tuple(PROTOCOLS)
  if isinstance(protocols, str):
    protocols = [p for p in protocols.split(",")]
  names = tuple(p.strip() for p in protocols if p.strip())
  if not names or names == ("all",):
    return tuple(PROTOCOLS)
  unknown = [p for p in names if p not in PROTOCOLS]
  if unknown:
    raise ValueError(f"Unknown evaluation protocol(s) {unknown}; choose from "
                     f"{', '.join(PROTOCOLS)} (or 'all').")
  return tuple(dict.fromkeys(names))


def paper_scales(config) -> tuple[int, ...]:
  """The paper's test scales Q for a net trained at S (section 4.2): fixed S ->
  {S-32, S, S+32}; jittered S in [Smin, Smax] -> {Smin, (Smin+Smax)/2, Smax}. Scales
  below the crop size are left out."""
  low, high = int(config.train_scale_min), int(config.train_scale_max)
  scales = (low - 32, low, low + 32) if low == high else (low, (low + high) // 2, high)
  kept = tuple(q for q in scales if q >= config.crop_size)
  if len(kept) < len(scales):
    logging.info("Test scales %s are below the crop size %d: left out.",
                 [q for q in scales if q < config.crop_size], config.crop_size)
  return kept


def parse_scales(values: Sequence[str]) -> list[int] | None:
  """A --scales flag's values as test scales Q; None when empty (the default's)."""
  try:
    return [int(q) for q in values] if values else None
  except ValueError as e:
    raise ValueError(f"--scales must be whole numbers of pixels (test scales Q, e.g. "
                     f"256,384,512), got {','.join(values)}.") from e


def check_scales(scales: Sequence[int], crop_size: int) -> tuple[int, ...]:
  scales = tuple(int(q) for q in scales)
  if not scales:
    raise ValueError("No test scale Q given.")
  small = [q for q in scales if q < crop_size]
  if small:
    raise ValueError(f"Test scale(s) Q={small} are smaller than the crop size "
                     f"{crop_size}: the image rescaled to Q must hold a crop (Q >= "
                     f"{crop_size}).")
  return tuple(dict.fromkeys(scales))
