"""GPT-NeoX in Flax (Pythia, the architecture of continual-pretraining research):
parallel attention and MLP residuals (or sequential, ``use_parallel_residual``), a fused
``query_key_value`` projection, rotary positions on the first ``partial_rotary_factor``
of each head, LayerNorm with bias, an exact-GELU MLP and an untied ``embed_out``.

Names follow transformers' (``embed_in``, ``layers_{i}/attention/query_key_value``,
``mlp/dense_h_to_4h``, ``final_layer_norm``, ``embed_out``, ``score``), kernels
``[in, out]``; :func:`neox_params` converts a transformers state dict.
:class:`GPTNeoXClassifier` equals ``GPTNeoXForSequenceClassification``,
:class:`GPTNeoXLM` ``GPTNeoXForCausalLM``. The family's model only, as
:mod:`cljax.models.llama`.
"""

from __future__ import annotations

import dataclasses
from typing import Any
from collections.abc import Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from cljax.models.config import as_dtype
from cljax.models.llama import causal_mask, dense_layer, lm_head, rotate, score_head, to_numpy


@dataclasses.dataclass(frozen=True)
class GPTNeoXConfig:
  """A GPT-NeoX model's hyperparameters (transformers' names)."""
  vocab_size: int = 50432
  hidden_size: int = 768
  intermediate_size: int = 3072
  num_hidden_layers: int = 12
  num_attention_heads: int = 12
  max_position_embeddings: int = 2048
  rope_theta: float = 10000.0
  partial_rotary_factor: float = 0.25
  layer_norm_eps: float = 1e-5
  use_parallel_residual: bool = True
  attention_bias: bool = True
  tie_word_embeddings: bool = False
  pad_token_id: int | None = None
  num_labels: int = 2
  initializer_range: float = 0.02
  dtype: Any = "float32"
  param_dtype: Any = "float32"

  def __post_init__(self):
    if self.hidden_size % self.num_attention_heads:
      raise ValueError(f"hidden_size ({self.hidden_size}) must be divisible by "
                       f"num_attention_heads ({self.num_attention_heads}).")

  @property
  def head_size(self) -> int:
    return self.hidden_size // self.num_attention_heads

  @property
  def rotary_dims(self) -> int:
    return int(self.head_size * self.partial_rotary_factor)

  @classmethod
  def from_hf(cls, hf: Mapping, **overrides) -> GPTNeoXConfig:
    """The config of a transformers ``config.json`` (a dict) with model_type gpt_neox."""
    if hf.get("hidden_act", "gelu") != "gelu":
      raise ValueError(f"hidden_act {hf['hidden_act']!r}: gpt_neox here has the exact GELU.")
    rope = dict(hf.get("rope_parameters") or {})
    if rope.get("rope_type", "default") != "default":
      raise ValueError(f"rope_type {rope['rope_type']!r}: gpt_neox here has the default.")
    fields = {f.name for f in dataclasses.fields(cls)}
    given = {k: v for k, v in hf.items() if k in fields and k not in ("dtype", "param_dtype")}
    return cls(**{**given,
                  "rope_theta": float(rope.get("rope_theta", hf.get("rope_theta", 10000.0))),
                  "partial_rotary_factor": float(rope.get("partial_rotary_factor",
                                                          hf.get("rotary_pct", 0.25))),
                  "num_labels": len(hf.get("id2label") or {}) or hf.get("num_labels", 2),
                  **overrides})


def _norm(cfg: GPTNeoXConfig, name: str):
  return nn.LayerNorm(epsilon=cfg.layer_norm_eps, name=name, dtype=as_dtype(cfg.dtype),
                      param_dtype=as_dtype(cfg.param_dtype))


class NeoXAttention(nn.Module):
  config: GPTNeoXConfig

  @nn.compact
  def __call__(self, x_BTD, positions_BT, mask_BT):
    cfg = self.config
    B, T, _ = x_BTD.shape
    N, H, R = cfg.num_attention_heads, cfg.head_size, cfg.rotary_dims
    qkv = dense_layer(cfg, 3 * cfg.hidden_size, "query_key_value", cfg.attention_bias)(x_BTD)
    q, k, v = jnp.split(qkv.reshape(B, T, N, 3 * H), 3, axis=-1)
    inv = jnp.asarray(1.0 / (cfg.rope_theta ** (np.arange(0, R, 2, dtype=np.float64) / R)),
                      jnp.float32)
    q = jnp.concatenate([rotate(q[..., :R], positions_BT, inv), q[..., R:]], -1)
    k = jnp.concatenate([rotate(k[..., :R], positions_BT, inv), k[..., R:]], -1)
    out = jax.nn.dot_product_attention(q, k, v, mask=causal_mask(mask_BT, T))
    return dense_layer(cfg, cfg.hidden_size, "dense", cfg.attention_bias)(out.reshape(B, T, N * H))


class NeoXMLP(nn.Module):
  config: GPTNeoXConfig

  @nn.compact
  def __call__(self, x):
    cfg = self.config
    h = jax.nn.gelu(dense_layer(cfg, cfg.intermediate_size, "dense_h_to_4h")(x), approximate=False)
    return dense_layer(cfg, cfg.hidden_size, "dense_4h_to_h")(h)


class NeoXLayer(nn.Module):
  config: GPTNeoXConfig

  @nn.compact
  def __call__(self, x, positions_BT, mask_BT):
    cfg = self.config
    attn = NeoXAttention(cfg, name="attention")(_norm(cfg, "input_layernorm")(x),
                                                positions_BT, mask_BT)
    if cfg.use_parallel_residual:
      return x + attn + NeoXMLP(cfg, name="mlp")(_norm(cfg, "post_attention_layernorm")(x))
    x = x + attn
    return x + NeoXMLP(cfg, name="mlp")(_norm(cfg, "post_attention_layernorm")(x))


def neox_trunk(cfg: GPTNeoXConfig, input_ids_BT, attention_mask_BT):
  """(the ``embed_in`` module, the final normed hidden states ``[B, T, D]``)."""
  B, T = input_ids_BT.shape
  mask = jnp.ones((B, T), bool) if attention_mask_BT is None else attention_mask_BT
  embed = nn.Embed(cfg.vocab_size, cfg.hidden_size, name="embed_in",
                   dtype=as_dtype(cfg.dtype), param_dtype=as_dtype(cfg.param_dtype),
                   embedding_init=nn.initializers.normal(cfg.initializer_range))
  x = embed(input_ids_BT)
  positions = jnp.broadcast_to(jnp.arange(T), (B, T))
  for i in range(cfg.num_hidden_layers):
    x = NeoXLayer(cfg, name=f"layers_{i}")(x, positions, mask)
  return embed, _norm(cfg, "final_layer_norm")(x)


class GPTNeoXClassifier(nn.Module):
  """The trunk with a bias-free ``score`` head at the rightmost token that is not the
  pad id: ``apply(params, input_ids, attention_mask)`` -> float32 ``[B, num_labels]``."""
  config: GPTNeoXConfig

  @nn.compact
  def __call__(self, input_ids, attention_mask=None):
    _, h_BTD = neox_trunk(self.config, input_ids, attention_mask)
    return score_head(self.config, input_ids, h_BTD)


class GPTNeoXLM(nn.Module):
  """The trunk with ``embed_out`` (or ``embed_in`` when tied): ``apply(params,
  input_ids, attention_mask)`` -> float32 ``[B, T, vocab]``."""
  config: GPTNeoXConfig

  @nn.compact
  def __call__(self, input_ids, attention_mask=None):
    embed, h_BTD = neox_trunk(self.config, input_ids, attention_mask)
    return lm_head(self.config, embed, h_BTD, "embed_out")


def neox_params(state_dict: Mapping[str, Any], cfg: GPTNeoXConfig) -> dict:
  """Flax params from a transformers GPT-NeoX state dict (tensors or arrays)."""
  params: dict = {}
  for name, value in state_dict.items():
    array = to_numpy(value)
    keys = name.split(".")
    if keys[0] == "gpt_neox":
      keys = keys[1:]
    if keys[0] == "layers":
      keys = [f"layers_{keys[1]}"] + keys[2:]
    if keys[0] == "lm_head":   # transformers 5's name in memory; checkpoints say embed_out
      keys[0] = "embed_out"
    if keys[-1].endswith("masked_bias") or keys[-2:] == ["attention", "bias"]:
      continue   # old checkpoints' causal-mask buffers
    norm = "norm" in keys[-2]
    if keys[0] == "embed_in":
      keys[-1] = "embedding"
    elif keys[-1] == "weight":
      keys[-1], array = ("scale", array) if norm else ("kernel", array.T)
    if keys[0] == "embed_out" and cfg.tie_word_embeddings:
      continue
    node = params
    for k in keys[:-1]:
      node = node.setdefault(k, {})
    node[keys[-1]] = jnp.asarray(array, as_dtype(cfg.param_dtype))
  return params
