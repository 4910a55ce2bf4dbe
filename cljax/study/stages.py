"""The sequential study: train on each task in turn, evaluate every task after each.

``run(config, workdir)`` writes ``results.json`` (the accuracy matrices and their
metrics), ``metrics.jsonl`` (step metrics), figures and TensorBoard scalars, and
orbax checkpoints from which ``run(..., resume=True)`` continues exactly.

The study is a handful of named stages over explicit state, on the task protocol
(:mod:`cljax.train.tasks`) and the loop that LM training shares
(:mod:`cljax.train.loop`): :func:`setup` builds what is built once (a :class:`Study`),
:func:`start` gives the train state and the :class:`RunRecord` (the run's progress,
stored as JSON in every checkpoint), and for each task :func:`start_task` (the
protocol's ``begin_task`` when the task starts afresh; the task's :class:`TaskPlan`
in any case), :func:`train_task` (its steps, with the periodic work of
:func:`task_hooks`) and :func:`finish_task` (the protocol's ``end_task``, the
evaluation, the row, a checkpoint). Runs side by side (:mod:`cljax.study.parallel`)
use the same stages and hooks.
"""

from __future__ import annotations

import functools
import itertools
import time
from collections.abc import Callable
from typing import NamedTuple

from absl import logging
import jax

from cljax import data as data_lib
from cljax.methods import TaskContext
from cljax.study.config import StudyConfig
from cljax.study.evaluation import eval_programs, evaluate_all, split_batches
from cljax.study.results import (count_params, fmt_accs, make_results, run_code_version,
                                 write_results)
from cljax.study.setup import RunRecord, Study, TaskRecord, abstract_state, setup, task_tx
from cljax.train import checkpoint
from cljax.train import loop
from cljax.train import run as run_lib
from cljax.train import sharding
from cljax.train import steps
from cljax.train import tasks as tasks_lib
from cljax.train.progress import CompileTimer, StepLogger
from cljax.train.tasks import TaskPlan


# ----------------------------------------------------------------------------
# A task's context, plan and train step
# ----------------------------------------------------------------------------

def task_context(study: Study, k: int, record: RunRecord | None = None) -> TaskContext:
  """The host hooks' view of task k (the task protocol gives each hook its key and
  params); their reports go into ``record``."""
  def report(entry: dict) -> None:
    if record is not None:
      record.method_reports.append({"task": k, "task_name": study.tasks[k].name, **entry})
  return TaskContext(
      task_index=k, task_name=study.tasks[k].name, train=study.task_data[k].train,
      model=study.model, batch_size=study.cfg.batch_size,
      previous_train=tuple(d.train for d in study.task_data[:k]),
      tasks=tuple(study.tasks), tokenizer=study.tokenizer, report=report,
      length_buckets=study.buckets)


def _trainable_key(study: Study, k: int) -> tuple | None:
  """Task k's set of trainable parameters, hashable (runs and tasks that agree on it
  share their train step)."""
  return tasks_lib.trainable_key(study.method, study.param_shapes, k)


def train_program(study: Study, k: int) -> Callable:
  """The jitted, sharded train step of task k (one per set of trainable parameters,
  built by :func:`setup`)."""
  return study.train_steps[_trainable_key(study, k)]


def _shard_state(study: Study, state: steps.TrainState) -> steps.TrainState:
  """``state`` on the study's mesh (params and param-shaped state sharded like them)."""
  return jax.device_put(state, sharding.state_shardings(study.mesh, state, study.param_shapes))


# ----------------------------------------------------------------------------
# The stages
# ----------------------------------------------------------------------------

def _restore_target(study: Study, meta: dict):
  """The abstract state a checkpoint with ``meta`` holds: inside task k, the task's
  optimizer (its frozen parameters have no optimizer state); at a task boundary, none
  (:func:`finish_task` does not save moments the next task would discard). The method's
  arrays (generated pseudo-data) take the shapes they were saved with."""
  return abstract_state(study, None if meta["step_in_task"] == 0 else task_tx(study, meta["task"]))


def _start(study: Study) -> tuple[steps.TrainState, RunRecord]:
  """The initial state (no optimizer yet: :func:`start_task` gives each task its own)
  and a new record holding the accuracy before any training."""
  t0 = time.time()
  state = steps.init_train_state(study.initial_params, None, study.base_rng, study.method)
  acc, task_acc, _ = evaluate_all(study, state.params, state.method_state)
  record = RunRecord(baseline=acc, task_aware_baseline=task_acc, eval_seconds=time.time() - t0,
                     config=study.cfg.to_dict(), warnings=list(study.warnings),
                     base_sha256=study.base_sha256,
                     curve=[{"global_step": 0, "task": -1, "accuracy": acc,
                             "task_aware_accuracy": task_acc}])
  logging.info("Before training: accuracy %s", fmt_accs(study.tasks, acc))
  return state, record


def start(study: Study, resume: bool = False) -> tuple[steps.TrainState, RunRecord]:
  """The latest checkpoint's state and record (``resume``), or the initial state and
  a new record holding the accuracy before any training. A run resumes only on the
  weights it started from (the SHA-256 its record keeps; older records keep none)."""
  state, record = run_lib.restore_or_start(
      study.checkpointer, resume, target=functools.partial(_restore_target, study),
      record_cls=RunRecord, start=functools.partial(_start, study),
      saved_shapes_under="method_state")
  if record.base_sha256 not in (None, study.base_sha256):
    raise ValueError(f"Cannot resume {study.workdir}: it started from weights SHA-256 "
                     f"{record.base_sha256[:12]}, and --model={study.cfg.model} now holds "
                     f"{(study.base_sha256 or 'none')[:12]}. Give it the weights it started "
                     "from, or start the run afresh in another --workdir.")
  return state, record


def save_checkpoint(study: Study, state, record: RunRecord) -> None:
  """Saves ``state`` at ``record.global_step`` (never a non-finite one)."""
  checkpoint.save_finite(study.checkpointer, record.global_step, state, record.to_json())


def start_task(study: Study, k: int, state, record: RunRecord
               ) -> tuple[steps.TrainState, TaskPlan]:
  """Task k's state and :class:`TaskPlan`. A task that starts afresh (not inside it,
  from a checkpoint) goes through the task protocol's ``begin_task``: the method's
  ``before_task``, its arrays and a fresh optimizer, as a new Hugging Face Trainer per
  task in the original study (the previous optimizer moments are not carried over)."""
  ctx = task_context(study, k, record)
  if record.step_in_task:
    return state, tasks_lib.plan_task(study.method, ctx, study.cfg, rng=study.base_rng,
                                      param_shapes=study.param_shapes,
                                      method_state=state.method_state)
  record.tasks.append(TaskRecord(name=study.tasks[k].name))
  state, plan = tasks_lib.begin_task(study.method, state, ctx, study.cfg, rng=study.base_rng,
                                     param_shapes=study.param_shapes)
  return _shard_state(study, state), plan


def later_tasks_alike(study: Study, plan: TaskPlan) -> list[int]:
  """The later tasks that share task ``plan.k``'s trainable parameters and kind of
  arrays: their programs compile in this task's round."""
  key = _trainable_key(study, plan.k)
  return [j for j in range(plan.k + 1, len(study.tasks))
          if _trainable_key(study, j) == key
          and set(study.task_data[j].train) == set(plan.arrays)]


def _later_batches(study: Study, plan: TaskPlan) -> list[dict]:
  """One batch of each shape that the later tasks with task ``plan.k``'s trainable
  parameters will train on (their own data, as a plain run draws it), so that their
  programs compile in this task's round, before its first step. A method whose
  ``train_arrays`` add arrays (generative replay's LM rows), or whose state changes
  shape, compiles what is left at that task's start."""
  cfg = study.cfg
  later = itertools.chain.from_iterable(
      loop.epoch_batches(study.task_data[j].train, cfg.batch_size, epochs=cfg.epochs,
                         seed=(cfg.seed, j), buckets=study.buckets)
      for j in later_tasks_alike(study, plan))
  return list(data_lib.one_batch_per_shape(later))


def other_programs(study: Study, plan: TaskPlan, state) -> list[tuple]:
  """The programs besides the train step that the rest of the task (and the later
  tasks alike) calls with ``state``'s shapes: the evaluation of each test (and
  validation) batch shape, the finiteness check of a checkpoint inside a task (if
  ``checkpoint_every``) and at its end (no optimizer state), and what the method's
  ``after_task`` will call (its ``programs`` hook, with each after-task context)."""
  splits = ("test", "val") if study.cfg.num_val else ("test",)
  batches = [b for split in splits for b in split_batches(study, split)]
  inside = [(checkpoint.all_finite, (state,))] if study.cfg.checkpoint_every else []
  ends = [(plan.k, plan.arrays)] + [(j, study.task_data[j].train)
                                    for j in later_tasks_alike(study, plan)]
  hooks = [p for j, arrays in ends for p in study.method.declares.programs(
      state.method_state, tasks_lib.hook_context(
          task_context(study, j), "after_task", study.base_rng, params=state.params,
          train=arrays))]
  return ([(study.eval_fn, args)
           for args in eval_programs(study, state.params, state.method_state, batches)]
          + inside + [(checkpoint.all_finite, (state._replace(opt_state=()),))]  # task end
          + hooks)


class TaskHooks(NamedTuple):
  """A task's per-step bookkeeping, the same alone and side by side: ``advance(step in
  task) -> global step`` records each step, ``periodic`` is the work every N global
  steps (an evaluation for the curve, a checkpoint), ``finish()`` closes the task's
  training (its time, its divergence check)."""
  advance: Callable[[int], int]
  periodic: tuple[loop.Periodic, ...]
  finish: Callable[[], None]


def task_hooks(study: Study, plan: TaskPlan, record: RunRecord,
               logger: StepLogger) -> TaskHooks:
  """Task ``plan.k``'s :class:`TaskHooks` (the logger told the task has started): an
  evaluation of every task each ``eval_every`` global steps, a checkpoint each
  ``checkpoint_every``, its training time in ``record``."""
  cfg, k = study.cfg, plan.k
  logger.start_task(k, study.tasks[k].name, plan.total_steps,
                    lambda s: plan.schedule(min(s, plan.total_steps) // cfg.grad_accum_steps))
  clock, task = loop.Stopwatch(), record.tasks[k]

  def advance(step_in_task: int) -> int:
    record.global_step, record.step_in_task = record.global_step + 1, step_in_task
    return record.global_step

  def evaluate(state) -> None:
    acc, task_acc, _ = evaluate_all(study, state.params, state.method_state)
    record.curve.append({"global_step": record.global_step, "task": k, "accuracy": acc,
                         "task_aware_accuracy": task_acc})
    logger.evaluation(record.global_step, k, {t.name: a for t, a in zip(study.tasks, acc)})

  def save(state) -> None:
    task.train_seconds += clock.lap()
    save_checkpoint(study, state, record)

  def finish() -> None:
    task.train_seconds += clock.lap()
    check_divergence(study, record, logger)
  return TaskHooks(advance, (loop.Periodic(cfg.eval_every, evaluate),
                             loop.Periodic(cfg.checkpoint_every, save)), finish)


def train_task(study: Study, plan: TaskPlan, state, record: RunRecord, logger: StepLogger):
  """Trains task ``plan.k`` from ``record.step_in_task`` to its end (``state`` from
  :func:`start_task`) on :func:`loop.train_loop`, with the task's hooks
  (:func:`task_hooks`)."""
  cfg, k = study.cfg, plan.k
  logging.info("Task %d/%d %s: %d examples, %d steps of batch %d (%s).", k + 1,
               len(study.tasks), study.tasks[k].name, data_lib.size(plan.arrays),
               plan.total_steps, cfg.batch_size, study.method.name)
  hooks = task_hooks(study, plan, record, logger)

  def batches(start: int):   # each epoch shuffled by (seed, task, epoch)
    return loop.epoch_batches(plan.arrays, cfg.batch_size, epochs=cfg.epochs,
                              seed=(cfg.seed, k), start=start, buckets=study.buckets)

  state = loop.train_loop(
      train_program(study, k), state, batches, ahead=_later_batches(study, plan),
      programs=other_programs(study, plan, state), start=record.step_in_task,
      total=plan.total_steps, logger=logger, advance=hooks.advance, periodic=hooks.periodic,
      stop_after=cfg.stop_after_steps,
      put=functools.partial(sharding.shard_batch, mesh=study.mesh))
  hooks.finish()
  return state


def check_divergence(study: Study, record: RunRecord, logger: StepLogger) -> None:
  """A task whose loss diverged: an error (``--stop_on_divergence``) or a warning
  kept in the results."""
  diverged = logger.divergence()
  if diverged and study.cfg.stop_on_divergence:
    raise FloatingPointError(f"{diverged} Stopped (--stop_on_divergence); nothing after the "
                             f"last checkpoint (global step {study.checkpointer.latest_step()})"
                             " was saved.")
  if diverged:
    logging.warning("%s", diverged)
    record.warnings.append(diverged)


def _evaluate_end(study: Study, k: int, state, record: RunRecord) -> None:
  """Every task's test (and validation) accuracy after task k, into its record."""
  t0, task = time.time(), record.tasks[k]
  task.accuracy, task.task_aware_accuracy, task.task_inference_accuracy = evaluate_all(
      study, state.params, state.method_state)
  if study.cfg.num_val:  # validation splits (carved from training data): for strengths
    task.val_accuracy, task.val_task_aware_accuracy, _ = evaluate_all(
        study, state.params, state.method_state, split="val")
  record.eval_seconds += time.time() - t0


def finish_task(study: Study, plan: TaskPlan, state, record: RunRecord, logger: StepLogger):
  """The task protocol's ``end_task`` (the method's consolidation; the params keep
  their sharding), then every task evaluated, the task's record filled and a
  checkpoint saved."""
  t0, k, task = time.time(), plan.k, record.tasks[plan.k]
  moments = sum(x.nbytes for x in jax.tree.leaves(state.opt_state))
  ended = tasks_lib.end_task(study.method, state, task_context(study, k, record), plan,
                             rng=study.base_rng)
  if ended.params is not state.params:
    ended = ended._replace(params=jax.device_put(
        ended.params, sharding.param_shardings(study.mesh, ended.params)))
  state = ended
  task.method_seconds = time.time() - t0
  _evaluate_end(study, k, state, record)
  task.steps = plan.total_steps
  # what the method says it trained (DEN: a part of what its mask leaves trainable)
  trained = [r["parameters_trained"] for r in record.method_reports
             if r.get("task") == k and "parameters_trained" in r]
  task.trainable_parameters = trained[-1] if trained else count_params(
      study.param_shapes, tasks_lib.trainable_mask(study.method, study.param_shapes, k))
  task.state_bytes = int(moments + sum(x.nbytes for x in jax.tree.leaves(state)))
  record.curve.append({"global_step": record.global_step, "task": k, "accuracy": task.accuracy,
                       "task_aware_accuracy": task.task_aware_accuracy})
  logger.evaluation(record.global_step, k,
                    {t.name: a for t, a in zip(study.tasks, task.accuracy)})
  logging.info("After task %d (%s): accuracy %s | task-aware %s", k, study.tasks[k].name,
               fmt_accs(study.tasks, task.accuracy),
               fmt_accs(study.tasks, task.task_aware_accuracy))
  record.task, record.step_in_task = k + 1, 0
  save_checkpoint(study, state, record)
  return state


def run(cfg: StudyConfig, workdir: str, *, resume: bool = False,
        flags: dict | None = None) -> dict:
  """Runs the sequential study and returns the results dict (also in results.json,
  with the run's own flags in ``run.flags``); ``flags``: the flags of the program that
  runs it, recorded as ``command_flags`` (the run's own are its config's)."""
  t_start = time.time()
  run_code_version()   # the code this run starts with, read before any work
  with CompileTimer() as compiling:
    study = setup(cfg, workdir, resume)
    state, record = start(study, resume)
    logger = run_lib.open_logger(workdir, record.global_step, cfg.log_every,
                                 study.checkpointer, enabled=study.writes_files,
                                 on_first_step=compiling.mark)
    try:
      for k in range(record.task, len(study.tasks)):
        state, plan = start_task(study, k, state, record)
        state = train_task(study, plan, state, record, logger)
        state = finish_task(study, plan, state, record, logger)
    finally:
      logger.close()
      study.checkpointer.close()
  results = make_results(study, record, flags, time.time() - t_start)
  results["timing"].update(compiling.summary())
  results["timing"].update(checkpoint.timing(study.checkpointer))
  if study.writes_files:
    t0 = time.time()
    write_results(results, workdir)
    logging.info("Results and figures written in %.1f s.", time.time() - t0)
  return results
