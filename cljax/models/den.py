"""Dynamically Expandable Networks' units (Yoon et al. 2018) in GPT-2's MLP.

A unit is one hidden neuron of a block's MLP: its ``c_fc`` column (incoming weights)
and bias, and its ``c_proj`` row (outgoing weights into the residual stream).
``den_capacity`` units per block are allocated ahead beside the ``inner_dim`` of the
loaded MLP, as ``den_fc`` (kernel ``[D, capacity]``, bias) and ``den_proj`` (kernel
``[capacity, D]``, no bias: ``c_proj``'s bias is the block's), so compiled shapes never
change while the method grows the network: a unit is in use or not by a mask,
``units_BW [B, W]`` (``W = inner_dim + capacity``), per example. Without a mask the
loaded units are in use and the capacity is not; with ``den_capacity = 0`` (every
method but ``den``) the MLP is GPT-2's, untouched.

``unit_arrays`` / ``with_units`` view a params (or gradient) tree's units as stacked
arrays, ``fc_k [L, D, W]``, ``fc_b [L, W]``, ``proj_k [L, W, D]``, and write them back;
the functions after them act on such arrays (the timestamps' masks, new units, the
group-lasso step, duplication), for ``cljax/methods/den.py``. DEN's token rows
(``den_rows`` copies beside ``wte``, :func:`den_tokens`) are split the same way
(:func:`split_rows`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

UNIT_KEYS = ("fc_k", "fc_b", "proj_k")
NEVER = 2 ** 30   # a task index never reached: a free unit's birth, a unit not retired


def den_mlp(module, x_BTD, h_BTI, units_BW, dense):
  """The MLP's output ``[B, T, D]`` with the capacity units beside the loaded ones,
  the units not in use (``units_BW`` 0) contributing nothing. Called inside the MLP's
  compact ``__call__`` (``module``; the parameters are its own) with ``h_BTI`` the
  loaded ``c_fc``'s pre-activation and ``dense`` GPT-2's linear layer. The masked
  activations are sown as ``intermediates/units`` (read by :func:`pooled_units`)."""
  cfg = module.config
  inner = h_BTI.shape[-1]
  new_BTK = dense(cfg.den_capacity, cfg, "den_fc")(x_BTD)
  h_BTW = jax.nn.gelu(jnp.concatenate([h_BTI, new_BTK.astype(h_BTI.dtype)], -1),
                      approximate=True)
  if units_BW is None:
    units_BW = (jnp.arange(h_BTW.shape[-1]) < inner)[None]
  h_BTW = h_BTW * units_BW[:, None, :].astype(h_BTW.dtype)
  module.sow("intermediates", "units", h_BTW)
  out = dense(cfg.n_embd, cfg, "c_proj")(h_BTW[..., :inner])
  return out + dense(cfg.n_embd, cfg, "den_proj", use_bias=False)(h_BTW[..., inner:])


def den_tokens(wte, den_wte, rows_BT, vocab_size: int):
  """The token embeddings ``[B, T, D]`` of the rows ``rows_BT``: below ``vocab_size``
  a row of the loaded ``wte``, from it on a row of ``den_wte`` (DEN's copies of the
  rows it split; both are ``nn.Embed`` modules)."""
  loaded = wte(jnp.clip(rows_BT, 0, vocab_size - 1))
  copies = den_wte(jnp.clip(rows_BT - vocab_size, 0, den_wte.num_embeddings - 1))
  return jnp.where((rows_BT < vocab_size)[..., None], loaded, copies.astype(loaded.dtype))


def pooled_units(intermediates, idx_B, n_layer: int) -> jax.Array:
  """``[B, L, W]``: every block's unit activations at the pooled token, from the sown
  ``intermediates`` of a classifier's forward (the last block computes that token only)."""
  out = []
  for i in range(n_layer):
    h_BTW = intermediates[f"h_{i}"]["mlp"]["units"][0]
    if h_BTW.shape[1] == 1:
      out.append(h_BTW[:, 0])
    else:
      out.append(jnp.take_along_axis(h_BTW, idx_B[:, None, None], axis=1)[:, 0])
  return jnp.stack(out, axis=1)


def unit_arrays(params, n_layer: int) -> dict:
  """Every block's units of ``params`` (or of gradients shaped like them), stacked:
  ``fc_k [L, D, W]``, ``fc_b [L, W]``, ``proj_k [L, W, D]``; loaded units first."""
  def one(i):
    mlp = params[f"h_{i}"]["mlp"]
    return (jnp.concatenate([mlp["c_fc"]["kernel"], mlp["den_fc"]["kernel"]], 1),
            jnp.concatenate([mlp["c_fc"]["bias"], mlp["den_fc"]["bias"]], 0),
            jnp.concatenate([mlp["c_proj"]["kernel"], mlp["den_proj"]["kernel"]], 0))
  blocks = [one(i) for i in range(n_layer)]
  return {k: jnp.stack([b[j] for b in blocks]) for j, k in enumerate(UNIT_KEYS)}


def with_units(params, units: dict, n_layer: int):
  """``params`` with its units replaced by ``units`` (as :func:`unit_arrays` gives);
  every other leaf is kept as it is."""
  out = dict(params)
  for i in range(n_layer):
    block = dict(params[f"h_{i}"])
    mlp = dict(block["mlp"])
    inner = mlp["c_fc"]["kernel"].shape[1]
    fc_k, fc_b, proj_k = (units[k][i] for k in UNIT_KEYS)
    mlp["c_fc"] = {**mlp["c_fc"], "kernel": fc_k[:, :inner].astype(mlp["c_fc"]["kernel"].dtype),
                   "bias": fc_b[:inner].astype(mlp["c_fc"]["bias"].dtype)}
    mlp["den_fc"] = {**mlp["den_fc"], "kernel": fc_k[:, inner:].astype(
        mlp["den_fc"]["kernel"].dtype), "bias": fc_b[inner:].astype(mlp["den_fc"]["bias"].dtype)}
    mlp["c_proj"] = {**mlp["c_proj"], "kernel": proj_k[:inner].astype(
        mlp["c_proj"]["kernel"].dtype)}
    mlp["den_proj"] = {**mlp["den_proj"], "kernel": proj_k[inner:].astype(
        mlp["den_proj"]["kernel"].dtype)}
    block["mlp"] = mlp
    out[f"h_{i}"] = block
  return out


# ----------------------------------------------------------------------------
# Units as arrays: masks, growth, duplication
# ----------------------------------------------------------------------------

def alive(birth, retired, k):
  """The units task(s) ``k`` uses: born at or before k, not yet retired."""
  return (birth <= k) & (k < retired)


def unit_sq(units) -> jax.Array:
  """``[L, W]``: each unit's sum of squares over its weights and bias."""
  return (jnp.sum(jnp.square(units["fc_k"]), 1) + jnp.square(units["fc_b"])
          + jnp.sum(jnp.square(units["proj_k"]), 2))


def keep_units(units, keep_LW, other=None):
  """``units`` where ``keep_LW``, elsewhere ``other`` (None: zero)."""
  other = other or jax.tree.map(jnp.zeros_like, units)
  return {"fc_k": jnp.where(keep_LW[:, None, :], units["fc_k"], other["fc_k"]),
          "fc_b": jnp.where(keep_LW, units["fc_b"], other["fc_b"]),
          "proj_k": jnp.where(keep_LW[:, :, None], units["proj_k"], other["proj_k"])}


def first_free(birth: np.ndarray, k: int) -> np.ndarray:
  """``[L, W]`` bool: the first ``k`` free units of each block (fewer if fewer are)."""
  free = birth == NEVER
  return free & (np.cumsum(free, axis=1) <= k)


def new_units(units, new_LW, rng, std: float):
  """``units`` with those of ``new_LW`` drawn afresh: weights N(0, std), bias 0."""
  k1, k2 = jax.random.split(rng)
  fresh = {"fc_k": std * jax.random.normal(k1, units["fc_k"].shape),
           "fc_b": jnp.zeros_like(units["fc_b"]),
           "proj_k": std * jax.random.normal(k2, units["proj_k"].shape)}
  return keep_units(fresh, jnp.asarray(new_LW), units)


def split_units(units, before, drift_LW, candidates_LW, birth, retired, t: int):
  """Step 3's duplication: every candidate whose drift is over the threshold (the caller
  passes them in ``candidates_LW``) is copied, most drifted first while free units last;
  the copy keeps the drifted values and is born at t, the original gets ``before``'s
  values and is retired at t. Returns (units, birth, retired, split [L], skipped [L])."""
  units = jax.tree.map(np.array, units)
  birth, retired = birth.copy(), retired.copy()
  split, skipped = [], []
  for i in range(birth.shape[0]):
    order = [j for j in np.argsort(-drift_LW[i], kind="stable") if candidates_LW[i, j]]
    free = np.flatnonzero(birth[i] == NEVER)
    pairs = list(zip(order, free))
    for j, s in pairs:
      units["fc_k"][i, :, s], units["fc_b"][i, s] = units["fc_k"][i, :, j], units["fc_b"][i, j]
      units["proj_k"][i, s] = units["proj_k"][i, j]
      units["fc_k"][i, :, j], units["fc_b"][i, j] = before["fc_k"][i, :, j], before["fc_b"][i, j]
      units["proj_k"][i, j] = before["proj_k"][i, j]
      birth[i, s], retired[i, j] = t, t
    split.append(len(pairs))
    skipped.append(len(order) - len(pairs))
  return jax.tree.map(jnp.asarray, units), birth, retired, split, skipped


def split_rows(table, before, drift_R, candidates_R, birth, retired, token, rows_SV, t: int):
  """The split of the embedding rows: every candidate row (drifted over the threshold)
  is copied into a free row, most drifted first while free rows last; the copy keeps
  the drifted values, is born at t and stands for the same token in ``rows_SV`` (each
  task's row of each token) from task t on; the original gets ``before``'s values and
  is retired at t. Returns (table, birth, retired, token, rows_SV, split, skipped)."""
  table, birth, retired = np.array(table), birth.copy(), retired.copy()
  token, rows_SV = token.copy(), rows_SV.copy()
  order = np.flatnonzero(candidates_R)
  order = order[np.argsort(-drift_R[order], kind="stable")]
  free = np.flatnonzero(birth == NEVER)
  n = min(len(order), len(free))
  old, new = order[:n], free[:n]
  table[new], table[old] = table[old], before[old]
  birth[new], retired[old], token[new] = t, t, token[old]
  rows_SV[t:, token[old]] = new
  return table, birth, retired, token, rows_SV, n, len(order) - n


def soft_threshold(x, threshold):
  """The L1 proximal step: ``x`` shrunk toward 0 by ``threshold``, 0 under it."""
  return jnp.sign(x) * jnp.maximum(jnp.abs(x) - threshold, 0.0).astype(x.dtype)


def group_lasso(theta, new_LW, threshold: float):
  """The reference's group-lasso step on each new unit's weights: shrunk by
  ``threshold`` in L2 norm, zero when the norm is under it."""
  norm = jnp.sqrt(unit_sq(theta["units"]))
  scale = jnp.where(norm < threshold, 0.0, 1.0 - threshold / jnp.where(norm > 0, norm, 1.0))
  scale = jnp.where(new_LW, scale, 1.0)
  u = theta["units"]
  return {**theta, "units": {"fc_k": u["fc_k"] * scale[:, None, :], "fc_b": u["fc_b"] * scale,
                             "proj_k": u["proj_k"] * scale[:, :, None]}}
