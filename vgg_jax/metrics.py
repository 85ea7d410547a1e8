"""The paper's measures of a classifier (section 4): cross-entropy, top-1 and top-5
error, and the confusion matrix. Pure functions of logits (or posteriors) and labels,
on jax or numpy arrays, used by training's steps and by evaluation."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax


def cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
  """Softmax cross-entropy [N] of integer LABELS [N] under LOGITS [N, classes]."""
  return optax.softmax_cross_entropy_with_integer_labels(logits, labels)


def correct_top_k(scores: jax.Array, labels: jax.Array, k: int) -> jax.Array:
  """1.0 where the label is among the k highest scores (ties and NaNs count against)."""
  label_scores = jnp.take_along_axis(scores, labels[:, None], axis=-1)
  higher = jnp.sum(scores > label_scores, axis=-1)
  finite = jnp.all(jnp.isfinite(scores), axis=-1)  # NaN compares false: a diverged
  return ((higher < k) & finite).astype(jnp.float32)  # net would seem always right


def confusion_matrix(logits: jax.Array, labels: jax.Array,
                     weights: jax.Array) -> jax.Array:
  """Counts [true class, predicted class] of the examples, each counted WEIGHTS times
  (1 for real examples, 0 for padding)."""
  num_classes = logits.shape[-1]
  true = jax.nn.one_hot(labels, num_classes) * weights[:, None]
  predicted = jax.nn.one_hot(jnp.argmax(logits, -1), num_classes)
  return true.T @ predicted


# The measures of a classifier's training and validation steps (the softmax objective).


def classification_loss(logits: jax.Array, batch: dict) -> tuple[jax.Array, dict]:
  """(mean cross-entropy, {'top1': accuracy}) of a training batch."""
  loss = cross_entropy(logits, batch["label"]).mean()
  return loss, {"top1": correct_top_k(logits, batch["label"], 1).mean()}


def classification_sums(logits: jax.Array, batch: dict) -> dict:
  """Sums over the real (unmasked) examples of a validation batch, and its confusion."""
  mask, labels = batch["mask"], batch["label"]
  sums = dict(loss=cross_entropy(logits, labels), top1=correct_top_k(logits, labels, 1),
              top5=correct_top_k(logits, labels, 5), count=jnp.ones_like(mask))
  sums = {k: jnp.sum(v * mask) for k, v in sums.items()}
  sums["confusion"] = confusion_matrix(logits, labels, mask)
  return sums


def classification_summary(totals: dict) -> dict:
  """Loss, top-1 and top-5 error from the summed `classification_sums` of a split."""
  count = float(totals["count"])
  return dict(loss=float(totals["loss"]) / count,
              top1_error=1.0 - float(totals["top1"]) / count,
              top5_error=1.0 - float(totals["top5"]) / count, examples=int(count))
