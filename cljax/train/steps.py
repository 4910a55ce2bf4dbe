"""The train state and the pure train and eval steps of classification and causal
language modelling.

The steps are plain functions; jit them where the loop is built, e.g.::

    step = jax.jit(functools.partial(train_step, model=model, tx=tx),
                   donate_argnums=0)

A batch is a dict of fixed-shape arrays:
  ``input_ids`` [B, T] int32, ``attention_mask`` [B, T] int32, ``labels`` [B] int32,
  ``weights`` [B] float32 (0 for padding examples of a last, partial batch),
  ``class_mask`` [B, C] bool (the classes of each example's task, for task-aware
  accuracy and methods that need it), ``task_ids`` [B] int32; optionally
  ``ce_exclude`` [B, C] bool (classes left out of that example's training softmax:
  the labels trick, ER-ACE).

Steps return sums and counts; the host divides. The losses they share with the
methods are :mod:`cljax.train.losses`, the optimizer :mod:`cljax.train.optim`.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from cljax.models import MODEL_INPUTS, GPT2LM
from cljax.train import losses
from cljax.train.losses import Batch
from cljax.train.method import Method, StepContext, finetune


class TrainState(NamedTuple):
  """Everything a training step reads and writes."""
  step: jax.Array          # int32 scalar, optimizer steps taken in this run
  params: Any
  opt_state: Any
  rng: jax.Array           # base key; folded with ``step`` for dropout
  method_state: Any = ()   # the mitigation's state (EWC anchors, replay buffer, ...)


def init_train_state(params, tx: optax.GradientTransformation, rng: jax.Array,
                     method: Method = finetune(), method_state=None) -> TrainState:
  """A fresh train state (step 0) for ``params`` (``tx`` None: no optimizer state)."""
  if method_state is None:
    method_state = method.init(params)
  return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                    opt_state=() if tx is None else tx.init(params), rng=rng,
                    method_state=method_state)


# ----------------------------------------------------------------------------
# Steps
# ----------------------------------------------------------------------------

def forward(model, params, batch: Batch, *, deterministic: bool, rng=None) -> jax.Array:
  """``model``'s logits on ``batch``, with the optional model inputs the batch carries
  (:data:`cljax.models.MODEL_INPUTS`); ``rng`` draws dropout when not
  ``deterministic``."""
  rngs = None if deterministic else {"dropout": rng}
  modules = {k: batch[k] for k in MODEL_INPUTS if batch.get(k) is not None}
  return model.apply({"params": params}, batch["input_ids"], batch["attention_mask"],
                     deterministic=deterministic, rngs=rngs, **modules)


def _lm_apply(model, *, deterministic, rng=None):
  """``lm_apply_fn(params, input_ids, attention_mask, deterministic=, rng=,
  peft_slot=None, logits_index=None) -> [B, T, vocab]``: the trunk of ``model`` with its
  tied LM head (``logits_index [B, K]``: the logits at those tokens only, ``[B, K,
  vocab]``)."""
  lm = GPT2LM(model.config)

  def lm_apply_fn(params, input_ids, attention_mask, deterministic=deterministic, rng=rng,
                  peft_slot=None, logits_index=None):
    return forward(lm, params, {"input_ids": input_ids, "attention_mask": attention_mask,
                                 "peft_slot": peft_slot, "logits_index": logits_index},
                    deterministic=deterministic, rng=rng)
  return lm_apply_fn


def dropout_key(rng: jax.Array, impl: str = "threefry") -> jax.Array:
  """The dropout key of a step. ``threefry`` (partitionable: JAX's default since 0.5,
  checked here when the step is traced, since the other layout gives other masks on
  another mesh or padded length) gives the same masks whatever the device mesh, vmap
  or padding; ``rbg`` (XLA's RngBitGenerator) gives other masks inside a vmap."""
  if impl == "threefry":
    if not jax.config.jax_threefry_partitionable:
      raise ValueError("dropout_rng_impl='threefry' needs jax_threefry_partitionable=True "
                       "(JAX's default since 0.5), found False: unset "
                       "JAX_THREEFRY_PARTITIONABLE or call jax.config.update("
                       "'jax_threefry_partitionable', True).")
    return rng
  return jax.random.wrap_key_data(jax.random.bits(rng, (4,), jnp.uint32), impl=impl)


def _step(state: TrainState, batch: Batch, *, model, tx: optax.GradientTransformation,
          method: Method, deterministic: bool, dropout_rng_impl: str, objective
          ) -> tuple[TrainState, dict[str, jax.Array]]:
  """One optimizer step of ``objective(logits, batch) -> (mean loss, metric sums)``
  plus the method's terms: its batch, loss, gradient and after-step hooks, AdamW."""
  rng = jax.random.fold_in(state.rng, state.step)
  batch_rng, drop_key, method_rng, grad_rng, after_rng = jax.random.split(rng, 5)
  drop_key = dropout_key(drop_key, dropout_rng_impl)
  lm_drop_key = dropout_key(jax.random.fold_in(method_rng, 1), dropout_rng_impl)

  def apply_fn(params, inputs, deterministic=deterministic, rng=drop_key):
    return forward(model, params, inputs, deterministic=deterministic, rng=rng)

  lm_apply_fn = (_lm_apply(model, deterministic=deterministic, rng=lm_drop_key)
                 if hasattr(model, "config") else None)
  ctx = StepContext(params=state.params, batch=batch, apply_fn=apply_fn, rng=batch_rng,
                    lm_apply_fn=lm_apply_fn)
  batch = method.prepare_batch(state.method_state, ctx)
  ctx = ctx._replace(batch=batch)

  def loss_fn(params):
    logits = apply_fn(params, batch)
    loss, sums = objective(logits, batch)
    extra, aux = method.loss(state.method_state, ctx._replace(params=params, logits=logits,
                                                              rng=method_rng))
    return loss + extra, (sums, extra, logits, aux)

  (loss, (sums, extra, logits, aux)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
      state.params)
  grads = method.transform_grads(state.method_state, ctx._replace(grads=grads, rng=grad_rng))
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  params = method.proximal(state.method_state, ctx._replace(
      old_params=state.params, new_params=params, grads=grads, rng=after_rng))
  method_state = method.after_step(state.method_state, ctx._replace(
      old_params=state.params, new_params=params, grads=grads, logits=logits, aux=aux,
      rng=after_rng))
  grad_norm = optax.tree.norm(grads)
  metrics = {**sums, "penalty": extra, "grad_norm": grad_norm,
             "finite": jnp.isfinite(loss) & jnp.isfinite(grad_norm)}
  new_state = TrainState(step=state.step + 1, params=params, opt_state=opt_state,
                         rng=state.rng, method_state=method_state)
  return new_state, metrics


def train_step(state: TrainState, batch: Batch, *, model, tx: optax.GradientTransformation,
               method: Method = finetune(), deterministic: bool = False,
               dropout_rng_impl: str = "threefry") -> tuple[TrainState, dict[str, jax.Array]]:
  """One optimizer step: CE on the pooled logits plus the method's terms, AdamW.

  Returns the new state and metric sums (``loss_sum``, ``correct``, ``count``,
  ``grad_norm`` and ``finite``: 1.0 when loss and gradients are all finite).
  """
  return _step(state, batch, model=model, tx=tx, method=method, deterministic=deterministic,
               dropout_rng_impl=dropout_rng_impl, objective=losses.classification_objective)


def eval_step(params, batch: Batch, *, model, method: Method = finetune(),
              method_state=()) -> dict[str, jax.Array]:
  """Sums over a batch: loss, class-incremental and task-aware correct, count.

  Class-incremental accuracy takes the argmax over all classes of the shared head;
  task-aware accuracy restricts the argmax to the classes of the example's task. A
  method with an ``eval_logits`` hook (per-task modules) gives both logits, and its
  own sums (``task_inference_correct``) join these.
  """
  weights = batch["weights"]
  extra = {}
  if method.eval_logits is None:
    logits = task_logits = forward(model, params, batch, deterministic=True)
  else:
    def apply_fn(p, inputs, deterministic=True, rng=None):
      return forward(model, p, inputs, deterministic=deterministic, rng=rng)
    logits, task_logits, extra = method.eval_logits(method_state, StepContext(
        params=params, batch=batch, apply_fn=apply_fn,
        lm_apply_fn=_lm_apply(model, deterministic=True)))
  task_logits = jnp.where(batch["class_mask"], task_logits, -jnp.inf)
  return {
      **extra,
      "loss_sum": losses.cross_entropy(logits, batch["labels"], weights),
      "correct": jnp.sum((jnp.argmax(logits, -1) == batch["labels"]) * weights),
      "task_correct": jnp.sum((jnp.argmax(task_logits, -1) == batch["labels"]) * weights),
      "count": jnp.sum(weights),
  }


def logits_step(params, batch: Batch, *, model) -> jax.Array:
  """Deterministic logits of a batch (for distillation targets and analysis)."""
  return forward(model, params, batch, deterministic=True)


# ----------------------------------------------------------------------------
# Causal language modelling
# ----------------------------------------------------------------------------

def lm_train_step(state: TrainState, batch: Batch, *, model, tx: optax.GradientTransformation,
                  method: Method = finetune(), deterministic: bool = False,
                  dropout_rng_impl: str = "threefry") -> tuple[TrainState, dict[str, jax.Array]]:
  """One optimizer step on the mean next-token CE of the batch's target tokens plus
  the method's terms; ``model`` is a :class:`~cljax.models.GPT2LM`.

  The batch holds ``input_ids``, ``attention_mask`` and ``loss_mask`` ``[B, T]`` (see
  :func:`lm_cross_entropy`). Returns the new state and sums: ``loss_sum`` (CE over
  the targets), ``count`` (their number), ``correct`` (targets the argmax predicts),
  ``grad_norm`` and ``finite``.
  """
  return _step(state, batch, model=model, tx=tx, method=method, deterministic=deterministic,
               dropout_rng_impl=dropout_rng_impl, objective=losses.next_token_objective)


def lm_eval_step(params, batch: Batch, *, model) -> dict[str, jax.Array]:
  """Sums over a batch: next-token CE over the target tokens, their number and the
  argmax hits (perplexity is ``exp(loss_sum / count)`` over a whole split)."""
  logits = forward(model, params, batch, deterministic=True)
  return losses.next_token_objective(logits, batch)[1]
