"""A run's workdir: its orbax checkpoints (save, resume, read back parameters) and its
other files (the frozen config, the metrics, the final evaluation), with their writers,
readers and checks.

Layout of a workdir:

  WORKDIR/config.json               the frozen config of the run
  WORKDIR/metrics.jsonl             its scalars, a JSON object per line
  WORKDIR/final_eval.json           its last evaluation, once it has finished
  WORKDIR/config_changes.jsonl      config changes a resume made, and the step of each
  WORKDIR/checkpoints/<step>/       the newest few checkpoints (config.keep_checkpoints)
  WORKDIR/checkpoints_best/<step>/  the checkpoint with the best validation accuracy

Every checkpoint has two items: "state" (parameters, optimiser state, step; float32
host arrays) and "meta" (JSON: the plateau controller, the seed, the model's
description, the latest evaluation and the input normalisation). A restart restores
all of it, so the run continues exactly where it stopped; the data position is the step.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any, Iterable, Mapping

from absl import logging
from clu import metric_writers
import jax
from jax.experimental import multihost_utils
import ml_collections
import numpy as np
import orbax.checkpoint as ocp

from configs import default
from vgg_jax import models

LATEST = "checkpoints"
BEST = "checkpoints_best"
DAMAGED = "checkpoints_damaged"
CONFIG_FILE = "config.json"
METRICS_FILE = "metrics.jsonl"
FINAL_EVAL_FILE = "final_eval.json"
CHANGES_FILE = "config_changes.jsonl"


def _manager(directory: str, max_to_keep: int | None, *, create: bool = True,
             barrier_prefix: str | None = None):
  """An orbax CheckpointManager of `directory`.

  Managers that save at the same time in a multi-process run need their own
  `barrier_prefix`: orbax's finalising threads meet at cross-process barriers whose
  names are otherwise the same for every manager, and two managers reaching a barrier
  of the same name at once fail ("Barrier ... is already ongoing") on one process
  while the other waits forever.
  """
  options = ocp.CheckpointManagerOptions(
      max_to_keep=max_to_keep, create=create,
      multiprocessing_options=ocp.options.MultiprocessingOptions(
          barrier_sync_key_prefix=barrier_prefix))
  return ocp.CheckpointManager(os.path.abspath(directory), options=options)


def _restore_newest(manager, args) -> tuple[int | None, Any, list[tuple[int, str]]]:
  """(step, restored items, [(step, error)] of the newer steps that failed) of the newest
  step of MANAGER that restores; (None, None, []) when it has none. Raises ValueError
  naming every step and its error when none restores."""
  failures = []
  for step in sorted(manager.all_steps(), reverse=True):
    try:
      return step, manager.restore(step, args=args), failures
    except Exception as e:  # pylint: disable=broad-except (orbax, tensorstore, OS, JSON)
      error = " ".join(f"{type(e).__name__}: {e}".split())[:300]
      logging.warning("Checkpoint step %d in %s does not restore (%s); trying the one "
                      "before.", step, manager.directory, error)
      failures.append((step, error))
  if failures:
    raise ValueError(
        f"No checkpoint in {manager.directory} restores: "
        + "; ".join(f"step {step}: {error}" for step, error in failures)
        + ". They are damaged, or of another architecture than this run's.")
  return None, None, []


class Checkpointer:
  """Saves a run's checkpoints (the newest few and the best) and restores the newest."""

  def __init__(self, workdir: str, keep: int = 3):
    self._workdir = workdir
    self._latest = _manager(os.path.join(workdir, LATEST), keep, barrier_prefix=LATEST)
    self._best = _manager(os.path.join(workdir, BEST), 1, barrier_prefix=BEST)

  def latest_step(self) -> int | None:
    return self._latest.latest_step()

  def save(self, step: int, state: Any, meta: dict, *, best: bool = False) -> None:
    """Saves host `state` (a pytree) and JSON `meta`; also as the best when `best`."""
    args = ocp.args.Composite(state=ocp.args.StandardSave(state),
                              meta=ocp.args.JsonSave(meta))
    if self._latest.latest_step() != step:
      self._latest.save(step, args=args, force=True)
    if best and step not in self._best.all_steps():  # (a rerun of a step it has saved)
      self._best.wait_until_finished()
      self._best.save(step, args=args, force=True)

  def restore_latest(self, target: Any) -> tuple[Any, dict] | None:
    """(state shaped like `target`, meta) of the newest checkpoint that restores, or None
    when there is none. A damaged newer one is reported (a warning naming its step and
    error) and moved aside into WORKDIR/checkpoints_damaged/, never deleted; when no
    checkpoint restores, ValueError lists what was tried."""
    abstract = jax.tree_util.tree_map(ocp.utils.to_shape_dtype_struct, target)
    args = ocp.args.Composite(state=ocp.args.StandardRestore(abstract),
                              meta=ocp.args.JsonRestore())
    _, restored, failures = _restore_newest(self._latest, args)
    if failures:  # every process read the same files, so all of them are here
      if jax.process_index() == 0:
        damaged = os.path.join(self._workdir, DAMAGED)
        os.makedirs(damaged, exist_ok=True)
        for failed_step, _ in failures:
          os.replace(os.path.join(self._workdir, LATEST, str(failed_step)),
                     os.path.join(damaged, f"{failed_step}.{int(time.time())}"))
      if jax.process_count() > 1:  # the others see the steps gone before they reload
        multihost_utils.sync_global_devices("vgg_jax: damaged checkpoints moved aside")
      self._latest.reload()
    if restored is None:
      return None
    return restored["state"], restored["meta"]

  def wait_until_finished(self) -> None:
    self._latest.wait_until_finished()
    self._best.wait_until_finished()

  def close(self) -> None:
    self._latest.close()
    self._best.close()


def checkpoint_dir(path: str, *, best: bool = False) -> str:
  """The orbax directory for `path`: a workdir, or a checkpoints directory itself."""
  sub = os.path.join(path, BEST if best else LATEST)
  return sub if os.path.isdir(sub) else path


def load(path: str, *, step: int | None = None, best: bool = False) -> tuple[Any, dict]:
  """Reads (state, meta) of a saved run as nested dicts of numpy arrays.

  `path` is a workdir or its checkpoints directory; the newest step that restores
  unless `step` is given (or the best checkpoint with `best=True`). No optimiser or model is needed:
  evaluation, surgery and conversion use this to read parameters of any run.
  """
  directory = checkpoint_dir(path, best=best)
  if not os.path.isdir(directory):
    raise FileNotFoundError(f"No checkpoint directory at {path!r}: expected a workdir "
                            f"of a training run (with {LATEST}/ inside) or an orbax "
                            f"checkpoints directory.")
  manager = _manager(directory, None, create=False)
  if not manager.all_steps() or (step is not None and step not in manager.all_steps()):
    raise FileNotFoundError(f"No checkpoint{'' if step is None else f' at step {step}'} in "
                            f"{directory!r} (steps there: {list(manager.all_steps())}).")
  args = ocp.args.Composite(state=ocp.args.StandardRestore(),
                            meta=ocp.args.JsonRestore())
  if step is None:  # the newest that restores (a damaged newer one: a warning)
    _, restored, _ = _restore_newest(manager, args)
  else:
    restored = manager.restore(step, args=args)
  manager.close()
  state = jax.tree_util.tree_map(np.asarray, restored["state"])
  return state, restored["meta"]


def check_output_free(workdir: str) -> None:
  """Refuses an output directory that already holds checkpoints (orbax would fail only
  at the end of the work, and a run's checkpoints must not be mixed with others)."""
  directory = os.path.join(workdir, LATEST)
  if os.path.isdir(directory) and os.listdir(directory):
    raise FileExistsError(f"{workdir!r} already holds a checkpoint ({directory}): choose "
                          f"another output directory or delete this one.")


def save_params(workdir: str, params: Any, meta: dict, *, step: int = 0) -> str:
  """Writes parameters alone (no optimiser state) as a checkpoint `load_params` reads.

  Used for grafted and converted weights. `meta` should name the model ("model",
  "num_classes", ...). Returns the checkpoint directory.
  """
  check_output_free(workdir)
  directory = os.path.join(workdir, LATEST)
  manager = _manager(directory, None)
  params = jax.tree_util.tree_map(np.asarray, params)
  manager.save(step, args=ocp.args.Composite(
      state=ocp.args.StandardSave({"params": params}), meta=ocp.args.JsonSave(meta)),
      force=True)
  manager.wait_until_finished()
  manager.close()
  return directory


def load_params(path: str, **kwargs) -> tuple[Any, dict]:
  """(params, meta) of a saved run; see `load`."""
  state, meta = load(path, **kwargs)
  return state["params"], meta


# ------------------------------------------------------------ the workdir's other files


def write_config(workdir: str, config_json: str) -> None:
  """WORKDIR/config.json, written aside and renamed (never half-written)."""
  os.makedirs(workdir, exist_ok=True)
  tmp = os.path.join(workdir, CONFIG_FILE + ".tmp")
  with open(tmp, "w") as f:
    f.write(config_json)
  os.replace(tmp, os.path.join(workdir, CONFIG_FILE))


def _read_json(workdir: str, name: str) -> dict | None:
  """WORKDIR/NAME as a dict; None when there is no such file."""
  path = os.path.join(workdir, name)
  if not os.path.exists(path):
    return None
  with open(path) as f:
    return json.load(f)


def read_config(workdir: str) -> dict | None:
  """The run's frozen config as a dict; None when WORKDIR has none."""
  return _read_json(workdir, CONFIG_FILE)


# Fields that a run fills in from the dataset when its config leaves them None: a stored
# value against None is agreement, not a difference.
FILLED_IN_FIELDS = ("num_classes",)


def config_differences(stored: Mapping, wanted: Mapping, *,
                       keys: Iterable[str] | None = None,
                       prefix: str = "") -> list[tuple[str, Any, Any]]:
  """(field, stored value, wanted value) for each field where two configs disagree.

  Nested dicts are compared field by field (dotted names); KEYS limits the comparison
  to those top-level fields, in that order.
  """
  out = []
  for key in (list(keys) if keys is not None else sorted(set(stored) | set(wanted))):
    a, b = stored.get(key), wanted.get(key)
    if isinstance(a, Mapping) and isinstance(b, Mapping):
      out += config_differences(a, b, prefix=f"{prefix}{key}.")
    elif a != b and not (not prefix and key in FILLED_IN_FIELDS and b is None):
      out.append((prefix + key, a, b))
  return out


# Fields whose value does not change what a run computes: where the data is read from,
# how often the run logs and keeps checkpoints, how far it may go (the epoch cap), what
# it evaluates at the end, how batches reach the devices (pmap and shard_map agree to
# float rounding), how the convolutions are computed (the same, to float rounding), and
# what only a fresh start reads (its initialisation). A resume may change them; the
# change is recorded. Every other field is the recipe.
RESULT_NEUTRAL_FIELDS = ("log_every_steps", "checkpoint_every_steps", "keep_checkpoints",
                         "num_epochs", "final_eval_protocols", "profile",
                         "prefetch_to_device", "mapping", "conv_lowering", "distributed",
                         "data_dir", "manual_dir", "cache", "init", "init_from")


def frozen_config(stored: Mapping) -> ml_collections.ConfigDict:
  """A run's frozen config (its config.json) over today's default config, so that a
  run written before a field existed reads with that field's default."""
  config = default.get_config()
  config.update(dict(stored))
  return config


def run_config(workdir: str) -> ml_collections.ConfigDict:
  """WORKDIR's own config (its config.json over today's default, `frozen_config`);
  ValueError when it has none (a converted checkpoint, or no run at all)."""
  stored = read_config(workdir)
  if stored is None:
    raise ValueError(f"{workdir!r} has no {CONFIG_FILE}: give --config (the run's "
                     "config, or the data to use with a converted checkpoint).")
  return frozen_config(stored)


def has_checkpoint(workdir: str) -> bool:
  """Whether WORKDIR holds a saved step of a run (a resume, not a fresh start)."""
  directory = os.path.join(workdir, LATEST)
  return os.path.isdir(directory) and any(name.isdigit() for name in os.listdir(directory))


def check_resume(workdir: str, config, *, accept_changes: bool = False
                 ) -> list[tuple[str, Any, Any]]:
  """Compares CONFIG with the config.json of the run WORKDIR holds, before resuming it.

  A workdir without a checkpoint holds nothing to resume: any config may start there.
  Otherwise another architecture is refused (its checkpoints don't fit), and so is any
  change of the recipe (every field but RESULT_NEUTRAL_FIELDS) unless ACCEPT_CHANGES.
  Returns the differences, (field, stored value, new value), to `record_changes`.
  """
  previous = read_config(workdir)
  if previous is None or not has_checkpoint(workdir):
    return []
  wanted = json.loads(config.to_json_best_effort())
  differ = [f"{k}: {a!r} in the workdir, {b!r} now" for k, a, b in
            models.architecture_differences(previous, wanted)]
  if differ:
    raise ValueError(
        f"The workdir {workdir!r} holds a run of another architecture ("
        + "; ".join(differ) + "). Resume it with its own config "
        f"({os.path.join(workdir, CONFIG_FILE)}) or use a new --workdir.")
  stored = json.loads(frozen_config(previous).to_json_best_effort())
  changes = [(k, a, b) for k, a, b in config_differences(stored, wanted)
             if k.split(".")[0] not in models.ARCHITECTURE_FIELDS]
  recipe = [f"{k}: {a!r} in the workdir, {b!r} now" for k, a, b in changes
            if k.split(".")[0] not in RESULT_NEUTRAL_FIELDS]
  if recipe and not accept_changes:
    raise ValueError(
        f"The workdir {workdir!r} holds a run of another recipe (" + "; ".join(recipe)
        + "): resuming it so would not continue the same run. Resume it with its own "
        f"config ({os.path.join(workdir, CONFIG_FILE)}), use a new --workdir, or pass "
        f"--accept_config_changes to go on with the new values (recorded in "
        f"{os.path.join(workdir, CHANGES_FILE)}).")
  return changes


def record_changes(workdir: str, step: int, changes: list[tuple[str, Any, Any]]) -> None:
  """Appends to WORKDIR/config_changes.jsonl the config changes that take effect at STEP
  (a resume with another config): {"step", "time", "changes": {field: [old, new]}}."""
  if not changes:
    return
  with open(os.path.join(workdir, CHANGES_FILE), "a") as f:
    f.write(json.dumps(dict(step=int(step), time=time.time(),
                            changes={k: [a, b] for k, a, b in changes})) + "\n")


class JsonlWriter(metric_writers.interface.MetricWriter):
  """Appends scalars as JSON lines (WORKDIR/metrics.jsonl), for plots and sweeps that
  should not need TensorBoard to read a run."""

  def __init__(self, path: str):
    self._file = open(path, "a")

  def write_scalars(self, step, scalars):
    record = {"step": int(step), "time": time.time()}
    record.update({k: float(v) for k, v in scalars.items()})
    self._file.write(json.dumps(record) + "\n")
    self._file.flush()

  def write_summaries(self, step, values, metadata=None):
    pass

  def write_images(self, step, images):
    pass

  def write_videos(self, step, videos):
    pass

  def write_audios(self, step, audios, *, sample_rate):
    pass

  def write_texts(self, step, texts):
    pass

  def write_histograms(self, step, arrays, num_buckets=None):
    pass

  def write_hparams(self, hparams):
    pass

  def flush(self):
    self._file.flush()

  def close(self):
    self._file.close()


def metric_writer(workdir: str) -> metric_writers.MetricWriter:
  """TensorBoard and console (clu), plus metrics.jsonl; other hosts only log."""
  if jax.process_index() > 0:
    return metric_writers.create_default_writer(just_logging=True)
  return metric_writers.MultiWriter([
      metric_writers.create_default_writer(workdir, asynchronous=False),
      JsonlWriter(os.path.join(workdir, METRICS_FILE))])


def read_metrics(workdir: str) -> list[dict]:
  """The records of WORKDIR/metrics.jsonl (one dict of scalars per write); [] if none."""
  path = os.path.join(workdir, METRICS_FILE)
  if not os.path.exists(path):
    return []
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]


def write_final_eval(workdir: str, eval_metrics: dict, confusion: np.ndarray | None
                     ) -> None:
  """WORKDIR/final_eval.json: the finished run's last evaluation and confusion matrix."""
  with open(os.path.join(workdir, FINAL_EVAL_FILE), "w") as f:
    json.dump(dict(eval_metrics, confusion=np.asarray(confusion).tolist()), f)


def read_final_eval(workdir: str) -> dict | None:
  """WORKDIR/final_eval.json as a dict; None while the run has not finished."""
  return _read_json(workdir, FINAL_EVAL_FILE)
