"""What training and validation measure of a localisation net (appendix A).

A localisation net is a classification net whose fc8 regresses boxes
(`models.num_outputs`): one box (centre x, centre y, width, height, in units of the crop
side) for all classes (SCR), or one per class (PCR). Its loss is the Euclidean loss on
the box; with PCR only the ground-truth class's box is penalised. Its validation is the
paper's first test protocol: the box of the ground-truth class on the centre crop,
correct when it overlaps one of the image's ground-truth boxes with IoU > 0.5.

Pure functions of the net's outputs and a batch of `input_pipeline` (its 'box' target
and 'box_weight'; on validation also 'boxes', 'box_count', 'factor', 'offset', 'mask'),
used inside the jitted steps of `vgg_jax.train`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from vgg_jax import boxes as boxes_lib


def crop_box(outputs: jax.Array, labels: jax.Array) -> jax.Array:
  """The predicted box [N, 4] (centre-size, crop units) of each crop's ground-truth
  class (PCR), or the one box (SCR)."""
  return boxes_lib.class_boxes(outputs, labels)


def train_loss(outputs: jax.Array, batch: dict) -> tuple[jax.Array, dict]:
  """(Euclidean loss, {'box_hit': share of the crops whose box has IoU > 0.5 with the
  target}) of a training batch."""
  predicted = crop_box(outputs, batch["label"])
  weight = batch["box_weight"]
  loss = boxes_lib.euclidean_loss(predicted, batch["box"], weight)
  hit = _overlaps(predicted, batch["box"]) * weight
  return loss, {"box_hit": jnp.sum(hit) / jnp.maximum(jnp.sum(weight), 1.0)}


def eval_sums(outputs: jax.Array, batch: dict, *, crop_size: int) -> dict:
  """Sums over the real examples of a validation batch: the loss terms, the crops
  localised correctly (the first protocol) and the count."""
  predicted = crop_box(outputs, batch["label"])
  mask, weight = batch["mask"], batch["box_weight"] * batch["mask"]
  squared = 0.5 * jnp.sum((predicted - batch["box"]) ** 2, axis=-1)
  correct = boxes_lib.box_correct(
      source_boxes(predicted, batch["factor"], batch["offset"], crop_size),
      batch["boxes"], batch["box_count"])
  return dict(loss=jnp.sum(squared * weight), loss_weight=jnp.sum(weight),
              correct=jnp.sum(correct * mask), count=jnp.sum(mask))


def summary(totals: dict) -> dict:
  """Validation metrics from the summed `eval_sums` of a split."""
  count = float(totals["count"])
  return dict(loss=float(totals["loss"]) / max(float(totals["loss_weight"]), 1.0),
              loc_error=1.0 - float(totals["correct"]) / count, examples=int(count))


def source_boxes(predicted: jax.Array, factor: jax.Array, offset: jax.Array,
                 crop_size: int) -> jax.Array:
  """Boxes predicted on crops (centre-size, crop units; [N, ..., 4]) in source pixels
  (xmin, ymin, xmax, ymax), for crops at OFFSET [N, 2] of images rescaled by FACTOR
  [N, 2] (both (y, x); `transforms.rescaled_crop_and_geometry`)."""
  shape = (-1,) + (1,) * (predicted.ndim - 2)  # per image, over any positions
  per_image = lambda pair: (pair[:, 0].reshape(shape), pair[:, 1].reshape(shape))
  return boxes_lib.from_crop_frame(
      boxes_lib.from_center_size(predicted * crop_size), factor=per_image(factor),
      offset=per_image(offset), crop_size=crop_size, flipped=False)


def _overlaps(a: jax.Array, b: jax.Array) -> jax.Array:
  """IoU > 0.5 of two centre-size boxes, elementwise (float 0/1)."""
  iou = boxes_lib.iou(boxes_lib.from_center_size(a), boxes_lib.from_center_size(b))
  return (iou > 0.5).astype(jnp.float32)
