"""Linear classifiers on image descriptors: the classification step of appendix B.

As the paper: a linear SVM per class (one-vs-rest) trained on the target dataset's
descriptors (`vgg_jax.features`), the net left frozen; its C chosen by cross-validation
on the training descriptors. The solver is scikit-learn's (`LinearSVC`, liblinear's
squared-hinge SVM), selected with `GridSearchCV`. Reported on the test descriptors:
accuracy and mean class recall (the paper's Caltech measure) for single-label data, and
per-class average precision and their mean, mAP (the paper's VOC measure), for both
single-label data (a class against the rest) and multi-label data (labels given as a
[images, classes] 0/1 matrix).

  python -m vgg_jax.linear_probe --train=feats/train_fc7_<digest>.npz \
      --test=feats/test_fc7_<digest>.npz

writes its row into probe_table.md and probe_table.json beside the test features (a row
per pair of files; running again replaces it).
"""

from __future__ import annotations

import json
import os
import time
from typing import Sequence

from absl import app
from absl import flags
from absl import logging
import numpy as np
from sklearn import metrics as sk_metrics
from sklearn import model_selection
from sklearn import multiclass
from sklearn import svm

from vgg_jax import cli
from vgg_jax import features as features_lib

C_GRID = (0.01, 0.1, 1.0, 10.0, 100.0, 1000.0)
FOLDS = 3
MAX_ITER = 10_000
TABLE_NAME = "probe_table"


def _check_data(x: np.ndarray, y: np.ndarray, what: str) -> None:
  if x.ndim != 2 or len(x) != len(y) or y.ndim not in (1, 2):
    raise ValueError(f"The {what} set needs descriptors [images, dim] and labels "
                     f"[images] (or [images, classes] for multi-label data); got "
                     f"{x.shape} and {y.shape}.")
  if len(x) == 0:
    raise ValueError(f"The {what} set is empty.")


def fit(x: np.ndarray, y: np.ndarray, *, c_grid: Sequence[float] = C_GRID,
        folds: int = FOLDS, seed: int = 0) -> model_selection.GridSearchCV:
  """One-vs-rest linear SVMs on descriptors X, C chosen by FOLDS-fold cross-validation
  (mean class recall for single-label Y [images]; mAP for multi-label Y [images,
  classes]); refitted on all of X with the best C."""
  _check_data(x, y, "training")
  if not c_grid or min(c_grid) <= 0:
    raise ValueError(f"The grid of C must hold positive numbers, got {list(c_grid)}.")
  if y.ndim == 1:
    counts = np.unique(y, return_counts=True)[1]
    if len(counts) < 2 or counts.min() < 2:
      raise ValueError(f"Cross-validation needs two classes or more with at least two "
                       f"training images each; the smallest class has {counts.min()} and "
                       f"there are {len(counts)}.")
    folds = min(folds, int(counts.min()))
    estimator, grid = svm.LinearSVC(max_iter=MAX_ITER, random_state=seed), {"C": c_grid}
    splitter = model_selection.StratifiedKFold(folds, shuffle=True, random_state=seed)
    scoring = "balanced_accuracy"   # = mean class recall
  else:
    estimator = multiclass.OneVsRestClassifier(
        svm.LinearSVC(max_iter=MAX_ITER, random_state=seed))
    grid = {"estimator__C": c_grid}
    splitter = _multi_label_folds(y, folds, seed)
    scoring = "average_precision"   # macro over classes = mAP
  search = model_selection.GridSearchCV(estimator, grid, scoring=scoring, cv=splitter,
                                        refit=True)
  return search.fit(x, y)


def _multi_label_folds(y: np.ndarray, folds: int, seed: int) -> list:
  """Folds stratified by each image's set of labels, where every set occurs FOLDS
  times or more (so that each fold holds every class); plain shuffled folds otherwise."""
  combination = np.unique(y, axis=0, return_inverse=True)[1].ravel()
  if np.bincount(combination).min() >= folds:
    splitter = model_selection.StratifiedKFold(folds, shuffle=True, random_state=seed)
  else:
    splitter = model_selection.KFold(min(folds, len(y)), shuffle=True, random_state=seed)
  return list(splitter.split(y, combination))


def class_scores(model, x: np.ndarray) -> np.ndarray:
  """Decision values [images, classes] (a two-class SVM's one column made two)."""
  scores = model.decision_function(x)
  return np.stack([-scores, scores], axis=1) if scores.ndim == 1 else scores


def score(model, x: np.ndarray, y: np.ndarray) -> dict:
  """Test measures of a fitted `fit`: per-class AP and mAP; single-label data also
  accuracy, mean class recall and per-class recall (over the classes present in Y)."""
  _check_data(x, y, "test")
  scores = class_scores(model, x)
  classes = np.asarray(model.classes_)
  if y.ndim == 1:
    unknown = sorted(set(np.unique(y).tolist()) - set(classes.tolist()))
    if unknown:
      raise ValueError(f"Test labels {unknown} never occur in the training set.")
    truth = (y[:, None] == classes[None, :]).astype(int)
  else:
    truth = y
  present = truth.sum(axis=0) > 0
  ap = [float(sk_metrics.average_precision_score(truth[:, k], scores[:, k]))
        if present[k] else None for k in range(truth.shape[1])]
  out = dict(per_class_ap=ap, map=float(np.mean([a for a in ap if a is not None])))
  if y.ndim == 1:
    predicted = classes[np.argmax(scores, axis=1)]
    recall = [float(np.mean(predicted[y == c] == c)) if present[k] else None
              for k, c in enumerate(classes)]
    out.update(accuracy=float(np.mean(predicted == y)), per_class_recall=recall,
               mean_class_recall=float(np.mean([r for r in recall if r is not None])))
  return out


def probe(train_x, train_y, test_x, test_y, *, c_grid: Sequence[float] = C_GRID,
          folds: int = FOLDS, seed: int = 0) -> dict:
  """`fit` on the training descriptors, `score` on the test ones; with the chosen C,
  its cross-validation score, the sizes and the seconds taken."""
  start = time.perf_counter()
  search = fit(np.asarray(train_x), np.asarray(train_y), c_grid=c_grid, folds=folds,
               seed=seed)
  result = score(search.best_estimator_, np.asarray(test_x), np.asarray(test_y))
  best_c = search.best_params_.get("C", search.best_params_.get("estimator__C"))
  return dict(result, c=float(best_c), cv_score=float(search.best_score_),
              train_images=len(train_x), test_images=len(test_x), dim=train_x.shape[1],
              seconds=round(time.perf_counter() - start, 3))


# ------------------------------------------------------------------- files, table


def probe_files(train_path: str, test_path: str, *, c_grid: Sequence[float] = C_GRID,
                folds: int = FOLDS, output_dir: str | None = None) -> dict:
  """`probe` on two files of `vgg_jax.features` (images that did not decode left out),
  which must hold the same settings but the split; its row goes into OUTPUT_DIR's
  (default: the test file's folder) probe table."""
  train_x, train_y, train_valid, train_settings = features_lib.read_features(train_path)
  test_x, test_y, test_valid, test_settings = features_lib.read_features(test_path)
  differ = sorted(k for k in set(train_settings) | set(test_settings)
                  if k != "split" and train_settings.get(k) != test_settings.get(k))
  if differ:
    raise ValueError(f"{train_path} and {test_path} are features of different nets or "
                     f"settings ({', '.join(differ)} differ): extract both with the same.")
  result = probe(train_x[train_valid], train_y[train_valid], test_x[test_valid],
                 test_y[test_valid], c_grid=c_grid, folds=folds)
  row = dict(name=describe_settings(test_settings), train=os.path.basename(train_path),
             test=os.path.basename(test_path), class_names=test_settings.get("class_names"),
             **result)
  add_row(output_dir or os.path.dirname(os.path.abspath(test_path)), row)
  return row


def describe_settings(settings: dict) -> str:
  """A short name of features' settings, e.g. "demo fc7 Q=32,64 average flip"."""
  nets = "+".join(os.path.basename(os.path.normpath(p)) for p in settings["checkpoints"])
  scales = ",".join(map(str, settings["scales"]))
  return (f"{nets} {settings['layer']} Q={scales} {settings['aggregation']}"
          f"{' flip' if settings['flip'] else ''}")


def table_markdown(rows: Sequence[dict], title: str = "Linear SVMs on descriptors") -> str:
  """The rows as a markdown table (percentages; '-' where a measure does not apply)."""
  def pct(value):
    return "-" if value is None else f"{100 * value:.2f}"
  lines = [f"### {title}", "",
           "| descriptors | dim | train images | test images | C | accuracy (%) | "
           "mean class recall (%) | mAP (%) |", "|---|---|---|---|---|---|---|---|"]
  for r in rows:
    lines.append(f"| {r['name']} | {r['dim']} | {r['train_images']} | {r['test_images']} "
                 f"| {r['c']:g} | {pct(r.get('accuracy'))} | "
                 f"{pct(r.get('mean_class_recall'))} | {pct(r['map'])} |")
  return "\n".join(lines) + "\n"


def add_row(output_dir: str, row: dict) -> str:
  """Puts ROW into OUTPUT_DIR/probe_table.json (replacing the row of the same pair of
  files) and rewrites probe_table.md; returns the markdown."""
  os.makedirs(output_dir, exist_ok=True)
  json_path = os.path.join(output_dir, TABLE_NAME + ".json")
  rows = []
  if os.path.exists(json_path):
    with open(json_path) as f:
      rows = json.load(f)["rows"]
  rows = [r for r in rows if (r["train"], r["test"]) != (row["train"], row["test"])]
  rows.append(row)
  markdown = table_markdown(rows)
  with open(json_path, "w") as f:
    json.dump(dict(rows=rows), f, indent=2)
  with open(os.path.join(output_dir, TABLE_NAME + ".md"), "w") as f:
    f.write(markdown)
  logging.info("Probe table (%s):\n%s", output_dir, markdown)
  return markdown


# -------------------------------------------------------------------- command


def main(argv: Sequence[str]) -> None:
  """Fits the linear SVMs of --train, scores them on --test, prints the table."""
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  FLAGS = flags.FLAGS
  try:
    c_grid = [float(c) for c in FLAGS.c_grid]
  except ValueError as e:
    raise ValueError(f"--c_grid must be numbers, e.g. 0.01,0.1,1,10; got "
                     f"{','.join(FLAGS.c_grid)}.") from e
  probe_files(FLAGS.train, FLAGS.test, c_grid=c_grid, folds=FLAGS.folds,
              output_dir=FLAGS.output_dir)
  output_dir = FLAGS.output_dir or os.path.dirname(os.path.abspath(FLAGS.test))
  with open(os.path.join(output_dir, TABLE_NAME + ".md")) as f:
    print(f.read())


def _define_flags() -> None:
  flags.DEFINE_string("train", None, "Features of the training split (.npz of "
                      "vgg_jax.features).")
  flags.DEFINE_string("test", None, "Features of the test split, same settings.")
  flags.DEFINE_list("c_grid", [str(c) for c in C_GRID], "The SVM's C values to "
                    "cross-validate.")
  flags.DEFINE_integer("folds", FOLDS, "Cross-validation folds on the training set.")
  flags.DEFINE_string("output_dir", None, "Where the table goes (default: beside --test).")
  flags.mark_flags_as_required(["train", "test"])


if __name__ == "__main__":
  _define_flags()
  cli.run(main)
