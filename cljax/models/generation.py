"""Compiled text generation with a KV cache.

``generate`` takes right-padded prompts (as every cljax array) and returns the new
tokens. Everything runs under one ``jit`` per (batch, prompt bucket, max new tokens,
sampling settings): a prefill of the whole prompt writes its keys and values into a
cache of fixed length, then ``lax.while_loop`` decodes one token per step until every
row has emitted EOS or ``max_new_tokens`` are out.

Rows keep their own positions and share cache slots: the padded prompts fill slots
``0..P-1`` (their padding marked invalid), and the t-th new token of every row goes
to slot ``P + t`` (one in-place write for the batch) at the row's own position
``L_b + t``. A query sees the valid slots up to its own. Prompts are never shifted.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from cljax.models import GPT2LM
from cljax.models.kv_cache import KVCache, init_cache

PROMPT_BUCKET = 32   # prompts are padded to a multiple of this: one program per bucket


def sample_logits(logits_BV: jax.Array, rng: jax.Array | None, *, temperature: float = 0.0,
                  top_k: int | None = None, top_p: float | None = None) -> jax.Array:
  """Next tokens ``[B]`` from logits: greedy (``temperature=0``), or a sample after
  temperature, then top-k, then top-p (nucleus) filtering, in transformers' order.

  Top-p keeps the smallest set of most likely tokens whose probability reaches
  ``top_p`` (always at least the most likely one)."""
  logits_BV = logits_BV.astype(jnp.float32)
  if temperature == 0.0:
    return jnp.argmax(logits_BV, axis=-1).astype(jnp.int32)
  logits_BV = logits_BV / temperature
  if top_k is not None and top_k < logits_BV.shape[-1]:
    # Sample among the k most likely tokens only: the same distribution as masking the
    # others out, without noise or a filter over the whole vocabulary (on a CPU that
    # was 20x the cost of the sampling step at GPT-2's vocabulary).
    top_BK, idx_BK = jax.lax.top_k(logits_BV, top_k)
    if top_p is not None and top_p < 1.0:
      top_BK = jnp.where(_nucleus(top_BK, top_p), top_BK, -jnp.inf)
    pick_B = jax.random.categorical(rng, top_BK, axis=-1)
    return jnp.take_along_axis(idx_BK, pick_B[:, None], axis=1)[:, 0].astype(jnp.int32)
  if top_p is not None and top_p < 1.0:
    sorted_BV = jnp.sort(logits_BV, axis=-1)[:, ::-1]
    keep_BV = _nucleus(sorted_BV, top_p)
    cutoff_B1 = jnp.min(jnp.where(keep_BV, sorted_BV, jnp.inf), axis=-1, keepdims=True)
    logits_BV = jnp.where(logits_BV < cutoff_B1, -jnp.inf, logits_BV)
  return jax.random.categorical(rng, logits_BV, axis=-1).astype(jnp.int32)


def _nucleus(sorted_BK: jax.Array, top_p: float) -> jax.Array:
  """Which of the logits (sorted, most likely first) top-p keeps: those whose likelier
  tokens hold less than ``top_p`` of the probability (the first always)."""
  probs_BK = jax.nn.softmax(sorted_BK, axis=-1)
  return jnp.cumsum(probs_BK, axis=-1) - probs_BK < top_p


def _check(model, input_ids, attention_mask, max_new_tokens, rng, temperature, top_k,
           top_p, eos_token_id) -> np.ndarray:
  """One-line errors before compiling; returns the prompt lengths."""
  cfg = model.config
  if input_ids.ndim != 2 or attention_mask.shape != input_ids.shape:
    raise ValueError(f"input_ids {input_ids.shape} and attention_mask "
                     f"{attention_mask.shape} must be the same [batch, length].")
  if max_new_tokens < 1:
    raise ValueError(f"max_new_tokens={max_new_tokens}: expected at least 1.")
  if temperature < 0:
    raise ValueError(f"temperature={temperature}: expected >= 0 (0: greedy).")
  if top_p is not None and not 0.0 < top_p <= 1.0:
    raise ValueError(f"top_p={top_p}: expected a value in (0, 1].")
  if top_k is not None and top_k < 1:
    raise ValueError(f"top_k={top_k}: expected at least 1.")
  if temperature > 0 and rng is None:
    raise ValueError("Sampling (temperature > 0) needs rng=jax.random.key(...).")
  if eos_token_id is not None and not 0 <= eos_token_id < cfg.vocab_size:
    raise ValueError(f"eos_token_id={eos_token_id} is outside the vocabulary "
                     f"(0..{cfg.vocab_size - 1}).")
  mask = np.asarray(attention_mask).astype(bool)
  lengths = mask.sum(1)
  if (lengths == 0).any():
    raise ValueError(f"Prompt {int(np.argmax(lengths == 0))} is empty; every row needs at "
                     "least one token.")
  if (mask != (np.arange(mask.shape[1]) < lengths[:, None])).any():
    raise ValueError("Prompts must be right-padded (attention_mask 1...1 0...0 per row), "
                     "as cljax's tokenization gives them; these are not.")
  longest = int(lengths.max())
  if longest + max_new_tokens > cfg.n_positions:
    raise ValueError(f"The longest prompt ({longest} tokens) plus max_new_tokens="
                     f"{max_new_tokens} exceeds the model's n_positions={cfg.n_positions}; "
                     "shorten the prompts or ask for fewer tokens.")
  return lengths


def generate(model: GPT2LM, params, input_ids, attention_mask, *, max_new_tokens: int,
             rng: jax.Array | None = None, temperature: float = 0.0,
             top_k: int | None = None, top_p: float | None = None,
             eos_token_id: int | None = None, pad_token_id: int | None = None
             ) -> np.ndarray:
  """New tokens after each right-padded prompt: a NumPy ``int32 [batch,
  max_new_tokens]`` array, on the host and ready to decode.

  ``temperature=0`` is greedy; otherwise ``rng`` is required and ``top_k`` /
  ``top_p`` filter the distribution. After a row emits ``eos_token_id`` (default:
  the model's) the rest of the row is ``pad_token_id`` (default: the EOS id).
  """
  eos = model.config.eos_token_id if eos_token_id is None else eos_token_id
  pad = eos if pad_token_id is None else pad_token_id
  lengths = _check(model, input_ids, attention_mask, max_new_tokens, rng, temperature,
                   top_k, top_p, eos)
  # Trim trailing padding, then pad to the bucket: one program per bucket.
  width = min(-(-int(lengths.max()) // PROMPT_BUCKET) * PROMPT_BUCKET,
              model.config.n_positions - max_new_tokens)
  ids = np.full((len(lengths), width), pad, np.int32)
  keep = min(width, np.shape(input_ids)[1])
  ids[:, :keep] = np.asarray(input_ids)[:, :keep]
  mask = (np.arange(width) < lengths[:, None]).astype(np.int32)
  return np.asarray(_generate(
      model, params, jnp.asarray(ids), jnp.asarray(mask),
      jax.random.key(0) if rng is None else rng, max_new_tokens=max_new_tokens,
      temperature=float(temperature), top_k=top_k, top_p=top_p, eos=eos, pad=pad))


@functools.partial(jax.jit, static_argnames=("model", "max_new_tokens", "temperature",
                                             "top_k", "top_p", "eos", "pad"))
def _generate(model, params, ids_BP, mask_BP, rng, *, max_new_tokens, temperature, top_k,
              top_p, eos, pad):
  B, P = ids_BP.shape
  lengths_B = jnp.sum(mask_BP, axis=1).astype(jnp.int32)
  cache = init_cache(model.config, B, P + max_new_tokens)
  logits_BV, cache = model.apply({"params": params}, ids_BP, mask_BP,
                                 positions=jnp.broadcast_to(jnp.arange(P), (B, P)),
                                 cache=cache, logits_index=lengths_B - 1)
  sample = functools.partial(sample_logits, temperature=temperature, top_k=top_k,
                             top_p=top_p)

  def cond(carry):
    t, _, _, _, done, _ = carry
    return (t < max_new_tokens) & ~jnp.all(done)

  def body(carry):
    t, cache, logits_BV, out_BN, done_B, rng = carry
    rng, key = jax.random.split(rng)
    token_B = jnp.where(done_B, pad, sample(logits_BV, key))
    out_BN = out_BN.at[:, t].set(token_B)
    done_B = done_B | (token_B == eos)
    logits_BV, cache = _decode(model, params, token_B, lengths_B + t, P + t, cache)
    return t + 1, cache, logits_BV, out_BN, done_B, rng

  out = jnp.full((B, max_new_tokens), pad, jnp.int32)
  carry = (jnp.int32(0), cache, logits_BV, out, jnp.zeros((B,), bool), rng)
  return jax.lax.while_loop(cond, body, carry)[3]


def _decode(model, params, token_B, position_B, slot, cache: KVCache):
  """Logits after one new token per row (at its own position, in cache ``slot``),
  and the updated cache."""
  logits_BV, cache = model.apply({"params": params}, token_B[:, None],
                                 jnp.ones_like(token_B)[:, None],
                                 positions=position_B[:, None], cache=cache,
                                 cache_index=slot, logits_index=jnp.zeros_like(position_B))
  return logits_BV, cache
