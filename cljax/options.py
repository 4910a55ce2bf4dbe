"""Settings defined once: a config field is a flag, a ``--help`` line, a check and a
``results.json`` entry at once.

:func:`option` declares a field with its help text, its choices or its numeric
:class:`Bound`; :class:`Options` checks them when a config is made. Every config of
the project (the models', the optimizer's, the study's, LM training's) and every
method hyperparameter (``cljax.methods.hparam``) is declared with them; the command
line's flags are generated from them (``cljax.cli.flags``).
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple
from collections.abc import Callable


class Bound(NamedTuple):
  """A constraint on a numeric setting, checked before any work: ``text`` says it."""
  text: str
  holds: Callable[[Any], bool]

  def check(self, name: str, value) -> None:
    """One-line ValueError unless ``value`` (None: unset, always fine) holds."""
    if value is not None and not self.holds(value):
      raise ValueError(f"--{name}={value!r}: expected a value {self.text}.")


POSITIVE = Bound("> 0", lambda v: v > 0)
NON_NEGATIVE = Bound(">= 0", lambda v: v >= 0)
FRACTION = Bound("in [0, 1]", lambda v: 0 <= v <= 1)
DROPOUT = Bound("in [0, 1)", lambda v: 0 <= v < 1)

COUNT = Bound("> 0, or -1 for all", lambda v: v > 0)
DEVICES = Bound("> 0, or -1 for all devices left", lambda v: v > 0 or v == -1)


def option(default, help: str, *, choices: tuple[str, ...] | None = None,  # noqa: A002
           repeatable: bool = False, bound: Bound | None = None):
  """A config field with its flag's help text; ``repeatable`` makes a flag given once
  per value (``--classes=a=x,y --classes=b=z``) instead of a comma-separated list;
  ``bound`` is the numeric constraint :meth:`Options.validate` checks."""
  return dataclasses.field(default=default, metadata={"help": help, "choices": choices,
                                                      "repeatable": repeatable,
                                                      "bound": bound})


class Options:
  """Checks its fields' declared choices and bounds (:func:`option`) when made."""

  def __post_init__(self):
    self.validate()

  def validate(self) -> None:
    """Every field with declared choices or a bound, each failure a one-line
    ``ValueError`` naming the flag, the value and what is expected."""
    for f in dataclasses.fields(self):
      value, meta = getattr(self, f.name), f.metadata
      if meta.get("choices") and value not in meta["choices"]:
        raise ValueError(f"--{f.name}={value!r}: expected one of {list(meta['choices'])}.")
      if meta.get("bound"):
        meta["bound"].check(f.name, value)

  def replace(self, **kwargs):
    return dataclasses.replace(self, **kwargs)

  def to_dict(self) -> dict:
    """Every field as JSON-ready values."""
    d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
    return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}


# Settings renamed since runs were stored, old name -> new: an old flagfile's
# ``--dropout_rng`` and a checkpoint's stored ``dropout_rng`` mean ``dropout_rng_impl``
# (the name of an RNG implementation, not a key).
RENAMED = {"dropout_rng": "dropout_rng_impl"}


def with_current_names(settings: dict) -> dict:
  """``settings`` (a stored config) with every :data:`RENAMED` setting under its
  current name."""
  return {RENAMED.get(k, k): v for k, v in settings.items()}
