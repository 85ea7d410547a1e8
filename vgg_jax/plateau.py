"""The paper's learning-rate schedule (section 3.1): divide by 10 on a plateau.

"The learning rate was initially set to 1e-2, and then decreased by a factor of 10 when
the validation set accuracy stopped improving." It was decreased 3 times.

This is a host-side controller rather than `optax.contrib.reduce_on_plateau` because
its state must survive a restart: it is a small frozen dataclass, saved as JSON in every
checkpoint, and `update` is a pure function of (state, accuracy). optax's version
minimises a loss, counts every update call towards patience, and keeps its state inside
the optimiser state, where resuming it needs the optimiser's exact structure.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping


@dataclasses.dataclass(frozen=True)
class PlateauConfig:
  learning_rate: float = 1e-2
  factor: float = 0.1           # multiply the rate by this on a plateau
  patience: int = 2             # evaluations without improvement that make a plateau
  threshold: float = 1e-3       # an improvement must beat the best accuracy by this
  max_drops: int = 3
  stop_after_last: bool = True  # a plateau after the last drop ends training

  def __post_init__(self):
    if not self.learning_rate > 0:
      raise ValueError(f"learning_rate must be > 0, got {self.learning_rate!r}.")
    if not 0 < self.factor < 1:
      raise ValueError(f"plateau.factor must be in (0, 1) (the paper: 0.1), got "
                       f"{self.factor!r}.")
    if self.patience < 1:
      raise ValueError(f"plateau.patience must be >= 1 evaluation, got {self.patience!r}.")
    if self.threshold < 0:
      raise ValueError(f"plateau.threshold must be >= 0, got {self.threshold!r}.")
    if self.max_drops < 0:
      raise ValueError(f"plateau.max_drops must be >= 0, got {self.max_drops!r}.")

  @classmethod
  def from_config(cls, config) -> "PlateauConfig":
    """Reads the run config's learning_rate and plateau.* fields."""
    p = config.plateau
    return cls(learning_rate=config.learning_rate, factor=p.factor, patience=p.patience,
               threshold=p.threshold, max_drops=p.max_drops,
               stop_after_last=p.stop_after_last)


@dataclasses.dataclass(frozen=True)
class PlateauState:
  learning_rate: float
  best_accuracy: float = -1.0
  evals_since_best: int = 0
  drops: int = 0
  stopped: bool = False

  def to_json(self) -> dict[str, Any]:
    return dataclasses.asdict(self)

  @classmethod
  def from_json(cls, d: Mapping[str, Any]) -> "PlateauState":
    return cls(**d)


def initial_state(config: PlateauConfig) -> PlateauState:
  return PlateauState(learning_rate=config.learning_rate)


def update(config: PlateauConfig, state: PlateauState, accuracy: float) -> PlateauState:
  """The state after one validation evaluation with top-1 `accuracy` in [0, 1]."""
  if state.stopped:
    return state
  if accuracy > state.best_accuracy + config.threshold:
    return dataclasses.replace(state, best_accuracy=float(accuracy), evals_since_best=0)
  waited = state.evals_since_best + 1
  if waited < config.patience:
    return dataclasses.replace(state, evals_since_best=waited)
  if state.drops < config.max_drops:
    return dataclasses.replace(state, learning_rate=state.learning_rate * config.factor,
                               drops=state.drops + 1, evals_since_best=0)
  return dataclasses.replace(state, evals_since_best=waited,
                             stopped=config.stop_after_last)
