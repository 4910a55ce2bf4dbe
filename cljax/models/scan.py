"""The blocks under ``nn.scan`` (``scan_layers``): one block's program run over every
layer, so a model compiles in the time of one block whatever its depth (MaxText's and
levanter's layout for big models), with ``remat`` inside the scan.

Params: block i's leaves stacked along a new leading axis under the blocks' list name
(GPT-2's ``h``, the Llama family's and GPT-NeoX's ``layers``) instead of ``h_0``,
``h_1``, ...; a LoRA, an adapter or a prompt the methods add is stacked the same way.
:func:`stack_blocks` and :func:`unstack_blocks` convert between the two layouts
(loading a Hugging Face checkpoint stacks, exporting unstacks), and the logits are the
unscanned model's. What a scanned model leaves out: the classifier's last block runs
at every position (the unscanned one computes the pooled position alone; the same
numbers), dropout draws its masks from the scan's per-layer keys (another draw than
the unscanned model's, from the same distribution: with dropout on, the runs differ),
and the methods that change single blocks (freezing the last k, PNN's columns, DEN's
units) are refused.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from cljax.models.kv_cache import LayerCache


def stacked_name(cfg) -> str:
  """The name of the stacked blocks: the block prefix without its ``_`` (``h``)."""
  return cfg.LAYOUT.block.rstrip("_")


def stack_blocks(params, cfg):
  """``params`` with blocks ``{block}0..{block}{L-1}`` stacked into one subtree."""
  names = [f"{cfg.LAYOUT.block}{i}" for i in range(cfg.n_layer)]
  rest = {k: v for k, v in params.items() if k not in names}
  return {**rest, stacked_name(cfg): jax.tree.map(lambda *xs: jnp.stack(xs),
                                                   *[params[n] for n in names])}


def unstack_blocks(params, cfg):
  """The inverse of :func:`stack_blocks`: one subtree per block."""
  stacked = params[stacked_name(cfg)]
  rest = {k: v for k, v in params.items() if k != stacked_name(cfg)}
  return {**rest, **{f"{cfg.LAYOUT.block}{i}": jax.tree.map(lambda x, i=i: x[i], stacked)
                     for i in range(cfg.n_layer)}}


def per_block(model):
  """``model`` with one subtree of params per block (Hugging Face's layout)."""
  return model.clone(config=model.config.replace(scan_layers=False))


def as_layout(params, cfg):
  """Per-block ``params`` (as loaded from Hugging Face) in ``cfg``'s layout."""
  return stack_blocks(params, cfg) if cfg.scan_layers else params


def plain_layout(params, cfg):
  """``params`` of ``cfg`` with one subtree per block (as Hugging Face names them)."""
  return unstack_blocks(params, cfg) if cfg.scan_layers else params


def _scan(body, cfg, n_broadcast: int):
  return nn.scan(body, variable_axes={"params": 0}, split_rngs={"params": True,
                                                                "dropout": True},
                 in_axes=(nn.broadcast,) * n_broadcast, length=cfg.n_layer)


def scanned_blocks(block_cls, cfg, x_BTD, mask_BT, deterministic: bool, slot_B,
                   positions_BT):
  """``x`` through every block (all positions), the blocks' params stacked."""
  def body(block, x, mask, slot, positions):
    return block(x, mask, deterministic, None, None, slot, None, positions), None

  block = block_cls(cfg, name=stacked_name(cfg))
  x_BTD, _ = _scan(body, cfg, 3)(block, x_BTD, mask_BT, slot_B, positions_BT)
  return x_BTD


def scanned_cached_blocks(block_cls, cfg, x_BTD, deterministic: bool, cache, cache_index,
                          slot_B, positions_BT):
  """(x through every block with the KV cache, the cache with this call's keys and
  values written). The cache's ``k``, ``v`` are arrays ``[L, B, heads, S, head_dim]``,
  carried through the scan and written in place at the layer's index."""
  def body(block, carry, index, valid, slot, positions):
    x, k_L, v_L, i = carry
    view = LayerCache(k_L[i], v_L[i], index, valid)
    x, kv = block(x, None, deterministic, None, view, slot, None, positions)
    k_L = jax.lax.dynamic_update_index_in_dim(k_L, kv.k, i, 0)
    v_L = jax.lax.dynamic_update_index_in_dim(v_L, kv.v, i, 0)
    return (x, k_L, v_L, i + 1), None

  block = block_cls(cfg, name=stacked_name(cfg))
  carry = (x_BTD, cache.k, cache.v, jnp.zeros((), jnp.int32))
  (x_BTD, k_L, v_L, _), _ = _scan(body, cfg, 4)(block, carry, cache_index, cache.valid,
                                                 slot_B, positions_BT)
  return x_BTD, cache._replace(k=k_L, v=v_L)
