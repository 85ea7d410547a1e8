"""Fashion-MNIST from a local copy, as a TFDS dataset: `fashion_mnist_local`.

TFDS's own `fashion_mnist` downloads its files; this builder reads the same four gzipped
IDX files from disk instead, so the dataset prepares offline and then flows through the
same TFDS pipeline as any other dataset. Debian's package `dataset-fashion-mnist`
installs them (MIT licence):

  apt-get install -y dataset-fashion-mnist    # -> /usr/share/datasets/fashion-mnist/

Another folder holding the files can be given as the manual dir:

  import tensorflow_datasets as tfds
  import vgg_jax.fashion_mnist  # registers the builder
  builder = tfds.builder("fashion_mnist_local", data_dir="/tmp/tfds")
  builder.download_and_prepare(download_config=tfds.download.DownloadConfig(
      manual_dir="/path/to/idx/files"))   # optional; the Debian folder otherwise
  ds = builder.as_dataset(split="train")   # 60,000 28x28x1 images; "test": 10,000
"""

from __future__ import annotations

import gzip
import os

import numpy as np
import tensorflow_datasets as tfds

DEBIAN_DIR = "/usr/share/datasets/fashion-mnist"
FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
CLASS_NAMES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt",
               "Sneaker", "Bag", "Ankle boot")
INSTALL_COMMAND = "apt-get update && apt-get install -y dataset-fashion-mnist"


def has_files(directory: str | os.PathLike | None) -> bool:
  """Whether DIRECTORY holds the four gzipped IDX files."""
  return directory is not None and all(
      os.path.exists(os.path.join(directory, name))
      for pair in FILES.values() for name in pair)


def read_idx(path: str | os.PathLike) -> np.ndarray:
  """Reads one gzipped IDX file (uint8 data) into an array of its stored shape."""
  with gzip.open(path, "rb") as f:
    data = f.read()
  if data[:2] != b"\0\0" or data[2] != 0x08:
    raise ValueError(f"{path} is not an IDX file of unsigned bytes.")
  ndim = data[3]
  shape = tuple(int.from_bytes(data[4 + 4 * i:8 + 4 * i], "big") for i in range(ndim))
  return np.frombuffer(data, np.uint8, offset=4 + 4 * ndim).reshape(shape)


def load_split(directory: str | os.PathLike, split: str) -> tuple[np.ndarray, np.ndarray]:
  """(images uint8 [N, 28, 28, 1], labels int64 [N]) of "train" or "test"."""
  images_file, labels_file = FILES[split]
  images = read_idx(os.path.join(directory, images_file))[..., None]
  labels = read_idx(os.path.join(directory, labels_file)).astype(np.int64)
  if len(images) != len(labels):
    raise ValueError(f"{directory}: {len(images)} images but {len(labels)} labels "
                     f"in the {split} split.")
  return images, labels


class FashionMnistLocal(tfds.core.GeneratorBasedBuilder):
  """Fashion-MNIST (Xiao et al., 2017) read from local IDX files."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Fashion-MNIST from local gzipped IDX files."}
  MANUAL_DOWNLOAD_INSTRUCTIONS = (
      f"Install the Debian package ({INSTALL_COMMAND}), which puts the files under "
      f"{DEBIAN_DIR}, or put {', '.join(n for p in FILES.values() for n in p)} in the "
      "manual dir.")

  def _info(self) -> tfds.core.DatasetInfo:
    return self.dataset_info_from_configs(
        features=tfds.features.FeaturesDict({
            "image": tfds.features.Image(shape=(28, 28, 1)),
            "label": tfds.features.ClassLabel(names=CLASS_NAMES),
        }),
        supervised_keys=("image", "label"),
        disable_shuffling=True,   # records keep the IDX files' order: index i is image i
        homepage="https://github.com/zalandoresearch/fashion-mnist",
    )

  def _source_dir(self, dl_manager) -> str:
    """The manual dir when it holds the files, else Debian's folder."""
    try:
      manual = dl_manager.manual_dir
    except (AssertionError, ValueError):
      manual = None
    for directory in (manual, DEBIAN_DIR):
      if has_files(directory):
        return os.fspath(directory)
    raise FileNotFoundError(
        f"Fashion-MNIST's IDX files are neither in the manual dir ({manual}) nor in "
        f"{DEBIAN_DIR}. {self.MANUAL_DOWNLOAD_INSTRUCTIONS}")

  def _split_generators(self, dl_manager):
    directory = self._source_dir(dl_manager)
    return {split: self._generate_examples(directory, split) for split in FILES}

  def _generate_examples(self, directory, split):
    images, labels = load_split(directory, split)
    for i, (image, label) in enumerate(zip(images, labels)):
      yield i, {"image": image, "label": int(label)}
