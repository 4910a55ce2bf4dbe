"""GPT-NeoX in Flax (Pythia, the architecture of continual-pretraining research):
parallel attention and MLP residuals (or sequential, ``use_parallel_residual``), a fused
``query_key_value`` projection, rotary positions on the first ``partial_rotary_factor``
of each head, LayerNorm with bias, an exact-GELU MLP and an untied ``embed_out``.

Names follow transformers' (``embed_in``, ``layers_{i}/attention/query_key_value``,
``mlp/dense_h_to_4h``, ``final_layer_norm``, ``embed_out``, ``score``), kernels
``[in, out]``; :func:`neox_params` converts a transformers state dict. The family's
config (with its :data:`LAYOUT`) and trunk (:data:`TRUNK`), as
:mod:`cljax.models.llama`'s: the models over it are ``cljax.models.heads``'.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, ClassVar
from collections.abc import Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp

from cljax.models.config import Layout, TrunkOptions, as_dtype
from cljax.models.den import den_mlp
from cljax.models.dropout import dropout
from cljax.models.kv_cache import attend_cached
from cljax.models.layers import (Trunk, attend, dense, projection, rope_frequencies,
                                 rotary_embeddings, rotate, to_numpy)
from cljax.models.peft import Adapter

LAYOUT = Layout(
    embedding="embed_in", positions=None, block="layers_", attention="attention", mlp="mlp",
    norms=("input_layernorm", "post_attention_layernorm", "final_layer_norm"),
    final_norm="final_layer_norm", lm_head="embed_out",
    projections=("query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"),
    roles=(("attention_in", ("query_key_value",)), ("attention_out", ("dense",)),
           ("mlp_in", ("dense_h_to_4h",)), ("mlp_out", ("dense_4h_to_h",))),
    den_units=(("fc", "dense_h_to_4h", "den_dense_h_to_4h"),
               ("proj", "dense_4h_to_h", "den_dense_4h_to_h")))


@dataclasses.dataclass(frozen=True)
class GPTNeoXConfig(TrunkOptions):
  """A GPT-NeoX model's hyperparameters (transformers' names), and the options every
  family's config carries (:class:`TrunkOptions`)."""
  LAYOUT: ClassVar[Layout] = LAYOUT

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
  eos_token_id: int | None = None
  num_labels: int = 2
  initializer_range: float = 0.02
  attn_pdrop: float = 0.0             # transformers' attention_dropout
  embd_pdrop: float = 0.0             # (GPT-NeoX has none; --dropout sets them)
  resid_pdrop: float = 0.0            # transformers' hidden_dropout
  dtype: Any = "float32"
  param_dtype: Any = "float32"

  def __post_init__(self):
    self.check_options()
    if self.hidden_size % self.num_attention_heads:
      raise ValueError(f"hidden_size ({self.hidden_size}) must be divisible by "
                       f"num_attention_heads ({self.num_attention_heads}).")

  @property
  def head_size(self) -> int:
    return self.hidden_size // self.num_attention_heads

  @property
  def rotary_dims(self) -> int:
    return int(self.head_size * self.partial_rotary_factor)

  # The names the family-neutral code reads (GPT-2's config has them as fields).
  model_type = "gpt_neox"
  kv_heads = property(lambda self: self.num_attention_heads)
  n_layer = property(lambda self: self.num_hidden_layers)
  n_embd = property(lambda self: self.hidden_size)
  n_head = property(lambda self: self.num_attention_heads)
  n_positions = property(lambda self: self.max_position_embeddings)
  inner_dim = property(lambda self: self.intermediate_size)
  layer_norm_epsilon = property(lambda self: self.layer_norm_eps)
  tied = property(lambda self: self.tie_word_embeddings)

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
                  "attn_pdrop": float(hf.get("attention_dropout", 0.0)),
                  "resid_pdrop": float(hf.get("hidden_dropout", 0.0)),
                  **overrides})


def _norm(cfg: GPTNeoXConfig, name: str):
  return nn.LayerNorm(epsilon=cfg.layer_norm_eps, name=name, dtype=as_dtype(cfg.dtype),
                      param_dtype=as_dtype(cfg.param_dtype))


class NeoXAttention(nn.Module):
  """Attention with a fused ``query_key_value`` and rotary positions on the first
  ``rotary_dims`` of each head; arguments as GPT-2's attention."""
  config: GPTNeoXConfig

  @nn.compact
  def __call__(self, x_BTD, mask_BT, deterministic: bool, query_idx_B=None, kv=None,
               slot_B=None, positions_BT=None):
    cfg = self.config
    B, T, _ = x_BTD.shape
    N, H, R = cfg.num_attention_heads, cfg.head_size, cfg.rotary_dims
    qkv = projection(cfg, 3 * cfg.hidden_size, "query_key_value", x_BTD, slot_B,
                     deterministic, cfg.attention_bias)
    q, k, v = jnp.split(qkv.reshape(B, T, N, 3 * H), 3, axis=-1)
    inv = jnp.asarray(rope_frequencies(R, cfg.rope_theta))
    q = jnp.concatenate([rotate(q[..., :R], positions_BT, inv), q[..., R:]], -1)
    k = jnp.concatenate([rotate(k[..., :R], positions_BT, inv), k[..., R:]], -1)
    if kv is not None:
      out, kv = attend_cached(q, k, v, kv)
    else:
      out = attend(cfg, q, k, v, mask_BT, deterministic, query_idx_B)
    out = projection(cfg, cfg.hidden_size, "dense", out.reshape(B, out.shape[1], N * H),
                     slot_B, deterministic, cfg.attention_bias)
    out = dropout(cfg, cfg.resid_pdrop, out, deterministic)
    return out if kv is None else (out, kv)


class NeoXMLP(nn.Module):
  config: GPTNeoXConfig

  @nn.compact
  def __call__(self, x, deterministic: bool, slot_B=None, units_BW=None):
    cfg = self.config
    h = projection(cfg, cfg.intermediate_size, "dense_h_to_4h", x, slot_B, deterministic)
    gelu = functools.partial(jax.nn.gelu, approximate=False)
    if cfg.den_capacity:   # DEN's units beside the loaded ones, masked by units_BW
      h = den_mlp(self, x, (h,), units_BW, dense, gelu)
    else:
      h = projection(cfg, cfg.hidden_size, "dense_4h_to_h", gelu(h), slot_B, deterministic)
    return dropout(cfg, cfg.resid_pdrop, h, deterministic)


class NeoXLayer(nn.Module):
  """A GPT-NeoX layer (parallel or sequential residual), with GPT-2's block arguments
  (:class:`Trunk`)."""
  config: GPTNeoXConfig

  @nn.compact
  def __call__(self, x, mask_BT, deterministic: bool, query_idx_B=None, kv=None, slot_B=None,
               units_BW=None, positions_BT=None):
    cfg = self.config
    attn = NeoXAttention(cfg, name="attention")(_norm(cfg, "input_layernorm")(x), mask_BT,
                                                deterministic, query_idx_B, kv, slot_B,
                                                positions_BT)
    if kv is not None:
      attn, kv = attn
    if query_idx_B is not None:
      x = jnp.take_along_axis(x, query_idx_B[:, None, None], axis=1)
    mlp = NeoXMLP(cfg, name="mlp")
    if cfg.use_parallel_residual:
      x = x + attn + mlp(_norm(cfg, "post_attention_layernorm")(x), deterministic, slot_B,
                         units_BW)
    else:
      x = x + attn
      x = x + mlp(_norm(cfg, "post_attention_layernorm")(x), deterministic, slot_B, units_BW)
    if cfg.adapter_size:
      x = Adapter(cfg, name="adapter")(x, slot_B)
    return x if kv is None else (x, kv)


TRUNK = Trunk(embed=rotary_embeddings, block=NeoXLayer, final_norm=_norm)


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
