"""Appendix A at demo scale: SCR vs PCR, FC layers vs all layers, centre crop vs dense.

  python -m experiments.localization --workdir=runs/localization

1. writes the data (experiments/localization_data.py: 12,000 training and 1,000
   validation images, Fashion-MNIST objects pasted onto crops of real photos, with
   their boxes) unless it is there;
2. trains the classification net (configs/demo_localization.py:classifier);
3. trains the four localisation nets from it (scr_fc, scr_all, pcr_fc, pcr_all: every
   layer but fc8 copied);
4. evaluates them with both protocols (`vgg_jax.localize`): the centre crop with the
   ground-truth class, then dense application at Q = 40 and 64 with greedy merging,
   rated by the classifier, each net alone and all four fused;
5. writes the table (localization_table.md and .json, with the classifier's error and
   the times) to experiments/results/localization/.

Every step resumes (a finished run is not trained again).
"""

from __future__ import annotations

import argparse
import os
import time

from absl import logging

from configs import demo_localization
from experiments import localization_data
from vgg_jax import checkpointing
from vgg_jax import localize
from vgg_jax import main as main_lib

SCALES = (40, 64)
RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                       "localization")
LOCALIZATION_NETS = ("scr_fc", "scr_all", "pcr_fc", "pcr_all")


def train(variant: str, workdir: str, data_dir: str) -> float:
  """Trains one variant of configs/demo_localization.py; returns the seconds taken."""
  config = demo_localization.get_config(variant)
  config.dataset = f"boxes:{data_dir}"
  if variant != "classifier":
    config.init_from.checkpoint = os.path.join(workdir, "classifier")
  start = time.time()
  if checkpointing.read_final_eval(os.path.join(workdir, variant)) is None:
    main_lib.run(config, os.path.join(workdir, variant))
  return time.time() - start


def run(workdir: str, data_dir: str, results_dir: str = RESULTS) -> str:
  """The whole experiment; returns the table's markdown."""
  times = {}
  start = time.time()
  if not os.path.exists(os.path.join(data_dir, "val.csv")):
    localization_data.write(data_dir, num_train=12_000, num_val=1_000, seed=0)
  times["data"] = time.time() - start
  for variant in ("classifier",) + LOCALIZATION_NETS:
    times[variant] = train(variant, workdir, data_dir)
  start = time.time()
  nets = [localize.load_localization_net(os.path.join(workdir, v))
          for v in LOCALIZATION_NETS]
  classifier = localize.load_classifier(os.path.join(workdir, "classifier"), nets[0])
  rows = localize.localization_table(nets, classifier, SCALES, "val")
  times["evaluation"] = time.time() - start
  classification = checkpointing.read_final_eval(os.path.join(workdir, "classifier"))
  about = dict(dataset="the demo's validation images", split="val",
               classifier_top1_error=classification["top1_error"],
               classifier_top5_error=classification["top5_error"],
               seconds={k: round(v) for k, v in times.items()})
  return localize.write_table(results_dir, rows, about)


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--workdir", default="runs/localization")
  parser.add_argument("--data_dir", default="data/localization")
  parser.add_argument("--results_dir", default=RESULTS)
  args = parser.parse_args()
  logging.set_verbosity(logging.WARNING)
  print(run(args.workdir, args.data_dir, args.results_dir))


if __name__ == "__main__":
  main()
