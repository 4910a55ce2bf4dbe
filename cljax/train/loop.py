"""The one training loop that the study and LM training both run on.

:func:`epoch_batches` (seeded epochs from any step, length-bucketed),
:func:`update_count` (a schedule's length), :func:`train_loop` (one compile round,
then the steps with their periodic work, :class:`Periodic`: evaluation and
checkpoints, the next batch on its way while a step runs), :func:`evaluation_totals`
(an eval step's sums over batches) and :class:`Stopwatch` (a run's training time).
What a run does around its loop (its workdir, checkpoints, record) is
:mod:`cljax.train.run`; ``cljax.study`` adds the study's stages, ``cljax.lm.train``
the LM's data and evaluation.
"""

from __future__ import annotations

import itertools
import time
from typing import Any, NamedTuple
from collections.abc import Callable, Iterable, Iterator

from cljax import data as data_lib
from cljax.train import compile as compile_lib
from cljax.train.progress import StepLogger

__all__ = ["Periodic", "Stopwatch", "update_count", "epoch_batches", "train_loop",
           "record_step", "evaluation_totals"]


# ----------------------------------------------------------------------------
# Batches and steps
# ----------------------------------------------------------------------------

def update_count(batches_per_epoch: int, epochs: int, grad_accum_steps: int = 1) -> int:
  """Optimizer updates of ``epochs`` epochs (a last, partial accumulation counts)."""
  return -(-batches_per_epoch * epochs // grad_accum_steps)


def epoch_batches(arrays: dict, batch_size: int, *, epochs: int, seed: tuple, start: int = 0,
                  buckets=()) -> Iterator[dict]:
  """The batches of ``epochs`` epochs over ``arrays`` from step ``start`` on: epoch e
  shuffled by ``(*seed, e)``, each batch cut to its length bucket, the last padded
  and masked (:func:`data.batches`)."""
  per_epoch = data_lib.num_batches(data_lib.size(arrays), batch_size)
  first_epoch, b = divmod(start, per_epoch)
  for epoch in range(first_epoch, epochs):
    yield from data_lib.batches(arrays, batch_size, seed=(*seed, epoch),
                                start=b if epoch == first_epoch else 0, buckets=buckets)


class Stopwatch:
  """Seconds between readings (a run's training time, taken at checkpoints and at the
  end, is stored in its record)."""

  def __init__(self):
    self._t = time.time()

  def lap(self) -> float:
    """Seconds since the last lap (or since the stopwatch was made)."""
    now = time.time()
    seconds, self._t = now - self._t, now
    return seconds


class Periodic(NamedTuple):
  """A callback ``fn(state)`` every ``every`` global steps (0: never), not after the
  last step (the caller's end-of-training work covers it)."""
  every: int
  fn: Callable[[Any], None]


def train_loop(train_fn, state, batches: Callable[[int], Iterable[dict]], *, start: int,
               total: int, logger: StepLogger, advance: Callable[[int], int],
               periodic: tuple[Periodic, ...] = (), stop_after: int | None = None,
               put: Callable[[dict], Any] = lambda b: b, ahead: Iterable[dict] = (),
               programs: Iterable[tuple[Callable, tuple]] = ()):
  """Steps ``start..total-1`` of ``train_fn(state, batch) -> (state, metrics)`` over
  ``batches(start)``.

  Before the first step, one round compiles in parallel every program the loop needs:
  ``train_fn`` for each batch shape of ``batches(start)`` and of ``ahead`` (later
  tasks' batches), and the other ``programs`` (``(jitted, args)``: evaluation, the
  finiteness check). In the loop, each batch is put on the devices (``put``) once
  the step before it was dispatched, so its transfer overlaps that step;
  ``advance(step)`` records each step and returns the global
  step, which the logger and the ``periodic`` callbacks (evaluation, checkpoints;
  the logger flushed before each) go by. Stops with :class:`progress.Interrupted`
  after ``stop_after`` global steps."""
  shapes = data_lib.one_batch_per_shape(itertools.chain(batches(start), ahead))
  compile_lib.compile_programs([(train_fn, (state, put(b))) for b in shapes] + list(programs))
  for s, batch in zip(range(start, total), map(put, batches(start))):
    state, metrics = train_fn(state, batch)   # dispatched: the host goes on
    record_step(s + 1, metrics, lambda st=state: st, total=total, logger=logger, advance=advance,
                periodic=periodic)
    logger.stop_after(stop_after)
  logger.flush()
  return state


def record_step(s: int, metrics, state_fn: Callable[[], Any], *, total: int,
                logger: StepLogger, advance: Callable[[int], int],
                periodic: tuple[Periodic, ...] = ()) -> int:
  """The bookkeeping after step ``s`` (1-based) of ``total``, the one cadence of every
  loop (:func:`train_loop`, runs side by side): ``advance(s)`` records the step and
  gives the global step, the logger takes the step's ``metrics``, and each
  :class:`Periodic` due at that global step runs on ``state_fn()`` (the logger
  flushed first; none after the last step). Returns the global step."""
  g = advance(s)
  logger.push(g, s, metrics)
  for every, fn in periodic:
    if every and g % every == 0 and s < total:
      logger.flush()
      fn(state_fn())
  return g


def evaluation_totals(eval_fn, params, batches: list[dict], put=lambda b: b,
                      compile_first: bool = True) -> dict[str, float]:
  """The sums ``eval_fn(params, batch)`` returns, over every batch, as host floats;
  each shape's program compiled first, in parallel."""
  if compile_first:
    compile_lib.compile_ahead(eval_fn, [(params, put(b))
                                  for b in data_lib.one_batch_per_shape(batches)])
  totals = compile_lib.accumulate(eval_fn, params, (put(b) for b in batches))
  return {k: float(v) for k, v in totals.items()}
