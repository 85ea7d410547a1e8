"""Testing (section 3.2) and the evaluation tables of section 4 (Tables 3-6).

The protocols themselves (centre crop, dense, multi-crop, multi-scale, their
combinations and ConvNet fusion) are `vgg_jax.protocols`. Here an `Evaluator` maps a
protocol's per-image function over the devices with the training's
`parallel.DeviceMapping` and runs one pass over a split (`Evaluator.posteriors`): whole
images are batched by shape (dense), crops are cut on the device with
`jax.lax.dynamic_slice` from the image padded to a canvas of a few sizes (multi-crop),
so that XLA compiles once per image shape (dense), per canvas (multi-crop) or once
(centre crop). On ImageNet, dense evaluation meets hundreds of image shapes (one per
aspect ratio): set JAX_COMPILATION_CACHE_DIR to keep the compiled programs between runs.

`evaluate_run` is the table: each protocol of `protocols.PROTOCOLS` at every single Q
and at the whole set of Q, for each checkpoint and for their ensemble, written as
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
from typing import Any, Iterator, Sequence

from absl import app
from absl import flags
from absl import logging
import jax
import ml_collections
from ml_collections import config_flags
import numpy as np
import tensorflow as tf

from vgg_jax import checkpointing
from vgg_jax import cli
from vgg_jax import config_checks
from vgg_jax import convert
from vgg_jax import datasets
from vgg_jax import input_pipeline
from vgg_jax import models
from vgg_jax import parallel
from vgg_jax import protocols as protocols_lib

TABLE_NAME = "eval_table"
# Fields of a run's frozen config that describe its net and the input it was trained on.
NET_FIELDS = models.ARCHITECTURE_FIELDS + ("dtype", "mean_rgb", "normalize_std",
                                           "train_scale_min", "train_scale_max")


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


def load_net(config, path: str, *, own_net: bool = True, best: bool = False,
             step: int | None = None, loaded: tuple[Any, dict] | None = None) -> Net:
  """Reads a checkpoint (a workdir or a converted one) and the net to evaluate it with.

  With OWN_NET the net is the checkpoint's own (its config.json, else its meta, else
  CONFIG's); otherwise CONFIG names the net and a checkpoint of another architecture is
  an error. The checkpoint's parameters must fit the net (ValueError listing what does
  not). A converted net's input convention becomes the pipeline's mean and std.
  LOADED: the checkpoint's (params, meta) when the caller has read them already.
  """
  frozen = checkpointing.read_config(path)
  params, meta = loaded or checkpointing.load_params(path, best=best, step=step)
  described = frozen if frozen is not None else models.architecture(meta)
  if not own_net:
    differ = [f"{k}: {a!r} in the checkpoint, {b!r} in the config" for k, a, b in
              models.architecture_differences(described, config.to_dict())]
    if differ:
      raise ValueError(f"The checkpoint {path!r} holds a net of another architecture "
                       f"({'; '.join(differ)}). Evaluate it with its own config "
                       f"({os.path.join(path, checkpointing.CONFIG_FILE)}) or list it in "
                       f"--checkpoints.")
  fields = NET_FIELDS if frozen is not None else models.ARCHITECTURE_FIELDS
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
  model = models.from_config(net_config)
  problems = models.param_differences(
      models.param_shapes(model, models.input_shape(net_config)), params)
  if problems:
    raise ValueError(f"The checkpoint {path!r} does not fit net {model.net} "
                     f"(width={net_config.width}, fc_width={net_config.fc_width}, "
                     f"classes={num_classes}, crop_size={net_config.crop_size}): it is "
                     f"of another architecture. " + "; ".join(problems[:10])
                     + (f"; and {len(problems) - 10} more" if len(problems) > 10 else ""))
  name = f"{model.net} ({os.path.basename(os.path.normpath(path))})"
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

  def _fn(self, p: protocols_lib.Pass):
    if p.name not in self._mapped:
      model, crop_size = self.net.model, self.net.config.crop_size
      self._mapped[p.name] = self.mapping.map(
          lambda params, batch: p.fn(model, params, batch, crop_size))
    return self._mapped[p.name]

  def _images_per_device(self, p: protocols_lib.Pass, crops_per_device: int, height,
                         width):
    """Images of HEIGHT x WIDTH per device and step: CROPS_PER_DEVICE crops' worth of
    work (dense: a whole image counts by its area). Python ints or TF tensors."""
    if not p.by_area:
      return max(1, crops_per_device // p.crops_per_image)
    crop_area = self.net.config.crop_size ** 2
    images = crops_per_device * crop_area // (p.crops_per_image * height * width)
    return tf.maximum(images, 1) if isinstance(images, tf.Tensor) else max(images, 1)

  def _examples(self, p: str | protocols_lib.Pass, scale: int, split: str,
                workdir: str | None):
    config, p = self.net.config, _as_pass(p)
    crop = config.crop_size if p.center_crop else None
    ds = input_pipeline.eval_examples(config, scale=scale, split=split, crop_size=crop,
                                      workdir=workdir, mean_std=self.net.mean_std)
    if p.name == "multi_crop":
      crop_size = config.crop_size

      def canvas(example):  # padded to a multiple of the crop: few shapes to compile
        image = example["image"]
        height, width = tf.shape(image)[0], tf.shape(image)[1]
        boxes = protocols_lib.crop_boxes_tf(height, width, crop_size, protocols_lib.GRID)
        image = tf.image.pad_to_bounding_box(
            image, 0, 0, -(-height // crop_size) * crop_size,
            -(-width // crop_size) * crop_size)
        return dict(example, image=image, boxes=boxes)
      ds = ds.map(canvas, num_parallel_calls=tf.data.AUTOTUNE)
    return ds

  def posteriors(self, pass_name: str, scale: int, *, split: str | None = None,
                 batch_size: int | None = None, workdir: str | None = None
                 ) -> protocols_lib.Posteriors:
    """Posteriors of one pass ("center_crop", "dense", "multi_crop") at Q = SCALE over
    this process's images of SPLIT (default config.eval_split), BATCH_SIZE (global,
    default config.batch_size) net evaluations per step over all devices."""
    return protocols_lib.Posteriors(*self.outputs(
        protocols_lib.PASSES[pass_name], scale, self.net.model.num_classes, split=split,
        batch_size=batch_size, workdir=workdir))

  def outputs(self, p: protocols_lib.Pass, scale: int, width: int, *,
              split: str | None = None, batch_size: int | None = None,
              workdir: str | None = None
              ) -> tuple[np.ndarray, np.ndarray, np.ndarray, float]:
    """(outputs float32 [examples, WIDTH], labels, seen, seconds) of any pass P (its fn
    gives WIDTH numbers per image) over the split, as `posteriors` describes."""
    split = split or self.net.config.eval_split
    num_examples = datasets.dataset_info(
        _merged(self.net.config, {"eval_split": split})).num_eval
    values = np.zeros((num_examples, width), np.float32)
    labels = np.full(num_examples, -1, np.int32)
    seen = np.zeros(num_examples, bool)
    start = time.perf_counter()
    for batch in self.stream(p, scale, split=split, batch_size=batch_size,
                             workdir=workdir):
      index = batch["index"]
      if seen[index].any() or len(set(index.tolist())) < len(index):
        raise RuntimeError(f"Images {sorted(set(index[seen[index]].tolist()))} of "
                           f"{split} came twice in one pass.")
      values[index] = batch["outputs"].reshape(len(index), -1)
      labels[index] = batch["label"]
      seen[index] = True
    return values, labels, seen, time.perf_counter() - start

  def stream(self, p: protocols_lib.Pass, scale: int, *, split: str | None = None,
             batch_size: int | None = None, workdir: str | None = None,
             extras: Sequence[str] = ()) -> Iterator[dict[str, np.ndarray]]:
    """The outputs of pass P at Q = SCALE, a batch of images of one shape at a time:
    {'index' [n], 'label' [n], 'outputs' [n, ...] (P's fn per image), and the EXTRAS,
    fields of `input_pipeline.eval_examples` such as 'factor'}. Every image of this
    process's share of SPLIT comes once; undecodable ones are left out (a warning)."""
    config = self.net.config
    split = split or config.eval_split
    protocols_lib.check_scales([scale], config.crop_size)
    crops_per_device = parallel.check_batch_size(batch_size or config.batch_size)
    devices = self.mapping.local_device_count
    fn = self._fn(p)
    keys = ("image", "boxes") if p.name == "multi_crop" else ("image",)
    ds = self._examples(p, scale, split, workdir or self.net.path)
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
      yield dict({k: batch[k][valid] for k in extras}, index=index,
                 label=batch["label"][valid],
                 outputs=out.reshape((devices * rows,) + out.shape[2:])[:n])
    if skipped:
      logging.warning("%s at Q=%d: %d undecodable image(s) left out.", p.name, scale,
                      skipped)


def _as_pass(p: str | protocols_lib.Pass) -> protocols_lib.Pass:
  return protocols_lib.PASSES[p] if isinstance(p, str) else p


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
    protocols: names of protocols.PROTOCOLS, a list or a comma-separated string; default all.
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
  batch_size = batch_size or config.batch_size
  parallel.check_batch_size(batch_size, what="the evaluation batch size")
  config_checks.validate_config(_merged(config, {"batch_size": batch_size}))
  protocols = protocols_lib.parse_protocols(protocols)
  if scales is not None:
    scales = protocols_lib.check_scales(scales, config.crop_size)
  split = split or config.eval_split
  paths = list(checkpoints) if checkpoints else [workdir]
  nets = [load_net(config, path, own_net=bool(checkpoints), best=best) for path in paths]
  boxes = [net.path for net in nets if net.model.box_regression]
  if boxes:
    raise ValueError(f"{', '.join(boxes)}: a localisation net predicts boxes, not "
                     "classes; evaluate it with python -m vgg_jax.localize.")
  classes = {net.model.num_classes for net in nets}
  info = datasets.dataset_info(_merged(config, {"eval_split": split}))
  if classes != {info.num_classes}:
    raise ValueError(f"The nets have {sorted(classes)} classes; {config.dataset} has "
                     f"{info.num_classes}.")
  if scales is None:
    scales = protocols_lib.paper_scales(nets[0].config)
  for net in nets:
    protocols_lib.check_scales(scales, net.config.crop_size)
  logging.info("Evaluating %s on %s (%s, %d images): protocols %s at Q %s.",
               [n.name for n in nets], config.dataset, split, info.num_eval,
               list(protocols), list(scales))
  rows = _table_rows(nets, protocols, scales, split=split, batch_size=batch_size)
  if jax.process_index() == 0:
    write_table(workdir, rows, dict(dataset=config.dataset, split=split,
                                    checkpoints=[os.path.abspath(p) for p in paths],
                                    best=best))
  return rows


def _table_rows(nets: Sequence[Net], protocols: Sequence[str], scales: Sequence[int], *,
                split: str, batch_size: int) -> list[dict]:
  """The table's rows (see `evaluate_run`); each pass of each net at each Q runs once."""
  cache: dict[tuple, protocols_lib.Posteriors] = {}
  evaluators: dict[int, Evaluator] = {}

  def computed(i: int, pass_name: str, q: int) -> protocols_lib.Posteriors:
    if (i, pass_name, q) not in cache:
      if i not in evaluators:
        evaluators[i] = Evaluator(nets[i])
      cache[i, pass_name, q] = evaluators[i].posteriors(
          pass_name, q, split=split, batch_size=batch_size)
      logging.info("%s %s Q=%d: %.1f s.", nets[i].name, pass_name, q,
                   cache[i, pass_name, q].seconds)
    return cache[i, pass_name, q]

  def protocol_posteriors(i: int, name: str, qs: tuple[int, ...]
                          ) -> protocols_lib.Posteriors:
    per_pass = [protocols_lib.multi_scale([computed(i, p, q) for q in qs])
                for p in protocols_lib.PROTOCOLS[name]]
    return per_pass[0] if len(per_pass) == 1 else protocols_lib.average(per_pass)

  scale_sets = [(q,) for q in scales] + ([tuple(scales)] if len(scales) > 1 else [])
  members = [[i] for i in range(len(nets))] + ([list(range(len(nets)))]
                                               if len(nets) > 1 else [])
  rows = []
  for member in members:
    net_name = " + ".join(nets[i].name for i in member)
    for name in protocols:
      for qs in scale_sets:
        result = protocols_lib.ensemble([protocol_posteriors(i, name, qs)
                                         for i in member])
        rows.append(dict(net=net_name, protocol=name, scales=list(qs),
                         **protocols_lib.errors(result),
                         seconds=round(result.seconds, 3)))
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
  config = cli.config_flag()
  if config is None:
    config = checkpointing.run_config(runs[0])
  scales = protocols_lib.parse_scales(FLAGS.scales)
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
  flags.DEFINE_list("protocol", ["all"],
                    f"Protocols: {', '.join(protocols_lib.PROTOCOLS)} or all.")
  flags.DEFINE_list("scales", [], "Test scales Q; default the paper's preset for S.")
  flags.DEFINE_string("split", None, "Default config.eval_split.")
  flags.DEFINE_integer("batch_size", None, "Global; default config.batch_size.")
  flags.DEFINE_bool("best", False, "The best checkpoint of each run, not the newest.")
  flags.mark_flags_as_required(["workdir"])


if __name__ == "__main__":
  _define_flags()
  jax.config.config_with_absl()
  cli.run(main)
