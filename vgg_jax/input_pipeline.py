"""The data side of training (section 3.1) and evaluation (section 3.2), on tf.data.

Sources, chosen by `config.dataset`:
  * any TFDS image-classification dataset by name ("cifar10", "imagenet2012", ...);
    `imagenet2012` prepares offline from ILSVRC2012_img_{train,val}.tar in the manual dir;
  * "folder:<dir>": <dir>/train/<class>/*.jpg and <dir>/val/<class>/*.jpg;
  * "fashion_mnist_local": Fashion-MNIST from Debian's local copy (vgg_jax.fashion_mnist).

The per-image transforms are `vgg_jax.transforms`. The host decodes only what each crop
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

Reading. Every source is read by index, each process reading only its own examples:
small datasets (decoded size under `SMALL_DATASET_BYTES`) and `config.cache` from memory,
image folders by file, and large TFDS datasets by record from their ArrayRecord files
(`tfds.data_source`), with an exact permutation per epoch. A large TFDS dataset prepared
in the older TFRecord format can only be streamed: through a shuffle buffer of
`config.shuffle_buffer` records, every process reading every record (a warning says how
to prepare it as ArrayRecord).

Robustness: an image that fails to decode is skipped and counted (a warning in the logs);
in a training batch its slot goes to another image of the same batch, in evaluation its
mask is 0. Gray, CMYK and RGBA images become RGB (or gray with `config.channels = 1`).

To prepare a dataset ahead of a run (e.g. ImageNet from its manual download):

  python -m vgg_jax.input_pipeline --dataset=imagenet2012 --data_dir=~/tensorflow_datasets \
      --manual_dir=/path/to/tars
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
from typing import Any, Callable, Iterator, Sequence

from absl import logging
import jax
import jax.numpy as jnp
import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from vgg_jax import transforms

try:  # TF is only the input pipeline here: the accelerators belong to JAX.
  tf.config.set_visible_devices([], "GPU")
except (RuntimeError, ValueError):  # TF already initialised, or no GPU support.
  pass

IMAGENET_FILES = {"train": "ILSVRC2012_img_train.tar",
                  "validation": "ILSVRC2012_img_val.tar",
                  "test": "ILSVRC2012_img_test.tar"}
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif")
SMALL_DATASET_BYTES = 1 << 30   # decoded size up to which a dataset is held in memory
_MEAN_RECORD_BYTES = 110_000    # an ImageNet JPEG, for the size of a dataset of records
LOOKUP_BATCH = 64               # examples read per call of a by-index lookup
_SHUFFLE_SALT = 0x5EED5


# ------------------------------------------------------------------ the public contract


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
  """What the training engine needs to know about the data of a config."""
  num_classes: int
  num_train: int          # examples in config.train_split
  num_eval: int           # examples in config.eval_split
  image_shape: tuple      # (crop_size, crop_size, channels) of training batches
  class_names: tuple | None = None


def dataset_info(config) -> DatasetInfo:
  """Validates the config and describes its data; prepares the dataset if it can offline.

  Fails early, before any long work: on a bad config, an unknown dataset, a missing folder
  or ImageNet's missing manual download (the message names the files, where to put them
  and the command that prepares the dataset).
  """
  validate_config(config)
  source = _source(config)
  return DatasetInfo(num_classes=source.num_classes,
                     num_train=source.num_examples(config.train_split),
                     num_eval=source.num_examples(config.eval_split),
                     image_shape=(config.crop_size, config.crop_size, config.channels),
                     class_names=source.class_names)


def train_batches(config, *, seed: int, start_step: int = 0) -> "Batches":
  """The endless stream of augmented training batches of this process, from batch START_STEP.

  Yields {'image': uint8 [local devices, per-device batch, crop, crop, channels],
  'color_shift': float32 [local devices, per-device batch, channels], 'label': int32
  [local devices, per-device batch]}; `model_inputs` finishes them on the device. See the
  module docstring for how a batch depends on (config, seed, step) only.
  """
  validate_config(config)
  per_process = per_process_batch_size(config.batch_size)
  data = _source(config).split_data(config.train_split)
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

  def augment(example):
    example_seed = transforms.augment_seed(seed, example["epoch"], example["position"])
    return dict(crop(data.read(example["item"]), example_seed), label=example["label"])

  ds = _map_keeping_slots(ds, augment)
  ds = ds.batch(per_process, drop_remainder=True).map(_replace_invalid)
  return Batches(ds.prefetch(2).with_options(_options()),
                 ("image", "color_shift", "label"))


def eval_batches(config, *, split: str | None = None) -> "Batches":
  """One pass over this process's shard of the eval split, uint8 centre crops at Q.

  Yields {'image', 'label', 'mask'} shaped like `train_batches`; 'mask' is 1 for real
  examples and 0 for the zero padding of the last batches and for undecodable images.
  Every process yields the same number of batches.
  """
  validate_config(config)
  per_process = per_process_batch_size(config.batch_size)
  data = _source(config).split_data(split or config.eval_split)
  num_batches = math.ceil(math.ceil(data.num_examples / jax.process_count()) / per_process)

  def transform(example):
    image = transforms.eval_crop(data.read(example["item"]), scale=config.eval_scale,
                                 crop_size=config.crop_size, channels=config.channels)
    return {"image": image, "label": example["label"]}

  ds = _map_keeping_slots(_shard_examples(data), transform,
                          _shard_size(data.num_examples)).map(
      lambda x: {"image": x["image"], "label": x["label"],
                 "mask": tf.cast(x["valid"], tf.float32)})
  padding = tf.data.Dataset.from_tensors(
      tf.nest.map_structure(lambda s: tf.zeros(s.shape, s.dtype), ds.element_spec))
  ds = ds.concatenate(padding.repeat()).take(num_batches * per_process)
  ds = ds.batch(per_process)
  return Batches(ds.prefetch(2).with_options(_options()), ("image", "label", "mask"),
                 count_invalid="mask", num_real=_shard_size(data.num_examples))


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
  'index': int64 position in the split, 'valid': bool}; an undecodable image's slot
  holds a copy of the next image with 'valid' False.
  With CROP_SIZE, centre crops of that size instead. MEAN_STD, (mean, std or None),
  replaces the config's normalisation (a trained net's own). Batch it with
  `bucket_by_shape`.
  """
  validate_config(config)
  data = _source(config).split_data(split or config.eval_split)
  mean, std = mean_std or normalization(config, workdir=workdir)

  def transform(example):
    if crop_size:
      image = transforms.rescaled_crop(data.read(example["item"]), scale=scale,
                                       crop_size=crop_size, channels=config.channels)
    else:
      image = transforms.rescale_smallest_side(
          data.load(example["item"], config.channels), scale)
    return {"image": transforms.normalize(image, mean, std), "label": example["label"],
            "index": example["index"]}

  return _map_keeping_slots(_shard_examples(data), transform,
                            _shard_size(data.num_examples))


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


def dense_eval_batches(config, *, scale: int, batch_size: int, split: str | None = None,
                       workdir: str | None = None) -> Iterator[dict]:
  """Numpy batches of whole rescaled eval images, grouped by shape, undecodable ones dropped.

  Yields {'image': float32 [n, h, w, channels], 'label': int32 [n], 'index': int64 [n]},
  n <= BATCH_SIZE; together they hold every decodable example of this process's shard
  exactly once.
  """
  ds = bucket_by_shape(eval_examples(config, scale=scale, split=split, workdir=workdir),
                       batch_size)
  skipped = 0
  for batch in ds.prefetch(2).with_options(_options()).as_numpy_iterator():
    valid = batch.pop("valid")
    if not valid.all():
      skipped += int((~valid).sum())
      logging.warning("Skipped %d undecodable images in dense evaluation (indices %s).",
                      skipped, batch["index"][~valid].tolist())
      batch = {k: v[valid] for k, v in batch.items()}
    if len(batch["label"]):
      yield batch


# ---------------------------------------------------------------------- configuration


def validate_config(config) -> None:
  """Raises ValueError naming the problem and the fix for an inconsistent data config."""
  problems = []
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
      mean = mean_values(config.mean_rgb)
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


def mean_values(mean_rgb) -> tuple[float, ...]:
  """Numbers of a mean_rgb field: a sequence, or a string like '123.68,116.78,103.94'.

  (A string, so that the field keeps one type and command lines can set it.)
  """
  if isinstance(mean_rgb, str):
    mean_rgb = [v for v in mean_rgb.strip("()[] ").split(",") if v.strip()]
  return tuple(float(v) for v in mean_rgb)


def normalization(config, workdir: str | None = None):
  """(mean, std or None) per channel on the 0..255 scale, from `config.mean_rgb`."""
  if config.mean_rgb == "compute":
    stats = training_mean(config, workdir=workdir)
    mean, std = stats["mean"], stats["std"]
  else:
    mean = (transforms.IMAGENET_MEAN_RGB if config.mean_rgb == "imagenet"
            else mean_values(config.mean_rgb))
    std = transforms.IMAGENET_STD_RGB
    if config.channels == 1 and len(mean) == 3:
      mean = (float(np.dot(transforms.GRAY_WEIGHTS, mean)),)
    if config.channels == 1:
      std = (float(np.dot(transforms.GRAY_WEIGHTS, std)),)
  return tuple(mean), (tuple(std) if config.normalize_std else None)


def training_mean(config, workdir: str | None = None) -> dict:
  """{'mean', 'std'} per channel of the training split's pixels (0..255), computed once.

  Cached as JSON beside the data when that is writable, else in WORKDIR.
  """
  source = _source(config)
  name = f"vgg_jax_mean_{_safe_name(config.train_split)}_{config.channels}ch.json"
  paths = [os.path.join(d, name) for d in (source.cache_dir, workdir) if d]
  for path in paths:
    if os.path.exists(path):
      with open(path) as f:
        stats = json.load(f)
      if stats.get("num_examples") == source.num_examples(config.train_split):
        return stats
  data = source.split_data(config.train_split)
  stats = _pixel_statistics(data, config.channels)
  logging.info("Mean and std of %s %s (%d images): %s", config.dataset,
               config.train_split, data.num_examples, stats)
  for path in paths:
    try:
      # Written aside and renamed: several processes may compute and cache at once,
      # and none may read a half-written file.
      with tfds.core.utils.atomic_write(path, "w") as f:
        json.dump(stats, f)
      logging.info("Cached them in %s.", path)
      break
    except OSError:
      continue
  return stats


# --------------------------------------------------------------------------- sources


@dataclasses.dataclass(frozen=True)
class SplitData:
  """One split's examples: read by index (`lookup`), or `stream()` in order.

  kind: "pixels" (items uint8 [N, h, w, c]), "encoded" (items: image bytes [N]),
  "path" (items: file paths [N]), "record" (TFDS ArrayRecord files, read by index with
  `records`) or "stream" (TFDS TFRecord files, read in order).
  """
  kind: str
  num_examples: int
  items: Any = None
  labels: Any = None
  stream: Callable[[], tf.data.Dataset] | None = None
  records: Callable[[tf.Tensor], tuple[tf.Tensor, tf.Tensor]] | None = None

  def lookup(self, indices: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
    """(items, labels) of the examples at INDICES (int64 [n]), in tf.data."""
    if self.kind == "record":
      return self.records(indices)
    items, labels = self.table
    return tf.gather(items, indices), tf.gather(labels, indices)

  @functools.cached_property
  def table(self) -> tuple[tf.Tensor, tf.Tensor]:
    """(items, labels) as eager tensors, made once and captured by tf.data functions."""
    with tf.init_scope():
      return tf.constant(self.items), tf.constant(self.labels)

  def read(self, item: tf.Tensor) -> tf.Tensor:
    """The item as `transforms.rescaled_crop` takes it: encoded bytes, or pixels."""
    return tf.io.read_file(item) if self.kind == "path" else item

  def load(self, item: tf.Tensor, channels: int) -> tf.Tensor:
    """uint8 image [h, w, CHANNELS]; fails (in tf.data) on an undecodable image, which
    `_map_keeping_slots` then skips."""
    if self.kind == "pixels":
      return transforms.to_channels(item, channels)
    return transforms.decode_image(self.read(item), channels)


@dataclasses.dataclass(frozen=True)
class Source:
  """A dataset: its classes and how to read each split."""
  name: str
  num_classes: int
  class_names: tuple | None
  num_examples: Callable[[str], int]
  split_data: Callable[[str], SplitData]
  cache_dir: str | None


def _source(config) -> Source:
  """The Source of `config.dataset` (cached per process: it may hold decoded data)."""
  return _cached_source(config.dataset, config.data_dir, config.manual_dir,
                        bool(config.cache))


@functools.lru_cache(maxsize=8)
def _cached_source(dataset: str, data_dir, manual_dir, cache: bool) -> Source:
  if dataset.startswith("folder:"):
    return _folder_source(dataset[len("folder:"):], cache)
  return _tfds_source(dataset, data_dir, manual_dir, cache)


def _folder_source(root: str, cache: bool) -> Source:
  """<root>/<split>/<class>/<image>; classes from <root>/train (else the first split)."""
  root = os.path.expanduser(root)
  if not os.path.isdir(root):
    raise FileNotFoundError(
        f"Image folder {root!r} (config.dataset='folder:{root}') does not exist: make "
        f"{root}/train/<class>/*.jpg and {root}/val/<class>/*.jpg, or fix the path.")
  splits = sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d)))
  if not splits:
    raise FileNotFoundError(f"Image folder {root!r} has no split folders (train/, val/).")
  first = "train" if "train" in splits else splits[0]
  class_names = tuple(sorted(d for d in os.listdir(os.path.join(root, first))
                             if os.path.isdir(os.path.join(root, first, d))))

  @functools.lru_cache(maxsize=None)
  def files(split):
    directory = _folder_split_dir(root, split, splits)
    paths, labels = [], []
    for label, name in enumerate(class_names):
      class_dir = os.path.join(directory, name)
      if not os.path.isdir(class_dir):
        continue
      for file in sorted(os.listdir(class_dir)):
        if file.lower().endswith(IMAGE_EXTENSIONS):
          paths.append(os.path.join(class_dir, file))
          labels.append(label)
    unknown = set(os.listdir(directory)) - set(class_names)
    if any(os.path.isdir(os.path.join(directory, d)) for d in unknown):
      raise ValueError(f"{directory} has class folders that {root}/{first} lacks: "
                       f"{sorted(unknown)}.")
    if not paths:
      raise FileNotFoundError(f"No images ({', '.join(IMAGE_EXTENSIONS)}) in "
                              f"{directory}/<class>/.")
    return np.array(paths, dtype=object), np.array(labels, np.int32)

  def split_data(split):
    paths, labels = files(split)
    if cache:
      items = np.array([tf.io.gfile.GFile(p, "rb").read() for p in paths], dtype=object)
      return SplitData("encoded", len(paths), items, labels)
    return SplitData("path", len(paths), paths, labels)

  return Source(f"folder:{root}", len(class_names), class_names,
                lambda split: len(files(split)[0]), functools.lru_cache(None)(split_data),
                cache_dir=root)


def _folder_split_dir(root: str, split: str, splits: Sequence[str]) -> str:
  aliases = {"validation": ("validation", "val"), "val": ("val", "validation")}
  for name in aliases.get(split, (split,)):
    if name in splits:
      return os.path.join(root, name)
  raise FileNotFoundError(f"Image folder {root!r} has no split {split!r} (it has "
                          f"{list(splits)}): make {root}/{split}/<class>/ or change "
                          "config.train_split / config.eval_split.")


def _tfds_source(name: str, data_dir, manual_dir, cache: bool) -> Source:
  """A TFDS dataset, prepared here if needed (offline for imagenet2012 and local builders)."""
  builder = _prepared_builder(name, data_dir, manual_dir)
  info = builder.info
  image_key, label_key = info.supervised_keys or ("image", "label")
  image_feature, label_feature = info.features[image_key], info.features[label_key]

  # (Not under tfds.testing.mock_data, which makes examples without files.)
  random_access = (info.file_format == tfds.core.FileFormat.ARRAY_RECORD
                   and builder.is_prepared())

  @functools.lru_cache(maxsize=None)
  def num_examples(split):
    try:
      return info.splits[split].num_examples
    except (KeyError, ValueError):  # e.g. under tfds.testing.mock_data
      return int(_tfds_records(builder, split, image_key, label_key).reduce(
          np.int64(0), lambda n, _: n + 1))

  def split_data(split):
    n = num_examples(split)
    if random_access:
      indexed = SplitData("record", n, records=_record_reader(builder, split, image_key,
                                                              label_key))
      in_order = lambda: _looked_up(  # pylint: disable=g-long-lambda
          tf.data.Dataset.range(n).map(lambda i: {"index": i}), indexed).map(
              lambda x: (x["item"], x["label"]))
    else:
      in_order = functools.partial(_tfds_records, builder, split, image_key, label_key)
    shape = tuple(image_feature.shape)
    if None not in shape and (cache or n * math.prod(shape) <= SMALL_DATASET_BYTES):
      images, labels = _read_all(in_order().map(
          lambda item, label: (image_feature.decode_example(item), label)))
      return SplitData("pixels", len(labels), images, labels)
    if not isinstance(image_feature, tfds.features.Image):
      raise ValueError(f"{name}: the {image_key!r} feature is not an image of fixed shape "
                       "or an encoded image; set config.cache=True to read it in memory.")
    if cache:
      items, labels = _read_all(in_order())
      return SplitData("encoded", len(labels), items, labels)
    if random_access:
      return indexed
    if n * _MEAN_RECORD_BYTES > SMALL_DATASET_BYTES:
      logging.warning(
          "%s is stored as TFRecord files, which can only be streamed: every process reads "
          "every record, through a shuffle buffer. Prepare it as ArrayRecord to read each "
          "process's examples by index, exactly shuffled: delete %s and run\n  python -m "
          "vgg_jax.input_pipeline --dataset=%s --data_dir=%s", name, builder.data_dir,
          name, os.path.dirname(os.path.dirname(builder.data_dir)))
    return SplitData("stream", n, stream=in_order)

  cache_dir = builder.data_dir if os.path.isdir(builder.data_dir) else None
  return Source(name, label_feature.num_classes, tuple(label_feature.names or ()) or None,
                num_examples, functools.lru_cache(None)(split_data), cache_dir)


def _tfds_records(builder, split, image_key, label_key) -> tf.data.Dataset:
  """(encoded image, label) in the stored order, nothing decoded."""
  ds = builder.as_dataset(split=split, shuffle_files=False,
                          decoders={image_key: tfds.decode.SkipDecoding()})
  return ds.map(lambda x: (x[image_key], tf.cast(x[label_key], tf.int32)))


def _record_reader(builder, split: str, image_key: str, label_key: str):
  """A function: indices (int64 [n]) -> (encoded images, int32 labels), read by index.

  The records come from the split's ArrayRecord files through TFDS's data source (raw
  bytes: its own per-record parsing runs in Python, 10x slower) and are parsed in TF.
  A tf.numpy_function reads a whole batch of indices per call. (grain over the same
  data source was measured 5x slower per core here: its per-record work is Python.)
  """
  source = builder.as_data_source(
      split, deserialize_method=tfds.decode.DeserializeMethod.RAW_BYTES)
  spec = {image_key: tf.io.FixedLenFeature([], tf.string),
          label_key: tf.io.FixedLenFeature([], tf.int64)}

  def read(indices: np.ndarray) -> np.ndarray:
    # A list first: numpy would strip trailing zero bytes of a bytes array's elements.
    return np.array([source[int(i)] for i in indices], dtype=object)

  def records(indices: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
    serialized = tf.numpy_function(read, [indices], tf.string, stateful=False)
    serialized = tf.ensure_shape(serialized, indices.shape)
    parsed = tf.io.parse_example(serialized, spec)
    return parsed[image_key], tf.cast(parsed[label_key], tf.int32)

  return records


def _read_all(ds: tf.data.Dataset):
  """All (image, label) of DS as numpy arrays (images stacked, or bytes as objects)."""
  images, labels = [], []
  for image, label in ds.batch(1024).prefetch(2).as_numpy_iterator():
    images.append(image)
    labels.append(label)
  images = np.concatenate(images) if images else np.zeros((0,), object)
  return images, np.concatenate(labels).astype(np.int32) if labels else np.zeros(0, np.int32)


def _prepared_builder(name: str, data_dir, manual_dir):
  """tfds.builder(NAME), prepared: imagenet2012 offline, fashion_mnist from a local copy."""
  if name == "fashion_mnist_local":
    from vgg_jax import fashion_mnist  # pylint: disable=g-import-not-at-top,unused-import
  try:
    builder = tfds.builder(name, data_dir=data_dir)
  except tfds.core.registered.DatasetNotFoundError as e:
    raise ValueError(
        f"Unknown dataset {name!r}: config.dataset must be a TFDS dataset name (e.g. "
        "'imagenet2012', 'cifar10'), 'folder:<dir>' or 'fashion_mnist_local'.") from e
  if builder.is_prepared():
    return builder
  if name == "imagenet2012":
    _check_imagenet_files(builder, data_dir, manual_dir)
  # ArrayRecord: read by index, so that each process reads only its own examples.
  builder = tfds.builder(name, data_dir=data_dir, file_format="array_record")
  download_config = tfds.download.DownloadConfig(manual_dir=manual_dir)
  logging.info("Preparing %s in %s.", name, builder.data_dir)
  try:
    builder.download_and_prepare(download_config=download_config)
  except Exception as e:  # pylint: disable=broad-except
    builder = tfds.builder(name, data_dir=data_dir)
    if builder.is_prepared():  # another process (of a multi-host run) finished first
      return builder
    if name == "fashion_mnist":
      from vgg_jax import fashion_mnist  # pylint: disable=g-import-not-at-top
      if fashion_mnist.has_files(fashion_mnist.DEBIAN_DIR):
        logging.warning("Could not download fashion_mnist (%s); using the local copy "
                        "in %s instead (fashion_mnist_local).", e, fashion_mnist.DEBIAN_DIR)
        return _prepared_builder("fashion_mnist_local", data_dir, manual_dir)
    raise RuntimeError(
        f"Could not prepare the TFDS dataset {name!r} in {builder.data_dir} ({e}). "
        "Without internet, prepare it elsewhere and copy it there, or use "
        "config.dataset='folder:<dir>' or 'fashion_mnist_local'.") from e
  return builder


def _check_imagenet_files(builder, data_dir, manual_dir) -> None:
  """Raises FileNotFoundError naming the tars, where they go and the prepare command."""
  root = os.path.expanduser(data_dir or tfds.core.constants.DATA_DIR)
  manual = os.path.expanduser(manual_dir or os.path.join(root, "downloads", "manual"))
  needed = [IMAGENET_FILES["train"], IMAGENET_FILES["validation"]]
  missing = [f for f in needed if not os.path.exists(os.path.join(manual, f))]
  if missing:
    raise FileNotFoundError(
        f"ImageNet (imagenet2012) is not prepared in {builder.data_dir}, and its manual "
        f"download is missing: {', '.join(os.path.join(manual, f) for f in missing)}. "
        f"Download {' and '.join(needed)} from https://image-net.org/download-images "
        f"(registration needed), put them in {manual} (or set --config.manual_dir), "
        "then prepare the dataset once (hours; about 150 GB) with:\n"
        f"  python -m vgg_jax.input_pipeline --dataset=imagenet2012 --data_dir={root} "
        f"--manual_dir={manual}")


# ------------------------------------------------------------------ example streams


def _epoch_examples(epoch, *, data: SplitData, seed: int, batch_size: int,
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
  return _looked_up(ds, data).map(lambda x: dict(x, epoch=epoch))


def _shard_size(num_examples: int) -> int:
  """How many of NUM_EXAMPLES (dealt round robin) fall to this process."""
  return len(range(jax.process_index(), num_examples, jax.process_count()))


def _shard_examples(data: SplitData) -> tf.data.Dataset:
  """This process's examples of a split, in order: {'index', 'item', 'label'}."""
  process, processes = jax.process_index(), jax.process_count()
  if data.kind == "stream":
    ds = data.stream().enumerate().shard(processes, process)
    return ds.map(lambda i, x: {"index": i, "item": x[0], "label": x[1]})
  return _looked_up(tf.data.Dataset.range(process, data.num_examples, processes).map(
      lambda i: {"index": i}), data)


def _looked_up(ds: tf.data.Dataset, data: SplitData) -> tf.data.Dataset:
  """DS's examples with the 'item' and 'label' at their 'index', read LOOKUP_BATCH at a
  time (one call of a by-index reader per batch), in order."""
  def lookup(examples):
    items, labels = data.lookup(examples["index"])
    return dict(examples, item=items, label=labels)
  return ds.batch(LOOKUP_BATCH).map(lookup, num_parallel_calls=tf.data.AUTOTUNE).unbatch()


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
  return dict(batch, image=tf.gather(batch["image"], source),
              label=tf.gather(batch["label"], source))


def _pixel_statistics(data: SplitData, channels: int) -> dict:
  """Mean and std per channel over all pixels of a split (undecodable images left out)."""
  total, squares, count = np.zeros(channels), np.zeros(channels), 0
  if data.kind == "pixels" and data.items.shape[-1] in (1, channels):
    for start in range(0, data.num_examples, 4096):
      pixels = data.items[start:start + 4096].reshape(-1, data.items.shape[-1])
      pixels = pixels.astype(np.float64)
      total += pixels.sum(0)                 # gray replicated to RGB: the same per channel
      squares += (pixels ** 2).sum(0)
      count += len(pixels)
  else:
    def sums(example):
      image = data.load(example["item"], channels)
      pixels = tf.reshape(tf.cast(image, tf.float64), [-1, channels])
      return (tf.reduce_sum(pixels, 0), tf.reduce_sum(pixels ** 2, 0),
              tf.cast(tf.shape(pixels)[0], tf.float64))
    ds = _all_examples(data).map(sums, num_parallel_calls=tf.data.AUTOTUNE)
    ds = ds.ignore_errors(log_warning=True)
    for s, q, n in ds.with_options(_options()).as_numpy_iterator():
      total, squares, count = total + s, squares + q, count + n
  mean = total / max(count, 1)
  std = np.sqrt(np.maximum(squares / max(count, 1) - mean ** 2, 0))
  return {"mean": mean.tolist(), "std": std.tolist(), "num_examples": data.num_examples}


def _all_examples(data: SplitData) -> tf.data.Dataset:
  """Every example of a split, in order (all processes compute the same statistics)."""
  if data.kind == "stream":
    return data.stream().map(lambda item, label: {"item": item, "label": label})
  return _looked_up(tf.data.Dataset.range(data.num_examples).map(lambda i: {"index": i}),
                    data)


def usable_cores() -> int:
  """The cores this process may run on (fewer than the machine's when pinned)."""
  if hasattr(os, "sched_getaffinity"):
    return len(os.sched_getaffinity(0))
  return os.cpu_count() or 1


def _safe_name(split: str) -> str:
  return "".join(c if c.isalnum() else "_" for c in split)


def _options() -> tf.data.Options:
  options = tf.data.Options()
  options.deterministic = True
  options.threading.private_threadpool_size = min(8, usable_cores())
  options.threading.max_intra_op_parallelism = 1
  return options


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


# --------------------------------------------------------------------------- command


def main(argv: Sequence[str]) -> None:
  """Prepares a dataset (e.g. imagenet2012 from its manual download) and prints its sizes."""
  del argv
  source = _cached_source(FLAGS.dataset, FLAGS.data_dir, FLAGS.manual_dir, False)
  print(f"{source.name}: {source.num_classes} classes")
  for split in FLAGS.splits:
    try:
      print(f"  {split}: {source.num_examples(split)} examples")
    except (KeyError, ValueError, FileNotFoundError) as e:
      print(f"  {split}: {e}")


if __name__ == "__main__":
  from absl import app  # pylint: disable=g-import-not-at-top
  from absl import flags  # pylint: disable=g-import-not-at-top
  flags.DEFINE_string("dataset", "imagenet2012", "A TFDS name, fashion_mnist_local, or "
                      "folder:<dir>.")
  flags.DEFINE_string("data_dir", None, "TFDS data dir (default ~/tensorflow_datasets).")
  flags.DEFINE_string("manual_dir", None, "Where ILSVRC2012_img_{train,val}.tar are.")
  flags.DEFINE_list("splits", ["train", "validation"], "Splits whose sizes to print.")
  FLAGS = flags.FLAGS
  app.run(main)
