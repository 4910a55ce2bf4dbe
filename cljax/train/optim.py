"""The optimizer: AdamW with the Hugging Face Trainer's defaults (its options, its
weight-decay rule, its linear warmup and decay as values of the optimizer state, a
frozen set of parameters with no optimizer state)."""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

from cljax.options import NON_NEGATIVE, POSITIVE, Options, option


@dataclasses.dataclass(frozen=True)
class OptimizerOptions(Options):
  """AdamW and its schedule, the Hugging Face Trainer's defaults."""
  batch_size: int = option(8, "Training batch size.", bound=POSITIVE)
  eval_batch_size: int = option(32, "Evaluation batch size.", bound=POSITIVE)
  epochs: int = option(1, "Epochs per task.", bound=POSITIVE)
  learning_rate: float = option(5e-5, "AdamW peak learning rate, decayed linearly to 0 over "
                                "each task (Hugging Face Trainer default 5e-5).",
                                bound=NON_NEGATIVE)
  warmup_steps: int = option(0, "Linear warmup steps per task.",
                             bound=NON_NEGATIVE)
  weight_decay: float = option(0.0, "AdamW weight decay (not on biases and LayerNorm).",
                                bound=NON_NEGATIVE)
  max_grad_norm: float = option(1.0, "Clip gradients to this global norm (0: off).",
                                 bound=NON_NEGATIVE)
  grad_accum_steps: int = option(1, "Micro-batches per update.", bound=POSITIVE)
  seed: int = option(0, "The one seed: subsets, init, data order, dropout.")


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
