"""The paper's localisation protocols (appendix A), and the command that runs them.

  python -m vgg_jax.localize --workdirs=runs/loc_pcr_all,runs/loc_pcr_fc \\
      --classifier=runs/vgg16 --scales=256,384,512

1. "center_crop" (Table 8's protocol): each localisation net on the centre crop at
   Q = its training S predicts the box of the ground-truth class (classification is
   factored out). Its error: the share of images where that box overlaps none of the
   image's ground-truth boxes with IoU > 0.5.
2. "dense" (the full protocol): each localisation net, and all of them fused, applied
   densely to the whole image at each Q, one box per position of the map (per class
   with PCR). For each of the classification net's top-5 classes (its dense posteriors,
   averaged over the Q), the boxes of that class from every position, Q and net are
   rated by the classification net's posterior of the class at their position, merged
   greedily (`boxes.greedy_merge`: overlapping boxes averaged, their ratings summed),
   and the best merged box is the guess. ILSVRC's top-1 and top-5 localisation error:
   a guess is right when its class is the label and its box has IoU > 0.5 with one of
   the image's ground-truth boxes.

The table, WORKDIR/localization_table.md and .json (WORKDIR: --output, else the first
localisation net's), has a row per net and protocol, and one for the fused nets.
"""

from __future__ import annotations

import collections
import json
import os
from typing import Sequence

import jax
import numpy as np

from vgg_jax import boxes as boxes_lib
from vgg_jax import checkpointing
from vgg_jax import cli
from vgg_jax import datasets
from vgg_jax import evaluate
from vgg_jax import localization
from vgg_jax import models
from vgg_jax import protocols as protocols_lib

TABLE_NAME = "localization_table"
STRIDE = 2 ** models.NUM_POOLS  # input pixels between neighbouring positions of a map
TOP_K = 5                       # ILSVRC's guesses per image
PROTOCOLS = ("center_crop", "dense")


def _outputs(model, params, batch, crop_size):
  """The net's raw outputs: [n, outputs] of crops, or the map [n, h, w, outputs]."""
  dense = batch["image"].shape[1:3] != (crop_size, crop_size)
  return model.apply({"params": params}, batch["image"], train=False, dense=dense)


def _posterior_map(model, params, batch, crop_size):
  del crop_size
  return jax.nn.softmax(model.apply({"params": params}, batch["image"], train=False,
                                    dense=True))


CROP_OUTPUTS = protocols_lib.Pass("crop_outputs", _outputs, center_crop=True)
MAP_OUTPUTS = protocols_lib.Pass("map_outputs", _outputs, by_area=True)
POSTERIOR_MAP = protocols_lib.Pass("posterior_map", _posterior_map, by_area=True)


# -------------------------------------------------------------- the ground truth


def ground_truth(config, split: str) -> tuple[np.ndarray, np.ndarray]:
  """(boxes float32 [N, K, 4], counts [N]) of every image of SPLIT, in source pixels."""
  data = datasets.dataset_source(config).split_data(split)
  if "boxes" not in data.annotations:
    raise ValueError(f"{config.dataset} has no boxes: localisation is evaluated on a "
                     "dataset 'boxes:<dir>' (see vgg_jax.box_files).")
  return data.annotations["boxes"], data.annotations["box_count"]


# ---------------------------------------------------------------- the protocols


def center_crop_error(net: evaluate.Net, split: str, *, batch_size: int | None = None
                      ) -> dict:
  """The first protocol on SPLIT: {'loc_error', 'images'} of one localisation net."""
  gt_boxes, gt_counts = ground_truth(net.config, split)
  correct = []
  for batch in evaluate.Evaluator(net).stream(
      CROP_OUTPUTS, net.config.eval_scale, split=split, batch_size=batch_size,
      extras=("factor", "offset")):
    predicted = localization.source_boxes(
        localization.crop_box(batch["outputs"], batch["label"]), batch["factor"],
        batch["offset"], net.config.crop_size)
    index = batch["index"]
    correct.append(boxes_lib.box_correct(np.asarray(predicted), gt_boxes[index],
                                         gt_counts[index]))
  correct = np.concatenate(correct)
  return {"loc_error": float(1 - correct.mean()), "images": len(correct)}


def top_classes(classifier: evaluate.Net, scales: Sequence[int], split: str, *,
                batch_size: int | None = None) -> np.ndarray:
  """The classification net's TOP_K classes of each image [N, TOP_K], best first, by
  its dense posteriors (section 3.2, flips included) averaged over SCALES."""
  evaluator = evaluate.Evaluator(classifier)
  posteriors = protocols_lib.multi_scale([
      evaluator.posteriors("dense", q, split=split, batch_size=batch_size)
      for q in scales])
  return np.argsort(-posteriors.probs, axis=1, kind="stable")[:, :TOP_K]


def position_offsets(map_height: int, map_width: int) -> np.ndarray:
  """The (top, left) [h, w, 2] in the rescaled image of the window each position of a
  dense map sees: positions are STRIDE pixels apart, from the corner."""
  rows, cols = np.meshgrid(np.arange(map_height), np.arange(map_width), indexing="ij")
  return STRIDE * np.stack([rows, cols], -1).astype(np.float32)


def map_boxes(outputs: np.ndarray, classes: np.ndarray, factor: np.ndarray,
              crop_size: int) -> np.ndarray:
  """The boxes of CLASSES [k] at every position of one image's dense map OUTPUTS
  [h, w, 4 or 4C], in source pixels: [k, h * w, 4]. FACTOR: the image's (y, x) rescale."""
  h, w = outputs.shape[:2]
  per_class = np.stack([boxes_lib.class_boxes(outputs[None], np.array([c]))[0]
                        for c in classes])                       # [k, h, w, 4]
  offsets = position_offsets(h, w)
  corners = boxes_lib.from_center_size(per_class * crop_size)
  source = boxes_lib.from_crop_frame(
      corners, factor=tuple(factor), offset=(offsets[..., 0], offsets[..., 1]),
      crop_size=crop_size, flipped=False)
  return source.reshape(len(classes), h * w, 4)


def dense_guesses(nets: Sequence[evaluate.Net], classifier: evaluate.Net,
                  scales: Sequence[int], split: str, classes: np.ndarray, *,
                  merge_iou: float = 0.5, batch_size: int | None = None) -> np.ndarray:
  """The second protocol's guessed boxes [N, TOP_K, 4] for CLASSES [N, TOP_K] (from
  `top_classes`): every net's boxes at every position and Q, rated and merged."""
  candidates = collections.defaultdict(list)   # (image, guess) -> [(boxes, ratings)]
  # One evaluator per net for every Q: its parameters go to the devices, and its
  # mapped functions compile, once.
  rater = evaluate.Evaluator(classifier)
  evaluators = [(net, evaluate.Evaluator(net)) for net in nets]
  for q in scales:
    ratings = {}                                 # image -> [TOP_K, positions]
    for batch in rater.stream(POSTERIOR_MAP, q, split=split, batch_size=batch_size):
      for i, posterior_map in zip(batch["index"], batch["outputs"]):
        ratings[i] = posterior_map.reshape(-1, posterior_map.shape[-1])[:, classes[i]].T
    for net, evaluator in evaluators:
      for batch in evaluator.stream(MAP_OUTPUTS, q, split=split, batch_size=batch_size,
                                    extras=("factor",)):
        for i, outputs, factor in zip(batch["index"], batch["outputs"], batch["factor"]):
          found = map_boxes(outputs, classes[i], factor, net.config.crop_size)
          for k in range(classes.shape[1]):
            candidates[i, k].append((found[k], ratings[i][k]))
  guesses = np.zeros(classes.shape + (4,), np.float32)
  for (i, k), found in candidates.items():
    merged, _, _ = boxes_lib.greedy_merge(np.concatenate([b for b, _ in found]),
                                          np.concatenate([r for _, r in found]),
                                          threshold=merge_iou)
    guesses[i, k] = merged[0]  # the best rated
  return guesses


# --------------------------------------------------------------------- the table


def localization_table(nets: Sequence[evaluate.Net], classifier: evaluate.Net | None,
                       scales: Sequence[int], split: str, *,
                       protocols: Sequence[str] = PROTOCOLS, merge_iou: float = 0.5,
                       batch_size: int | None = None) -> list[dict]:
  """Rows of the localisation table (errors as fractions)."""
  rows = []
  if "center_crop" in protocols:
    for net in nets:
      result = center_crop_error(net, split, batch_size=batch_size)
      rows.append(dict(net=net.name, protocol="center crop, ground-truth class",
                       scales=str(net.config.eval_scale), top1_loc_error=None,
                       top5_loc_error=None, gt_class_loc_error=result["loc_error"],
                       images=result["images"]))
  if "dense" in protocols:
    if classifier is None:
      raise ValueError("The dense protocol rates boxes by a classification net's "
                       "posteriors: give --classifier (a classification run's workdir).")
    classes = top_classes(classifier, scales, split, batch_size=batch_size)
    gt_boxes, gt_counts = ground_truth(classifier.config, split)
    labels = split_labels(classifier.config, split)
    groups = [[net] for net in nets] + ([list(nets)] if len(nets) > 1 else [])
    for group in groups:
      guesses = dense_guesses(group, classifier, scales, split, classes,
                              merge_iou=merge_iou, batch_size=batch_size)
      errors = boxes_lib.localization_errors(classes, guesses, labels, gt_boxes,
                                             gt_counts)
      rows.append(dict(net=" + ".join(n.name for n in group),
                       protocol="dense, greedy merging",
                       scales=",".join(map(str, scales)), gt_class_loc_error=None,
                       images=len(labels), **errors))
  return rows


def split_labels(config, split: str) -> np.ndarray:
  """The labels [N] of every image of SPLIT."""
  return np.asarray(datasets.dataset_source(config).split_data(split).labels)


def write_table(workdir: str, rows: list[dict], about: dict) -> str:
  """WORKDIR/localization_table.{json,md}; returns the markdown."""
  percent = lambda v: "–" if v is None else f"{100 * v:.1f}"  # pylint: disable=g-long-lambda
  lines = [f"Localisation error (%), ILSVRC criterion (IoU > 0.5), on "
           f"{about['dataset']} {about['split']}.", "",
           "| net | protocol | Q | GT class | top-1 | top-5 | images |",
           "|---|---|---|---|---|---|---|"]
  lines += [f"| {r['net']} | {r['protocol']} | {r['scales']} | "
            f"{percent(r['gt_class_loc_error'])} | {percent(r['top1_loc_error'])} | "
            f"{percent(r['top5_loc_error'])} | {r['images']} |" for r in rows]
  markdown = "\n".join(lines) + "\n"
  os.makedirs(workdir, exist_ok=True)
  with open(os.path.join(workdir, TABLE_NAME + ".json"), "w") as f:
    json.dump(dict(about, rows=rows), f, indent=2)
  with open(os.path.join(workdir, TABLE_NAME + ".md"), "w") as f:
    f.write(markdown)
  return markdown


# ---------------------------------------------------------------------- command


def main(argv: Sequence[str]) -> None:
  """Evaluates localisation nets (and their fusion) with the paper's protocols."""
  del argv
  protocols = [p for p in FLAGS.protocols if p]
  unknown = sorted(set(protocols) - set(PROTOCOLS))
  if unknown or not FLAGS.workdirs:
    raise ValueError(f"--protocols: choose from {', '.join(PROTOCOLS)} (got "
                     f"{', '.join(unknown)}); --workdirs: the localisation runs."
                     if unknown else "--workdirs: give the localisation runs' workdirs.")
  nets = [load_localization_net(path) for path in FLAGS.workdirs]
  classifier = (load_classifier(FLAGS.classifier, nets[0])
                if FLAGS.classifier else None)
  split = FLAGS.split or nets[0].config.eval_split
  scales = protocols_lib.check_scales(
      protocols_lib.parse_scales(FLAGS.scales) or protocols_lib.paper_scales(
          nets[0].config), nets[0].config.crop_size)
  rows = localization_table(nets, classifier, scales, split, protocols=protocols,
                            merge_iou=FLAGS.merge_iou, batch_size=FLAGS.batch_size)
  if jax.process_index() == 0:
    print(write_table(FLAGS.output or FLAGS.workdirs[0], rows,
                      dict(dataset=nets[0].config.dataset, split=split,
                           classifier=FLAGS.classifier, merge_iou=FLAGS.merge_iou)))


def load_localization_net(path: str) -> evaluate.Net:
  """A localisation run's last net; ValueError for a classification run."""
  net = evaluate.load_net(checkpointing.run_config(path), path)
  if not net.model.box_regression:
    raise ValueError(f"{path} holds a classification net: give localisation runs "
                     "(box_regression set) as --workdirs, and a classifier as "
                     "--classifier.")
  return net


def load_classifier(path: str, like: evaluate.Net) -> evaluate.Net:
  """The classification net at PATH, evaluated on LIKE's data; its map must align with
  the localisation nets' (the same crop size)."""
  data_config = like.config.copy_and_resolve_references()
  with data_config.unlocked():
    data_config.box_regression = None  # (a run that predates the field is a classifier)
  net = evaluate.load_net(data_config, path)
  if net.model.box_regression:
    raise ValueError(f"--classifier={path} holds a localisation net: give a "
                     "classification run.")
  if net.config.crop_size != like.config.crop_size:
    raise ValueError(f"--classifier={path} was trained on {net.config.crop_size}-pixel "
                     f"crops, the localisation nets on {like.config.crop_size}: their "
                     "dense maps must align; use nets of one crop size.")
  return net


if __name__ == "__main__":
  from absl import flags  # pylint: disable=g-import-not-at-top
  flags.DEFINE_list("workdirs", [], "Localisation runs (box_regression set).")
  flags.DEFINE_string("classifier", None, "A classification run of the same crop size: "
                      "its dense posteriors choose and rate the classes (dense protocol).")
  flags.DEFINE_list("protocols", list(PROTOCOLS), "center_crop, dense.")
  flags.DEFINE_list("scales", [], "Q of the dense protocol (default: the paper's for the "
                    "nets' training scales).")
  flags.DEFINE_string("split", None, "Split (default: the runs' eval_split).")
  flags.DEFINE_float("merge_iou", 0.5, "Boxes overlapping more than this are merged.")
  flags.DEFINE_integer("batch_size", None, "Net evaluations per step, over all devices.")
  flags.DEFINE_string("output", None, "Where the table goes (default: the first run).")
  FLAGS = flags.FLAGS
  cli.run(main)
