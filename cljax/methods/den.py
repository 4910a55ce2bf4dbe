"""Dynamically Expandable Networks (Yoon, Yang, Lee and Hwang, ICLR 2018) on a transformer.

DEN's layers here are the token embedding (the weights of the one-hot input: a row per
token) and each block's MLP (its hidden neurons, the units: GPT-2's ``c_fc`` column and
bias and ``c_proj`` row; a gated MLP's ``gate_proj`` and ``up_proj`` columns and
``down_proj`` row; :mod:`cljax.models.den`, by the family's ``Layout.den_units``; the
``c_fc``/``c_proj`` below stand for them). ``den_capacity`` units per block and
``den_row_capacity`` embedding rows are allocated ahead and used by masks. A unit or
row has a ``birth`` (the task it was made at; ``NEVER`` while free) and a ``retired``
(the first task it no longer serves: a split one's old copy); task k reads the units
and rows with ``birth <= k < retired`` (a table, ``rows [S, V]``, gives each task's row
of each token), k given (task-aware) or inferred by entropy, as ``pnn``. A task's head
is its rows of the ``score`` head (the labels trick).

Task 1 trains the whole network, with the L1 step (below). At task t > 1, attention,
position embeddings, the norms and ``c_proj``'s bias stay frozen, and:

1. Selective retraining. ``before_task`` fits the paper's sparse linear model of task
   t's classes on every block's (standardized) unit activations at the pooled token
   of up to ``--den_select_examples`` training rows: softmax cross-entropy with a
   group lasso over each unit's weights, solved by ``--den_select_steps`` of
   accelerated proximal gradient (FISTA), its strength ``--den_select_l1`` times the
   smallest one that selects no unit (so some unit is always selected; if none is,
   a warning, and every unit retrains). The selected units are those left with a
   nonzero weight, and every token row the task reads is selected, as the reference
   selects every input of the first layer. The study's training of the task then
   trains only them and the task's head, with ``den_l2 * 1/2 ||theta - theta_{t-1}||^2``
   over them (the reference's ``regular_lambda``).
2. Dynamic expansion (``after_task``). If the task's mean training loss is above
   ``--den_loss_threshold``, ``--den_expand_k`` free units per block are born at t
   and trained alone with the head (``--den_expand_steps``), each Adam step followed
   by the group-lasso step on each new unit's weights (``c_fc`` column, bias, ``c_proj``
   row: shrunk by ``den_group_lasso`` in norm, zeroed under it); the units left at
   zero are freed again (pruned).
3. Split and duplication. A selected unit whose weights shared with the earlier tasks
   (its ``c_fc`` column, bias and ``c_proj`` row) drifted more than
   ``--den_split_threshold`` in L2 is duplicated into a free unit: the new copy (born
   at t) keeps the drifted values and serves task t on, the old copy gets its values
   before the task back and is retired at t. A token row that drifted more than the
   threshold is split the same way into a free row. The units born at t then train
   with the head for ``--den_split_steps``. Units and rows under the threshold stay
   shared, drifted: the paper's tolerance.

The L1 step (``w <- 0 if |w| < den_l1 else w - den_l1 sign(w)``) follows every
optimizer step of every pass on every weight the pass trains, as the reference's.

Where this follows the reference code (``jaehong31/DEN``, ``DEN.py``): the L1 and
group-lasso steps are its proximal assignments after each step, with fixed
thresholds; the selection is by exactly nonzero weights and takes every input of the
first layer; the loss threshold is checked after selective retraining; pruning frees
new units whose weights are exactly zero; the drift is the L2 distance of a unit's
weights. Where it departs, and why:
- A transformer has no unit-to-unit connections to search breadth-first: every
  block's MLP writes into the residual stream the head reads, so the sparse model is
  fit on all blocks' units at once (the reference fits the task's top layer by Adam
  with the L1 step for a tenth of its iterations, from a random start, and follows
  nonzero weights down; at its L1 of 1e-5 that keeps nearly every unit). The fit here
  is solved to its optimum and its strength is relative, so the selection reads what
  the units say about the task, on every seed. The probe is discarded.
- The reference's expansion and retraining run until the validation loss settles;
  here a fixed number of steps each, without dropout, and no weight decay in DEN's own
  passes (the reference's ``l2_lambda``: the study's AdamW has its own).
- Split: done after every task (the paper's Algorithm 1; the reference splits only
  after an expansion, at most ``ex_k`` units, the least drifted ones over the
  threshold). Here every unit and row over the threshold splits while free capacity
  lasts, the most drifted first. The new copy keeps the unit's bias (the reference
  draws it at random) and the old copy stops serving task t (the reference keeps both
  in task t's network): the split leaves task t's network as it was trained, and the
  old copy stays frozen, so earlier tasks get exactly their units and rows back.
- Attention, position embeddings and LayerNorms are trained with task 1 and frozen
  after (the reference's layers are all units and rows; ``experiments/den_parts.py``
  measures what the frozen parts cost); units and rows outside the selection, retired
  copies and other tasks' head rows are restored bit for bit at the task's end (AdamW's
  weight decay would otherwise move them). Capacity is allocated ahead: no compiled
  shape changes; when it runs out, expansion and splitting take what is left, and the
  report and a warning say so.
"""

from __future__ import annotations

import dataclasses
import functools
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
                              pooled_units, soft_threshold, split_rows, split_units,
                              unit_arrays, unit_size, unit_sq, with_units)
from cljax.options import FRACTION, NON_NEGATIVE, POSITIVE
from cljax.train import loop
from cljax.train.method import Declarations, Method, StepContext, TaskContext

_KEYS = ("input_ids", "attention_mask", "labels", "weights", "class_mask", "task_ids")


def capacity_names(layout) -> tuple[str, ...]:
  """The parameters DEN grows into (its projections beside the MLP's, its token rows);
  frozen while the first task trains."""
  return tuple(capacity for _, _, capacity in layout.den_units) + ("den_wte",)


@dataclasses.dataclass(frozen=True)
class DENConfig(InferenceOptions):
  den_l1: float = hparam(1e-5, "DEN: the L1 step on every weight a pass trains, after each "
                         "of its optimizer steps (the reference's l1_lambda).",
                         bound=NON_NEGATIVE)
  den_select_l1: float = hparam(0.05, "DEN: the group-lasso strength of the sparse model "
                                "that selects the units, as a fraction of the smallest "
                                "strength that selects none.", bound=FRACTION)
  den_select_examples: int = hparam(1024, "DEN: training rows the sparse model is fit on.",
                                    bound=POSITIVE)
  den_select_steps: int = hparam(300, "DEN: proximal-gradient (FISTA) steps of the sparse "
                                 "model that selects the units.", bound=POSITIVE)
  den_l2: float = hparam(0.01, "DEN: strength of the L2 pull of the selected units and rows "
                         "toward their values before the task (the reference's "
                         "regular_lambda, 0.5 there).", bound=NON_NEGATIVE)
  den_loss_threshold: float = hparam(0.1, "DEN: expand when the task's mean training loss "
                                     "(cross-entropy over its classes; chance: ln of their "
                                     "number) after selective retraining is above this.",
                                     bound=NON_NEGATIVE)
  den_expand_k: int = hparam(10, "DEN: units added to each block's MLP by an expansion.",
                             bound=NON_NEGATIVE)
  den_group_lasso: float = hparam(1e-3, "DEN: the group-lasso step on each new unit's "
                                  "weights (per step, after Adam).", bound=NON_NEGATIVE)
  den_split_threshold: float = hparam(0.05, "DEN: a selected unit or token row whose "
                                      "weights moved more than this (L2) is split.",
                                      bound=NON_NEGATIVE)
  den_capacity: int = hparam(0, "DEN: MLP units per block allocated ahead for expansion "
                             "and splitting (0: 2 x n_embd).", bound=NON_NEGATIVE)
  den_row_capacity: int = hparam(0, "DEN: token-embedding rows allocated ahead for the "
                                 "split rows (0: a quarter of the vocabulary per later "
                                 "task).", bound=NON_NEGATIVE)
  den_lr: float = hparam(1e-3, "DEN: Adam's learning rate in its own passes (expansion, "
                         "the retraining after a split).", bound=POSITIVE)
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
  rows: jax.Array         # [S, V] int32: each task's embedding row of each token
  row_birth: jax.Array    # [V + R] int32: the task each row was made at (NEVER: free)
  row_retired: jax.Array  # [V + R] int32
  row_token: jax.Array    # [V + R] int32: the token each row stands for (-1: free)
  row_trained: jax.Array  # [V + R] bool: the rows task ``task`` retrains
  anchor: Any             # {"units", "score": kernel, "rows": [V + R, D]} after the last task


def alive_table(state: DENState) -> jax.Array:
  """``[S, L, W]`` bool: the units of every task."""
  s = jnp.arange(state.tasks.active.shape[0])[:, None, None]
  return alive(state.birth[None], state.retired[None], s)


def embedding_rows(params, layout) -> jax.Array:
  """``[V + R, D]``: the token embedding's rows (GPT-2's ``wte``), then DEN's copies
  (``den_wte``)."""
  return jnp.concatenate([params[layout.embedding]["embedding"],
                          params["den_wte"]["embedding"]])


def with_rows(params, rows_RD, layout):
  """``params`` with the token embedding and ``den_wte`` from ``rows_RD`` (as
  :func:`embedding_rows`)."""
  embed = params[layout.embedding]["embedding"]
  V = embed.shape[0]
  cast = lambda x, like: jnp.asarray(x, like.dtype)   # noqa: E731
  return {**params, layout.embedding: {"embedding": cast(rows_RD[:V], embed)},
          "den_wte": {"embedding": cast(rows_RD[V:], params["den_wte"]["embedding"])}}


def network_inputs(units_LW, rows_V, batch) -> dict:
  """The model inputs that run ``batch`` through one task's network: its units
  ``units_LW`` and its row of each token ``rows_V``."""
  B = batch["input_ids"].shape[0]
  return {"den_units": jnp.broadcast_to(units_LW, (B,) + units_LW.shape).astype(jnp.float32),
          "den_rows": jnp.take(rows_V, batch["input_ids"])}


def own_class_ce(logits_BC, batch) -> jax.Array:
  """The weighted mean cross-entropy over each example's own task's classes."""
  z = jnp.where(batch["class_mask"], logits_BC, -1e9)
  ce = optax.softmax_cross_entropy_with_integer_labels(z, batch["labels"])
  return jnp.sum(ce * batch["weights"]) / jnp.maximum(jnp.sum(batch["weights"]), 1.0)


def _seed(rng, i: int) -> tuple[int, int]:
  """A shuffling seed for DEN's pass ``i`` from the hook's key (so from ``--seed``)."""
  return tuple(int(x) for x in jax.random.randint(jax.random.fold_in(rng, i), (2,), 0,
                                                  2 ** 31 - 1))


def _batches(train, batch_size: int, steps: int | None = None, seed=()):
  """``steps`` shuffled batches of ``train``, epoch after epoch as the study draws
  them (None: one epoch, in order)."""
  train = {k: v for k, v in train.items() if k in _KEYS}
  if steps is None:
    return list(data_lib.batches(train, batch_size))
  epochs = -(-steps // data_lib.num_batches(data_lib.size(train), batch_size))
  return list(itertools.islice(loop.epoch_batches(train, batch_size, epochs=epochs,
                                                  seed=seed), steps))


# ----------------------------------------------------------------------------
# Step 1's selection: the sparse linear model of the task on the pooled units
# ----------------------------------------------------------------------------

def pooled_features(model, params, units_LW, rows_V, batches) -> tuple[np.ndarray, np.ndarray]:
  """(``[N, L * W]`` the unit activations at the pooled token, ``[N]`` the labels) of
  the real rows of ``batches``, in task k's network."""
  L = units_LW.shape[0]

  @jax.jit
  def features(params, units_LW, rows_V, batch):
    _, inter = model.apply({"params": params}, batch["input_ids"], batch["attention_mask"],
                           **network_inputs(units_LW, rows_V, batch), mutable=["intermediates"])
    idx_B = pool_index(batch["input_ids"], model.config.pad_token_id)
    return pooled_units(inter["intermediates"], idx_B, model.config.LAYOUT, L)

  xs, ys = [], []
  for b in batches:
    real = np.asarray(b["weights"]) > 0
    xs.append(np.asarray(features(params, units_LW, rows_V, b))[real])
    ys.append(np.asarray(b["labels"])[real])
  x = np.concatenate(xs)
  return x.reshape(len(x), -1), np.concatenate(ys)


@functools.partial(jax.jit, static_argnames=("num_classes", "steps"))
def sparse_fit(x_NF, y_N, *, num_classes: int, ratio: float, steps: int):
  """The group-lasso softmax regression of ``y_N`` on the standardized ``x_NF``:
  (``[F, C]`` the weights at the solution, ``[C]`` the intercept, the strength). The
  strength is ``ratio`` times the smallest that leaves every weight at zero; FISTA
  with the step of the loss's Lipschitz bound (the power iteration's)."""
  N = x_NF.shape[0]
  mu, sd = jnp.mean(x_NF, 0), jnp.std(x_NF, 0)
  live = sd > 1e-6
  z = jnp.where(live, (x_NF - mu) / jnp.where(live, sd, 1.0), 0.0)
  y = jax.nn.one_hot(y_N, num_classes)
  b = jnp.log(jnp.mean(y, 0) + 1e-6)   # the intercept's optimum with every weight zero

  def grads(w, b):
    g = jax.nn.softmax(z @ w + b) - y
    return z.T @ g / N, jnp.mean(g, 0)

  lam = ratio * jnp.max(jnp.linalg.norm(grads(jnp.zeros((z.shape[1], num_classes)), b)[0],
                                        axis=1))
  v = jax.lax.fori_loop(0, 30, lambda _, v: (lambda u: u / jnp.linalg.norm(u))(z.T @ (z @ v)),
                        jnp.ones((z.shape[1],)) / np.sqrt(z.shape[1]))
  step = 1.0 / (0.5 * jnp.linalg.norm(z @ v) ** 2 / N + 1e-6)

  def prox(w):
    norm = jnp.linalg.norm(w, axis=1, keepdims=True)
    return w * jnp.maximum(0.0, 1.0 - step * lam / jnp.where(norm > 0, norm, 1.0))

  def fista(_, carry):
    w, w_prev, b, t = carry
    t_next = (1 + jnp.sqrt(1 + 4 * t * t)) / 2
    look = w + (t - 1) / t_next * (w - w_prev)
    gw, gb = grads(look, b)
    return prox(look - step * gw), w, b - step * gb, t_next

  w0 = jnp.zeros((z.shape[1], num_classes))
  w, _, b, _ = jax.lax.fori_loop(0, steps, fista, (w0, w0, b, jnp.ones(())))
  return w, b, lam


def select_units(model, params, units_LW, rows_V, batches, classes: np.ndarray,
                 hp: DENConfig) -> tuple[np.ndarray, dict]:
  """Step 1's selection: (``[L, W]`` bool, the units of ``units_LW`` with a nonzero
  weight in the sparse model of the task's classes ``classes``, a report)."""
  x, labels = pooled_features(model, params, jnp.asarray(units_LW), rows_V, batches)
  local = np.searchsorted(classes, labels)
  w, _, lam = sparse_fit(jnp.asarray(x), jnp.asarray(local), num_classes=len(classes),
                         ratio=hp.den_select_l1, steps=hp.den_select_steps)
  selected = np.asarray(jnp.any(w != 0, axis=1)).reshape(units_LW.shape) & units_LW
  report = {"select_examples": len(labels), "select_strength": float(lam)}
  if not selected.any():
    logging.warning("DEN: the sparse model selected no unit (--den_select_l1=%g); every "
                    "unit of the task's network retrains.", hp.den_select_l1)
    report["select_fallback"] = True
    selected = units_LW
  return selected, report


# ----------------------------------------------------------------------------
# DEN's own passes: Adam, then a proximal step, on fixed-shape batches
# ----------------------------------------------------------------------------

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


def _head_loss(model, n_layer):
  """``loss(theta, (params, units_LW, rows_V), batch)`` of the task over ``theta =
  {"units", "score"}``: the network of the units ``units_LW`` and rows ``rows_V`` of
  ``params``, with theta's values."""
  def loss_fn(theta, consts, batch):
    params, units_LW, rows_V = consts
    p = with_units(params, theta["units"], n_layer, model.config.LAYOUT)
    p = {**p, "score": {**p["score"], "kernel": theta["score"]}}
    logits = model.apply({"params": p}, batch["input_ids"], batch["attention_mask"],
                         **network_inputs(units_LW, rows_V, batch))
    return own_class_ce(logits, batch)
  return loss_fn


def train_units(model, params, theta, units_LW, rows_V, train_LW, classes_C, batches, hp,
                prox=None):
  """``theta = {"units", "score"}`` after training the units ``train_LW`` and the head
  columns ``classes_C`` (the network: the units ``units_LW``, the rows ``rows_V``),
  each step followed by the L1 step on them and then ``prox``; the rest stays exact."""
  train_LW, classes_C = jnp.asarray(train_LW), jnp.asarray(classes_C)

  def grad_mask(g):
    return {"units": keep_units(g["units"], train_LW),
            "score": jnp.where(classes_C[None, :], g["score"], 0.0)}

  def l1_then_prox(th):
    soft = jax.tree.map(lambda x: soft_threshold(x, hp.den_l1), th)
    th = {"units": keep_units(soft["units"], train_LW, th["units"]),
          "score": jnp.where(classes_C[None, :], soft["score"], th["score"])}
    return (prox or (lambda t: t))(th)

  return run_pass(_head_loss(model, len(units_LW)), theta,
                  (params, jnp.asarray(units_LW), jnp.asarray(rows_V)), batches, hp.den_lr,
                  grad_mask, l1_then_prox)


def mean_loss(model, params, theta, units_LW, rows_V, batches) -> float:
  """The task's weighted mean training loss over ``batches`` (in order, all of them)."""
  loss_fn = jax.jit(_head_loss(model, len(units_LW)))
  consts = (params, jnp.asarray(units_LW), jnp.asarray(rows_V))
  total = count = 0.0
  for b in batches:
    n = float(np.sum(b["weights"]))
    total, count = total + float(loss_fn(theta, consts, b)) * n, count + n
  return total / max(count, 1.0)


# ----------------------------------------------------------------------------
# Expansion and split
# ----------------------------------------------------------------------------

def params_in_use(params, state: DENState, k: int) -> int:
  """Parameters task k's network reads: everything but the units, the rows and the
  head, plus its units, its row of each token and its head columns."""
  total = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))
  L, W, D = state.anchor["units"]["proj_k"].shape
  size = unit_size(state.anchor["units"])
  C = state.tasks.slot_classes.shape[1]
  R, V = state.row_birth.shape[0], state.rows.shape[1]
  units = int(np.sum(np.asarray(alive(state.birth, state.retired, k))))
  classes = int(np.sum(np.asarray(state.tasks.slot_classes[k])))
  return (total - L * W * size - D * C - R * D
          + units * size + D * classes + V * D)


def _grow(model, ctx, hp, theta, st, units_LW, classes_C, t, rec):
  """Step 2 when the loss is over the threshold: (theta, birth) with the survivors."""
  new = first_free(st["birth"], hp.den_expand_k)
  if int(new.sum(1).min()) < hp.den_expand_k:
    logging.warning("DEN: the unit capacity is exhausted; task %d adds %s units.", t,
                    new.sum(1))
  theta = {**theta, "units": new_units(theta["units"], new, jax.random.fold_in(ctx.rng, 1),
                                       model.config.initializer_range)}
  st["birth"] = np.where(new, t, st["birth"])
  batches = _batches(ctx.train, ctx.batch_size, hp.den_expand_steps, _seed(ctx.rng, 2))
  theta = train_units(model, ctx.params, theta, units_LW | new, st["rows"][t], new, classes_C,
                      batches, hp, lambda th: group_lasso(th, jnp.asarray(new),
                                                          hp.den_group_lasso))
  pruned = new & (np.asarray(unit_sq(theta["units"])) == 0)
  st["birth"] = np.where(pruned, NEVER, st["birth"])
  rec.update(units_added=new.sum(1).tolist(), units_pruned=pruned.sum(1).tolist())
  return theta


def _split(theta, prev, table, state: DENState, st, t, hp, rec):
  """Step 3's duplication of the units and of the rows that drifted; (theta, table)."""
  before = jax.tree.map(np.asarray, prev["units"])
  moved = jax.tree.map(lambda a, b: np.asarray(a) - b, theta["units"], before)
  drift = np.sqrt(np.asarray(unit_sq(moved)))
  over = np.asarray(state.selected) & (drift > hp.den_split_threshold)
  split = split_units(theta["units"], before, drift, over, st["birth"], st["retired"], t)
  theta["units"], st["birth"], st["retired"], rec["units_split"], rec["split_skipped"] = split
  old_rows = np.asarray(prev["rows"])
  row_drift = np.sqrt(np.sum(np.square(np.asarray(table) - old_rows), 1))
  over = np.asarray(state.row_trained) & (row_drift > hp.den_split_threshold)
  table, st["row_birth"], st["row_retired"], st["row_token"], st["rows"], n, skipped = (
      split_rows(table, old_rows, row_drift, over, st["row_birth"], st["row_retired"],
                 st["row_token"], st["rows"], t))
  rec.update(rows_split=int(n), rows_split_skipped=int(skipped))
  if sum(rec["split_skipped"]) or skipped:
    logging.warning("DEN: the capacity is exhausted; task %d leaves %s units and %d rows "
                    "that drifted unsplit (shared, drifted).", t, rec["split_skipped"], skipped)
  return theta, table


def consolidate(model, ctx: TaskContext, state: DENState, hp: DENConfig):
  """Steps 2 and 3 after the selective retraining of task t (``ctx.params``):
  (the new state, the report)."""
  t, L, prev = ctx.task_index, state.birth.shape[0], state.anchor
  lay = model.config.LAYOUT
  classes_C = np.asarray(state.tasks.slot_classes[t])
  units = keep_units(unit_arrays(ctx.params, L, lay), state.selected, prev["units"])
  table = np.where(np.asarray(state.row_trained)[:, None],
                   np.asarray(embedding_rows(ctx.params, lay)), np.asarray(prev["rows"]))
  theta = {"units": units, "score": jnp.where(classes_C[None, :], ctx.params["score"]["kernel"],
                                              prev["score"])}
  st = {k: np.array(getattr(state, k)) for k in ("birth", "retired", "rows", "row_birth",
                                                 "row_retired", "row_token")}
  ctx = ctx._replace(params=with_rows(ctx.params, table, lay))
  units_LW = alive(st["birth"], st["retired"], t)
  loss = mean_loss(model, ctx.params, theta, units_LW, st["rows"][t],
                   _batches(ctx.train, ctx.batch_size))
  rec = {"units_selected": np.asarray(state.selected).sum(1).tolist(),
         "rows_trained": int(np.sum(np.asarray(state.row_trained))),
         "train_loss": loss, "expanded": loss > hp.den_loss_threshold,
         "units_added": [0] * L, "units_pruned": [0] * L}
  if rec["expanded"] and hp.den_expand_k:
    theta = _grow(model, ctx, hp, theta, st, units_LW, classes_C, t, rec)
  theta, table = _split(theta, prev, table, state, st, t, hp, rec)
  born = st["birth"] == t
  if born.any() and hp.den_split_steps and sum(rec["units_split"]):
    batches = _batches(ctx.train, ctx.batch_size, hp.den_split_steps, _seed(ctx.rng, 3))
    theta = train_units(model, with_rows(ctx.params, table, lay), theta,
                        alive(st["birth"], st["retired"], t), st["rows"][t], born, classes_C,
                        batches, hp)
  state = state._replace(**{k: jnp.asarray(v) for k, v in st.items()},
                         anchor={**theta, "rows": jnp.asarray(table)})
  return state, rec


def parameters_trained(state: DENState, rec: dict, D: int) -> int:
  """What task ``state.task`` (> 0) trained: its selected and added units, the rows
  it read, its head columns."""
  units = int(np.sum(np.asarray(state.selected))) + sum(rec["units_added"])
  classes = int(np.sum(np.asarray(state.tasks.slot_classes[int(state.task)])))
  return (units * unit_size(state.anchor["units"])
          + int(np.sum(np.asarray(state.row_trained))) * D + classes * D)


# ----------------------------------------------------------------------------
# The method
# ----------------------------------------------------------------------------

def den_trainable(params, task_index: int, layout):
  """Task 1: everything but the capacity; later tasks: the units (the MLP's projections
  but the outgoing one's bias), the token rows and the head."""
  capacity, out_name = capacity_names(layout), layout.den_units[-1][1]

  def keep(path, _):
    names = [str(getattr(k, "key", k)) for k in path]
    if task_index == 0:
      return not any(n in capacity for n in names)
    if names[0] in ("score", layout.embedding, "den_wte"):
      return True
    return layout.mlp in names and not (names[-2:] == [out_name, "bias"])
  return jax.tree_util.tree_map_with_path(keep, params)


def _l1_step(state: DENState, params, l1: float, L: int, lay):
  """The L1 step on what task ``state.task`` trains: the first task, everything but
  the capacity; a later task, its selected units, its rows and its head columns."""
  soft = jax.tree.map(lambda x: soft_threshold(x, l1), params)
  first = jax.tree.map(lambda s, p, keep: s if keep else p, soft, params,
                       den_trainable(params, 0, lay))
  later = with_units(params, keep_units(unit_arrays(soft, L, lay), state.selected,
                                        unit_arrays(params, L, lay)), L, lay)
  later = with_rows(later, jnp.where(state.row_trained[:, None], embedding_rows(soft, lay),
                                     embedding_rows(params, lay)), lay)
  classes = state.tasks.slot_classes[state.task]
  later = {**later, "score": {**later["score"], "kernel": jnp.where(
      classes[None, :], soft["score"]["kernel"], params["score"]["kernel"])}}
  return jax.tree.map(lambda a, b: jnp.where(state.task == 0, a, b), first, later)


def init_state(params, S: int, C: int, L: int, V: int, row_capacity: int,
               lay) -> DENState:
  """The state before the first task: the loaded units and rows in use by every task,
  the capacity free, the anchor the loaded values."""
  rows = params[lay.embedding]["embedding"].shape[0]
  if rows != V:
    raise ValueError(f"den was built for {V} token rows and the model has {rows}: build "
                     "it after the vocabulary is final (no method that adds tokens "
                     "combines with den).")
  units = unit_arrays(params, L, lay)
  inner = params[f"{lay.block}0"][lay.mlp][lay.den_units[0][1]]["kernel"].shape[1]
  W = units["proj_k"].shape[1]
  birth = jnp.broadcast_to(jnp.where(jnp.arange(W) < inner, 0, NEVER), (L, W))
  loaded = jnp.arange(V + row_capacity) < V
  return DENState(
      PerTaskState(jnp.zeros((S,), bool), jnp.zeros((S, C), bool)),
      jnp.zeros((), jnp.int32), birth.astype(jnp.int32), jnp.full((L, W), NEVER, jnp.int32),
      birth == 0, jnp.broadcast_to(jnp.arange(V, dtype=jnp.int32), (S, V)),
      jnp.where(loaded, 0, NEVER).astype(jnp.int32),
      jnp.full((V + row_capacity,), NEVER, jnp.int32),
      jnp.where(loaded, jnp.arange(V + row_capacity), -1).astype(jnp.int32), loaded,
      {"units": units, "score": jnp.copy(params["score"]["kernel"]),
       "rows": embedding_rows(params, lay)})


def select_for_task(state: DENState, tctx: TaskContext, hp: DENConfig, C: int) -> DENState:
  """Task k's classes recorded; for k > 0, step 1's selection: the units of the sparse
  model and every token row the task's training data reads."""
  k = tctx.task_index
  classes = np.zeros((C,), bool)
  classes[list(tctx.tasks[k].head_labels)] = True
  state = state._replace(task=jnp.asarray(k, jnp.int32), tasks=PerTaskState(
      state.tasks.active.at[k].set(True), state.tasks.slot_classes.at[k].set(classes)))
  units_LW = np.asarray(alive(state.birth, state.retired, k))
  if k == 0:
    return state._replace(selected=jnp.asarray(units_LW))
  rows_V = np.asarray(state.rows[k])
  trained = np.zeros(state.row_birth.shape, bool)
  trained[np.unique(rows_V[tctx.train["input_ids"]])] = True
  n = -(-min(hp.den_select_examples, data_lib.size(tctx.train)) // tctx.batch_size)
  batches = _batches(tctx.train, tctx.batch_size, n, _seed(tctx.rng, 1))
  selected, rec = select_units(tctx.model, tctx.params, units_LW, jnp.asarray(rows_V),
                               batches, np.flatnonzero(classes), hp)
  tctx.report({"method": "den", "stage": "selection", **rec,
               "units_selected": selected.sum(1).tolist(), "rows_trained": int(trained.sum())})
  return state._replace(selected=jnp.asarray(selected), row_trained=jnp.asarray(trained))


def _check(hp: DENConfig, ctx: BuildContext) -> None:
  if ctx.head != "score":
    raise ValueError("den grows the units under the score head; --head=lm is not supported "
                     "(use --head=score).")
  if hp.peft_infer != "entropy":
    raise ValueError("den infers the task by entropy only (--peft_infer=entropy): its "
                     "networks have no language-model head to measure perplexity with.")


@register("den", "Dynamically Expandable Networks: selective retraining of the token "
          "rows and MLP units a task needs, expansion when its loss stays high, split of "
          "drifted units and rows, timestamps (Yoon et al. 2018)", DENConfig,
          heads=("score",), compose_last=True)
def den(hp: DENConfig, ctx: BuildContext) -> Method:
  ctx.check_per_block("den")
  _check(hp, ctx)
  D, V = ctx.need("n_embd", "den"), ctx.need("vocab_size", "den")
  S, C, L, lay = ctx.num_tasks, ctx.num_labels, ctx.n_layer, ctx.layout
  capacity = hp.den_capacity or 2 * D
  row_capacity = hp.den_row_capacity or max(1, (S - 1) * V // 4)

  def init(params):
    return init_state(params, S, C, L, V, row_capacity, lay)

  def before_task(state: DENState, tctx: TaskContext):
    return select_for_task(state, tctx, hp, C)

  def prepare_batch(state: DENState, sctx: StepContext):
    batch = head_fixes.own_classes_only(sctx.batch)
    s = jnp.clip(batch["task_ids"], 0, S - 1)
    return {**batch, "den_units": alive_table(state)[s].astype(jnp.float32),
            "den_rows": jnp.take_along_axis(state.rows[s], batch["input_ids"], axis=1)}

  def loss(state: DENState, sctx: StepContext):
    moved = unit_sq(jax.tree.map(jnp.subtract, unit_arrays(sctx.params, L, lay),
                                 state.anchor["units"]))
    pull = 0.5 * jnp.sum(jnp.where(state.selected, moved, 0.0))
    rows = jnp.sum(jnp.square(embedding_rows(sctx.params, lay) - state.anchor["rows"]), 1)
    pull = pull + 0.5 * jnp.sum(jnp.where(state.row_trained, rows, 0.0))
    return jnp.where(state.task > 0, hp.den_l2 * pull, 0.0), ()

  def transform_grads(state: DENState, sctx: StepContext):
    first = state.task == 0
    grads = with_units(sctx.grads, keep_units(unit_arrays(sctx.grads, L, lay),
                                              state.selected | first), L, lay)
    return with_rows(grads, jnp.where((state.row_trained | first)[:, None],
                                      embedding_rows(grads, lay), 0.0), lay)

  def proximal(state: DENState, sctx: StepContext):
    return (_l1_step(state, sctx.new_params, hp.den_l1, L, lay) if hp.den_l1
            else sctx.new_params)

  def after_task(state: DENState, tctx: TaskContext):
    t = tctx.task_index
    if t == 0:
      state = state._replace(anchor={"units": unit_arrays(tctx.params, L, lay),
                                     "score": jnp.copy(tctx.params["score"]["kernel"]),
                                     "rows": embedding_rows(tctx.params, lay)})
      rec = {"units_selected": np.asarray(state.selected).sum(1).tolist(),
             "parameters_trained": sum(int(np.prod(x.shape)) for x, keep in zip(
                 jax.tree.leaves(tctx.params), jax.tree.leaves(den_trainable(tctx.params, 0, lay)))
                                       if keep)}
    else:
      state, rec = consolidate(tctx.model, tctx, state, hp)
      rec["parameters_trained"] = parameters_trained(state, rec, D)
    tctx.report({"method": "den", **rec,
                 "units_in_use": [int(np.sum(np.asarray(alive(state.birth, state.retired, k))))
                                  for k in range(t + 1)],
                 "parameters_in_use": [params_in_use(tctx.params, state, k)
                                       for k in range(t + 1)]})
    return state

  def adjust_params(state: DENState, tctx: TaskContext):
    params = with_rows(with_units(tctx.params, state.anchor["units"], L, lay),
                       state.anchor["rows"], lay)
    # copies: the train state donates its buffers, and none may be there twice
    return {**params, "score": {**params["score"], "kernel": jnp.copy(state.anchor["score"])}}

  def eval_logits(state: DENState, sctx: StepContext):
    table = alive_table(state).astype(jnp.float32)
    ids = sctx.batch["input_ids"]
    return infer_task(state.tasks, sctx, hp.peft_infer, lambda s, B: {
        "den_units": jnp.broadcast_to(table[s], (B,) + table.shape[1:]),
        "den_rows": jnp.take(state.rows[s], ids)})

  return Method(name="den", init=init, before_task=before_task, prepare_batch=prepare_batch,
                loss=loss, transform_grads=transform_grads, proximal=proximal,
                after_task=after_task, adjust_params=adjust_params, eval_logits=eval_logits,
                declares=Declarations(trainable=functools.partial(den_trainable, layout=lay),
                                      model_options=(
                    ("den_capacity", capacity), ("den_rows", row_capacity))))
