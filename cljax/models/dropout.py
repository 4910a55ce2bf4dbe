"""Dropout that can ignore the padded length.

``dropout(cfg, rate, x, deterministic)`` is ``flax.linen.Dropout`` unless
``cfg.length_stable_dropout``: then the mask is drawn with the sequence axes first
(query rows each from their own key, for attention probabilities), so that with
threefry keys (partitionable, JAX's default) a position's keep bit depends on its
place, not on the length its batch is padded to. A batch cut to a length bucket, or
padded to a longer one (runs trained side by side share a step's length), then
trains exactly as at any other length.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp


class LengthStableDropout(nn.Module):
  """Inverted dropout whose mask along ``seq_axes`` (one axis, or a query and a key
  axis) is a prefix of the mask of any longer sequence."""
  rate: float
  seq_axes: tuple[int, ...] = (1,)

  @nn.compact
  def __call__(self, x):
    keep = 1.0 - self.rate
    key = self.make_rng("dropout")
    axes = tuple(a % x.ndim for a in self.seq_axes)
    rest = tuple(n for i, n in enumerate(x.shape) if i not in axes)
    if len(axes) == 1:
      mask = jax.random.bernoulli(key, keep, (x.shape[axes[0]],) + rest)
    else:   # one key per query row: a prefix in both axes
      q_axis, s_axis = axes
      mask = jax.vmap(lambda q: jax.random.bernoulli(
          jax.random.fold_in(key, q), keep, (x.shape[s_axis],) + rest))(
              jnp.arange(x.shape[q_axis]))
    mask = jnp.moveaxis(mask, tuple(range(len(axes))), axes)
    return jax.lax.select(mask, x / jnp.asarray(keep, x.dtype), jnp.zeros_like(x))


def dropout(cfg, rate: float, x, deterministic: bool, seq_axes: tuple[int, ...] = (1,)):
  """Dropout of ``x`` at ``rate`` in the layout ``cfg`` asks for (see module doc)."""
  if not cfg.length_stable_dropout:
    return nn.Dropout(rate)(x, deterministic=deterministic)
  if deterministic or rate == 0.0:
    return x
  return LengthStableDropout(rate, seq_axes)(x)
