"""Datasets (section 3.1's data): where a config's images come from.

Sources, chosen by `config.dataset`:
  * any TFDS image-classification dataset by name ("cifar10", "imagenet2012", ...);
    `imagenet2012` prepares offline from ILSVRC2012_img_{train,val}.tar in the manual dir;
  * "folder:<dir>": <dir>/train/<class>/*.jpg and <dir>/val/<class>/*.jpg;
  * "boxes:<dir>": images with bounding boxes (localisation, appendix A), listed by
    <dir>/<split>.csv (`vgg_jax.box_files`; ILSVRC's XML files convert to it);
  * "fashion_mnist_local": Fashion-MNIST from Debian's local copy (vgg_jax.fashion_mnist).

Every source is read by index (`SplitData.lookup`): small datasets (decoded size under
`SMALL_DATASET_BYTES`) and `config.cache` from memory, image folders by file, and large
TFDS datasets by record from their ArrayRecord files (`tfds.data_source`). A large TFDS
dataset prepared in the older TFRecord format can only be streamed in order
(`SplitData.stream`; a warning says how to prepare it as ArrayRecord).

The pixel statistics of a dataset (the input normalisation) are `vgg_jax.pixel_stats`.
`vgg_jax.input_pipeline` turns a split's examples into batches. To prepare a dataset
ahead of a run (e.g. ImageNet from its manual download):

  python -m vgg_jax.datasets --dataset=imagenet2012 --data_dir=~/tensorflow_datasets \
      --manual_dir=/path/to/tars
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import math
import os
import socket
from typing import Any, Callable, Sequence
import urllib.parse

from absl import logging
import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds
from tensorflow_datasets.core.download import downloader as tfds_downloader

from vgg_jax import box_files
from vgg_jax import cli
from vgg_jax import fashion_mnist  # registers the fashion_mnist_local builder
from vgg_jax import transforms
from vgg_jax import xla_flags

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


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
  """What the training engine needs to know about the data of a config."""
  num_classes: int
  num_train: int          # examples in config.train_split
  num_eval: int           # examples in config.eval_split
  class_names: tuple | None = None


def dataset_info(config) -> DatasetInfo:
  """Describes the data of a config; prepares the dataset if it can offline.

  Fails early, before any long work: on an unknown dataset, a missing folder
  or ImageNet's missing manual download (the message names the files, where to put them
  and the command that prepares the dataset).
  """
  source = dataset_source(config)
  return DatasetInfo(num_classes=source.num_classes,
                     num_train=source.num_examples(config.train_split),
                     num_eval=source.num_examples(config.eval_split),
                     class_names=source.class_names)



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
  # Per-example arrays read with each example (by index), e.g. a localisation split's
  # "boxes" float32 [N, box_files.MAX_BOXES, 4] and "box_count" int32 [N].
  annotations: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)

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

  @functools.cached_property
  def annotation_table(self) -> dict[str, tf.Tensor]:
    """`annotations` as eager tensors, like `table`."""
    with tf.init_scope():
      return {k: tf.constant(v) for k, v in self.annotations.items()}

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
  fingerprint: Callable[[str], str]  # split -> what identifies its data (for caches)


def dataset_source(config) -> Source:
  """The Source of `config.dataset` (cached per process: it may hold decoded data)."""
  return _cached_source(config.dataset, config.data_dir, config.manual_dir,
                        bool(config.cache))


@functools.lru_cache(maxsize=8)
def _cached_source(dataset: str, data_dir, manual_dir, cache: bool) -> Source:
  if dataset.startswith("folder:"):
    return _folder_source(dataset[len("folder:"):], cache)
  if dataset.startswith("boxes:"):
    return _box_source(dataset[len("boxes:"):], cache)
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

  def fingerprint(split):
    paths, labels = files(split)
    digest = hashlib.sha256()
    for path, label in zip(paths, labels):
      stat = os.stat(path)
      digest.update(f"{os.path.relpath(path, root)}|{label}|{stat.st_size}|"
                    f"{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()

  return Source(f"folder:{root}", len(class_names), class_names,
                lambda split: len(files(split)[0]), functools.lru_cache(None)(split_data),
                cache_dir=root, fingerprint=fingerprint)


def _box_source(root: str, cache: bool) -> Source:
  """<root>/<split>.csv: image files, their classes and boxes (`box_files.read_split`)."""
  root = os.path.expanduser(root)
  class_names = box_files.class_names_of(root)

  @functools.lru_cache(maxsize=None)
  def listed(split):
    return box_files.read_split(root, split, class_names)

  def split_data(split):
    boxes = listed(split)
    paths = np.array(boxes.paths, dtype=object)
    items = (np.array([tf.io.gfile.GFile(p, "rb").read() for p in paths], dtype=object)
             if cache else paths)
    return SplitData("encoded" if cache else "path", len(paths), items, boxes.labels,
                     annotations={"boxes": boxes.boxes, "box_count": boxes.counts})

  def fingerprint(split):
    digest = hashlib.sha256(_file_digest(box_files.split_file(root, split)).encode())
    for path in listed(split).paths:
      stat = os.stat(path)
      digest.update(f"{path}|{stat.st_size}|{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()

  return Source(f"boxes:{root}", len(class_names), class_names,
                lambda split: len(listed(split).paths),
                functools.lru_cache(None)(split_data), cache_dir=root,
                fingerprint=fingerprint)


def _file_digest(path: str) -> str:
  with open(path, "rb") as f:
    return hashlib.sha256(f.read()).hexdigest()


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
      in_order = lambda: looked_up(  # pylint: disable=g-long-lambda
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
          "vgg_jax.datasets --dataset=%s --data_dir=%s", name, builder.data_dir,
          name, os.path.dirname(os.path.dirname(builder.data_dir)))
    return SplitData("stream", n, stream=in_order)

  cache_dir = builder.data_dir if os.path.isdir(builder.data_dir) else None
  return Source(name, label_feature.num_classes, tuple(label_feature.names or ()) or None,
                num_examples, functools.lru_cache(None)(split_data), cache_dir,
                fingerprint=lambda split: f"{info.full_name}:{split}:{num_examples(split)}")


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
    with _failing_fast_offline(builder):
      builder.download_and_prepare(download_config=download_config)
  except Exception as e:  # pylint: disable=broad-except
    builder = tfds.builder(name, data_dir=data_dir)
    if builder.is_prepared():  # another process (of a multi-host run) finished first
      return builder
    if name == "fashion_mnist":
      if fashion_mnist.has_files(fashion_mnist.DEBIAN_DIR):
        logging.warning("Could not download fashion_mnist (%s); using the local copy "
                        "in %s instead (fashion_mnist_local).", e, fashion_mnist.DEBIAN_DIR)
        return _prepared_builder("fashion_mnist_local", data_dir, manual_dir)
    root = os.path.dirname(os.path.dirname(builder.data_dir))
    raise OSError(
        f"Could not prepare the TFDS dataset {name!r} in {builder.data_dir}: {e}. "
        "Without internet, prepare it on a machine that has it with\n"
        f"  python -m vgg_jax.datasets --dataset={name} --data_dir=<dir>\n"
        f"and copy <dir>/{name} into {root}; or use config.dataset='folder:<dir>' "
        "(an image folder) or 'fashion_mnist_local'.") from e
  return builder


@contextlib.contextmanager
def _failing_fast_offline(builder):
  """Turns off TFDS's download retries while none of BUILDER's download hosts resolves.

  TFDS retries every file 10 times with exponential backoff (minutes per file, and no
  option to change it), which offline only delays the error; under
  tfds.testing.mock_data nothing is downloaded and this changes nothing.
  """
  hosts = {urllib.parse.urlsplit(url).hostname for url in builder.url_infos or ()}
  hosts.discard(None)
  if not hosts or any(_resolves(host) for host in hosts):
    yield
    return
  retries = tfds_downloader.MAX_RETRIES
  tfds_downloader.MAX_RETRIES = 0
  try:
    yield
  finally:
    tfds_downloader.MAX_RETRIES = retries


def _resolves(host: str) -> bool:
  try:
    socket.getaddrinfo(host, 443)
    return True
  except (socket.gaierror, UnicodeError):
    return False


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
        f"  python -m vgg_jax.datasets --dataset=imagenet2012 --data_dir={root} "
        f"--manual_dir={manual}")



def looked_up(ds: tf.data.Dataset, data: SplitData) -> tf.data.Dataset:
  """DS's examples with the 'item' and 'label' at their 'index', read LOOKUP_BATCH at a
  time (one call of a by-index reader per batch), in order."""
  def lookup(examples):
    items, labels = data.lookup(examples["index"])
    annotations = {k: tf.gather(v, examples["index"])
                   for k, v in data.annotation_table.items()}
    return dict(examples, item=items, label=labels, **annotations)
  return ds.batch(LOOKUP_BATCH).map(lookup, num_parallel_calls=tf.data.AUTOTUNE).unbatch()



def tf_options() -> tf.data.Options:
  """Deterministic tf.data, on the cores this process may use."""
  options = tf.data.Options()
  options.deterministic = True
  options.threading.private_threadpool_size = min(8, xla_flags.usable_cores())
  options.threading.max_intra_op_parallelism = 1
  return options


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
  from absl import flags  # pylint: disable=g-import-not-at-top
  flags.DEFINE_string("dataset", "imagenet2012", "A TFDS name, fashion_mnist_local, or "
                      "folder:<dir>.")
  flags.DEFINE_string("data_dir", None, "TFDS data dir (default ~/tensorflow_datasets).")
  flags.DEFINE_string("manual_dir", None, "Where ILSVRC2012_img_{train,val}.tar are.")
  flags.DEFINE_list("splits", ["train", "validation"], "Splits whose sizes to print.")
  FLAGS = flags.FLAGS
  cli.run(main)
