"""The one training loop that the study and LM training both run on.

What a run does around its steps, in named pieces: :func:`open_run` (the workdir's
guards and its checkpointer), :func:`build_model` (pretrained weights or a random
init), :func:`restore_or_start` (the newest checkpoint, or a fresh start),
:func:`epoch_batches` (seeded epochs from any step, length-bucketed),
:func:`train_loop` (one compile round, then the steps with their evaluation and
checkpoint callbacks, the next batch on its way while a step runs),
:func:`evaluation_totals` (an eval step's sums over batches) and :class:`Record` (a
run's progress, stored as JSON in every checkpoint), :func:`use_compilation_cache`
(every program kept on disk). ``cljax.study`` adds the
study's stages, ``cljax.lm_train`` the LM's data and evaluation.
"""

from __future__ import annotations

import dataclasses
import itertools
import os
import time
from typing import Any, NamedTuple
from collections.abc import Callable, Iterable, Iterator

from absl import logging
import jax

from cljax import checkpoint
from cljax import data as data_lib
from cljax import hf
from cljax import steps
from cljax.checkpoint import Checkpointer
from cljax.models import GPT2Classifier, GPT2LabelWords, GPT2LM, random_params
from cljax.progress import StepLogger, Writers, drop_records_after

__all__ = ["Record", "Periodic", "Stopwatch", "open_run", "use_compilation_cache", "open_logger",
           "build_model", "restore_or_start", "update_count", "epoch_batches", "train_loop",
           "evaluation_totals"]


# ----------------------------------------------------------------------------
# The run's files and record
# ----------------------------------------------------------------------------

@dataclasses.dataclass
class Record:
  """Base of a run's progress record: a dataclass stored as JSON in every checkpoint
  (fields a later version added take their defaults when an older one is read)."""

  def to_json(self) -> dict:
    return dataclasses.asdict(self)

  def where(self) -> str:
    """Where the run stands, for the resume message (``: task 1, step 4 in the task``)."""
    return ""

  @classmethod
  def from_json(cls, d: dict):
    names = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in d.items() if k in names and v is not None})


def open_run(workdir: str, view: dict, resume: bool, *, keep: int, outputs: tuple[str, ...],
             resumable: frozenset[str]) -> Checkpointer:
  """The run's checkpointer (``workdir/checkpoints``), after the guards of
  :func:`checkpoint.open_run`: checkpoints without ``--resume``, a resume with other
  settings than ``view`` (those in ``resumable`` aside), outputs of an earlier run
  with nothing to resume. Nothing is written here."""
  ckpt = checkpoint.open_run(workdir, view, resume, keep=keep, outputs=outputs,
                             resumable=resumable)
  return ckpt or Checkpointer(os.path.join(workdir, "checkpoints"), keep)


def use_compilation_cache(cache_dir: str | None) -> str:
  """Keeps every compiled program in ``cache_dir/xla`` (default ``~/.cache/cljax``)
  unless the caller (a sweep) already chose a folder; returns ``cache_dir``."""
  cache_dir = cache_dir or os.path.join(os.path.expanduser("~"), ".cache", "cljax")
  if not jax.config.jax_compilation_cache_dir:
    jax.config.update("jax_compilation_cache_dir", os.path.join(cache_dir, "xla"))
  # Every program, however small or quick: a warm rerun then compiles nothing.
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
  jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
  return cache_dir


def open_logger(workdir: str, step: int, log_every: int, ckpt: Checkpointer, *,
                enabled: bool = True, unit: str = "examples",
                on_first_step: Callable[[], None] | None = None) -> StepLogger:
  """The step logger of a run at global ``step`` (the workdir made if need be): records
  of steps after it (logged by a run that stopped before its next checkpoint) are
  dropped from ``metrics.jsonl``."""
  if enabled:
    os.makedirs(workdir, exist_ok=True)
  if enabled and step:
    drop_records_after(os.path.join(workdir, "metrics.jsonl"), step)
  return StepLogger(Writers(workdir, enabled=enabled), log_every, ckpt.latest_step, unit=unit,
                    on_first_step=on_first_step)


# ----------------------------------------------------------------------------
# Model, state
# ----------------------------------------------------------------------------

def build_model(cfg, tokenizer, *, kind: str, rng: jax.Array, n_positions: int,
                num_labels: int = 2, label_tokens: tuple[int, ...] | None = None):
  """(model, params) of ``cfg`` (:class:`cljax.config.ModelOptions`): ``--model``'s
  weights or a random init of ``--size`` from ``rng`` with ``n_positions``. ``kind``:
  ``classifier`` (a ``score`` head of ``num_labels``), ``label_words`` (classification
  as text over ``label_tokens``) or ``lm``. Checks the vocabulary (and for the
  classifiers the pad id) against ``tokenizer``."""
  if kind not in ("classifier", "label_words", "lm"):
    raise ValueError(f"Unknown model kind {kind!r}; expected classifier, label_words or lm.")
  if cfg.init not in ("pretrained", "random"):
    raise ValueError(f"Unknown init {cfg.init!r}; expected 'pretrained' or 'random'.")
  if cfg.init == "random":
    config = cfg.random_init_config(tokenizer, n_positions, **(
        {} if kind == "lm" else {"num_labels": num_labels}))
    model = (GPT2LM(config) if kind == "lm" else GPT2Classifier(config)
             if kind == "classifier" else GPT2LabelWords(config, label_tokens))
    return model, random_params(model, rng)
  overrides = cfg.config_overrides()
  if kind == "classifier":
    model, params = hf.load_pretrained(cfg.model, num_labels=num_labels, dtype=cfg.dtype,
                                       seed=cfg.seed, **overrides)
  else:
    model, params = hf.load_lm(cfg.model, dtype=cfg.dtype, **overrides, **(
        {} if kind == "lm" else {"num_labels": num_labels}))
    if kind == "label_words":
      model = GPT2LabelWords(model.config, label_tokens)
  cfg.check_vocabulary(model.config, tokenizer)
  if kind != "lm" and model.config.pad_token_id != tokenizer.pad_token_id:
    raise ValueError(f"The model's pad id {model.config.pad_token_id} differs from the "
                     f"tokenizer's {tokenizer.pad_token_id}; use the model's tokenizer.")
  return model, params


def restore_or_start(ckpt: Checkpointer, resume: bool, *, target, record_cls: type[Record],
                     start: Callable[[], tuple[Any, Record]],
                     saved_shapes_under: str | None = None) -> tuple[Any, Record]:
  """(state, record): with ``resume``, the newest checkpoint that restores
  (``target``: the abstract state, or a function of the checkpoint's record giving
  it); otherwise, or with nothing to resume, ``start()``."""
  if resume and ckpt.latest_step() is not None:
    state, meta, step = ckpt.restore_newest(target, saved_shapes_under=saved_shapes_under)
    record = record_cls.from_json(meta)
    logging.info("Resumed from %s, checkpoint %d%s.", ckpt.directory, step, record.where())
    return state, record
  if resume:
    logging.info("--resume given but %s holds no checkpoint: starting afresh.",
                 os.path.dirname(ckpt.directory))
  return start()


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
  steps.compile_programs([(train_fn, (state, put(b))) for b in shapes] + list(programs))
  for s, batch in zip(range(start, total), map(put, batches(start))):
    state, metrics = train_fn(state, batch)   # dispatched: the host goes on
    g = advance(s + 1)
    logger.push(g, s + 1, metrics)
    for every, fn in periodic:
      if every and g % every == 0 and s + 1 < total:
        logger.flush()
        fn(state)
    logger.stop_after(stop_after)
  logger.flush()
  return state


def evaluation_totals(eval_fn, params, batches: list[dict], put=lambda b: b,
                      compile_first: bool = True) -> dict[str, float]:
  """The sums ``eval_fn(params, batch)`` returns, over every batch, as host floats;
  each shape's program compiled first, in parallel."""
  if compile_first:
    steps.compile_ahead(eval_fn, [(params, put(b))
                                  for b in data_lib.one_batch_per_shape(batches)])
  totals = steps.accumulate(eval_fn, params, (put(b) for b in batches))
  return {k: float(v) for k, v in totals.items()}
