"""Bounding boxes for localisation (the paper's appendix A): pure array functions.

A box is 4 numbers (xmin, ymin, xmax, ymax) in continuous pixel coordinates of its
image: pixel edges, so a box covering a whole W x H image is (0, 0, W, H). The net
predicts the centre-size form (centre x, centre y, width, height), in units of the crop
side when it is a regression target (0..1 inside the crop).

Every function takes boxes of any leading shape ([..., 4]). Those used inside jitted
code (`iou`, `box_correct`, `euclidean_loss`, `class_boxes`, the centre-size pair) work
on numpy arrays with numpy and on JAX arrays (and tracers) with jax.numpy; the others
are numpy references for the host side and the tests.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def _xp(*arrays):
  """jax.numpy when any of ARRAYS is a JAX array (or a tracer), else numpy."""
  return jnp if any(isinstance(a, jax.Array) for a in arrays) else np


def _edges(boxes):
  return boxes[..., 0], boxes[..., 1], boxes[..., 2], boxes[..., 3]


# ------------------------------------------------------------------ forms and overlap


def to_center_size(boxes):
  """(xmin, ymin, xmax, ymax) -> (centre x, centre y, width, height), over [..., 4]."""
  xp = _xp(boxes)
  x0, y0, x1, y1 = _edges(boxes)
  return xp.stack([(x0 + x1) / 2, (y0 + y1) / 2, x1 - x0, y1 - y0], axis=-1)


def from_center_size(boxes):
  """(centre x, centre y, width, height) -> (xmin, ymin, xmax, ymax), over [..., 4]."""
  xp = _xp(boxes)
  cx, cy, w, h = _edges(boxes)
  return xp.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], axis=-1)


def area(boxes):
  """The area of each box [..., 4] -> [...]; 0 for an empty or inverted box."""
  xp = _xp(boxes)
  x0, y0, x1, y1 = _edges(boxes)
  return xp.maximum(x1 - x0, 0) * xp.maximum(y1 - y0, 0)


def iou(a, b):
  """Intersection over union of boxes A [..., 4] and B [..., 4], broadcast -> [...].

  0 where the union is empty (two empty boxes), never NaN.
  """
  xp = _xp(a, b)
  ax0, ay0, ax1, ay1 = _edges(a)
  bx0, by0, bx1, by1 = _edges(b)
  inter = (xp.maximum(xp.minimum(ax1, bx1) - xp.maximum(ax0, bx0), 0) *
           xp.maximum(xp.minimum(ay1, by1) - xp.maximum(ay0, by0), 0))
  union = area(a) + area(b) - inter
  positive = union > 0
  return xp.where(positive, inter / xp.where(positive, union, 1), 0)


def pairwise_iou(a, b):
  """The IoU of every box of A [n, 4] with every box of B [m, 4]: [n, m]."""
  return iou(a[:, None, :], b[None, :, :])


# ------------------------------------------------------------- rescale, crop, flip


def to_crop_frame(boxes, *, factor, offset, crop_size, flipped, clip=True):
  """BOXES [..., 4] of an original image in the pixel frame of a crop of it.

  The image was rescaled by FACTOR = (fy, fx) (rescaled size / original size, per
  axis), cropped at OFFSET = (top, left) with side CROP_SIZE (or (height, width)), then
  mirrored left-right when FLIPPED. With CLIP, boxes are clipped to the crop (a box
  wholly outside it comes out empty: zero width or height).
  """
  xp = _xp(boxes)
  (fy, fx), (top, left) = factor, offset
  ch, cw = np.broadcast_to(np.asarray(crop_size), (2,))
  x0, y0, x1, y1 = _edges(boxes)
  x0, x1 = x0 * fx - left, x1 * fx - left
  y0, y1 = y0 * fy - top, y1 * fy - top
  if clip:
    x0, x1 = xp.clip(x0, 0, cw), xp.clip(x1, 0, cw)
    y0, y1 = xp.clip(y0, 0, ch), xp.clip(y1, 0, ch)
  if flipped:
    x0, x1 = cw - x1, cw - x0
  return xp.stack([x0, y0, x1, y1], axis=-1)


def from_crop_frame(boxes, *, factor, offset, crop_size, flipped):
  """The inverse of `to_crop_frame` (without clipping): crop-frame BOXES [..., 4] in
  the original image's pixel frame."""
  xp = _xp(boxes)
  (fy, fx), (top, left) = factor, offset
  _, cw = np.broadcast_to(np.asarray(crop_size), (2,))
  x0, y0, x1, y1 = _edges(boxes)
  if flipped:
    x0, x1 = cw - x1, cw - x0
  return xp.stack([(x0 + left) / fx, (y0 + top) / fy, (x1 + left) / fx,
                   (y1 + top) / fy], axis=-1)


# ----------------------------------------------------------------- greedy merging


def greedy_merge(boxes, scores, threshold=0.5):
  """OverFeat's greedy merging of one class's box predictions, as appendix A uses it.

  Repeatedly takes the pair of current boxes with the highest IoU; while that IoU is
  above THRESHOLD, the pair is replaced by one box whose coordinates are the mean of all
  the original boxes merged into it, whose score is the sum of their SCORES and whose
  support is their count. "Spatially close" is measured here by IoU (our choice;
  OverFeat used the distance between centres together with the intersection).

  BOXES [n, 4], SCORES [n]. Returns (merged [m, 4], merged scores [m], support [m]
  int), ordered by decreasing score. Keeps an n x n IoU matrix and updates one row and
  column per merge: a few tenths of a second at n = 2000.
  """
  boxes = np.asarray(boxes, np.float64).reshape(-1, 4)
  scores = np.asarray(scores, np.float64).reshape(-1)
  if len(boxes) != len(scores):
    raise ValueError(f"greedy_merge: {len(boxes)} boxes but {len(scores)} scores.")
  sums, total, support = boxes.copy(), scores.copy(), np.ones(len(boxes), np.int64)
  alive = np.ones(len(boxes), bool)
  overlap = pairwise_iou(boxes, boxes)
  np.fill_diagonal(overlap, -1.0)
  best = np.full(len(boxes), -1.0)
  best_of = np.zeros(len(boxes), np.int64)
  if len(boxes) > 1:
    best_of = overlap.argmax(axis=1)
    best = overlap[np.arange(len(boxes)), best_of]
  while len(boxes) > 1:
    i = int(best.argmax())
    j = int(best_of[i])
    if not best[i] > threshold:
      break
    keep, gone = min(i, j), max(i, j)
    sums[keep] += sums[gone]
    total[keep] += total[gone]
    support[keep] += support[gone]
    alive[gone] = False
    _update_overlap(overlap, best, best_of, alive, keep, gone,
                    sums[keep] / support[keep], sums / support[:, None])
  order = np.flatnonzero(alive)[np.argsort(-total[alive], kind="stable")]
  return sums[order] / support[order, None], total[order], support[order]


def _update_overlap(overlap, best, best_of, alive, keep, gone, merged, means):
  """OVERLAP (and each row's BEST IoU and its column BEST_OF) after box GONE merged
  into box KEEP, now at MERGED; MEANS are all current boxes."""
  overlap[gone, :] = -1.0
  overlap[:, gone] = -1.0
  row = np.where(alive, iou(merged[None, :], means), -1.0)
  row[keep] = -1.0
  overlap[keep, :] = row
  overlap[:, keep] = row
  best[gone] = -1.0
  # A row that pointed at KEEP or GONE may have lost its best: recompute those whose
  # new IoU with KEEP does not reach their old best; the others only gain.
  pointed = (best_of == keep) | (best_of == gone)
  gains = alive & (row >= best)
  best_of[gains] = keep
  best[gains] = row[gains]
  stale = np.flatnonzero(alive & pointed & ~gains)
  if len(stale):
    best_of[stale] = overlap[stale].argmax(axis=1)
    best[stale] = overlap[stale, best_of[stale]]
  best_of[keep] = int(row.argmax())
  best[keep] = row[best_of[keep]]
  best[~alive] = -1.0


# ------------------------------------------------------------------- error measures


def box_correct(pred, gt_boxes, gt_count, iou_threshold=0.5):
  """Whether each PRED box [N, 4] overlaps one of its image's ground-truth boxes
  (GT_BOXES [N, K, 4], the first GT_COUNT [N] of them real) with IoU > IOU_THRESHOLD:
  bool [N]. numpy or jax.numpy (jit-friendly)."""
  xp = _xp(pred, gt_boxes, gt_count)
  overlaps = iou(pred[:, None, :], gt_boxes)
  real = xp.arange(gt_boxes.shape[1])[None, :] < gt_count[:, None]
  return xp.any((overlaps > iou_threshold) & real, axis=1)


def localization_errors(guess_classes, guess_boxes, labels, gt_boxes, gt_count,
                        iou_threshold=0.5) -> dict[str, float]:
  """ILSVRC's localisation error: {"top1_loc_error", "top5_loc_error"} (fractions).

  Image i's guess g (class GUESS_CLASSES [N, k], box GUESS_BOXES [N, k, 4]) is correct
  when its class is LABELS[i] and its box has IoU > IOU_THRESHOLD with one of the
  image's ground-truth boxes GT_BOXES[i, :GT_COUNT[i]]. Top-1 judges guess 0, top-5
  any of the first min(5, k) guesses (with k = 1 both are the same).
  """
  labels, gt_count = np.asarray(labels).reshape(-1), np.asarray(gt_count).reshape(-1)
  if not len(labels):
    raise ValueError("localization_errors: no images to judge.")
  guess_classes = np.asarray(guess_classes).reshape(len(labels), -1)
  guess_boxes = np.asarray(guess_boxes, np.float64).reshape(len(labels), -1, 4)
  gt_boxes = np.asarray(gt_boxes, np.float64)
  overlaps = iou(guess_boxes[:, :, None, :], gt_boxes[:, None, :, :])  # [N, k, K]
  real = np.arange(gt_boxes.shape[1])[None, None, :] < gt_count[:, None, None]
  boxes_ok = np.any((overlaps > iou_threshold) & real, axis=2)
  correct = boxes_ok & (guess_classes == labels[:, None])
  return {"top1_loc_error": float(1 - correct[:, 0].mean()),
          "top5_loc_error": float(1 - correct[:, :5].any(axis=1).mean())}


# ---------------------------------------------------------------- regression head


def euclidean_loss(pred, target, weight=None):
  """Caffe's Euclidean loss: sum_i weight_i * ||pred_i - target_i||^2 / (2 sum(weight)).

  PRED, TARGET [..., 4] (or any last axis), WEIGHT [...] (ones when None). 0 when every
  weight is 0, with finite gradients then too.
  """
  squared = jnp.sum(jnp.square(jnp.asarray(pred) - jnp.asarray(target)), axis=-1)
  weight = (jnp.ones_like(squared) if weight is None
            else jnp.asarray(weight, squared.dtype))
  total = jnp.sum(weight)
  denominator = jnp.where(total > 0, 2 * total, 1.0)
  return jnp.sum(weight * squared) / denominator


def class_boxes(outputs, labels):
  """The box of class LABELS [N] from a per-class regression's OUTPUTS [N, ..., 4C]
  (class c's box at 4c:4c+4): [N, ..., 4]. A single-class regression's OUTPUTS
  [N, ..., 4] are returned as they are. Works on dense maps [N, h, w, 4C] too."""
  if outputs.shape[-1] == 4:
    return outputs
  if outputs.shape[-1] % 4:
    raise ValueError(f"class_boxes: outputs of width {outputs.shape[-1]}, not 4 per "
                     "class.")
  xp = _xp(outputs, labels)
  per_class = outputs.reshape(outputs.shape[:-1] + (outputs.shape[-1] // 4, 4))
  index = xp.asarray(labels).reshape((-1,) + (1,) * (per_class.ndim - 1))
  return xp.take_along_axis(per_class, index.astype(np.int32), axis=-2)[..., 0, :]
