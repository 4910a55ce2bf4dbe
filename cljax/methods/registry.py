"""Methods by name: ``build("ewc+replay", hparams, ...)`` -> a composed Method."""

from __future__ import annotations

import dataclasses
from typing import Callable

from cljax.methods.base import Method, compose, finetune


@dataclasses.dataclass(frozen=True)
class MethodConfig:
  """Hyperparameters of every method (each reads its own)."""
  # EWC family (ewc, online_ewc) and other importance-weighted penalties.
  ewc_lambda: float = 1e4
  fisher: str = "empirical"          # empirical (true labels) | true (sampled labels)
  fisher_samples: int = 512
  fisher_chunk: int = 8              # examples per vmapped chunk
  online_gamma: float = 1.0
  si_c: float = 1.0
  si_xi: float = 1e-3
  mas_lambda: float = 1.0
  mas_samples: int = 512
  l2_lambda: float = 1.0
  # Replay family.
  replay_size: int = 200
  replay_policy: str = "reservoir"   # reservoir | class_balanced
  replay_batch_size: int = 8
  der_alpha: float = 0.5
  der_beta: float = 0.5
  # Distillation.
  lwf_alpha: float = 1.0
  lwf_temperature: float = 2.0
  # Gradient projection.
  agem_batch_size: int = 8
  # Freezing.
  freeze: str = "head"               # head | last_k
  freeze_k: int = 1


@dataclasses.dataclass(frozen=True)
class BuildContext:
  """What a method factory may need to know about the run."""
  num_labels: int
  num_tasks: int
  max_length: int
  n_layer: int


_FACTORIES: dict[str, Callable[[MethodConfig, BuildContext], Method]] = {
    "finetune": lambda hp, ctx: finetune(),
}
DESCRIPTIONS: dict[str, str] = {
    "finetune": "plain sequential fine-tuning (the forgetting baseline)",
}


def register(name: str, description: str):
  """Decorator registering ``factory(hparams, ctx) -> Method`` under ``name``."""
  def wrap(factory):
    _FACTORIES[name] = factory
    DESCRIPTIONS[name] = description
    return factory
  return wrap


def names() -> list[str]:
  return sorted(_FACTORIES)


def parse(spec: str) -> list[str]:
  """Method names of ``spec`` ("ewc+replay"; "der++" is "derpp"), checked."""
  parts = [p.strip() for p in spec.replace("der++", "derpp").split("+") if p.strip()]
  unknown = [p for p in parts if p not in _FACTORIES]
  if not parts or unknown:
    raise ValueError(f"Unknown method {spec!r}: expected one of {names()}, or several "
                     "joined by '+'.")
  if len(parts) > 1 and "finetune" in parts:
    parts.remove("finetune")
  if len(set(parts)) != len(parts):
    raise ValueError(f"Method {spec!r} names a method twice.")
  return parts


def build(spec: str, hparams: MethodConfig, ctx: BuildContext) -> Method:
  """``spec`` is a method name or several joined by '+' (``ewc+replay``)."""
  return compose(*[_FACTORIES[p](hparams, ctx) for p in parse(spec)])
