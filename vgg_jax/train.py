"""Training (section 3.1) with synchronous data parallelism (section 3.3).

The recipe: softmax cross-entropy, mini-batch SGD with momentum 0.9, weight decay 5e-4,
dropout 0.5 on fc6 and fc7, learning rate 1e-2 divided by 10 whenever validation
accuracy stops improving (`plateau.py`). The step functions here are written for one
device and average gradients with `jax.lax.pmean`; `parallel.py` maps them over the
devices. `train_and_evaluate` is the loop: validation, checkpoints, metrics, resume.
What follows a run (the paper's test protocols, the report) is wired by `main`.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from typing import Any, Callable, Iterator

from absl import logging
from clu import periodic_actions
from flax.training import train_state as flax_train_state
import jax
import ml_collections
import numpy as np
import optax

from vgg_jax import checkpointing
from vgg_jax import config_checks
from vgg_jax import datasets
from vgg_jax import input_pipeline
from vgg_jax import localization
from vgg_jax import metrics as metrics_lib
from vgg_jax import models
from vgg_jax import parallel
from vgg_jax import pixel_stats
from vgg_jax import plateau
from vgg_jax import surgery

AXIS = parallel.AXIS
# The eval split's batches stay on the devices between validations when they take at
# most this much (the demo's 10,000 crops: 10 MB; ImageNet's 50,000 at 224: 7.5 GB, read
# again each time). On 2 CPU cores the demo's validation then takes 0.9 s, not 1.8.
EVAL_RESIDENT_BYTES = 512 * 2**20


class TrainState(flax_train_state.TrainState):
  """Parameters, optimiser state and step (float32, whatever the compute dtype)."""


# ----------------------------------------------------------------------------- setup


def decay_mask(params: Any) -> Any:
  """Weight decay on conv and FC kernels only; biases are not decayed (as in the
  released Caffe models, where biases have decay_mult 0)."""
  return jax.tree_util.tree_map(lambda p: p.ndim > 1, params)


def sgd_with_weight_decay(learning_rate: float, momentum: float, weight_decay: float,
                          nesterov: bool = False, trainable_layers: str = "all"
                          ) -> optax.GradientTransformation:
  """SGD with momentum on the L2-regularised loss (the decay enters the gradient); the
  layers that `trainable_layers` leaves out get no update at all."""
  sgd = optax.chain(
      optax.add_decayed_weights(weight_decay, mask=decay_mask),
      optax.sgd(learning_rate, momentum=momentum or None, nesterov=nesterov))
  if trainable_layers == "all":
    return sgd
  frozen = lambda params: jax.tree_util.tree_map(  # pylint: disable=g-long-lambda
      lambda t: not t, models.trainable_mask(params, trainable_layers))
  return optax.chain(sgd, optax.masked(optax.set_to_zero(), frozen))


def create_optimizer(config: ml_collections.ConfigDict) -> optax.GradientTransformation:
  # The learning rate is a hyperparameter in the optimiser state, so that the plateau
  # controller sets it from the host without recompiling.
  return optax.inject_hyperparams(
      sgd_with_weight_decay,
      static_args=("momentum", "weight_decay", "nesterov", "trainable_layers"))(
      learning_rate=config.learning_rate, momentum=config.momentum,
      weight_decay=config.weight_decay, nesterov=config.nesterov,
      trainable_layers=config.get("trainable_layers", "all"))


def create_train_state(rng: jax.Array, config: ml_collections.ConfigDict,
                       model: models.VGG) -> TrainState:
  """A fresh state on the host, its parameters drawn with RNG for the config's crops."""
  params = models.init_params(model, rng, models.input_shape(config))
  return TrainState.create(apply_fn=model.apply, params=params,
                           tx=create_optimizer(config))


def set_learning_rate(state: TrainState, learning_rate) -> TrainState:
  hyperparams = dict(state.opt_state.hyperparams, learning_rate=learning_rate)
  return state.replace(opt_state=state.opt_state._replace(hyperparams=hyperparams))


# ------------------------------------------------------------------ per-device steps


@dataclasses.dataclass(frozen=True)
class Objective:
  """What a run optimises and validates: a classifier's softmax (section 3.1), or a
  localisation net's Euclidean loss on boxes (appendix A)."""
  loss: Callable[[jax.Array, dict], tuple[jax.Array, dict]]  # (outputs, batch) -> (loss,
  sums: Callable[[jax.Array, dict], dict]                    #   metrics); summed measures
  summary: Callable[[dict], dict]          # summed measures of a split -> metrics
  error: str                               # the metric the schedule and the best follow


CLASSIFICATION = Objective(metrics_lib.classification_loss, metrics_lib.classification_sums,
                           metrics_lib.classification_summary, "top1_error")


def objective(config) -> Objective:
  """The Objective of a run's config: localisation when config.box_regression is set."""
  if not config.get("box_regression"):
    return CLASSIFICATION
  return Objective(localization.train_loss,
                   functools.partial(localization.eval_sums, crop_size=config.crop_size),
                   localization.summary, "loc_error")


def train_step(state: TrainState, batch: dict, dropout_rng: jax.Array,
               learning_rate: jax.Array, *, loss=metrics_lib.classification_loss
               ) -> tuple[TrainState, dict]:
  """One SGD step on this device's share of the global batch, minimising LOSS
  (`Objective.loss`; the softmax by default).

  Gradients are averaged over all devices (`pmean`), so every device applies the same
  update: the result equals one device training on the whole global batch.
  """
  rng = jax.random.fold_in(jax.random.fold_in(dropout_rng, state.step),
                           jax.lax.axis_index(AXIS))

  def loss_fn(params):
    outputs = state.apply_fn({"params": params}, batch["image"], train=True,
                             rngs={"dropout": rng})
    return loss(outputs, batch)

  (value, measures), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
  grads = jax.lax.pmean(grads, AXIS)
  state = set_learning_rate(state, learning_rate)
  state = state.apply_gradients(grads=grads)
  metrics = dict(loss=value, **measures, grad_norm=optax.global_norm(grads),
                 learning_rate=learning_rate)
  return state, jax.lax.pmean(metrics, AXIS)


def eval_step(params: Any, batch: dict, *, apply_fn,
              sums=metrics_lib.classification_sums) -> dict:
  """SUMS (`Objective.sums`) over the real (unmasked) examples of all devices."""
  outputs = apply_fn({"params": params}, batch["image"], train=False)
  return jax.lax.psum(sums(outputs, batch), AXIS)


def map_steps(mapping: parallel.DeviceMapping, model: models.VGG, *, mean, std=None,
              objective: Objective = CLASSIFICATION):
  """(train step, eval step) mapped over the devices, taking the input pipeline's batches.

  The batches arrive as uint8 crops: `input_pipeline.model_inputs` makes them the net's
  float input on the device, inside the same compiled step. The train step is
  (state, batch, dropout key data, learning rate) -> (state, metrics), its state
  donated; the eval step (params, batch) -> summed metrics.
  """
  to_inputs = functools.partial(input_pipeline.model_inputs, mean=mean, std=std)
  p_train_step = mapping.map(
      lambda s, b, r, lr: train_step(s, to_inputs(b), jax.random.wrap_key_data(r), lr,
                                     loss=objective.loss),
      donate_argnums=(0,))
  p_eval_step = mapping.map(
      lambda p, b: eval_step(p, to_inputs(b), apply_fn=model.apply, sums=objective.sums))
  return p_train_step, p_eval_step


# ---------------------------------------------------------------- host-side helpers


def validation_metrics(mapped_eval_step, mapping: parallel.DeviceMapping, params: Any,
                       batches: Iterator[dict], objective: Objective = CLASSIFICATION
                       ) -> tuple[dict[str, float], np.ndarray | None]:
  """The OBJECTIVE's metrics over a whole split, every example counted once (a
  classifier's: loss, top-1 and top-5 error), and the confusion matrix [true class,
  predicted class] (None for a localisation net)."""
  totals = None
  for batch in batches:
    sums = mapping.unreplicate(mapped_eval_step(params, mapping.shard(batch)))
    totals = sums if totals is None else jax.tree_util.tree_map(np.add, totals, sums)
  if totals is None or float(totals["count"]) == 0:
    raise ValueError("The evaluation split is empty.")
  confusion = totals.get("confusion")
  return (objective.summary(totals),
          None if confusion is None else np.rint(confusion).astype(np.int64))


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


def with_num_classes(config: ml_collections.ConfigDict,
                     info: datasets.DatasetInfo) -> ml_collections.ConfigDict:
  """A copy of CONFIG whose num_classes, if left None, is the dataset's; another number
  than the dataset's is refused."""
  if config.num_classes not in (None, info.num_classes):
    raise ValueError(
        f"num_classes={config.num_classes}, but {config.dataset} has {info.num_classes} "
        f"classes: set --config.num_classes={info.num_classes}, or leave it unset to "
        f"take the dataset's.")
  config = config.copy_and_resolve_references()
  with config.unlocked():
    config.num_classes = info.num_classes
  return config


# ------------------------------------------------------------------------ resume


@dataclasses.dataclass
class Progress:
  """What a run's checkpoints carry besides the state: the learning-rate schedule
  (the plateau controller), the latest validation, and the accuracy of the best
  checkpoint. (Not the plateau's best, which moves only by more than its threshold:
  a smaller gain still makes a better checkpoint.)"""
  schedule: plateau.PlateauState
  last_eval: dict
  best_accuracy: float

  @classmethod
  def fresh(cls, plateau_config: plateau.PlateauConfig) -> "Progress":
    return cls(plateau.initial_state(plateau_config), {}, -1.0)

  @classmethod
  def from_meta(cls, meta: dict) -> "Progress":
    schedule = plateau.PlateauState.from_json(meta["plateau"])
    return cls(schedule, meta.get("eval", {}),
               meta.get("best_accuracy", schedule.best_accuracy))

  def to_meta(self, *, step: int, config, model: models.VGG, mean, std) -> dict:
    """The checkpoint's meta (its JSON item)."""
    return dict(step=step, plateau=self.schedule.to_json(), seed=config.seed,
                model=model.net, num_classes=model.num_classes, eval=self.last_eval,
                best_accuracy=self.best_accuracy,
                # What the net was trained on, for evaluation on other data:
                normalization=dict(mean=list(mean), std=std and list(std)))


def restore_or_initialize(config, checkpointer: checkpointing.Checkpointer,
                          fresh: TrainState) -> tuple[TrainState, Progress]:
  """The state a run starts from, and its progress. In this order:

  1. this run's newest checkpoint, if it has one: a restart continues exactly where
     the run stopped (parameters, optimiser, step, schedule, best checkpoint);
  2. else, with config.init_from.checkpoint, FRESH with the layers of
     config.init_from.rule copied from that checkpoint (surgery; section 3.1);
  3. else FRESH (the run's seed drew it).
  """
  restored = checkpointer.restore_latest(fresh)
  if restored is not None:
    state, meta = restored
    logging.info("Resumed from step %d of its workdir.", int(state.step))
    return state, Progress.from_meta(meta)
  progress = Progress.fresh(plateau.PlateauConfig.from_config(config))
  if config.init_from.checkpoint:
    params, report = surgery.init_params_from(config, fresh.params)
    logging.info("Initialised from %s:\n%s", config.init_from.checkpoint, report)
    return fresh.replace(params=params), progress
  return fresh, progress


# ---------------------------------------------------------------------- the loop


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, *,
                       accept_config_changes: bool = False) -> dict:
  """Trains until the plateau schedule or the epoch cap ends it; resumes from WORKDIR.

  A resume with another recipe than the run's is refused unless ACCEPT_CONFIG_CHANGES
  (`checkpointing.check_resume`). Nothing is written to WORKDIR before the config has
  been checked against the run there, the data and the checkpoints.
  Returns the last validation metrics (a classifier's loss, top1_error, top5_error,
  examples; a localisation net's loss, loc_error, examples), the confusion matrix of
  that validation ("confusion"; None for a localisation net), the step, the learning
  rate and the number of plateau drops.
  """
  config_checks.validate_config(config)
  checkpointing.check_resume(workdir, config,  # before the data, which may take long
                             accept_changes=accept_config_changes)
  info = datasets.dataset_info(config)
  config = with_num_classes(config, info)
  changes = checkpointing.check_resume(workdir, config,  # with the dataset's classes
                                       accept_changes=accept_config_changes)
  if info.num_train < config.batch_size:
    logging.warning("%s %s has %d images, fewer than one batch (%d): every batch repeats "
                    "some of them.", config.dataset, config.train_split, info.num_train,
                    config.batch_size)
  input_pipeline.check_images(config, config.train_split)
  input_pipeline.check_images(config, config.eval_split)
  model = models.from_config(config)
  schedule = Schedule.create(config, info.num_train)
  mapping = parallel.DeviceMapping(config.mapping)
  checkpointer = checkpointing.Checkpointer(workdir, keep=config.keep_checkpoints)
  init_key, dropout_key = models.seed_keys(config.seed)
  host_state, progress = restore_or_initialize(
      config, checkpointer, create_train_state(init_key, config, model))
  mean, std = pixel_stats.normalization(config, workdir=workdir)
  if jax.process_index() == 0:
    checkpointing.write_config(workdir, config.to_json_best_effort(indent=2))
    checkpointing.record_changes(workdir, int(host_state.step), changes)
  writer = checkpointing.metric_writer(workdir)
  logging.info("Training %s (%s parameters) for up to %d steps, %d per epoch.",
               model.net, f"{models.count_params(host_state.params):,}",
               schedule.total_steps, schedule.steps_per_epoch)
  loop = _Loop(config, workdir, model, schedule, mapping, checkpointer, writer,
               mean=mean, std=std)
  try:
    state, progress, step = loop.run(host_state, progress, dropout_key)
  finally:
    # Also on an exception or interrupt: checkpoints being written are completed.
    checkpointer.wait_until_finished()
    writer.flush()
  if not loop.validated:  # a finished run started again: validate for the report
    progress.last_eval, loop.confusion = validation_metrics(
        loop.eval_step, mapping, state.params, loop.eval_batches(), loop.objective)
  checkpointer.close()
  logging.info("Finished at step %d: %s", step, progress.last_eval)
  return dict(progress.last_eval, confusion=loop.confusion, step=step,
              learning_rate=progress.schedule.learning_rate,
              plateau_drops=progress.schedule.drops)


class _Loop:
  """The training loop of one run: steps, logging, validation and checkpoints."""

  def __init__(self, config, workdir, model, schedule, mapping, checkpointer, writer, *,
               mean, std):
    self.config, self.workdir, self.model = config, workdir, model
    self.schedule, self.mapping = schedule, mapping
    self.checkpointer, self.writer = checkpointer, writer
    self.mean, self.std = mean, std
    self.plateau_config = plateau.PlateauConfig.from_config(config)
    self.objective = objective(config)
    self.train_step, self.eval_step = map_steps(mapping, model, mean=mean, std=std,
                                                objective=self.objective)
    self.eval_batches = mapping.resident(lambda: input_pipeline.eval_batches(config),
                                         max_bytes=EVAL_RESIDENT_BYTES)
    self.validated, self.confusion = False, None  # the last validation's confusion

  def run(self, host_state: TrainState, progress: Progress, dropout_key: jax.Array
          ) -> tuple[TrainState, Progress, int]:
    """Trains from HOST_STATE to the end; returns the state on the devices, the
    progress and the step. (`validated`: whether it validated; no step was left
    otherwise.)"""
    config, schedule, mapping = self.config, self.schedule, self.mapping
    step = int(host_state.step)
    state = mapping.replicate(host_state)
    dropout_key = mapping.replicate(jax.random.key_data(dropout_key))
    learning_rate = mapping.replicate(np.float32(progress.schedule.learning_rate))
    batches = mapping.prefetch(
        input_pipeline.train_batches(config, seed=config.seed, start_step=step),
        config.prefetch_to_device)
    hooks = []
    if jax.process_index() == 0:
      hooks.append(periodic_actions.ReportProgress(num_train_steps=schedule.total_steps,
                                                   writer=self.writer))
      if config.profile:
        hooks.append(periodic_actions.Profile(num_profile_steps=5, logdir=self.workdir))
    block_each_step = jax.default_backend() == "cpu"  # fake CPU devices can deadlock
    interval = _Interval()
    while step < schedule.total_steps and not progress.schedule.stopped:
      wait_start = time.time()
      batch = next(batches)
      interval.data_wait += time.time() - wait_start
      state, metrics = self.train_step(state, batch, dropout_key, learning_rate)
      # One step queued behind the running one at most (none on CPU), so that the wait
      # above is time the devices had nothing to do, not the host running ahead.
      jax.block_until_ready(metrics if block_each_step or not interval.metrics
                            else interval.metrics[-1])
      interval.metrics.append(metrics)
      step += 1
      for hook in hooks:
        hook(step)
      if step % config.log_every_steps == 0 or step == schedule.total_steps:
        self._log(step, interval)
        interval = _Interval()
      pause_start = time.time()
      is_eval = step % schedule.eval_every == 0 or step == schedule.total_steps
      improved = False
      if is_eval:
        improved = self._validate(step, state, progress)
        learning_rate = mapping.replicate(np.float32(progress.schedule.learning_rate))
      if (is_eval or step % schedule.checkpoint_every == 0
          or progress.schedule.stopped):
        self._save(step, state, progress, best=improved)
      interval.start += time.time() - pause_start  # throughput counts training only
    return state, progress, step

  def _log(self, step: int, interval: "_Interval") -> None:
    summary = summarize_train_metrics([self.mapping.unreplicate(m)
                                       for m in interval.metrics])
    elapsed = time.time() - interval.start
    summary["train_images_per_second"] = (len(interval.metrics) * self.config.batch_size
                                          / elapsed)
    # Near 0: the devices are the limit; near 1: the host's input pipeline is.
    summary["train_data_wait_fraction"] = interval.data_wait / elapsed
    self.writer.write_scalars(step, summary)
    check_finite(summary["train_loss"], "training loss", step, self.workdir, self.config)

  def _validate(self, step: int, state: TrainState, progress: Progress) -> bool:
    """Validates, updates PROGRESS (schedule, best); returns whether it improved."""
    last_eval, self.confusion = validation_metrics(
        self.eval_step, self.mapping, state.params, self.eval_batches(), self.objective)
    self.validated = True
    check_finite(last_eval["loss"], "validation loss", step, self.workdir, self.config)
    accuracy = 1 - last_eval[self.objective.error]
    improved = accuracy > progress.best_accuracy
    progress.best_accuracy = max(progress.best_accuracy, accuracy)
    progress.schedule = plateau.update(self.plateau_config, progress.schedule, accuracy)
    progress.last_eval = last_eval
    self.writer.write_scalars(step, {f"eval_{k}": v for k, v in last_eval.items()}
                              | {"epoch": step / self.schedule.steps_per_epoch,
                                 "plateau_drops": progress.schedule.drops})
    return improved

  def _save(self, step: int, state: TrainState, progress: Progress, *,
            best: bool) -> None:
    saved = self.mapping.unreplicate(state)
    check_finite(saved.params, "parameters", step, self.workdir, self.config)
    meta = progress.to_meta(step=step, config=self.config, model=self.model,
                            mean=self.mean, std=self.std)
    self.checkpointer.save(step, saved, meta, best=best)


@dataclasses.dataclass
class _Interval:
  """A logging interval: its steps' metrics, start time and seconds waiting for data."""
  metrics: list = dataclasses.field(default_factory=list)
  start: float = dataclasses.field(default_factory=time.time)
  data_wait: float = 0.0
