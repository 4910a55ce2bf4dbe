"""The GPT-2 trunk in Flax Linen, numerically equal to transformers': embeddings,
causal self-attention (with the KV cache for generation), the MLP and the
pre-LayerNorm block.

Attribute names follow transformers' GPT-2 (``wte``, ``wpe``, ``h_i``, ``ln_1``,
``attn/c_attn``, ``mlp/c_fc``, ``ln_f``) so that weight loading is a small
declarative table (see ``cljax/hf.py``). ``cljax.models`` is the only package that
imports ``flax.linen``.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from cljax.models.config import GPT2Config, as_dtype
from cljax.models.den import den_mlp
from cljax.models.dropout import dropout
from cljax.models.kv_cache import attend_cached
from cljax.models.layers import (Trunk, attend, dense, embed_tokens, projection,
                                 token_embedding)
from cljax.models.peft import Adapter

def layer_norm(config: GPT2Config, name: str):
  """A LayerNorm with the config's epsilon and dtypes."""
  # Hugging Face uses epsilon 1e-5; Linen's default is 1e-6.
  return nn.LayerNorm(epsilon=config.layer_norm_epsilon, dtype=as_dtype(config.dtype),
                      param_dtype=as_dtype(config.param_dtype), name=name)


class CausalSelfAttention(nn.Module):
  """Multi-head causal self-attention; padded keys are masked as transformers does.

  With ``query_idx_B`` only that position's query is computed (keys and values still
  cover every position): the classifier needs nothing else from its last block.
  With ``kv`` (a :class:`LayerCache`) the new keys and values are written into the
  cache at their positions and the queries attend to the cache; returns
  ``(output, updated kv)``.
  """

  config: GPT2Config

  @nn.compact
  def __call__(self, x_BTD, mask_BT, deterministic: bool, query_idx_B=None, kv=None,
               slot_B=None):
    cfg = self.config
    B, T, _ = x_BTD.shape
    qkv = projection(cfg, 3 * cfg.n_embd, "c_attn", x_BTD, slot_B, deterministic)
    q, k, v = jnp.split(qkv, 3, axis=-1)
    q_BQNH, k_BTNH, v_BTNH = (a.reshape(B, T, cfg.n_head, cfg.head_dim) for a in (q, k, v))
    if kv is not None:
      out_BTNH, kv = attend_cached(q_BQNH, k_BTNH, v_BTNH, kv)
      out_BTD = projection(cfg, cfg.n_embd, "c_proj", out_BTNH.reshape(B, T, cfg.n_embd),
                            slot_B, deterministic)
      return dropout(cfg, cfg.resid_pdrop, out_BTD, deterministic), kv
    out_BQNH = attend(cfg, q_BQNH, k_BTNH, v_BTNH, mask_BT, deterministic, query_idx_B)
    Q = out_BQNH.shape[1]
    out_BQD = out_BQNH.reshape(B, Q, cfg.n_embd)
    out_BQD = projection(cfg, cfg.n_embd, "c_proj", out_BQD, slot_B, deterministic)
    return dropout(cfg, cfg.resid_pdrop, out_BQD, deterministic)


class MLP(nn.Module):
  config: GPT2Config

  @nn.compact
  def __call__(self, x_BTD, deterministic: bool, slot_B=None, units_BW=None):
    cfg = self.config
    h = projection(cfg, cfg.inner_dim, "c_fc", x_BTD, slot_B, deterministic)
    if cfg.den_capacity:   # DEN's units beside the loaded ones, masked by units_BW
      return dropout(cfg, cfg.resid_pdrop, den_mlp(
          self, x_BTD, (h,), units_BW, dense, lambda h: jax.nn.gelu(h, approximate=True)),
                     deterministic)
    h = jax.nn.gelu(h, approximate=True)  # GPT-2's "gelu_new"
    h = projection(cfg, cfg.n_embd, "c_proj", h, slot_B, deterministic)
    return dropout(cfg, cfg.resid_pdrop, h, deterministic)


class Block(nn.Module):
  """Pre-LayerNorm transformer block; with ``query_idx_B``, outputs only that
  position of each sequence (``[B, 1, D]``); with ``kv``, returns ``(x, kv)``;
  ``slot_B`` picks each example's LoRA / adapter slot (None: their sum); ``units_BW``
  the MLP units each example uses (``den_capacity``, DEN). Every family's block takes
  these arguments (and ``positions_BT``, which GPT-2's does not need)."""

  config: GPT2Config

  @nn.compact
  def __call__(self, x_BTD, mask_BT, deterministic: bool, query_idx_B=None, kv=None,
               slot_B=None, units_BW=None, positions_BT=None):
    del positions_BT   # GPT-2's positions are its embeddings' (``wpe``)
    cfg = self.config
    attn = CausalSelfAttention(cfg, name="attn")(
        layer_norm(cfg, "ln_1")(x_BTD), mask_BT, deterministic, query_idx_B, kv, slot_B)
    if kv is not None:
      attn, kv = attn
    if query_idx_B is not None:
      x_BTD = jnp.take_along_axis(x_BTD, query_idx_B[:, None, None], axis=1)
    x_BTD = x_BTD + attn
    x_BTD = x_BTD + MLP(cfg, name="mlp")(layer_norm(cfg, "ln_2")(x_BTD), deterministic,
                                         slot_B, units_BW)
    if cfg.adapter_size:
      x_BTD = Adapter(cfg, name="adapter")(x_BTD, slot_B)
    return x_BTD if kv is None else (x_BTD, kv)


def embeddings(cfg: GPT2Config, input_ids_BT, positions_BT, deterministic: bool,
                prefix: str = "", rows_BT=None):
  """(the ``wte`` module, token + position embeddings after dropout). Called inside
  a model's compact ``__call__``: ``wte`` and ``wpe`` (names after ``prefix``) are
  that model's parameters. With DEN's rows (``den_rows``), ``rows_BT`` indexes each
  token's row in ``wte`` then ``den_wte`` (None: ``input_ids_BT``, ``wte``'s own)."""
  wte, tokens_BTD = embed_tokens(cfg, input_ids_BT, prefix, rows_BT)
  x_BTD = tokens_BTD + token_embedding(cfg, f"{prefix}wpe", cfg.n_positions)(positions_BT)
  return wte, dropout(cfg, cfg.embd_pdrop, x_BTD, deterministic)


TRUNK = Trunk(embed=embeddings, block=Block, final_norm=layer_norm)

