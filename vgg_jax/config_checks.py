"""One check of a run's config: every field a run uses, before any data or compilation.

`validate_config` is called by every entry point (`main`, `sweep` for each trial,
`evaluate`, the benchmark) before it starts work. `unused_fields` lists the fields a
run will not read but that were set anyway (legal, so `main` only warns). Each field's
owner says what it accepts: the nets (`models`), the convolutions (`layers`), the
schedule (`plateau`), the devices (`parallel`), the data (`input_pipeline`), the test
protocols (`protocols`) and the surgery rules (`surgery`); the optimiser's and the
loop's fields are checked here.
"""

from __future__ import annotations

import ml_collections

from configs import default
from vgg_jax import input_pipeline
from vgg_jax import layers
from vgg_jax import models
from vgg_jax import parallel
from vgg_jax import plateau
from vgg_jax import protocols
from vgg_jax import surgery

DTYPES = ("float32", "bfloat16", "float16")


def validate_config(config: ml_collections.ConfigDict) -> None:
  """Raises ValueError naming the field, the value and what it may be."""
  models.check_knobs(width=config.width, filter_size=config.filter_size,
                     fc_width=config.fc_width, dropout_rate=config.dropout_rate,
                     num_classes=1 if config.num_classes is None else config.num_classes)
  models.kernel_initializer(config.init)
  models.canonical_name(config.model)
  input_pipeline.check_data_fields(config)
  plateau.PlateauConfig.from_config(config)  # learning rate and plateau fields
  parallel.check_mapping(config.mapping)
  layers.check_conv_lowering(config.conv_lowering)
  parallel.check_batch_size(config.batch_size)
  if config.init_from.checkpoint:
    surgery.resolve_rule(config.init_from.rule)
  if config.final_eval_protocols:  # else a typo would surface only after training
    protocols.parse_protocols(config.final_eval_protocols)
  models.num_outputs(1, config.box_regression)
  if config.box_regression and config.final_eval_protocols:
    raise ValueError(
        f"final_eval_protocols={config.final_eval_protocols!r} are a classifier's; a "
        "localisation net (box_regression set) has its own protocols: run python -m "
        "vgg_jax.localize after training, and set final_eval_protocols=''.")
  models.trainable_mask({}, config.trainable_layers)
  if config.dtype not in DTYPES:
    raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {config.dtype!r}.")
  if not 0 <= config.momentum < 1:
    raise ValueError(f"momentum must be in [0, 1), got {config.momentum!r}.")
  if config.weight_decay < 0:
    raise ValueError(f"weight_decay must be >= 0, got {config.weight_decay!r}.")
  if config.num_epochs <= 0:
    raise ValueError(f"num_epochs must be > 0, got {config.num_epochs!r}.")
  if config.color_shift_std < 0:
    raise ValueError(f"color_shift_std must be >= 0 (0 turns the colour shift off), got "
                     f"{config.color_shift_std!r}.")
  for field, least, optional in (("log_every_steps", 1, False),
                                 ("keep_checkpoints", 1, False),
                                 ("shuffle_buffer", 1, False),
                                 ("prefetch_to_device", 0, False),
                                 ("eval_every_steps", 1, True),  # None: every epoch
                                 ("checkpoint_every_steps", 0, True)):  # 0: at evals
    value = config[field]
    if not (value is None and optional) and (value is None or value < least):
      raise ValueError(f"{field} must be at least {least}"
                       f"{' (or None)' if optional else ''}, got {value!r}.")


def unused_fields(config: ml_collections.ConfigDict) -> list[str]:
  """One line per field that this config sets but its run does not read."""
  unused = []
  if (not config.init_from.checkpoint
      and config.init_from.rule != default.get_config().init_from.rule):
    try:
      surgery.resolve_rule(config.init_from.rule)
      sense = ""
    except ValueError:
      sense = ", and not a rule of vgg_jax.surgery.RULES either"
    unused.append(f"init_from.rule={config.init_from.rule!r} is unused without "
                  f"init_from.checkpoint{sense}")
  if config.dataset.startswith("folder:"):
    unused += [f"{field}={config[field]!r} is unused with an image folder "
               f"(config.dataset={config.dataset!r})"
               for field in ("data_dir", "manual_dir") if config[field] is not None]
  if config.nesterov and config.momentum == 0:
    unused.append("nesterov=True is unused with momentum=0")
  if config.color_shift_std and config.channels == 1:
    unused.append(f"color_shift_std={config.color_shift_std} is unused with channels=1 "
                  "(the colour shift is for RGB)")
  return unused
