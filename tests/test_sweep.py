"""Sweeps (vgg_jax.sweep) and their reports (vgg_jax.report).

Expansion and validation are pure and fast; one tiny two-trial sweep trains for real
on a folder of random images, is interrupted, resumed and skipped; the report is built
from metric files written here.
"""

import dataclasses
import json
import os
import shlex
import sys

from absl import flags
from ml_collections import config_flags
import numpy as np
import pytest

from vgg_jax import input_pipeline
from vgg_jax import report
from vgg_jax import sweep
from vgg_jax import train

import test_train  # pylint: disable=g-bad-import-order  (tests/ is on sys.path)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# A net A of width 1/16 and fc 16 on 48 images (image_folder): 3 steps of 16, an epoch.
TINY_BASE = dict(
    model="A", width=1 / 16, fc_width=16, init="he", eval_split="val", channels=1, crop_size=32, train_scale_min=32,
    train_scale_max=32, eval_scale=32, color_shift_std=0.0, mean_rgb="imagenet",
    normalize_std=True,  # (raw pixels with He init diverge)
    shuffle_buffer=64, batch_size=16, num_epochs=1.0, log_every_steps=1,
    checkpoint_every_steps=2, keep_checkpoints=2)


def tiny_sweep(dataset="mnist", **fields):
  base = {**TINY_BASE, "dataset": dataset}
  return sweep.Sweep(**{**dict(config="configs/default.py", base=base,
                               trials=[dict(group="A")], seeds=(0, 1)), **fields})


def test_depth_vs_filter_size_expands_to_the_paper_nets_times_three_seeds():
  s = sweep.load_sweep(os.path.join(REPO, "experiments", "depth_vs_filter_size.py"))
  trials = sweep.expand(s)
  groups = ["A", "A-LRN", "B", "C", "D", "E", "B-5x5", "B filter 5", "B filter 7"]
  assert [t.group for t in trials] == [g for g in groups for _ in range(3)]
  assert [t.seed for t in trials] == [0, 1, 2] * len(groups)
  assert trials[0] == sweep.Trial("A-s0", "A", {"model": "A"}, 0)
  assert trials[20] == sweep.Trial("B-5x5-s2", "B-5x5", {"model": "B-5x5"}, 2)
  assert trials[-1] == sweep.Trial("B_filter_7-s2", "B filter 7",
                                   {"model": "B", "filter_size": 7}, 2)
  assert trials[21].overrides == {"model": "B", "filter_size": 5}
  assert len({t.name for t in trials}) == 27
  assert s.config == "configs/demo.py" and s.base["num_epochs"] == 1.0


def test_lr_wd_sweep_expands_to_the_grid():
  s = sweep.load_sweep(os.path.join(REPO, "experiments", "lr_wd_sweep.py"))
  trials = sweep.expand(s)
  assert [(t.overrides["learning_rate"], t.overrides["weight_decay"]) for t in trials] == [
      (lr, wd) for lr in (0.005, 0.02, 0.05) for wd in (0.0, 5e-4, 5e-3)]
  assert trials[4].name == "learning_rate=0.02_weight_decay=0.0005-s0"
  assert trials[4].group == "learning_rate=0.02 weight_decay=0.0005"
  assert {t.seed for t in trials} == {0}


@pytest.mark.parametrize("name", ["depth_vs_filter_size.py", "lr_wd_sweep.py",
                                  "depth_with_more_epochs.py"])
def test_experiment_configs_are_valid(name, tmp_path):
  s = sweep.load_sweep(os.path.join(REPO, "experiments", name))
  prepared = sweep.prepare(s, str(tmp_path))
  assert len(prepared) == len(sweep.expand(s))
  trial, config = prepared[-1]
  assert config.seed == trial.seed and config.num_epochs == s.base["num_epochs"]
  for key, value in trial.overrides.items():
    assert config[key] == value


def test_list_and_grid_expand_together_with_seeds():
  trials = sweep.expand(dict(trials=[dict(group="base"), dict(name="deep", model="E")],
                             grid={"plateau.patience": [1, 2]}, seeds=(3, 4)))
  assert [(t.name, t.seed) for t in trials] == [
      ("base-s3", 3), ("base-s4", 4), ("deep-s3", 3), ("deep-s4", 4),
      ("plateau.patience=1-s3", 3), ("plateau.patience=1-s4", 4),
      ("plateau.patience=2-s3", 3), ("plateau.patience=2-s4", 4)]
  assert trials[2].group == "model='E'" and trials[2].overrides == {"model": "E"}
  assert trials[-1].overrides == {"plateau.patience": 2}
  with pytest.raises(ValueError, match="unique"):
    sweep.expand(dict(trials=[dict(group="x"), dict(group="x")]))


@pytest.mark.parametrize("fields, message", [
    (dict(grid={"learning_rate": 0.1}), r"grid\['learning_rate'\] = 0.1 is not a "
                                        r"non-empty list"),
    (dict(seeds=3), "seeds = 3 is not a non-empty list of integers"),
    (dict(seeds=()), r"seeds = \(\) is not a non-empty list"),
])
def test_a_malformed_sweep_is_named(fields, message):
  with pytest.raises(ValueError, match=message):
    sweep.expand(fields)


def test_a_group_of_fields_is_set_field_by_field(tmp_path):
  s = tiny_sweep(base={**TINY_BASE, "plateau": {"patience": 3}})
  with pytest.raises(ValueError, match=r"'plateau' is a group of fields: set them one "
                     r"by one with dotted keys, e.g. 'plateau\."):
    sweep.prepare(s, str(tmp_path))


def test_trial_names_stay_inside_the_workdir():
  names = [t.name for t in sweep.expand(dict(trials=[dict(name="../x/y", model="A")]))]
  assert names == [".._x_y-s0"]  # one directory name, not a path


def count_train_calls(monkeypatch):
  calls = []
  real = train.train_and_evaluate

  def counting(config, workdir, **kwargs):
    calls.append(os.path.basename(workdir))
    return real(config, workdir, **kwargs)
  monkeypatch.setattr(train, "train_and_evaluate", counting)
  return calls


@pytest.mark.parametrize("trial, message", [
    (dict(group="typo", **{"plateau.patiense": 1}), "plateau.patiense"),
    (dict(group="typo", **{"platoo.patience": 1}), "platoo"),
    (dict(group="typo", learning_rat=0.1), "learning_rat"),
    (dict(group="type", model=3), "model"),
    (dict(group="value", filter_size=4), "filter_size"),
    (dict(group="data", crop_size=64, train_scale_min=48),  # (data fields, checked too)
     "S must be at least the crop size"),
])
def test_a_bad_override_raises_before_any_trial_starts(trial, message, tmp_path,
                                                       monkeypatch):
  calls = count_train_calls(monkeypatch)
  s = tiny_sweep(trials=[dict(group="fine"), trial])  # the bad trial comes second
  with pytest.raises(ValueError, match=message):
    sweep.run(s, str(tmp_path))
  assert calls == [] and not os.path.exists(tmp_path / "fine-s0")
  with pytest.raises(ValueError, match=message):
    sweep.write_commands(s, str(tmp_path), str(tmp_path / "commands.sh"))


Crash = test_train.Crash


def image_folder(root):
  """root/{train,val}/class_{0,1}/*.png of random 28x28 gray images."""
  return test_train.write_random_image_folder(root, (("train", 48), ("val", 16)), 2)


def test_tiny_sweep_runs_skips_finished_and_resumes_interrupted(tmp_path, monkeypatch):
  workdir = str(tmp_path / "sweep")
  s = tiny_sweep(dataset="folder:" + image_folder(str(tmp_path / "images")))
  real_batches = input_pipeline.train_batches
  starts = []

  def batches(config, *, seed, start_step, crash=None):
    starts.append((f"A-s{seed}", start_step))   # the trials differ by their seed
    for i, batch in enumerate(real_batches(config, seed=seed, start_step=start_step)):
      if crash is not None and i == crash:
        raise Crash()
      yield batch

  calls = count_train_calls(monkeypatch)
  # First run: trial A-s0 is killed after 2 of its 3 steps (checkpointed at step 2;
  # batches are read prefetch_to_device ahead of the step); A-s1 still runs, and the
  # sweep then reports the failure.
  monkeypatch.setattr(input_pipeline, "train_batches", lambda c, **kw: batches(
      c, crash=2 + c.prefetch_to_device if kw["seed"] == 0 else None, **kw))
  with pytest.raises(RuntimeError, match=r"1 of 2 trials failed .*\n  A-s0: Crash"):
    sweep.run(s, workdir)
  assert calls == ["A-s0", "A-s1"]
  assert os.path.exists(os.path.join(workdir, "A-s1", "final_eval.json"))
  assert not os.path.exists(os.path.join(workdir, "A-s0", "final_eval.json"))
  text = report.write_report(workdir)
  assert "| A | 1/2 |" in text and "| A-s0 | A | 0 | 2 | failed | failed |" in text
  assert "- A-s0: Crash" in text

  # Second run: A-s1 is skipped, A-s0 resumes from step 2 and finishes.
  monkeypatch.setattr(input_pipeline, "train_batches", batches)
  calls.clear()
  starts.clear()
  results = sweep.run(s, workdir)
  assert calls == ["A-s0"] and starts == [("A-s0", 2)]
  assert results["A-s0"]["step"] == 3
  assert not os.path.exists(os.path.join(workdir, "A-s0", sweep.FAILED_FILE))

  # Third run: nothing left to do.
  calls.clear()
  assert sweep.run(s, workdir) == {} and calls == []

  for name, seed in (("A-s0", 0), ("A-s1", 1)):
    with open(os.path.join(workdir, name, "config.json")) as f:
      assert json.load(f)["seed"] == seed
    with open(os.path.join(workdir, name, "trial.json")) as f:
      assert json.load(f) == dict(name=name, group="A", overrides={}, seed=seed)
  with open(os.path.join(workdir, "sweep.json")) as f:
    assert [t["name"] for t in json.load(f)["trials"]] == ["A-s0", "A-s1"]

  text = report.write_report(workdir)
  assert "| A | 2/2 | 11 | 3x3 |" in text
  for name in report.REPORT_FILES:
    assert os.path.getsize(os.path.join(workdir, name)) > 0

  # A changed sweep does not silently reuse the runs.
  with pytest.raises(ValueError, match="learning_rate"):
    sweep.run(dataclasses.replace(s, base={**s.base, "learning_rate": 0.5}), workdir)


def test_write_commands_are_runnable_by_main(tmp_path, monkeypatch):
  s = tiny_sweep(trials=[dict(group="B 5", model="B", filter_size=5),
                         dict(group="patient", **{"plateau.patience": 7},
                              random_flip=False)],
                 seeds=(0, 2))
  workdir = str(tmp_path / "runs")
  path = str(tmp_path / "commands.sh")
  lines = sweep.write_commands(s, workdir, path)
  with open(path) as f:
    assert f.read().splitlines() == lines
  trials = sweep.expand(s)
  assert len(lines) == len(trials) == 4
  monkeypatch.chdir(REPO)
  for line, trial in zip(lines, trials):
    words = shlex.split(line)
    assert words[:4] == ["cd", REPO, "&&", "python"]
    argv = words[3:]
    assert argv[1:3] == ["-m", "vgg_jax.main"]
    flag_values = flags.FlagValues()
    flags.DEFINE_string("workdir", None, "", flag_values=flag_values)
    config_flags.DEFINE_config_file("config", None, "", flag_values=flag_values,
                                    lock_config=True)
    monkeypatch.setattr(sys, "argv", ["main"] + argv[3:])  # config_flags reads it
    flag_values(sys.argv)
    assert flag_values.workdir == os.path.join(workdir, trial.name)
    assert flag_values.config.to_dict() == sweep.trial_config(s, trial).to_dict()
  assert flag_values.config.plateau.patience == 7 and not flag_values.config.random_flip
  assert os.path.exists(os.path.join(workdir, "B_5-s0", "trial.json"))


def write_trial(root, name, group, seed, *, model="A", filter_size=None, top1=None,
                top5=None, evals=()):
  """A trial directory as the sweep leaves it: trial.json, config.json, metrics.jsonl
  (records 10 s apart) and, when finished, final_eval.json."""
  trial_dir = os.path.join(root, name)
  os.makedirs(trial_dir)
  config = sweep.load_base_config(sweep.Sweep(config="configs/demo.py"))
  config.update(dict(model=model, filter_size=filter_size, seed=seed, num_classes=10))
  with open(os.path.join(trial_dir, "config.json"), "w") as f:
    f.write(config.to_json_best_effort())
  with open(os.path.join(trial_dir, "trial.json"), "w") as f:
    json.dump(dict(name=name, group=group, seed=seed, overrides={}), f)
  records = [dict(step=50 * (i + 1), time=1000.0 + 10 * i, train_loss=1.0 / (i + 1))
             for i in range(4)]
  records += [dict(step=100 * (i + 1), time=1000.0 + 20 * i + 10, eval_top1_error=e,
                   epoch=0.5 * (i + 1)) for i, e in enumerate(evals)]
  records.sort(key=lambda r: (r["step"], r["time"]))
  with open(os.path.join(trial_dir, "metrics.jsonl"), "w") as f:
    f.writelines(json.dumps(r) + "\n" for r in records)
  if top1 is not None:
    with open(os.path.join(trial_dir, "final_eval.json"), "w") as f:
      json.dump(dict(top1_error=top1, top5_error=top5, examples=10000, loss=0.3,
                     confusion=np.eye(10).tolist()), f)


def test_report_tables_and_plots_from_metric_files(tmp_path):
  root = str(tmp_path)
  write_trial(root, "A-s0", "A", 0, top1=0.10, top5=0.01, evals=(0.2, 0.1))
  write_trial(root, "A-s1", "A", 1, top1=0.12, top5=0.03, evals=(0.25, 0.12))
  write_trial(root, "B_filter_7-s0", "B filter 7", 0, model="B", filter_size=7,
              top1=0.09, top5=0.005, evals=(0.15, 0.09))
  write_trial(root, "B_filter_7-s1", "B filter 7", 1, model="B", filter_size=7)
  with open(os.path.join(root, sweep.SWEEP_FILE), "w") as f:  # the sweep's order
    json.dump(dict(trials=[dict(name=n) for n in ("B_filter_7-s0", "B_filter_7-s1",
                                                   "A-s0", "A-s1")]
                   + [dict(name="A-s2", group="A", seed=2),  # planned, not started
                      dict(name="C-s0", group="C", seed=0)]), f)
  text = report.write_report(root, title="depth")
  assert text.index("| B filter 7 |") < text.index("| A |")  # not name order
  params_a = report.summary.count_params_from_spec(
      "A", image_size=32, channels=1, num_classes=10, width=3 / 16, fc_width=256)
  macs_b7 = report.summary.count_macs(
      "B", image_size=32, channels=1, num_classes=10, width=3 / 16, filter_size=7,
      fc_width=256)
  assert (f"| A | 2/3 | 11 | 3x3 | 11.00 ± 1.41 | 2.00 ± 1.41 | {params_a:,} |"
          in text), text
  assert "| C | 0/1 | – | – | – | – | – | – | – |" in text
  assert "| C-s0 | C | 0 | 0 | not started | not started |" in text
  assert "| B filter 7 | 1/2 | 13 | 7x7 | 9.00 | 0.50 | " in text
  assert f"{macs_b7:,} | 0.5 |" in text  # 30 s of records: 0.5 min
  assert "| B_filter_7-s1 | B filter 7 | 1 | 200 | unfinished |" in text
  with open(os.path.join(root, "report.md")) as f:
    assert f.read() == text
  for name in report.REPORT_FILES:
    assert os.path.getsize(os.path.join(root, name)) > 500, name


def test_wall_time_leaves_out_restarts():
  records = [dict(step=1, time=0.0), dict(step=2, time=5.0), dict(step=3, time=9.0),
             dict(step=2, time=500.0), dict(step=3, time=503.0)]
  assert report.wall_time(records) == 12.0
