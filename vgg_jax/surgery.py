"""Checkpoint surgery (section 3.1): start a net from named layers of another one.

The paper trained net A from random weights, then initialised the deeper nets with A's
first conv layers and its three FC layers, the rest random; the S=384 net was
fine-tuned from the S=256 net, and the scale-jittered net from the S=384 net. All of
these are one operation: copy the layers a *rule* names from a source checkpoint into
the target net's fresh initialisation, and leave everything else as it was drawn.

Rules are data (`RULES`): a mapping source layer -> target layer (or "every layer"),
which source architectures they accept, and which target layers stay fresh. Errors
are loud and list every offending layer with both shapes, and a `SurgeryReport` says
what was copied and what stayed fresh.

Two ways in:
- a training run's `config.init_from` (checkpoint, rule), applied by the training loop
  through `init_params_from` when the run starts fresh, never over a resumed run;
- a command that writes the grafted checkpoint for inspection and prints the report:

    python -m vgg_jax.surgery --source=$HOME/runs/vgg11 --config=configs/vgg16.py \
        --rule=net_a --output=/tmp/vgg16_from_a [--seed=0]
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Mapping

from absl import app
from absl import flags
from absl import logging
import jax.numpy as jnp
import numpy as np

from vgg_jax import checkpointing
from vgg_jax import cli
from vgg_jax import models

Params = Any

# The layers the paper copied from net A (section 3.1: "the first four convolutional
# layers and the last three fully-connected layers"). Net A's first four convs are
# conv1_1, conv2_1, conv3_1 and conv3_2; we copy them into the layers of the *same
# name* of B-E (in D these are its 1st, 3rd, 5th and 6th convs: the first three follow
# a pool or the input and conv3_2 maps 256 to 256 channels, so the shapes match). Read
# literally, "the first four conv layers" of D would be conv1_1, conv1_2, conv2_1,
# conv2_2, whose shapes do not all match A's; the Caffe-era reproductions copy by name, as we do.
NET_A_LAYERS = ("conv1_1", "conv2_1", "conv3_1", "conv3_2", "fc6", "fc7", "fc8")


@dataclasses.dataclass(frozen=True)
class Rule:
  """Which layers of a source net initialise which layers of a target net.

  Attributes:
    description: one line for reports and errors.
    layers: source layer -> target layer; None means every layer of the target,
      from the source layer of the same name.
    exclude: target layers left at their fresh initialisation (with `layers=None`).
    source_models: Table 1 names the source must be; None: the target's own.
    target_models: Table 1 names the rule applies to; None: any.
  """
  description: str
  layers: Mapping[str, str] | None = None
  exclude: tuple[str, ...] = ()
  source_models: tuple[str, ...] | None = None
  target_models: tuple[str, ...] | None = None


RULES: dict[str, Rule] = {
    "net_a": Rule(
        "the paper's initialisation of the deep nets: net A's conv1_1, conv2_1, "
        "conv3_1, conv3_2, fc6, fc7, fc8; the other layers fresh",
        layers={name: name for name in NET_A_LAYERS},
        source_models=("A",), target_models=("B", "C", "D", "E")),
    "all": Rule(
        "every layer from a net of the same architecture (S=384 from S=256, "
        "scale jittering from S=384, or a converted pretrained net)"),
    "all_but_fc8": Rule(
        "every layer but fc8, which is fresh (fine-tuning with a new number of classes)",
        exclude=("fc8",)),
    "convs": Rule(
        "every conv layer; fc6, fc7, fc8 fresh (a new crop size, or conv-only weights "
        "such as Keras 'notop' files)",
        exclude=models.HEAD),
}


@dataclasses.dataclass(frozen=True)
class SurgeryReport:
  """What a surgery did: layers copied (with shapes) and layers left as they were."""
  rule: str
  source: str
  source_model: str
  target_model: str
  copied: tuple[tuple[str, str, dict], ...] = ()  # (source, target, {param: shape})
  fresh: tuple[tuple[str, dict], ...] = ()        # (target layer, {param: shape})

  def to_json(self) -> dict:
    return dict(rule=self.rule, source=self.source, source_model=self.source_model,
                target_model=self.target_model,
                copied=[dict(source=s, target=t, shapes=_json_shapes(sh))
                        for s, t, sh in self.copied],
                fresh=[dict(target=t, shapes=_json_shapes(sh)) for t, sh in self.fresh])

  def __str__(self) -> str:
    return self.format()

  def format(self) -> str:
    """A human-readable table of the surgery."""
    lines = [f"Surgery rule {self.rule!r}: {self.source_model} ({self.source}) -> "
             f"{self.target_model}",
             f"  copied {len(self.copied)} layers:"]
    for source, target, shapes in self.copied:
      arrow = target if source == target else f"{source} -> {target}"
      lines.append(f"    {arrow:<20} {_shapes_str(shapes)}")
    lines.append(f"  fresh (initialisation): {len(self.fresh)} layers:")
    for target, shapes in self.fresh:
      lines.append(f"    {target:<20} {_shapes_str(shapes)}")
    return "\n".join(lines)


def _json_shapes(shapes: dict) -> dict:
  return {k: list(v) for k, v in shapes.items()}


def _shapes_str(shapes: dict) -> str:
  return ", ".join(f"{k} {tuple(v)}" for k, v in sorted(shapes.items(), reverse=True))


def _layer_shapes(layer: Mapping[str, Any]) -> dict:
  return {k: tuple(np.shape(v)) for k, v in layer.items()}


def resolve_rule(rule: str | Rule | Mapping[str, str]) -> tuple[str, Rule]:
  """(name, Rule) for a name of RULES, a Rule, or a plain mapping source -> target.

  A plain mapping (e.g. {"conv1_1": "conv1_1"}) accepts a source of any architecture:
  the shapes are still checked.
  """
  if isinstance(rule, Rule):
    return "custom", rule
  if isinstance(rule, Mapping):
    mapping = {str(k): str(v) for k, v in rule.items()}
    return "custom", Rule("a custom mapping", layers=mapping,
                          source_models=tuple(models.TABLE_1))
  if rule not in RULES:
    raise ValueError(f"Unknown surgery rule {rule!r}; known rules: "
                     + "; ".join(f"{k!r} ({r.description})" for k, r in RULES.items())
                     + ".")
  return rule, RULES[rule]


def apply_rule(rule: str | Rule | Mapping[str, str], source_params: Params,
               target_params: Params, *, source_model: str, target_model: str,
               source: str = "<params>") -> tuple[Params, SurgeryReport]:
  """Copies the rule's layers of `source_params` into `target_params` (pure).

  Raises ValueError when the source or target architecture does not fit the rule, when
  the rule names layers either side lacks, or when shapes differ (all offending layers
  are listed, with both shapes). Copied arrays take the target's dtype.
  """
  name, rule = resolve_rule(rule)
  source_model = models.canonical_name(source_model)
  target_model = models.canonical_name(target_model)
  allowed_sources = rule.source_models or (target_model,)
  if source_model not in allowed_sources:
    need = ("net " + " or ".join(allowed_sources) if rule.source_models
            else f"a net of the target's architecture ({target_model})")
    raise ValueError(
        f"Surgery rule {name!r} needs a source that is {need}, but the checkpoint "
        f"{source} holds net {source_model}. ({rule.description}.)")
  if rule.target_models is not None and target_model not in rule.target_models:
    raise ValueError(
        f"Surgery rule {name!r} initialises nets {', '.join(rule.target_models)}, not "
        f"net {target_model}.")

  if rule.layers is None:
    mapping = {t: t for t in target_params if t not in rule.exclude}
  else:
    mapping = dict(rule.layers)
  missing_source = [s for s in mapping if s not in source_params]
  missing_target = [t for t in mapping.values() if t not in target_params]
  if missing_source or missing_target:
    parts = []
    if missing_source:
      parts.append(f"the source (net {source_model}, {source}) has no "
                   f"{', '.join(missing_source)} (it has {', '.join(source_params)})")
    if missing_target:
      parts.append(f"the target (net {target_model}) has no "
                   f"{', '.join(missing_target)} (it has {', '.join(target_params)})")
    raise ValueError(f"Surgery rule {name!r} names layers that are missing: "
                     + "; ".join(parts) + ".")

  mismatches = []
  for s, t in mapping.items():
    src, tgt = _layer_shapes(source_params[s]), _layer_shapes(target_params[t])
    if src != tgt:
      label = s if s == t else f"{s} -> {t}"
      mismatches.append(f"{label}: source {_shapes_str(src)} vs target "
                        f"{_shapes_str(tgt)}{_hint(t)}")
  if mismatches:
    raise ValueError(
        f"Surgery rule {name!r} from net {source_model} ({source}) into net "
        f"{target_model}: shapes differ for {len(mismatches)} layer(s):\n  "
        + "\n  ".join(mismatches))

  params = {k: dict(v) for k, v in target_params.items()}
  copied = []
  for s, t in mapping.items():
    params[t] = {k: jnp.asarray(source_params[s][k], dtype=jnp.asarray(v).dtype)
                 for k, v in target_params[t].items()}
    copied.append((s, t, _layer_shapes(target_params[t])))
  targets = set(mapping.values())
  fresh = tuple((t, _layer_shapes(v)) for t, v in target_params.items()
                if t not in targets)
  report = SurgeryReport(rule=name, source=source, source_model=source_model,
                         target_model=target_model, copied=tuple(copied), fresh=fresh)
  return params, report


def _hint(layer: str) -> str:
  if layer == "fc8":
    return " (another number of classes? rule 'all_but_fc8' leaves fc8 fresh)"
  if layer == "fc6":
    return (" (another crop_size or width? fc6's inputs are the last feature map "
            "flattened; rule 'convs' leaves the FC layers fresh)")
  if layer == "fc7":
    return " (another fc_width?)"
  return " (another width or filter_size?)"


# ------------------------------------------------------------------- checkpoints


def read_source(path: str) -> tuple[Params, dict, str]:
  """(params, meta, Table 1 name) of a training workdir or a surgery/convert output."""
  if not path:
    raise ValueError("No source checkpoint given (config.init_from.checkpoint).")
  if not os.path.exists(path):
    raise FileNotFoundError(
        f"Source checkpoint {path!r} does not exist: give the workdir of a training run "
        f"(e.g. net A's, see configs/vgg11.py) or the --output of vgg_jax.surgery or "
        f"vgg_jax.convert.")
  params, meta = checkpointing.load_params(path)
  return params, meta, source_architecture(path, meta, params)


def source_architecture(path: str, meta: dict, params: Params) -> str:
  """The Table 1 name of a checkpoint: from its meta, its workdir's config.json, or
  (for foreign checkpoints without either) the conv layer names and filter sizes."""
  name = (meta or {}).get("model")
  if name is None:
    config = checkpointing.read_config(path) or {}
    name = config.get("model")
  if name is not None:
    return models.canonical_name(name)
  for candidate in models.TABLE_1:
    specs = [s for s in models.layer_specs(candidate) if isinstance(s, models.ConvSpec)]
    if ([s.name for s in specs] == [k for k in params if k.startswith("conv")]
        and all(np.shape(params[s.name]["kernel"])[0] == s.filter_size for s in specs)):
      return candidate
  raise ValueError(f"Cannot tell which net the checkpoint {path!r} holds: its meta has "
                   f"no 'model' and its layers match no Table 1 net.")


def init_params_from(config, fresh_params: Params) -> tuple[Params, SurgeryReport]:
  """Applies `config.init_from` to the run's freshly initialised `fresh_params`.

  Reads the checkpoint `config.init_from.checkpoint` (a training workdir, or an output
  of vgg_jax.surgery / vgg_jax.convert), copies the layers of rule
  `config.init_from.rule` into `fresh_params` and returns (params, report). With no
  checkpoint configured, returns `fresh_params` unchanged and an empty report. Raises FileNotFoundError for a missing checkpoint and
  ValueError for an unknown rule, a source of the wrong architecture, missing layers
  or shape mismatches.
  """
  target_model = models.canonical_name(config.model)
  path = config.init_from.checkpoint
  rule = config.init_from.rule
  if not path:
    name, _ = resolve_rule(rule)
    fresh = tuple((t, _layer_shapes(v)) for t, v in fresh_params.items())
    return fresh_params, SurgeryReport(rule=name, source="", source_model="",
                                       target_model=target_model, fresh=fresh)
  resolve_rule(rule)  # an unknown rule fails before the checkpoint is read
  source_params, _, source_model = read_source(path)
  return apply_rule(rule, source_params, fresh_params, source_model=source_model,
                    target_model=target_model, source=path)


# ----------------------------------------------------------------------- command


def fresh_params(config, num_classes: int, seed: int | None = None) -> Params:
  """The initialisation a training run with `config` draws (same seed, same keys)."""
  model = models.from_config(config, num_classes)
  init_key, _ = models.seed_keys(config.seed if seed is None else seed)
  return models.init_params(model, init_key, models.input_shape(config))


def graft(source: str, config, *, rule: str | None = None, seed: int | None = None,
          ) -> tuple[Params, dict, SurgeryReport]:
  """(params, meta, report): the net of `config`, freshly initialised with `seed` (the
  config's by default), with the layers of `rule` (config.init_from.rule by default)
  copied from the checkpoint `source`. The meta is what `checkpointing.save_params`
  stores, so the result can serve as another run's config.init_from.checkpoint."""
  rule = config.init_from.rule if rule is None else rule
  name, resolved = resolve_rule(rule)
  source_params, source_meta, source_model = read_source(source)
  num_classes = config.num_classes
  if num_classes is None:
    keeps_fc8 = "fc8" in (resolved.layers or {}).values() or (
        resolved.layers is None and "fc8" not in resolved.exclude)
    if not keeps_fc8 or "num_classes" not in source_meta:
      raise ValueError(f"Rule {name!r} leaves fc8 fresh: set the number of classes "
                       f"(--config.num_classes=N).")
    num_classes = int(source_meta["num_classes"])
  seed = config.seed if seed is None else seed
  params, report = apply_rule(
      resolved, source_params, fresh_params(config, num_classes, seed),
      source_model=source_model, target_model=config.model, source=source)
  report = dataclasses.replace(report, rule=name)
  meta = dict(models.architecture(config), model=models.canonical_name(config.model),
              num_classes=num_classes, init=config.init, seed=seed,
              surgery=report.to_json())
  if "input_convention" in source_meta:  # a converted net keeps its input convention
    meta["input_convention"] = source_meta["input_convention"]
  return params, meta, report


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  FLAGS = flags.FLAGS
  if not FLAGS["verbosity"].present:  # orbax's info logs would bury the report
    logging.set_verbosity(logging.WARNING)
  checkpointing.check_output_free(FLAGS.output)
  params, meta, report = graft(FLAGS.source, cli.config_flag(), rule=FLAGS.rule,
                               seed=FLAGS.seed)
  directory = checkpointing.save_params(FLAGS.output, params, meta)
  print(report.format())
  print(f"Wrote {directory}; start a run from it with "
        f"--config.init_from.checkpoint={FLAGS.output} --config.init_from.rule=all")


def _define_flags() -> None:
  from ml_collections import config_flags
  flags.DEFINE_string("source", None, "A training workdir or a surgery/convert output.")
  config_flags.DEFINE_config_file("config", None, "The target's config, e.g. "
                                  "configs/vgg16.py (model, width, classes, seed).")
  flags.DEFINE_string("rule", None, "A rule of vgg_jax.surgery.RULES (default: the "
                      "config's init_from.rule).")
  flags.DEFINE_string("output", None, "Directory for the grafted checkpoint.")
  flags.DEFINE_integer("seed", None, "Seed of the fresh layers (default: config.seed).")
  flags.mark_flags_as_required(["source", "config", "output"])


if __name__ == "__main__":
  _define_flags()
  cli.run(main)
