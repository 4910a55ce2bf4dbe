"""The Llama family in Flax: Llama 2 and 3.x (with the ``llama3`` RoPE scaling),
Mistral (without a sliding window), Qwen2 (q/k/v biases) and Qwen3 (q/k RMSNorm, its
own ``head_dim``): grouped-query attention with rotary positions, RMSNorm, a SwiGLU
MLP, tied or untied embeddings.

Parameter names follow transformers' (``embed_tokens``, ``layers_{i}/self_attn/q_proj``,
``mlp/gate_proj``, ``input_layernorm``, ``norm``, ``lm_head``, ``score``), kernels
``[in, out]``; :func:`llama_params` converts a transformers state dict.
:class:`LlamaClassifier` equals ``*ForSequenceClassification`` (a bias-free ``score``
at the rightmost token that is not the pad id), :class:`LlamaLM` ``*ForCausalLM``.

This module is the family's model only: loading through ``cljax.load_pretrained``,
generation with the KV cache and the methods' interface to it come after it.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any
from collections.abc import Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from cljax.models.config import as_dtype
from cljax.models.heads import pool_index

FAMILIES = ("llama", "mistral", "qwen2", "qwen3")


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
  """A Llama-family model's hyperparameters (transformers' names)."""
  model_type: str = "llama"
  vocab_size: int = 32000
  hidden_size: int = 4096
  intermediate_size: int = 11008
  num_hidden_layers: int = 32
  num_attention_heads: int = 32
  num_key_value_heads: int | None = None
  head_dim: int | None = None
  max_position_embeddings: int = 2048
  rms_norm_eps: float = 1e-6
  rope_theta: float = 10000.0
  rope_scaling: tuple = ()            # (key, value) pairs of the rope parameters
  tie_word_embeddings: bool = False
  attention_bias: bool = False        # q, k, v and o (Llama); Qwen2: q, k, v only
  qk_norm: bool = False               # Qwen3: RMSNorm over each head of q and k
  mlp_bias: bool = False
  pad_token_id: int | None = None
  num_labels: int = 2
  initializer_range: float = 0.02
  dtype: Any = "float32"
  param_dtype: Any = "float32"

  def __post_init__(self):
    if self.model_type not in FAMILIES:
      raise ValueError(f"model_type {self.model_type!r}: the Llama family here is "
                       f"{', '.join(FAMILIES)}.")
    if self.num_attention_heads % self.kv_heads:
      raise ValueError(f"num_attention_heads ({self.num_attention_heads}) must be a "
                       f"multiple of num_key_value_heads ({self.kv_heads}).")

  @property
  def kv_heads(self) -> int:
    return self.num_key_value_heads or self.num_attention_heads

  @property
  def head_size(self) -> int:
    return self.head_dim or self.hidden_size // self.num_attention_heads

  @classmethod
  def from_hf(cls, hf: Mapping, **overrides) -> LlamaConfig:
    """The config of a transformers ``config.json`` (a dict) of the family."""
    kind = hf.get("model_type", "llama")
    rope = dict(hf.get("rope_parameters") or hf.get("rope_scaling") or {})
    theta = rope.pop("rope_theta", hf.get("rope_theta", 10000.0))
    if rope.get("rope_type", rope.get("type", "default")) not in ("default", "llama3"):
      raise ValueError(f"rope_type {rope.get('rope_type')!r}: supported are default and "
                       "llama3.")
    if kind in ("qwen2", "qwen3") and hf.get("use_sliding_window"):
      raise ValueError(f"{kind} with use_sliding_window=true: sliding-window attention is "
                       "not implemented.")
    fields = {f.name for f in dataclasses.fields(cls)}
    # (transformers' own "dtype" is its storage dtype, not the compute dtype here)
    given = {k: v for k, v in hf.items()
             if k in fields and k not in ("rope_scaling", "dtype", "param_dtype")}
    return cls(**{**given, "model_type": kind, "rope_theta": float(theta),
                  "rope_scaling": tuple(sorted(rope.items())),
                  "attention_bias": hf.get("attention_bias", kind == "qwen2"),
                  "qk_norm": kind == "qwen3",
                  "num_labels": len(hf.get("id2label") or {}) or hf.get("num_labels", 2),
                  **overrides})


# ----------------------------------------------------------------------------
# Rotary positions
# ----------------------------------------------------------------------------

def inv_frequencies(cfg: LlamaConfig) -> np.ndarray:
  """The rotary inverse frequencies ``[head_dim / 2]``, with the ``llama3`` scaling
  (transformers' ``_compute_llama3_parameters``) where the config asks for it."""
  d = cfg.head_size
  inv = 1.0 / (cfg.rope_theta ** (np.arange(0, d, 2, dtype=np.float64) / d))
  rope = dict(cfg.rope_scaling)
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


# ----------------------------------------------------------------------------
# Layers
# ----------------------------------------------------------------------------

def causal_mask(mask_BT, T: int):
  """``[B, 1, T, T]`` bool: each query's earlier keys that are not padding."""
  return jnp.tril(jnp.ones((T, T), bool))[None, None] & mask_BT[:, None, None, :].astype(bool)


def score_head(cfg, input_ids, h_BTD):
  """The bias-free ``score`` logits (float32) at the rightmost token that is not the pad
  id (transformers' ``*ForSequenceClassification`` rule). Inside a compact call."""
  idx_B = pool_index(input_ids, cfg.pad_token_id)
  h_BD = jnp.take_along_axis(h_BTD, idx_B[:, None, None], axis=1)[:, 0]
  return dense_layer(cfg, cfg.num_labels, "score", False)(h_BD).astype(jnp.float32)


def lm_head(cfg, embed, h_BTD, name: str):
  """The LM logits (float32): the input embedding ``embed`` when tied, else the
  bias-free layer ``name``. Inside a compact call."""
  if cfg.tie_word_embeddings:
    return embed.attend(h_BTD).astype(jnp.float32)
  return dense_layer(cfg, cfg.vocab_size, name, False)(h_BTD).astype(jnp.float32)


def to_numpy(value) -> np.ndarray:
  """A state dict's tensor (torch or array) as a float32 numpy array."""
  return np.asarray(value.detach().float().numpy() if hasattr(value, "detach") else value,
                    np.float32)


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


def dense_layer(cfg, features: int, name: str, bias: bool = True):
  """A family's linear layer (its compute and parameter dtypes, its init)."""
  return nn.Dense(features, use_bias=bias, name=name, dtype=as_dtype(cfg.dtype),
                  param_dtype=as_dtype(cfg.param_dtype),
                  kernel_init=nn.initializers.normal(cfg.initializer_range))


class GroupedQueryAttention(nn.Module):
  config: LlamaConfig

  @nn.compact
  def __call__(self, x_BTD, positions_BT, mask_BT):
    cfg = self.config
    B, T, _ = x_BTD.shape
    N, K, H = cfg.num_attention_heads, cfg.kv_heads, cfg.head_size
    bias, o_bias = cfg.attention_bias, cfg.attention_bias and cfg.model_type != "qwen2"
    q = dense_layer(cfg, N * H, "q_proj", bias)(x_BTD).reshape(B, T, N, H)
    k = dense_layer(cfg, K * H, "k_proj", bias)(x_BTD).reshape(B, T, K, H)
    v = dense_layer(cfg, K * H, "v_proj", bias)(x_BTD).reshape(B, T, K, H)
    if cfg.qk_norm:
      q = RMSNorm(cfg.rms_norm_eps, as_dtype(cfg.param_dtype), name="q_norm")(q)
      k = RMSNorm(cfg.rms_norm_eps, as_dtype(cfg.param_dtype), name="k_norm")(k)
    inv = jnp.asarray(inv_frequencies(cfg))
    q, k = rotate(q, positions_BT, inv), rotate(k, positions_BT, inv)
    k, v = jnp.repeat(k, N // K, axis=2), jnp.repeat(v, N // K, axis=2)
    out = jax.nn.dot_product_attention(q, k, v, mask=causal_mask(mask_BT, T))
    return dense_layer(cfg, cfg.hidden_size, "o_proj", o_bias)(out.reshape(B, T, N * H))


class GatedMLP(nn.Module):
  config: LlamaConfig

  @nn.compact
  def __call__(self, x):
    cfg = self.config
    gate = dense_layer(cfg, cfg.intermediate_size, "gate_proj", cfg.mlp_bias)(x)
    up = dense_layer(cfg, cfg.intermediate_size, "up_proj", cfg.mlp_bias)(x)
    return dense_layer(cfg, cfg.hidden_size, "down_proj", cfg.mlp_bias)(jax.nn.silu(gate) * up)


class Layer(nn.Module):
  config: LlamaConfig

  @nn.compact
  def __call__(self, x, positions_BT, mask_BT):
    cfg = self.config
    pdt = as_dtype(cfg.param_dtype)
    x = x + GroupedQueryAttention(cfg, name="self_attn")(
        RMSNorm(cfg.rms_norm_eps, pdt, name="input_layernorm")(x), positions_BT, mask_BT)
    return x + GatedMLP(cfg, name="mlp")(
        RMSNorm(cfg.rms_norm_eps, pdt, name="post_attention_layernorm")(x))


def llama_trunk(cfg: LlamaConfig, input_ids_BT, attention_mask_BT):
  """(the ``embed_tokens`` module, the final normed hidden states ``[B, T, D]``).
  Called inside a model's compact ``__call__``."""
  B, T = input_ids_BT.shape
  mask = jnp.ones((B, T), bool) if attention_mask_BT is None else attention_mask_BT
  embed = nn.Embed(cfg.vocab_size, cfg.hidden_size, name="embed_tokens",
                   dtype=as_dtype(cfg.dtype), param_dtype=as_dtype(cfg.param_dtype),
                   embedding_init=nn.initializers.normal(cfg.initializer_range))
  x = embed(input_ids_BT)
  positions = jnp.broadcast_to(jnp.arange(T), (B, T))
  for i in range(cfg.num_hidden_layers):
    x = Layer(cfg, name=f"layers_{i}")(x, positions, mask)
  return embed, RMSNorm(cfg.rms_norm_eps, as_dtype(cfg.param_dtype), name="norm")(x)


class LlamaClassifier(nn.Module):
  """The trunk with a bias-free ``score`` head at the rightmost token that is not the
  pad id: ``apply(params, input_ids, attention_mask)`` -> float32 ``[B, num_labels]``."""
  config: LlamaConfig

  @nn.compact
  def __call__(self, input_ids, attention_mask=None):
    _, h_BTD = llama_trunk(self.config, input_ids, attention_mask)
    return score_head(self.config, input_ids, h_BTD)


class LlamaLM(nn.Module):
  """The trunk with its language-model head (``lm_head``, or ``embed_tokens`` when
  tied): ``apply(params, input_ids, attention_mask)`` -> float32 ``[B, T, vocab]``."""
  config: LlamaConfig

  @nn.compact
  def __call__(self, input_ids, attention_mask=None):
    embed, h_BTD = llama_trunk(self.config, input_ids, attention_mask)
    return lm_head(self.config, embed, h_BTD, "lm_head")


# ----------------------------------------------------------------------------
# transformers' weights
# ----------------------------------------------------------------------------

def llama_params(state_dict: Mapping[str, Any], cfg: LlamaConfig) -> dict:
  """Flax params from a transformers ``*ForCausalLM`` or ``*ForSequenceClassification``
  state dict (tensors or arrays): Linear weights transposed to ``[in, out]``."""
  params: dict = {}
  for name, value in state_dict.items():
    array = to_numpy(value)
    keys = name.split(".")
    if keys[0] == "model":
      keys = keys[1:]
    if keys[0] == "layers":
      keys = [f"layers_{keys[1]}"] + keys[2:]
    if keys[-1] == "weight" and keys[0] == "embed_tokens":
      keys[-1] = "embedding"
    elif keys[-1] == "weight" and "norm" not in keys[-2] and "layernorm" not in keys[-2]:
      keys[-1], array = "kernel", array.T
    elif keys[-1] == "bias":
      keys[-1] = "bias"
    if keys[0] == "lm_head" and cfg.tie_word_embeddings:
      continue
    node = params
    for k in keys[:-1]:
      node = node.setdefault(k, {})
    node[keys[-1]] = jnp.asarray(array, as_dtype(cfg.param_dtype))
  return params
