"""The localisation demo's data: Fashion-MNIST objects pasted onto crops of real photos.

Each image is a random crop of one of the 20 real ImageNet photos that foolbox ships
(foolbox/data/imagenet_*.jpg, read as files), rescaled to one of four sizes from 64x64
to 96x72 (width x height), with one Fashion-MNIST object pasted at a random position
and a random size (side 24-56 pixels, aspect 3:4 to 4:3). The object's gray levels give
its opacity (twice the gray level, at most 1): its dark background stays transparent,
and it is painted in one colour, bright on a dark spot and dark on a bright one, so it
stands out of the photo. Its ground-truth box is the tight box of the pixels it covers
(gray level above 10%), in pixel edges. Training images use crops of photos 0-15 and
Fashion-MNIST's training images; validation images use photos 16-19 (backgrounds never
seen in training) and Fashion-MNIST's test images. The classes are Fashion-MNIST's 10,
in turn ("T-shirt/top" written "T-shirt-top").

  python -m experiments.localization_data --out_dir=data/localization \\
      --num_train=4000 --num_val=1000

writes <out_dir>/images/{train,val}/<i>.png, train.csv and val.csv (the box CSV form of
`vgg_jax.box_files`) and classes.txt, the same for the same seed.
"""

from __future__ import annotations

import csv
import glob
import os
from typing import Sequence

import numpy as np
from PIL import Image

from vgg_jax import box_files
from vgg_jax import cli
from vgg_jax import fashion_mnist
from vgg_jax import photos

TRAIN_PHOTOS = range(0, 16)
VAL_PHOTOS = range(16, 20)
# Background sizes (width, height): ImageNet's few common shapes, scaled down. (Few
# shapes: the dense protocol compiles the net once per image shape.)
SIZES = ((64, 64), (80, 64), (64, 80), (96, 72))
SIDES = (24, 56)  # the object's side before the aspect change
ASPECTS = (3 / 4, 4 / 3)  # the object's width / height
OPAQUE = 0.1  # gray level (0..1) above which a pixel belongs to the object and its box
GAIN = 2.0  # opacity = min(1, GAIN * gray level): mid-gray fabric is opaque too
SPLITS = {"train": ("train", TRAIN_PHOTOS), "val": ("test", VAL_PHOTOS)}


def class_names() -> list[str]:
  """Fashion-MNIST's class names, fit for file names ("T-shirt/top" -> "T-shirt-top")."""
  return [name.replace("/", "-") for name in fashion_mnist.CLASS_NAMES]


def photo_paths(photos_dir: str | None = None) -> list[str]:
  """The 20 ImageNet photos, sorted: PHOTOS_DIR's JPEGs, else those of foolbox/data."""
  photos_dir = photos_dir or photos.foolbox_data_dir()
  if photos_dir is None:
    raise ValueError("The demo's backgrounds are the ImageNet photos foolbox ships: "
                     "`pip install --no-deps foolbox==3.3.4`, or give --photos_dir.")
  paths = (sorted(glob.glob(os.path.join(photos_dir, "imagenet_*.jpg"))) or
           sorted(glob.glob(os.path.join(photos_dir, "*.jp*g"))))
  if len(paths) < max(VAL_PHOTOS) + 1:
    raise ValueError(f"{photos_dir} holds {len(paths)} photos; the demo needs "
                     f"{max(VAL_PHOTOS) + 1} (foolbox 3.3.4's imagenet_*.jpg).")
  return paths


def background(photo: Image.Image, rng: np.random.Generator) -> np.ndarray:
  """A random crop of PHOTO at a random size: uint8 [h, w, 3]."""
  width, height = SIZES[int(rng.integers(len(SIZES)))]
  side = min(photo.width, photo.height * width / height)  # crop width at full zoom
  crop_w = side * rng.uniform(0.3, 1.0)
  crop_h = crop_w * height / width
  left = rng.uniform(0, photo.width - crop_w)
  top = rng.uniform(0, photo.height - crop_h)
  crop = photo.resize((width, height), Image.BILINEAR,
                      box=(left, top, left + crop_w, top + crop_h))
  return np.array(crop.convert("RGB"))


def paste(image: np.ndarray, item: np.ndarray, rng: np.random.Generator):
  """IMAGE with Fashion-MNIST's ITEM [28, 28] pasted at a random place and size (in
  place), and the object's tight box (xmin, ymin, xmax, ymax) in pixel edges."""
  height, width = image.shape[:2]
  side, aspect = rng.uniform(*SIDES), rng.uniform(*ASPECTS)
  w = int(min(width, round(side * np.sqrt(aspect))))
  h = int(min(height, round(side / np.sqrt(aspect))))
  alpha = np.asarray(Image.fromarray(item).resize((w, h), Image.BILINEAR), np.float32)
  alpha = np.where(alpha / 255.0 > OPAQUE, np.minimum(1.0, GAIN * alpha / 255.0), 0.0)
  left = int(rng.integers(0, width - w + 1))
  top = int(rng.integers(0, height - h + 1))
  region = image[top:top + h, left:left + w].astype(np.float32)
  bright_spot = region.mean() > 128
  colour = rng.uniform(0, 80, 3) if bright_spot else rng.uniform(176, 255, 3)
  region = region * (1 - alpha[..., None]) + colour * alpha[..., None]
  image[top:top + h, left:left + w] = np.clip(np.round(region), 0, 255).astype(np.uint8)
  rows, cols = np.flatnonzero(alpha.any(axis=1)), np.flatnonzero(alpha.any(axis=0))
  return (left + cols[0], top + rows[0], left + cols[-1] + 1, top + rows[-1] + 1)


def write_split(out_dir: str, split: str, count: int, seed: int, photos: list[str],
                fashion_dir: str) -> None:
  """COUNT images of SPLIT ("train" or "val") and <OUT_DIR>/<SPLIT>.csv."""
  source, photo_range = SPLITS[split]
  items, labels = fashion_mnist.load_split(fashion_dir, source)
  by_class = [np.flatnonzero(labels == c) for c in range(len(class_names()))]
  backgrounds = [Image.open(photos[p]).convert("RGB") for p in photo_range]
  rng = np.random.default_rng([seed, list(SPLITS).index(split)])
  os.makedirs(os.path.join(out_dir, "images", split), exist_ok=True)
  rows = []
  for i in range(count):
    label = i % len(by_class)
    item = items[rng.choice(by_class[label]), :, :, 0]
    image = background(backgrounds[rng.integers(len(backgrounds))], rng)
    box = paste(image, item, rng)
    name = f"images/{split}/{i}.png"
    Image.fromarray(image).save(os.path.join(out_dir, name))
    rows.append([name, class_names()[label]] + [int(v) for v in box])
  with open(os.path.join(out_dir, f"{split}.csv"), "w", newline="") as f:
    writer = csv.writer(f)
    writer.writerow(box_files.HEADER)
    writer.writerows(rows)


def write(out_dir: str, num_train: int, num_val: int, seed: int = 0, *,
          fashion_dir: str | None = None, photos_dir: str | None = None) -> None:
  """The demo dataset in OUT_DIR (see the module's docstring); the same for one SEED.
  Fashion-MNIST's IDX files from FASHION_DIR (Debian's folder by default), the photos
  from PHOTOS_DIR (foolbox's by default)."""
  fashion_dir = fashion_dir or fashion_mnist.DEBIAN_DIR
  if not fashion_mnist.has_files(fashion_dir):
    raise ValueError(f"Fashion-MNIST's IDX files are not in {fashion_dir}: "
                     f"{fashion_mnist.INSTALL_COMMAND}, or give their folder.")
  photos = photo_paths(photos_dir)
  os.makedirs(out_dir, exist_ok=True)
  with open(os.path.join(out_dir, "classes.txt"), "w") as f:
    f.write("\n".join(class_names()) + "\n")
  write_split(out_dir, "train", num_train, seed, photos, fashion_dir)
  write_split(out_dir, "val", num_val, seed, photos, fashion_dir)


def main(argv: Sequence[str]) -> None:
  """Writes the demo dataset and says where."""
  del argv
  write(FLAGS.out_dir, FLAGS.num_train, FLAGS.num_val, FLAGS.seed,
        fashion_dir=FLAGS.fashion_dir, photos_dir=FLAGS.photos_dir)
  print(f"{FLAGS.out_dir}: {FLAGS.num_train} training and {FLAGS.num_val} validation "
        "images with their boxes (train.csv, val.csv, classes.txt).")


if __name__ == "__main__":
  from absl import flags  # pylint: disable=g-import-not-at-top
  flags.DEFINE_string("out_dir", None, "Where to write the dataset.")
  flags.DEFINE_integer("num_train", 4000, "Training images.")
  flags.DEFINE_integer("num_val", 1000, "Validation images.")
  flags.DEFINE_integer("seed", 0, "Random seed (the same seed writes the same data).")
  flags.DEFINE_string("fashion_dir", None, "Folder of Fashion-MNIST's IDX files "
                      "(default: Debian's dataset-fashion-mnist).")
  flags.DEFINE_string("photos_dir", None, "Folder of the background JPEGs (default: "
                      "foolbox's ImageNet photos).")
  flags.mark_flag_as_required("out_dir")
  FLAGS = flags.FLAGS
  cli.run(main)
