"""The Llama family in Flax: Llama 2 and 3.x (with the ``llama3`` RoPE scaling),
Mistral (inputs up to its sliding window, where full attention equals it), Qwen2
(q/k/v biases) and Qwen3 (q/k RMSNorm, its own ``head_dim``): grouped-query
attention with rotary positions, RMSNorm, a SwiGLU MLP, tied or untied embeddings.

Parameter names follow transformers' (``embed_tokens``, ``layers_{i}/self_attn/q_proj``,
``mlp/gate_proj``, ``input_layernorm``, ``norm``, ``lm_head``, ``score``), kernels
``[in, out]``; :func:`llama_params` converts a transformers state dict. The family's
config (with its :data:`LAYOUT`, the interface the methods read) and its trunk
(:data:`TRUNK`): ``cljax.models.heads``' classifier equals
``*ForSequenceClassification`` (a bias-free ``score`` at the rightmost token that is
not the pad id) and its LM ``*ForCausalLM``, with LoRA, adapters, prompts, PNN's
columns and the KV cache as for GPT-2.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar
from collections.abc import Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp

from cljax.models.config import Layout, TrunkOptions, as_dtype
from cljax.models.den import den_mlp
from cljax.models.dropout import dropout
from cljax.models.kv_cache import attend_cached
from cljax.models.layers import (RMSNorm, Trunk, attend, dense, projection, rope_frequencies,
                                 rotary_embeddings, rotate, to_numpy)
from cljax.models.peft import Adapter

FAMILIES = ("llama", "mistral", "qwen2", "qwen3")


LAYOUT = Layout(
    embedding="embed_tokens", positions=None, block="layers_", attention="self_attn",
    mlp="mlp", norms=("input_layernorm", "post_attention_layernorm", "q_norm", "k_norm",
                      "norm"),
    final_norm="norm", lm_head="lm_head",
    projections=("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
    roles=(("attention_in", ("q_proj", "k_proj", "v_proj")), ("attention_out", ("o_proj",)),
           ("mlp_in", ("gate_proj", "up_proj")), ("mlp_out", ("down_proj",))),
    den_units=(("gate", "gate_proj", "den_gate_proj"), ("up", "up_proj", "den_up_proj"),
               ("proj", "down_proj", "den_down_proj")))


@dataclasses.dataclass(frozen=True)
class LlamaConfig(TrunkOptions):
  """A Llama-family model's hyperparameters (transformers' names), and the options
  every family's config carries (:class:`TrunkOptions`)."""
  LAYOUT: ClassVar[Layout] = LAYOUT

  model_type: str = "llama"
  vocab_size: int = 32000
  hidden_size: int = 4096
  intermediate_size: int = 11008
  num_hidden_layers: int = 32
  num_attention_heads: int = 32
  num_key_value_heads: int | None = None
  head_dim: int | None = None
  max_position_embeddings: int = 2048
  # Mistral's window: attention over the whole context equals it up to this many
  # tokens, so longer inputs are refused (n_positions); None: no window.
  sliding_window: int | None = None
  rms_norm_eps: float = 1e-6
  rope_theta: float = 10000.0
  rope_scaling: tuple = ()            # (key, value) pairs of the rope parameters
  tie_word_embeddings: bool = False
  attention_bias: bool = False        # q, k, v and o (Llama); Qwen2: q, k, v only
  qk_norm: bool = False               # Qwen3: RMSNorm over each head of q and k
  mlp_bias: bool = False
  pad_token_id: int | None = None
  eos_token_id: int | None = None
  num_labels: int = 2
  initializer_range: float = 0.02
  attn_pdrop: float = 0.0             # transformers' attention_dropout
  embd_pdrop: float = 0.0             # (Llama has none; --dropout sets them)
  resid_pdrop: float = 0.0
  dtype: Any = "float32"
  param_dtype: Any = "float32"

  def __post_init__(self):
    self.check_options()
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

  # The names the family-neutral code reads (GPT-2's config has them as fields).
  n_layer = property(lambda self: self.num_hidden_layers)
  n_embd = property(lambda self: self.hidden_size)
  n_head = property(lambda self: self.num_attention_heads)
  n_positions = property(lambda self: min(self.max_position_embeddings,
                                          self.sliding_window or self.max_position_embeddings))
  inner_dim = property(lambda self: self.intermediate_size)
  layer_norm_epsilon = property(lambda self: self.rms_norm_eps)
  tied = property(lambda self: self.tie_word_embeddings)

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
    eos = hf.get("eos_token_id")
    return cls(**{**given, "model_type": kind, "rope_theta": float(theta),
                  "eos_token_id": eos[0] if isinstance(eos, list) else eos,
                  "attn_pdrop": float(hf.get("attention_dropout", 0.0)),
                  "rope_scaling": tuple(sorted(rope.items())),
                  "attention_bias": hf.get("attention_bias", kind == "qwen2"),
                  "qk_norm": kind == "qwen3",
                  # (Qwen's sliding_window applies only with use_sliding_window)
                  "sliding_window": hf.get("sliding_window") if kind == "mistral" else None,
                  "num_labels": len(hf.get("id2label") or {}) or hf.get("num_labels", 2),
                  **overrides})


# ----------------------------------------------------------------------------
# Layers
# ----------------------------------------------------------------------------

def _norm(cfg: LlamaConfig, name: str):
  return RMSNorm(cfg.rms_norm_eps, as_dtype(cfg.param_dtype), name=name)


class GroupedQueryAttention(nn.Module):
  """Grouped-query attention with rotary positions (of ``positions_BT``), with
  :func:`cljax.models.layers.attend`'s pooled query and the KV cache as GPT-2's."""
  config: LlamaConfig

  @nn.compact
  def __call__(self, x_BTD, mask_BT, deterministic: bool, query_idx_B=None, kv=None,
               slot_B=None, positions_BT=None):
    cfg = self.config
    B, T, _ = x_BTD.shape
    N, K, H = cfg.num_attention_heads, cfg.kv_heads, cfg.head_size
    bias, o_bias = cfg.attention_bias, cfg.attention_bias and cfg.model_type != "qwen2"
    q, k, v = (projection(cfg, n * H, name, x_BTD, slot_B, deterministic, bias).reshape(
        B, T, n, H) for n, name in ((N, "q_proj"), (K, "k_proj"), (K, "v_proj")))
    if cfg.qk_norm:
      q, k = _norm(cfg, "q_norm")(q), _norm(cfg, "k_norm")(k)
    inv = jnp.asarray(rope_frequencies(H, cfg.rope_theta, cfg.rope_scaling))
    q, k = rotate(q, positions_BT, inv), rotate(k, positions_BT, inv)
    if kv is not None:
      out, kv = attend_cached(q, k, v, kv)
    else:
      out = attend(cfg, q, k, v, mask_BT, deterministic, query_idx_B)
    out = projection(cfg, cfg.hidden_size, "o_proj", out.reshape(B, out.shape[1], N * H),
                     slot_B, deterministic, o_bias)
    out = dropout(cfg, cfg.resid_pdrop, out, deterministic)
    return out if kv is None else (out, kv)


def _swiglu(gate, up):
  return jax.nn.silu(gate) * up


class GatedMLP(nn.Module):
  """SwiGLU: ``down(silu(gate(x)) * up(x))``; with DEN's capacity, its units (a
  ``gate_proj`` and an ``up_proj`` column with a ``down_proj`` row) beside them,
  masked by ``units_BW``."""
  config: LlamaConfig

  @nn.compact
  def __call__(self, x, deterministic: bool, slot_B=None, units_BW=None):
    cfg = self.config

    def proj(features, name, h):
      return projection(cfg, features, name, h, slot_B, deterministic, cfg.mlp_bias)

    gate, up = (proj(cfg.intermediate_size, name, x) for name in ("gate_proj", "up_proj"))
    if cfg.den_capacity:
      out = den_mlp(self, x, (gate, up), units_BW, dense, _swiglu, cfg.mlp_bias)
    else:
      out = proj(cfg.hidden_size, "down_proj", _swiglu(gate, up))
    return dropout(cfg, cfg.resid_pdrop, out, deterministic)


class Layer(nn.Module):
  """A pre-RMSNorm decoder layer, with GPT-2's block arguments (:class:`Trunk`)."""
  config: LlamaConfig

  @nn.compact
  def __call__(self, x, mask_BT, deterministic: bool, query_idx_B=None, kv=None, slot_B=None,
               units_BW=None, positions_BT=None):
    cfg = self.config
    attn = GroupedQueryAttention(cfg, name="self_attn")(
        _norm(cfg, "input_layernorm")(x), mask_BT, deterministic, query_idx_B, kv, slot_B,
        positions_BT)
    if kv is not None:
      attn, kv = attn
    if query_idx_B is not None:
      x = jnp.take_along_axis(x, query_idx_B[:, None, None], axis=1)
    x = x + attn
    x = x + GatedMLP(cfg, name="mlp")(_norm(cfg, "post_attention_layernorm")(x),
                                      deterministic, slot_B, units_BW)
    if cfg.adapter_size:
      x = Adapter(cfg, name="adapter")(x, slot_B)
    return x if kv is None else (x, kv)


TRUNK = Trunk(embed=rotary_embeddings, block=Layer, final_norm=_norm)


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
