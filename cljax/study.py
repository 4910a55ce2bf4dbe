"""The sequential study: train on each task in turn, evaluate every task after each.

``run(config, workdir)`` writes ``results.json`` (the accuracy matrices and their
metrics), ``metrics.jsonl`` (step metrics), figures and TensorBoard scalars, and
orbax checkpoints from which ``run(..., resume=True)`` continues exactly.

The loop is a handful of named stages over explicit state: :func:`setup` builds what
is built once (a :class:`Study`), :func:`restore_or_start` gives the train state and
the :class:`RunRecord` (the run's progress, stored as JSON in every checkpoint), and
for each task :func:`begin_task` (when it starts afresh), :func:`train_task` and
:func:`end_task`.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import json
import os
import platform
import time
from typing import Any, NamedTuple
from collections.abc import Callable

from absl import logging
import jax
import jax.numpy as jnp
import numpy as np
import optax

from cljax import data as data_lib
from cljax import hf
from cljax import metrics as metrics_lib
from cljax import sharding
from cljax import steps
from cljax import checkpoint
from cljax.checkpoint import Checkpointer
from cljax.config import StudyConfig
from cljax.methods import BuildContext, Method, TaskContext
from cljax.methods import build as build_method
from cljax.methods import registry as method_registry
from cljax.model import (GPT2Classifier, GPT2LabelWords, add_peft_params, add_token_embeddings,
                         random_params)
from cljax.progress import CompileTimer, Interrupted, StepLogger, Writers, drop_records_after

__all__ = ["StudyConfig", "Study", "RunRecord", "Interrupted", "run", "setup", "begin_task",
           "restore_or_start", "evaluate_all", "train_task", "end_task"]


# ----------------------------------------------------------------------------
# What is built once, and what a run has done so far
# ----------------------------------------------------------------------------

@dataclasses.dataclass
class RunRecord:
  """The run's progress; every checkpoint stores it as JSON beside the train state."""
  task: int = 0                    # the task being trained (len(tasks) when done)
  step_in_task: int = 0            # steps of that task already taken
  global_step: int = 0
  rows: list = dataclasses.field(default_factory=list)        # accuracy after each task
  task_rows: list = dataclasses.field(default_factory=list)   # task-aware accuracy
  val_rows: list = dataclasses.field(default_factory=list)    # validation (--num_val)
  val_task_rows: list = dataclasses.field(default_factory=list)
  baseline: list = dataclasses.field(default_factory=list)    # accuracy before training
  task_aware_baseline: list = dataclasses.field(default_factory=list)
  curve: list = dataclasses.field(default_factory=list)       # evaluations through the run
  train_seconds: list = dataclasses.field(default_factory=list)   # per task
  eval_seconds: float = 0.0
  method_seconds: list = dataclasses.field(default_factory=list)  # after_task, per task
  steps_per_task: list = dataclasses.field(default_factory=list)
  config: dict = dataclasses.field(default_factory=dict)     # the run's StudyConfig
  warnings: list = dataclasses.field(default_factory=list)   # e.g. a diverged task
  method_reports: list = dataclasses.field(default_factory=list)  # from the host hooks
  inference_rows: list = dataclasses.field(default_factory=list)  # per-task modules
  trainable_parameters: list = dataclasses.field(default_factory=list)   # per task
  state_bytes: list = dataclasses.field(default_factory=list)   # train state, per task

  def to_json(self) -> dict:
    return dataclasses.asdict(self)

  @classmethod
  def from_json(cls, d: dict) -> RunRecord:
    names = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in d.items() if k in names and v is not None})


class TaskPlan(NamedTuple):
  """How one task trains: its arrays, optimizer, schedule and number of steps."""
  arrays: dict[str, np.ndarray]
  tx: optax.GradientTransformation
  schedule: Callable
  batches_per_epoch: int
  total_steps: int


@dataclasses.dataclass(frozen=True)
class Study:
  """What a run builds once. ``initial_params`` feed the first task's state (its
  buffers are donated to the first step; afterwards only ``param_shapes`` is used)."""
  cfg: StudyConfig
  workdir: str
  tasks: list                      # data_lib.Task, in training order
  task_data: list                  # data_lib.TaskData, same order
  model: Any
  initial_params: Any
  param_shapes: Any
  method: Method
  mesh: Any
  eval_fn: Callable
  checkpointer: Checkpointer
  base_rng: jax.Array
  writes_files: bool               # process 0 of a multi-host run (or the only one)
  tokenizer: Any = None            # with the method's tokens added
  buckets: tuple[int, ...] = ()    # the lengths batches are padded to (--length_bucket)
  warnings: tuple[str, ...] = ()   # about the data (a single-class training set)
  compiled: dict = dataclasses.field(default_factory=dict)   # plans and train steps


# ----------------------------------------------------------------------------
# Building blocks
# ----------------------------------------------------------------------------

def build_model(cfg: StudyConfig, tokenizer, num_labels: int, label_tokens=None):
  """(model, params): pretrained weights or a random init of a named size; with
  ``label_tokens`` (``--head=lm``) a :class:`GPT2LabelWords` over the LM's weights."""
  overrides = cfg.config_overrides()
  if cfg.init == "pretrained":
    if label_tokens is not None:
      lm, params = hf.load_lm(cfg.model, dtype=cfg.dtype, num_labels=num_labels, **overrides)
      model = GPT2LabelWords(lm.config, label_tokens)
    else:
      model, params = hf.load_pretrained(cfg.model, num_labels=num_labels, dtype=cfg.dtype,
                                         seed=cfg.seed, **overrides)
    cfg.check_vocabulary(model.config, tokenizer)
    if model.config.pad_token_id != tokenizer.pad_token_id:
      raise ValueError(f"The model's pad id {model.config.pad_token_id} differs from the "
                       f"tokenizer's {tokenizer.pad_token_id}; use the model's tokenizer.")
    return model, params
  if cfg.init != "random":
    raise ValueError(f"Unknown init {cfg.init!r}; expected 'pretrained' or 'random'.")
  config = cfg.random_init_config(tokenizer, cfg.max_length, num_labels=num_labels)
  model = (GPT2Classifier(config) if label_tokens is None
           else GPT2LabelWords(config, label_tokens))
  return model, random_params(model, jax.random.PRNGKey(cfg.seed))


def evaluate(eval_fn, params, batches, mesh=None
             ) -> tuple[float, float, float, dict[str, float]]:
  """(class-incremental accuracy, task-aware accuracy, mean loss, the method's own
  rates such as ``task_inference``) over every example of ``batches`` (host batches:
  :func:`data.eval_batches`)."""
  totals = steps.accumulate(eval_fn, params, (
      b if mesh is None else sharding.shard_batch(b, mesh) for b in batches))
  n = float(totals["count"])
  own = {k[:-len("_correct")]: float(v) / n for k, v in totals.items()
         if k not in ("correct", "task_correct", "loss_sum", "count")}
  return float(totals["correct"]) / n, float(totals["task_correct"]) / n, float(
      totals["loss_sum"]) / n, own


def setup(cfg: StudyConfig, workdir: str, resume: bool = False) -> Study:
  """Loads the tokenizer, the model (checked against the tokenizer), the method and
  then the data; builds the mesh, the compiled evaluation and the checkpointer.

  The config was checked when it was made; a workdir that holds another run, a
  changed setting on resume, a bad model or tokenizer fail before the data is read,
  and nothing is written before the first checkpoint."""
  method_registry.parse(cfg.method)  # still registered?
  if cfg.distributed:
    sharding.initialize_distributed()
  mesh = sharding.make_mesh(cfg.mesh_data, cfg.mesh_model)
  sharding.check_batch_size(cfg.batch_size, mesh)
  sharding.check_batch_size(cfg.eval_batch_size, mesh, "--eval_batch_size")
  ckpt = checkpoint.open_run(workdir, resume_view(cfg), resume, keep=cfg.keep_checkpoints,
                             outputs=OUTPUTS, resumable=RESUMABLE_CHANGES)
  cache_dir = cfg.cache_dir or os.path.join(os.path.expanduser("~"), ".cache", "cljax")
  if not jax.config.jax_compilation_cache_dir:   # a sweep sets its own
    jax.config.update("jax_compilation_cache_dir", os.path.join(cache_dir, "xla"))
  tokenizer = hf.load_tokenizer(cfg.tokenizer or cfg.model)
  tasks = data_lib.resolve_tasks(cfg.tasks, cfg.task_classes(), cfg.data_dir,
                                 cfg.task_label_words())
  total_labels = data_lib.num_labels(tasks)
  as_text = cfg.head == "lm"
  model, params = build_model(cfg, tokenizer, total_labels,
                              data_lib.label_tokens(tasks, tokenizer) if as_text else None)
  method = build_method(cfg.method, cfg.method_config, BuildContext(
      num_labels=total_labels, num_tasks=len(tasks), max_length=cfg.max_length,
      n_layer=model.config.n_layer, head=cfg.head, first_new_token=len(tokenizer),
      eos_token_id=tokenizer.eos_token_id, n_embd=model.config.n_embd,
      pad_token_id=tokenizer.pad_token_id,
      answer_tokens=data_lib.answer_tokens(tasks, tokenizer) if as_text else 1))
  if method.tokens:
    model, params = add_method_tokens(model, params, tokenizer, method.tokens)
  if method.model_options:
    model, params = add_method_modules(model, params, dict(method.model_options), cfg.seed)
  if method.answer_marker:
    tasks = [dataclasses.replace(t, prompt=(t.prompt[0], t.prompt[1] + method.answer_marker))
             for t in tasks]
  task_data = data_lib.load_task_data(
      tasks, tokenizer, data_dir=cfg.data_dir, num_train=cfg.num_train,
      num_test=cfg.num_test, num_val=cfg.num_val, subset=cfg.subset,
      max_length=cfg.max_length, seed=cfg.seed, as_text=as_text,
      cache_dir=cache_dir)
  params = jax.device_put(params, sharding.param_shardings(mesh, params))
  eval_fn = jax.jit(lambda p, b, method_state: steps.eval_step(
      p, b, model=model, method=method, method_state=method_state),
                    in_shardings=(sharding.param_shardings(mesh, params),
                                  sharding.batch_sharding(mesh), sharding.replicated(mesh)),
                    out_shardings=sharding.replicated(mesh))
  return Study(cfg=cfg, workdir=workdir, tasks=tasks, task_data=task_data, model=model,
               initial_params=params, param_shapes=jax.eval_shape(lambda: params),
               method=method, mesh=mesh, eval_fn=eval_fn,
               checkpointer=ckpt or Checkpointer(os.path.join(workdir, "checkpoints"),
                                                 cfg.keep_checkpoints),
               base_rng=jax.random.PRNGKey(cfg.seed),
               warnings=tuple(data_lib.class_warnings(task_data)),
               writes_files=jax.process_index() == 0, tokenizer=tokenizer,
               buckets=data_lib.length_buckets(cfg.max_length, cfg.length_bucket))


def add_method_tokens(model, params, tokenizer, tokens: tuple[str, ...]):
  """(model, params) with the method's tokens added to ``tokenizer`` (in place) and
  their ``wte`` rows grown (the mean embedding, :func:`model.add_token_embeddings`)."""
  first = len(tokenizer)
  tokenizer.add_tokens(list(tokens), special_tokens=True)
  ids = tokenizer.convert_tokens_to_ids(list(tokens))
  if ids != list(range(first, first + len(tokens))):
    raise ValueError(f"The tokenizer already holds some of the tokens {list(tokens)} that "
                     f"the method adds (ids {ids}); use a tokenizer without them.")
  params, config = add_token_embeddings(params, model.config, ids, first)
  logging.info("Added tokens %s (ids %d..%d) with the mean embedding.", list(tokens), first,
               first + len(tokens) - 1)
  return model.clone(config=config), params


def add_method_modules(model, params, options: dict, seed: int):
  """(model, params) with the modules a method asks for (``model_options``: LoRA,
  adapters), their parameters freshly initialized; the others kept as they are."""
  model = model.clone(config=model.config.replace(**options))
  params = add_peft_params(model, params, jax.random.fold_in(jax.random.PRNGKey(seed), 7))
  logging.info("Added the method's modules (%s): %d parameters.",
               ", ".join(f"{k}={v}" for k, v in options.items()),
               sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params)))
  return model, params


# What a run writes beside its checkpoints.
OUTPUTS = ("results.json", "metrics.jsonl", "tensorboard", "accuracy_matrix.png",
           "accuracy_curve.png", "generated_samples.txt")

# Settings that change only logging, outputs, evaluation batching or the device layout:
# a resumed run may change them (the new values are recorded).
RESUMABLE_CHANGES = frozenset({
    "checkpoint_every", "keep_checkpoints", "log_every", "eval_every", "stop_after_steps",
    "cache_dir", "eval_batch_size", "mesh_data", "mesh_model", "distributed", "remat",
    "stop_on_divergence"})


def resume_view(cfg: StudyConfig) -> dict:
  """The settings a resume compares: ``cfg.to_dict()`` with ``method_config`` cut to
  the hyperparameters the run's methods read (one added since, for another method,
  does not block a resume; one of this run's that its checkpoint lacks does)."""
  view = cfg.to_dict()
  parts = set(method_registry.parse(cfg.method))
  view["method_config"] = {k: v for k, v in view["method_config"].items()
                           if parts & set(method_registry.users(k))}
  return view


class Scores(NamedTuple):
  """Accuracy on every task: class-incremental, task-aware, and (per-task modules) how
  often the task was inferred right (None for other methods)."""
  acc: list
  task_acc: list
  inference: list | None


def evaluate_all(study: Study, params, method_state=(), split: str = "test") -> Scores:
  """The :class:`Scores` on every task's ``split`` (test or val); ``method_state``
  reaches a method's ``eval_logits`` (per-task modules)."""
  if study.method.eval_logits is None:
    method_state = ()
  # In order of length, each batch cut to its bucket; every bucket's program compiled at once.
  batches = [list(data_lib.eval_batches(getattr(d, split), study.cfg.eval_batch_size,
                                        study.buckets)) for d in study.task_data]
  steps.compile_ahead(study.eval_fn, [
      (params, sharding.shard_batch(b, study.mesh), method_state)
      for b in data_lib.one_batch_per_shape(itertools.chain.from_iterable(batches))])

  def fn(params, batch):
    return study.eval_fn(params, batch, method_state)
  rows = [evaluate(fn, params, task_batches, study.mesh) for task_batches in batches]
  inference = [r[3]["task_inference"] for r in rows] if "task_inference" in rows[0][3] else None
  return Scores([r[0] for r in rows], [r[1] for r in rows], inference)


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


def _optimizer(study: Study, updates: int, k: int):
  """(optimizer, schedule) for task k of ``updates`` updates: one per count and set of
  trainable parameters (tasks that agree share it, and its compiled step)."""
  cfg = study.cfg
  mask = trainable_mask(study, k)
  key = ("optimizer", updates, None if mask is None else tuple(jax.tree.leaves(mask)))
  if key not in study.compiled:
    study.compiled[key] = steps.make_optimizer(
        learning_rate=cfg.learning_rate, total_steps=updates,
        warmup_steps=cfg.warmup_steps, weight_decay=cfg.weight_decay,
        max_grad_norm=cfg.max_grad_norm, grad_accum_steps=cfg.grad_accum_steps,
        trainable_mask=mask)
  return study.compiled[key]


def plan_task(study: Study, k: int, method_state) -> TaskPlan:
  """Task k's training arrays (the method's ``train_arrays``, given its state after
  ``before_task``) and optimizer; tasks with the same number of updates share one
  optimizer (and its compiled step). Only the latest task's plan is kept (joint
  training's arrays grow with k)."""
  cached = study.compiled.get("plan")
  if cached is None or cached[0] != k:
    cfg = study.cfg
    arrays = study.method.train_arrays(task_context(study, k, salt=30_000,
                                                    method_state=method_state))
    batches_per_epoch = data_lib.num_batches(data_lib.size(arrays), cfg.batch_size)
    updates = -(-batches_per_epoch * cfg.epochs // cfg.grad_accum_steps)
    tx, schedule = _optimizer(study, updates, k)
    study.compiled["plan"] = k, TaskPlan(arrays, tx, schedule, batches_per_epoch,
                                         batches_per_epoch * cfg.epochs)
  return study.compiled["plan"][1]


def _train_fn(study: Study, tx, state):
  """The jitted, sharded train step for optimizer ``tx`` (compiled once per tx)."""
  if ("step", id(tx)) not in study.compiled:
    shardings = sharding.state_shardings(study.mesh, state, study.param_shapes)
    study.compiled["step", id(tx)] = jax.jit(
        functools.partial(steps.train_step, model=study.model, tx=tx, method=study.method),
        in_shardings=(shardings, sharding.batch_sharding(study.mesh)),
        out_shardings=(shardings, sharding.replicated(study.mesh)), donate_argnums=0)
  return study.compiled["step", id(tx)]


def fresh_state(study: Study, k: int, params, method_state, tx) -> steps.TrainState:
  """Task k's starting state: ``params``, a fresh optimizer ``tx``, the method's state."""
  state = steps.init_train_state(params, tx, jax.random.fold_in(study.base_rng, k),
                                 study.method, method_state)
  return jax.device_put(state, sharding.state_shardings(study.mesh, state,
                                                        study.param_shapes))


# ----------------------------------------------------------------------------
# The stages
# ----------------------------------------------------------------------------

def _restore_target(study: Study, meta: dict):
  """The abstract state a checkpoint with ``meta`` holds: a fresh optimizer of the task
  it was saved in (its frozen parameters have no optimizer state); the method's arrays
  (generated pseudo-data) take the shapes they were saved with."""
  k = meta["task"] - (meta["step_in_task"] == 0)  # the end of task k-1 or inside task k
  tx = _optimizer(study, 1, max(k, 0))[0]  # on the host, not under eval_shape's tracing
  abstract = jax.eval_shape(lambda: fresh_state(
      study, 0, study.initial_params, study.method.init(study.initial_params), tx))
  return jax.tree.map(lambda a, sh: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sh),
                      abstract, sharding.state_shardings(study.mesh, abstract,
                                                         study.param_shapes))


def restore_or_start(study: Study, resume: bool = False
                     ) -> tuple[steps.TrainState, RunRecord]:
  """The latest checkpoint's state and record (``resume``), or the initial state and
  a new record holding the accuracy before any training."""
  ckpt = study.checkpointer
  if resume and ckpt.latest_step() is not None:
    state, meta, step = ckpt.restore_newest(functools.partial(_restore_target, study),
                                            saved_shapes_under="method_state")
    record = RunRecord.from_json(meta)
    logging.info("Resumed from %s, checkpoint %d: task %d, step %d in the task.",
                 ckpt.directory, step, record.task, record.step_in_task)
    return state, record
  if resume:
    logging.info("--resume given but %s holds no checkpoint: starting afresh.", study.workdir)
  t0 = time.time()
  acc, task_acc, _ = evaluate_all(study, study.initial_params,
                                  study.method.init(study.initial_params))
  record = RunRecord(baseline=acc, task_aware_baseline=task_acc, eval_seconds=time.time() - t0,
                     config=study.cfg.to_dict(), warnings=list(study.warnings),
                     curve=[{"global_step": 0, "task": -1, "accuracy": acc,
                             "task_aware_accuracy": task_acc}])
  logging.info("Before training: accuracy %s", _fmt_accs(study.tasks, acc))
  params = study.initial_params
  # No optimizer yet: begin_task gives each task its own.
  return steps.TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=(),
                          rng=study.base_rng, method_state=study.method.init(params)), record


def save_checkpoint(study: Study, state, record: RunRecord) -> None:
  """Saves ``state`` at ``record.global_step`` (never a non-finite one)."""
  checkpoint.save_finite(study.checkpointer, record.global_step, state, record.to_json())


def begin_task(study: Study, k: int, state, record: RunRecord):
  """A new task: the method sees the params it starts from, the optimizer is fresh
  (as a new Hugging Face Trainer per task in the original study). The caller drops
  the previous state (its optimizer moments are not carried over)."""
  ctx = task_context(study, k, state.params, salt=10_000, record=record)
  mstate = study.method.before_task(state.method_state, ctx)
  record.train_seconds.append(0.0)
  return fresh_state(study, k, state.params, mstate, plan_task(study, k, mstate).tx)


def _mid_task_evaluation(study: Study, k: int, state, record: RunRecord, logger) -> None:
  logger.flush()
  acc, task_acc, _ = evaluate_all(study, state.params, state.method_state)
  record.curve.append({"global_step": record.global_step, "task": k, "accuracy": acc,
                       "task_aware_accuracy": task_acc})
  logger.evaluation(record.global_step, k, {t.name: a for t, a in zip(study.tasks, acc)})


def task_batches(study: Study, plan: TaskPlan, k: int, start: int = 0):
  """Task k's training batches from its step ``start`` to its end: each epoch shuffled
  by ``(seed, k, epoch)``, cut to length buckets."""
  cfg = study.cfg
  first_epoch, b = divmod(start, plan.batches_per_epoch)
  for epoch in range(first_epoch, cfg.epochs):
    yield from data_lib.batches(plan.arrays, cfg.batch_size, seed=(cfg.seed, k, epoch),
                                start=b if epoch == first_epoch else 0, buckets=study.buckets)


def train_task(study: Study, k: int, state, record: RunRecord, logger: StepLogger):
  """Trains task k from ``record.step_in_task`` to its end (``state`` is the task's
  state: from :func:`begin_task` or a checkpoint); evaluates every ``eval_every`` and
  checkpoints every ``checkpoint_every`` steps."""
  cfg, plan = study.cfg, plan_task(study, k, state.method_state)
  train_fn = _train_fn(study, plan.tx, state)
  logging.info("Task %d/%d %s: %d examples, %d steps of batch %d (%s).", k + 1,
               len(study.tasks), study.tasks[k].name, data_lib.size(plan.arrays),
               plan.total_steps, cfg.batch_size, study.method.name)
  logger.start_task(k, study.tasks[k].name, plan.total_steps,
                    lambda s: plan.schedule(min(s, plan.total_steps) // cfg.grad_accum_steps))
  t_task, start = time.time(), record.step_in_task
  steps.compile_ahead(train_fn, [
      (state, sharding.shard_batch(b, study.mesh))
      for b in data_lib.one_batch_per_shape(task_batches(study, plan, k, start))])
  for s, batch in zip(range(start, plan.total_steps), task_batches(study, plan, k, start)):
    state, m = train_fn(state, sharding.shard_batch(batch, study.mesh))
    record.global_step, record.step_in_task = record.global_step + 1, s + 1
    logger.push(record.global_step, s + 1, m)
    g, last = record.global_step, s + 1 == plan.total_steps
    if cfg.eval_every and g % cfg.eval_every == 0 and not last:
      _mid_task_evaluation(study, k, state, record, logger)
    if cfg.checkpoint_every and g % cfg.checkpoint_every == 0 and not last:
      logger.flush()
      record.train_seconds[-1] += time.time() - t_task
      t_task = time.time()
      save_checkpoint(study, state, record)
    logger.stop_after(cfg.stop_after_steps)
  logger.flush()
  record.train_seconds[-1] += time.time() - t_task
  diverged = logger.divergence()
  if diverged and cfg.stop_on_divergence:
    raise FloatingPointError(f"{diverged} Stopped (--stop_on_divergence); nothing after the "
                             f"last checkpoint (global step {study.checkpointer.latest_step()})"
                             " was saved.")
  if diverged:
    logging.warning("%s", diverged)
    record.warnings.append(diverged)
  return state


def end_task(study: Study, k: int, state, record: RunRecord, logger: StepLogger):
  """The method's consolidation (``after_task``, then ``adjust_params``), then every
  task evaluated, the row recorded and a checkpoint saved."""
  t0 = time.time()
  plan = plan_task(study, k, state.method_state)
  ctx = task_context(study, k, state.params, plan.arrays, salt=20_000, record=record)
  state = state._replace(method_state=study.method.after_task(state.method_state, ctx))
  params = study.method.adjust_params(state.method_state, ctx._replace(params=state.params))
  if params is not state.params:   # weight aligning: keep the params' sharding
    state = state._replace(params=jax.device_put(
        params, sharding.param_shardings(study.mesh, params)))
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
  record.trainable_parameters.append(_count(study.param_shapes, trainable_mask(study, k)))
  record.state_bytes.append(int(sum(x.nbytes for x in jax.tree.leaves(state))))
  record.curve.append({"global_step": record.global_step, "task": k, "accuracy": acc,
                       "task_aware_accuracy": task_acc})
  logger.evaluation(record.global_step, k, {t.name: a for t, a in zip(study.tasks, acc)})
  logging.info("After task %d (%s): accuracy %s | task-aware %s", k, study.tasks[k].name,
               _fmt_accs(study.tasks, acc), _fmt_accs(study.tasks, task_acc))
  record.task, record.step_in_task = k + 1, 0
  save_checkpoint(study, state, record)
  return state


def run(cfg: StudyConfig, workdir: str, *, resume: bool = False,
        flags: dict | None = None) -> dict:
  """Runs the sequential study and returns the results dict (also in results.json)."""
  t_start = time.time()
  with CompileTimer() as compiling:
    study = setup(cfg, workdir, resume)
    state, record = restore_or_start(study, resume)
    if study.writes_files and record.global_step:  # steps replayed from the checkpoint
      drop_records_after(os.path.join(workdir, "metrics.jsonl"), record.global_step)
    logger = StepLogger(Writers(workdir, enabled=study.writes_files), cfg.log_every,
                        study.checkpointer.latest_step)
    try:
      for k in range(record.task, len(study.tasks)):
        if record.step_in_task == 0:
          state = begin_task(study, k, state, record)
        state = train_task(study, k, state, record, logger)
        state = end_task(study, k, state, record, logger)
    finally:
      logger.close()
      study.checkpointer.close()
  results = make_results(study, record, flags, time.time() - t_start)
  results["timing"].update(compile_seconds_this_process=compiling.seconds,
                           compiled_programs_this_process=compiling.programs)
  if study.writes_files:
    t0 = time.time()
    write_results(results, workdir)
    logging.info("Results and figures written in %.1f s.", time.time() - t0)
  return results


# ----------------------------------------------------------------------------
# Results
# ----------------------------------------------------------------------------

def _count(params, mask=None) -> int:
  """How many parameters ``params`` holds (where ``mask`` is True)."""
  leaves = jax.tree.leaves(params)
  keep = [True] * len(leaves) if mask is None else jax.tree.leaves(mask)
  return int(sum(np.prod(x.shape) for x, k in zip(leaves, keep) if k))


def _fmt_accs(tasks, accs) -> str:
  return ", ".join(f"{t.name} {a:.3f}" for t, a in zip(tasks, accs))


def make_results(study: Study, record: RunRecord, flags: dict | None, wall_s: float) -> dict:
  """The results dict (the public contract of ``results.json``)."""
  cfg, model = study.cfg, study.model
  return {
      "tasks": [t.name for t in study.tasks],
      "head": cfg.head,
      "task_classes": {t.name: {"classes": list(t.class_names),
                                "head_labels": list(t.head_labels),
                                **({"label_words": list(t.label_words), "prompt": list(t.prompt)}
                                   if cfg.head == "lm" else {})} for t in study.tasks},
      "accuracy_matrix": record.rows,
      "task_aware_accuracy_matrix": record.task_rows,
      "task_inference_accuracy_matrix": record.inference_rows or None,
      "baseline_accuracy": record.baseline,
      "task_aware_baseline_accuracy": record.task_aware_baseline,
      "metrics": metrics_lib.summarize(record.rows, baseline=record.baseline),
      "task_aware_metrics": metrics_lib.summarize(record.task_rows,
                                                  baseline=record.task_aware_baseline),
      "val_accuracy_matrix": record.val_rows or None,
      "val_task_aware_accuracy_matrix": record.val_task_rows or None,
      "val_metrics": metrics_lib.summarize(record.val_rows) if record.val_rows else None,
      "method": cfg.method,
      "method_config": cfg.method_config.to_dict(),
      "seed": cfg.seed,
      "flags": flags if flags is not None else cfg.to_dict(),
      "data": {d.task.name: {"train": data_lib.size(d.train), "test": data_lib.size(d.test),
                             "val": data_lib.size(d.val) if d.val else 0}
               for d in study.task_data},
      "model": {"source": cfg.model if cfg.init == "pretrained" else f"random:{cfg.size}",
                "n_layer": model.config.n_layer, "n_embd": model.config.n_embd,
                "vocab_size": model.config.vocab_size, "dtype": cfg.dtype,
                "parameters": _count(study.param_shapes),
                "trainable_parameters_per_task": record.trainable_parameters,
                "train_state_bytes_per_task": record.state_bytes},
      "curve": record.curve,
      "warnings": record.warnings,
      "method_reports": record.method_reports,
      "timing": {"wall_seconds_this_process": wall_s,
                 "train_seconds_per_task": record.train_seconds,
                 "train_seconds": float(sum(record.train_seconds)),
                 "eval_seconds": record.eval_seconds,
                 "method_seconds_per_task": record.method_seconds,
                 "steps_per_task": record.steps_per_task},
      "environment": {"jax": jax.__version__, "backend": jax.default_backend(),
                      "devices": [d.device_kind for d in jax.devices()],
                      "python": platform.python_version()},
  }


def _samples_text(reports: list[dict]) -> str:
  """What a generative method replayed, for a person to read: per task boundary, the
  counts, the cost and the first samples of each earlier task."""
  out = []
  for r in reports:
    out.append(f"== before task {r['task']} ({r['task_name']}), {r.get('method', '')}: "
               f"{r.get('kept')} of {r.get('requested')} pseudo-examples kept "
               f"(dropped {r.get('dropped')}), {r.get('generated_tokens')} tokens in "
               f"{r.get('generation_seconds', 0):.1f} s "
               f"({r.get('tokens_per_second', 0):.0f} tokens/s)")
    for task, texts in r["samples"].items():
      out.append(f"-- written as {task}:")
      out.extend(f"{i + 1}. {t!r}" for i, t in enumerate(texts))
    out.append("")
  return "\n".join(out)


def write_results(results: dict, workdir: str) -> None:
  """``results.json`` and the figures."""
  with open(os.path.join(workdir, "results.json"), "w") as f:
    json.dump(results, f, indent=2)
  samples = [r for r in results.get("method_reports") or [] if r.get("samples")]
  if samples:
    with open(os.path.join(workdir, "generated_samples.txt"), "w") as f:
      f.write(_samples_text(samples))
  try:
    from cljax import plots  # pylint: disable=import-outside-toplevel
    plots.study_figures(results, workdir)
  except Exception as e:  # pylint: disable=broad-except
    logging.warning("Could not draw the figures: %s", e)
  logging.info("Wrote %s", os.path.join(workdir, "results.json"))

