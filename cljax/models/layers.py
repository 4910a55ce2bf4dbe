"""The layers every family's trunk is made of: the linear layer (with its LoRA where
the config targets it), causal attention with padding masks, dropout, a pooled
query and grouped-query heads, RMSNorm, rotary positions, and the pooling rule of
transformers' classifiers. Called inside a module's compact ``__call__``."""

from __future__ import annotations

import math
from typing import Any, NamedTuple
from collections.abc import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from cljax.models.config import as_dtype
from cljax.models.den import den_tokens
from cljax.models.dropout import dropout
from cljax.models.peft import LoRA


class Trunk(NamedTuple):
  """What a family's file gives the models over its trunk (:mod:`cljax.models.heads`).

  ``embed(cfg, input_ids_BT, positions_BT, deterministic, prefix="", rows_BT=None)``
  -> (the token ``nn.Embed``, the block input ``[B, T, D]``); ``block(cfg, name=...)``
  called as ``(x, mask_BT, deterministic, query_idx_B, kv, slot_B, units_BW,
  positions_BT)`` -> x (``(x, kv)`` with a cache; with ``query_idx_B``, that position
  only); ``final_norm(cfg, name)`` -> the norm after the last block."""
  embed: Callable
  block: type
  final_norm: Callable


def pool_index(input_ids_BT: jax.Array, pad_token_id: int | None) -> jax.Array:
  """Index of the rightmost token that is not the pad id (0 if all are pad).

  Exactly transformers' rule, which reads ``input_ids`` and not the attention mask.
  """
  T = input_ids_BT.shape[-1]
  if pad_token_id is None:
    return jnp.full(input_ids_BT.shape[:-1], T - 1, dtype=jnp.int32)
  not_pad = (input_ids_BT != pad_token_id).astype(jnp.int32)
  return jnp.argmax(jnp.arange(T, dtype=jnp.int32) * not_pad, axis=-1)


def dense(features: int, config, name: str, use_bias: bool = True):
  """A linear layer with the config's init (normal, ``initializer_range``) and dtypes.
  Kernels are ``[in, out]`` (HF GPT-2's Conv1D layout; other families' Linear
  weights are transposed on loading)."""
  return nn.Dense(features, use_bias=use_bias, dtype=as_dtype(config.dtype),
                  param_dtype=as_dtype(config.param_dtype),
                  kernel_init=nn.initializers.normal(config.initializer_range),
                  name=name)


def projection(cfg, features: int, name: str, x, slot_B, deterministic: bool,
               use_bias: bool = True):
  """The projection ``name`` of x, plus its LoRA update where ``lora_targets`` names it."""
  y = dense(features, cfg, name, use_bias)(x)
  if cfg.lora_rank and name in cfg.lora_targets:
    y = y + LoRA(cfg, features, name=f"{name}_lora")(x, slot_B, deterministic).astype(y.dtype)
  return y


def attend(cfg, q_BTNH, k_BTKH, v_BTKH, mask_BT, deterministic: bool, query_idx_B=None):
  """Causal attention of every query (or, with ``query_idx_B``, of that position's
  query alone: ``[B, 1, N, H]``) over the keys that are not padding (``mask_BT``),
  with attention dropout in training. ``K`` key heads serve ``N`` query heads
  (grouped-query attention where ``K < N``)."""
  T = q_BTNH.shape[1]
  pad_B11S = None if mask_BT is None else mask_BT[:, None, None, :].astype(bool)
  if query_idx_B is None:
    keep_B1QS = jnp.tril(jnp.ones((T, T), dtype=bool))[None, None]
  else:
    q_BTNH = jnp.take_along_axis(q_BTNH, query_idx_B[:, None, None, None], axis=1)
    keep_B1QS = (jnp.arange(T)[None, :] <= query_idx_B[:, None])[:, None, None, :]
  if pad_B11S is not None:
    keep_B1QS = keep_B1QS & pad_B11S
  if not deterministic and cfg.attn_pdrop > 0.0:
    # jax.nn.dot_product_attention has no attention dropout; spell it out.
    groups = q_BTNH.shape[2] // k_BTKH.shape[2]
    if groups > 1:
      k_BTKH, v_BTKH = (jnp.repeat(a, groups, axis=2) for a in (k_BTKH, v_BTKH))
    scale = jnp.asarray(1.0 / q_BTNH.shape[-1] ** 0.5, q_BTNH.dtype)
    logits_BNQS = jnp.einsum("bqnh,bsnh->bnqs", q_BTNH * scale, k_BTKH)
    logits_BNQS = jnp.where(keep_B1QS, logits_BNQS.astype(jnp.float32),
                            jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(logits_BNQS, axis=-1).astype(q_BTNH.dtype)
    probs = dropout(cfg, cfg.attn_pdrop, probs, False, seq_axes=(2, 3))
    return jnp.einsum("bnqs,bsnh->bqnh", probs, v_BTKH)
  if query_idx_B is None:
    # The causal flag (rather than an explicit mask) lets GPUs use fused kernels.
    return jax.nn.dot_product_attention(q_BTNH, k_BTKH, v_BTKH, mask=pad_B11S,
                                        is_causal=True, implementation=cfg.attention)
  return jax.nn.dot_product_attention(q_BTNH, k_BTKH, v_BTKH, mask=keep_B1QS,
                                      implementation=cfg.attention)


class RMSNorm(nn.Module):
  """transformers' ``LlamaRMSNorm``: normalized in float32, then scaled."""
  eps: float
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    weight = self.param("weight", nn.initializers.ones, (x.shape[-1],), self.param_dtype)
    h = x.astype(jnp.float32)
    h = h * jax.lax.rsqrt(jnp.mean(jnp.square(h), -1, keepdims=True) + self.eps)
    return weight.astype(x.dtype) * h.astype(x.dtype)


def rope_frequencies(head_size: int, theta: float, scaling=()) -> np.ndarray:
  """The rotary inverse frequencies ``[head_size / 2]``, with the ``llama3`` scaling
  (transformers' ``_compute_llama3_parameters``) where ``scaling`` (its (key, value)
  pairs) asks for it."""
  d = head_size
  inv = 1.0 / (theta ** (np.arange(0, d, 2, dtype=np.float64) / d))
  rope = dict(scaling)
  if rope.get("rope_type", rope.get("type")) != "llama3":
    return inv.astype(np.float32)
  factor, low, high = rope["factor"], rope["low_freq_factor"], rope["high_freq_factor"]
  old = rope["original_max_position_embeddings"]
  wavelen = 2 * math.pi / inv
  scaled = np.where(wavelen > old / low, inv / factor, inv)
  smooth = (old / wavelen - low) / (high - low)
  smoothed = (1 - smooth) * scaled / factor + smooth * scaled
  medium = ~(wavelen < old / high) & ~(wavelen > old / low)
  return np.where(medium, smoothed, scaled).astype(np.float32)


def rotate(x_BTNH, positions_BT, inv_freq):
  """Rotary embedding of ``x`` (transformers' half-split layout: ``rotate_half``)."""
  freqs_BTF = positions_BT[..., None].astype(jnp.float32) * inv_freq
  emb = jnp.concatenate([freqs_BTF, freqs_BTF], -1)[:, :, None, :]
  cos, sin = jnp.cos(emb).astype(x_BTNH.dtype), jnp.sin(emb).astype(x_BTNH.dtype)
  half = x_BTNH.shape[-1] // 2
  rotated = jnp.concatenate([-x_BTNH[..., half:], x_BTNH[..., :half]], -1)
  return x_BTNH * cos + rotated * sin


def token_embedding(cfg, name: str, rows: int | None = None):
  """An ``nn.Embed`` of ``rows`` (default: the vocabulary) with the config's init."""
  return nn.Embed(cfg.vocab_size if rows is None else rows, cfg.n_embd, name=name,
                  dtype=as_dtype(cfg.dtype), param_dtype=as_dtype(cfg.param_dtype),
                  embedding_init=nn.initializers.normal(cfg.initializer_range))


def embed_tokens(cfg, input_ids_BT, prefix: str = "", rows_BT=None):
  """(the token ``nn.Embed``, named by the layout after ``prefix``, the token embeddings
  ``[B, T, D]``). With DEN's rows (``den_rows``), ``rows_BT`` indexes each token's row
  in the embedding then ``den_wte`` (None: ``input_ids_BT``, the embedding's own)."""
  embed = token_embedding(cfg, f"{prefix}{cfg.LAYOUT.embedding}")
  if not cfg.den_rows:
    return embed, embed(input_ids_BT)
  copies = token_embedding(cfg, f"{prefix}den_wte", cfg.den_rows)
  return embed, den_tokens(embed, copies, input_ids_BT if rows_BT is None else rows_BT,
                           cfg.vocab_size)


def rotary_embeddings(cfg, input_ids_BT, positions_BT, deterministic: bool, prefix: str = "",
                      rows_BT=None):
  """A rotary family's :class:`Trunk` embedding: (its token ``nn.Embed``, named by its
  layout, the token embeddings after dropout); positions act in the attention."""
  del positions_BT
  embed, tokens_BTD = embed_tokens(cfg, input_ids_BT, prefix, rows_BT)
  return embed, dropout(cfg, cfg.embd_pdrop, tokens_BTD, deterministic)


def to_numpy(value) -> np.ndarray:
  """A state dict's tensor (torch or array) as a float32 numpy array."""
  return np.asarray(value.detach().float().numpy() if hasattr(value, "detach") else value,
                    np.float32)
