"""A study's evaluation: every task's test (or validation) split after a task, the
programs of all its batch shapes compiled at once, as :class:`Scores`
(class-incremental, task-aware and, for per-task modules, task-inference accuracy)."""

from __future__ import annotations

import functools
import itertools
from typing import NamedTuple

from cljax import data as data_lib
from cljax.study.setup import Study
from cljax.train import compile as compile_lib
from cljax.train import loop
from cljax.train import sharding


def task_scores(totals: dict[str, float]) -> dict[str, float]:
  """The rates of an eval step's sums over one task (:func:`steps.eval_step`):
  ``accuracy`` (class-incremental), ``task_aware_accuracy``, ``loss`` (mean CE) and
  the method's own (``task_inference``: per-task modules)."""
  n = totals["count"]
  own = {k[:-len("_correct")]: v / n for k, v in totals.items()
         if k not in ("correct", "task_correct", "loss_sum", "count")}
  return {"accuracy": totals["correct"] / n, "task_aware_accuracy": totals["task_correct"] / n,
          "loss": totals["loss_sum"] / n, **own}


class Scores(NamedTuple):
  """Accuracy on every task: class-incremental, task-aware, and (per-task modules) how
  often the task was inferred right (None for other methods)."""
  acc: list
  task_acc: list
  inference: list | None


def split_batches(study: Study, split: str) -> list[list[dict]]:
  """Every task's ``split`` (test or val) as host batches, in order of length, each
  cut to its bucket."""
  return [list(data_lib.eval_batches(getattr(d, split), study.cfg.eval_batch_size,
                                     study.buckets)) for d in study.task_data]


def eval_programs(study: Study, params, method_state, batches) -> list[tuple]:
  """The evaluation's argument sets, one per batch shape of ``batches`` (lists of
  host batches), for :func:`compile_lib.compile_ahead`."""
  if study.method.eval_logits is None:
    method_state = ()
  return [(params, sharding.shard_batch(b, study.mesh), method_state)
          for b in data_lib.one_batch_per_shape(itertools.chain.from_iterable(batches))]


def evaluate_all(study: Study, params, method_state=(), split: str = "test") -> Scores:
  """The :class:`Scores` on every task's ``split`` (test or val); ``method_state``
  reaches a method's ``eval_logits`` (per-task modules)."""
  batches = split_batches(study, split)
  compile_lib.compile_ahead(study.eval_fn, eval_programs(study, params, method_state, batches))
  if study.method.eval_logits is None:
    method_state = ()

  def fn(params, batch):
    return study.eval_fn(params, batch, method_state)
  rows = [task_scores(loop.evaluation_totals(
      fn, params, task_batches, functools.partial(sharding.shard_batch, mesh=study.mesh),
      compile_first=False)) for task_batches in batches]
  inference = [r["task_inference"] for r in rows] if "task_inference" in rows[0] else None
  return Scores([r["accuracy"] for r in rows], [r["task_aware_accuracy"] for r in rows],
                inference)
