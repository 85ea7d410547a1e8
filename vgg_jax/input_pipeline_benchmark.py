"""Throughput of the training transforms on ImageNet-size JPEGs: tf.data vs PIL + numpy.

  python -m vgg_jax.input_pipeline_benchmark [--images_dir=DIR_OR_WHEEL] [--threads=1]

Both sides decode a JPEG, rescale its smallest side to S drawn from [Smin, Smax], take a
random crop, flip, add AlexNet's colour shift and subtract the mean RGB, one image at a
time; the figures are images per second per core (tf.data runs on --threads threads).

The photos: foolbox 3.3.4 (PyPI, MIT licence) ships 20 real ImageNet validation photos
(512x512) under foolbox/data/. Found there when foolbox is installed, or read from its
wheel without importing it:

  pip download --no-deps foolbox==3.3.4 -d /tmp/fb
  python -m vgg_jax.input_pipeline_benchmark --images_dir=/tmp/fb/foolbox-3.3.4-py3-none-any.whl

They are re-encoded at typical ImageNet sizes (500x375, 375x500, 500x333, 400x500;
JPEG quality 90) before the timing.
"""

from __future__ import annotations

import glob
import importlib.util
import io
import os
import time
import zipfile

from absl import app
from absl import flags
import numpy as np
from PIL import Image
import tensorflow as tf

from vgg_jax import input_pipeline as ip

IMAGENET_SIZES = ((500, 375), (375, 500), (500, 333), (400, 500))  # (width, height)

flags.DEFINE_string("images_dir", None, "Folder of JPEGs, or foolbox's wheel; default: "
                    "the ImageNet photos of an installed foolbox.")
flags.DEFINE_integer("num_images", 400, "Images per timing (the photos, repeated).")
flags.DEFINE_integer("scale_min", 256, "Smin.")
flags.DEFINE_integer("scale_max", 512, "Smax.")
flags.DEFINE_integer("crop_size", 224, "Crop size.")
flags.DEFINE_integer("threads", 1, "tf.data threads; figures are divided by it.")
FLAGS = flags.FLAGS


def foolbox_data_dir() -> str | None:
  """foolbox/data of an installed foolbox, found without importing it."""
  spec = importlib.util.find_spec("foolbox")
  if spec is None or not spec.submodule_search_locations:
    return None
  return os.path.join(list(spec.submodule_search_locations)[0], "data")


def read_photos(location: str | None) -> list[bytes]:
  """The encoded ImageNet photos of a folder or of foolbox's wheel (a zip)."""
  location = location or foolbox_data_dir()
  if location is None:
    raise FileNotFoundError(
        "No photos: pass --images_dir (a folder of JPEGs, or foolbox's wheel from "
        "`pip download --no-deps foolbox==3.3.4`) or `pip install --no-deps foolbox==3.3.4`.")
  if zipfile.is_zipfile(location):
    with zipfile.ZipFile(location) as wheel:
      names = sorted(n for n in wheel.namelist()
                     if n.startswith("foolbox/data/imagenet_") and n.endswith(".jpg"))
      return [wheel.read(n) for n in names]
  paths = sorted(glob.glob(os.path.join(location, "imagenet_*.jpg")))
  paths = paths or sorted(p for p in glob.glob(os.path.join(location, "*"))
                          if p.lower().endswith((".jpg", ".jpeg")))
  if not paths:
    raise FileNotFoundError(f"No JPEGs in {location}.")
  return [open(p, "rb").read() for p in paths]


def reencode(photos: list[bytes], count: int) -> list[bytes]:
  """COUNT JPEGs (quality 90) of the photos resized to typical ImageNet sizes."""
  out = []
  for i in range(count):
    image = Image.open(io.BytesIO(photos[i % len(photos)])).convert("RGB")
    image = image.resize(IMAGENET_SIZES[i % len(IMAGENET_SIZES)], Image.BILINEAR)
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=90)
    out.append(buffer.getvalue())
  return out


def tf_images_per_second(jpegs, *, scale_min, scale_max, crop_size, threads) -> float:
  """tf.data: decode_image + ip.train_transform, per example, on THREADS threads."""
  def transform(i, data):
    return ip.train_transform(ip.decode_image(data, 3), ip.augment_seed(0, 0, i),
                              scale_min=scale_min, scale_max=scale_max,
                              crop_size=crop_size, mean=ip.IMAGENET_MEAN_RGB)

  options = tf.data.Options()
  options.threading.private_threadpool_size = threads
  options.threading.max_intra_op_parallelism = 1
  ds = tf.data.Dataset.from_tensor_slices(tf.constant(jpegs)).enumerate()
  ds = ds.map(transform, num_parallel_calls=threads).batch(32).with_options(options)
  for _ in ds.take(2):  # warm up: tracing, thread pool
    pass
  start = time.perf_counter()
  for _ in ds:
    pass
  return len(jpegs) / (time.perf_counter() - start)


def pil_transform(data: bytes, rng: np.random.Generator, *, scale_min, scale_max,
                  crop_size) -> np.ndarray:
  """The same transforms with PIL (decode, bilinear rescale) and numpy (the rest)."""
  image = Image.open(io.BytesIO(data)).convert("RGB")
  size = int(rng.integers(scale_min, scale_max + 1))
  width, height = image.size
  ratio = size / min(width, height)
  image = image.resize((max(size, round(width * ratio)), max(size, round(height * ratio))),
                       Image.BILINEAR)
  pixels = np.asarray(image, np.float32)
  top = rng.integers(0, pixels.shape[0] - crop_size + 1)
  left = rng.integers(0, pixels.shape[1] - crop_size + 1)
  pixels = pixels[top:top + crop_size, left:left + crop_size]
  if rng.random() < 0.5:
    pixels = pixels[:, ::-1]
  alpha = rng.normal(0, 0.1, 3)
  shift = 255 * np.array(ip.PCA_EIGVEC) @ (alpha * np.array(ip.PCA_EIGVAL))
  return pixels + (shift - np.array(ip.IMAGENET_MEAN_RGB)).astype(np.float32)


def pil_images_per_second(jpegs, **kwargs) -> float:
  """`pil_transform` on every JPEG, one after the other (one core)."""
  rng = np.random.default_rng(0)
  pil_transform(jpegs[0], rng, **kwargs)
  start = time.perf_counter()
  for data in jpegs:
    pil_transform(data, rng, **kwargs)
  return len(jpegs) / (time.perf_counter() - start)


def main(argv) -> None:
  del argv
  photos = read_photos(FLAGS.images_dir)
  jpegs = reencode(photos, FLAGS.num_images)
  sizes = dict(scale_min=FLAGS.scale_min, scale_max=FLAGS.scale_max,
               crop_size=FLAGS.crop_size)
  tf_rate = tf_images_per_second(jpegs, threads=FLAGS.threads, **sizes)
  pil_rate = pil_images_per_second(jpegs, **sizes)
  mean_kb = np.mean([len(j) for j in jpegs]) / 1024
  print(f"{len(photos)} ImageNet photos re-encoded as {len(jpegs)} JPEGs of "
        f"{', '.join(f'{w}x{h}' for w, h in IMAGENET_SIZES)} ({mean_kb:.0f} KB on "
        f"average); S in [{FLAGS.scale_min}, {FLAGS.scale_max}], crop {FLAGS.crop_size}.")
  print(f"tf.data (decode + train_transform), {FLAGS.threads} thread(s): "
        f"{tf_rate / FLAGS.threads:7.1f} images/s per core ({tf_rate:.1f} in all)")
  print(f"PIL + numpy (the same transforms), 1 thread:     {pil_rate:7.1f} images/s per core")


if __name__ == "__main__":
  app.run(main)
