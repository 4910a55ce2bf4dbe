"""Progressive Neural Networks' columns (Rusu et al. 2016): one trunk (of the model's
family) per task,
each layer of a later column fed laterally by the earlier columns' layer below."""

from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp

from cljax.models.config import GPT2Config, as_dtype

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
  """The parameter-name prefix of PNN column c (column 0 has the family's own names)."""
  return "" if c == 0 else f"col{c}_"


def columns_hidden(cfg: GPT2Config, trunk, input_ids, x0_BTD, mask_BT, deterministic: bool,
                   idx_B, slot_B, positions_BT):
  """Progressive Neural Networks (Rusu et al. 2016): ``pnn_columns`` trunks (``trunk``,
  a :class:`cljax.models.layers.Trunk`); the
  input of layer i of column c gets :class:`Lateral` connections from the earlier
  columns' outputs of layer i - 1 (and the final LayerNorm's input from their last
  blocks). Returns each example's column's pooled hidden state (``slot_B``; None: the
  last column)."""
  B, T = input_ids.shape
  S, L = cfg.pnn_columns, cfg.n_layer
  block_cls = nn.remat(trunk.block, static_argnums=(3,)) if cfg.remat else trunk.block
  xs = [x0_BTD] + [trunk.embed(cfg, input_ids, jnp.arange(T)[None], deterministic,
                               column_prefix(c))[1] for c in range(1, S)]
  for i in range(L + 1):
    inputs = [x if c == 0 or i == 0 else
              x + Lateral(cfg, name=f"{column_prefix(c)}lateral_{i}")(xs[:c]).astype(x.dtype)
              for c, x in enumerate(xs)]
    if i == L:
      xs = inputs
      break
    xs = [block_cls(cfg, name=f"{column_prefix(c)}{cfg.LAYOUT.block}{i}")(
        x, mask_BT, deterministic, idx_B if i == L - 1 else None, None, None, None,
        positions_BT) for c, x in enumerate(inputs)]
  pooled_SBD = jnp.stack([trunk.final_norm(cfg, f"{column_prefix(c)}{cfg.LAYOUT.final_norm}")(
      x[:, 0]) for c, x in enumerate(xs)])
  if slot_B is None:
    return pooled_SBD[-1]
  return pooled_SBD[slot_B, jnp.arange(B)]

