"""PNG figures of a run: learning curves and the confusion matrix."""

from __future__ import annotations

import os
from typing import Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
import numpy as np


LEARNING_CURVES_FILE = "learning_curves.png"
CONFUSION_MATRIX_FILE = "confusion_matrix.png"


def plot_run(workdir: str, records: Sequence[dict], confusion: np.ndarray | None, *,
             class_names: Sequence[str] | None = None, title: str = "") -> None:
  """A finished run's figures in WORKDIR: its learning curves (from RECORDS, the
  metrics.jsonl records) and the confusion matrix of its last evaluation (a
  classifier's; a localisation net has none)."""
  plot_learning_curves(records, os.path.join(workdir, LEARNING_CURVES_FILE), title=title)
  if confusion is not None:
    plot_confusion_matrix(confusion, os.path.join(workdir, CONFUSION_MATRIX_FILE),
                          class_names=class_names, title=title)


def series(records: Sequence[dict], key: str) -> tuple[np.ndarray, np.ndarray]:
  """(steps, values) of one metric, in step order, the last write of a step winning."""
  points = {r["step"]: r[key] for r in records if key in r}
  steps = np.array(sorted(points))
  return steps, np.array([points[s] for s in steps])


def plot_learning_curves(records: Sequence[dict], png_path: str, title: str = "") -> None:
  """Training loss, validation errors (top-1/top-5, or a localisation net's) and the
  learning rate against steps."""
  fig, (ax_loss, ax_err, ax_lr) = plt.subplots(1, 3, figsize=(14, 4))
  for key, label in [("train_loss", "train"), ("eval_loss", "validation")]:
    steps, values = series(records, key)
    ax_loss.plot(steps, values, label=label, marker="." if key == "eval_loss" else None)
  ax_loss.set(xlabel="step", ylabel="cross-entropy (or Euclidean)", title="loss")
  ax_loss.legend()
  for key, label in [("train_top1", "train top-1"), ("eval_top1_error", "val top-1"),
                     ("eval_top5_error", "val top-5"),
                     ("eval_loc_error", "val localisation")]:
    steps, values = series(records, key)
    if key == "train_top1":
      values = 1 - values
    ax_err.plot(steps, 100 * values, label=label, marker="." if "eval" in key else None)
  ax_err.set(xlabel="step", ylabel="error (%)", title="error")
  ax_err.legend()
  steps, values = series(records, "train_learning_rate")
  ax_lr.semilogy(steps, values)
  ax_lr.set(xlabel="step", ylabel="learning rate", title="learning rate (plateau drops)")
  if title:
    fig.suptitle(title)
  fig.tight_layout()
  fig.savefig(png_path, dpi=100)
  plt.close(fig)


def plot_confusion_matrix(confusion: np.ndarray, png_path: str,
                          class_names: Sequence[str] | None = None,
                          title: str = "") -> None:
  """Row-normalised confusion matrix [true, predicted]; counts written when small."""
  confusion = np.asarray(confusion)
  num_classes = confusion.shape[0]
  rates = confusion / np.maximum(confusion.sum(axis=1, keepdims=True), 1)
  size = min(4 + 0.6 * num_classes, 20)
  fig, ax = plt.subplots(figsize=(size, size))
  ax.imshow(rates, cmap="Blues", vmin=0, vmax=1)
  if num_classes <= 20:
    names = list(class_names) if class_names else [str(i) for i in range(num_classes)]
    ax.set_xticks(range(num_classes), names, rotation=45, ha="right")
    ax.set_yticks(range(num_classes), names)
    for i in range(num_classes):
      for j in range(num_classes):
        ax.text(j, i, int(confusion[i, j]), ha="center", va="center", fontsize=8,
                color="white" if rates[i, j] > 0.5 else "black")
  accuracy = np.trace(confusion) / max(confusion.sum(), 1)
  ax.set(xlabel="predicted", ylabel="true",
         title=(title + " " if title else "") + f"accuracy {100 * accuracy:.2f}%")
  fig.tight_layout()
  fig.savefig(png_path, dpi=100)
  plt.close(fig)
