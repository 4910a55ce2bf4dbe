"""Programs compiled ahead, in parallel (:func:`compile_programs`), and sums added on
the device and read to the host once (:func:`accumulate`)."""

from __future__ import annotations

import concurrent.futures
import os
from typing import Any

import jax
import jax.numpy as jnp


@jax.jit
def tree_add(a, b):
  """``a + b`` leaf by leaf, one program (eagerly: one per leaf shape)."""
  return jax.tree.map(jnp.add, a, b)


def accumulate(step_fn, params, batches) -> dict[str, Any]:
  """The sums ``step_fn(params, batch)`` returns (an eval step), added on device over
  ``batches`` and read to the host once."""
  totals = None
  for batch in batches:
    out = step_fn(params, batch)
    totals = out if totals is None else tree_add(totals, out)
  return jax.device_get(totals)


def compile_ahead(jitted, arg_sets) -> None:
  """Compiles the ``jax.jit`` function ``jitted`` for each argument tuple in ``arg_sets``
  at once (:func:`compile_programs`)."""
  compile_programs([(jitted, args) for args in arg_sets])


def compile_programs(programs) -> None:
  """Compiles ``(jitted, args)`` pairs (``jax.jit`` functions and an argument tuple
  each) at once: each is traced and lowered in turn, and XLA compiles each in a
  parallel thread (outside the GIL) as soon as it is lowered, so a run's programs take
  about one compilation's wall time per core instead of one each, and the lowering of
  the next overlaps the compilation of the last. The calls that follow find the
  programs in jit's own cache; those already compiled cost nothing here."""
  programs = list(programs)
  if not programs:
    return
  with concurrent.futures.ThreadPoolExecutor(min(len(programs), os.cpu_count() or 1)) as ex:
    done = [ex.submit(jitted.lower(*args).compile) for jitted, args in programs]
  for d in done:
    d.result()
