"""GPT-2 sequence classifier in Flax Linen, numerically matching Hugging Face.

Attribute names follow transformers' ``GPT2ForSequenceClassification`` (``wte``,
``wpe``, ``h_i``, ``ln_1``, ``attn/c_attn``, ``mlp/c_fc``, ``ln_f``, ``score``) so
that weight loading is a small declarative table (see ``cljax/hf.py``).

This is the only module that imports ``flax.linen``.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
from typing import Any, NamedTuple
from collections.abc import Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp

# ----------------------------------------------------------------------------
# Config
# ----------------------------------------------------------------------------

# Standard sizes (n_layer, n_embd, n_head), as in Hugging Face's hub configs, plus
# tiny sizes for tests and CPU smoke runs.
SIZES: dict[str, dict[str, int]] = {
    "gpt2": dict(n_layer=12, n_embd=768, n_head=12),
    "gpt2-medium": dict(n_layer=24, n_embd=1024, n_head=16),
    "gpt2-large": dict(n_layer=36, n_embd=1280, n_head=20),
    "gpt2-xl": dict(n_layer=48, n_embd=1600, n_head=25),
    # Small random-init sizes for CPU runs and tests.
    "mini": dict(n_layer=4, n_embd=256, n_head=4),
    "tiny": dict(n_layer=2, n_embd=64, n_head=4),
}
SIZE_ALIASES = {"small": "gpt2", "medium": "gpt2-medium", "large": "gpt2-large",
                "xl": "gpt2-xl"}

LORA_TARGETS = ("c_attn", "c_proj", "c_fc")

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def as_dtype(dtype: Any) -> Any:
  """Maps 'float32' / 'bfloat16' / a jnp dtype to a jnp dtype, with a clear error."""
  if isinstance(dtype, str):
    if dtype not in _DTYPES:
      raise ValueError(f"Unknown dtype {dtype!r}; expected one of {sorted(_DTYPES)}.")
    return _DTYPES[dtype]
  return jnp.dtype(dtype).type


@dataclasses.dataclass(frozen=True)
class GPT2Config:
  """Hyperparameters of a GPT-2 classifier (Hugging Face names where they exist).

  ``dtype`` is the compute dtype (activations, matmuls); ``param_dtype`` is the
  storage dtype of the parameters (float32 master weights by default). Logits are
  always returned in float32.
  """

  vocab_size: int = 50257
  n_positions: int = 1024
  n_embd: int = 768
  n_layer: int = 12
  n_head: int = 12
  n_inner: int | None = None
  layer_norm_epsilon: float = 1e-5
  embd_pdrop: float = 0.1
  attn_pdrop: float = 0.1
  resid_pdrop: float = 0.1
  initializer_range: float = 0.02
  num_labels: int = 2
  pad_token_id: int | None = 50256
  eos_token_id: int = 50256
  dtype: str = "float32"
  param_dtype: str = "float32"
  remat: bool = False
  # Parameter-efficient modules (none by default), ``peft_slots`` of each (one per
  # task for the per-task methods): LoRA on the projections named in ``lora_targets``
  # (c_attn, c_proj: attention's and the MLP's, c_fc) and a bottleneck adapter after
  # each block. They add parameters and leave the base ones as they are.
  lora_rank: int = 0
  lora_alpha: float = 8.0
  lora_dropout: float = 0.0
  lora_targets: tuple[str, ...] = ("c_attn",)
  adapter_size: int = 0
  prompt_length: int = 0     # soft-prompt tokens per slot, prepended to the input
  peft_slots: int = 1
  # Progressive Neural Networks: this many GPT-2 columns (0 or 1: none), laterals from
  # every earlier column's block outputs into each later one.
  pnn_columns: int = 0

  def __post_init__(self):
    if self.n_embd % self.n_head:
      raise ValueError(f"n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head}).")
    as_dtype(self.dtype), as_dtype(self.param_dtype)
    unknown = sorted(set(self.lora_targets) - set(LORA_TARGETS))
    if unknown:
      raise ValueError(f"LoRA targets {unknown}: expected some of {list(LORA_TARGETS)}.")
    if min(self.lora_rank, self.adapter_size, self.prompt_length) < 0 or self.peft_slots < 1:
      raise ValueError(f"lora_rank={self.lora_rank}, adapter_size={self.adapter_size}, "
                       f"prompt_length={self.prompt_length} and peft_slots="
                       f"{self.peft_slots}: expected >= 0, >= 0, >= 0 and >= 1.")

    if self.pnn_columns > 1 and (self.lora_rank or self.adapter_size or self.prompt_length):
      raise ValueError("Progressive columns (pnn_columns) do not combine with LoRA, "
                       "adapters or prompts.")

  @property
  def has_peft(self) -> bool:
    """Whether the model holds modules a plain Hugging Face GPT-2 cannot."""
    return bool(self.lora_rank or self.adapter_size or self.prompt_length
                or self.pnn_columns > 1)

  @property
  def head_dim(self) -> int:
    return self.n_embd // self.n_head

  @property
  def inner_dim(self) -> int:
    return self.n_inner or 4 * self.n_embd

  def replace(self, **kwargs) -> GPT2Config:
    return dataclasses.replace(self, **kwargs)

  @classmethod
  def from_size(cls, size: str, **overrides) -> GPT2Config:
    """A config of a named size: gpt2 / gpt2-medium / gpt2-large / gpt2-xl (or
    small / medium / large / xl), or the random-init sizes mini / tiny."""
    name = SIZE_ALIASES.get(size, size)
    if name not in SIZES:
      raise ValueError(
          f"Unknown GPT-2 size {size!r}; expected one of "
          f"{sorted(SIZES) + sorted(SIZE_ALIASES)}.")
    return cls(**{**SIZES[name], **overrides})

  @classmethod
  def from_hf(cls, hf_config: Mapping[str, Any] | str | os.PathLike,
              **overrides) -> GPT2Config:
    """Builds a config from a Hugging Face ``config.json`` (a dict or a path).

    The pad id is the checkpoint's ``pad_token_id``, or its ``eos_token_id`` when
    it has none (pad = eos, as the study does).
    """
    if not isinstance(hf_config, Mapping):
      with open(hf_config) as f:
        hf_config = json.load(f)
    model_type = hf_config.get("model_type")
    if model_type != "gpt2":
      raise ValueError(
          f"This checkpoint's config.json has model_type={model_type!r}, expected "
          "'gpt2': cljax implements the GPT-2 architecture only. Pass a GPT-2 "
          "checkpoint (for example 'gpt2' or a folder saved from GPT2Model / "
          "GPT2ForSequenceClassification).")
    act = hf_config.get("activation_function", "gelu_new")
    if act not in ("gelu_new", "gelu_pytorch_tanh"):
      raise ValueError(f"Unsupported activation_function {act!r}; cljax implements "
                       "GPT-2's tanh-approximate GELU ('gelu_new').")
    for flag in ("scale_attn_by_inverse_layer_idx", "reorder_and_upcast_attn",
                 "add_cross_attention"):
      if hf_config.get(flag):
        raise ValueError(f"Unsupported GPT-2 option {flag}=True in config.json.")
    if hf_config.get("scale_attn_weights", True) is False:
      raise ValueError("Unsupported GPT-2 option scale_attn_weights=False.")
    eos = hf_config.get("eos_token_id", 50256)
    pad = hf_config.get("pad_token_id")
    kwargs = dict(
        vocab_size=hf_config["vocab_size"],
        n_positions=hf_config.get("n_positions", 1024),
        n_embd=hf_config["n_embd"],
        n_layer=hf_config["n_layer"],
        n_head=hf_config["n_head"],
        n_inner=hf_config.get("n_inner"),
        layer_norm_epsilon=hf_config.get("layer_norm_epsilon", 1e-5),
        embd_pdrop=hf_config.get("embd_pdrop", 0.1),
        attn_pdrop=hf_config.get("attn_pdrop", 0.1),
        resid_pdrop=hf_config.get("resid_pdrop", 0.1),
        initializer_range=hf_config.get("initializer_range", 0.02),
        num_labels=hf_config.get("num_labels", len(hf_config.get("id2label", {})) or 2),
        eos_token_id=eos,
        pad_token_id=eos if pad is None else pad,
    )
    kwargs.update(overrides)
    return cls(**kwargs)

  def to_hf(self, head: str = "score") -> dict[str, Any]:
    """The Hugging Face ``config.json`` dict of a GPT2ForSequenceClassification
    (``head="score"``) or a GPT2LMHeadModel (``head="lm"``)."""
    return {
        "architectures": ["GPT2ForSequenceClassification" if head == "score"
                          else "GPT2LMHeadModel"],
        "model_type": "gpt2",
        "activation_function": "gelu_new",
        "vocab_size": self.vocab_size,
        "n_positions": self.n_positions,
        "n_ctx": self.n_positions,
        "n_embd": self.n_embd,
        "n_layer": self.n_layer,
        "n_head": self.n_head,
        "n_inner": self.n_inner,
        "layer_norm_epsilon": self.layer_norm_epsilon,
        "embd_pdrop": self.embd_pdrop,
        "attn_pdrop": self.attn_pdrop,
        "resid_pdrop": self.resid_pdrop,
        "summary_first_dropout": 0.1,
        "initializer_range": self.initializer_range,
        "bos_token_id": self.eos_token_id,
        "eos_token_id": self.eos_token_id,
        "pad_token_id": self.pad_token_id,
        "num_labels": self.num_labels,
        "id2label": {str(i): f"LABEL_{i}" for i in range(self.num_labels)},
        "label2id": {f"LABEL_{i}": i for i in range(self.num_labels)},
        "tie_word_embeddings": True,
        "torch_dtype": "float32",
    }


# ----------------------------------------------------------------------------
# Modules
# ----------------------------------------------------------------------------

def _dense(features: int, config: GPT2Config, name: str, use_bias: bool = True):
  # HF's Conv1D stores its weight as (in, out), exactly Flax's Dense kernel layout.
  return nn.Dense(features, use_bias=use_bias, dtype=as_dtype(config.dtype),
                  param_dtype=as_dtype(config.param_dtype),
                  kernel_init=nn.initializers.normal(config.initializer_range),
                  name=name)


def _layer_norm(config: GPT2Config, name: str):
  # Hugging Face uses epsilon 1e-5; Linen's default is 1e-6.
  return nn.LayerNorm(epsilon=config.layer_norm_epsilon, dtype=as_dtype(config.dtype),
                      param_dtype=as_dtype(config.param_dtype), name=name)


class LoRA(nn.Module):
  """The low-rank update of one projection (Hu et al. 2021), ``peft_slots`` of them:
  ``alpha / r * dropout(x) A_s B_s`` with ``A_s [in, r]`` (PEFT's Kaiming-uniform init)
  and ``B_s [r, out]`` (zeros, so a new slot changes nothing). ``slot_B [B]`` picks
  each example's slot; ``None`` sums every slot (O-LoRA's forward: a slot not trained
  yet has ``B = 0`` and adds exactly nothing)."""

  config: GPT2Config
  features: int

  @nn.compact
  def __call__(self, x_BTI, slot_B, deterministic: bool):
    cfg = self.config
    r, dt, pdt = cfg.lora_rank, as_dtype(cfg.dtype), as_dtype(cfg.param_dtype)
    a_init = nn.initializers.variance_scaling(1 / 3, "fan_in", "uniform")  # torch Linear's
    A_SIR = jnp.stack([self.param(f"A_{s}", a_init, (x_BTI.shape[-1], r), pdt)
                       for s in range(cfg.peft_slots)]).astype(dt)
    B_SRO = jnp.stack([self.param(f"B_{s}", nn.initializers.zeros, (r, self.features), pdt)
                       for s in range(cfg.peft_slots)]).astype(dt)
    x_BTI = nn.Dropout(cfg.lora_dropout)(x_BTI, deterministic=deterministic).astype(dt)
    if slot_B is None:
      out = jnp.einsum("btsr,sro->bto", jnp.einsum("bti,sir->btsr", x_BTI, A_SIR), B_SRO)
    else:
      out = jnp.einsum("btr,bro->bto", jnp.einsum("bti,bir->btr", x_BTI, A_SIR[slot_B]),
                       B_SRO[slot_B])
    return out * jnp.asarray(cfg.lora_alpha / r, dt)


class Adapter(nn.Module):
  """A bottleneck residual adapter (Houlsby et al. 2019; AdapterCL's shape, Madotto et
  al. 2021), ``peft_slots`` of them: ``x + up(relu(down(LayerNorm(x))))``, ``up``
  zero-initialized so a new adapter is the identity. ``slot_B`` as in :class:`LoRA`."""

  config: GPT2Config

  @nn.compact
  def __call__(self, x_BTD, slot_B):
    cfg = self.config
    D, M, dt, pdt = x_BTD.shape[-1], cfg.adapter_size, as_dtype(cfg.dtype), as_dtype(
        cfg.param_dtype)
    normal, zeros, ones = (nn.initializers.normal(cfg.initializer_range),
                           nn.initializers.zeros, nn.initializers.ones)

    def stacked(name, init, shape):
      return jnp.stack([self.param(f"{name}_{s}", init, shape, pdt)
                        for s in range(cfg.peft_slots)]).astype(dt)

    scale_SD, bias_SD = stacked("ln_scale", ones, (D,)), stacked("ln_bias", zeros, (D,))
    down_SDM, down_b_SM = stacked("down", normal, (D, M)), stacked("down_bias", zeros, (M,))
    up_SMD, up_b_SD = stacked("up", zeros, (M, D)), stacked("up_bias", zeros, (D,))
    x32 = x_BTD.astype(jnp.float32)
    mean, var = jnp.mean(x32, -1, keepdims=True), jnp.var(x32, -1, keepdims=True)
    normed_BTD = ((x32 - mean) * jax.lax.rsqrt(var + cfg.layer_norm_epsilon)).astype(dt)
    if slot_B is None:
      h = jnp.einsum("btd,sd->btsd", normed_BTD, scale_SD) + bias_SD
      h = jax.nn.relu(jnp.einsum("btsd,sdm->btsm", h, down_SDM) + down_b_SM)
      delta = jnp.einsum("btsm,smd->btd", h, up_SMD) + jnp.sum(up_b_SD, 0)
    else:
      h = normed_BTD * scale_SD[slot_B][:, None] + bias_SD[slot_B][:, None]
      h = jax.nn.relu(jnp.einsum("btd,bdm->btm", h, down_SDM[slot_B])
                      + down_b_SM[slot_B][:, None])
      delta = jnp.einsum("btm,bmd->btd", h, up_SMD[slot_B]) + up_b_SD[slot_B][:, None]
    return x_BTD + delta.astype(x_BTD.dtype)


class Prompts(nn.Module):
  """Soft prompts (Lester et al. 2021), ``peft_slots`` of ``prompt_length`` vectors, in
  front of the input newest slot first, ``[P_{S-1}; ...; P_0; x]`` (Progressive Prompts'
  ``[P_k; ...; P_1; x]``): ``active [B, S]`` (None: all) masks the slots not in use out
  of attention. Prompt vectors have no position embedding, and the input keeps its
  positions ``0..T-1``, so with no prompt in use every logit is the base model's.
  Returns (prefix ``[B, S*L, D]``, its attention mask ``[B, S*L]``)."""

  config: GPT2Config

  @nn.compact
  def __call__(self, batch: int, active_BS=None):
    cfg = self.config
    S, L = cfg.peft_slots, cfg.prompt_length
    init = nn.initializers.normal(cfg.initializer_range)
    prompts = [self.param(f"prompt_{s}", init, (L, cfg.n_embd), as_dtype(cfg.param_dtype))
               for s in range(S)]
    prefix_PD = jnp.concatenate(prompts[::-1]).astype(as_dtype(cfg.dtype))
    if active_BS is None:
      active_BS = jnp.ones((batch, S), bool)
    mask_BP = jnp.repeat(active_BS[:, ::-1].astype(jnp.int32), L, axis=1)
    return jnp.broadcast_to(prefix_PD, (batch,) + prefix_PD.shape), mask_BP


def _projection(cfg: GPT2Config, features: int, name: str, x, slot_B, deterministic: bool):
  """The projection ``name`` of x, plus its LoRA update where ``lora_targets`` names it.
  Called inside a module's compact ``__call__`` (the parameters are that module's)."""
  y = _dense(features, cfg, name)(x)
  if cfg.lora_rank and name in cfg.lora_targets:
    y = y + LoRA(cfg, features, name=f"{name}_lora")(x, slot_B, deterministic).astype(y.dtype)
  return y


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
  slots contiguous, so attention reads them without a transpose) and the slots that
  hold a real token (``valid [B, S]``).

  Slots are in the order tokens were written; a token's position (its ``wpe`` row)
  is passed separately, so rows of different prompt lengths share slot indices:
  ``cljax.generate`` writes the padded prompts at slots ``0..P-1`` and the t-th new
  token of every row at slot ``P + t``, at the row's own position ``L_b + t``."""
  k: tuple
  v: tuple
  valid: jax.Array


def init_cache(config: GPT2Config, batch: int, length: int) -> KVCache:
  """An empty cache of ``length`` slots per row (the prompt plus the new tokens)."""
  shape = (batch, config.n_head, length, config.head_dim)
  zeros = tuple(jnp.zeros(shape, as_dtype(config.dtype)) for _ in range(config.n_layer))
  return KVCache(zeros, zeros, jnp.zeros((batch, length), bool))


def _attend_cached(q_BTNH, k_BTNH, v_BTNH, kv: LayerCache):
  """Writes the new keys and values at slots ``index..index+T-1``, then attends each
  query to the real slots up to its own (softmax in float32)."""
  S, T = kv.valid.shape[1], q_BTNH.shape[1]
  start = (0, 0, kv.index, 0)
  k_BNSH = jax.lax.dynamic_update_slice(
      kv.k, k_BTNH.transpose(0, 2, 1, 3).astype(kv.k.dtype), start)
  v_BNSH = jax.lax.dynamic_update_slice(
      kv.v, v_BTNH.transpose(0, 2, 1, 3).astype(kv.v.dtype), start)
  upto_TS = jnp.arange(S)[None, :] <= kv.index + jnp.arange(T)[:, None]
  keep_B1TS = (upto_TS[None] & kv.valid[:, None])[:, None]
  scale = jnp.asarray(1.0 / q_BTNH.shape[-1] ** 0.5, q_BTNH.dtype)
  logits_BNTS = jnp.einsum("btnh,bnsh->bnts", q_BTNH * scale, k_BNSH.astype(q_BTNH.dtype))
  logits_BNTS = jnp.where(keep_B1TS, logits_BNTS.astype(jnp.float32),
                          jnp.finfo(jnp.float32).min)
  probs_BNTS = jax.nn.softmax(logits_BNTS, axis=-1).astype(q_BTNH.dtype)
  out_BTNH = jnp.einsum("bnts,bnsh->btnh", probs_BNTS, v_BNSH.astype(q_BTNH.dtype))
  return out_BTNH, kv._replace(k=k_BNSH, v=v_BNSH)


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
    qkv = _projection(cfg, 3 * cfg.n_embd, "c_attn", x_BTD, slot_B, deterministic)
    q, k, v = jnp.split(qkv, 3, axis=-1)
    q_BQNH, k_BTNH, v_BTNH = (a.reshape(B, T, cfg.n_head, cfg.head_dim) for a in (q, k, v))
    if kv is not None:
      out_BTNH, kv = _attend_cached(q_BQNH, k_BTNH, v_BTNH, kv)
      out_BTD = _projection(cfg, cfg.n_embd, "c_proj", out_BTNH.reshape(B, T, cfg.n_embd),
                            slot_B, deterministic)
      return nn.Dropout(cfg.resid_pdrop)(out_BTD, deterministic=deterministic), kv
    # Padded keys are masked, as transformers does.
    pad_B11S = None if mask_BT is None else mask_BT[:, None, None, :].astype(bool)
    if query_idx_B is None:
      keep_B1QS = jnp.tril(jnp.ones((T, T), dtype=bool))[None, None]
    else:
      q_BQNH = jnp.take_along_axis(q_BQNH, query_idx_B[:, None, None, None], axis=1)
      keep_B1QS = (jnp.arange(T)[None, :] <= query_idx_B[:, None])[:, None, None, :]
    if pad_B11S is not None:
      keep_B1QS = keep_B1QS & pad_B11S
    Q = q_BQNH.shape[1]
    if not deterministic and cfg.attn_pdrop > 0.0:
      # jax.nn.dot_product_attention has no attention dropout; spell it out.
      scale = jnp.asarray(1.0 / cfg.head_dim ** 0.5, q_BQNH.dtype)
      logits_BNQS = jnp.einsum("bqnh,bsnh->bnqs", q_BQNH * scale, k_BTNH)
      logits_BNQS = jnp.where(keep_B1QS, logits_BNQS.astype(jnp.float32),
                              jnp.finfo(jnp.float32).min)
      probs = jax.nn.softmax(logits_BNQS, axis=-1).astype(q_BQNH.dtype)
      probs = nn.Dropout(cfg.attn_pdrop)(probs, deterministic=False)
      out_BQNH = jnp.einsum("bnqs,bsnh->bqnh", probs, v_BTNH)
    elif query_idx_B is None:
      # The causal flag (rather than an explicit mask) lets GPUs use fused kernels.
      out_BQNH = jax.nn.dot_product_attention(q_BQNH, k_BTNH, v_BTNH, mask=pad_B11S,
                                              is_causal=True)
    else:
      out_BQNH = jax.nn.dot_product_attention(q_BQNH, k_BTNH, v_BTNH, mask=keep_B1QS)
    out_BQD = out_BQNH.reshape(B, Q, cfg.n_embd)
    out_BQD = _projection(cfg, cfg.n_embd, "c_proj", out_BQD, slot_B, deterministic)
    return nn.Dropout(cfg.resid_pdrop)(out_BQD, deterministic=deterministic)


class MLP(nn.Module):
  config: GPT2Config

  @nn.compact
  def __call__(self, x_BTD, deterministic: bool, slot_B=None):
    cfg = self.config
    h = _projection(cfg, cfg.inner_dim, "c_fc", x_BTD, slot_B, deterministic)
    h = jax.nn.gelu(h, approximate=True)  # GPT-2's "gelu_new"
    h = _projection(cfg, cfg.n_embd, "c_proj", h, slot_B, deterministic)
    return nn.Dropout(cfg.resid_pdrop)(h, deterministic=deterministic)


class Block(nn.Module):
  """Pre-LayerNorm transformer block; with ``query_idx_B``, outputs only that
  position of each sequence (``[B, 1, D]``); with ``kv``, returns ``(x, kv)``;
  ``slot_B`` picks each example's LoRA / adapter slot (None: their sum)."""

  config: GPT2Config

  @nn.compact
  def __call__(self, x_BTD, mask_BT, deterministic: bool, query_idx_B=None, kv=None,
               slot_B=None):
    cfg = self.config
    attn = CausalSelfAttention(cfg, name="attn")(
        _layer_norm(cfg, "ln_1")(x_BTD), mask_BT, deterministic, query_idx_B, kv, slot_B)
    if kv is not None:
      attn, kv = attn
    if query_idx_B is not None:
      x_BTD = jnp.take_along_axis(x_BTD, query_idx_B[:, None, None], axis=1)
    x_BTD = x_BTD + attn
    x_BTD = x_BTD + MLP(cfg, name="mlp")(_layer_norm(cfg, "ln_2")(x_BTD), deterministic,
                                         slot_B)
    if cfg.adapter_size:
      x_BTD = Adapter(cfg, name="adapter")(x_BTD, slot_B)
    return x_BTD if kv is None else (x_BTD, kv)


def _embeddings(cfg: GPT2Config, input_ids_BT, positions_BT, deterministic: bool,
                prefix: str = ""):
  """(the ``wte`` module, token + position embeddings after dropout). Called inside
  a model's compact ``__call__``: ``wte`` and ``wpe`` (names after ``prefix``) are
  that model's parameters."""
  init = nn.initializers.normal(cfg.initializer_range)
  embed = functools.partial(nn.Embed, features=cfg.n_embd, embedding_init=init,
                            dtype=as_dtype(cfg.dtype), param_dtype=as_dtype(cfg.param_dtype))
  wte = embed(cfg.vocab_size, name=f"{prefix}wte")
  x_BTD = wte(input_ids_BT) + embed(cfg.n_positions, name=f"{prefix}wpe")(positions_BT)
  return wte, nn.Dropout(cfg.embd_pdrop)(x_BTD, deterministic=deterministic)


def pool_index(input_ids_BT: jax.Array, pad_token_id: int | None) -> jax.Array:
  """Index of the rightmost token that is not the pad id (0 if all are pad).

  Exactly transformers' rule, which reads ``input_ids`` and not the attention mask.
  """
  T = input_ids_BT.shape[-1]
  if pad_token_id is None:
    return jnp.full(input_ids_BT.shape[:-1], T - 1, dtype=jnp.int32)
  not_pad = (input_ids_BT != pad_token_id).astype(jnp.int32)
  return jnp.argmax(jnp.arange(T, dtype=jnp.int32) * not_pad, axis=-1)


def _pooled_hidden(cfg: GPT2Config, input_ids, attention_mask, deterministic: bool,
                   peft_slot=None, prompt_active=None):
  """(the ``wte`` module, the final hidden state at the pooled token ``[B, D]``).
  Called inside a model's compact ``__call__`` (its parameters are that model's)."""
  B, T = input_ids.shape
  if T > cfg.n_positions:
    raise ValueError(f"Sequence length {T} exceeds n_positions={cfg.n_positions}.")
  wte, x_BTD = _embeddings(cfg, input_ids, jnp.arange(T)[None], deterministic)
  block_cls = nn.remat(Block, static_argnums=(3,)) if cfg.remat else Block
  # Only the pooled token reaches the head: the last block computes its query,
  # attention output and MLP at that position alone (exactly, with less work).
  idx_B = pool_index(input_ids, cfg.pad_token_id)
  if cfg.prompt_length:
    prefix_BPD, prefix_mask_BP = Prompts(cfg, name="prompts")(B, prompt_active)
    x_BTD = jnp.concatenate([prefix_BPD.astype(x_BTD.dtype), x_BTD], axis=1)
    real_BT = (jnp.ones((B, T), jnp.int32) if attention_mask is None
               else attention_mask.astype(jnp.int32))
    attention_mask = jnp.concatenate([prefix_mask_BP, real_BT], axis=1)
    idx_B = idx_B + prefix_BPD.shape[1]
  if cfg.pnn_columns > 1:
    return wte, _columns_hidden(cfg, input_ids, x_BTD, attention_mask, deterministic, idx_B,
                                peft_slot)
  for i in range(cfg.n_layer):
    last = i == cfg.n_layer - 1
    x_BTD = block_cls(cfg, name=f"h_{i}")(x_BTD, attention_mask, deterministic,
                                          idx_B if last else None, None, peft_slot)
  return wte, _layer_norm(cfg, "ln_f")(x_BTD[:, 0])


class Lateral(nn.Module):
  """PNN's lateral connection into one layer of column c: ``sum_{j<c} (alpha_j x_j) U_j``
  over the earlier columns' outputs of the layer below, ``U_j`` zero-initialized (a new
  column starts as a plain GPT-2) and ``alpha_j`` a learned scale (init 1)."""

  config: GPT2Config

  @nn.compact
  def __call__(self, earlier):
    cfg = self.config
    pdt, dt = as_dtype(cfg.param_dtype), as_dtype(cfg.dtype)
    out = 0.0
    for j, x in enumerate(earlier):
      u = self.param(f"U_{j}", nn.initializers.zeros, (cfg.n_embd, cfg.n_embd), pdt)
      alpha = self.param(f"alpha_{j}", nn.initializers.ones, (), pdt)
      out = out + (alpha.astype(dt) * x.astype(dt)) @ u.astype(dt)
    return out


def column_prefix(c: int) -> str:
  """The parameter-name prefix of PNN column c (column 0 has GPT-2's own names)."""
  return "" if c == 0 else f"col{c}_"


def _columns_hidden(cfg: GPT2Config, input_ids, x0_BTD, mask_BT, deterministic: bool, idx_B,
                    slot_B):
  """Progressive Neural Networks (Rusu et al. 2016): ``pnn_columns`` GPT-2 trunks; the
  input of layer i of column c gets :class:`Lateral` connections from the earlier
  columns' outputs of layer i - 1 (and the final LayerNorm's input from their last
  blocks). Returns each example's column's pooled hidden state (``slot_B``; None: the
  last column)."""
  B, T = input_ids.shape
  S, L = cfg.pnn_columns, cfg.n_layer
  block_cls = nn.remat(Block, static_argnums=(3,)) if cfg.remat else Block
  xs = [x0_BTD] + [_embeddings(cfg, input_ids, jnp.arange(T)[None], deterministic,
                               column_prefix(c))[1] for c in range(1, S)]
  for i in range(L + 1):
    inputs = [x if c == 0 or i == 0 else
              x + Lateral(cfg, name=f"{column_prefix(c)}lateral_{i}")(xs[:c]).astype(x.dtype)
              for c, x in enumerate(xs)]
    if i == L:
      xs = inputs
      break
    xs = [block_cls(cfg, name=f"{column_prefix(c)}h_{i}")(
        x, mask_BT, deterministic, idx_B if i == L - 1 else None) for c, x in enumerate(inputs)]
  pooled_SBD = jnp.stack([_layer_norm(cfg, f"{column_prefix(c)}ln_f")(x[:, 0])
                          for c, x in enumerate(xs)])
  if slot_B is None:
    return pooled_SBD[-1]
  return pooled_SBD[slot_B, jnp.arange(B)]


class GPT2Classifier(nn.Module):
  """GPT-2 trunk with a bias-free linear ``score`` head at the pooled token.

  Call: ``model.apply({"params": params}, input_ids, attention_mask=None,
  deterministic=True)`` -> float32 logits ``[batch, num_labels]``. Dropout needs
  ``deterministic=False`` and ``rngs={"dropout": key}``. With LoRA or adapters in the
  config, ``peft_slot [B]`` (int) picks each example's slot (None: their sum); with
  soft prompts, ``prompt_active [B, S]`` (bool) the prompts in front of each example.
  """

  config: GPT2Config

  @nn.compact
  def __call__(self, input_ids, attention_mask=None, deterministic: bool = True,
               peft_slot=None, prompt_active=None):
    _, x_BD = _pooled_hidden(self.config, input_ids, attention_mask, deterministic,
                             peft_slot, prompt_active)
    logits_BC = _dense(self.config.num_labels, self.config, "score", use_bias=False)(x_BD)
    return logits_BC.astype(jnp.float32)


class GPT2LabelWords(nn.Module):
  """Classification as text: the LM's next-token logits after the prompt (at its last
  real token, the answer marker), read at each class's label-word token.

  ``label_tokens[c]`` is the first token of class c's label word; the logits
  ``[batch, classes]`` are the tied LM head's (``wte``) at those tokens, so
  ``argmax`` is the most likely label word and a softmax cross-entropy over them is
  the verbalizer loss of PET and LM-BFF. No ``score`` head: the params are the LM's.
  """

  config: GPT2Config
  label_tokens: tuple[int, ...]

  @nn.compact
  def __call__(self, input_ids, attention_mask=None, deterministic: bool = True,
               peft_slot=None, prompt_active=None):
    wte, x_BD = _pooled_hidden(self.config, input_ids, attention_mask, deterministic,
                               peft_slot, prompt_active)
    words_CD = jnp.take(wte.embedding, jnp.asarray(self.label_tokens), axis=0)
    x_BD, words_CD = x_BD.astype(wte.dtype), words_CD.astype(wte.dtype)
    return jnp.einsum("bd,cd->bc", x_BD, words_CD).astype(jnp.float32)


class GPT2LM(nn.Module):
  """GPT-2 with its language-model head: the output projection is ``wte`` itself
  (tied, no new parameters), as transformers' ``GPT2LMHeadModel``. A classifier's
  params work too (its ``score`` head is simply not read).

  Call: ``model.apply({"params": params}, input_ids, attention_mask=None,
  deterministic=True)`` -> float32 logits ``[batch, seq, vocab]``.

  For generation (see ``cljax.generate``): ``positions [B, T]`` (default
  ``0..T-1``), ``cache`` (a :class:`KVCache`, written at slots
  ``cache_index..cache_index+T-1``; the call then returns ``(logits, cache)``) and
  ``logits_index [B]`` (logits at that token only: ``[B, vocab]``; ``[B, K]``: at K
  tokens, ``[B, K, vocab]``); ``peft_slot`` as in :class:`GPT2Classifier`.
  """

  config: GPT2Config

  @nn.compact
  def __call__(self, input_ids, attention_mask=None, deterministic: bool = True, *,
               positions=None, cache: KVCache | None = None, cache_index=0,
               logits_index=None, peft_slot=None):
    cfg = self.config
    B, T = input_ids.shape
    if cache is None and T > cfg.n_positions:
      raise ValueError(f"Sequence length {T} exceeds n_positions={cfg.n_positions}.")
    if positions is None:
      positions = jnp.broadcast_to(jnp.arange(T), (B, T))
    wte, x_BTD = _embeddings(cfg, input_ids, positions, deterministic)
    if cache is not None:
      real_BT = (jnp.ones((B, T), bool) if attention_mask is None
                 else attention_mask.astype(bool))
      cache = cache._replace(valid=jax.lax.dynamic_update_slice(cache.valid, real_BT,
                                                                (0, cache_index)))
    block_cls = nn.remat(Block, static_argnums=(3,)) if cfg.remat and cache is None else Block
    new_k, new_v = [], []
    for i in range(cfg.n_layer):
      block = block_cls(cfg, name=f"h_{i}")
      if cache is None:
        x_BTD = block(x_BTD, attention_mask, deterministic, None, None, peft_slot)
        continue
      x_BTD, kv = block(x_BTD, None, deterministic, None,
                        LayerCache(cache.k[i], cache.v[i], cache_index, cache.valid),
                        peft_slot)
      new_k.append(kv.k)
      new_v.append(kv.v)
    if logits_index is not None and logits_index.ndim == 1:
      x_BTD = jnp.take_along_axis(x_BTD, logits_index[:, None, None], axis=1)[:, 0]
    elif logits_index is not None:   # [B, K] -> [B, K, D]
      x_BTD = jnp.take_along_axis(x_BTD, logits_index[:, :, None], axis=1)
    logits = wte.attend(_layer_norm(cfg, "ln_f")(x_BTD)).astype(jnp.float32)
    return logits if cache is None else (logits, cache._replace(k=tuple(new_k),
                                                                v=tuple(new_v)))


def add_token_embeddings(params, config: GPT2Config, ids, num_known: int):
  """(params, config) with ``wte`` rows for new tokens ``ids``: the table grows to
  hold them (``vocab_size`` too) and each of their rows is set to the mean embedding
  of the ``num_known`` tokens before them. No other parameter changes, so no logit
  over the other tokens changes (the tied LM head only gains columns)."""
  ids = [int(i) for i in ids]
  wte = params["wte"]["embedding"]
  old, dim = wte.shape
  size = max(old, max(ids) + 1)
  mean_D = jnp.mean(wte[:num_known].astype(jnp.float32), axis=0).astype(wte.dtype)
  if size > old:
    wte = jnp.concatenate([wte, jnp.zeros((size - old, dim), wte.dtype)])
  wte = wte.at[jnp.asarray(ids)].set(mean_D)
  params = {**params, "wte": {**params["wte"], "embedding": wte}}
  return params, config.replace(vocab_size=size)


def is_peft(path) -> bool:
  """Whether a params path (names or jax key entries) is inside a LoRA, an adapter or
  the soft prompts."""
  names = [str(getattr(k, "key", k)) for k in path]
  return any(n.endswith("_lora") or n in ("adapter", "prompts") for n in names)


def peft_slot_of(path) -> int | None:
  """The slot a PEFT leaf belongs to (its name ends ``_<slot>``), None for the base."""
  if not is_peft(path):
    return None
  return int(str(getattr(path[-1], "key", path[-1])).rsplit("_", 1)[1])


def add_peft_params(model, params, rng: jax.Array):
  """``params`` with the LoRA / adapter / prompt / column parameters ``model``'s config
  asks for, freshly initialized (B, the adapters' up projections and the laterals are
  zero: the logits do not change; a new PNN column is a copy of the first); every
  parameter ``params`` already has is kept as it is."""
  fresh = jax.jit(functools.partial(init_params, model))(rng)

  def overlay(new, old):
    if not isinstance(new, Mapping):
      return old if old is not None else new
    old = old or {}
    return {k: overlay(v, old.get(k)) for k, v in new.items()}

  given, params = params, overlay(fresh, params)
  cfg = model.config
  if cfg.pnn_columns > 1:   # a new column starts as a copy of the first (e.g. pretrained)
    base = ["wte", "wpe", "ln_f"] + [f"h_{i}" for i in range(cfg.n_layer)]
    params = {**params, **{column_prefix(c) + n: jax.tree.map(jnp.copy, params[n])
                           for c in range(1, cfg.pnn_columns) for n in base
                           if column_prefix(c) + n not in given}}
  return params


def merge_lora(params, config: GPT2Config, slot: int | None = None):
  """(params, config) of the plain model equal to the LoRA one: each target's kernel
  gains ``alpha / r * A_s B_s`` for slot ``slot`` (None: every slot, summed as the
  forward without ``peft_slot``) and the LoRA parameters are dropped. Adapters cannot
  be merged (they are not linear): a config with them is refused."""
  if config.adapter_size or config.prompt_length:
    raise ValueError("Adapters and soft prompts are not linear updates of the base weights "
                     "and cannot be merged into them; only LoRA can.")
  if not config.lora_rank:
    return params, config
  slots = range(config.peft_slots) if slot is None else [slot]
  scale = config.lora_alpha / config.lora_rank

  def merge(tree):
    out = {}
    for name, sub in tree.items():
      if name.endswith("_lora"):
        continue
      if isinstance(sub, Mapping) and f"{name}_lora" in tree:
        lora = tree[f"{name}_lora"]
        delta = sum(lora[f"A_{s}"].astype(jnp.float32) @ lora[f"B_{s}"].astype(jnp.float32)
                    for s in slots)
        sub = {**sub, "kernel": (sub["kernel"] + scale * delta).astype(sub["kernel"].dtype)}
      out[name] = merge(sub) if isinstance(sub, Mapping) else sub
    return out

  return merge(params), config.replace(lora_rank=0, peft_slots=1)


def init_params(model: GPT2Classifier, rng: jax.Array, seq_len: int = 8):
  """Randomly initialized params of ``model`` (float32 unless ``param_dtype`` says)."""
  ids = jnp.zeros((1, seq_len), jnp.int32)
  return model.init(rng, ids)["params"]


def random_params(model, rng: jax.Array):
  """:func:`init_params` under ``jax.jit``, on the default device. On an accelerator
  with one process it is computed by the host's CPU, whose compiler builds the
  initializers in a fraction of a GPU compilation (18.8 s for GPT-2 small on an H100,
  3.3 s on its CPU), then moved to the default device."""
  init = jax.jit(functools.partial(init_params, model))
  if jax.default_backend() == "cpu" or jax.process_count() > 1:
    return init(rng)
  with jax.default_device(jax.local_devices(backend="cpu")[0]):
    params = init(rng)
  return jax.device_put(params, jax.devices()[0])


def param_shapes(model: GPT2Classifier):
  """The params' ShapeDtypeStructs, computed without allocating (jax.eval_shape)."""
  ids = jax.ShapeDtypeStruct((1, 8), jnp.int32)
  return jax.eval_shape(lambda r, i: model.init(r, i)["params"], jax.random.key(0), ids)
