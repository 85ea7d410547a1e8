"""Runs a sweep of trials (section 4's tables): `python -m vgg_jax.sweep
--sweep=experiments/depth_vs_filter_size.py --workdir=DIR`.

A sweep file under experiments/ defines `get_sweep()` returning a `Sweep` (or a dict of
its fields): a base config file, overrides shared by every trial, and the trials, as a
list and/or a grid of config overrides (dotted names such as "plateau.patience"), each
run with every seed. `expand` turns it into `Trial`s; every override is checked against
the base config before any trial starts. Each trial runs as `python -m vgg_jax.main`
would run it (`main.run`) in DIR/<trial name>; running the command again skips finished
trials and resumes unfinished ones from their checkpoints.

  --dry_run           print the trials and stop
  --write_commands=F  write one `python -m vgg_jax.main ...` command per trial to F
                      (for a cluster scheduler) instead of training
  --only=SUBSTRING    only the trials whose name contains SUBSTRING

`python -m vgg_jax.report --sweep_dir=DIR` then tabulates and plots the results.
"""

from __future__ import annotations

import copy
import dataclasses
import importlib.util
import itertools
import json
import os
import re
import shlex
import sys
from typing import Any, Mapping, Sequence

from absl import app
from absl import flags
from absl import logging
import ml_collections

from vgg_jax import checkpointing
from vgg_jax import cli
from vgg_jax import config_checks
from vgg_jax import main as main_lib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRIAL_FILE = "trial.json"      # name, group, seed, overrides of the trial in its dir
SWEEP_FILE = "sweep.json"      # the expanded sweep, in the sweep's workdir
FAILED_FILE = "failed.json"    # in a trial's dir: the error that stopped its last attempt


@dataclasses.dataclass(frozen=True)
class Sweep:
  """A sweep: `config` (a config file, relative to the repo root) with `base` overrides
  shared by all trials, then `trials` (a list of override dicts, each with an optional
  "group" and "name") and/or `grid` (field -> values, every combination a trial), each
  run once per seed in `seeds`."""
  config: str = "configs/demo.py"
  base: Mapping[str, Any] = dataclasses.field(default_factory=dict)
  trials: Sequence[Mapping[str, Any]] = ()
  grid: Mapping[str, Sequence[Any]] = dataclasses.field(default_factory=dict)
  seeds: Sequence[int] = (0,)


@dataclasses.dataclass(frozen=True)
class Trial:
  """One run of a sweep: DIR/<name>, config = base config + sweep.base + overrides +
  seed. Trials of one `group` differ only in their seed."""
  name: str
  group: str
  overrides: dict
  seed: int


def slug(text: str) -> str:
  """A name safe for a directory: "B filter 7" -> "B_filter_7"."""
  return re.sub(r"[^A-Za-z0-9.=,+-]+", "_", text).strip("_")


def _format(value: Any) -> str:
  return repr(value) if isinstance(value, str) else str(value)


def expand(sweep: Sweep | Mapping[str, Any]) -> list[Trial]:
  """The trials of a sweep: each listed trial, then each grid point, times each seed.

  A listed trial's group is its "group" entry, else its overrides written out; a grid
  point's group is its values written out ("learning_rate=0.01 weight_decay=0.0005").
  Names are `slug(group)-s<seed>`. Pure: reads no config and runs nothing.
  """
  sweep = as_sweep(sweep)
  points = []
  for entry in sweep.trials:
    overrides = {k: v for k, v in entry.items() if k not in ("group", "name")}
    group = entry.get("group") or " ".join(f"{k}={_format(v)}"
                                           for k, v in overrides.items()) or "base"
    points.append((group, slug(entry.get("name") or group), overrides))
  if sweep.grid:
    keys = list(sweep.grid)
    for values in itertools.product(*(sweep.grid[k] for k in keys)):
      overrides = dict(zip(keys, values))
      group = " ".join(f"{k}={_format(v)}" for k, v in overrides.items())
      points.append((group, slug(group), overrides))
  if not points:
    points.append(("base", "base", {}))
  trials = [Trial(name=f"{name}-s{seed}", group=group, overrides=dict(overrides),
                  seed=int(seed))
            for group, name, overrides in points for seed in sweep.seeds]
  names = [t.name for t in trials]
  duplicates = sorted({n for n in names if names.count(n) > 1})
  if duplicates:
    raise ValueError(f"Trial names must be unique; repeated: {duplicates}. Give the "
                     f"trials distinct 'group' or 'name' entries.")
  return trials


def as_sweep(sweep: Sweep | Mapping[str, Any]) -> Sweep:
  if isinstance(sweep, Sweep):
    return sweep
  unknown = set(sweep) - {f.name for f in dataclasses.fields(Sweep)}
  if unknown:
    raise ValueError(f"Unknown sweep entries {sorted(unknown)}; a sweep has "
                     f"{[f.name for f in dataclasses.fields(Sweep)]}.")
  sweep = Sweep(**sweep)
  problems = [f"grid[{k!r}] = {v!r} is not a non-empty list of values"
              for k, v in sweep.grid.items() if not _is_nonempty_list(v)]
  if not _is_nonempty_list(sweep.seeds) or not all(
      isinstance(seed, int) for seed in sweep.seeds):
    problems.append(f"seeds = {sweep.seeds!r} is not a non-empty list of integers")
  if problems:
    raise ValueError("Bad sweep: " + "; ".join(problems) + ".")
  return sweep


def _is_nonempty_list(value: Any) -> bool:
  return isinstance(value, (list, tuple)) and len(value) > 0


def _import_file(path: str, module_name: str, what: str):
  """Imports the Python file PATH (a sweep or config file) as a module."""
  spec = importlib.util.spec_from_file_location(module_name, path)
  if spec is None or not os.path.exists(path):
    raise ValueError(f"{what} {path!r} does not exist or cannot be imported.")
  module = importlib.util.module_from_spec(spec)
  if REPO not in sys.path:  # sweep and config files import configs/ from the repo root
    sys.path.insert(0, REPO)
  spec.loader.exec_module(module)
  return module


def load_sweep(path: str) -> Sweep:
  """Imports a sweep file and returns its `get_sweep()`."""
  module_name = "_sweep_" + slug(os.path.splitext(os.path.basename(path))[0])
  sweep = _import_file(path, module_name, "The sweep file").get_sweep()
  if not isinstance(sweep, (Sweep, Mapping)):
    raise ValueError(f"{path}: get_sweep() must return a Sweep or a dict, not "
                     f"{type(sweep).__name__}.")
  return as_sweep(sweep)


def config_path(sweep: Sweep) -> str:
  """The absolute path of the sweep's base config file (given relative to the repo)."""
  return sweep.config if os.path.isabs(sweep.config) else os.path.join(REPO, sweep.config)


def load_base_config(sweep: Sweep) -> ml_collections.ConfigDict:
  return _import_file(config_path(sweep), "_sweep_base_config",
                      "The sweep's base config").get_config()


def set_field(config: ml_collections.ConfigDict, key: str, value: Any) -> None:
  """config.<key> = value for a dotted key; ValueError naming an unknown field or a
  value of the wrong type (ConfigDict semantics: no new fields, types kept)."""
  node, parts = config, key.split(".")
  for i, part in enumerate(parts[:-1]):
    if not isinstance(node, ml_collections.ConfigDict) or part not in node:
      raise ValueError(f"Unknown config field {key!r}: there is no "
                       f"{'.'.join(parts[:i + 1])!r} in the base config.")
    node = node[part]
  if not isinstance(node, ml_collections.ConfigDict) or parts[-1] not in node:
    raise ValueError(f"Unknown config field {key!r}: not in the base config.")
  if isinstance(node[parts[-1]], ml_collections.ConfigDict):  # would drop its others
    raise ValueError(f"Config field {key!r} is a group of fields: set them one by one "
                     f"with dotted keys, e.g. {key + '.' + next(iter(node[parts[-1]]))!r}.")
  try:
    node[parts[-1]] = value
  except (TypeError, KeyError, AttributeError) as e:
    raise ValueError(f"Config field {key!r} cannot take {value!r}: {e}") from e


def trial_overrides(sweep: Sweep, trial: Trial) -> dict[str, Any]:
  """Every field a trial sets on the base config: the sweep's shared overrides, the
  trial's own, and its seed."""
  return {**sweep.base, **trial.overrides, "seed": trial.seed}


def trial_config(sweep: Sweep, trial: Trial,
                 base: ml_collections.ConfigDict | None = None
                 ) -> ml_collections.ConfigDict:
  """The base config with the sweep's shared overrides, the trial's and its seed."""
  config = load_base_config(sweep) if base is None else copy.deepcopy(base)
  for key, value in trial_overrides(sweep, trial).items():
    try:
      set_field(config, key, value)
    except ValueError as e:
      raise ValueError(f"Trial {trial.name}: {e}") from e
  return config


def workdir_conflicts(trial_dir: str, config: ml_collections.ConfigDict) -> list[str]:
  """How TRIAL_DIR/config.json differs from CONFIG (empty: same, or no run yet)."""
  stored = checkpointing.read_config(trial_dir)
  if stored is None:
    return []
  return [f"{k}: {a!r} in the workdir, {b!r} in the sweep" for k, a, b in
          checkpointing.config_differences(
              stored, json.loads(config.to_json_best_effort()))]


def is_finished(trial_dir: str) -> bool:
  """Whether the trial's run has ended (prepare() has already checked its config)."""
  return checkpointing.read_final_eval(trial_dir) is not None


def prepare(sweep: Sweep, workdir: str, only: str | None = None
            ) -> list[tuple[Trial, ml_collections.ConfigDict]]:
  """Expands and validates every trial (configs built, checked by
  `config_checks.validate_config`, compared with runs already in WORKDIR) before
  anything runs."""
  base = load_base_config(sweep)
  prepared = []
  for trial in expand(sweep):
    config = trial_config(sweep, trial, base)
    try:
      config_checks.validate_config(config)
    except ValueError as e:
      raise ValueError(f"Trial {trial.name}: {e}") from e
    if only and only not in trial.name:
      continue
    differ = workdir_conflicts(os.path.join(workdir, trial.name), config)
    if differ:
      raise ValueError(
          f"{os.path.join(workdir, trial.name)} holds a run of another config ("
          + "; ".join(differ) + "). Remove it or use a new --workdir.")
    prepared.append((trial, config))
  return prepared


def write_sweep_file(sweep: Sweep, workdir: str) -> None:
  """WORKDIR/sweep.json: the base config, shared overrides and every planned trial, in
  order (the report lists the trials not yet started from it)."""
  os.makedirs(workdir, exist_ok=True)
  with open(os.path.join(workdir, SWEEP_FILE), "w") as f:
    json.dump(dict(config=sweep.config, base=dict(sweep.base),
                   trials=[dataclasses.asdict(t) for t in expand(sweep)]), f, indent=2)


def write_trial_file(trial_dir: str, trial: Trial) -> None:
  os.makedirs(trial_dir, exist_ok=True)
  with open(os.path.join(trial_dir, TRIAL_FILE), "w") as f:
    json.dump(dataclasses.asdict(trial), f, indent=2)


def run(sweep: Sweep, workdir: str, only: str | None = None) -> dict[str, dict]:
  """Trains every trial not yet finished; returns {trial name: final metrics} of the
  trials trained now (finished ones are skipped: read their final_eval.json).

  A trial that fails (a diverged learning rate, say) does not stop the others: its
  error goes to TRIAL_DIR/failed.json and the report, the remaining trials run, and
  then RuntimeError names the failed ones. Running the sweep again retries them.
  """
  prepared = prepare(sweep, workdir, only)
  write_sweep_file(sweep, workdir)
  results, failed = {}, {}
  for i, (trial, config) in enumerate(prepared):
    trial_dir = os.path.join(workdir, trial.name)
    if is_finished(trial_dir):
      logging.info("Trial %d/%d %s: finished, skipped.", i + 1, len(prepared), trial.name)
      continue
    logging.info("Trial %d/%d %s: %s", i + 1, len(prepared), trial.name, trial.overrides)
    write_trial_file(trial_dir, trial)
    failed_path = os.path.join(trial_dir, FAILED_FILE)
    try:
      results[trial.name] = main_lib.run(config, trial_dir)
    except Exception as e:  # pylint: disable=broad-exception-caught (reported below)
      failed[trial.name] = f"{type(e).__name__}: {e}"
      logging.exception("Trial %s failed; going on with the others.", trial.name)
      with open(failed_path, "w") as f:
        json.dump(dict(error=failed[trial.name]), f, indent=2)
      continue
    if os.path.exists(failed_path):  # an earlier attempt's error
      os.remove(failed_path)
  if failed:
    raise RuntimeError(f"{len(failed)} of {len(prepared)} trials failed (run the sweep "
                       f"again to retry them):\n" + "\n".join(
                           f"  {name}: {error}" for name, error in failed.items()))
  return results


def _flag_value(value: Any) -> str:
  if isinstance(value, bool):
    return "true" if value else "false"
  if isinstance(value, (list, tuple)):
    return "(" + ",".join(_flag_value(v) for v in value) + ("," if len(value) == 1 else "")
  return str(value)


def command(sweep: Sweep, trial: Trial, workdir: str) -> str:
  """The shell command that trains TRIAL alone: `cd REPO && python -m vgg_jax.main
  --config=<base config> --workdir=WORKDIR/<trial> --config.<field>=<value> ...`."""
  args = ["python", "-m", "vgg_jax.main", f"--config={sweep.config}",
          f"--workdir={os.path.abspath(os.path.join(workdir, trial.name))}"]
  for key, value in trial_overrides(sweep, trial).items():
    if value is None:
      raise ValueError(f"Trial {trial.name}: {key}=None cannot be set on a command line.")
    args.append(f"--config.{key}={_flag_value(value)}")
  return f"cd {shlex.quote(REPO)} && " + " ".join(shlex.quote(a) for a in args)


def write_commands(sweep: Sweep, workdir: str, path: str, only: str | None = None
                   ) -> list[str]:
  """Writes one command per trial to PATH (after validating all of them)."""
  prepared = prepare(sweep, workdir, only)
  lines = [command(sweep, trial, workdir) for trial, _ in prepared]
  write_sweep_file(sweep, workdir)
  for trial, _ in prepared:  # the report reads each trial's group from its dir
    write_trial_file(os.path.join(workdir, trial.name), trial)
  with open(path, "w") as f:
    f.write("".join(line + "\n" for line in lines))
  return lines


def trials_table(trials: Sequence[Trial]) -> str:
  """The trial list as text: name, group, seed, overrides."""
  width = max([len(t.name) for t in trials] + [4])
  gwidth = max([len(t.group) for t in trials] + [5])
  lines = [f"{'name':<{width}}  {'group':<{gwidth}}  seed  overrides"]
  for t in trials:
    overrides = " ".join(f"{k}={_format(v)}" for k, v in t.overrides.items())
    lines.append(f"{t.name:<{width}}  {t.group:<{gwidth}}  {t.seed:>4}  {overrides}")
  return "\n".join(lines)


FLAGS = flags.FLAGS


def define_flags(flag_values: flags.FlagValues = FLAGS) -> None:
  """The command-line flags (defined only when run as a program)."""
  flags.DEFINE_string("sweep", None, "A sweep file, e.g. experiments/lr_wd_sweep.py.",
                      flag_values=flag_values)
  flags.DEFINE_string("workdir", None, "The sweep's directory; each trial in a subdir.",
                      flag_values=flag_values)
  flags.DEFINE_bool("dry_run", False, "Print the trials (after validating them) and "
                    "stop.", flag_values=flag_values)
  flags.DEFINE_string("write_commands", None, "Write one training command per trial to "
                      "this file instead of training.", flag_values=flag_values)
  flags.DEFINE_string("only", None, "Only the trials whose name contains this.",
                      flag_values=flag_values)


def main(argv: Sequence[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  if not FLAGS.sweep or not FLAGS.workdir:
    raise app.UsageError("--sweep and --workdir are required.")
  sweep = load_sweep(FLAGS.sweep)
  if FLAGS.dry_run:
    prepared = prepare(sweep, FLAGS.workdir, FLAGS.only)
    print(f"{len(prepared)} trials of {FLAGS.sweep} (base config {sweep.config}, "
          f"shared overrides {dict(sweep.base)}):")
    print(trials_table([t for t, _ in prepared]))
    return
  if FLAGS.write_commands:
    lines = write_commands(sweep, FLAGS.workdir, FLAGS.write_commands, FLAGS.only)
    print(f"Wrote {len(lines)} commands to {FLAGS.write_commands}.")
    return
  run(sweep, FLAGS.workdir, FLAGS.only)


if __name__ == "__main__":
  # Run through the imported module, so that sweep files share its Sweep class.
  from vgg_jax import sweep as _sweep  # pylint: disable=g-import-not-at-top
  _sweep.define_flags()
  cli.run(_sweep.main)
