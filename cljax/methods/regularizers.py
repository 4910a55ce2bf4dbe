"""Importance-weighted quadratic penalties: EWC, online EWC, SI, MAS, L2.

Each keeps a :class:`QuadraticState` ``(importance, anchor)`` and adds
``scale * sum(importance * (theta - anchor)**2)`` to the loss, so the penalty goes
through the optimizer (Adam) as in the papers. They differ in how the importance
is estimated and consolidated at the end of each task:

- EWC (Kirkpatrick et al. 2017): diagonal Fisher from per-example gradients of
  log p(y|x); one penalty per past task, ``lam/2 * sum_t F_t (theta - theta*_t)^2``.
  That sum equals ``lam/2 * A (theta - m)^2 + const`` with ``A = sum_t F_t`` and
  ``m = sum_t F_t theta*_t / A``, so cljax keeps ``(A, m)``: exact gradients with
  two param-sized trees whatever the number of tasks.
- Online EWC (Schwarz et al. 2018): ``F <- gamma * F + F_t``, anchor the latest solution.
- SI (Zenke et al. 2017): path integral ``w -= g * delta_theta`` over each step,
  ``Omega += w / (delta_total^2 + xi)`` per task; penalty ``c * sum Omega (theta - theta*)^2``.
- MAS (Aljundi et al. 2018): ``Omega`` the mean over examples of
  ``|d ||f(x)||_2^2 / d theta|``, accumulated over tasks; penalty
  ``lam * sum Omega (theta - theta*)^2``.
- L2: ``lam/2 * sum (theta - theta_prev)^2``.

The Fisher (and MAS importance) is estimated from per-example gradients,
``F = 1/N sum_i g_i^2`` over N examples (:mod:`cljax.methods.per_example`).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, NamedTuple
from collections.abc import Callable

from absl import logging
import jax
import jax.numpy as jnp
import numpy as np
import optax

from cljax.methods.per_example import (fisher_diagonal, fisher_log_prob, mas_importance,
                                       mas_output_norm, model_fn, per_example_programs)
from cljax.methods.registry import BuildContext, hparam, register
from cljax.options import FRACTION, NON_NEGATIVE, POSITIVE
from cljax.train.method import Declarations, Method, StepContext, TaskContext


class QuadraticState(NamedTuple):
  importance: Any           # pytree like params (F, Omega, or ones for L2)
  anchor: Any               # pytree like params
  active: jax.Array         # float32 scalar: 0 before the first task ends


class SIState(NamedTuple):
  quad: QuadraticState
  path: Any                 # running path integral w of the current task
  start: Any                # params at the start of the current task


# The between-task updates below are jitted, one program each: run eagerly, every
# operation on every parameter shape would compile a program of its own after the
# first step (98 in a 2-task EWC study).

@jax.jit
def _f32_copy(params):
  """A float32 copy (never an alias: the train step donates params)."""
  return jax.tree.map(lambda p: jnp.array(p, dtype=jnp.float32, copy=True), params)


def quadratic_penalty(params, state: QuadraticState) -> jax.Array:
  """``sum(importance * (params - anchor)^2)`` over every leaf (unscaled)."""
  per_leaf = jax.tree.map(lambda p, a, f: jnp.sum(f * jnp.square(p.astype(jnp.float32) - a)),
                          params, state.anchor, state.importance)
  return optax.tree.sum(per_leaf) * state.active


@jax.jit
def _zeros_state(params) -> QuadraticState:
  zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params)
  return QuadraticState(zeros, jax.tree.map(jnp.copy, zeros), jnp.zeros((), jnp.float32))


def _penalty_method(name: str, scale: float, consolidate: Callable, **kwargs) -> Method:
  """A method whose loss adds ``scale * quadratic_penalty``."""
  def loss(state, ctx: StepContext):
    quad = state.quad if isinstance(state, SIState) else state
    return scale * quadratic_penalty(ctx.params, quad), ()
  return Method(name=name, init=kwargs.pop("init", _zeros_state), loss=loss,
                after_task=consolidate, **kwargs)


# ----------------------------------------------------------------------------
# Consolidation rules
# ----------------------------------------------------------------------------

@jax.jit
def consolidate_ewc(state: QuadraticState, fisher, params) -> QuadraticState:
  """``A <- A + F``; ``m <- (A m + F theta) / (A + F)``: the sum of per-task penalties."""
  new_a = jax.tree.map(jnp.add, state.importance, fisher)
  anchor = jax.tree.map(
      lambda a, m, f, p, na: jnp.where(na > 0, (a * m + f * p) / jnp.where(na > 0, na, 1.0),
                                       p.astype(jnp.float32)),
      state.importance, state.anchor, fisher, params, new_a)
  return QuadraticState(new_a, anchor, jnp.ones((), jnp.float32))


@functools.partial(jax.jit, static_argnums=3)
def consolidate_online(state: QuadraticState, importance, params, gamma: float
                       ) -> QuadraticState:
  """``F <- gamma * F + F_t`` and the anchor moves to the latest solution."""
  new = jax.tree.map(lambda a, f: gamma * a + f, state.importance, importance)
  return QuadraticState(new, _f32_copy(params), jnp.ones((), jnp.float32))


@jax.jit
def _sum_and_max(tree) -> jax.Array:
  return jnp.stack([optax.tree.sum(tree), optax.tree.max(tree)])


def _log_importance(name, tree):
  """Logs the importance's sum and max, reduced on device (no param-sized copies)."""
  total, top = np.asarray(_sum_and_max(tree))
  logging.info("%s importance: sum %.4g, max %.4g over %d parameters.", name,
               total, top, optax.tree.size(tree))


# ----------------------------------------------------------------------------
# Hyperparameters
# ----------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class PerExampleConfig:
  fisher_chunk: int = hparam(8, "Examples per vmapped chunk of per-example gradients "
                             "(memory bound).", bound=POSITIVE)


@dataclasses.dataclass(frozen=True)
class EWCConfig(PerExampleConfig):
  ewc_lambda: float = hparam(1e4, "EWC / online EWC strength (penalty lam/2 * sum F "
                             "(theta - theta*)^2).", bound=NON_NEGATIVE)
  fisher: str = hparam("empirical", "Fisher estimator: empirical (true labels) or true "
                       "(labels sampled from the model). Per-example gradients either way.",
                       choices=("empirical", "true"))
  fisher_samples: int = hparam(512, "Training examples of the finished task used for the "
                               "Fisher.", bound=POSITIVE)


@dataclasses.dataclass(frozen=True)
class OnlineEWCConfig(EWCConfig):
  online_gamma: float = hparam(1.0, "Online EWC decay of the running Fisher (Schwarz et "
                               "al. 2018).", bound=FRACTION)


@dataclasses.dataclass(frozen=True)
class MASConfig(PerExampleConfig):
  mas_lambda: float = hparam(1.0, "MAS strength (Aljundi et al. 2018).",
                             bound=NON_NEGATIVE)
  mas_samples: int = hparam(512, "Training examples used for MAS importances.",
                            bound=POSITIVE)


@dataclasses.dataclass(frozen=True)
class L2Config:
  l2_lambda: float = hparam(1.0, "L2-to-previous-solution strength.",
                            bound=NON_NEGATIVE)


@dataclasses.dataclass(frozen=True)
class SIConfig:
  si_c: float = hparam(1.0, "SI strength c (Zenke et al. 2017).",
                       bound=NON_NEGATIVE)
  si_xi: float = hparam(1e-3, "SI damping xi.", bound=POSITIVE)


# ----------------------------------------------------------------------------
# The methods
# ----------------------------------------------------------------------------

def _ewc(hp: EWCConfig, online: bool) -> Method:
  def after_task(state, tctx: TaskContext):
    fisher = fisher_diagonal(tctx.model, tctx.params, tctx.train, mode=hp.fisher,
                             num_samples=hp.fisher_samples, chunk=hp.fisher_chunk,
                             rng=tctx.rng, buckets=tctx.length_buckets)
    _log_importance("Fisher", fisher)
    if online:
      return consolidate_online(state, fisher, tctx.params, hp.online_gamma)
    return consolidate_ewc(state, fisher, tctx.params)

  def programs(state, tctx: TaskContext):
    del state
    return per_example_programs(
        tctx.params, tctx.train, model_fn(fisher_log_prob, tctx.model, hp.fisher),
        jnp.square, num_samples=hp.fisher_samples, chunk=hp.fisher_chunk, rng=tctx.rng,
        buckets=tctx.length_buckets)
  return _penalty_method("online_ewc" if online else "ewc", hp.ewc_lambda / 2, after_task,
                         declares=Declarations(programs=programs))


@register("ewc", "EWC: one Fisher-weighted penalty per past task (Kirkpatrick et al. 2017)",
          EWCConfig, grid={"ewc_lambda": (1e2, 1e4, 1e6)}, traced=("ewc_lambda",))
def ewc(hp: EWCConfig, ctx: BuildContext) -> Method:
  del ctx
  return _ewc(hp, online=False)


@register("online_ewc", "online EWC: one running Fisher decayed by gamma (Schwarz et al. "
          "2018)", OnlineEWCConfig, grid={"ewc_lambda": (1e3, 1e5)},
          traced=("ewc_lambda",))
def online_ewc(hp: OnlineEWCConfig, ctx: BuildContext) -> Method:
  del ctx
  return _ewc(hp, online=True)


@register("mas", "MAS: importance from the gradient of the squared output norm "
          "(Aljundi et al. 2018)", MASConfig, grid={"mas_lambda": (0.1, 10.0)},
          traced=("mas_lambda",))
def mas(hp: MASConfig, ctx: BuildContext) -> Method:
  del ctx

  def after_task(state, tctx: TaskContext):
    omega = mas_importance(tctx.model, tctx.params, tctx.train, num_samples=hp.mas_samples,
                           chunk=hp.fisher_chunk, rng=tctx.rng,
                           buckets=tctx.length_buckets)
    _log_importance("MAS", omega)
    return consolidate_online(state, omega, tctx.params, 1.0)

  def programs(state, tctx: TaskContext):
    del state
    return per_example_programs(
        tctx.params, tctx.train, model_fn(mas_output_norm, tctx.model), jnp.abs,
        num_samples=hp.mas_samples, chunk=hp.fisher_chunk, rng=tctx.rng,
        buckets=tctx.length_buckets)
  return _penalty_method("mas", hp.mas_lambda, after_task,
                         declares=Declarations(programs=programs))


@register("l2", "L2 penalty to the previous task's solution", L2Config,
          grid={"l2_lambda": (0.01, 1.0)}, traced=("l2_lambda",))
def l2(hp: L2Config, ctx: BuildContext) -> Method:
  del ctx

  def after_task(state, tctx: TaskContext):
    del state
    return _l2_state(tctx.params)
  return _penalty_method("l2", hp.l2_lambda / 2, after_task)


@jax.jit
def _l2_state(params) -> QuadraticState:
  ones = jax.tree.map(lambda p: jnp.ones(p.shape, jnp.float32), params)
  return QuadraticState(ones, _f32_copy(params), jnp.ones((), jnp.float32))


def si_path_update(path, old_params, new_params, grads):
  """One step of SI's path integral: ``w -= g * (theta_new - theta_old)``."""
  return jax.tree.map(lambda w, g, a, b: w - g.astype(jnp.float32) * (b - a).astype(
      jnp.float32), path, grads, old_params, new_params)


@functools.partial(jax.jit, static_argnums=2)
def si_consolidate(state: SIState, params, xi: float) -> SIState:
  """``Omega += w / (delta^2 + xi)`` with delta the task's total parameter change;
  the anchor and the next task's start are the current params; w resets."""
  delta = jax.tree.map(lambda p, s: p.astype(jnp.float32) - s, params, state.start)
  omega = jax.tree.map(lambda o, w, d: o + jnp.maximum(w, 0.0) / (jnp.square(d) + xi),
                       state.quad.importance, state.path, delta)
  current = _f32_copy(params)
  return SIState(QuadraticState(omega, current, jnp.ones((), jnp.float32)),
                 jax.tree.map(jnp.zeros_like, state.path), jax.tree.map(jnp.copy, current))


@jax.jit
def _si_restart(state: SIState, params) -> SIState:
  """The start of a task: the path integral at zero, the start at ``params``."""
  return state._replace(start=_f32_copy(params), path=jax.tree.map(jnp.zeros_like, state.path))


@register("si", "SI: importance from the path integral of each step (Zenke et al. 2017)",
          SIConfig, grid={"si_c": (0.1, 10.0)}, traced=("si_c",))
def si(hp: SIConfig, ctx: BuildContext) -> Method:
  del ctx

  @jax.jit
  def init(params):
    quad = _zeros_state(params)
    return SIState(quad, jax.tree.map(jnp.zeros_like, quad.anchor), _f32_copy(params))

  def before_task(state: SIState, tctx: TaskContext):
    return _si_restart(state, tctx.params)

  def after_step(state: SIState, sctx: StepContext):
    return state._replace(path=si_path_update(state.path, sctx.old_params, sctx.new_params,
                                              sctx.grads))

  def after_task(state: SIState, tctx: TaskContext):
    out = si_consolidate(state, tctx.params, hp.si_xi)
    _log_importance("SI", out.quad.importance)
    return out

  return _penalty_method("si", hp.si_c, after_task, init=init, before_task=before_task,
                         after_step=after_step)
