"""The key-value cache of compiled generation: every layer's keys and values in
fixed-length slots, and the attention of new tokens against it (pure JAX)."""

from __future__ import annotations

from typing import TYPE_CHECKING, NamedTuple

import jax
import jax.numpy as jnp

if TYPE_CHECKING:
  from cljax.models.config import GPT2Config

class LayerCache(NamedTuple):
  """One layer's view of the KV cache: keys and values ``[B, heads, S, head_dim]``,
  the slot where this call's T tokens go (``index``, the same for every row: one
  in-place slice write) and which slots hold a real token once written
  (``valid [B, S]``)."""
  k: jax.Array
  v: jax.Array
  index: jax.Array
  valid: jax.Array


class KVCache(NamedTuple):
  """Keys and values of every layer (tuples of ``[B, heads, S, head_dim]``: each head's
  slots contiguous, so attention reads them without a transpose; under ``scan_layers``
  one array ``[L, B, heads, S, head_dim]`` each) and the slots that hold a real token
  (``valid [B, S]``).

  Slots are in the order tokens were written; a token's position (its ``wpe`` row,
  or its rotary angle, applied before its key is written) is passed separately, so
  rows of different prompt lengths share slot indices:
  ``cljax.generate`` writes the padded prompts at slots ``0..P-1`` and the t-th new
  token of every row at slot ``P + t``, at the row's own position ``L_b + t``."""
  k: tuple
  v: tuple
  valid: jax.Array


def init_cache(config: GPT2Config, batch: int, length: int) -> KVCache:
  """An empty cache of ``length`` slots per row (the prompt plus the new tokens)."""
  shape = (batch, config.kv_heads, length, config.head_size)
  if config.scan_layers:   # the layers' under nn.scan: one array [L, ...] each
    zeros = jnp.zeros((config.n_layer, *shape), jnp.dtype(config.dtype))
    return KVCache(zeros, zeros, jnp.zeros((batch, length), bool))
  zeros = tuple(jnp.zeros(shape, jnp.dtype(config.dtype)) for _ in range(config.n_layer))
  return KVCache(zeros, zeros, jnp.zeros((batch, length), bool))


def attend_cached(q_BTNH, k_BTNH, v_BTNH, kv: LayerCache):
  """Writes the new keys and values at slots ``index..index+T-1``, then attends each
  query to the real slots up to its own (softmax in float32). With fewer key heads
  ``K`` than query heads ``N`` (grouped-query attention), query head ``n`` reads key
  head ``n // (N / K)``, as transformers' ``repeat_kv``."""
  S, T = kv.valid.shape[1], q_BTNH.shape[1]
  start = (0, 0, kv.index, 0)
  k_BNSH = jax.lax.dynamic_update_slice(
      kv.k, k_BTNH.transpose(0, 2, 1, 3).astype(kv.k.dtype), start)
  v_BNSH = jax.lax.dynamic_update_slice(
      kv.v, v_BTNH.transpose(0, 2, 1, 3).astype(kv.v.dtype), start)
  upto_TS = jnp.arange(S)[None, :] <= kv.index + jnp.arange(T)[:, None]
  keep_B1TS = (upto_TS[None] & kv.valid[:, None])[:, None]
  scale = jnp.asarray(1.0 / q_BTNH.shape[-1] ** 0.5, q_BTNH.dtype)
  B, _, N, H = q_BTNH.shape
  K = k_BNSH.shape[1]
  if K < N:
    q_BTKGH = (q_BTNH * scale).reshape(B, T, K, N // K, H)
    logits = jnp.einsum("btkgh,bksh->bkgts", q_BTKGH, k_BNSH.astype(q_BTNH.dtype))
    logits = jnp.where(keep_B1TS[:, None], logits.astype(jnp.float32),
                       jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(logits, axis=-1).astype(q_BTNH.dtype)
    out = jnp.einsum("bkgts,bksh->btkgh", probs, v_BNSH.astype(q_BTNH.dtype))
    return out.reshape(B, T, N, H), kv._replace(k=k_BNSH, v=v_BNSH)
  logits_BNTS = jnp.einsum("btnh,bnsh->bnts", q_BTNH * scale, k_BNSH.astype(q_BTNH.dtype))
  logits_BNTS = jnp.where(keep_B1TS, logits_BNTS.astype(jnp.float32),
                          jnp.finfo(jnp.float32).min)
  probs_BNTS = jax.nn.softmax(logits_BNTS, axis=-1).astype(q_BTNH.dtype)
  out_BTNH = jnp.einsum("bnts,bnsh->btnh", probs_BNTS, v_BNSH.astype(q_BTNH.dtype))
  return out_BTNH, kv._replace(k=k_BNSH, v=v_BNSH)

