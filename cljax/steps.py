"""The train state, the optimizer (AdamW with the Hugging Face Trainer's defaults) and
the pure train and eval steps of classification and causal language modelling.

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

Steps return sums and counts; the host divides.
"""

from __future__ import annotations

import concurrent.futures
import functools
import os
from typing import Any, NamedTuple
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

from cljax.methods.base import Method, StepContext, finetune
from cljax.models import MODEL_INPUTS, GPT2LM

Batch = dict[str, jax.Array]


class TrainState(NamedTuple):
  """Everything a training step reads and writes."""
  step: jax.Array          # int32 scalar, optimizer steps taken in this run
  params: Any
  opt_state: Any
  rng: jax.Array           # base key; folded with ``step`` for dropout
  method_state: Any = ()   # the mitigation's state (EWC anchors, replay buffer, ...)


# ----------------------------------------------------------------------------
# Optimizer
# ----------------------------------------------------------------------------

def decay_mask(params):
  """True for matrices (kernels, embeddings), False for biases and LayerNorm
  parameters: the Hugging Face Trainer's weight-decay rule."""
  return jax.tree_util.tree_map_with_path(
      lambda path, _: getattr(path[-1], "key", None) not in ("bias", "scale"), params)


def linear_warmup_decay(count, peak, warmup_steps, total_steps, xp=jnp):
  """The learning rate after ``count`` updates: linear warmup from 0 to ``peak`` over
  ``warmup_steps``, then linear decay to 0 at ``total_steps`` (the Hugging Face
  Trainer's ``get_linear_schedule_with_warmup``), computed as optax's linear schedules
  compute it but from values that may be traced: a schedule's length is data, not a
  constant of the compiled step. ``xp=np`` computes it on the host (for the log)."""
  warm = xp.maximum(warmup_steps, 1)
  decay = xp.maximum(total_steps - warmup_steps, 1)
  up = (0.0 - peak) * (1 - xp.clip(count, 0, warm) / warm) + peak
  down = peak * (1 - xp.clip(count - warmup_steps, 0, decay) / decay)
  return xp.where(count < warmup_steps, up, down)


def host_learning_rate(count: int, peak: float, warmup_steps: int, total_steps: int) -> float:
  """:func:`linear_warmup_decay` on the host, a Python float (no device program)."""
  return float(linear_warmup_decay(count, peak, warmup_steps, total_steps, xp=np))


def make_optimizer(*, learning_rate: float = 5e-5, total_steps: int, warmup_steps: int = 0,
                   weight_decay: float = 0.0, max_grad_norm: float | None = 1.0,
                   b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8,
                   grad_accum_steps: int = 1, trainable_mask=None
                   ) -> tuple[optax.GradientTransformation, Callable[[int], float]]:
  """AdamW with the Hugging Face Trainer's defaults: lr 5e-5 decayed linearly to 0
  over ``total_steps`` (after an optional linear warmup), weight decay 0, gradient
  clipping at global norm 1.0.

  ``total_steps`` counts optimizer updates (after gradient accumulation). The peak,
  warmup and total are values in the optimizer state (``optax.inject_hyperparams``),
  not constants of the compiled update: optimizers that differ only in them share
  their programs (tasks of any length train with one train step per shape).
  ``trainable_mask`` (a pytree of bools like the params, or a function of them)
  freezes the parameters where it is False: their updates are exactly zero.

  Returns:
    (optimizer, the learning rate after a number of updates, on the host).
  """
  total_steps = max(int(total_steps), 1)
  warmup_steps = min(int(warmup_steps), total_steps)

  def adamw(peak_lr, warmup, total):
    return optax.adamw(lambda count: linear_warmup_decay(count, peak_lr, warmup, total),
                       b1=b1, b2=b2, eps=eps, weight_decay=weight_decay, mask=decay_mask)

  parts = []
  if max_grad_norm:
    parts.append(optax.clip_by_global_norm(max_grad_norm))
  parts.append(optax.inject_hyperparams(adamw)(peak_lr=learning_rate, warmup=warmup_steps,
                                               total=total_steps))
  tx = optax.chain(*parts)
  if trainable_mask is not None:
    # Frozen leaves get no optimizer state and a zero update.
    tx = optax.multi_transform(
        {"train": tx, "freeze": optax.set_to_zero()},
        lambda p: jax.tree.map(lambda t: "train" if t else "freeze",
                               trainable_mask(p) if callable(trainable_mask)
                               else trainable_mask))
  if grad_accum_steps > 1:
    tx = optax.MultiSteps(tx, every_k_schedule=grad_accum_steps)
  return tx, functools.partial(host_learning_rate, peak=learning_rate,
                               warmup_steps=warmup_steps, total_steps=total_steps)


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

def cross_entropy(logits_BC, labels_B, weights_B):
  """Sum over examples of ``weights * CE`` (the host or caller divides)."""
  losses = optax.softmax_cross_entropy_with_integer_labels(logits_BC, labels_B)
  return jnp.sum(losses * weights_B)


def _forward(model, params, batch, *, deterministic, rng=None):
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
    return _forward(lm, params, {"input_ids": input_ids, "attention_mask": attention_mask,
                                 "peft_slot": peft_slot, "logits_index": logits_index},
                    deterministic=deterministic, rng=rng)
  return lm_apply_fn


def dropout_key(rng: jax.Array, impl: str = "rbg") -> jax.Array:
  """The dropout key of a step. ``rbg`` (XLA's RngBitGenerator) draws the dropout
  masks several times faster than threefry on CPU; ``threefry`` gives the same
  masks whatever the device mesh."""
  if impl == "threefry":
    return rng
  return jax.random.wrap_key_data(jax.random.bits(rng, (4,), jnp.uint32), impl=impl)


def _step(state: TrainState, batch: Batch, *, model, tx: optax.GradientTransformation,
          method: Method, deterministic: bool, dropout_rng: str, objective
          ) -> tuple[TrainState, dict[str, jax.Array]]:
  """One optimizer step of ``objective(logits, batch) -> (mean loss, metric sums)``
  plus the method's terms: its batch, loss, gradient and after-step hooks, AdamW."""
  rng = jax.random.fold_in(state.rng, state.step)
  batch_rng, drop_rng, method_rng, grad_rng, after_rng = jax.random.split(rng, 5)
  drop_rng = dropout_key(drop_rng, dropout_rng)
  lm_drop_rng = dropout_key(jax.random.fold_in(method_rng, 1), dropout_rng)

  def apply_fn(params, inputs, deterministic=deterministic, rng=drop_rng):
    return _forward(model, params, inputs, deterministic=deterministic, rng=rng)

  lm_apply_fn = (_lm_apply(model, deterministic=deterministic, rng=lm_drop_rng)
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
  method_state = method.after_step(state.method_state, ctx._replace(
      old_params=state.params, new_params=params, grads=grads, logits=logits, aux=aux,
      rng=after_rng))
  grad_norm = optax.tree.norm(grads)
  metrics = {**sums, "penalty": extra, "grad_norm": grad_norm,
             "finite": jnp.isfinite(loss) & jnp.isfinite(grad_norm)}
  new_state = TrainState(step=state.step + 1, params=params, opt_state=opt_state,
                         rng=state.rng, method_state=method_state)
  return new_state, metrics


def _classification(logits_BC, batch: Batch):
  """The mean CE over the batch's examples, and its metric sums. A method may set
  ``ce_weights`` (the CE's own example weights: 0 where its loss replaces the CE, as
  LAMOL's full-vocabulary QA loss) and ``ce_exclude`` (classes out of an example's
  softmax: the labels trick); the metrics keep ``weights``."""
  weights = batch["weights"]
  count = jnp.maximum(jnp.sum(weights), 1.0)
  ce_logits_BC = logits_BC
  if "ce_exclude" in batch:
    ce_logits_BC = jnp.where(batch["ce_exclude"], jnp.finfo(logits_BC.dtype).min, logits_BC)
  losses_B = optax.softmax_cross_entropy_with_integer_labels(ce_logits_BC, batch["labels"])
  ce = jnp.sum(losses_B * weights) / count
  objective = jnp.sum(losses_B * batch.get("ce_weights", weights)) / count
  return objective, {"loss_sum": ce * jnp.sum(weights),
              "correct": jnp.sum((jnp.argmax(logits_BC, -1) == batch["labels"]) * weights),
              "count": jnp.sum(weights)}


def train_step(state: TrainState, batch: Batch, *, model, tx: optax.GradientTransformation,
               method: Method = finetune(), deterministic: bool = False,
               dropout_rng: str = "rbg") -> tuple[TrainState, dict[str, jax.Array]]:
  """One optimizer step: CE on the pooled logits plus the method's terms, AdamW.

  Returns the new state and metric sums (``loss_sum``, ``correct``, ``count``,
  ``grad_norm`` and ``finite``: 1.0 when loss and gradients are all finite).
  """
  return _step(state, batch, model=model, tx=tx, method=method, deterministic=deterministic,
               dropout_rng=dropout_rng, objective=_classification)


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
    logits = task_logits = _forward(model, params, batch, deterministic=True)
  else:
    def apply_fn(p, inputs, deterministic=True, rng=None):
      return _forward(model, p, inputs, deterministic=deterministic, rng=rng)
    logits, task_logits, extra = method.eval_logits(method_state, StepContext(
        params=params, batch=batch, apply_fn=apply_fn,
        lm_apply_fn=_lm_apply(model, deterministic=True)))
  task_logits = jnp.where(batch["class_mask"], task_logits, -jnp.inf)
  return {
      **extra,
      "loss_sum": cross_entropy(logits, batch["labels"], weights),
      "correct": jnp.sum((jnp.argmax(logits, -1) == batch["labels"]) * weights),
      "task_correct": jnp.sum((jnp.argmax(task_logits, -1) == batch["labels"]) * weights),
      "count": jnp.sum(weights),
  }


@jax.jit
def tree_add(a, b):
  """``a + b`` leaf by leaf, one program (eagerly: one per leaf shape)."""
  return jax.tree.map(jnp.add, a, b)


def accumulate(step_fn, params, batches) -> dict[str, Any]:
  """The sums ``step_fn(params, batch)`` returns (an eval step), added on device over
  ``batches`` and read to the host once."""
  totals = None
  for batch in batches:
    out = step_fn(params, batch)
    totals = out if totals is None else tree_add(totals, out)
  return jax.device_get(totals)


def compile_ahead(jitted, arg_sets) -> None:
  """Compiles the ``jax.jit`` function ``jitted`` for each argument tuple in ``arg_sets``
  at once (:func:`compile_programs`)."""
  compile_programs([(jitted, args) for args in arg_sets])


def compile_programs(programs) -> None:
  """Compiles ``(jitted, args)`` pairs (``jax.jit`` functions and an argument tuple
  each) at once: each is traced and lowered in turn, and XLA compiles each in a
  parallel thread (outside the GIL) as soon as it is lowered, so a run's programs take
  about one compilation's wall time per core instead of one each, and the lowering of
  the next overlaps the compilation of the last. The calls that follow find the
  programs in jit's own cache; those already compiled cost nothing here."""
  programs = list(programs)
  if not programs:
    return
  with concurrent.futures.ThreadPoolExecutor(min(len(programs), os.cpu_count() or 1)) as ex:
    done = [ex.submit(jitted.lower(*args).compile) for jitted, args in programs]
  for d in done:
    d.result()


def logits_step(params, batch: Batch, *, model) -> jax.Array:
  """Deterministic logits of a batch (for distillation targets and analysis)."""
  return _forward(model, params, batch, deterministic=True)


# ----------------------------------------------------------------------------
# Causal language modelling
# ----------------------------------------------------------------------------

def lm_cross_entropy(logits_BTV, input_ids_BT, loss_mask_BT):
  """(sum of next-token CE over the target tokens, their number, how many of them
  the argmax predicts).

  ``loss_mask[b, t] = 1`` makes token t a target, predicted from position t-1 (so
  position 0 never is one): instruction tuning marks the response and its EOS, plain
  LM training every real token after the first."""
  losses_BT, weights_BT = next_token_losses(logits_BTV, input_ids_BT, loss_mask_BT)
  hits_BT = jnp.argmax(logits_BTV[:, :-1], -1) == input_ids_BT[:, 1:]
  return jnp.sum(losses_BT * weights_BT), jnp.sum(weights_BT), jnp.sum(hits_BT * weights_BT)


def next_token_losses(logits_BTV, input_ids_BT, loss_mask_BT):
  """(the CE of each token t >= 1 predicted from position t-1, ``[B, T-1]`` float32;
  its weight, ``loss_mask[:, 1:]``): the shifted loss every LM objective shares."""
  logits_BTV, targets_BT = logits_BTV[:, :-1].astype(jnp.float32), input_ids_BT[:, 1:]
  losses_BT = optax.softmax_cross_entropy_with_integer_labels(logits_BTV, targets_BT)
  return losses_BT, loss_mask_BT[:, 1:].astype(jnp.float32)


def _next_token(logits_BTV, batch: Batch):
  loss_sum, count, correct = lm_cross_entropy(logits_BTV, batch["input_ids"],
                                              batch["loss_mask"])
  return loss_sum / jnp.maximum(count, 1.0), {"loss_sum": loss_sum, "count": count,
                                              "correct": correct}


def lm_train_step(state: TrainState, batch: Batch, *, model, tx: optax.GradientTransformation,
                  method: Method = finetune(), deterministic: bool = False,
                  dropout_rng: str = "rbg") -> tuple[TrainState, dict[str, jax.Array]]:
  """One optimizer step on the mean next-token CE of the batch's target tokens plus
  the method's terms; ``model`` is a :class:`~cljax.models.GPT2LM`.

  The batch holds ``input_ids``, ``attention_mask`` and ``loss_mask`` ``[B, T]`` (see
  :func:`lm_cross_entropy`). Returns the new state and sums: ``loss_sum`` (CE over
  the targets), ``count`` (their number), ``correct`` (targets the argmax predicts),
  ``grad_norm`` and ``finite``.
  """
  return _step(state, batch, model=model, tx=tx, method=method, deterministic=deterministic,
               dropout_rng=dropout_rng, objective=_next_token)


def lm_eval_step(params, batch: Batch, *, model) -> dict[str, jax.Array]:
  """Sums over a batch: next-token CE over the target tokens, their number and the
  argmax hits (perplexity is ``exp(loss_sum / count)`` over a whole split)."""
  logits = _forward(model, params, batch, deterministic=True)
  return _next_token(logits, batch)[1]
