"""Statistics of per-example gradients over a task's training data: the diagonal
Fisher (EWC, online EWC) and MAS's importance.

``1/N sum_i reduce(grad fn(params, x_i))`` over N examples drawn without replacement,
from per-example gradients (a vmap over a chunk of examples, each chunk cut to its
length bucket). Squaring the gradient of a batch mean instead, as many
implementations do, is a different, biased estimator (it equals the per-example one
only for batch size 1); cljax does not offer it. :func:`per_example_programs` names
the per-chunk programs a pass will call, for the study's compile round.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from cljax import data as data_lib
from cljax.train import compile as compile_lib



def fisher_log_prob(model, params, input_ids, attention_mask, label, rng, mode: str):
  """log p(y|x) of one example; y the true label (empirical Fisher) or a label
  sampled from the model's predictive distribution (true Fisher)."""
  logits = model.apply({"params": params}, input_ids[None], attention_mask[None],
                       deterministic=True)[0]
  logp = jax.nn.log_softmax(logits)
  if mode == "true":
    label = jax.random.categorical(rng, jax.lax.stop_gradient(logits))
  elif mode != "empirical":
    raise ValueError(f"Unknown Fisher estimator {mode!r}; expected 'empirical' or 'true'.")
  return logp[label]


def mas_output_norm(model, params, input_ids, attention_mask, label, rng):
  """||f(x)||_2^2 of one example's logits (Aljundi et al. 2018)."""
  del label, rng
  logits = model.apply({"params": params}, input_ids[None], attention_mask[None],
                       deterministic=True)[0]
  return jnp.sum(jnp.square(logits))


def _chunk_stat(params, chunk, rng, *, fn, reduce):
  """Sum over a chunk of ``reduce(per-example gradient)``, padded rows excluded."""
  keys = jax.random.split(rng, chunk["labels"].shape[0])
  grads = jax.vmap(jax.grad(fn), in_axes=(None, 0, 0, 0, 0))(
      params, chunk["input_ids"], chunk["attention_mask"], chunk["labels"], keys)
  w = chunk["weights"]
  return jax.tree.map(lambda g: jnp.tensordot(w, reduce(g.astype(jnp.float32)), axes=1),
                      grads)


@functools.lru_cache(maxsize=16)
def _jitted_chunk_stat(fn, reduce):
  return jax.jit(functools.partial(_chunk_stat, fn=fn, reduce=reduce))


def per_example_statistic(params, arrays: dict[str, np.ndarray], fn, reduce, *,
                          num_samples: int, chunk: int, rng, buckets=()) -> Any:
  """``1/N sum_i reduce(grad fn(params, x_i))`` over N = min(num_samples, |data|)
  examples drawn without replacement (seeded by ``rng``).

  ``fn(params, input_ids, attention_mask, label, key) -> scalar`` is one example's
  function; ``reduce`` is ``jnp.square`` (Fisher) or ``jnp.abs`` (MAS). Examples
  are processed ``chunk`` at a time so memory stays ``chunk`` x params, each chunk
  cut to its length bucket (``buckets``, :func:`cljax.data.trim_to_bucket`).
  """
  stat_fn, total = _jitted_chunk_stat(fn, reduce), None
  chunks = _chunks(arrays, num_samples, chunk, rng, buckets)
  for i, batch in enumerate(chunks):
    part = stat_fn(params, batch, _fold_in(rng, i))
    total = part if total is None else compile_lib.tree_add(total, part)
  return _tree_divide(total, min(num_samples, data_lib.size(arrays)))


def per_example_programs(params, arrays: dict[str, np.ndarray], fn, reduce, *,
                         num_samples: int, chunk: int, rng, buckets=()) -> list[tuple]:
  """The per-chunk programs :func:`per_example_statistic` will call with these
  arguments, one per chunk shape, for a compile round ahead of it."""
  stat_fn, key = _jitted_chunk_stat(fn, reduce), _fold_in(rng, 0)
  shapes = data_lib.one_batch_per_shape(_chunks(arrays, num_samples, chunk, rng, buckets))
  return [(stat_fn, (params, batch, key)) for batch in shapes]


def _chunks(arrays, num_samples: int, chunk: int, rng, buckets) -> list[dict]:
  """N = min(num_samples, |data|) examples drawn without replacement (seeded by
  ``rng``), ``chunk`` at a time, each chunk cut to its length bucket."""
  n_total = data_lib.size(arrays)
  idx = np.random.default_rng(int(_sample_seed(rng))).permutation(n_total)[:num_samples]
  subset = {k: v[idx] for k, v in arrays.items()}
  return [{k: b[k] for k in ("input_ids", "attention_mask", "labels", "weights")}
          for b in data_lib.batches(subset, chunk, buckets=buckets)]


@jax.jit
def _sample_seed(rng) -> jax.Array:
  return jax.random.randint(rng, (), 0, 2 ** 31 - 1)


_fold_in = jax.jit(jax.random.fold_in)
_tree_divide = jax.jit(lambda tree, n: jax.tree.map(lambda t: t / n, tree), static_argnums=1)


def fisher_diagonal(model, params, arrays, *, mode="empirical", num_samples=512, chunk=8,
                    rng=None, buckets=()):
  """Diagonal Fisher ``1/N sum_i (d log p(y_i|x_i) / d theta)^2`` from per-example
  gradients; ``mode`` 'empirical' (true labels) or 'true' (sampled labels)."""
  rng = jax.random.PRNGKey(0) if rng is None else rng
  fn = _ModelFn(fisher_log_prob, model, mode)
  return per_example_statistic(params, arrays, fn, jnp.square, num_samples=num_samples,
                               chunk=chunk, rng=rng, buckets=buckets)


def mas_importance(model, params, arrays, *, num_samples=512, chunk=8, rng=None, buckets=()):
  """MAS importance ``1/N sum_i |d ||f(x_i)||^2 / d theta|``."""
  rng = jax.random.PRNGKey(0) if rng is None else rng
  fn = _ModelFn(mas_output_norm, model)
  return per_example_statistic(params, arrays, fn, jnp.abs, num_samples=num_samples,
                               chunk=chunk, rng=rng, buckets=buckets)


class _ModelFn:
  """A hashable ``fn(params, ids, mask, label, key)`` bound to a model (jit cache key)."""

  def __init__(self, fn, model, *args):
    self.fn, self.model, self.args = fn, model, args

  def __call__(self, params, ids, mask, label, key):
    return self.fn(self.model, params, ids, mask, label, key, *self.args)

  def __hash__(self):
    return hash((self.fn, self.model, self.args))

  def __eq__(self, other):
    return isinstance(other, _ModelFn) and (self.fn, self.model, self.args) == (
        other.fn, other.model, other.args)


def model_fn(fn, model, *args) -> _ModelFn:
  """``fn(model, params, ids, mask, label, key, *args)`` bound to ``model``: one
  example's function for :func:`per_example_statistic`, hashable (a jit cache key)."""
  return _ModelFn(fn, model, *args)

