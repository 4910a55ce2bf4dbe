"""Dynamically Expandable Networks' units (Yoon et al. 2018) in a transformer's MLP.

A unit is one hidden neuron of a block's MLP: its column of each incoming projection
(with its bias where there is one) and its row of the outgoing projection (into the
residual stream), as the family's ``Layout.den_units`` names them: GPT-2's ``c_fc``
column and bias and ``c_proj`` row; a gated MLP's (Llama, SwiGLU) ``gate_proj`` and
``up_proj`` columns and ``down_proj`` row; GPT-NeoX's ``dense_h_to_4h`` column and
bias and ``dense_4h_to_h`` row. ``den_capacity`` units per block are allocated ahead
beside the ``inner_dim`` of the loaded MLP, as a DEN projection beside each (GPT-2:
``den_fc``, kernel ``[D, capacity]`` and bias, and ``den_proj``, kernel ``[capacity,
D]`` without bias: the outgoing bias is the block's), so compiled shapes never change
while the method grows the network: a unit is in use or not by a mask, ``units_BW [B,
W]`` (``W = inner_dim + capacity``), per example. Without a mask the loaded units are
in use and the capacity is not; with ``den_capacity = 0`` (every method but ``den``)
the MLP is the family's, untouched.

``unit_arrays`` / ``with_units`` view a params (or gradient) tree's units as stacked
arrays (GPT-2: ``fc_k [L, D, W]``, ``fc_b [L, W]``, ``proj_k [L, W, D]``; a gated MLP:
``gate_k``, ``up_k``, ``proj_k``) and write them back; the functions after them act on
such arrays (the timestamps' masks, new units, the group-lasso step, duplication), for
``cljax/methods/den.py``. DEN's token rows (``den_rows`` copies beside the token
embedding, :func:`den_tokens`) are split the same way (:func:`split_rows`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

NEVER = 2 ** 30   # a task index never reached: a free unit's birth, a unit not retired


def den_mlp(module, x_BTD, loaded, units_BW, dense, act, use_bias: bool = True):
  """The MLP's output ``[B, T, D]`` with the capacity units beside the loaded ones,
  the units not in use (``units_BW`` 0) contributing nothing. Called inside the MLP's
  compact ``__call__`` (``module``; the parameters are its own) with ``loaded`` the
  pre-activations ``[B, T, I]`` of the family's incoming projections (in the order of
  ``Layout.den_units``), ``act(*pre)`` the hidden units of them (GPT-2: gelu of c_fc;
  SwiGLU: silu(gate) * up), ``dense`` the linear layer and ``use_bias`` whether the
  MLP's projections have biases. The masked activations are sown as
  ``intermediates/units`` (read by :func:`pooled_units`)."""
  cfg = module.config
  parts = cfg.LAYOUT.den_units
  inner = loaded[0].shape[-1]
  pre = [jnp.concatenate([h_BTI, dense(cfg.den_capacity, cfg, capacity, use_bias)(
      x_BTD).astype(h_BTI.dtype)], -1) for h_BTI, (_, _, capacity) in zip(loaded, parts)]
  h_BTW = act(*pre)
  if units_BW is None:
    units_BW = (jnp.arange(h_BTW.shape[-1]) < inner)[None]
  h_BTW = h_BTW * units_BW[:, None, :].astype(h_BTW.dtype)
  module.sow("intermediates", "units", h_BTW)
  _, name, capacity = parts[-1]
  out = dense(cfg.n_embd, cfg, name, use_bias)(h_BTW[..., :inner])
  return out + dense(cfg.n_embd, cfg, capacity, use_bias=False)(h_BTW[..., inner:])


def den_tokens(wte, den_wte, rows_BT, vocab_size: int):
  """The token embeddings ``[B, T, D]`` of the rows ``rows_BT``: below ``vocab_size``
  a row of the loaded ``wte``, from it on a row of ``den_wte`` (DEN's copies of the
  rows it split; both are ``nn.Embed`` modules)."""
  loaded = wte(jnp.clip(rows_BT, 0, vocab_size - 1))
  copies = den_wte(jnp.clip(rows_BT - vocab_size, 0, den_wte.num_embeddings - 1))
  return jnp.where((rows_BT < vocab_size)[..., None], loaded, copies.astype(loaded.dtype))


def pooled_units(intermediates, idx_B, layout, n_layer: int) -> jax.Array:
  """``[B, L, W]``: every block's unit activations at the pooled token, from the sown
  ``intermediates`` of a classifier's forward (the last block computes that token only)."""
  out = []
  for i in range(n_layer):
    h_BTW = intermediates[f"{layout.block}{i}"][layout.mlp]["units"][0]
    if h_BTW.shape[1] == 1:
      out.append(h_BTW[:, 0])
    else:
      out.append(jnp.take_along_axis(h_BTW, idx_B[:, None, None], axis=1)[:, 0])
  return jnp.stack(out, axis=1)


def unit_arrays(params, n_layer: int, layout) -> dict:
  """Every block's units of ``params`` (or of gradients shaped like them), stacked,
  loaded units first: each incoming projection's columns ``{key}_k [L, D, W]`` and
  bias ``{key}_b [L, W]`` (where it has one), the outgoing one's rows ``proj_k [L, W,
  D]`` (``Layout.den_units``; GPT-2: ``fc_k``, ``fc_b``, ``proj_k``)."""
  *incoming, (_, out_name, out_capacity) = layout.den_units

  def one(i):
    mlp = params[f"{layout.block}{i}"][layout.mlp]
    arrays = {}
    for key, name, capacity in incoming:
      arrays[f"{key}_k"] = jnp.concatenate([mlp[name]["kernel"], mlp[capacity]["kernel"]], 1)
      if "bias" in mlp[name]:
        arrays[f"{key}_b"] = jnp.concatenate([mlp[name]["bias"], mlp[capacity]["bias"]], 0)
    arrays["proj_k"] = jnp.concatenate([mlp[out_name]["kernel"],
                                        mlp[out_capacity]["kernel"]], 0)
    return arrays
  blocks = [one(i) for i in range(n_layer)]
  return {k: jnp.stack([b[k] for b in blocks]) for k in blocks[0]}


def with_units(params, units: dict, n_layer: int, layout):
  """``params`` with its units replaced by ``units`` (as :func:`unit_arrays` gives);
  every other leaf is kept as it is."""
  *incoming, (_, out_name, out_capacity) = layout.den_units
  cast = lambda x, like: x.astype(like.dtype)   # noqa: E731
  out = dict(params)
  for i in range(n_layer):
    block = dict(params[f"{layout.block}{i}"])
    mlp = dict(block[layout.mlp])
    inner = mlp[incoming[0][1]]["kernel"].shape[1]
    for key, name, capacity in incoming:
      for module, part in ((name, slice(None, inner)), (capacity, slice(inner, None))):
        new = {"kernel": cast(units[f"{key}_k"][i][:, part], mlp[module]["kernel"])}
        if f"{key}_b" in units:
          new["bias"] = cast(units[f"{key}_b"][i][part], mlp[module]["bias"])
        mlp[module] = {**mlp[module], **new}
    proj_k = units["proj_k"][i]
    mlp[out_name] = {**mlp[out_name], "kernel": cast(proj_k[:inner], mlp[out_name]["kernel"])}
    mlp[out_capacity] = {**mlp[out_capacity], "kernel": cast(proj_k[inner:],
                                                             mlp[out_capacity]["kernel"])}
    block[layout.mlp] = mlp
    out[f"{layout.block}{i}"] = block
  return out


# ----------------------------------------------------------------------------
# Units as arrays: masks, growth, duplication
# ----------------------------------------------------------------------------

def alive(birth, retired, k):
  """The units task(s) ``k`` uses: born at or before k, not yet retired."""
  return (birth <= k) & (k < retired)


def _ordered(units) -> list[str]:
  """The unit arrays' keys in one order whatever the dict's: each incoming projection's
  columns then its bias (by key), then the outgoing rows."""
  stems = sorted({k[:-2] for k in units} - {"proj"})
  return [k for s in stems for k in (f"{s}_k", f"{s}_b") if k in units] + ["proj_k"]


def _along_units(mask_LW, key: str):
  """``mask_LW`` broadcast against the unit array ``key``: columns ``[L, 1, W]``, a bias
  ``[L, W]``, the outgoing rows ``[L, W, 1]``."""
  if key == "proj_k":
    return mask_LW[:, :, None]
  return mask_LW[:, None, :] if key.endswith("_k") else mask_LW


def unit_sq(units) -> jax.Array:
  """``[L, W]``: each unit's sum of squares over its weights and biases."""
  terms = [jnp.sum(jnp.square(units[k]), 2) if k == "proj_k" else
           jnp.sum(jnp.square(units[k]), 1) if k.endswith("_k") else jnp.square(units[k])
           for k in _ordered(units)]
  total = terms[0]
  for term in terms[1:]:
    total = total + term
  return total


def unit_size(units) -> int:
  """The parameters of one unit: ``D`` per weight vector, 1 per bias (GPT-2: 2 D + 1)."""
  return sum(units[k].shape[2] if k == "proj_k" else units[k].shape[1] if k.endswith("_k")
             else 1 for k in units)


def keep_units(units, keep_LW, other=None):
  """``units`` where ``keep_LW``, elsewhere ``other`` (None: zero)."""
  other = other or jax.tree.map(jnp.zeros_like, units)
  return {k: jnp.where(_along_units(keep_LW, k), units[k], other[k]) for k in units}


def first_free(birth: np.ndarray, k: int) -> np.ndarray:
  """``[L, W]`` bool: the first ``k`` free units of each block (fewer if fewer are)."""
  free = birth == NEVER
  return free & (np.cumsum(free, axis=1) <= k)


def new_units(units, new_LW, rng, std: float):
  """``units`` with those of ``new_LW`` drawn afresh: weights N(0, std), biases 0."""
  kernels = [k for k in _ordered(units) if k.endswith("_k")]
  keys = dict(zip(kernels, jax.random.split(rng, len(kernels))))
  fresh = {k: std * jax.random.normal(keys[k], x.shape) if k in keys else jnp.zeros_like(x)
           for k, x in units.items()}
  return keep_units(fresh, jnp.asarray(new_LW), units)


def _unit_index(key: str, i: int, j: int):
  """The index of block i's unit j in the unit array ``key``."""
  return (i, slice(None), j) if key.endswith("_k") and key != "proj_k" else (i, j)


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
      for k, x in units.items():
        x[_unit_index(k, i, s)] = x[_unit_index(k, i, j)]
        x[_unit_index(k, i, j)] = before[k][_unit_index(k, i, j)]
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
  return {**theta, "units": {k: x * _along_units(scale, k)
                             for k, x in theta["units"].items()}}
