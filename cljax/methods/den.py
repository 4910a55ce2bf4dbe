"""Dynamically Expandable Networks (Yoon, Yang, Lee and Hwang, ICLR 2018) on GPT-2.

Units are the hidden neurons of each block's MLP (``c_fc`` column and bias, ``c_proj``
row; :mod:`cljax.models.den`), ``den_capacity`` per block allocated ahead, used by a
mask; a task's head is its rows of the ``score`` head (the labels trick). A unit has a
``birth`` (the task it was added at; ``NEVER`` while free) and a ``retired`` (the first
task it no longer serves: a split unit's old copy); task k runs the units with
``birth <= k < retired``, k given (task-aware) or inferred by entropy, as ``pnn``.

Task 1 trains the whole network (the reference: all of it, with L1). At task t > 1,
attention, embeddings, LayerNorms and ``c_proj``'s bias stay frozen, and:

1. Selective retraining. ``before_task`` fits the paper's sparse linear model: task
   t's classes predicted from every block's unit activations at the pooled token,
   ``--den_select_steps`` of Adam (``--den_lr``) each followed by the reference's L1
   step (``w <- 0 if |w| < den_l1 else w - den_l1 sign(w)``); the selected units are
   those left with a nonzero weight. The study's training of the task then trains
   only them (their gradient is masked) and the task's head, with
   ``den_l2 * 1/2 ||theta - theta_{t-1}||^2`` over them (``regular_lambda``).
2. Dynamic expansion (``after_task``). If the task's mean training loss is above
   ``--den_loss_threshold``, ``--den_expand_k`` free units per block are born at t
   and trained alone with the head (``--den_expand_steps``), each Adam step followed
   by the group-lasso step on each new unit's weights (``c_fc`` column, bias, ``c_proj``
   row: shrunk by ``den_group_lasso`` in norm, zeroed under it); the units left at
   zero are freed again (pruned).
3. Split and duplication. A selected unit whose incoming weights drifted
   (``||c_fc[:, j] - c_fc^{t-1}[:, j]||_2``) more than ``--den_split_threshold`` is
   duplicated into a free unit: the new copy (born at t) keeps the drifted values and
   serves task t on, the old copy gets its values before the task back and is retired
   at t (it serves the earlier tasks). The units born at t then train with the head
   for ``--den_split_steps``.

Where this follows the reference code (``jaehong31/DEN``, ``DEN.py``): the L1 and
group-lasso steps are its proximal assignments after each Adam step, with fixed
thresholds; the selection is by exactly nonzero weights; the loss threshold is checked
after selective retraining; pruning frees new units whose weights are exactly zero;
the drift is the L2 distance of a unit's incoming weights. Where it departs, and why:
- A transformer has no unit-to-unit connections to search breadth-first: every
  block's MLP writes into the residual stream the head reads, so the sparse model is
  fit on all blocks' units at once (the reference fits the head on the top layer and
  follows nonzero weights down). Its units are selected by any nonzero weight over
  the task's classes (the reference reads column 0 only); the probe is discarded.
- The reference's selective pass runs one iteration (its loop breaks at once), its
  expansion and retraining until the validation loss settles; here a fixed number of
  steps each, without dropout. Its L1 default (1e-5 at lr 1e-3) leaves every weight
  nonzero after one Adam step, selecting every unit; 5e-4 here lets the model choose.
- Split: done after every task (the paper's Algorithm 1; the reference splits only
  after an expansion, at most ``ex_k`` units, the least drifted ones over the
  threshold). Here every unit over the threshold splits while free capacity lasts,
  the most drifted first. The new copy keeps the unit's bias (the reference draws it
  at random) and the old copy stops serving task t (the reference keeps both copies
  in task t's network): the split leaves task t's network as it was trained, and
  the old copy stays frozen, so earlier tasks get exactly their units back.
- Attention, embeddings and LayerNorms are trained with task 1 and frozen after (the
  reference's layers are all units); units outside the selection, retired copies and
  other tasks' head rows are restored bit for bit at the task's end (AdamW's weight
  decay would otherwise move them). Capacity is allocated ahead (``--den_capacity``):
  no compiled shape changes; when it runs out, expansion and splitting take what is
  left, and the report says so.
"""

from __future__ import annotations

import dataclasses
import itertools
from typing import Any, NamedTuple

from absl import logging
import jax
import jax.numpy as jnp
import numpy as np
import optax

from cljax import data as data_lib
from cljax.methods import head_fixes
from cljax.methods.peft import InferenceOptions, PerTaskState, infer_task
from cljax.methods.registry import BuildContext, hparam, register
from cljax.models import pool_index
from cljax.models.den import (NEVER, alive, first_free, group_lasso, keep_units, new_units,
                              pooled_units, split_units, unit_arrays, unit_sq, with_units)
from cljax.options import NON_NEGATIVE, POSITIVE
from cljax.train import loop
from cljax.train.method import Declarations, Method, StepContext, TaskContext

_KEYS = ("input_ids", "attention_mask", "labels", "weights", "class_mask", "task_ids")


@dataclasses.dataclass(frozen=True)
class DENConfig(InferenceOptions):
  den_l1: float = hparam(5e-4, "DEN: the L1 step of the sparse model that selects the "
                         "units (per step, after Adam, as the reference).", bound=NON_NEGATIVE)
  den_l2: float = hparam(0.5, "DEN: strength of the L2 pull of the selected units toward "
                         "their values before the task.", bound=NON_NEGATIVE)
  den_loss_threshold: float = hparam(0.01, "DEN: expand when the task's mean training loss "
                                     "after selective retraining is above this.",
                                     bound=NON_NEGATIVE)
  den_expand_k: int = hparam(10, "DEN: units added to each block's MLP by an expansion.",
                             bound=NON_NEGATIVE)
  den_group_lasso: float = hparam(1e-3, "DEN: the group-lasso step on each new unit's "
                                  "weights (per step, after Adam).", bound=NON_NEGATIVE)
  den_split_threshold: float = hparam(0.05, "DEN: a selected unit whose incoming weights "
                                      "moved more than this (L2) is split.",
                                      bound=NON_NEGATIVE)
  den_capacity: int = hparam(0, "DEN: MLP units per block allocated ahead for expansion "
                             "and splitting (0: 2 x n_embd).", bound=NON_NEGATIVE)
  den_lr: float = hparam(1e-3, "DEN: Adam's learning rate in its own passes (the sparse "
                         "model, expansion, the retraining after a split).", bound=POSITIVE)
  den_select_steps: int = hparam(100, "DEN: steps of the sparse model that selects units.",
                                 bound=POSITIVE)
  den_expand_steps: int = hparam(200, "DEN: steps training the new units of an expansion.",
                                 bound=NON_NEGATIVE)
  den_split_steps: int = hparam(100, "DEN: steps retraining the units born at the task "
                                "after a split.", bound=NON_NEGATIVE)


class DENState(NamedTuple):
  tasks: PerTaskState     # the tasks begun and their classes (task inference)
  task: jax.Array         # int32: the task being trained
  birth: jax.Array        # [L, W] int32: the task each unit was added at (NEVER: free)
  retired: jax.Array      # [L, W] int32: the first task a unit no longer serves
  selected: jax.Array     # [L, W] bool: the units task ``task`` retrains
  anchor: Any             # {"units": unit arrays, "score": kernel} after the last task


def alive_table(state: DENState) -> jax.Array:
  """``[S, L, W]`` bool: the units of every task."""
  s = jnp.arange(state.tasks.active.shape[0])[:, None, None]
  return alive(state.birth[None], state.retired[None], s)


def own_class_ce(logits_BC, batch) -> jax.Array:
  """The weighted mean cross-entropy over each example's own task's classes."""
  z = jnp.where(batch["class_mask"], logits_BC, -1e9)
  ce = optax.softmax_cross_entropy_with_integer_labels(z, batch["labels"])
  return jnp.sum(ce * batch["weights"]) / jnp.maximum(jnp.sum(batch["weights"]), 1.0)


# ----------------------------------------------------------------------------
# DEN's own passes: Adam, then a proximal step, on fixed-shape batches
# ----------------------------------------------------------------------------

def _batches(train, batch_size: int, steps: int | None = None, seed=()):
  """``steps`` shuffled batches of ``train``, epoch after epoch as the study draws
  them (None: one epoch, in order)."""
  train = {k: v for k, v in train.items() if k in _KEYS}
  if steps is None:
    return list(data_lib.batches(train, batch_size))
  epochs = -(-steps // data_lib.num_batches(data_lib.size(train), batch_size))
  return list(itertools.islice(loop.epoch_batches(train, batch_size, epochs=epochs,
                                                  seed=seed), steps))


def run_pass(loss_fn, theta, consts, batches, lr: float, grad_mask=lambda g: g,
             prox=lambda t: t):
  """``theta`` after one Adam step (``grad_mask`` on its gradient) and one ``prox`` per
  batch of ``loss_fn(theta, consts, batch)``; one compiled step."""
  tx = optax.chain(optax.stateless(lambda g, _: grad_mask(g)), optax.adam(lr))

  @jax.jit
  def step(theta, opt_state, consts, batch):
    grads = jax.grad(loss_fn)(theta, consts, batch)
    updates, opt_state = tx.update(grads, opt_state, theta)
    return prox(optax.apply_updates(theta, updates)), opt_state

  opt_state = tx.init(theta)
  for batch in batches:
    theta, opt_state = step(theta, opt_state, consts, batch)
  return theta


def _units_BLW(units_LW, batch):
  return jnp.broadcast_to(units_LW, (batch["labels"].shape[0],) + units_LW.shape
                          ).astype(jnp.float32)


def select_units(model, params, units_LW, batches, hp: DENConfig) -> np.ndarray:
  """Step 1's sparse model: ``[L, W]`` bool, the units of ``units_LW`` whose weight in
  an L1-sparse linear model of the task's classes on the pooled unit activations of
  every block is nonzero after ``batches``."""
  L, W = units_LW.shape
  C = model.config.num_labels

  def features(consts, batch):
    params, units = consts
    _, inter = model.apply({"params": params}, batch["input_ids"], batch["attention_mask"],
                           den_units=_units_BLW(units, batch), mutable=["intermediates"])
    idx_B = pool_index(batch["input_ids"], model.config.pad_token_id)
    return jax.lax.stop_gradient(pooled_units(inter["intermediates"], idx_B, L))

  def loss_fn(probe, consts, batch):
    logits = jnp.einsum("blw,lwc->bc", features(consts, batch), probe["w"]) + probe["b"]
    return own_class_ce(logits, batch)

  def l1(probe):
    w = probe["w"]
    return {**probe, "w": jnp.where(jnp.abs(w) < hp.den_l1, 0.0, w - hp.den_l1 * jnp.sign(w))}

  probe = {"w": jnp.zeros((L, W, C), jnp.float32), "b": jnp.zeros((C,), jnp.float32)}
  probe = run_pass(loss_fn, probe, (params, jnp.asarray(units_LW)), batches, hp.den_lr,
                   prox=l1)
  return np.asarray(jnp.any(probe["w"] != 0, axis=-1) & units_LW)


def _head_loss(model, n_layer):
  """``loss(theta, (params, units_LW), batch)`` of the task over ``theta = {"units",
  "score"}``, the network the units ``units_LW`` of ``params`` with theta's values."""
  def loss_fn(theta, consts, batch):
    params, units_LW = consts
    p = with_units(params, theta["units"], n_layer)
    p = {**p, "score": {**p["score"], "kernel": theta["score"]}}
    logits = model.apply({"params": p}, batch["input_ids"], batch["attention_mask"],
                         den_units=_units_BLW(units_LW, batch))
    return own_class_ce(logits, batch)
  return loss_fn


def train_units(model, params, theta, units_LW, train_LW, classes_C, batches, lr, prox=None):
  """``theta = {"units", "score"}`` after training the units ``train_LW`` and the head
  columns ``classes_C`` (the network: the units ``units_LW``); the rest stays exact."""
  def grad_mask(g):
    return {"units": keep_units(g["units"], train_LW),
            "score": jnp.where(classes_C[None, :], g["score"], 0.0)}
  return run_pass(_head_loss(model, len(units_LW)), theta, (params, jnp.asarray(units_LW)),
                  batches, lr, grad_mask, prox or (lambda t: t))


def mean_loss(model, params, theta, units_LW, batches) -> float:
  """The task's weighted mean training loss over ``batches`` (in order, all of them)."""
  loss_fn = jax.jit(_head_loss(model, len(units_LW)))
  consts = (params, jnp.asarray(units_LW))
  total = count = 0.0
  for b in batches:
    n = float(np.sum(b["weights"]))
    total, count = total + float(loss_fn(theta, consts, b)) * n, count + n
  return total / max(count, 1.0)


# ----------------------------------------------------------------------------
# Expansion and split
# ----------------------------------------------------------------------------

def params_in_use(params, state: DENState, k: int) -> int:
  """Parameters task k's network reads: everything but the units and the head, plus
  its units and its head columns."""
  total = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))
  L, D, W = state.anchor["units"]["fc_k"].shape
  C = state.tasks.slot_classes.shape[1]
  units = int(np.sum(np.asarray(alive(state.birth, state.retired, k))))
  classes = int(np.sum(np.asarray(state.tasks.slot_classes[k])))
  return total - L * W * (2 * D + 1) - D * C + units * (2 * D + 1) + D * classes


def _grow(model, ctx, hp, theta, st, units_LW, classes_C, t, rec):
  """Step 2 when the loss is over the threshold: (theta, birth) with the survivors."""
  new = first_free(st["birth"], hp.den_expand_k)
  if int(new.sum(1).min()) < hp.den_expand_k:
    logging.warning("DEN: the capacity is exhausted; task %d adds %s units.", t, new.sum(1))
  theta = {**theta, "units": new_units(theta["units"], new, jax.random.fold_in(ctx.rng, 1),
                                       model.config.initializer_range)}
  st["birth"] = np.where(new, t, st["birth"])
  batches = _batches(ctx.train, ctx.batch_size, hp.den_expand_steps, (t, 2))
  theta = train_units(model, ctx.params, theta, units_LW | new, new, classes_C, batches,
                      hp.den_lr, lambda th: group_lasso(th, jnp.asarray(new), hp.den_group_lasso))
  pruned = new & (np.asarray(unit_sq(theta["units"])) == 0)
  st["birth"] = np.where(pruned, NEVER, st["birth"])
  rec.update(units_added=new.sum(1).tolist(), units_pruned=pruned.sum(1).tolist())
  return theta


def consolidate(model, ctx: TaskContext, state: DENState, hp: DENConfig):
  """Steps 2 and 3 after the selective retraining of task t (``ctx.params``):
  (the new state, the report)."""
  t, L, prev = ctx.task_index, state.birth.shape[0], state.anchor
  classes_C = state.tasks.slot_classes[t]
  units = keep_units(unit_arrays(ctx.params, L), state.selected, prev["units"])
  theta = {"units": units, "score": jnp.where(classes_C[None, :], ctx.params["score"]["kernel"],
                                              prev["score"])}
  st = {"birth": np.asarray(state.birth).copy(), "retired": np.asarray(state.retired).copy()}
  units_LW = alive(st["birth"], st["retired"], t)
  loss = mean_loss(model, ctx.params, theta, units_LW, _batches(ctx.train, ctx.batch_size))
  rec = {"units_selected": np.asarray(state.selected).sum(1).tolist(), "train_loss": loss,
         "expanded": loss > hp.den_loss_threshold, "units_added": [0] * L,
         "units_pruned": [0] * L}
  if rec["expanded"] and hp.den_expand_k:
    theta = _grow(model, ctx, hp, theta, st, units_LW, classes_C, t, rec)
  before = jax.tree.map(np.asarray, prev["units"])
  drift = np.sqrt(np.sum(np.square(np.asarray(theta["units"]["fc_k"]) - before["fc_k"]), 1))
  over = np.asarray(state.selected) & (drift > hp.den_split_threshold)
  split = split_units(theta["units"], before, drift, over, st["birth"], st["retired"], t)
  theta["units"], st["birth"], st["retired"], rec["units_split"], rec["split_skipped"] = split
  born = st["birth"] == t
  if born.any() and hp.den_split_steps and sum(rec["units_split"]):
    batches = _batches(ctx.train, ctx.batch_size, hp.den_split_steps, (t, 3))
    theta = train_units(model, ctx.params, theta, alive(st["birth"], st["retired"], t), born,
                        classes_C, batches, hp.den_lr)
  state = state._replace(birth=jnp.asarray(st["birth"]), retired=jnp.asarray(st["retired"]),
                         anchor=theta)
  return state, rec


# ----------------------------------------------------------------------------
# The method
# ----------------------------------------------------------------------------

def den_trainable(params, task_index: int):
  """Task 1: everything but the capacity; later tasks: the units and the head."""
  def keep(path, _):
    names = [str(getattr(k, "key", k)) for k in path]
    if task_index == 0:
      return not any(n in ("den_fc", "den_proj") for n in names)
    if names[0] == "score":
      return True
    return "mlp" in names and not (names[-2:] == ["c_proj", "bias"])
  return jax.tree_util.tree_map_with_path(keep, params)


@register("den", "Dynamically Expandable Networks: selective retraining of the MLP units "
          "a task needs, expansion when its loss stays high, split of drifted units, "
          "timestamps (Yoon et al. 2018)", DENConfig, heads=("score",), compose_last=True)
def den(hp: DENConfig, ctx: BuildContext) -> Method:
  if ctx.head != "score":
    raise ValueError("den grows the units under the score head; --head=lm is not supported "
                     "(use --head=score).")
  if hp.peft_infer != "entropy":
    raise ValueError("den infers the task by entropy only (--peft_infer=entropy): its "
                     "networks have no language-model head to measure perplexity with.")
  capacity = hp.den_capacity or 2 * ctx.need("n_embd", "den")
  S, C, L = ctx.num_tasks, ctx.num_labels, ctx.n_layer

  def init(params):
    units = unit_arrays(params, L)
    inner = params["h_0"]["mlp"]["c_fc"]["kernel"].shape[1]
    W = units["fc_b"].shape[1]
    birth = jnp.broadcast_to(jnp.where(jnp.arange(W) < inner, 0, NEVER), (L, W))
    return DENState(PerTaskState(jnp.zeros((S,), bool), jnp.zeros((S, C), bool)),
                    jnp.zeros((), jnp.int32), birth.astype(jnp.int32),
                    jnp.full((L, W), NEVER, jnp.int32), birth == 0,
                    {"units": units, "score": jnp.copy(params["score"]["kernel"])})

  def before_task(state: DENState, tctx: TaskContext):
    k = tctx.task_index
    classes = np.zeros((C,), bool)
    classes[list(tctx.tasks[k].head_labels)] = True
    state = state._replace(task=jnp.asarray(k, jnp.int32), tasks=PerTaskState(
        state.tasks.active.at[k].set(True), state.tasks.slot_classes.at[k].set(classes)))
    units_LW = alive(state.birth, state.retired, k)
    if k == 0:
      return state._replace(selected=units_LW)
    batches = _batches(tctx.train, tctx.batch_size, hp.den_select_steps, (k, 1))
    return state._replace(selected=jnp.asarray(select_units(
        tctx.model, tctx.params, units_LW, batches, hp)))

  def prepare_batch(state: DENState, sctx: StepContext):
    batch = head_fixes.own_classes_only(sctx.batch)
    table = alive_table(state)[jnp.clip(batch["task_ids"], 0, S - 1)]
    return {**batch, "den_units": table.astype(jnp.float32)}

  def loss(state: DENState, sctx: StepContext):
    moved = unit_sq(jax.tree.map(jnp.subtract, unit_arrays(sctx.params, L),
                                 state.anchor["units"]))
    pull = 0.5 * jnp.sum(jnp.where(state.selected, moved, 0.0))
    return jnp.where(state.task > 0, hp.den_l2 * pull, 0.0), ()

  def transform_grads(state: DENState, sctx: StepContext):
    keep = state.selected | (state.task == 0)
    return with_units(sctx.grads, keep_units(unit_arrays(sctx.grads, L), keep), L)

  def after_task(state: DENState, tctx: TaskContext):
    t = tctx.task_index
    if t == 0:
      state = state._replace(anchor={"units": unit_arrays(tctx.params, L),
                                     "score": jnp.copy(tctx.params["score"]["kernel"])})
      rec = {"units_selected": np.asarray(state.selected).sum(1).tolist()}
    else:
      state, rec = consolidate(tctx.model, tctx, state, hp)
    tctx.report({"method": "den", **rec,
                 "units_in_use": [int(np.sum(np.asarray(alive(state.birth, state.retired, k))))
                                  for k in range(t + 1)],
                 "parameters_in_use": [params_in_use(tctx.params, state, k)
                                       for k in range(t + 1)]})
    return state

  def adjust_params(state: DENState, tctx: TaskContext):
    params = with_units(tctx.params, state.anchor["units"], L)
    # copies: the train state donates its buffers, and none may be there twice
    return {**params, "score": {**params["score"], "kernel": jnp.copy(state.anchor["score"])}}

  def eval_logits(state: DENState, sctx: StepContext):
    table = alive_table(state).astype(jnp.float32)
    return infer_task(state.tasks, sctx, hp.peft_infer, lambda s, B: {
        "den_units": jnp.broadcast_to(table[s], (B,) + table.shape[1:])})

  return Method(name="den", init=init, before_task=before_task, prepare_batch=prepare_batch,
                loss=loss, transform_grads=transform_grads, after_task=after_task,
                adjust_params=adjust_params, eval_logits=eval_logits, declares=Declarations(
                    trainable=den_trainable, model_options=(("den_capacity", capacity),)))
