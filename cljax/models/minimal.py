"""A minimal GPT-2 classifier in Flax: the plain architecture with GPT-2's training
dropout (embeddings, attention probabilities, residuals) and nothing else (no
per-task modules, no KV cache, no pooled-query shortcut, no Hugging Face names). It
is the benchmarks' baseline for what cljax's model adds to a compile
(:mod:`cljax.bench.overhead`), not a model to train."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp


class MinimalBlock(nn.Module):
  """Pre-LayerNorm block: causal self-attention, then a GELU MLP."""
  n_embd: int
  n_head: int
  dtype: jnp.dtype
  dropout: float

  @nn.compact
  def __call__(self, x_BTD, mask_BT, train: bool):
    B, T, D = x_BTD.shape
    drop = lambda x: nn.Dropout(self.dropout)(x, deterministic=not train)
    h = nn.LayerNorm(epsilon=1e-5, dtype=self.dtype)(x_BTD)
    q, k, v = jnp.split(nn.Dense(3 * D, dtype=self.dtype)(h), 3, axis=-1)
    q, k, v = (a.reshape(B, T, self.n_head, D // self.n_head) for a in (q, k, v))
    keep_B1TT = jnp.tril(jnp.ones((T, T), bool))[None, None] & mask_BT[:, None, None, :].astype(
        bool)
    logits = jnp.einsum("bqnh,bknh->bnqk", q, k) / jnp.sqrt(D // self.n_head).astype(q.dtype)
    probs = jax.nn.softmax(jnp.where(keep_B1TT, logits.astype(jnp.float32), -1e30), axis=-1)
    a = jnp.einsum("bnqk,bknh->bqnh", drop(probs.astype(q.dtype)), v).reshape(B, T, D)
    x_BTD = x_BTD + drop(nn.Dense(D, dtype=self.dtype)(a))
    h = nn.LayerNorm(epsilon=1e-5, dtype=self.dtype)(x_BTD)
    h = jax.nn.gelu(nn.Dense(4 * D, dtype=self.dtype)(h), approximate=True)
    return x_BTD + drop(nn.Dense(D, dtype=self.dtype)(h))


class MinimalGPT2Classifier(nn.Module):
  """Token and position embeddings, ``n_layer`` blocks, a final LayerNorm and a linear
  head read at each row's last real token."""
  vocab_size: int
  n_positions: int
  n_embd: int
  n_layer: int
  n_head: int
  num_labels: int
  dtype: jnp.dtype = jnp.float32
  dropout: float = 0.1

  @nn.compact
  def __call__(self, input_ids_BT, mask_BT, train: bool = False):
    T = input_ids_BT.shape[1]
    x = (nn.Embed(self.vocab_size, self.n_embd, dtype=self.dtype)(input_ids_BT)
         + nn.Embed(self.n_positions, self.n_embd, dtype=self.dtype)(jnp.arange(T))[None])
    x = nn.Dropout(self.dropout)(x, deterministic=not train)
    for _ in range(self.n_layer):
      x = MinimalBlock(self.n_embd, self.n_head, self.dtype, self.dropout)(x, mask_BT, train)
    x = nn.LayerNorm(epsilon=1e-5, dtype=self.dtype)(x)
    last_B = jnp.sum(mask_BT, axis=1) - 1
    pooled_BD = jnp.take_along_axis(x, last_B[:, None, None], axis=1)[:, 0]
    return nn.Dense(self.num_labels, use_bias=False, dtype=self.dtype)(pooled_BD).astype(
        jnp.float32)
