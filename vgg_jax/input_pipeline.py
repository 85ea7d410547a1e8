"""Batches for training (section 3.1) and evaluation (section 3.2), on tf.data.

The examples come from `vgg_jax.datasets` (sources, reading by index, statistics) and
the per-image transforms from `vgg_jax.transforms`. The host decodes only what each crop
keeps and ships uint8 crops (224 * 224 * 3 bytes an image at full size) with each
image's colour-shift draw; `model_inputs`, called inside the jitted step on the device,
turns them into the float images the net takes (colour shift, mean subtraction).

Determinism. Training example number p of the stream (global batch k = p // batch_size)
is a pure function of (config, seed, p): epoch e holds steps_per_epoch = N // batch_size
whole batches, drawn in an order reshuffled with a seed derived from (seed, e), and every
random draw of its augmentation comes from stateless ops seeded with (seed, e, position).
Each process takes its contiguous slice of every global batch, and its local devices
consecutive parts of that slice, so a global batch does not depend on the device count.
`train_batches(start_step=k)` skips to batch k without decoding anything it skips.

Reading. Each process reads only its own examples, by index, with an exact permutation
per epoch. A dataset that can only be streamed (TFDS in TFRecord files) goes through a
shuffle buffer of `config.shuffle_buffer` records, every process reading every record.

Robustness: an image that fails to decode is skipped and counted (a warning in the logs);
in a training batch its slot goes to another image of the same batch, in evaluation its
mask is 0. Gray, CMYK and RGBA images become RGB (or gray with `config.channels = 1`).
"""

from __future__ import annotations

import functools
import math
from typing import Callable, Sequence

from absl import logging
import jax
import jax.numpy as jnp
import numpy as np
import tensorflow as tf

from vgg_jax import datasets
from vgg_jax import pixel_stats
from vgg_jax import transforms

_SHUFFLE_SALT = 0x5EED5
BOX_KEYS = ("box", "box_weight")  # a localisation batch's training target
PROBE_SIZE = 64  # images decoded before a run starts: a split that doesn't decode fails
TINY_IMAGE_FACTOR = 8  # an image enlarged more than this to reach S gets a warning


# ------------------------------------------------------------------ the public contract


def train_batches(config, *, seed: int, start_step: int = 0) -> "Batches":
  """The endless stream of augmented training batches of this process, from batch START_STEP.

  Yields {'image': uint8 [local devices, per-device batch, crop, crop, channels],
  'color_shift': float32 [local devices, per-device batch, channels], 'label': int32
  [local devices, per-device batch]}; `model_inputs` finishes them on the device. See the
  module docstring for how a batch depends on (config, seed, step) only.
  """
  check_data_fields(config)
  per_process = per_process_batch_size(config.batch_size)
  data = datasets.dataset_source(config).split_data(config.train_split)
  steps_per_epoch = max(1, data.num_examples // config.batch_size)
  first_epoch, skip_batches = divmod(int(start_step), steps_per_epoch)

  # The first epoch starts at batch skip_batches: nothing before it is read or decoded.
  ds = tf.data.Dataset.range(first_epoch, 2**62).flat_map(lambda epoch: _epoch_examples(
      epoch, data=data, seed=seed, batch_size=config.batch_size,
      steps_per_epoch=steps_per_epoch, shuffle_buffer=config.shuffle_buffer,
      skip=tf.where(epoch == first_epoch, np.int64(skip_batches * per_process),
                    np.int64(0))))
  crop = functools.partial(
      transforms.train_crop, scale_min=config.train_scale_min,
      scale_max=config.train_scale_max, crop_size=config.crop_size,
      channels=config.channels, flip=config.random_flip, color_std=config.color_shift_std)

  boxes = bool(config.box_regression)

  def augment(example):
    example_seed = transforms.augment_seed(seed, example["epoch"], example["position"])
    box_args = ({"boxes": example["boxes"], "box_count": example["box_count"]}
                if boxes else {})
    return dict(crop(data.read(example["item"]), example_seed, **box_args),
                label=example["label"])

  ds = _map_keeping_slots(ds, augment)
  ds = ds.batch(per_process, drop_remainder=True).map(_replace_invalid)
  return Batches(ds.prefetch(2).with_options(datasets.tf_options()),
                 ("image", "color_shift", "label") + (BOX_KEYS if boxes else ()))


def eval_batches(config, *, split: str | None = None) -> "Batches":
  """One pass over this process's shard of the eval split, uint8 centre crops at Q.

  Yields {'image', 'label', 'mask'} shaped like `train_batches`; 'mask' is 1 for real
  examples and 0 for the zero padding of the last batches and for undecodable images.
  Every process yields the same number of batches.
  """
  check_data_fields(config)
  per_process = per_process_batch_size(config.batch_size)
  data = datasets.dataset_source(config).split_data(split or config.eval_split)
  num_batches = math.ceil(math.ceil(data.num_examples / jax.process_count()) / per_process)

  def transform(example):
    image, geometry = transforms.rescaled_crop_and_geometry(
        data.read(example["item"]), scale=config.eval_scale, crop_size=config.crop_size,
        channels=config.channels)
    out = {"image": transforms.to_uint8(image), "label": example["label"]}
    if config.box_regression:  # the centre crop's target, and the boxes to score
      out.update(eval_box_fields(example, geometry, config.crop_size))
    return out

  ds = _eval_stream(data, transform).map(
      lambda x: dict({k: v for k, v in x.items() if k not in ("valid", "index")},
                     mask=tf.cast(x["valid"], tf.float32)))
  padding = tf.data.Dataset.from_tensors(
      tf.nest.map_structure(lambda s: tf.zeros(s.shape, s.dtype), ds.element_spec))
  ds = ds.concatenate(padding.repeat()).take(num_batches * per_process)
  ds = ds.batch(per_process)
  return Batches(ds.prefetch(2).with_options(datasets.tf_options()),
                 tuple(ds.element_spec), count_invalid="mask",
                 num_real=_shard_size(data.num_examples))


def eval_box_fields(example: dict, geometry: dict, crop_size: int) -> dict:
  """What evaluating a localisation net on a crop needs (appendix A): the image's boxes
  ('boxes' [K, 4] in source pixels, 'box_count'), the crop's 'factor' and 'offset'
  (to map a predicted box back to the source) and its target ('box', 'box_weight')."""
  in_crop = transforms.boxes_in_crop(example["boxes"], geometry, crop_size, False)
  box, weight = transforms.box_target(in_crop, example["box_count"], crop_size)
  return {"boxes": example["boxes"], "box_count": example["box_count"],
          "factor": geometry["factor"], "offset": geometry["offset"], "box": box,
          "box_weight": weight}


def model_inputs(batch: dict, *, mean, std=None) -> dict:
  """On the device, inside the jitted step: a batch of uint8 crops made model input.

  Adds each image's colour shift (training batches carry it) and subtracts the MEAN
  (dividing by STD unless None): float32 images, in the order the host pipeline did them
  when it shipped floats, so results equal it up to the uint8 rounding of the crop.
  """
  image = batch["image"].astype(jnp.float32)
  if "color_shift" in batch:
    image = image + batch["color_shift"][..., None, None, :]
  image = image - jnp.asarray(mean, jnp.float32)
  if std is not None:
    image = image / jnp.asarray(std, jnp.float32)
  inputs = {k: v for k, v in batch.items() if k != "color_shift"}
  inputs["image"] = image
  return inputs


# --------------------------------------------------------- dense evaluation (section 3.2)


def eval_examples(config, *, scale: int, split: str | None = None,
                  crop_size: int | None = None, workdir: str | None = None,
                  mean_std: tuple | None = None) -> tf.data.Dataset:
  """This process's eval examples rescaled to smallest side SCALE, uncropped, normalised.

  A tf.data.Dataset of {'image': float32 [h, w, channels] (shapes vary), 'label': int32,
  'index': int64 position in the split, 'factor': float32 [2], the rescaled size over
  the source's (y, x), 'valid': bool}; an undecodable image's slot holds a copy of the
  next image with 'valid' False.
  With CROP_SIZE, centre crops of that size instead (and their 'offset' [2], top and
  left in the rescaled image). MEAN_STD, (mean, std or None), replaces the config's
  normalisation (a trained net's own). Batch it with `bucket_by_shape`.
  """
  check_data_fields(config)
  data = datasets.dataset_source(config).split_data(split or config.eval_split)
  mean, std = mean_std or pixel_stats.normalization(config, workdir=workdir)

  def transform(example):
    if crop_size:
      image, geometry = transforms.rescaled_crop_and_geometry(
          data.read(example["item"]), scale=scale, crop_size=crop_size,
          channels=config.channels)
    else:
      source = data.load(example["item"], config.channels)
      image = transforms.rescale_smallest_side(source, scale)
      geometry = {"factor": tf.cast(tf.shape(image)[:2], tf.float32)
                            / tf.cast(tf.shape(source)[:2], tf.float32)}
    return dict(geometry, image=transforms.normalize(image, mean, std),
                label=example["label"], index=example["index"])

  return _eval_stream(data, transform)


def bucket_by_shape(ds: tf.data.Dataset,
                    batch_size: int | Callable[[tf.Tensor, tf.Tensor], tf.Tensor]
                    ) -> tf.data.Dataset:
  """Batches of up to BATCH_SIZE examples of one image shape each (the last ones partial).

  BATCH_SIZE may be a function of the images' (height, width) (int64 tensors), so that
  large images come in smaller batches. Every example of DS lands in exactly one batch;
  'index' tells which one it is.
  """
  def key(example):
    shape = tf.shape(example["image"], out_type=tf.int64)
    return shape[0] * (1 << 20) + shape[1]

  def window_size(k):
    size = batch_size(k // (1 << 20), k % (1 << 20)) if callable(batch_size) else batch_size
    return tf.cast(size, tf.int64)

  return ds.group_by_window(key, lambda k, window: window.batch(window_size(k)),
                            window_size_func=window_size)


# ---------------------------------------------------------------------- configuration


def check_images(config, split: str, sample: int = PROBE_SIZE) -> None:
  """Decodes the first SAMPLE images of SPLIT before a run starts.

  Raises ValueError, naming some of them, when more than half fail (training would
  otherwise run on copies of the few that decode, or wait forever for one when none
  does); warns when images are so small that the rescale to S enlarges them more than
  `TINY_IMAGE_FACTOR` times (legal, but most likely not the data meant).
  """
  data = datasets.dataset_source(config).split_data(split)
  if data.kind == "stream":  # decoded by TFDS as it prepared the dataset
    return
  n = min(sample, data.num_examples)
  if data.kind == "pixels":
    sides, failed = np.full(n, min(data.items.shape[1:3])), np.array([], int)
  else:
    def decode(example):
      shape = tf.shape(data.load(example["item"], config.channels))
      return {"side": tf.minimum(shape[0], shape[1])}

    ds = datasets.looked_up(tf.data.Dataset.range(n).map(lambda i: {"index": i}), data)
    decoded = list(_map_keeping_slots(ds, decode, n).as_numpy_iterator())
    valid = np.array([x["valid"] for x in decoded], bool)
    sides = np.array([x["side"] for x in decoded])[valid]
    failed = np.flatnonzero(~valid)
  if 2 * len(failed) > n:
    names = ", ".join(str(data.items[i]) if data.kind == "path" else f"example {i}"
                      for i in failed[:3])
    raise ValueError(
        f"{len(failed)} of the first {n} images of {config.dataset} (split {split!r}) "
        f"do not decode, e.g. {names}. Replace them with JPEG, PNG, BMP or "
        f"GIF files, or check config.dataset.")
  tiny = sides * TINY_IMAGE_FACTOR < config.train_scale_min
  if tiny.any():
    logging.warning(
        "%d of the first %d images of %s (split %r) have a side of %d pixels or less, "
        "to be enlarged to S=%d: check config.dataset and the scales.", tiny.sum(),
        len(sides), config.dataset, split, sides.min(), config.train_scale_min)


def check_data_fields(config) -> None:
  """Raises ValueError naming the problem and the fix for an inconsistent data config."""
  problems = []
  if config.box_regression and not config.dataset.startswith("boxes:"):
    problems.append(f"box_regression={config.box_regression!r} needs images with boxes: "
                    "config.dataset='boxes:<dir>' (see vgg_jax.box_files)")
  if config.channels not in (1, 3):
    problems.append(f"channels={config.channels}: use 3 (RGB) or 1 (gray)")
  if config.train_scale_min > config.train_scale_max:
    problems.append(f"train_scale_min={config.train_scale_min} > train_scale_max="
                    f"{config.train_scale_max}: S is drawn from [min, max]")
  if config.train_scale_min < config.crop_size:
    problems.append(f"train_scale_min={config.train_scale_min} < crop_size="
                    f"{config.crop_size}: S must be at least the crop size")
  if config.eval_scale < config.crop_size:
    problems.append(f"eval_scale={config.eval_scale} < crop_size={config.crop_size}: "
                    "Q must be at least the crop size")
  if config.mean_rgb not in ("imagenet", "compute"):
    try:
      mean = pixel_stats.mean_values(config.mean_rgb)
      if len(mean) not in (config.channels, 3):  # gray input: one mean, or RGB's three
        problems.append(f"mean_rgb={config.mean_rgb!r} needs 3 values (or 1 with "
                        f"channels=1)")
    except ValueError:
      problems.append(f"mean_rgb={config.mean_rgb!r}: use 'imagenet', 'compute' or "
                      "numbers, e.g. '123.68,116.78,103.94'")
  if problems:
    raise ValueError("Bad data config: " + "; ".join(problems) + ".")


def per_process_batch_size(batch_size: int) -> int:
  """This process's share of the global BATCH_SIZE; it must split evenly over devices."""
  processes, devices = jax.process_count(), jax.local_device_count()
  if batch_size % (processes * devices):
    raise ValueError(
        f"batch_size={batch_size} does not split over {processes} process(es) x "
        f"{devices} local device(s): use a multiple of {processes * devices}.")
  return batch_size // processes


# --------------------------------------------------------------------------- sources


# ------------------------------------------------------------------ example streams


def _epoch_examples(epoch, *, data: datasets.SplitData, seed: int, batch_size: int,
                    steps_per_epoch: int, shuffle_buffer: int, skip=0) -> tf.data.Dataset:
  """This process's examples of one training epoch: {'epoch', 'position', 'item', 'label'}.

  Position i of the epoch's steps_per_epoch * batch_size examples belongs to global batch
  i // batch_size; this process keeps its contiguous slice of each batch, less its first
  SKIP examples (a resumed epoch), and reads only those.
  """
  per_process = batch_size // jax.process_count()
  length = steps_per_epoch * batch_size
  repeats = math.ceil(length / data.num_examples)

  def mine(position):
    return (position % batch_size) // per_process == jax.process_index()

  if data.kind == "stream":
    shuffle_seed = (tf.constant(seed, tf.int64) * 1_000_003 + _SHUFFLE_SALT) + epoch
    ds = data.stream().repeat(repeats).shuffle(shuffle_buffer, seed=shuffle_seed)
    ds = ds.take(length).enumerate().filter(lambda i, _: mine(i)).skip(skip)
    return ds.map(lambda i, x: {"epoch": epoch, "position": i, "item": x[0], "label": x[1]})

  permutation = tf.random.experimental.stateless_shuffle(
      tf.range(data.num_examples, dtype=tf.int64),
      seed=tf.random.experimental.stateless_fold_in(
          tf.constant([seed, _SHUFFLE_SALT], tf.int64), epoch))
  positions = tf.range(length, dtype=tf.int64)
  positions = tf.boolean_mask(positions, mine(positions))[skip:]
  indices = tf.gather(permutation, positions % data.num_examples)
  ds = tf.data.Dataset.from_tensor_slices({"position": positions, "index": indices})
  return datasets.looked_up(ds, data).map(lambda x: dict(x, epoch=epoch))


def _shard_size(num_examples: int) -> int:
  """How many of NUM_EXAMPLES (dealt round robin) fall to this process."""
  return len(range(jax.process_index(), num_examples, jax.process_count()))


def _eval_stream(data: datasets.SplitData, transform) -> tf.data.Dataset:
  """This process's examples of an evaluation split, in order, through TRANSFORM (an
  example -> a dict), every example in its slot ('valid' False where it failed)."""
  return _map_keeping_slots(_shard_examples(data), transform,
                            _shard_size(data.num_examples))


def _shard_examples(data: datasets.SplitData) -> tf.data.Dataset:
  """This process's examples of a split, in order: {'index', 'item', 'label'}."""
  process, processes = jax.process_index(), jax.process_count()
  if data.kind == "stream":
    ds = data.stream().enumerate().shard(processes, process)
    return ds.map(lambda i, x: {"index": i, "item": x[0], "label": x[1]})
  return datasets.looked_up(tf.data.Dataset.range(process, data.num_examples, processes).map(
      lambda i: {"index": i}), data)


def _map_keeping_slots(ds: tf.data.Dataset, fn, length: int | None = None
                       ) -> tf.data.Dataset:
  """DS.map(FN) with FN's failures (undecodable images) skipped but their slots kept.

  tf.data has no per-element try/except: `ignore_errors` drops failed elements, and an
  index carried through FN tells which. Each dropped element's slot is taken by a copy
  of the next good one, marked 'valid' False, so every later element keeps its position:
  batch k stays a function of k (resumable), and the skips are counted. A finite DS of
  LENGTH elements also keeps the slots of failures at its very end. (Decoding inside a
  nested per-element dataset would also work, but costs milliseconds per image.)
  """
  ds = ds.enumerate().map(lambda i, x: (i, fn(x)), num_parallel_calls=tf.data.AUTOTUNE)
  ds = ds.ignore_errors(log_warning=True)
  if length is not None:  # an end marker that fills the slots of trailing failures
    _, spec = ds.element_spec
    marker = {k: tf.zeros([d or 1 for d in v.shape], v.dtype) for k, v in spec.items()}
    ds = ds.concatenate(tf.data.Dataset.from_tensors((tf.constant(length, tf.int64),
                                                      marker)))

  def fill(expected, element):
    index, example = element
    copies = index - expected + 1
    slots = {k: tf.repeat(v[None], copies, axis=0) for k, v in example.items()}
    slots["valid"] = tf.range(copies) == copies - 1
    return index + 1, slots

  ds = ds.scan(tf.constant(0, tf.int64), fill).unbatch()
  return ds if length is None else ds.take(length)


def _replace_invalid(batch):
  """Gives the slot of each undecodable example to a decodable one of the same batch."""
  valid = batch["valid"]
  rows = tf.range(tf.shape(valid)[0])
  good = tf.cast(tf.where(valid)[:, 0], tf.int32)
  num_good = tf.shape(good)[0]
  source = tf.where(valid | (num_good == 0), rows,
                    tf.gather(good, rows % tf.maximum(num_good, 1)))
  return dict(batch, **{k: tf.gather(batch[k], source)  # (not the colour shift, as
                        for k in ("image", "label") + BOX_KEYS if k in batch})  # before)


# ------------------------------------------------------------------------ batches


class Batches:
  """Numpy batches of a tf.data pipeline, split over the local devices.

  Iterating yields dicts of KEYS, each reshaped to [local devices, per-device batch, ...].
  `num_skipped` counts the undecodable images met so far (also logged).
  """

  def __init__(self, ds: tf.data.Dataset, keys: Sequence[str],
               count_invalid: str = "valid", num_real: int | None = None):
    self._iterator = ds.as_numpy_iterator()
    self._keys = tuple(keys)
    self._count_invalid = count_invalid
    self._num_real = num_real    # eval: examples before the padding
    self._seen = 0
    self.num_skipped = 0

  def __iter__(self):
    return self

  def __next__(self) -> dict:
    batch = next(self._iterator)
    self._count(batch[self._count_invalid])
    devices = jax.local_device_count()
    return {k: batch[k].reshape((devices, -1) + batch[k].shape[1:]) for k in self._keys}

  def _count(self, valid: np.ndarray) -> None:
    real = len(valid)
    if self._num_real is not None:
      real = max(0, min(real, self._num_real - self._seen))
    self._seen += len(valid)
    skipped = int((valid[:real] == 0).sum())
    if skipped:
      self.num_skipped += skipped
      logging.warning("Skipped %d undecodable image(s) in this batch, %d so far.",
                      skipped, self.num_skipped)


