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
