"""Testing (section 3.2) and the evaluation tables of section 4 (Tables 3-6).

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
`multi_crop_posteriors`) run on one device on a batch of images of one shape. An
`Evaluator` maps them over the devices with the training's `parallel.DeviceMapping`
and runs one pass over a split (`Evaluator.posteriors`): whole images are batched by
shape (dense), crops are cut on the device with `jax.lax.dynamic_slice` from the image
padded to a canvas of a few sizes (multi-crop), so that XLA compiles once per image
shape (dense), per canvas (multi-crop) or once (centre crop). On ImageNet, dense
evaluation meets hundreds of image shapes (one per aspect ratio): set
JAX_COMPILATION_CACHE_DIR to keep the compiled programs between runs.

`evaluate_run` is the table: each protocol of `PROTOCOLS` at every single Q and at the
whole set of Q, for each checkpoint and for their ensemble, written as
WORKDIR/eval_table.md and WORKDIR/eval_table.json. From the command line:

  python -m vgg_jax.evaluate --workdir=runs/demo
  python -m vgg_jax.evaluate --config=configs/vgg16_jittered.py --workdir=runs/fusion \
      --checkpoints=runs/vgg16_jittered,runs/vgg19_jittered --protocol=dense,multi_crop \
      --scales=256,384,512

Each checkpoint is evaluated as the net it was trained as (its WORKDIR/config.json, or
a converted checkpoint's meta) and fed the input it was trained on (its mean and std;
a converted torchvision net's convention through `convert.pipeline_fields`). The
config supplies the data (dataset, split, batch size).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import time
from typing import Any, Callable, Sequence

from absl import app
from absl import flags
from absl import logging
import jax
import jax.numpy as jnp
import ml_collections
from ml_collections import config_flags
import numpy as np
import tensorflow as tf

from vgg_jax import checkpointing
from vgg_jax import convert
from vgg_jax import input_pipeline
from vgg_jax import models
from vgg_jax import parallel
from vgg_jax import train

GRID = 5                 # multi-crop: a 5x5 grid of crops per scale, and their flips
TABLE_NAME = "eval_table"
# Fields of a run's frozen config that describe its net and the input it was trained on.
NET_FIELDS = train.ARCHITECTURE_FIELDS + ("dtype", "mean_rgb", "normalize_std",
                                          "train_scale_min", "train_scale_max")
# A converted checkpoint's meta may describe its net with these fields.
META_FIELDS = ("model", "num_classes", "width", "fc_width", "filter_size", "channels",
               "crop_size")

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


def _crop_boxes_tf(height, width, crop_size: int, grid: int) -> tf.Tensor:
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


def dense_and_multi_crop(dense: Posteriors, multi_crop: Posteriors) -> Posteriors:
  """Dense and multi-crop evaluation are complementary (section 4.3): averaged."""
  return average([dense, multi_crop])


def ensemble(per_net: Sequence[Posteriors]) -> Posteriors:
  """ConvNet fusion (section 4.4): the posteriors of several nets averaged."""
  return average(per_net)


def errors(posteriors: Posteriors) -> dict:
  """Top-1 and top-5 error over the seen images (of all processes), and their number.

  Ties count against, as in training's evaluation."""
  probs, labels = posteriors.probs[posteriors.seen], posteriors.labels[posteriors.seen]
  counts = np.array([int(np.sum(train.correct_top_k(probs, labels, k))) for k in (1, 5)]
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


# --------------------------------------------------------------------- nets


@dataclasses.dataclass
class Net:
  """A checkpoint and what it takes to evaluate it: its net and its input config."""
  name: str
  path: str
  config: ml_collections.ConfigDict   # the data config, with this net's fields
  model: models.VGG
  params: Any
  meta: dict
  mean_std: tuple | None = None       # the input normalisation it was trained with


def _merged(config, updates: dict) -> ml_collections.ConfigDict:
  """CONFIG with UPDATES (values of a frozen JSON config may differ in type)."""
  values = config.to_dict() if hasattr(config, "to_dict") else dict(config)
  values.update(updates)
  return ml_collections.ConfigDict(values)


def _param_differences(expected: Any, params: Any) -> list[str]:
  def flat(tree):
    return {jax.tree_util.keystr(path): tuple(np.shape(leaf)) for path, leaf
            in jax.tree_util.tree_flatten_with_path(tree)[0]}
  want, have = flat(expected), flat(params)
  problems = [f"missing {k} {want[k]}" for k in sorted(set(want) - set(have))]
  problems += [f"unexpected {k} {have[k]}" for k in sorted(set(have) - set(want))]
  problems += [f"{k}: {have[k]} in the checkpoint, {want[k]} in the net"
               for k in sorted(set(want) & set(have)) if want[k] != have[k]]
  return problems


def load_net(config, path: str, *, own_net: bool = True, best: bool = False,
             step: int | None = None) -> Net:
  """Reads a checkpoint (a workdir or a converted one) and the net to evaluate it with.

  With OWN_NET the net is the checkpoint's own (its config.json, else its meta, else
  CONFIG's); otherwise CONFIG names the net and a checkpoint of another architecture is
  an error. The checkpoint's parameters must fit the net (ValueError listing what does
  not). A converted net's input convention becomes the pipeline's mean and std.
  """
  frozen = checkpointing.read_config(path)
  params, meta = checkpointing.load_params(path, best=best, step=step)
  described = frozen if frozen is not None else {
      k: meta[k] for k in META_FIELDS if k in meta}
  if not own_net:
    differ = [f"{k}: {a!r} in the checkpoint, {b!r} in the config" for k, a, b in
              train.architecture_differences(described, config.to_dict())]
    if differ:
      raise ValueError(f"The checkpoint {path!r} holds a net of another architecture "
                       f"({'; '.join(differ)}). Evaluate it with its own config "
                       f"({os.path.join(path, checkpointing.CONFIG_FILE)}) or list it in "
                       f"--checkpoints.")
  fields = NET_FIELDS if frozen is not None else META_FIELDS
  net_config = _merged(config, {k: described[k] for k in fields if k in described})
  if frozen is not None and frozen.get("dataset") != config.dataset:
    logging.warning("%s was trained on %s; evaluating it on %s.", path,
                    frozen.get("dataset"), config.dataset)
  convention = convert.input_convention(meta)
  if not convert.is_native(convention):
    if net_config.channels != 3:
      raise ValueError(f"{path}: a converted net takes RGB images; set channels=3.")
    net_config = _merged(net_config, convert.pipeline_fields(convention))
  num_classes = net_config.num_classes or meta.get("num_classes")
  if num_classes is None:
    raise ValueError(f"{path}: the number of classes is unknown (no config.json and no "
                     f"num_classes in its meta).")
  net_config = _merged(net_config, {"num_classes": int(num_classes)})
  model = train.create_model(net_config, int(num_classes))
  images = jax.ShapeDtypeStruct((1, net_config.crop_size, net_config.crop_size,
                                 net_config.channels), jnp.float32)
  expected = jax.eval_shape(functools.partial(model.init, train=False),
                            jax.random.key(0), images)["params"]
  problems = _param_differences(expected, params)
  if problems:
    raise ValueError(f"The checkpoint {path!r} does not fit net {model.config} "
                     f"(width={net_config.width}, fc_width={net_config.fc_width}, "
                     f"classes={num_classes}, crop_size={net_config.crop_size}): it is "
                     f"of another architecture. " + "; ".join(problems[:10])
                     + (f"; and {len(problems) - 10} more" if len(problems) > 10 else ""))
  name = f"{model.config} ({os.path.basename(os.path.normpath(path))})"
  return Net(name, path, net_config, model, params, meta,
             mean_std=trained_normalization(meta))


def trained_normalization(meta: dict) -> tuple | None:
  """(mean, std or None) that a run trained with, from its checkpoint's meta; None for
  converted nets and older runs (their config's mean_rgb and normalize_std serve)."""
  stored = meta.get("normalization")
  if not stored:
    return None
  return tuple(stored["mean"]), stored["std"] and tuple(stored["std"])


# ---------------------------------------------------------------- the evaluator


def _next_power_of_two(n: int) -> int:
  return 1 << max(0, (n - 1).bit_length())


class Evaluator:
  """One net on the devices: evaluation passes over a split, every image once."""

  def __init__(self, net: Net, mapping: parallel.DeviceMapping | None = None):
    if mapping is None:
      # Several processes evaluate their own images independently: shapes differ.
      kind = "shard_map" if jax.process_count() > 1 else net.config.get("mapping", "pmap")
      mapping = parallel.DeviceMapping(kind, devices=jax.local_devices())
    self.net = net
    self.mapping = mapping
    self.params = mapping.replicate(net.params)
    self._mapped = {}

  def _fn(self, pass_name: str):
    if pass_name not in self._mapped:
      p, model, crop = PASSES[pass_name], self.net.model, self.net.config.crop_size
      self._mapped[pass_name] = self.mapping.map(
          lambda params, batch: p.fn(model, params, batch, crop))
    return self._mapped[pass_name]

  def _images_per_device(self, p: Pass, crops_per_device: int, height, width):
    """Images of HEIGHT x WIDTH per device and step: CROPS_PER_DEVICE crops' worth of
    work (dense: a whole image counts by its area). Python ints or TF tensors."""
    if not p.by_area:
      return max(1, crops_per_device // p.crops_per_image)
    crop_area = self.net.config.crop_size ** 2
    images = crops_per_device * crop_area // (p.crops_per_image * height * width)
    return tf.maximum(images, 1) if isinstance(images, tf.Tensor) else max(images, 1)

  def _examples(self, pass_name: str, scale: int, split: str, workdir: str | None):
    config, p = self.net.config, PASSES[pass_name]
    crop = config.crop_size if p.center_crop else None
    ds = input_pipeline.eval_examples(config, scale=scale, split=split, crop_size=crop,
                                      workdir=workdir, mean_std=self.net.mean_std)
    if pass_name == "multi_crop":
      crop_size = config.crop_size

      def canvas(example):  # padded to a multiple of the crop: few shapes to compile
        image = example["image"]
        height, width = tf.shape(image)[0], tf.shape(image)[1]
        boxes = _crop_boxes_tf(height, width, crop_size, GRID)
        image = tf.image.pad_to_bounding_box(
            image, 0, 0, -(-height // crop_size) * crop_size,
            -(-width // crop_size) * crop_size)
        return dict(example, image=image, boxes=boxes)
      ds = ds.map(canvas, num_parallel_calls=tf.data.AUTOTUNE)
    return ds

  def posteriors(self, pass_name: str, scale: int, *, split: str | None = None,
                 batch_size: int | None = None, workdir: str | None = None
                 ) -> Posteriors:
    """Posteriors of one pass ("center_crop", "dense", "multi_crop") at Q = SCALE over
    this process's images of SPLIT (default config.eval_split), BATCH_SIZE (global,
    default config.batch_size) net evaluations per step over all devices."""
    config = self.net.config
    split = split or config.eval_split
    p = PASSES[pass_name]
    check_scales([scale], config.crop_size)
    crops_per_device = parallel.check_batch_size(batch_size or config.batch_size)
    devices = self.mapping.local_device_count
    num_examples = input_pipeline.dataset_info(_merged(config, {"eval_split": split})
                                               ).num_eval
    probs = np.zeros((num_examples, self.net.model.num_classes), np.float32)
    labels = np.full(num_examples, -1, np.int32)
    seen = np.zeros(num_examples, bool)
    fn = self._fn(pass_name)
    keys = ("image", "boxes") if pass_name == "multi_crop" else ("image",)
    start = time.perf_counter()
    ds = self._examples(pass_name, scale, split, workdir or self.net.path)
    per_device = functools.partial(self._images_per_device, p, crops_per_device)
    ds = input_pipeline.bucket_by_shape(
        ds, lambda height, width: devices * per_device(height, width))
    options = tf.data.Options()
    options.deterministic = True
    skipped = 0
    for batch in ds.prefetch(2).with_options(options).as_numpy_iterator():
      valid = batch["valid"]
      skipped += int((~valid).sum())
      index, n = batch["index"][valid], int(valid.sum())
      if n == 0:
        continue
      if seen[index].any() or len(set(index.tolist())) < n:
        raise RuntimeError(f"Images {sorted(set(index[seen[index]].tolist()))} of "
                           f"{split} came twice in one pass.")
      # Pad to a power of two per device: few batch shapes to compile per image shape.
      least = -(-n // devices)
      rows = max(least, min(_next_power_of_two(least), self._images_per_device(
          p, crops_per_device, *batch["image"].shape[1:3])))
      inputs = {}
      for k in keys:
        x = batch[k][valid]
        x = np.concatenate([x, np.zeros((devices * rows - n,) + x.shape[1:], x.dtype)])
        inputs[k] = x.reshape((devices, rows) + x.shape[1:])
      out = np.asarray(fn(self.params, self.mapping.shard(inputs)))
      probs[index] = out.reshape(devices * rows, -1)[:n]
      labels[index] = batch["label"][valid]
      seen[index] = True
    if skipped:
      logging.warning("%s at Q=%d: %d undecodable image(s) left out.", pass_name, scale,
                      skipped)
    return Posteriors(probs, labels, seen, time.perf_counter() - start)


# -------------------------------------------------------------------- the table


def _table_markdown(rows: list[dict], title: str) -> str:
  lines = [f"### {title}", "",
           "| net | protocol | test scales Q | top-1 error (%) | top-5 error (%) | "
           "images | seconds |",
           "|---|---|---|---|---|---|---|"]
  for r in rows:
    lines.append(f"| {r['net']} | {r['protocol']} | {','.join(map(str, r['scales']))} | "
                 f"{100 * r['top1_error']:.2f} | {100 * r['top5_error']:.2f} | "
                 f"{r['images']} | {r['seconds']:.1f} |")
  lines += ["", "Seconds: the evaluation passes a row averages (a pass shared by several "
            "rows is run once and counts in each)."]
  return "\n".join(lines) + "\n"


def evaluate_run(config, workdir: str, *, protocols: str | Sequence[str] | None = None,
                 scales: Sequence[int] | None = None,
                 checkpoints: Sequence[str] | None = None, split: str | None = None,
                 batch_size: int | None = None, best: bool = False) -> list[dict]:
  """The evaluation table of one or more trained runs; written to WORKDIR.

  Rows: for each checkpoint (and, with several, their ensemble), each protocol at each
  single Q and, with several Q, at all of them (multi-scale). Every image of the split
  is evaluated exactly once per pass; a pass shared by rows runs once.

  Args:
    config: the data config (dataset, eval_split, batch_size); without CHECKPOINTS it
      must also name WORKDIR's net.
    workdir: where eval_table.md and eval_table.json go; the run evaluated when
      CHECKPOINTS is None.
    protocols: names of PROTOCOLS, a list or a comma-separated string; default all.
    scales: test scales Q; default the paper's preset for the first net's S.
    checkpoints: workdirs (or converted checkpoints) to evaluate and fuse; each is
      evaluated as its own net.
    split: default config.eval_split. batch_size: global; default config.batch_size.
    best: evaluate each run's best checkpoint instead of its newest.
  Returns:
    The rows: dicts of net, protocol, scales, top1_error, top5_error (fractions),
    images, seconds.
  """
  # Everything that can be checked is checked before any image is read.
  protocols = parse_protocols(protocols)
  if scales is not None:
    scales = check_scales(scales, config.crop_size)
  split = split or config.eval_split
  parallel.check_batch_size(batch_size or config.batch_size,
                            what="the evaluation batch size")
  paths = list(checkpoints) if checkpoints else [workdir]
  nets = [load_net(config, path, own_net=bool(checkpoints), best=best) for path in paths]
  classes = {net.model.num_classes for net in nets}
  info = input_pipeline.dataset_info(_merged(config, {"eval_split": split}))
  if classes != {info.num_classes}:
    raise ValueError(f"The nets have {sorted(classes)} classes; {config.dataset} has "
                     f"{info.num_classes}.")
  if scales is None:
    scales = paper_scales(nets[0].config)
  for net in nets:
    check_scales(scales, net.config.crop_size)
  scale_sets = [(q,) for q in scales] + ([tuple(scales)] if len(scales) > 1 else [])
  logging.info("Evaluating %s on %s (%s, %d images): protocols %s at Q %s.",
               [n.name for n in nets], config.dataset, split, info.num_eval,
               list(protocols), list(scales))

  cache: dict[tuple, Posteriors] = {}
  evaluators: dict[int, Evaluator] = {}

  def computed(i: int, pass_name: str, q: int) -> Posteriors:
    if (i, pass_name, q) not in cache:
      if i not in evaluators:
        evaluators[i] = Evaluator(nets[i])
      cache[i, pass_name, q] = evaluators[i].posteriors(
          pass_name, q, split=split, batch_size=batch_size or config.batch_size)
      logging.info("%s %s Q=%d: %.1f s.", nets[i].name, pass_name, q,
                   cache[i, pass_name, q].seconds)
    return cache[i, pass_name, q]

  def protocol_posteriors(i: int, name: str, qs: tuple[int, ...]) -> Posteriors:
    per_pass = [multi_scale([computed(i, p, q) for q in qs]) for p in PROTOCOLS[name]]
    return per_pass[0] if len(per_pass) == 1 else average(per_pass)

  rows = []
  members = [[i] for i in range(len(nets))] + ([list(range(len(nets)))]
                                               if len(nets) > 1 else [])
  for member in members:
    net_name = " + ".join(nets[i].name for i in member)
    for name in protocols:
      for qs in scale_sets:
        result = ensemble([protocol_posteriors(i, name, qs) for i in member])
        rows.append(dict(net=net_name, protocol=name, scales=list(qs),
                         **errors(result), seconds=round(result.seconds, 3)))
  if jax.process_index() == 0:
    write_table(workdir, rows, dict(dataset=config.dataset, split=split,
                                    checkpoints=[os.path.abspath(p) for p in paths],
                                    best=best))
  return rows


def write_table(workdir: str, rows: list[dict], about: dict) -> str:
  """WORKDIR/eval_table.md and .json; returns the markdown."""
  title = (f"{about['dataset']} {about['split']}: "
           f"{', '.join(os.path.basename(p) for p in about['checkpoints'])}")
  markdown = _table_markdown(rows, title)
  os.makedirs(workdir, exist_ok=True)
  with open(os.path.join(workdir, TABLE_NAME + ".md"), "w") as f:
    f.write(markdown)
  with open(os.path.join(workdir, TABLE_NAME + ".json"), "w") as f:
    json.dump(dict(about, rows=rows), f, indent=2)
  logging.info("Evaluation table (%s):\n%s", os.path.join(workdir, TABLE_NAME + ".md"),
               markdown)
  return markdown


# -------------------------------------------------------------------- command


def main(argv: Sequence[str]) -> None:
  """Evaluates the runs of --checkpoints (default --workdir) and prints the table."""
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  FLAGS = flags.FLAGS
  checkpoints = FLAGS.checkpoints or None
  runs = checkpoints or [FLAGS.workdir]
  missing = [p for p in runs if not os.path.isdir(p)]
  if missing:
    raise app.UsageError(f"No such run directory: {', '.join(map(repr, missing))}.")
  config = FLAGS.config
  if config is None:
    frozen = checkpointing.read_config(runs[0])
    if frozen is None:
      raise app.UsageError("Give --config: the run has no config.json.")
    config = ml_collections.ConfigDict(frozen)
  scales = [int(q) for q in FLAGS.scales] if FLAGS.scales else None
  evaluate_run(config, FLAGS.workdir, protocols=FLAGS.protocol, scales=scales,
               checkpoints=checkpoints, split=FLAGS.split, batch_size=FLAGS.batch_size,
               best=FLAGS.best)
  with open(os.path.join(FLAGS.workdir, TABLE_NAME + ".md")) as f:
    print(f.read())


def _define_flags() -> None:
  flags.DEFINE_string("workdir", None, "The run to evaluate, or (with --checkpoints) "
                      "where the table goes.")
  config_flags.DEFINE_config_file("config", None, "The config (default: the run's "
                                  "config.json).", lock_config=True)
  flags.DEFINE_list("checkpoints", [], "Runs (workdirs) or converted checkpoints to "
                    "evaluate and fuse; default --workdir.")
  flags.DEFINE_list("protocol", ["all"], f"Protocols: {', '.join(PROTOCOLS)} or all.")
  flags.DEFINE_list("scales", [], "Test scales Q; default the paper's preset for S.")
  flags.DEFINE_string("split", None, "Default config.eval_split.")
  flags.DEFINE_integer("batch_size", None, "Global; default config.batch_size.")
  flags.DEFINE_bool("best", False, "The best checkpoint of each run, not the newest.")
  flags.mark_flags_as_required(["workdir"])


if __name__ == "__main__":
  _define_flags()
  jax.config.config_with_absl()
  app.run(main)
