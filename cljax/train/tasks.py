"""The task protocol: what happens around a task's steps, the same for the study, runs
side by side and a user's own loop.

::

    state = steps.init_train_state(params, None, rng, method)       # before any task
    for k, train in enumerate(task_arrays):
      ctx = TaskContext(task_index=k, train=train, model=model, batch_size=8, ...)
      state, plan = begin_task(method, state, ctx, options, rng=rng)
      step = jax.jit(functools.partial(steps.train_step, model=model, tx=plan.tx,
                                       method=method), donate_argnums=0)
      for batch in loop.epoch_batches(plan.arrays, 8, epochs=options.epochs, seed=(0, k)):
        state, _ = step(state, batch)
      state = end_task(method, state, ctx, plan, rng=rng)
      ... evaluate state.params (with state.method_state for per-task modules)

:func:`begin_task` shows the method the params the task starts from
(``before_task``), takes the arrays it trains on (``train_arrays``) and gives the task
a fresh optimizer over the method's trainable parameters (a new Hugging Face Trainer
per task, as the original study); :func:`end_task` runs the method's consolidation
(``after_task``, then ``adjust_params``) and drops the optimizer state. Each host hook
gets its own key, ``fold_in(rng, salt + task index)`` (:func:`hook_context`), and the
task's steps ``fold_in(rng, task index)``: a loop that passes the run's key gets the
study's keys, and so its numbers.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import numpy as np
import optax

from cljax import data as data_lib
from cljax.train import loop
from cljax.train.method import Method, TaskContext
from cljax.train.optim import OptimizerOptions, make_optimizer
from cljax.train.steps import TrainState, init_train_state

# The host hooks' keys: ``fold_in(rng, salt + task index)``, one salt per hook.
SALTS = {"before_task": 10_000, "after_task": 20_000, "train_arrays": 30_000}


class TaskPlan(NamedTuple):
  """How task ``k`` trains: the arrays it trains on (the method's ``train_arrays``),
  its optimizer, the learning rate after a number of updates (on the host), its
  batches per epoch and its steps."""
  k: int
  arrays: dict[str, np.ndarray]
  tx: optax.GradientTransformation
  schedule: Callable[[int], float]
  batches_per_epoch: int
  total_steps: int


def hook_context(ctx: TaskContext, hook: str, rng: jax.Array, **fields) -> TaskContext:
  """``ctx`` for the method's host hook ``hook`` (before_task, train_arrays,
  after_task): its own key from the run's ``rng``, and ``fields`` replaced."""
  return ctx._replace(rng=jax.random.fold_in(rng, SALTS[hook] + ctx.task_index), **fields)


def trainable_mask(method: Method, params, k: int):
  """The method's trainable parameters while task ``k`` trains, a pytree of bools
  like ``params`` (or their shapes); None: all of them."""
  trainable = method.declares.trainable
  return None if trainable is None else trainable(params, k)


def trainable_key(method: Method, params, k: int) -> tuple | None:
  """Task ``k``'s set of trainable parameters, hashable: tasks that agree on it share
  their optimizer's structure, and so their compiled train steps."""
  mask = trainable_mask(method, params, k)
  return None if mask is None else tuple(jax.tree.leaves(mask))


def task_optimizer(options: OptimizerOptions, updates: int, mask=None):
  """(optimizer, the learning rate on the host) of a task of ``updates`` updates
  (:func:`cljax.train.optim.make_optimizer` with ``options``' AdamW settings),
  frozen where ``mask`` is False."""
  return make_optimizer(
      learning_rate=options.learning_rate, total_steps=updates,
      warmup_steps=options.warmup_steps, weight_decay=options.weight_decay,
      max_grad_norm=options.max_grad_norm, grad_accum_steps=options.grad_accum_steps,
      trainable_mask=mask)


def plan_task(method: Method, ctx: TaskContext, options: OptimizerOptions, *,
              rng: jax.Array, param_shapes=None, method_state: Any = None) -> TaskPlan:
  """Task ``ctx.task_index``'s :class:`TaskPlan`: the method's ``train_arrays``
  (given ``method_state``, its state after ``before_task``) and a fresh optimizer
  over the method's trainable set (read from ``param_shapes``, the params or their
  shapes; default ``ctx.params``)."""
  k = ctx.task_index
  arrays = method.train_arrays(hook_context(ctx, "train_arrays", rng, params=None,
                                            method_state=method_state))
  per_epoch = data_lib.num_batches(data_lib.size(arrays), options.batch_size)
  mask = trainable_mask(method, ctx.params if param_shapes is None else param_shapes, k)
  tx, schedule = task_optimizer(
      options, loop.update_count(per_epoch, options.epochs, options.grad_accum_steps), mask)
  return TaskPlan(k, arrays, tx, schedule, per_epoch, per_epoch * options.epochs)


def begin_task(method: Method, state: TrainState, ctx: TaskContext,
               options: OptimizerOptions, *, rng: jax.Array, param_shapes=None
               ) -> tuple[TrainState, TaskPlan]:
  """Task ``ctx.task_index``'s starting state and plan: the method's ``before_task``
  (shown ``state.params``, the params the task starts from), its ``train_arrays``,
  and a fresh optimizer over its trainable parameters (the method's trainable set
  read from ``param_shapes``, the params' shapes; default the params themselves).
  The previous task's optimizer state is not carried over; the steps draw from
  ``fold_in(rng, task index)``."""
  k = ctx.task_index
  method_state = method.before_task(state.method_state, hook_context(
      ctx, "before_task", rng, params=state.params))
  plan = plan_task(method, ctx, options, rng=rng, method_state=method_state,
                   param_shapes=state.params if param_shapes is None else param_shapes)
  return init_train_state(state.params, plan.tx, jax.random.fold_in(rng, k), method,
                          method_state), plan


def end_task(method: Method, state: TrainState, ctx: TaskContext, plan: TaskPlan, *,
             rng: jax.Array) -> TrainState:
  """The method's consolidation after task ``plan.k``: ``after_task`` (shown the
  params the task ended at and the arrays it trained on), then ``adjust_params``
  (the params the task ends with: the evaluation and the next task see them). The
  optimizer state is dropped (the next task starts a fresh one)."""
  ctx = hook_context(ctx, "after_task", rng, params=state.params, train=plan.arrays)
  method_state = method.after_task(state.method_state, ctx)
  params = method.adjust_params(method_state, ctx._replace(params=state.params))
  return state._replace(params=params, method_state=method_state, opt_state=())
