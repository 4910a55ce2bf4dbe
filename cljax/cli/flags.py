"""absl flags generated from the config: one flag per :class:`StudyConfig` field and
one per registered method hyperparameter, each with the help text of its declaration.

A program defines them with :func:`define_flags` (on ``absl.flags.FLAGS`` by default,
or another ``FlagValues``: tests, embedding), builds its config with
:func:`study_config` and records :func:`flag_values`. :func:`define_config_flags` and
:func:`config_from_flags` do the same for any config dataclass (LM training's).
"""

from __future__ import annotations

import dataclasses
import types
import typing
from typing import Any

from absl import flags

from cljax.methods import MethodConfig, registry
from cljax.options import RENAMED
from cljax.study.config import StudyConfig

FLAGS = flags.FLAGS


def _base_type(annotation) -> Any:
  """``int | None`` -> int; ``tuple[str, ...]`` -> tuple; others unchanged."""
  if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
    annotation = next(a for a in typing.get_args(annotation) if a is not type(None))
  return typing.get_origin(annotation) or annotation


def _define(fv: flags.FlagValues, name: str, kind, default, help_: str,
            choices=None, repeatable: bool = False) -> None:
  if name in fv:   # defined already (a second call, or another config sharing the field)
    return
  if choices:
    flags.DEFINE_enum(name, default, list(choices), help_, flag_values=fv)
  elif kind is tuple:
    define = flags.DEFINE_multi_string if repeatable else flags.DEFINE_list
    define(name, list(default), help_, flag_values=fv)
  else:
    define = {bool: flags.DEFINE_bool, int: flags.DEFINE_integer,
              float: flags.DEFINE_float, str: flags.DEFINE_string}[kind]
    define(name, default, help_, flag_values=fv)


def _config_fields(cls=StudyConfig) -> list[tuple[dataclasses.Field, Any]]:
  hints = typing.get_type_hints(cls)
  return [(f, _base_type(hints[f.name])) for f in dataclasses.fields(cls)
          if f.metadata.get("flag", True)]


def define_config_flags(cls, fv: flags.FlagValues = FLAGS) -> None:
  """Defines one flag per field of the config dataclass ``cls`` (``option`` fields:
  type, default, help, choices) on ``fv``."""
  for f, kind in _config_fields(cls):
    help_ = f.metadata["help"]
    if f.name == "method":
      help_ += " One of: " + "; ".join(f"{n}: {d}" for n, d in
                                      registry.descriptions().items())
    _define(fv, f.name, kind, f.default, help_, f.metadata.get("choices"),
            f.metadata.get("repeatable", False))
  for old_name, name in RENAMED.items():   # an older flagfile's name still sets the flag
    if name in fv and old_name not in fv:
      flags.DEFINE_alias(old_name, name, flag_values=fv)


def config_from_flags(cls, fv: flags.FlagValues = FLAGS, **overrides):
  """An instance of ``cls`` from the parsed flags (``overrides`` win)."""
  return cls(**{**{f.name: tuple(fv[f.name].value) if kind is tuple else fv[f.name].value
                   for f, kind in _config_fields(cls)}, **overrides})


def define_flags(fv: flags.FlagValues = FLAGS) -> None:
  """Defines the study's flags and every registered method hyperparameter on ``fv``."""
  define_config_flags(StudyConfig, fv)
  for hp in registry.hparams().values():
    _define(fv, hp.name, hp.type, hp.default,
            f"[{', '.join(registry.users(hp.name))}] {hp.help}", hp.choices)


def study_config(fv: flags.FlagValues = FLAGS, **overrides) -> StudyConfig:
  """The :class:`StudyConfig` of the parsed flags (``overrides`` win)."""
  # A method registered after the flags were defined has no flags: its defaults.
  method_config = MethodConfig(**{n: fv[n].value for n in registry.hparams() if n in fv})
  return config_from_flags(StudyConfig, fv, **{"method_config": method_config, **overrides})


def flag_values(fv: flags.FlagValues = FLAGS) -> dict:
  """The values of this project's flags (not absl's own), for results.json."""
  ours = set()
  for module, module_flags in fv.flags_by_module_dict().items():
    if "absl" not in module:
      ours.update(f.name for f in module_flags)
  return {name: fv[name].value for name in sorted(ours - set(RENAMED))}
