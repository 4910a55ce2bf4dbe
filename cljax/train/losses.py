"""The losses the steps and the methods share, as sums over a batch (the host or the
caller divides): classification cross-entropy (with a method's excluded classes and
example weights), the shifted next-token cross-entropy of every LM objective, and
each step's objective with its metric sums.

A batch is a dict of fixed-shape arrays (:data:`Batch`; the contract is in
:mod:`cljax.train.steps`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

Batch = dict[str, jax.Array]


def cross_entropy(logits_BC, labels_B, weights_B):
  """Sum over examples of ``weights * CE`` (the host or caller divides)."""
  losses = optax.softmax_cross_entropy_with_integer_labels(logits_BC, labels_B)
  return jnp.sum(losses * weights_B)


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


def classification_objective(logits_BC, batch: Batch):
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


def next_token_objective(logits_BTV, batch: Batch):
  """The mean next-token CE of the batch's target tokens (``loss_mask``), and its
  metric sums."""
  loss_sum, count, correct = lm_cross_entropy(logits_BTV, batch["input_ids"],
                                              batch["loss_mask"])
  return loss_sum / jnp.maximum(count, 1.0), {"loss_sum": loss_sum, "count": count,
                                              "correct": correct}
