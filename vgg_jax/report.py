"""Tables and plots of a finished sweep: `python -m vgg_jax.report --sweep_dir=DIR`.

Reads every trial directory of DIR (made by `vgg_jax.sweep`: trial.json, config.json,
metrics.jsonl, final_eval.json) and writes into DIR:
  report.md            a row per trial group (mean ± std over seeds of the final top-1
                       and top-5 error, parameters, multiply-adds, wall time), then a
                       row per trial
  error_vs_depth.png   top-1 error against weight layers, one point per group
  error_vs_filter_size.png  top-1 error against the conv filter size
  learning_curves.png  validation top-1 error against epochs, every trial overlaid
Unfinished trials (no final_eval.json: still running, failed, or not started) are
listed with their state but left out of the means.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from typing import Sequence

from absl import app
from absl import flags
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
import numpy as np

from vgg_jax import checkpointing
from vgg_jax import cli
from vgg_jax import models
from vgg_jax import plots
from vgg_jax import summary
from vgg_jax import sweep


@dataclasses.dataclass
class TrialResult:
  """What the report needs of one trial directory."""
  name: str
  group: str
  seed: int
  config: dict | None  # None: not started
  records: list
  final: dict | None  # final_eval.json; None while unfinished
  error: str | None = None  # failed.json: why its last attempt stopped

  @property
  def finished(self) -> bool:
    return self.final is not None

  @property
  def state(self) -> str:
    if self.finished:
      return "finished"
    if self.config is None:
      return "not started"
    return "failed" if self.error else "unfinished"


def wall_time(records: Sequence[dict]) -> float:
  """Seconds of training from the metrics.jsonl timestamps: the sum of the gaps between
  consecutive records, leaving out the gap over a restart (where the step goes back or
  stays). The time to the first record (start-up, compilation) is not counted. A
  restart that resumes past the last logged step cannot be told apart from a slow
  interval, so its downtime is counted."""
  total = 0.0
  for previous, record in zip(records, records[1:]):
    if "time" in previous and "time" in record and record["step"] > previous["step"]:
      total += max(0.0, record["time"] - previous["time"])
  return total


def read_trial(trial_dir: str) -> TrialResult | None:
  """A trial directory's files; None if it holds no run (no config.json)."""
  config = checkpointing.read_config(trial_dir)
  if config is None:
    return None
  name = os.path.basename(os.path.normpath(trial_dir))
  trial_path = os.path.join(trial_dir, sweep.TRIAL_FILE)
  if os.path.exists(trial_path):
    with open(trial_path) as f:
      trial = json.load(f)
  else:  # a run not made by the sweep: its name without the seed suffix
    trial = dict(group=re.sub(r"-s\d+$", "", name), seed=config.get("seed", 0))
  records = checkpointing.read_metrics(trial_dir)
  final = checkpointing.read_final_eval(trial_dir)
  error = None
  if final is None and os.path.exists(os.path.join(trial_dir, sweep.FAILED_FILE)):
    with open(os.path.join(trial_dir, sweep.FAILED_FILE)) as f:
      error = json.load(f)["error"]
  return TrialResult(name=name, group=trial["group"], seed=int(trial["seed"]),
                     config=config, records=records, final=final, error=error)


def read_sweep(sweep_dir: str) -> list[TrialResult]:
  """Every trial under SWEEP_DIR: in the sweep's order (its sweep.json, whose trials
  without a run yet are listed as not started), then any other run directories in name
  order."""
  planned = []
  sweep_file = os.path.join(sweep_dir, sweep.SWEEP_FILE)
  if os.path.exists(sweep_file):
    with open(sweep_file) as f:
      planned = json.load(f)["trials"]
  rank = {t["name"]: i for i, t in enumerate(planned)}
  entries = sorted(os.listdir(sweep_dir), key=lambda e: (rank.get(e, len(rank)), e))
  trials = []
  for entry in entries:
    path = os.path.join(sweep_dir, entry)
    if os.path.isdir(path):
      trial = read_trial(path)
      if trial is not None:
        trials.append(trial)
  started = {t.name for t in trials}
  trials += [TrialResult(name=t["name"], group=t["group"], seed=int(t.get("seed", 0)),
                         config=None, records=[], final=None)
             for t in planned if t["name"] not in started]
  return sorted(trials, key=lambda t: rank.get(t.name, len(rank)))  # stable


def net_stats(config: dict) -> dict:
  """Weight layers, largest filter size, parameters and multiply-adds of a run's net."""
  specs = models.layer_specs(config["model"], width=config["width"],
                             filter_size=config.get("filter_size"))
  convs = [s for s in specs if isinstance(s, models.ConvSpec)]
  totals = summary.run_totals(config)
  return dict(weight_layers=len(convs) + len(models.HEAD),
              filter_size=max(s.filter_size for s in convs),
              params=totals.params, macs=totals.macs)


@dataclasses.dataclass
class GroupRow:
  group: str
  trials: list
  finished: list
  stats: dict | None  # None while no trial of the group has started

  def errors(self, key: str) -> np.ndarray:
    return np.array([100 * t.final[key] for t in self.finished])


def group_rows(trials: Sequence[TrialResult]) -> list[GroupRow]:
  """Trials gathered by group, in order of first appearance."""
  rows: dict[str, GroupRow] = {}
  for t in trials:
    if t.group not in rows:
      rows[t.group] = GroupRow(t.group, [], [], None)
    row = rows[t.group]
    row.trials.append(t)
    if row.stats is None and t.config is not None:
      row.stats = net_stats(t.config)
    if t.finished:
      row.finished.append(t)
  return list(rows.values())


def seed_std(values: np.ndarray) -> float:
  """The sample standard deviation over seeds (ddof=1); 0 for a single seed."""
  return float(np.std(values, ddof=1)) if len(values) > 1 else 0.0


def mean_std(values: np.ndarray) -> str:
  """"12.34 ± 0.56" (sample std over seeds), "12.34" for one value, "–" for none."""
  if len(values) == 0:
    return "–"
  if len(values) == 1:
    return f"{values[0]:.2f}"
  return f"{np.mean(values):.2f} ± {seed_std(values):.2f}"


def _minutes(seconds: float) -> str:
  return f"{seconds / 60:.1f}"


def markdown(rows: Sequence[GroupRow], title: str = "") -> str:
  """The report's text: a table of groups, then a table of trials."""
  lines = [f"# {title or 'Sweep report'}", "",
           "Final validation error (%) of each trial (`final_eval.json`), mean ± std "
           "over seeds; wall time from `metrics.jsonl` (training and validation, "
           "without start-up), mean per trial.", "",
           "| group | seeds | weight layers | filter | top-1 error (%) | top-5 error (%) "
           "| parameters | multiply-adds | wall time (min) |",
           "|---|---|---|---|---|---|---|---|---|"]
  for row in rows:
    seeds = f"{len(row.finished)}/{len(row.trials)}"
    times = [wall_time(t.records) for t in row.finished]
    stats = row.stats
    net = (f"{stats['weight_layers']} | {stats['filter_size']}x{stats['filter_size']}"
           if stats else "– | –")
    size = f"{stats['params']:,} | {stats['macs']:,}" if stats else "– | –"
    lines.append(
        f"| {row.group} | {seeds} | {net} | {mean_std(row.errors('top1_error'))} | "
        f"{mean_std(row.errors('top5_error'))} | {size} | "
        f"{_minutes(np.mean(times)) if times else '–'} |")
  lines += ["", "## Trials", "",
            "| trial | group | seed | step | top-1 error (%) | top-5 error (%) "
            "| examples | wall time (min) |", "|---|---|---|---|---|---|---|---|"]
  for row in rows:
    for t in row.trials:
      step = max((r["step"] for r in t.records), default=0)
      if t.finished:
        lines.append(f"| {t.name} | {t.group} | {t.seed} | {step} | "
                     f"{100 * t.final['top1_error']:.2f} | "
                     f"{100 * t.final['top5_error']:.2f} | {t.final.get('examples', '–')} "
                     f"| {_minutes(wall_time(t.records))} |")
      else:
        lines.append(f"| {t.name} | {t.group} | {t.seed} | {step} | {t.state} | "
                     f"{t.state} | – | {_minutes(wall_time(t.records))} |")
  failures = [t for row in rows for t in row.trials if t.state == "failed"]
  if failures:
    lines += ["", "Failed trials (the error that stopped each):", ""]
    lines += [f"- {t.name}: {t.error.splitlines()[0][:300]}" for t in failures]
  return "\n".join(lines) + "\n"


def plot_error_vs(rows: Sequence[GroupRow], stat: str, xlabel: str, png_path: str,
                  title: str = "") -> None:
  """Mean top-1 error (with the seeds' std as error bars) against a net statistic."""
  fig, ax = plt.subplots(figsize=(6, 4.5))
  for row in rows:
    errors = row.errors("top1_error")
    if len(errors) == 0:  # (so the row's stats are known)
      continue
    x = row.stats[stat]
    ax.errorbar([x], [np.mean(errors)], yerr=[seed_std(errors)], fmt="o", capsize=3)
    ax.annotate(row.group, (x, np.mean(errors)), textcoords="offset points",
                xytext=(5, 5), fontsize=8)
  ax.set(xlabel=xlabel, ylabel="top-1 error (%)", title=title)
  ax.grid(alpha=0.3)
  fig.tight_layout()
  fig.savefig(png_path, dpi=100)
  plt.close(fig)


def plot_learning_curves(rows: Sequence[GroupRow], png_path: str,
                         title: str = "") -> None:
  """Validation top-1 error and training loss of every trial, a colour per group."""
  fig, (ax_err, ax_loss) = plt.subplots(1, 2, figsize=(12, 4.5))
  colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
  for i, row in enumerate(rows):
    colour = colours[i % len(colours)]
    for j, t in enumerate(row.trials):
      label = row.group if j == 0 else None
      steps, errors = plots.series(t.records, "eval_top1_error")
      if len(steps):
        _, epochs = plots.series(t.records, "epoch")
        x = epochs if len(epochs) == len(steps) else steps
        ax_err.plot(x, 100 * errors, color=colour, marker=".", alpha=0.8, label=label)
      steps, losses = plots.series(t.records, "train_loss")
      if len(steps):
        ax_loss.plot(steps, losses, color=colour, alpha=0.8, label=label)
  ax_err.set(xlabel="epoch", ylabel="validation top-1 error (%)", title="validation")
  ax_loss.set(xlabel="step", ylabel="cross-entropy", title="training loss")
  for ax in (ax_err, ax_loss):
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
      ax.legend(fontsize=8)
  if title:
    fig.suptitle(title)
  fig.tight_layout()
  fig.savefig(png_path, dpi=100)
  plt.close(fig)


REPORT_FILES = ("report.md", "error_vs_depth.png", "error_vs_filter_size.png",
                "learning_curves.png")


def write_report(sweep_dir: str, title: str = "") -> str:
  """Writes report.md and the three plots into SWEEP_DIR; returns the markdown."""
  if not os.path.isdir(sweep_dir):
    raise FileNotFoundError(f"No sweep directory {sweep_dir!r}: give the --workdir of a "
                            f"vgg_jax.sweep run.")
  trials = read_sweep(sweep_dir)
  if not trials:
    raise ValueError(f"No trials (directories with a config.json, or a sweep.json) in "
                     f"{sweep_dir!r}.")
  title = title or f"Sweep {os.path.basename(os.path.normpath(sweep_dir))}"
  rows = group_rows(trials)
  text = markdown(rows, title)
  with open(os.path.join(sweep_dir, "report.md"), "w") as f:
    f.write(text)
  plot_error_vs(rows, "weight_layers", "weight layers (depth)",
                os.path.join(sweep_dir, "error_vs_depth.png"), title)
  plot_error_vs(rows, "filter_size", "conv filter size",
                os.path.join(sweep_dir, "error_vs_filter_size.png"), title)
  plot_learning_curves(rows, os.path.join(sweep_dir, "learning_curves.png"), title)
  return text


FLAGS = flags.FLAGS


def define_flags(flag_values: flags.FlagValues = FLAGS) -> None:
  flags.DEFINE_string("sweep_dir", None, "The --workdir of a vgg_jax.sweep run.",
                      flag_values=flag_values)
  flags.DEFINE_string("title", "", "Title of the report and plots.",
                      flag_values=flag_values)


def main(argv: Sequence[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  if not FLAGS.sweep_dir:
    raise app.UsageError("--sweep_dir is required.")
  print(write_report(FLAGS.sweep_dir, FLAGS.title))


if __name__ == "__main__":
  define_flags()
  cli.run(main)
