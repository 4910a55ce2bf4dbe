"""Methods that act on the update rather than the loss: A-GEM's gradient projection
and layer freezing.

A-GEM (Chaudhry et al. 2019): project the gradient when it conflicts with the
gradient on a batch from the episodic memory.

``g <- g - (g . g_ref) / (g_ref . g_ref) * g_ref`` whenever ``g . g_ref < 0``, so
the update never increases the memory loss to first order. The memory is a replay
buffer (``replay.py``) filled by reservoir sampling over each finished task's
training data.

Layer freezing (``freeze``): only the head (or the head, the final LayerNorm and the
last k blocks, or the parts named, such as the MLPs and the token embeddings) is
trainable, from task ``--freeze_from`` on; the optimizer's mask leaves the rest
unchanged. ``--freeze=parts --freeze_from=2`` measures what a method that adapts only
some parts after its first task (DEN) can learn at most.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax

from cljax import data as data_lib
from cljax.methods import replay
from cljax.methods.registry import BuildContext, hparam, register
from cljax.options import POSITIVE
from cljax.train.method import Declarations, Method, StepContext, TaskContext


def tree_dot(a, b) -> jax.Array:
  """The inner product of two pytrees, in float32."""
  return optax.tree.vdot(optax.tree.cast(a, jnp.float32), optax.tree.cast(b, jnp.float32))


def project(grads, ref):
  """A-GEM's projection of ``grads`` against the reference gradient ``ref``."""
  dot = tree_dot(grads, ref)
  ref_sq = tree_dot(ref, ref)
  coef = jnp.where(dot < 0, dot / jnp.maximum(ref_sq, 1e-12), 0.0)
  return jax.tree.map(lambda g, r: g - (coef * r).astype(g.dtype), grads, ref)


@functools.lru_cache(maxsize=4)
def _jitted_add(policy: str):
  return jax.jit(functools.partial(replay.add, policy=policy))


@dataclasses.dataclass(frozen=True)
class AGEMConfig(replay.BufferConfig):
  agem_batch_size: int = hparam(8, "A-GEM memory batch size.", bound=POSITIVE)


@register("agem", "A-GEM: project gradients that conflict with the memory gradient "
          "(Chaudhry et al. 2019)", AGEMConfig)
def agem(hp: AGEMConfig, ctx: BuildContext) -> Method:
  def init(params):
    del params
    return replay.init(hp.replay_size, ctx.max_length, ctx.num_labels)

  def transform_grads(buf, sctx: StepContext):
    mem = replay.sample(buf, sctx.rng, hp.agem_batch_size)

    def mem_loss(p):
      logits = sctx.apply_fn(p, mem, deterministic=True)
      ce = optax.softmax_cross_entropy_with_integer_labels(logits, mem["labels"])
      return jnp.sum(ce * mem["weights"]) / jnp.maximum(jnp.sum(mem["weights"]), 1.0)

    ref = jax.grad(mem_loss)(sctx.params)
    projected = project(sctx.grads, ref)
    return jax.tree.map(lambda a, b: jnp.where(buf.size > 0, a, b), projected, sctx.grads)

  def after_task(buf, tctx: TaskContext):
    add = _jitted_add(hp.replay_policy)
    order_seed = np.asarray(jax.random.key_data(tctx.rng)).ravel()
    for i, batch in enumerate(data_lib.batches(tctx.train, tctx.batch_size,
                                               seed=order_seed)):
      buf = add(buf, batch, jax.random.fold_in(tctx.rng, i))
    return buf

  return Method(name="agem", init=init, transform_grads=transform_grads,
                after_task=after_task)


# The parts --freeze=parts may leave trainable.
PARTS = ("tokens", "positions", "attention", "mlp", "layer_norms", "head")


def part_modules(part: str, ctx: BuildContext) -> tuple[str, ...]:
  """The module names of ``part`` in the model's family (its declared layout)."""
  layout = ctx.layout
  if part == "positions" and layout.positions is None:
    raise ValueError(f"--freeze_parts=positions: {ctx.family} has rotary positions and no "
                     "position embedding; leave positions out.")
  return {"tokens": (layout.embedding,), "positions": (layout.positions,),
          "attention": (layout.attention,), "mlp": (layout.mlp,), "layer_norms": layout.norms,
          "head": ("score",) if ctx.tied else ("score", layout.lm_head)}[part]


@dataclasses.dataclass(frozen=True)
class FreezeConfig:
  freeze: str = hparam("head", "freeze: train only the head, the head and the last k "
                       "blocks (last_k), or the parts named by --freeze_parts (parts).",
                       choices=("head", "last_k", "parts"))
  freeze_k: int = hparam(1, "Blocks left trainable with --freeze=last_k.",
                          bound=POSITIVE)
  freeze_parts: str = hparam("mlp,head", "Parts left trainable with --freeze=parts, comma "
                             "separated, of: " + ", ".join(PARTS) + ".")
  freeze_from: int = hparam(1, "The first task (1-based) that trains frozen; the tasks "
                            "before it train every parameter.", bound=POSITIVE)


def _part_names(hp: FreezeConfig, ctx: BuildContext) -> set[str]:
  parts = [p for p in hp.freeze_parts.split(",") if p]
  unknown = sorted(set(parts) - set(PARTS))
  if unknown or not parts:
    raise ValueError(f"--freeze_parts={hp.freeze_parts!r}: expected some of "
                     f"{', '.join(PARTS)}, comma separated.")
  return {name for p in parts for name in part_modules(p, ctx)}


@register("freeze", "layer freezing: train only the head (--freeze=head), the head, "
          "final LayerNorm and last k blocks (--freeze=last_k) or named parts "
          "(--freeze=parts), from task --freeze_from on", FreezeConfig)
def freeze(hp: FreezeConfig, ctx: BuildContext) -> Method:
  if hp.freeze not in ("head", "last_k", "parts"):
    raise ValueError(f"Unknown --freeze={hp.freeze!r}; expected 'head', 'last_k' or 'parts'.")
  if hp.freeze == "head" and ctx.head == "lm" and ctx.tied:
    raise ValueError("--freeze=head trains only the score head, and --head=lm has none (its "
                     "head is the token embedding, shared with the input); use "
                     "--freeze=last_k.")
  if hp.freeze == "last_k":
    ctx.check_per_block("freeze --freeze=last_k")
  if hp.freeze == "last_k" and not 0 < hp.freeze_k <= ctx.n_layer:
    raise ValueError(f"--freeze_k={hp.freeze_k} must be in 1..{ctx.n_layer}.")
  layout = ctx.layout
  names = _part_names(hp, ctx) if hp.freeze == "parts" else set()
  blocks = ({f"{layout.block}{i}" for i in range(ctx.n_layer - hp.freeze_k, ctx.n_layer)}
            if hp.freeze == "last_k" else set())
  tops = ({"score"} | (set() if ctx.tied else {layout.lm_head})
          | ({layout.final_norm} if hp.freeze == "last_k" else set()))

  def keep(path, _):
    keys = [str(getattr(k, "key", k)) for k in path]
    if hp.freeze == "parts":
      return any(k in names for k in keys)
    return keys[0] in tops or keys[0] in blocks

  def trainable(params, task_index=0):
    if task_index < hp.freeze_from - 1:
      return jax.tree.map(lambda _: True, params)
    return jax.tree_util.tree_map_with_path(keep, params)

  return Method(name="freeze", declares=Declarations(trainable=trainable))
