"""The class-incremental head fixes: the labels trick, ER-ACE and weight aligning.

A shared head trained on one task after another comes to prefer the newest classes:
their logits are pushed up by every step and the old ones only pushed down, so the
class-incremental accuracy of earlier tasks falls to 0 even where their features
survive. Three cheap fixes, each composable (``--method=ewc+labels_trick``):

- ``labels_trick`` (Zeno et al. 2018): the incoming examples' cross-entropy is taken
  over their task's classes only, the other classes' logits masked out of the softmax
  (rows appended by replay keep every class). The other tasks' head rows then get
  exactly zero gradient from new data.
- ``er_ace`` (Caccia et al. 2022, asymmetric cross-entropy): experience replay whose
  incoming cross-entropy excludes the classes seen before that are absent from the
  incoming batch, while the replayed examples' cross-entropy is over every class:
  ``L = CE_in(masked) + CE_buffer(all)``, the sum of the two means, the masking from
  the second task on (as Mammoth's ``er_ace.py``).
- ``weight_align`` (WA, Zhao et al. 2020): after each task k > 0 the new classes'
  head rows are rescaled by ``gamma = mean_old ||w_c|| / mean_new ||w_c||``, so their
  mean norm becomes the old classes' (PyCIL's ``weight_align``). Score head only: under
  ``--head=lm`` the label words' rows are ``wte``, the input embeddings as well.

The study's classification loss reads ``batch["ce_exclude"]`` (``[B, C]`` bool, True:
that class is out of that example's softmax; see ``losses.classification_objective``). A method
ORs its mask into it; replay pads it with False for the rows it appends, so the order
of composition does not matter.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from cljax.methods import replay
from cljax.methods.registry import BuildContext, register
from cljax.train.method import Method, StepContext, TaskContext

EXCLUDE = "ce_exclude"


def exclude_classes(batch: dict, exclude_BC: jax.Array) -> dict:
  """``batch`` with ``exclude_BC`` ORed into its ``ce_exclude`` mask."""
  old = batch.get(EXCLUDE)
  return {**batch, EXCLUDE: exclude_BC if old is None else old | exclude_BC}


def incoming(batch: dict) -> jax.Array:
  """[B] bool: the incoming stream's real rows. Replay marks the rows it appends with
  ``new_weight`` 0; before any replay every row is incoming."""
  return batch["new_weight"] > 0 if "new_weight" in batch else jnp.ones(
      batch["labels"].shape, bool)


# ----------------------------------------------------------------------------
# The labels trick
# ----------------------------------------------------------------------------

@register("labels_trick", "labels trick: incoming examples' cross-entropy over their "
          "task's classes only (Zeno et al. 2018); compose: ewc+labels_trick")
def labels_trick(hp: None, ctx: BuildContext) -> Method:
  del hp, ctx

  def prepare_batch(state, sctx: StepContext):
    del state
    return own_classes_only(sctx.batch)

  return Method(name="labels_trick", prepare_batch=prepare_batch)


def own_classes_only(batch: dict) -> dict:
  """``batch`` with each incoming example's softmax over its task's classes."""
  others_BC = ~batch["class_mask"].astype(bool)
  return exclude_classes(batch, incoming(batch)[:, None] & others_BC)


# ----------------------------------------------------------------------------
# ER-ACE
# ----------------------------------------------------------------------------

class ACEState(NamedTuple):
  buffer: replay.Buffer
  seen: jax.Array    # [C] bool: classes seen in the incoming stream so far
  task: jax.Array    # int32: tasks finished


@register("er_ace", "ER-ACE: replay with asymmetric cross-entropy, incoming over the "
          "classes present, replayed over all (Caccia et al. 2022)", replay.ReplayConfig)
def er_ace(hp: replay.ReplayConfig, ctx: BuildContext) -> Method:
  if hp.replay_policy not in replay.POLICIES:
    raise ValueError(f"Unknown --replay_policy {hp.replay_policy!r}; expected one of "
                     f"{replay.POLICIES}.")
  tag, pad = "er_ace", ctx.need("pad_token_id", "er_ace")

  def init(params):
    del params
    return ACEState(replay.init(hp.replay_size, ctx.max_length, ctx.num_labels),
                    jnp.zeros((ctx.num_labels,), bool), jnp.zeros((), jnp.int32))

  def present(batch) -> jax.Array:
    real_B = incoming(batch) & (batch["weights"] > 0)
    hits_BC = jax.nn.one_hot(batch["labels"], ctx.num_labels, dtype=bool) & real_B[:, None]
    return jnp.any(hits_BC, axis=0)

  def prepare_batch(state: ACEState, sctx: StepContext):
    batch = sctx.batch
    absent_C = state.seen & ~present(batch) & (state.task > 0)
    batch = exclude_classes(batch, incoming(batch)[:, None] & absent_C[None])
    # Replayed rows stay out of the main (incoming) loss: ``loss`` adds their own mean.
    replayed = replay.sample(state.buffer, sctx.rng, hp.replay_batch_size)
    return replay.append_replayed(batch, replayed, 0.0, tag, pad)

  def loss(state, sctx: StepContext):
    del state
    w = sctx.batch[f"{tag}_weight"]
    ce = optax.softmax_cross_entropy_with_integer_labels(sctx.logits, sctx.batch["labels"])
    return jnp.sum(w * ce) / jnp.maximum(jnp.sum(w), 1.0), ()

  def after_step(state: ACEState, sctx: StepContext):
    examples, logits = replay.incoming_examples(sctx.batch,
                                                jax.lax.stop_gradient(sctx.logits))
    return state._replace(
        buffer=replay.add(state.buffer, examples, sctx.rng, hp.replay_policy, logits),
        seen=state.seen | present(sctx.batch))

  def after_task(state: ACEState, tctx: TaskContext):
    del tctx
    return state._replace(task=state.task + 1)

  return Method(name="er_ace", init=init, prepare_batch=prepare_batch, loss=loss,
                after_step=after_step, after_task=after_task)


# ----------------------------------------------------------------------------
# Weight aligning
# ----------------------------------------------------------------------------

def align_weights(kernel_DC: jax.Array, old_classes, new_classes) -> tuple[jax.Array, float]:
  """(the kernel with the ``new_classes`` columns scaled by ``gamma``, gamma): gamma is
  the old columns' mean L2 norm over the new ones' (Zhao et al. 2020, eq. 7)."""
  scaled, gamma = _align(kernel_DC, tuple(old_classes), tuple(new_classes))
  return scaled, float(gamma)


@functools.partial(jax.jit, static_argnums=(1, 2))
def _align(kernel_DC: jax.Array, old_classes: tuple, new_classes: tuple):
  """One program (eagerly, each operation compiled one of its own)."""
  norms_C = jnp.linalg.norm(kernel_DC.astype(jnp.float32), axis=0)
  old, new = np.asarray(old_classes), np.asarray(new_classes)
  gamma = jnp.mean(norms_C[old]) / jnp.maximum(jnp.mean(norms_C[new]), 1e-12)
  return kernel_DC.at[:, new].multiply(gamma.astype(kernel_DC.dtype)), gamma


@register("weight_align", "weight aligning (WA): after each task, rescale the new classes' "
          "head rows to the old ones' mean norm (Zhao et al. 2020); compose: "
          "ewc+weight_align", heads=("score",))
def weight_align(hp: None, ctx: BuildContext) -> Method:
  del hp
  if ctx.head != "score":
    raise ValueError("weight_align rescales the score head's rows, and --head=lm has none (its "
                     "label words' rows are wte, the input embeddings too); use --head=score.")

  def adjust_params(state, tctx: TaskContext):
    del state
    k = tctx.task_index
    if k == 0:
      return tctx.params
    old = [c for t in tctx.tasks[:k] for c in t.head_labels]
    new = list(tctx.tasks[k].head_labels)
    kernel, gamma = align_weights(tctx.params["score"]["kernel"], old, new)
    tctx.report({"method": "weight_align", "gamma": gamma})
    return {**tctx.params, "score": {**tctx.params["score"], "kernel": kernel}}

  return Method(name="weight_align", adjust_params=adjust_params)

