"""The method interface: a NamedTuple of pure functions over a state pytree.

A continual-learning method is the set of hooks the training loop calls. Hooks
marked (jit) run inside the jitted ``train_step`` and must be pure and
shape-stable; hooks marked (host) run between tasks, outside jit.

  init(params) -> state                                         (host)
  before_task(state, params, ctx) -> state                      (host)
  prepare_batch(state, batch, rng) -> batch                     (jit)  e.g. replay mixing
  loss(params, state, batch, logits, apply_fn, rng) -> (scalar, aux)   (jit)  penalties
  transform_grads(grads, params, state, batch, apply_fn, rng) -> grads (jit)  A-GEM
  after_step(state, old_params, new_params, grads, batch, logits, aux, rng) -> state (jit)
  after_task(state, params, ctx) -> state                       (host) Fisher, anchors

``apply_fn(params, batch, deterministic=..., rng=...)`` returns logits.
``ctx`` is a :class:`TaskContext`. ``trainable(params)`` (optional) returns a pytree
of bools: parameters where it is False are frozen. ``joint=True`` asks the loop to
train each task on the union of all tasks seen so far.

Plain fine-tuning is the method with no hooks. Compatible methods compose with
:func:`compose` (``--method=ewc+replay``).
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp


class TaskContext(NamedTuple):
  """What host-side hooks may use about the task that starts or just ended."""
  task_index: int
  task_name: str
  train: dict[str, Any]       # numpy arrays of the task's training set (full, unbatched)
  model: Any                  # the Flax module
  rng: Any                    # a key for this hook
  batch_size: int


def _no_loss(params, state, batch, logits, apply_fn, rng):
  del params, state, batch, logits, apply_fn, rng
  return jnp.zeros((), jnp.float32), ()


class Method(NamedTuple):
  """A continual-learning method as pure hooks; every field has a no-op default."""
  name: str = "finetune"
  init: Callable = lambda params: ()
  before_task: Callable = lambda state, params, ctx: state
  prepare_batch: Callable = lambda state, batch, rng: batch
  loss: Callable = _no_loss
  transform_grads: Callable = lambda grads, params, state, batch, apply_fn, rng: grads
  after_step: Callable = lambda state, old, new, grads, batch, logits, aux, rng: state
  after_task: Callable = lambda state, params, ctx: state
  trainable: Callable | None = None
  joint: bool = False


def finetune() -> Method:
  """Plain sequential fine-tuning: the catastrophic-forgetting baseline."""
  return Method(name="finetune")


def compose(*methods: Method) -> Method:
  """Runs several methods together; the state is a tuple of their states.

  Batches pass through each ``prepare_batch`` in order, losses add, gradient
  transformations chain in order, and each method updates its own state.
  """
  if len(methods) == 1:
    return methods[0]
  trainables = [m.trainable for m in methods if m.trainable is not None]
  if len(trainables) > 1:
    raise ValueError("At most one freezing method can be composed.")

  def init(params):
    return tuple(m.init(params) for m in methods)

  def before_task(state, params, ctx):
    return tuple(m.before_task(s, params, ctx) for m, s in zip(methods, state))

  def prepare_batch(state, batch, rng):
    for i, (m, s) in enumerate(zip(methods, state)):
      batch = m.prepare_batch(s, batch, jax.random.fold_in(rng, i))
    return batch

  def loss(params, state, batch, logits, apply_fn, rng):
    total, auxes = jnp.zeros((), jnp.float32), []
    for i, (m, s) in enumerate(zip(methods, state)):
      value, aux = m.loss(params, s, batch, logits, apply_fn, jax.random.fold_in(rng, i))
      total, auxes = total + value, auxes + [aux]
    return total, tuple(auxes)

  def transform_grads(grads, params, state, batch, apply_fn, rng):
    for i, (m, s) in enumerate(zip(methods, state)):
      grads = m.transform_grads(grads, params, s, batch, apply_fn, jax.random.fold_in(rng, i))
    return grads

  def after_step(state, old, new, grads, batch, logits, aux, rng):
    return tuple(m.after_step(s, old, new, grads, batch, logits, a, jax.random.fold_in(rng, i))
                 for i, (m, s, a) in enumerate(zip(methods, state, aux)))

  def after_task(state, params, ctx):
    return tuple(m.after_task(s, params, ctx) for m, s in zip(methods, state))

  return Method(name="+".join(m.name for m in methods), init=init,
                before_task=before_task, prepare_batch=prepare_batch, loss=loss,
                transform_grads=transform_grads, after_step=after_step,
                after_task=after_task, trainable=trainables[0] if trainables else None,
                joint=any(m.joint for m in methods))
