"""The sequential study: train on each task in turn, evaluate every task after each.

``run(config, workdir)`` writes ``results.json`` (the accuracy matrices and their
metrics), ``metrics.jsonl`` (step metrics), figures and TensorBoard scalars, and
orbax checkpoints from which ``run(..., resume=True)`` continues exactly.

The study is a handful of named stages over explicit state, on the loop that LM
training shares (:mod:`cljax.train.loop`): :func:`setup` builds what is built once (a
:class:`Study`), :func:`restore_or_start` gives the train state and the
:class:`RunRecord` (the run's progress, stored as JSON in every checkpoint), and for
each task :func:`begin_task` (the method's ``before_task`` and a fresh optimizer when
the task starts afresh; the task's :class:`TaskPlan` in any case), :func:`train_task`
and :func:`end_task`.
"""

from __future__ import annotations

import functools
import itertools
import time

from absl import logging
import jax
import jax.numpy as jnp

from cljax import data as data_lib
from cljax.methods import TaskContext
from cljax.study.config import StudyConfig
from cljax.study.evaluation import eval_programs, evaluate_all, split_batches
from cljax.study.results import (count_params, fmt_accs, make_results, run_code_version,
                                 write_results)
from cljax.study.setup import (AFTER_TASK_SALT, BEFORE_TASK_SALT, TRAIN_ARRAYS_SALT, RunRecord,
                               Study, TaskPlan, setup)
from cljax.train import checkpoint
from cljax.train import loop
from cljax.train import optim
from cljax.train import run as run_lib
from cljax.train import sharding
from cljax.train import steps
from cljax.train.progress import CompileTimer, StepLogger



# ----------------------------------------------------------------------------
# A task's context, plan and state
# ----------------------------------------------------------------------------

def task_context(study: Study, k: int, params=None, train=None, salt: int = 0,
                 record: RunRecord | None = None, method_state=None) -> TaskContext:
  """The host hooks' view of task k (``salt`` picks the hook's random key); their
  reports go into ``record``."""
  def report(entry: dict) -> None:
    if record is not None:
      record.method_reports.append({"task": k, "task_name": study.tasks[k].name, **entry})
  return TaskContext(
      task_index=k, task_name=study.tasks[k].name, params=params,
      train=study.task_data[k].train if train is None else train, model=study.model,
      rng=jax.random.fold_in(study.base_rng, salt + k), batch_size=study.cfg.batch_size,
      previous_train=tuple(d.train for d in study.task_data[:k]),
      method_state=method_state, tasks=tuple(study.tasks), tokenizer=study.tokenizer,
      report=report, length_buckets=study.buckets)


def trainable_mask(study: Study, k: int):
  """The method's trainable parameters while task k trains (None: all of them)."""
  if study.method.trainable is None:
    return None
  return study.method.trainable(study.param_shapes, k)


def _mask_key(study: Study, k: int) -> tuple | None:
  """Task k's set of trainable parameters, hashable: tasks that agree on it share
  their optimizer's structure, and so their compiled train steps."""
  mask = trainable_mask(study, k)
  return None if mask is None else tuple(jax.tree.leaves(mask))


def _optimizer(study: Study, updates: int, k: int):
  """(optimizer, the learning rate on the host) for task k of ``updates`` updates."""
  cfg = study.cfg
  return optim.make_optimizer(
      learning_rate=cfg.learning_rate, total_steps=updates, warmup_steps=cfg.warmup_steps,
      weight_decay=cfg.weight_decay, max_grad_norm=cfg.max_grad_norm,
      grad_accum_steps=cfg.grad_accum_steps, trainable_mask=trainable_mask(study, k))


def plan_task(study: Study, k: int, method_state) -> TaskPlan:
  """Task k's training arrays (the method's ``train_arrays``, given its state after
  ``before_task``) and optimizer."""
  cfg = study.cfg
  arrays = study.method.train_arrays(task_context(study, k, salt=TRAIN_ARRAYS_SALT,
                                                  method_state=method_state))
  batches_per_epoch = data_lib.num_batches(data_lib.size(arrays), cfg.batch_size)
  tx, schedule = _optimizer(study, loop.update_count(batches_per_epoch, cfg.epochs,
                                                     cfg.grad_accum_steps), k)
  return TaskPlan(k, arrays, tx, schedule, batches_per_epoch, batches_per_epoch * cfg.epochs)


def _train_fn(study: Study, plan: TaskPlan, state):
  """The jitted, sharded train step of task ``plan.k``: one per set of trainable
  parameters, whatever the task's length (the schedule's length is a value in the
  optimizer state, :func:`optim.make_optimizer`)."""
  key = ("step", _mask_key(study, plan.k))
  if key not in study.compiled:
    shardings = sharding.state_shardings(study.mesh, state, study.param_shapes)
    study.compiled[key] = jax.jit(
        functools.partial(steps.train_step, model=study.model, tx=plan.tx,
                          method=study.method, dropout_rng=study.cfg.dropout_rng),
        in_shardings=(shardings, sharding.batch_sharding(study.mesh)),
        out_shardings=(shardings, sharding.replicated(study.mesh)), donate_argnums=0)
  return study.compiled[key]


def fresh_state(study: Study, k: int, params, method_state, tx) -> steps.TrainState:
  """Task k's starting state: ``params``, a fresh optimizer ``tx`` (None: no optimizer
  state, as between tasks), the method's state."""
  state = steps.init_train_state(params, tx, jax.random.fold_in(study.base_rng, k),
                                 study.method, method_state)
  if tx is None:
    state = state._replace(opt_state=())
  return jax.device_put(state, sharding.state_shardings(study.mesh, state,
                                                        study.param_shapes))


# ----------------------------------------------------------------------------
# The stages
# ----------------------------------------------------------------------------

def _restore_target(study: Study, meta: dict):
  """The abstract state a checkpoint with ``meta`` holds: inside task k, the task's
  optimizer (its frozen parameters have no optimizer state); at a task boundary, none
  (:func:`end_task` does not save moments the next task would discard). The method's
  arrays (generated pseudo-data) take the shapes they were saved with."""
  boundary = meta["step_in_task"] == 0
  tx = _optimizer(study, 1, meta["task"])[0] if not boundary else None  # on the host
  abstract = jax.eval_shape(lambda: fresh_state(
      study, 0, study.initial_params, study.method.init(study.initial_params), tx))
  return jax.tree.map(lambda a, sh: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sh),
                      abstract, sharding.state_shardings(study.mesh, abstract,
                                                         study.param_shapes))


def _start(study: Study) -> tuple[steps.TrainState, RunRecord]:
  """The initial state (no optimizer yet: :func:`begin_task` gives each task its own)
  and a new record holding the accuracy before any training."""
  t0 = time.time()
  params = study.initial_params
  acc, task_acc, _ = evaluate_all(study, params, study.method.init(params))
  record = RunRecord(baseline=acc, task_aware_baseline=task_acc, eval_seconds=time.time() - t0,
                     config=study.cfg.to_dict(), warnings=list(study.warnings),
                     curve=[{"global_step": 0, "task": -1, "accuracy": acc,
                             "task_aware_accuracy": task_acc}])
  logging.info("Before training: accuracy %s", fmt_accs(study.tasks, acc))
  return steps.TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=(),
                          rng=study.base_rng, method_state=study.method.init(params)), record


def start(study: Study, resume: bool = False) -> tuple[steps.TrainState, RunRecord]:
  """The latest checkpoint's state and record (``resume``), or the initial state and
  a new record holding the accuracy before any training."""
  state, record = run_lib.restore_or_start(
      study.checkpointer, resume, target=functools.partial(_restore_target, study),
      record_cls=RunRecord, start=functools.partial(_start, study),
      saved_shapes_under="method_state")
  return state, record


def save_checkpoint(study: Study, state, record: RunRecord) -> None:
  """Saves ``state`` at ``record.global_step`` (never a non-finite one)."""
  checkpoint.save_finite(study.checkpointer, record.global_step, state, record.to_json())


def begin_task(study: Study, k: int, state, record: RunRecord
               ) -> tuple[steps.TrainState, TaskPlan]:
  """Task k's state and :class:`TaskPlan`. A task that starts afresh (not inside it,
  from a checkpoint) first shows the method the params it starts from
  (``before_task``), and gets a fresh optimizer, as a new Hugging Face Trainer per task
  in the original study: the caller drops the previous state (its optimizer moments
  are not carried over)."""
  if record.step_in_task:
    return state, plan_task(study, k, state.method_state)
  ctx = task_context(study, k, state.params, salt=BEFORE_TASK_SALT, record=record)
  mstate = study.method.before_task(state.method_state, ctx)
  record.train_seconds.append(0.0)
  plan = plan_task(study, k, mstate)
  return fresh_state(study, k, state.params, mstate, plan.tx), plan


def _evaluate_mid_task(study: Study, k: int, state, record: RunRecord, logger) -> None:
  acc, task_acc, _ = evaluate_all(study, state.params, state.method_state)
  record.curve.append({"global_step": record.global_step, "task": k, "accuracy": acc,
                       "task_aware_accuracy": task_acc})
  logger.evaluation(record.global_step, k, {t.name: a for t, a in zip(study.tasks, acc)})


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
      for j in _later_tasks_alike(study, plan))
  return list(data_lib.one_batch_per_shape(later))


def _later_tasks_alike(study: Study, plan: TaskPlan) -> list[int]:
  """The later tasks that share task ``plan.k``'s trainable parameters and kind of
  arrays: their programs compile in this task's round."""
  key = _mask_key(study, plan.k)
  return [j for j in range(plan.k + 1, len(study.tasks))
          if _mask_key(study, j) == key and set(study.task_data[j].train) == set(plan.arrays)]


def _other_programs(study: Study, state) -> list[tuple]:
  """The programs besides the train step that the rest of the run calls with
  ``state``'s shapes: the evaluation of each test (and validation) batch shape, the
  finiteness check of a checkpoint inside a task (if ``checkpoint_every``) and at its
  end (no optimizer state)."""
  splits = ("test", "val") if study.cfg.num_val else ("test",)
  batches = [b for split in splits for b in split_batches(study, split)]
  inside = [(checkpoint.all_finite, (state,))] if study.cfg.checkpoint_every else []
  return ([(study.eval_fn, args)
           for args in eval_programs(study, state.params, state.method_state, batches)]
          + inside + [(checkpoint.all_finite, (state._replace(opt_state=()),))])  # task end


def _hook_programs(study: Study, plan: TaskPlan, state) -> list[tuple]:
  """The programs the method's ``after_task`` will call at the end of this task and of
  the later tasks that share its trainable parameters and kind of arrays (its
  ``programs`` hook, with each after-task context: the same data and key)."""
  tasks = [(plan.k, plan.arrays)] + [(j, study.task_data[j].train)
                                     for j in _later_tasks_alike(study, plan)]
  return [p for j, arrays in tasks for p in study.method.programs(
      state.method_state, task_context(study, j, state.params, arrays, salt=AFTER_TASK_SALT))]


def train_task(study: Study, plan: TaskPlan, state, record: RunRecord, logger: StepLogger):
  """Trains task ``plan.k`` from ``record.step_in_task`` to its end (``state`` from
  :func:`begin_task`); evaluates every ``eval_every`` and checkpoints every
  ``checkpoint_every`` steps, on :func:`loop.train_loop`."""
  cfg, k = study.cfg, plan.k
  logging.info("Task %d/%d %s: %d examples, %d steps of batch %d (%s).", k + 1,
               len(study.tasks), study.tasks[k].name, data_lib.size(plan.arrays),
               plan.total_steps, cfg.batch_size, study.method.name)
  logger.start_task(k, study.tasks[k].name, plan.total_steps,
                    lambda s: plan.schedule(min(s, plan.total_steps) // cfg.grad_accum_steps))
  clock = loop.Stopwatch()

  def advance(step_in_task: int) -> int:
    record.global_step, record.step_in_task = record.global_step + 1, step_in_task
    return record.global_step

  def save(state) -> None:
    record.train_seconds[-1] += clock.lap()
    save_checkpoint(study, state, record)

  def batches(start: int):   # each epoch shuffled by (seed, task, epoch)
    return loop.epoch_batches(plan.arrays, cfg.batch_size, epochs=cfg.epochs,
                              seed=(cfg.seed, k), start=start, buckets=study.buckets)

  state = loop.train_loop(
      _train_fn(study, plan, state), state, batches, ahead=_later_batches(study, plan),
      programs=_other_programs(study, state) + _hook_programs(study, plan, state),
      start=record.step_in_task, total=plan.total_steps, logger=logger, advance=advance,
      periodic=(loop.Periodic(cfg.eval_every, functools.partial(
                    _evaluate_mid_task, study, k, record=record, logger=logger)),
                loop.Periodic(cfg.checkpoint_every, save)),
      stop_after=cfg.stop_after_steps,
      put=functools.partial(sharding.shard_batch, mesh=study.mesh))
  record.train_seconds[-1] += clock.lap()
  _check_divergence(study, record, logger)
  return state


def _check_divergence(study: Study, record: RunRecord, logger: StepLogger) -> None:
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


def _consolidate(study: Study, plan: TaskPlan, state, record: RunRecord):
  """The method's consolidation after task ``plan.k``: ``after_task``, then
  ``adjust_params`` (weight aligning; the params keep their sharding)."""
  ctx = task_context(study, plan.k, state.params, plan.arrays, salt=AFTER_TASK_SALT,
                     record=record)
  state = state._replace(method_state=study.method.after_task(state.method_state, ctx))
  params = study.method.adjust_params(state.method_state, ctx._replace(params=state.params))
  if params is not state.params:
    state = state._replace(params=jax.device_put(
        params, sharding.param_shardings(study.mesh, params)))
  return state


def end_task(study: Study, plan: TaskPlan, state, record: RunRecord, logger: StepLogger):
  """The method's consolidation, then every task evaluated, the row recorded and a
  checkpoint saved."""
  t0, k = time.time(), plan.k
  state = _consolidate(study, plan, state, record)
  record.method_seconds.append(time.time() - t0)
  t0 = time.time()
  acc, task_acc, inference = evaluate_all(study, state.params, state.method_state)
  if inference is not None:
    record.inference_rows.append(inference)
  if study.cfg.num_val:  # validation splits (carved from training data): for strengths
    val, val_task, _ = evaluate_all(study, state.params, state.method_state, split="val")
    record.val_rows.append(val)
    record.val_task_rows.append(val_task)
  record.eval_seconds += time.time() - t0
  record.rows.append(acc)
  record.task_rows.append(task_acc)
  record.steps_per_task.append(plan.total_steps)
  record.trainable_parameters.append(count_params(study.param_shapes, trainable_mask(study, k)))
  record.state_bytes.append(int(sum(x.nbytes for x in jax.tree.leaves(state))))
  record.curve.append({"global_step": record.global_step, "task": k, "accuracy": acc,
                       "task_aware_accuracy": task_acc})
  logger.evaluation(record.global_step, k, {t.name: a for t, a in zip(study.tasks, acc)})
  logging.info("After task %d (%s): accuracy %s | task-aware %s", k, study.tasks[k].name,
               fmt_accs(study.tasks, acc), fmt_accs(study.tasks, task_acc))
  record.task, record.step_in_task = k + 1, 0
  state = state._replace(opt_state=())   # the next task starts a fresh optimizer
  save_checkpoint(study, state, record)
  return state


def run(cfg: StudyConfig, workdir: str, *, resume: bool = False,
        flags: dict | None = None) -> dict:
  """Runs the sequential study and returns the results dict (also in results.json)."""
  t_start = time.time()
  run_code_version()   # the code this run starts with, read before any work
  with CompileTimer() as compiling:
    study = setup(cfg, workdir, resume)
    state, record = start(study, resume)
    logger = run_lib.open_logger(workdir, record.global_step, cfg.log_every, study.checkpointer,
                              enabled=study.writes_files, on_first_step=compiling.mark)
    try:
      for k in range(record.task, len(study.tasks)):
        state, plan = begin_task(study, k, state, record)
        state = train_task(study, plan, state, record, logger)
        state = end_task(study, plan, state, record, logger)
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
