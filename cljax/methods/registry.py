"""Methods by name, each defined in one place with its own hyperparameters.

A method module declares its hyperparameters as a frozen dataclass whose fields carry
their help text, and registers its factory with them::

    @dataclasses.dataclass(frozen=True)
    class L2Config:
      l2_lambda: float = hparam(1.0, "L2-to-previous-solution strength.")

    @register("l2", "L2 penalty to the previous task's solution", L2Config,
              grid={"l2_lambda": (0.01, 1.0)})
    def l2(hp: L2Config, ctx: BuildContext) -> Method: ...

Everything else comes from the registry: the study's flags and ``--help``
(``cljax.cli.flags``), the values of every hyperparameter (:class:`MethodConfig`), the
sweep's strength grids (``--default_grids``) and its method list (``--methods=all``).
Hyperparameter names are one flat namespace (they are flags): methods that share one
(``replay_size``) share its declaration, through a common base dataclass.
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple
from collections.abc import Callable

from cljax.models.config import GPT2_LAYOUT, Layout
from cljax.options import Bound
from cljax.train.method import Method, compose, finetune


def hparam(default, help: str, *, choices: tuple[str, ...] | None = None,  # noqa: A002
           bound: Bound | None = None):
  """A hyperparameter field: its default, its help text (the flag's) and, for a
  string, its allowed values; for a number, its ``bound`` (:data:`NON_NEGATIVE`...)."""
  if default is None:
    raise ValueError("A method hyperparameter needs a default (its type comes from it).")
  return dataclasses.field(default=default, metadata={"help": help, "choices": choices,
                                                      "bound": bound})


class HParam(NamedTuple):
  """One method hyperparameter as the flags and :class:`MethodConfig` see it."""
  name: str
  type: type          # bool, int, float or str (the default's type)
  default: Any
  help: str
  choices: tuple[str, ...] | None
  bound: Bound | None = None


class Registration(NamedTuple):
  name: str
  description: str
  factory: Callable[[Any, BuildContext], Method]
  config: type | None            # the hyperparameter dataclass (None: none)
  grid: dict[str, tuple]         # default strengths for sweeps
  heads: tuple[str, ...] = ("score", "lm")   # the study heads it works with
  traced: tuple[str, ...] = ()   # strengths its train step may read as traced values
  compose_last: bool = False     # its prepare_batch sets per-row inputs: last in a '+'


@dataclasses.dataclass(frozen=True)
class BuildContext:
  """What a method factory may need to know about the run."""
  num_labels: int
  num_tasks: int
  max_length: int
  n_layer: int
  head: str = "score"     # the study's --head: score, or lm (classification as text)
  # The model's and tokenizer's facts, unset (None) unless given: a method that needs
  # one reads it with need(), which names it when it is missing (no GPT-2 small guess).
  first_new_token: int | None = None   # the id a method's first added token gets
  eos_token_id: int | None = None
  n_embd: int | None = None
  vocab_size: int | None = None     # the model's rows of wte, before any method's tokens
  pad_token_id: int | None = None   # the tokenizer's (= eos in GPT-2's setup)
  answer_tokens: int = 1      # (--head=lm) the most tokens of any task's label word
  # The model's family and its declared interface (where its parts live); GPT-2's
  # unless given.
  family: str = "gpt2"
  layout: Layout = GPT2_LAYOUT
  tied: bool = True           # whether the LM head is the token embedding
  scan_layers: bool = False   # the blocks under nn.scan, their params stacked

  def check_per_block(self, method: str) -> None:
    """Refuses ``method``, which changes single blocks, on blocks under nn.scan."""
    if self.scan_layers:
      raise ValueError(f"{method} changes single blocks, and --scan_layers stacks them into "
                       "one; drop --scan_layers for it.")

  def need(self, name: str, method: str) -> int:
    """The field ``name``, or a clear error that ``method`` needs it."""
    value = getattr(self, name)
    if value is None:
      raise ValueError(f"The method {method!r} needs BuildContext.{name} (the model's or "
                       "tokenizer's); pass it when building the method.")
    return value


_REGISTRY: dict[str, Registration] = {}
_HPARAMS: dict[str, HParam] = {}


def _hparams_of(config: type | None) -> list[HParam]:
  if config is None:
    return []
  if not dataclasses.is_dataclass(config):
    raise TypeError(f"A method's hyperparameters must be a dataclass, got {config!r}.")
  out = []
  for f in dataclasses.fields(config):
    if "help" not in f.metadata:
      raise TypeError(f"{config.__name__}.{f.name}: declare it with hparam(default, help).")
    out.append(HParam(f.name, type(f.default), f.default, f.metadata["help"],
                      f.metadata.get("choices"), f.metadata.get("bound")))
  return out


def register(name: str, description: str, config: type | None = None, *,
             grid: dict[str, tuple] | None = None, heads: tuple[str, ...] = ("score", "lm"),
             traced: tuple[str, ...] = (), compose_last: bool = False):
  """Decorator registering ``factory(hparams, ctx) -> Method`` under ``name``.

  ``config`` is the method's hyperparameter dataclass (its fields made with
  :func:`hparam`); the factory receives an instance of it. ``grid`` gives default
  sweep values of one or more of its fields (``{"ewc_lambda": (1e2, 1e4)}``).
  ``heads``: the study's heads it works with (``--methods=all`` skips it under others).
  ``traced``: hyperparameters the factory only multiplies into its train step's loss
  (never a branch, a shape, or a between-task hook's host code), so the factory may be
  given them as traced values: runs differing in them train side by side as one
  vmapped step (:mod:`cljax.study.parallel`). ``compose_last``: its ``prepare_batch`` sets a
  model input per row from the rows it sees, so in ``a+b`` it must come last (rows a
  later method appends, replayed ones, would have none).
  """
  new = _hparams_of(config)
  for hp in new:
    old = _HPARAMS.get(hp.name)
    if old is not None and old != hp:
      raise ValueError(f"Method {name!r} declares hyperparameter {hp.name!r} as {hp}, "
                       f"but it is already declared as {old}; share one declaration.")
  grid = dict(grid or {})
  unknown = (set(grid) | set(traced)) - {hp.name for hp in new}
  if unknown:
    raise ValueError(f"Method {name!r}: grid or traced over {sorted(unknown)}, which are not "
                     "its hyperparameters.")

  def wrap(factory):
    _REGISTRY[name] = Registration(name, description, factory, config, grid, heads,
                                   tuple(traced), compose_last)
    for hp in new:
      _HPARAMS[hp.name] = hp
    return factory
  return wrap


def unregister(name: str) -> None:
  """Removes a method and the hyperparameters no other method declares."""
  reg = _REGISTRY.pop(name)
  still = {hp.name for r in _REGISTRY.values() for hp in _hparams_of(r.config)}
  for hp in _hparams_of(reg.config):
    if hp.name not in still:
      _HPARAMS.pop(hp.name, None)


register("finetune", "plain sequential fine-tuning (the forgetting baseline)")(
    lambda hp, ctx: finetune())


def names(head: str | None = None) -> list[str]:
  """Registered method names, in registration order (``finetune`` first); with
  ``head``, those that work with it."""
  return [n for n, r in _REGISTRY.items() if head is None or head in r.heads]


def registration(name: str) -> Registration:
  return _REGISTRY[parse(name)[0]]


def hparams() -> dict[str, HParam]:
  """Every registered hyperparameter by name, in registration order."""
  return dict(_HPARAMS)


def users(hparam_name: str) -> list[str]:
  """The registered methods that read hyperparameter ``hparam_name``."""
  return [r.name for r in _REGISTRY.values()
          if any(hp.name == hparam_name for hp in _hparams_of(r.config))]


def traced(spec: str) -> frozenset[str]:
  """The hyperparameters of ``spec``'s methods that they read as traced values."""
  return frozenset(t for name in parse(spec) for t in _REGISTRY[name].traced)


def descriptions() -> dict[str, str]:
  return {r.name: r.description for r in _REGISTRY.values()}


def parse(spec: str) -> list[str]:
  """Method names of ``spec`` ("ewc+replay"; "der++" is "derpp"), checked."""
  parts = [p.strip() for p in spec.replace("der++", "derpp").split("+") if p.strip()]
  unknown = [p for p in parts if p not in _REGISTRY]
  if not parts or unknown:
    raise ValueError(f"Unknown method {spec!r}: expected one of {names()}, or several "
                     "joined by '+'.")
  if len(parts) > 1 and "finetune" in parts:
    parts.remove("finetune")
  if len(set(parts)) != len(parts):
    raise ValueError(f"Method {spec!r} names a method twice.")
  early = [p for p in parts[:-1] if _REGISTRY[p].compose_last]
  if early:
    order = "+".join([p for p in parts if p != early[0]] + [early[0]])
    raise ValueError(f"Method {spec!r}: {early[0]} sets each row's model inputs as it "
                     "prepares a batch, so the rows a later method adds would have none; "
                     f"put it last (--method={order}).")
  return parts


# ----------------------------------------------------------------------------
# Hyperparameter values
# ----------------------------------------------------------------------------

def _cast(hp: HParam, value):
  """``value`` as ``hp``'s type, within its choices and bound, or a one-line error."""
  if hp.type is float and isinstance(value, int) and not isinstance(value, bool):
    value = float(value)
  if not isinstance(value, hp.type) or (hp.type is int and isinstance(value, bool)):
    raise TypeError(f"Method hyperparameter {hp.name}={value!r}: expected a "
                    f"{hp.type.__name__}.")
  if hp.choices and value not in hp.choices:
    raise ValueError(f"Unknown --{hp.name}={value!r}; expected one of {list(hp.choices)}.")
  if hp.bound:
    hp.bound.check(hp.name, value)
  return value


class MethodConfig:
  """Values of the registered methods' hyperparameters; any not given takes its
  registered default. ``MethodConfig(ewc_lambda=1e4, replay_size=200)``.

  Immutable and hashable; ``replace(**values)`` makes a changed copy and
  ``to_dict()`` lists every registered hyperparameter with its value.
  """
  __slots__ = ("_values",)

  def __init__(self, **values):
    known = hparams()
    unknown = sorted(set(values) - set(known))
    if unknown:
      raise TypeError(f"Unknown method hyperparameters {unknown}; expected some of "
                      f"{sorted(known)}.")
    cast = {k: _cast(known[k], v) for k, v in values.items()}
    object.__setattr__(self, "_values",
                       {k: v for k, v in cast.items() if v != known[k].default})

  def __getattr__(self, name: str):
    values = object.__getattribute__(self, "_values")
    if name in values:
      return values[name]
    hp = _HPARAMS.get(name)
    if hp is None:
      raise AttributeError(f"No method hyperparameter {name!r}.")
    return hp.default

  def __setattr__(self, name, value):
    raise dataclasses.FrozenInstanceError(f"MethodConfig is immutable; use replace({name}=...).")

  def replace(self, **values) -> MethodConfig:
    return MethodConfig(**{**self._values, **values})

  def to_dict(self) -> dict[str, Any]:
    return {name: getattr(self, name) for name in hparams()}

  def for_config(self, config: type | None):
    """An instance of one method's hyperparameter dataclass, filled from here."""
    if config is None:
      return None
    return config(**{f.name: getattr(self, f.name) for f in dataclasses.fields(config)})

  def __eq__(self, other):
    return isinstance(other, MethodConfig) and self._values == other._values

  def __hash__(self):
    return hash(tuple(sorted(self._values.items())))

  def __repr__(self):
    return "MethodConfig(" + ", ".join(f"{k}={v!r}" for k, v in self._values.items()) + ")"

  def __reduce__(self):
    return (_make_config, (dict(self._values),))


def _make_config(values):
  return MethodConfig(**values)


def build(spec: str, hparams_: MethodConfig, ctx: BuildContext,
          values: dict | None = None) -> Method:
  """``spec`` is a method name or several joined by '+' (``ewc+replay``); each
  factory gets its own hyperparameters from ``hparams_``, those of ``values`` (traced
  arrays, inside a jitted step) replacing the ones each method declares ``traced``."""
  methods = []
  for name in parse(spec):
    reg = _REGISTRY[name]
    hp = hparams_.for_config(reg.config)
    given = {k: v for k, v in (values or {}).items() if k in reg.traced}
    if given:
      hp = dataclasses.replace(hp, **given)
    methods.append(reg.factory(hp, ctx))
  return compose(*methods)
