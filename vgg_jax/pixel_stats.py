"""The pixel statistics of a dataset: the mean (and std) per channel that the net's input
is normalised with (section 3.1: "subtracting the mean RGB value, computed on the
training set").

`normalization(config)` is ImageNet's constants, numbers given in the config, or the
training split's own pixels (`training_mean`: computed once, over every image that
decodes, and cached as JSON beside the data when that folder is writable, else in the
run's workdir, with a fingerprint of the files it was computed from).
"""

from __future__ import annotations

import json
import os

from absl import logging
import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from vgg_jax import datasets
from vgg_jax import transforms


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

  Cached as JSON beside the data when that is writable, else in WORKDIR, with the
  split's fingerprint (its files' names, sizes and times, or the TFDS version): a cache
  of other files than today's is computed again, never used.
  """
  source = datasets.dataset_source(config)
  name = f"vgg_jax_mean_{_safe_name(config.train_split)}_{config.channels}ch.json"
  paths = [os.path.join(d, name) for d in (source.cache_dir, workdir) if d]
  fingerprint = source.fingerprint(config.train_split)
  for path in paths:
    if os.path.exists(path):
      with open(path) as f:
        stats = json.load(f)
      if stats.get("fingerprint") == fingerprint:
        return stats
  data = source.split_data(config.train_split)
  stats = dict(_pixel_statistics(data, config.channels), fingerprint=fingerprint)
  if stats["pixels"] == 0:
    raise ValueError(f"No image of {config.dataset} {config.train_split} decodes: its "
                     f"mean and std cannot be computed. Replace the files, or check "
                     f"config.dataset.")
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



def _pixel_statistics(data: datasets.SplitData, channels: int) -> dict:
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
    for s, q, n in ds.with_options(datasets.tf_options()).as_numpy_iterator():
      total, squares, count = total + s, squares + q, count + n
  mean = total / max(count, 1)
  std = np.sqrt(np.maximum(squares / max(count, 1) - mean ** 2, 0))
  return {"mean": mean.tolist(), "std": std.tolist(), "num_examples": data.num_examples,
          "pixels": int(count)}


def _all_examples(data: datasets.SplitData) -> tf.data.Dataset:
  """Every example of a split, in order (all processes compute the same statistics)."""
  if data.kind == "stream":
    return data.stream().map(lambda item, label: {"item": item, "label": label})
  return datasets.looked_up(tf.data.Dataset.range(data.num_examples).map(lambda i: {"index": i}),
                   data)


def _safe_name(split: str) -> str:
  return "".join(c if c.isalnum() else "_" for c in split)
