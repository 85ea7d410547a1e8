"""Very deep features on other datasets (the paper's appendix B): a frozen net's image
descriptors, for linear classifiers (`vgg_jax.linear_probe`).

The paper's recipe, each step a setting here:
  1. the image is rescaled to smallest side Q and the net applied densely over all of it
     (the head runs as convolutions, section 3.2); the map of a hidden layer of the head
     (`layer`: fc7, the penultimate 4096-D layer, as the paper; or fc6) is
     global-average-pooled into one descriptor;
  2. it is averaged with the descriptor of the horizontally flipped image (`flip`);
  3. several scales Q (`scales`; the paper's {256, 384, 512, 640, 768} for 224 crops)
     are averaged (`aggregation="average"`, as for VOC) or stacked ("stack", Caltech);
  4. the descriptor is L2-normalised. Several nets (the paper's D and E) are stacked:
     each net's normalised descriptor side by side, normalised again.

The dense pass over a split is evaluation's (`evaluate.Evaluator.outputs`: images
batched by shape, mapped over the devices, every image once), with `dense_descriptors`
as its per-device function. A checkpoint is read as evaluation reads it
(`evaluate.load_net`: its own net and the input normalisation it was trained with).

  python -m vgg_jax.features --checkpoints=runs/demo --split=test
  python -m vgg_jax.features --config=configs/finetune_folder.py \
      --config.dataset=folder:$HOME/data/flowers --checkpoints=$HOME/weights/vgg16_tv \
      --split=train --scales=256,384,512 --aggregation=stack --output_dir=feats

Each run writes OUTPUT_DIR/<split>_<layer>_<digest>.npz: 'features' float32 [images,
dim], 'labels' int32 [images], 'valid' bool [images] (False for an image that did not
decode) and 'settings' (JSON: the settings, checkpoints, dataset and class names). The
digest names the settings: a second run with the same ones reads the file instead.
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Any, Sequence

from absl import app
from absl import flags
from absl import logging
import jax
import jax.numpy as jnp
from ml_collections import config_flags
import numpy as np

from vgg_jax import checkpointing
from vgg_jax import cli
from vgg_jax import config_checks
from vgg_jax import datasets
from vgg_jax import evaluate
from vgg_jax import models
from vgg_jax import parallel
from vgg_jax import protocols

AGGREGATIONS = ("average", "stack")
# Appendix B's test scales Q, for nets trained on 224x224 crops.
PAPER_SCALES = (256, 384, 512, 640, 768)
PAPER_CROP = 224


# --------------------------------------------------------------- the descriptor


def dense_descriptors(model: models.VGG, params: Any, images: jax.Array, *,
                      layer: str = "fc7", flip: bool = True) -> jax.Array:
  """Descriptors [N, fc_width] of whole images [N, h, w, C] of one shape: LAYER's dense
  map global-average-pooled, averaged with the flipped image's when FLIP."""
  n = images.shape[0]
  if flip:  # one batch through the net, as dense evaluation does
    images = jnp.concatenate([images, images[:, :, ::-1]])
  maps = model.apply({"params": params}, images, train=False, dense=True, until=layer)
  pooled = jnp.mean(maps, axis=(1, 2))
  return (pooled[:n] + pooled[n:]) / 2 if flip else pooled


def descriptor_pass(layer: str = "fc7", flip: bool = True) -> protocols.Pass:
  """`dense_descriptors` as an evaluation pass over a split (whole images)."""
  def fn(model, params, batch, crop_size):
    del crop_size
    return dense_descriptors(model, params, batch["image"], layer=layer, flip=flip)
  return protocols.Pass(f"features_{layer}_{'flip' if flip else 'noflip'}", fn,
                        crops_per_image=2 if flip else 1, by_area=True)


def l2_normalize(x: np.ndarray) -> np.ndarray:
  """Each row divided by its L2 norm (a zero row stays zero)."""
  norms = np.linalg.norm(x, axis=-1, keepdims=True)
  return (x / np.maximum(norms, np.finfo(np.float32).tiny)).astype(np.float32)


def combine(per_net: Sequence[Sequence[np.ndarray]], aggregation: str = "average"
            ) -> np.ndarray:
  """The final descriptors from PER_NET[net][scale] pooled, flip-averaged descriptors:
  scales averaged or stacked (AGGREGATION) and L2-normalised per net, then the nets
  stacked and L2-normalised again (one net: its normalised descriptor)."""
  check_aggregation(aggregation)
  nets = []
  for per_scale in per_net:
    joined = (np.mean(per_scale, axis=0) if aggregation == "average"
              else np.concatenate(per_scale, axis=-1))
    nets.append(l2_normalize(joined))
  return nets[0] if len(nets) == 1 else l2_normalize(np.concatenate(nets, axis=-1))


def appendix_b_scales(crop_size: int) -> tuple[int, ...]:
  """The paper's Q of appendix B, {256, ..., 768}, in proportion to CROP_SIZE (224)."""
  return tuple(int(round(q * crop_size / PAPER_CROP)) for q in PAPER_SCALES)


# ----------------------------------------------------------------- checks


def check_aggregation(aggregation: str) -> None:
  """Raises ValueError unless AGGREGATION is one of AGGREGATIONS."""
  if aggregation not in AGGREGATIONS:
    raise ValueError(f"Unknown aggregation {aggregation!r} of the scales' descriptors: "
                     f"choose 'average' (the paper's VOC setting) or 'stack' (Caltech).")


def check_checkpoints_exist(checkpoints: Sequence[str]) -> None:
  """Raises ValueError when CHECKPOINTS is empty or names a missing directory."""
  if not checkpoints:
    raise ValueError("No checkpoint given: pass --checkpoints=RUN (a training workdir "
                     "or a converted checkpoint).")
  missing = [p for p in checkpoints if not os.path.isdir(p)]
  if missing:
    raise ValueError(f"No such checkpoint: {', '.join(map(repr, missing))}. Give a "
                     f"training workdir or the output of vgg_jax.convert / surgery.")


def load_feature_nets(config, checkpoints: Sequence[str], layer: str, *,
                      best: bool = False) -> list[evaluate.Net]:
  """The nets of CHECKPOINTS, each read as evaluation reads it; ValueError for a missing
  checkpoint or one without LAYER (e.g. conv-only weights) before anything else."""
  models.check_feature_layer(layer)
  check_checkpoints_exist(checkpoints)
  nets = []
  for path in checkpoints:
    params, meta = checkpointing.load_params(path, best=best)
    if layer not in params:
      raise ValueError(f"The checkpoint {path!r} has no {layer} (it holds "
                       f"{', '.join(sorted(params))}): features come from the head of a "
                       f"net with its fully connected layers, not from conv-only "
                       f"weights. Convert the full net (with its top).")
    nets.append(evaluate.load_net(config, path, best=best, loaded=(params, meta)))
  return nets


def _settings(config, nets: Sequence[evaluate.Net], *, layer, scales, aggregation, flip,
              split, best) -> dict:
  """Everything the descriptors depend on (what names their file)."""
  return dict(layer=layer, scales=list(scales), aggregation=aggregation, flip=flip,
              split=split, dataset=config.dataset, channels=nets[0].config.channels,
              best=best, checkpoints=[os.path.abspath(n.path) for n in nets],
              steps=[n.meta.get("step") for n in nets])


def features_path(output_dir: str, settings: dict) -> str:
  """OUTPUT_DIR/<split>_<layer>_<digest of SETTINGS>.npz."""
  digest = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()
  return os.path.join(output_dir, f"{settings['split']}_{settings['layer']}_"
                                  f"{digest[:12]}.npz")


# ----------------------------------------------------------------- a split


def extract(config, checkpoints: Sequence[str], output_dir: str, *,
            layer: str = "fc7", scales: Sequence[int] | None = None,
            aggregation: str = "average", flip: bool = True, split: str | None = None,
            batch_size: int | None = None, best: bool = False) -> str:
  """Descriptors of every image of SPLIT (default config.eval_split), written to
  OUTPUT_DIR (see the module docstring); returns the file's path. A file of the same
  settings is not computed again. Every argument, the checkpoints and the split are
  checked before any image is read (ValueError naming the problem and the fix).

  Args:
    config: the data (dataset, splits, batch size); each checkpoint brings its own net.
    checkpoints: one net, or several whose descriptors are stacked (D and E).
    layer: "fc7" (the paper's) or "fc6".
    scales: test scales Q, each at least every net's crop size; default
      `appendix_b_scales` of the first net's crop size.
    aggregation: "average" or "stack" the scales. flip: average in the mirror image.
  """
  check_aggregation(aggregation)
  models.check_feature_layer(layer)
  config_checks.validate_config(config)
  batch_size = batch_size or config.batch_size
  parallel.check_batch_size(batch_size, what="the features' batch size")
  split = split or config.eval_split
  source = datasets.dataset_source(config)
  num_images = source.num_examples(split)  # (a missing split fails here)
  nets = load_feature_nets(config, checkpoints, layer, best=best)
  scales = protocols.check_scales(scales or appendix_b_scales(nets[0].config.crop_size),
                                  min(n.config.crop_size for n in nets))
  for net in nets:
    protocols.check_scales(scales, net.config.crop_size)
  settings = _settings(config, nets, layer=layer, scales=scales, aggregation=aggregation,
                       flip=flip, split=split, best=best)
  path = features_path(output_dir, settings)
  settings.update(num_classes=source.num_classes,
                  class_names=list(source.class_names) if source.class_names else None)
  if os.path.exists(path) and read_features(path)[3] == settings:
    logging.info("Features with these settings are there already: %s", path)
    return path
  logging.info("Features of %s (%s, %d images): %s at Q %s, %s.", config.dataset, split,
               num_images, layer, list(scales), aggregation)
  values, labels, valid = _describe(nets, scales, aggregation, descriptor_pass(layer, flip),
                                    split=split, batch_size=batch_size)
  if jax.process_index() == 0:
    _write(path, values, labels, valid, settings)
  return path


def _describe(nets, scales, aggregation, p: protocols.Pass, *, split, batch_size
              ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """(descriptors, labels, valid) over the split, every process's images gathered."""
  per_net, labels, valid = [], None, None
  for net in nets:
    evaluator, per_scale = evaluate.Evaluator(net), []
    for q in scales:
      values, labels, seen, seconds = evaluator.outputs(
          p, q, net.model.fc_width, split=split, batch_size=batch_size)
      values, labels, seen = _gathered(values, labels, seen)
      valid = seen if valid is None else valid & seen
      logging.info("%s %s at Q=%d: %.1f s.", net.name, p.name, q, seconds)
      per_scale.append(values)
    per_net.append(per_scale)
  values = combine(per_net, aggregation)
  values[~valid] = 0.0
  return values, labels, valid


def _gathered(values, labels, seen):
  """With several processes, each has filled in its own images: all of them, everywhere."""
  if jax.process_count() == 1:
    return values, labels, seen
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  all_values, all_labels, all_seen = (np.asarray(multihost_utils.process_allgather(x))
                                      for x in (values, labels, seen))
  owner = np.argmax(all_seen, axis=0)   # the process that saw each image
  rows = np.arange(values.shape[0])
  return all_values[owner, rows], all_labels[owner, rows], all_seen.any(axis=0)


def _write(path: str, values, labels, valid, settings: dict) -> None:
  """The .npz, written aside and renamed (never half-written)."""
  os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
  tmp = path + ".tmp.npz"
  np.savez(tmp, features=values, labels=labels, valid=valid,
           settings=np.array(json.dumps(settings)))
  os.replace(tmp, path)
  logging.info("Wrote %s: %d images (%d valid) x %d.", path, len(labels),
               int(valid.sum()), values.shape[-1])


def read_features(path: str) -> tuple[np.ndarray, np.ndarray, np.ndarray, dict]:
  """(features, labels, valid, settings) of a file `extract` wrote."""
  if not os.path.exists(path):
    raise FileNotFoundError(f"No features file {path!r}: write it with "
                            f"python -m vgg_jax.features.")
  with np.load(path) as f:
    return f["features"], f["labels"], f["valid"], json.loads(str(f["settings"]))


# -------------------------------------------------------------------- command


def main(argv: Sequence[str]) -> None:
  """Writes the descriptors of --split and prints the file's path."""
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  FLAGS = flags.FLAGS
  checkpoints = FLAGS.checkpoints
  models.check_feature_layer(FLAGS.layer)
  check_aggregation(FLAGS.aggregation)
  check_checkpoints_exist(checkpoints)
  config = cli.config_flag()
  if config is None:
    config = checkpointing.run_config(checkpoints[0])
  scales = protocols.parse_scales(FLAGS.scales)
  output_dir = FLAGS.output_dir or os.path.join(checkpoints[0], "features")
  print(extract(config, checkpoints, output_dir, layer=FLAGS.layer, scales=scales,
                aggregation=FLAGS.aggregation, flip=FLAGS.flip, split=FLAGS.split,
                batch_size=FLAGS.batch_size, best=FLAGS.best))


def _define_flags() -> None:
  flags.DEFINE_list("checkpoints", None, "Runs (workdirs) or converted checkpoints; "
                    "several are stacked (the paper's D and E).")
  config_flags.DEFINE_config_file("config", None, "The data config (default: the first "
                                  "checkpoint's config.json).", lock_config=True)
  flags.DEFINE_string("output_dir", None, "Where the .npz goes (default "
                      "CHECKPOINT/features).")
  flags.DEFINE_string("layer", "fc7", "fc7 (the paper's) or fc6.")
  flags.DEFINE_list("scales", [], "Test scales Q; default the paper's {256, ..., 768} "
                    "in proportion to the crop size.")
  flags.DEFINE_string("aggregation", "average", "average or stack the scales.")
  flags.DEFINE_bool("flip", True, "Average in the horizontally flipped image.")
  flags.DEFINE_string("split", None, "Default config.eval_split.")
  flags.DEFINE_integer("batch_size", None, "Global; default config.batch_size.")
  flags.DEFINE_bool("best", False, "The best checkpoint of each run, not the newest.")
  flags.mark_flags_as_required(["checkpoints"])


if __name__ == "__main__":
  _define_flags()
  jax.config.config_with_absl()
  cli.run(main)
