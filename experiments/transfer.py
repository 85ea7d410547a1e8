"""Appendix B at demo scale: a frozen net's features on classes and data it never saw.

The demo's net (configs/demo.py: net A at 3/16 width, fc6/fc7 of 256, 32x32 crops) is
trained on five Fashion-MNIST classes (T-shirt/top, Trouser, Pullover, Dress, Coat) and
frozen. Its descriptors (`vgg_jax.features`: dense fc7 or fc6, global average pooling,
flip averaging, scales averaged or stacked, L2 normalisation) feed linear SVMs
(`vgg_jax.linear_probe`, C by 3-fold cross-validation) on two targets:
  * the other five Fashion-MNIST classes (Sandal, Shirt, Sneaker, Bag, Ankle boot),
    with 50 and with 1,000 training images per class, tested on their 5,000 test images;
  * scikit-learn's 1,797 real 8x8 handwritten digits (another dataset, another
    resolution), split half and half, stratified.
Against: the same SVMs on raw pixels (L2-normalised), and on the features of the same
net at its random initialisation (the parameters its training started from).

  python -m experiments.transfer --workdir=runs/transfer

writes the table to experiments/results/transfer/README.md (and results.json). The
class subsets are written as image folders under WORKDIR/data (Debian's
dataset-fashion-mnist package, or --manual_dir with its four IDX files). Measured: 9
minutes on 2 CPU cores (2 of them training); the table: experiments/results/transfer/.
"""

from __future__ import annotations

import json
import os
import time
from typing import Sequence

from absl import app
from absl import flags
from absl import logging
import jax
import ml_collections
import numpy as np
from PIL import Image

from configs import demo
from vgg_jax import checkpointing
from vgg_jax import cli
from vgg_jax import datasets
from vgg_jax import fashion_mnist
from vgg_jax import features
from vgg_jax import linear_probe
from vgg_jax import main as main_lib
from vgg_jax import surgery

SOURCE_CLASSES = (0, 1, 2, 3, 4)   # the net learns these
TARGET_CLASSES = (5, 6, 7, 8, 9)   # its features classify these
FEW_PER_CLASS = 50
TARGET_TRAIN_PER_CLASS = 1000
# Descriptor settings compared: (name, layer, scales, aggregation).
SETTINGS = (("fc7, Q=32", "fc7", (32,), "average"),
            ("fc6, Q=32", "fc6", (32,), "average"),
            ("fc7, Q=32,64 averaged", "fc7", (32, 64), "average"),
            ("fc7, Q=32,64 stacked", "fc7", (32, 64), "stack"))


# -------------------------------------------------------------------- the data


def write_folder(root: str, splits: dict, class_names: Sequence[str]) -> None:
  """ROOT/<split>/<class>/<i>.png from {split: (uint8 images [N, h, w], labels)}."""
  if os.path.exists(os.path.join(root, "complete")):
    return
  for split, (images, labels) in splits.items():
    for name in class_names:
      os.makedirs(os.path.join(root, split, name), exist_ok=True)
    for i, (image, label) in enumerate(zip(images, labels)):
      Image.fromarray(image).save(os.path.join(root, split, class_names[label],
                                               f"{i:05d}.png"))
  open(os.path.join(root, "complete"), "w").close()


def fashion_splits(directory: str, classes: Sequence[int], train_per_class=None) -> dict:
  """{split: (images [N, 28, 28], labels 0..len(classes)-1)} of CLASSES."""
  out = {}
  for split in ("train", "test"):
    images, labels = fashion_mnist.load_split(directory, split)
    keep = np.isin(labels, classes)
    if split == "train" and train_per_class:
      keep &= _first_per_class(labels, train_per_class)
    out[split] = images[keep, ..., 0], np.searchsorted(classes, labels[keep])
  return out


def _first_per_class(labels: np.ndarray, n: int) -> np.ndarray:
  rank = np.zeros(len(labels), int)
  for c in np.unique(labels):
    rank[labels == c] = np.arange(np.sum(labels == c))
  return rank < n


def digits_splits() -> dict:
  """scikit-learn's 8x8 digits (0..16 levels) as uint8 images, split half and half."""
  from sklearn import datasets as sk_datasets  # pylint: disable=g-import-not-at-top
  from sklearn import model_selection  # pylint: disable=g-import-not-at-top
  digits = sk_datasets.load_digits()
  images = np.round(digits.images * 255 / 16).astype(np.uint8)
  train, test = model_selection.train_test_split(
      np.arange(len(images)), test_size=0.5, stratify=digits.target, random_state=0)
  return {"train": (images[train], digits.target[train]),
          "test": (images[test], digits.target[test])}


# -------------------------------------------------------------------- the nets


def train_source_net(data_root: str, workdir: str, epochs: float) -> ml_collections.ConfigDict:
  """The demo's net trained on SOURCE_CLASSES (skipped when WORKDIR has finished)."""
  config = demo.get_config()
  config.update(dict(dataset=f"folder:{data_root}", eval_split="test", num_classes=5,
                     num_epochs=epochs, eval_every_steps=None,
                     checkpoint_every_steps=1000, final_eval_protocols=""))
  if checkpointing.read_final_eval(workdir) is None:
    main_lib.run(config, workdir)
  return config


def save_initialisation(trained: str, output: str) -> None:
  """The trained run's net as it started: its config and the parameters its seed drew,
  with the trained run's input normalisation."""
  if checkpointing.has_checkpoint(output):
    return
  frozen = checkpointing.read_config(trained)
  config = checkpointing.frozen_config(frozen)
  _, meta = checkpointing.load_params(trained)
  params = surgery.fresh_params(config, frozen["num_classes"])
  checkpointing.save_params(output, params, dict(
      step=0, model=meta["model"], num_classes=meta["num_classes"], seed=config.seed,
      normalization=meta["normalization"]))
  checkpointing.write_config(output, json.dumps(frozen))


def data_config(net_dir: str, data_root: str) -> ml_collections.ConfigDict:
  """The net's own config, reading another image folder."""
  values = dict(checkpointing.read_config(net_dir), dataset=f"folder:{data_root}",
                train_split="train", eval_split="test", num_classes=None)
  return ml_collections.ConfigDict(values)


# ------------------------------------------------------------------ the probes


def feature_rows(net_dir: str, net_name: str, targets: dict, out_dir: str) -> list[dict]:
  """Probe rows of every SETTINGS for NET_DIR's features of each target."""
  rows = []
  for target, (root, subsets) in targets.items():
    config = data_config(net_dir, root)
    for name, layer, scales, aggregation in SETTINGS:
      paths = {split: features.extract(
          config, [net_dir], out_dir, layer=layer, scales=scales, aggregation=aggregation,
          split=split, batch_size=128) for split in ("train", "test")}
      train, test = (features.read_features(paths[s]) for s in ("train", "test"))
      for subset, keep in subsets(train[1]).items():
        rows.append(dict(target=target, train=subset,
                         descriptors=f"{net_name} net, {name}",
                         **linear_probe.probe(train[0][keep], train[1][keep], test[0],
                                              test[1])))
  return rows


def pixel_rows(targets: dict, data: dict) -> list[dict]:
  """Probe rows of the raw pixels (scaled to 0..1, L2-normalised)."""
  rows = []
  for target, (_, subsets) in targets.items():
    (train_x, train_y), (test_x, test_y) = (
        (features.l2_normalize(x.reshape(len(x), -1) / 255.0), y)
        for x, y in (data[target]["train"], data[target]["test"]))
    for subset, keep in subsets(train_y).items():
      rows.append(dict(target=target, train=subset, descriptors="raw pixels",
                       **linear_probe.probe(train_x[keep], train_y[keep], test_x,
                                            test_y)))
  return rows


def markdown(rows: Sequence[dict]) -> str:
  """The table: a block of rows per target and training set."""
  lines = ["| target | training images | descriptors | dim | C | accuracy (%) | "
           "mean class recall (%) | mAP (%) |", "|---|---|---|---|---|---|---|---|"]
  for r in rows:
    lines.append(f"| {r['target']} | {r['train']} | {r['descriptors']} | {r['dim']} | "
                 f"{r['c']:g} | {100 * r['accuracy']:.2f} | "
                 f"{100 * r['mean_class_recall']:.2f} | {100 * r['map']:.2f} |")
  return "\n".join(lines) + "\n"


def write_results(results_dir: str, rows: list[dict], about: dict) -> None:
  """RESULTS_DIR/README.md (the table, its command and times) and results.json."""
  order = {(t, s): i for i, (t, s) in enumerate(dict.fromkeys(
      (r["target"], r["train"]) for r in rows))}
  rows = sorted(rows, key=lambda r: order[r["target"], r["train"]])
  os.makedirs(results_dir, exist_ok=True)
  with open(os.path.join(results_dir, "results.json"), "w") as f:
    json.dump(dict(about, rows=rows), f, indent=2)
  text = [
      "# Transfer features at demo scale (appendix B)", "",
      "Written by `experiments/transfer.py` (its docstring says what it does):", "",
      "```bash", "python -m experiments.transfer --workdir=runs/transfer", "```", "",
      f"The source net: {about['net']}, trained for {about['epochs']:g} epochs on the "
      f"{about['source_train']:,} training images of Fashion-MNIST's classes "
      f"{', '.join(about['source_classes'])}: {100 * about['source_accuracy']:.2f}% "
      f"top-1 on their {about['source_test']:,} test images. Then frozen.", "",
      f"Linear SVMs (one-vs-rest, C from {', '.join(map(str, linear_probe.C_GRID))} by "
      f"{linear_probe.FOLDS}-fold cross-validation on the training descriptors), tested "
      "on every test image of the target. Fashion-MNIST 5-9: "
      f"{', '.join(about['target_classes'])}; digits: scikit-learn's 1,797 8x8 "
      "images, half for training (stratified).", "",
      markdown(rows),
      f"Wall time on {about['cores']} CPU cores: {about['seconds']['total']:.0f} s "
      f"(data {about['seconds']['data']:.0f} s, training {about['seconds']['train']:.0f} "
      f"s, features and SVMs {about['seconds']['probes']:.0f} s).", ""]
  with open(os.path.join(results_dir, "README.md"), "w") as f:
    f.write("\n".join(text))


# -------------------------------------------------------------------- command


def run(workdir: str, results_dir: str, *, epochs: float, manual_dir: str | None) -> None:
  """Data, source net, its initialisation, features, probes, table (see the docstring)."""
  start = time.perf_counter()
  seconds = {}
  directory = manual_dir or fashion_mnist.DEBIAN_DIR
  if not fashion_mnist.has_files(directory):
    raise ValueError(f"Fashion-MNIST's IDX files are not in {directory}: "
                     f"{fashion_mnist.INSTALL_COMMAND}, or give --manual_dir.")
  names = [n.replace("/", "-") for n in fashion_mnist.CLASS_NAMES]
  data = {"Fashion-MNIST 5-9": fashion_splits(directory, TARGET_CLASSES,
                                              TARGET_TRAIN_PER_CLASS),
          "digits": digits_splits()}
  source = fashion_splits(directory, SOURCE_CLASSES)
  roots = {k: os.path.join(workdir, "data", k.split()[0].lower()) for k in data}
  write_folder(os.path.join(workdir, "data", "source"), source,
               [names[c] for c in SOURCE_CLASSES])
  write_folder(roots["Fashion-MNIST 5-9"], data["Fashion-MNIST 5-9"],
               [names[c] for c in TARGET_CLASSES])
  write_folder(roots["digits"], data["digits"], [str(d) for d in range(10)])
  seconds["data"] = time.perf_counter() - start

  trained, initial = os.path.join(workdir, "trained"), os.path.join(workdir, "initial")
  config = train_source_net(os.path.join(workdir, "data", "source"), trained, epochs)
  save_initialisation(trained, initial)
  seconds["train"] = time.perf_counter() - start - seconds["data"]

  few = f"{FEW_PER_CLASS} per class"
  targets = {
      "Fashion-MNIST 5-9": (roots["Fashion-MNIST 5-9"], lambda y: {
          few: _first_per_class(y, FEW_PER_CLASS),
          f"{TARGET_TRAIN_PER_CLASS} per class": np.ones(len(y), bool)}),
      "digits": (roots["digits"], lambda y: {f"{len(y)} (half)": np.ones(len(y), bool)})}
  out = os.path.join(workdir, "features")
  rows = pixel_rows(targets, data)
  rows += feature_rows(initial, "initial", targets, out)
  rows += feature_rows(trained, "trained", targets, out)
  seconds["probes"] = time.perf_counter() - start - seconds["data"] - seconds["train"]
  seconds["total"] = time.perf_counter() - start
  final = checkpointing.read_final_eval(trained)
  write_results(results_dir, rows, dict(
      net=f"net A at width {config.width:g}, fc6/fc7 of {config.fc_width}",
      epochs=epochs, source_classes=[names[c] for c in SOURCE_CLASSES],
      target_classes=[names[c] for c in TARGET_CLASSES],
      source_train=len(source["train"][1]), source_test=len(source["test"][1]),
      source_accuracy=1 - final["top1_error"], cores=datasets.usable_cores(),
      seconds={k: round(v, 1) for k, v in seconds.items()}))
  logging.info("Table written to %s:\n%s", results_dir, markdown(rows))


def main(argv: Sequence[str]) -> None:
  """The experiment, from flags."""
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  FLAGS = flags.FLAGS
  run(FLAGS.workdir, FLAGS.results_dir, epochs=FLAGS.epochs, manual_dir=FLAGS.manual_dir)


if __name__ == "__main__":
  flags.DEFINE_string("workdir", "runs/transfer", "Data folders, nets and features.")
  flags.DEFINE_string("results_dir", "experiments/results/transfer", "Where the table "
                      "goes.")
  flags.DEFINE_float("epochs", 2.0, "Training epochs of the source net.")
  flags.DEFINE_string("manual_dir", None, "A folder with Fashion-MNIST's IDX files "
                      "(default: Debian's).")
  jax.config.config_with_absl()
  cli.run(main)
