"""Pseudo-data of generative replay and LAMOL, the pieces that hold no method state:
the rows replayed examples are laid out in (``PseudoData``, LM rows ``GEN text [answer]
EOS``), how many samples each earlier task gets, generating them, LAMOL's filter that
splits a sample into text and answer, and LAMOL's QA loss, which reads the answer back
out of an LM row. The methods, their configs and hooks are in ``generative.py``.
"""

from __future__ import annotations

import math
import time
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from cljax.models import GPT2LM
from cljax.models import generation

# ----------------------------------------------------------------------------
# Rows: the state's layout, padded rows, LM rows
# ----------------------------------------------------------------------------

class PseudoData(NamedTuple):
  """Generated examples as training rows; the first ``count`` rows are real (at least
  one row is stored: orbax saves no empty array)."""
  input_ids: jax.Array          # [M, T] the example as the task's input row
  attention_mask: jax.Array     # [M, T]
  labels: jax.Array             # [M]
  task_ids: jax.Array           # [M] the earlier task it replays
  class_mask: jax.Array         # [M, C] that task's classes
  teacher_logits: jax.Array     # [M, C] float32: the old model's (DGR), else 0
  lm_input_ids: jax.Array       # [M, T] GEN text [__ans__ answer] EOS
  lm_attention_mask: jax.Array  # [M, T]
  lm_loss_mask: jax.Array       # [M, T] float32: target weights
  count: jax.Array              # int32


def empty_pseudo_data(length: int, num_labels: int) -> PseudoData:
  """No pseudo-example yet: one row of zeros, ``count`` 0."""
  def z():  # distinct buffers: the train step donates each
    return jnp.zeros((1, length), jnp.int32)
  return PseudoData(z(), z(), jnp.zeros((1,), jnp.int32), jnp.zeros((1,), jnp.int32),
                    jnp.zeros((1, num_labels), bool), jnp.zeros((1, num_labels), jnp.float32),
                    z(), z(), jnp.zeros((1, length), jnp.float32), jnp.zeros((), jnp.int32))


def pad_rows(texts: list[list[int]], length: int, pad: int) -> tuple[np.ndarray, np.ndarray]:
  """``int32 [N, length]`` ids and mask of token lists, each cut to ``length`` and
  right padded with ``pad``."""
  ids = np.full((len(texts), length), pad, np.int32)
  mask = np.zeros((len(texts), length), np.int32)
  for i, t in enumerate(texts):
    ids[i, :len(t)] = t[:length]
    mask[i, :len(t)] = 1
  return ids, mask


def lm_row(gen: int, head: list[int], tail: list[int], answer: list[int], *, eos: int,
           length: int, ended: bool = True) -> list[int]:
  """``GEN head tail answer [EOS]`` in ``length`` tokens: ``head`` (the text) is cut
  from its end when it does not fit; ``tail`` (the prompt's answer cue) never is."""
  room = length - 1 - len(tail) - len(answer) - int(ended)
  return ([gen] + list(head)[:max(room, 0)] + list(tail) + list(answer)
          + ([eos] if ended else []))[:length]


def lm_arrays(rows: list[list[int]], *, length: int, pad: int, weights: dict[int, float]
              ) -> dict[str, np.ndarray]:
  """``lm_input_ids``, ``lm_attention_mask`` and ``lm_loss_mask`` (every token after
  the first is a target, weighted by ``weights.get(token, 1)``) of LM rows."""
  n = len(rows)
  ids = np.full((n, length), pad, np.int32)
  mask = np.zeros((n, length), np.int32)
  loss = np.zeros((n, length), np.float32)
  for i, row in enumerate(rows):
    ids[i, :len(row)] = row
    mask[i, :len(row)] = 1
    loss[i, 1:len(row)] = [weights.get(t, 1.0) for t in row[1:]]
  return {"lm_input_ids": ids, "lm_attention_mask": mask, "lm_loss_mask": loss}


# ----------------------------------------------------------------------------
# How many to generate, generation, the LAMOL filter
# ----------------------------------------------------------------------------

def split_sizes(task_size: int, gamma: float, num_earlier: int) -> list[int]:
  """Pseudo-examples per earlier task, as LAMOL's ``create_extra_data``:
  ``N = ceil(gamma * task_size)`` rounded down to a multiple of the number of
  earlier tasks, split evenly."""
  n = int(math.ceil(task_size * gamma - 1e-9))
  n -= n % num_earlier
  return [n // num_earlier] * num_earlier


def generate_texts(model, params, prompts: list[int], *, length: int, batch_size: int,
                   rng, top_k: int, temperature: float, eos: int
                   ) -> tuple[list[list[int]], list[bool], float]:
  """Samples after each one-token prompt, up to ``length - 1`` new tokens: (the new
  tokens before EOS, whether EOS came, seconds). Batches of ``batch_size`` rows (the
  last padded), one compiled program."""
  lm = GPT2LM(model.config)
  texts, ended, t0 = [], [], time.time()
  for s in range(0, len(prompts), batch_size):
    chunk = prompts[s:s + batch_size]
    ids = np.asarray(chunk + [chunk[0]] * (batch_size - len(chunk)), np.int32)[:, None]
    new = generation.generate(lm, params, ids, np.ones_like(ids), max_new_tokens=length - 1,
                              rng=jax.random.fold_in(rng, s), temperature=temperature,
                              top_k=top_k, eos_token_id=eos, pad_token_id=eos)
    for row in new[:len(chunk)]:
      stop = np.flatnonzero(row == eos)
      texts.append(row[:stop[0] if len(stop) else len(row)].tolist())
      ended.append(bool(len(stop)))
  return texts, ended, time.time() - t0


def split_answer(tokens: list[int], answer_token: int, answers: dict[tuple[int, ...], int]
                 ) -> tuple[list[int], int] | str:
  """LAMOL's filter: (text, class) when ``tokens`` split into exactly one non-empty
  text and one answer at ``answer_token`` and the answer is a known label word
  (``answers`` maps its tokens to its class); else why not: ``malformed`` or
  ``unknown_answer``."""
  at = [i for i, t in enumerate(tokens) if t == answer_token]
  if len(at) != 1 or at[0] == 0:
    return "malformed"
  label = answers.get(tuple(tokens[at[0] + 1:]))
  return "unknown_answer" if label is None else (tokens[:at[0]], label)


# ----------------------------------------------------------------------------
# LAMOL's QA loss: the answer read back from an LM row
# ----------------------------------------------------------------------------

def answer_targets(lm_ids_BT, lm_mask_BT, ans_id: int, k: int):
  """(positions ``[B, k]`` in the LM rows of the first ``k`` tokens after ``__ans__``,
  whether each is one): the answer's tokens and its EOS, LAMOL's QA targets."""
  T = lm_ids_BT.shape[1]
  after_BT = ((jnp.cumsum(lm_ids_BT == ans_id, axis=1) > 0) & (lm_ids_BT != ans_id)
              & (lm_mask_BT > 0))
  _, idx_BK = jax.lax.top_k(after_BT * (T - jnp.arange(T)), k)   # the earliest first
  return idx_BK, jnp.take_along_axis(after_BT, idx_BK, axis=1)


def qa_loss(lm_apply_fn, params, batch, *, ans_id: int, k: int, pad: int) -> jax.Array:
  """LAMOL's QA loss (the reference's ``qa_loss``): the mean full-vocabulary
  cross-entropy of the answer's tokens and EOS, given the QA row ``prompt(x) __ans__
  answer EOS`` (the LM row without its ``GEN``), over the batch's answers (example
  weights ``lm_weight``). The logits are computed at those ``k`` positions only."""
  ids_BT, mask_BT = batch["lm_input_ids"], batch["lm_attention_mask"]
  idx_BK, is_BK = answer_targets(ids_BT, mask_BT, ans_id, k)
  qa_ids_BT = jnp.concatenate([ids_BT[:, 1:], jnp.full_like(ids_BT[:, :1], pad)], axis=1)
  qa_mask_BT = jnp.concatenate([mask_BT[:, 1:], jnp.zeros_like(mask_BT[:, :1])], axis=1)
  # Token j of the LM row is token j-1 of the QA row, predicted at position j-2.
  logits_BKV = lm_apply_fn(params, qa_ids_BT, qa_mask_BT,
                           logits_index=jnp.maximum(idx_BK - 2, 0))
  ce_BK = optax.softmax_cross_entropy_with_integer_labels(
      logits_BKV.astype(jnp.float32), jnp.take_along_axis(ids_BT, idx_BK, axis=1))
  w_BK = is_BK * batch["lm_weight"][:, None]
  return jnp.sum(ce_BK * w_BK) / jnp.maximum(jnp.sum(w_BK), 1e-9)
