"""Continual-learning metrics of an accuracy matrix.

``R[i][j]`` is the accuracy on task j after training on task i (0-based, T tasks).

- average accuracy: mean_j R[T-1][j] (Lopez-Paz and Ranzato 2017, "ACC").
- backward transfer: mean_{j<T-1} R[T-1][j] - R[j][j] (Lopez-Paz and Ranzato 2017).
- forward transfer: mean_{j>0} R[j-1][j] - b_j, with b_j the accuracy on task j of the
  model before any training (Lopez-Paz and Ranzato 2017).
- forgetting: mean_{j<T-1} max_{j<=l<T-1} R[l][j] - R[T-1][j] (Chaudhry et al. 2018,
  "Riemannian Walk"; the maximum runs over the evaluations after task j was learned).

Over runs, ``mean_std`` gives a mean with the half-width of its 95 % t-interval and
``fmt_interval`` writes it as ``mean ± half-width``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np


def _matrix(accuracy_matrix) -> np.ndarray:
  r = np.asarray(accuracy_matrix, dtype=np.float64)
  if r.ndim != 2 or r.shape[0] != r.shape[1] or r.shape[0] == 0:
    raise ValueError(f"accuracy_matrix must be square T x T (row i: after task i), "
                     f"found shape {r.shape}.")
  return r


def forgetting_per_task(accuracy_matrix) -> list[float]:
  """Forgetting of each task but the last (Chaudhry et al. 2018)."""
  r = _matrix(accuracy_matrix)
  t = r.shape[0]
  return [float(r[j:t - 1, j].max() - r[t - 1, j]) for j in range(t - 1)]


def summarize(accuracy_matrix, *, baseline: Sequence[float] | None = None) -> dict:
  """Average accuracy, forgetting, backward and forward transfer.

  Args:
    accuracy_matrix: ``[T, T]``, row i the accuracies on every task after task i.
    baseline: accuracy on each task before any training (needed for forward
      transfer; None leaves it None).

  Returns:
    dict with ``average_accuracy``, ``forgetting``, ``backward_transfer``,
    ``forward_transfer`` (None where undefined, e.g. a single task),
    ``forgetting_per_task`` and ``final_accuracy`` (the last row).
  """
  r = _matrix(accuracy_matrix)
  t = r.shape[0]
  out = {
      "average_accuracy": float(r[-1].mean()),
      "final_accuracy": r[-1].tolist(),
      "forgetting": None,
      "forgetting_per_task": forgetting_per_task(r),
      "backward_transfer": None,
      "forward_transfer": None,
  }
  if t > 1:
    out["forgetting"] = float(np.mean(out["forgetting_per_task"]))
    out["backward_transfer"] = float(np.mean([r[-1, j] - r[j, j] for j in range(t - 1)]))
    if baseline is not None:
      b = np.asarray(baseline, dtype=np.float64)
      if b.shape != (t,):
        raise ValueError(f"baseline must hold one accuracy per task ({t}), found {b.shape}.")
      out["forward_transfer"] = float(np.mean([r[j - 1, j] - b[j] for j in range(1, t)]))
  return out


def mean_std(values: Sequence[float | None]) -> tuple[float, float, int, float]:
  """Mean, sample standard deviation (ddof=1; 0 for one value), count, and the
  half-width of the mean's 95 % t-interval (Student's t, n - 1 degrees of freedom;
  nan for one value) of the values that are not None."""
  v = np.array([x for x in values if x is not None], dtype=np.float64)
  if v.size == 0:
    return math.nan, math.nan, 0, math.nan
  if v.size == 1:
    return float(v[0]), 0.0, 1, math.nan
  import scipy.stats  # pylint: disable=import-outside-toplevel  (slow; reports only)
  std = float(v.std(ddof=1))
  half = float(scipy.stats.t.ppf(0.975, v.size - 1) * std / math.sqrt(v.size))
  return float(v.mean()), std, int(v.size), half


def fmt_interval(ms: tuple[float, float, int, float], digits: int = 3) -> str:
  """``mean ± half-width of the 95 % t-interval`` (the mean alone for one run)."""
  mean, _, n, half = ms
  if n == 0 or math.isnan(mean):
    return "-"
  return f"{mean:.{digits}f} ± {half:.{digits}f}" if n > 1 else f"{mean:.{digits}f}"
