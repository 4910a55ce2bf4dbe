"""Fixed-shape batches (the last one padded and masked with ``weights`` 0, never
dropped) and length buckets: each batch cut to the smallest of a few lengths that
holds its longest row, so that a jitted step compiles once per bucket.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence

import numpy as np

from cljax.data.arrays import size

# ----------------------------------------------------------------------------
# Batches
# ----------------------------------------------------------------------------

def num_batches(n: int, batch_size: int) -> int:
  return -(-n // batch_size)


def batches(arrays: dict[str, np.ndarray], batch_size: int, *,
            seed: int | Sequence[int] | None = None, start: int = 0,
            buckets: Sequence[int] = ()) -> Iterator[dict[str, np.ndarray]]:
  """Fixed-shape batches; shuffled by ``seed`` (None: in order), any
  ``np.random.default_rng`` seed: the study uses ``(seed, task, epoch)``.

  The last batch is padded with copies of the first example at ``weights`` 0, so
  every example counts once and the batch size never changes. ``start`` skips that
  many batches (to resume mid-epoch). With ``buckets`` (sequence lengths, see
  :func:`length_buckets`) each batch's trailing padding is cut to the smallest bucket
  that holds its longest row (:func:`trim_to_bucket`).
  """
  n = size(arrays)
  order = np.arange(n) if seed is None else np.random.default_rng(seed).permutation(n)
  for b in range(start, num_batches(n, batch_size)):
    idx = order[b * batch_size:(b + 1) * batch_size]
    real = len(idx)
    if real < batch_size:
      idx = np.concatenate([idx, np.full(batch_size - real, idx[0])])
    batch = {k: v[idx] for k, v in arrays.items()}
    batch["weights"] = (np.arange(batch_size) < real).astype(np.float32)
    yield trim_to_bucket(batch, buckets) if buckets else batch


# ----------------------------------------------------------------------------
# Length buckets
# ----------------------------------------------------------------------------

# The [N, T] arrays of a batch, in groups that share their padding: the first of each
# group is its token ids, the others masks (a row's length is past its last nonzero).
SEQUENCE_GROUPS = (("input_ids", "attention_mask", "loss_mask"),
                   ("lm_input_ids", "lm_attention_mask", "lm_loss_mask"))


def length_buckets(max_length: int, multiple: int) -> tuple[int, ...]:
  """The lengths a batch may be padded to: the multiples of ``multiple`` below
  ``max_length``, and ``max_length`` (``multiple`` 0: ``max_length`` only)."""
  if multiple <= 0:
    return (max_length,)
  return (*range(multiple, max_length, multiple), max_length)


def row_lengths(arrays: dict[str, np.ndarray]) -> np.ndarray:
  """Each row's length: one past its last nonzero mask entry, over every sequence
  group (0 for a row with no real token)."""
  out = np.zeros((size(arrays),), np.int64)
  for group in SEQUENCE_GROUPS:
    for key in group[1:]:
      if key in arrays:
        nonzero = np.asarray(arrays[key]) != 0
        last = nonzero.shape[1] - np.argmax(nonzero[:, ::-1], axis=1)
        out = np.maximum(out, np.where(nonzero.any(1), last, 0))
  return out


def trim_to_bucket(batch: dict[str, np.ndarray], buckets: Sequence[int]
                   ) -> dict[str, np.ndarray]:
  """``batch`` with every sequence array cut to the smallest bucket that holds its
  longest row (never longer than it was).

  Exact for right-padded rows: with causal attention no real position sees the cut
  ones, the pooled token (the last that is not the pad id) is kept, and masked
  positions carry no loss, so logits, losses and gradients do not change; a jitted
  step compiles once per bucket."""
  need = int(row_lengths(batch).max(initial=1))
  length = next((b for b in sorted(buckets) if b >= need), None)
  if length is None:
    raise ValueError(f"A row of {need} tokens is longer than the largest length bucket "
                     f"{max(buckets)}; the buckets must reach --max_length.")
  seq = {k for g in SEQUENCE_GROUPS for k in g}
  return {k: v[:, :length] if k in seq else v for k, v in batch.items()}


def eval_batches(arrays: dict[str, np.ndarray], batch_size: int, buckets: Sequence[int] = ()
                 ) -> Iterator[dict[str, np.ndarray]]:
  """In-order batches for an evaluation (where order does not matter); with
  ``buckets``, the rows go in order of length and each batch is cut to its bucket."""
  if buckets:
    arrays = sort_by_length(arrays)
  return batches(arrays, batch_size, buckets=buckets)


def one_batch_per_shape(batches: Iterable[dict[str, np.ndarray]]
                        ) -> list[dict[str, np.ndarray]]:
  """The first batch of each distinct set of array shapes and dtypes among ``batches``
  (with length buckets: one per bucket met), in order of appearance."""
  out: dict[tuple, dict[str, np.ndarray]] = {}
  for b in batches:
    out.setdefault(tuple(sorted((k, v.shape, v.dtype.str) for k, v in b.items())), b)
  return list(out.values())


def sort_by_length(arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  """The rows in order of length (stable): batches of similar rows take small buckets
  (for evaluation, where order does not matter)."""
  order = np.argsort(row_lengths(arrays), kind="stable")
  return {k: v[order] for k, v in arrays.items()}
