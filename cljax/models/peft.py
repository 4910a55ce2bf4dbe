"""Parameter-efficient modules in ``peft_slots`` slots (one per task for the per-task
methods): LoRA on named projections, bottleneck adapters after each block, soft
prompts in front of the input. Each adds parameters and leaves the base ones as they
are; a new slot changes no logit."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from cljax.models.config import GPT2Config, as_dtype
from cljax.models.dropout import dropout

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
    x_BTI = dropout(cfg, cfg.lora_dropout, x_BTI, deterministic).astype(dt)
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

