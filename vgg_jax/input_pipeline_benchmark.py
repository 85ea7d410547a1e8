"""Throughput of the real training input pipeline on ImageNet-size JPEGs, against PIL.

  taskset -c 1 python -m vgg_jax.input_pipeline_benchmark     # per core: pin it

Times `input_pipeline.train_batches` itself (decode only the crop's window, rescale to S
drawn from [Smin, Smax], random crop, flip, colour-shift draw, uint8 batches) reading
  * an image folder (`folder:<dir>`, one JPEG file per image), and
  * imagenet2012 prepared here as TFDS ArrayRecord files from a manual download made of
    the same JPEGs (read by index, as on a real ImageNet run),
beside a PIL + numpy loop doing the same transforms one image at a time (decode the whole
JPEG, rescale it, crop, flip, uint8 array, colour draw). The figures are images per
second per core: divided by the cores this process may use (pin it with taskset).

The photos: foolbox 3.3.4 (PyPI, MIT licence) ships 20 real ImageNet validation photos
under foolbox/data/. Found there when foolbox is installed, or read from its wheel
without importing it:

  pip download --no-deps foolbox==3.3.4 -d /tmp/fb
  python -m vgg_jax.input_pipeline_benchmark --images_dir=/tmp/fb/foolbox-3.3.4-py3-none-any.whl

They are re-encoded at typical ImageNet sizes (500x375, 375x500, 500x333, 400x500;
JPEG quality 90) before the timing.
"""

from __future__ import annotations

import glob
import io
import os
import tarfile
import tempfile
import time
import zipfile

from absl import flags
import numpy as np
from PIL import Image

from configs import default
from vgg_jax import cli
from vgg_jax import datasets
from vgg_jax import input_pipeline
from vgg_jax import photos
from vgg_jax import transforms
from vgg_jax import xla_flags

IMAGENET_SIZES = ((500, 375), (375, 500), (500, 333), (400, 500))  # (width, height)
# Five ImageNet classes (wnids of TFDS's imagenet2012 labels) for the manual download.
WNIDS = ("n01440764", "n01443537", "n01484850", "n01491361", "n01494475")

flags.DEFINE_string("images_dir", None, "Folder of JPEGs, or foolbox's wheel; default: "
                    "the ImageNet photos of an installed foolbox.")
flags.DEFINE_integer("num_images", 640, "Images per timing (the photos, re-encoded).")
flags.DEFINE_integer("scale_min", 256, "Smin.")
flags.DEFINE_integer("scale_max", 512, "Smax.")
flags.DEFINE_integer("crop_size", 224, "Crop size.")
flags.DEFINE_integer("images_per_batch", 32, "Batch size of train_batches.")
flags.DEFINE_list("sources", ["folder", "array_record"], "What train_batches reads.")
flags.DEFINE_integer("repeats", 3, "Timings of each side, alternating; the median counts.")
flags.DEFINE_string("write_folder", None, "Only write the JPEGs as an image folder "
                    "(DIR/{train,val}/<wnid>/) for a training run, and exit.")
FLAGS = flags.FLAGS


# ------------------------------------------------------------------------ the photos


def read_photos(location: str | None) -> list[bytes]:
  """The encoded ImageNet photos of a folder or of foolbox's wheel (a zip)."""
  location = location or photos.foolbox_data_dir()
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


def write_image_folder(root: str, jpegs: list[bytes]) -> list[str]:
  """ROOT/{train,val}/<wnid>/<i>.JPEG, the JPEGs dealt over the classes; train's paths."""
  paths = []
  for split in ("train", "val"):
    for i, data in enumerate(jpegs if split == "train" else jpegs[:len(WNIDS)]):
      path = os.path.join(root, split, WNIDS[i % len(WNIDS)], f"{i:06d}.JPEG")
      os.makedirs(os.path.dirname(path), exist_ok=True)
      with open(path, "wb") as f:
        f.write(data)
      paths.append(path)
  return paths[:len(jpegs)]


def write_imagenet_manual_dir(directory: str, jpegs: list[bytes]) -> None:
  """ILSVRC2012_img_{train,val}.tar as ImageNet ships them, holding the JPEGs."""
  def add(tar, name, data):
    member = tarfile.TarInfo(name)
    member.size = len(data)
    tar.addfile(member, io.BytesIO(data))

  with tarfile.open(os.path.join(directory, datasets.IMAGENET_FILES["train"]), "w") as train:
    for c, wnid in enumerate(WNIDS):
      inner = io.BytesIO()
      with tarfile.open(fileobj=inner, mode="w") as tar:
        for i in range(c, len(jpegs), len(WNIDS)):
          add(tar, f"{wnid}_{i}.JPEG", jpegs[i])
      add(train, f"{wnid}.tar", inner.getvalue())
  with tarfile.open(os.path.join(directory, datasets.IMAGENET_FILES["validation"]), "w") as val:
    for i in range(len(WNIDS)):
      add(val, f"ILSVRC2012_val_{i + 1:08d}.JPEG", jpegs[i])


# ------------------------------------------------------------------------ the timings


def pipeline_config(dataset: str, **overrides):
  """The default config reading DATASET, with the benchmark's sizes."""
  config = default.get_config()
  config.update(dict(dataset=dataset, mean_rgb="imagenet"), **overrides)
  return config


def train_batches_per_second(config, num_images: int, warmup_batches: int = 8) -> float:
  """Images/s of `input_pipeline.train_batches` over NUM_IMAGES, in the steady state:
  after WARMUP_BATCHES, while tf.data's autotuning settles."""
  batches = input_pipeline.train_batches(config, seed=0)
  for _ in range(warmup_batches):
    next(batches)
  start = time.perf_counter()
  steps = max(1, num_images // config.batch_size)
  for _ in range(steps):
    next(batches)
  return steps * config.batch_size / (time.perf_counter() - start)


def pil_transform(path: str, rng: np.random.Generator, *, scale_min, scale_max,
                  crop_size) -> tuple[np.ndarray, np.ndarray]:
  """The same transforms with PIL (decode, bilinear rescale) and numpy: uint8, colour."""
  image = Image.open(path).convert("RGB")
  size = int(rng.integers(scale_min, scale_max + 1))
  width, height = image.size
  ratio = size / min(width, height)
  image = image.resize((max(size, round(width * ratio)), max(size, round(height * ratio))),
                       Image.BILINEAR)
  pixels = np.asarray(image)
  top = rng.integers(0, pixels.shape[0] - crop_size + 1)
  left = rng.integers(0, pixels.shape[1] - crop_size + 1)
  pixels = pixels[top:top + crop_size, left:left + crop_size]
  if rng.random() < 0.5:
    pixels = pixels[:, ::-1]
  alpha = rng.normal(0, 0.1, 3)
  shift = 255 * np.array(transforms.PCA_EIGVEC) @ (alpha * np.array(transforms.PCA_EIGVAL))
  return np.ascontiguousarray(pixels), shift.astype(np.float32)


def pil_images_per_second(paths: list[str], **sizes) -> float:
  """`pil_transform` on every file, one after the other (one core)."""
  rng = np.random.default_rng(0)
  pil_transform(paths[0], rng, **sizes)
  start = time.perf_counter()
  for path in paths:
    pil_transform(path, rng, **sizes)
  return len(paths) / (time.perf_counter() - start)


def decode_images_per_second(paths: list[str]) -> float:
  """Reading and decoding each whole JPEG with tf.io.decode_jpeg (nothing else), eagerly:
  the ceiling of any pipeline that decodes whole images, on this machine."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  decode = tf.function(lambda path: tf.shape(tf.io.decode_jpeg(tf.io.read_file(path), 3)),
                       input_signature=[tf.TensorSpec([], tf.string)])
  decode(paths[0])
  start = time.perf_counter()
  for path in paths:
    decode(path)
  return len(paths) / (time.perf_counter() - start)


def run(jpegs: list[bytes], workspace: str, *, sources, batch_size: int, repeats: int = 1,
        **sizes) -> dict[str, list[float]]:
  """{name: [images/s] * REPEATS} of train_batches on each of SOURCES, of PIL and of
  decoding alone, timed in turns in one process."""
  paths = write_image_folder(os.path.join(workspace, "images"), jpegs)
  overrides = dict(train_scale_min=sizes["scale_min"], train_scale_max=sizes["scale_max"],
                   crop_size=sizes["crop_size"], batch_size=batch_size,
                   eval_scale=sizes["scale_min"])
  configs = {}
  for source in sources:
    if source == "folder":
      config = pipeline_config(f"folder:{workspace}/images", **overrides)
    elif source == "array_record":
      manual = os.path.join(workspace, "manual")
      os.makedirs(manual, exist_ok=True)
      write_imagenet_manual_dir(manual, jpegs)
      config = pipeline_config("imagenet2012", data_dir=os.path.join(workspace, "tfds"),
                               manual_dir=manual, **overrides)
      datasets.dataset_info(config)  # prepares it (not timed)
    else:
      raise ValueError(f"Unknown source {source!r}: use folder or array_record.")
    configs[f"train_batches ({source})"] = config
  rates = {name: [] for name in list(configs) + ["PIL + numpy", "decode_jpeg alone"]}
  for _ in range(repeats):
    for name, config in configs.items():
      rates[name].append(train_batches_per_second(config, len(jpegs)))
    rates["PIL + numpy"].append(pil_images_per_second(paths, **sizes))
    rates["decode_jpeg alone"].append(decode_images_per_second(paths))
  return rates


def main(argv) -> None:
  del argv
  jpegs = reencode(read_photos(FLAGS.images_dir), FLAGS.num_images)
  if FLAGS.write_folder:
    write_image_folder(FLAGS.write_folder, jpegs)
    print(f"Wrote {len(jpegs)} JPEGs to {FLAGS.write_folder}/train and "
          f"{len(WNIDS)} to {FLAGS.write_folder}/val.")
    return
  sizes = dict(scale_min=FLAGS.scale_min, scale_max=FLAGS.scale_max,
               crop_size=FLAGS.crop_size)
  with tempfile.TemporaryDirectory() as workspace:
    rates = run(jpegs, workspace, sources=FLAGS.sources, batch_size=FLAGS.images_per_batch,
                repeats=FLAGS.repeats, **sizes)
  cores = xla_flags.usable_cores()
  mean_kb = np.mean([len(j) for j in jpegs]) / 1024
  print(f"{len(jpegs)} JPEGs of {', '.join(f'{w}x{h}' for w, h in IMAGENET_SIZES)} "
        f"({mean_kb:.0f} KB on average); S in [{FLAGS.scale_min}, {FLAGS.scale_max}], "
        f"crop {FLAGS.crop_size}; {cores} core(s) usable (pin with taskset); median of "
        f"{FLAGS.repeats} timings in turns.")
  # PIL and decode_jpeg run on one thread: their figures are per core however pinned.
  per_core = {name: np.median(r) / (1 if name in ("PIL + numpy", "decode_jpeg alone")
                                    else cores) for name, r in rates.items()}
  for name, rate in per_core.items():
    print(f"  {name:32s} {rate:7.1f} images/s per core   {rate / per_core['PIL + numpy']:4.2f}x "
          f"PIL  (timings: {', '.join(f'{r:.0f}' for r in rates[name])})")
  print(f"Host -> device bytes per training image: {FLAGS.crop_size ** 2 * 3:,} (uint8 "
        f"crop) + 16 (label, colour shift); float32 would be "
        f"{FLAGS.crop_size ** 2 * 3 * 4:,}.")


if __name__ == "__main__":
  cli.run(main)
