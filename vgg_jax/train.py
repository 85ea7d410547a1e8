"""Training (section 3.1) with synchronous data parallelism (section 3.3).

The recipe: softmax cross-entropy, mini-batch SGD with momentum 0.9, weight decay 5e-4,
dropout 0.5 on fc6 and fc7, learning rate 1e-2 divided by 10 whenever validation
accuracy stops improving (`plateau.py`). The step functions here are written for one
device and average gradients with `jax.lax.pmean`; `parallel.py` maps them over the
devices. `train_and_evaluate` is the loop: evaluation, checkpoints, metrics, resume.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import time
from typing import Any, Iterator, Mapping

from absl import logging
from clu import metric_writers
from clu import periodic_actions
from flax.training import train_state as flax_train_state
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from vgg_jax import checkpointing
from vgg_jax import input_pipeline
from vgg_jax import models
from vgg_jax import parallel
from vgg_jax import plateau
from vgg_jax import plots
from vgg_jax import surgery

AXIS = parallel.AXIS

# Fields that fix the shapes of the parameters: a workdir's checkpoints only fit a run
# that agrees on all of them.
ARCHITECTURE_FIELDS = ("model", "width", "filter_size", "fc_width", "num_classes",
                       "channels", "crop_size")


class TrainState(flax_train_state.TrainState):
  """Parameters, optimiser state and step (float32, whatever the compute dtype)."""


# ----------------------------------------------------------------------------- setup


def validate_config(config: ml_collections.ConfigDict) -> None:
  """Fails fast, before any data or compilation, on values the recipe cannot use."""
  plateau.PlateauConfig.from_config(config)  # learning rate and plateau fields
  parallel.check_mapping(config.mapping)
  parallel.check_batch_size(config.batch_size)
  models.check_knobs(width=config.width, filter_size=config.filter_size,
                     fc_width=config.fc_width, dropout_rate=config.dropout_rate,
                     num_classes=config.num_classes or 1)
  models.kernel_initializer(config.init)
  models.canonical_name(config.model)
  if not 0 <= config.momentum < 1:
    raise ValueError(f"momentum must be in [0, 1), got {config.momentum!r}.")
  if config.weight_decay < 0:
    raise ValueError(f"weight_decay must be >= 0, got {config.weight_decay!r}.")
  if config.num_epochs <= 0:
    raise ValueError(f"num_epochs must be > 0, got {config.num_epochs!r}.")
  if config.dtype not in ("float32", "bfloat16", "float16"):
    raise ValueError(f"dtype must be float32, bfloat16 or float16, got {config.dtype!r}.")
  for field, least, optional in (("log_every_steps", 1, False),
                                 ("keep_checkpoints", 1, False),
                                 ("prefetch_to_device", 0, False),
                                 ("eval_every_steps", 1, True),  # None: every epoch
                                 ("checkpoint_every_steps", 0, True)):  # 0: at evals
    value = config[field]
    if not (value is None and optional) and (value is None or value < least):
      raise ValueError(f"{field} must be at least {least}"
                       f"{' (or None)' if optional else ''}, got {value!r}.")
  if config.final_eval_protocols:  # else a typo would surface only after training
    from vgg_jax import evaluate as evaluate_lib  # pylint: disable=g-import-not-at-top
    evaluate_lib.parse_protocols(config.final_eval_protocols)


def create_model(config: ml_collections.ConfigDict, num_classes: int) -> models.VGG:
  return models.create_model(
      config.model, num_classes=num_classes, width=config.width,
      filter_size=config.filter_size, fc_width=config.fc_width,
      dropout_rate=config.dropout_rate, dtype=jnp.dtype(config.dtype), init=config.init)


def decay_mask(params: Any) -> Any:
  """Weight decay on conv and FC kernels only; biases are not decayed (as in the
  released Caffe models, where biases have decay_mult 0)."""
  return jax.tree_util.tree_map(lambda p: p.ndim > 1, params)


def sgd_with_weight_decay(learning_rate: float, momentum: float, weight_decay: float,
                          nesterov: bool = False) -> optax.GradientTransformation:
  """SGD with momentum on the L2-regularised loss (the decay enters the gradient)."""
  return optax.chain(
      optax.add_decayed_weights(weight_decay, mask=decay_mask),
      optax.sgd(learning_rate, momentum=momentum or None, nesterov=nesterov))


def create_optimizer(config: ml_collections.ConfigDict) -> optax.GradientTransformation:
  # The learning rate is a hyperparameter in the optimiser state, so that the plateau
  # controller sets it from the host without recompiling.
  return optax.inject_hyperparams(sgd_with_weight_decay, static_args=("momentum", "weight_decay", "nesterov"))(
      learning_rate=config.learning_rate, momentum=config.momentum,
      weight_decay=config.weight_decay, nesterov=config.nesterov)


def create_train_state(rng: jax.Array, config: ml_collections.ConfigDict,
                       model: models.VGG, image_shape: tuple[int, ...]) -> TrainState:
  """A fresh state on the host; `image_shape` is one training crop (H, W, C)."""
  @jax.jit
  def init(rng):
    return model.init(rng, jnp.zeros((1,) + tuple(image_shape), jnp.float32),
                      train=False)["params"]
  params = init(rng)
  return TrainState.create(apply_fn=model.apply, params=params,
                           tx=create_optimizer(config))


def set_learning_rate(state: TrainState, learning_rate) -> TrainState:
  hyperparams = dict(state.opt_state.hyperparams, learning_rate=learning_rate)
  return state.replace(opt_state=state.opt_state._replace(hyperparams=hyperparams))


# ------------------------------------------------------------------ per-device steps


def cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
  return optax.softmax_cross_entropy_with_integer_labels(logits, labels)


def correct_top_k(logits: jax.Array, labels: jax.Array, k: int) -> jax.Array:
  """1.0 where the label is among the k highest scores (ties and NaNs count against)."""
  label_scores = jnp.take_along_axis(logits, labels[:, None], axis=-1)
  higher = jnp.sum(logits > label_scores, axis=-1)
  finite = jnp.all(jnp.isfinite(logits), axis=-1)  # NaN compares false: a diverged
  return ((higher < k) & finite).astype(jnp.float32)  # net would seem always right


def train_step(state: TrainState, batch: dict, dropout_rng: jax.Array,
               learning_rate: jax.Array) -> tuple[TrainState, dict]:
  """One SGD step on this device's share of the global batch.

  Gradients are averaged over all devices (`pmean`), so every device applies the same
  update: the result equals one device training on the whole global batch.
  """
  rng = jax.random.fold_in(jax.random.fold_in(dropout_rng, state.step),
                           jax.lax.axis_index(AXIS))

  def loss_fn(params):
    logits = state.apply_fn({"params": params}, batch["image"], train=True,
                            rngs={"dropout": rng})
    return cross_entropy(logits, batch["label"]).mean(), logits

  (loss, logits), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
  grads = jax.lax.pmean(grads, AXIS)
  state = set_learning_rate(state, learning_rate)
  state = state.apply_gradients(grads=grads)
  metrics = dict(loss=loss, top1=correct_top_k(logits, batch["label"], 1).mean(),
                 grad_norm=optax.global_norm(grads), learning_rate=learning_rate)
  return state, jax.lax.pmean(metrics, AXIS)


def eval_step(params: Any, batch: dict, *, apply_fn) -> dict:
  """Sums over the real (unmasked) examples of all devices."""
  logits = apply_fn({"params": params}, batch["image"], train=False)
  mask = batch["mask"]
  sums = dict(loss=cross_entropy(logits, batch["label"]),
              top1=correct_top_k(logits, batch["label"], 1),
              top5=correct_top_k(logits, batch["label"], 5),
              count=jnp.ones_like(mask))
  sums = {k: jnp.sum(v * mask) for k, v in sums.items()}
  # confusion[true, predicted]: counts of the real examples.
  num_classes = logits.shape[-1]
  true = jax.nn.one_hot(batch["label"], num_classes) * mask[:, None]
  predicted = jax.nn.one_hot(jnp.argmax(logits, -1), num_classes)
  sums["confusion"] = true.T @ predicted
  return jax.lax.psum(sums, AXIS)


def map_steps(mapping: parallel.DeviceMapping, model: models.VGG, *, mean, std=None):
  """(train step, eval step) mapped over the devices, taking the input pipeline's batches.

  The batches arrive as uint8 crops: `input_pipeline.model_inputs` makes them the net's
  float input on the device, inside the same compiled step. The train step is
  (state, batch, dropout key data, learning rate) -> (state, metrics), its state
  donated; the eval step (params, batch) -> summed metrics.
  """
  to_inputs = functools.partial(input_pipeline.model_inputs, mean=mean, std=std)
  p_train_step = mapping.map(
      lambda s, b, r, lr: train_step(s, to_inputs(b), jax.random.wrap_key_data(r), lr),
      donate_argnums=(0,))
  p_eval_step = mapping.map(
      lambda p, b: eval_step(p, to_inputs(b), apply_fn=model.apply))
  return p_train_step, p_eval_step


# ---------------------------------------------------------------- host-side helpers


def evaluate(mapped_eval_step, mapping: parallel.DeviceMapping, params: Any,
             batches: Iterator[dict]) -> dict[str, float]:
  """Loss, top-1 and top-5 error over a whole split, every example counted once, and
  the confusion matrix [true class, predicted class]."""
  totals = None
  for batch in batches:
    sums = mapping.unreplicate(mapped_eval_step(params, mapping.shard(batch)))
    totals = sums if totals is None else jax.tree_util.tree_map(np.add, totals, sums)
  if totals is None or float(totals["count"]) == 0:
    raise ValueError("The evaluation split is empty.")
  count = float(totals["count"])
  return dict(loss=float(totals["loss"]) / count,
              top1_error=1.0 - float(totals["top1"]) / count,
              top5_error=1.0 - float(totals["top5"]) / count,
              examples=int(count)), np.rint(totals["confusion"]).astype(np.int64)


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


def create_writer(workdir: str) -> metric_writers.MetricWriter:
  """TensorBoard and console (clu), plus metrics.jsonl; other hosts only log."""
  if jax.process_index() > 0:
    return metric_writers.create_default_writer(just_logging=True)
  return metric_writers.MultiWriter([
      metric_writers.create_default_writer(workdir, asynchronous=False),
      JsonlWriter(os.path.join(workdir, checkpointing.METRICS_FILE))])


def architecture_differences(stored: Mapping, wanted: Mapping,
                             ) -> list[tuple[str, Any, Any]]:
  """(field, stored, wanted) for each ARCHITECTURE_FIELDS field of STORED that WANTED
  sets otherwise; the nets' names are compared as nets ("vgg16" and "D" agree)."""
  def canonical(fields):
    fields = dict(fields)
    if fields.get("model") is not None:
      fields["model"] = models.canonical_name(fields["model"])
    return fields
  keys = [k for k in ARCHITECTURE_FIELDS if k in stored]
  return [(k, stored.get(k), wanted.get(k)) for k, _, _ in
          checkpointing.config_differences(canonical(stored), canonical(wanted), keys=keys)]


def check_workdir(workdir: str, config: ml_collections.ConfigDict) -> None:
  """Refuses a workdir whose run has another architecture (its checkpoints don't fit)."""
  previous = checkpointing.read_config(workdir)
  if previous is None:
    return
  differ = [f"{k}: {a!r} in the workdir, {b!r} now" for k, a, b in
            architecture_differences(previous, config.to_dict())]
  if differ:
    raise ValueError(
        f"The workdir {workdir!r} holds a run of another architecture ("
        + "; ".join(differ) + "). Resume it with its own config "
        f"({os.path.join(workdir, checkpointing.CONFIG_FILE)}) or use a new --workdir.")


@dataclasses.dataclass(frozen=True)
class Schedule:
  """Step counts of a run, from the config and the dataset size."""
  steps_per_epoch: int
  total_steps: int
  eval_every: int
  checkpoint_every: int

  @classmethod
  def create(cls, config, num_train: int) -> "Schedule":
    steps_per_epoch = max(1, num_train // config.batch_size)
    total = int(np.ceil(config.num_epochs * steps_per_epoch))
    return cls(steps_per_epoch=steps_per_epoch, total_steps=total,
               eval_every=config.eval_every_steps or steps_per_epoch,
               checkpoint_every=config.checkpoint_every_steps or total)


def summarize_train_metrics(per_step: list[dict]) -> dict[str, float]:
  """Means over the steps of a logging interval, named train_*."""
  return {f"train_{k}": float(np.mean([m[k] for m in per_step])) for k in per_step[0]}


def write_final_report(workdir: str, eval_metrics: dict, confusion: np.ndarray, *,
                       class_names=None, title: str = "") -> None:
  """final_eval.json, learning_curves.png and confusion_matrix.png in the workdir."""
  with open(os.path.join(workdir, checkpointing.FINAL_EVAL_FILE), "w") as f:
    json.dump(dict(eval_metrics, confusion=confusion.tolist()), f)
  plots.plot_learning_curves(os.path.join(workdir, checkpointing.METRICS_FILE),
                             os.path.join(workdir, "learning_curves.png"), title=title)
  plots.plot_confusion_matrix(confusion, os.path.join(workdir, "confusion_matrix.png"),
                              class_names=class_names, title=title)


def check_finite(values: Any, what: str, step: int, workdir: str, config) -> None:
  """Stops a diverged run before a NaN reaches a checkpoint or the plateau controller."""
  if all(np.all(np.isfinite(v)) for v in jax.tree_util.tree_leaves(values)):
    return
  raise FloatingPointError(
      f"Training diverged at step {step}: NaN or inf in the {what}. "
      f"The checkpoints in {workdir} are from before; start again in a new --workdir "
      f"with a lower learning rate (config.learning_rate={config.learning_rate}) or, "
      f"for the deep nets, initialised from net A (configs/vgg16_from_a.py) or with "
      f"init='glorot', as the paper did.")


# ---------------------------------------------------------------------- the loop


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Trains until the plateau schedule or the epoch cap ends it; resumes from WORKDIR.

  Returns the last validation metrics (loss, top1_error, top5_error, ...).
  """
  validate_config(config)
  check_workdir(workdir, config)
  info = input_pipeline.dataset_info(config)
  num_classes = config.num_classes or info.num_classes
  if config.num_classes is None:
    with config.unlocked():
      config.num_classes = num_classes
  check_workdir(workdir, config)
  if jax.process_index() == 0:
    checkpointing.write_config(workdir, config.to_json_best_effort(indent=2))

  model = create_model(config, num_classes)
  schedule = Schedule.create(config, info.num_train)
  plateau_config = plateau.PlateauConfig.from_config(config)
  mapping = parallel.DeviceMapping(config.mapping)
  checkpointer = checkpointing.Checkpointer(workdir, keep=config.keep_checkpoints)
  writer = create_writer(workdir)

  rng = jax.random.key(config.seed)
  init_rng, dropout_rng = jax.random.split(rng)
  host_state = create_train_state(init_rng, config, model, info.image_shape)
  restored = checkpointer.restore_latest(host_state)
  # best_saved: the accuracy of the best checkpoint. Not the plateau's best, which moves
  # only by more than its threshold: a smaller gain still makes a better checkpoint.
  if restored is not None:
    host_state, meta = restored
    schedule_state = plateau.PlateauState.from_json(meta["plateau"])
    last_eval = meta.get("eval", {})
    best_saved = meta.get("best_accuracy", schedule_state.best_accuracy)
    logging.info("Resumed from step %d of %s.", int(host_state.step), workdir)
  else:
    schedule_state = plateau.initial_state(plateau_config)
    last_eval = {}
    best_saved = -1.0
    if config.init_from.checkpoint:  # only a fresh run: a resumed one has its weights
      params, report = surgery.init_params_from(config, host_state.params)
      host_state = host_state.replace(params=params)
      logging.info("Initialised from %s:\n%s", config.init_from.checkpoint, report)
  step = int(host_state.step)
  mean, std = input_pipeline.normalization(config, workdir=workdir)

  def meta_dict(eval_metrics):
    return dict(step=step, plateau=schedule_state.to_json(), seed=config.seed,
                data_position=step, model=model.config, num_classes=num_classes,
                eval=eval_metrics, best_accuracy=best_saved,
                # What the net was trained on, for evaluation on other data:
                normalization=dict(mean=list(mean), std=std and list(std)))

  state = mapping.replicate(host_state)
  replicated_dropout_rng = mapping.replicate(jax.random.key_data(dropout_rng))
  p_train_step, p_eval_step = map_steps(mapping, model, mean=mean, std=std)
  block_each_step = jax.default_backend() == "cpu"  # fake CPU devices can deadlock

  hooks = []
  if jax.process_index() == 0:
    hooks.append(periodic_actions.ReportProgress(num_train_steps=schedule.total_steps,
                                                 writer=writer))
    if config.profile:
      hooks.append(periodic_actions.Profile(num_profile_steps=5, logdir=workdir))

  train_batches = mapping.prefetch(
      input_pipeline.train_batches(config, seed=config.seed, start_step=step),
      config.prefetch_to_device)
  logging.info("Training %s (%s parameters) for up to %d steps, %d per epoch.",
               model.config, f"{models.count_params(host_state.params):,}",
               schedule.total_steps, schedule.steps_per_epoch)
  train_metrics, interval_start, confusion = [], time.time(), None
  data_wait = 0.0  # seconds of this logging interval spent waiting for a batch
  learning_rate = mapping.replicate(np.float32(schedule_state.learning_rate))
  try:
    while step < schedule.total_steps and not schedule_state.stopped:
      wait_start = time.time()
      batch = next(train_batches)
      data_wait += time.time() - wait_start
      state, metrics = p_train_step(state, batch, replicated_dropout_rng, learning_rate)
      # One step queued behind the running one at most (none on CPU), so that the wait
      # above is time the devices had nothing to do, not the host running ahead.
      jax.block_until_ready(metrics if block_each_step or not train_metrics
                            else train_metrics[-1])
      train_metrics.append(metrics)
      step += 1
      for hook in hooks:
        hook(step)

      if step % config.log_every_steps == 0 or step == schedule.total_steps:
        summary = summarize_train_metrics([mapping.unreplicate(m) for m in train_metrics])
        elapsed = time.time() - interval_start
        summary["train_images_per_second"] = len(train_metrics) * config.batch_size / elapsed
        # Near 0: the devices are the limit; near 1: the host's input pipeline is.
        summary["train_data_wait_fraction"] = data_wait / elapsed
        writer.write_scalars(step, summary)
        check_finite(summary["train_loss"], "training loss", step, workdir, config)
        train_metrics, interval_start, data_wait = [], time.time(), 0.0

      pause_start = time.time()
      is_eval = step % schedule.eval_every == 0 or step == schedule.total_steps
      if is_eval:
        last_eval, confusion = evaluate(
            p_eval_step, mapping, state.params,
            input_pipeline.eval_batches(config))
        check_finite(last_eval["loss"], "validation loss", step, workdir, config)
        improved = 1 - last_eval["top1_error"] > best_saved
        best_saved = max(best_saved, 1 - last_eval["top1_error"])
        schedule_state = plateau.update(plateau_config, schedule_state,
                                        1 - last_eval["top1_error"])
        learning_rate = mapping.replicate(np.float32(schedule_state.learning_rate))
        writer.write_scalars(step, {f"eval_{k}": v for k, v in last_eval.items()}
                             | {"epoch": step / schedule.steps_per_epoch,
                                "plateau_drops": schedule_state.drops})
      if is_eval or step % schedule.checkpoint_every == 0 or schedule_state.stopped:
        saved = mapping.unreplicate(state)
        check_finite(saved.params, "parameters", step, workdir, config)
        checkpointer.save(step, saved, meta_dict(last_eval), best=is_eval and improved)
      interval_start += time.time() - pause_start  # throughput counts training only
  finally:
    # Also on an exception or interrupt: checkpoints being written are completed.
    checkpointer.wait_until_finished()
    writer.flush()

  if confusion is None:  # a finished run started again: evaluate for the report
    last_eval, confusion = evaluate(p_eval_step, mapping, state.params,
                                    input_pipeline.eval_batches(config))
  checkpointer.close()
  writer.flush()
  if config.final_eval_protocols:  # the paper's protocols (section 3.2) on the last net
    from vgg_jax import evaluate as evaluate_lib  # pylint: disable=g-import-not-at-top
    evaluate_lib.evaluate_run(config, workdir, protocols=config.final_eval_protocols)
  if jax.process_index() == 0:
    write_final_report(workdir, last_eval, confusion,
                       class_names=getattr(info, "class_names", None),
                       title=f"{model.config} on {config.dataset}")
  logging.info("Finished at step %d: %s", step, last_eval)
  return dict(last_eval, step=step, learning_rate=schedule_state.learning_rate,
              plateau_drops=schedule_state.drops)
