"""What a study builds once: the :class:`Study` (tasks and their data, the model with
the method's tokens and modules, the mesh, the jitted evaluation and train steps, the
checkpointer), the :class:`RunRecord` of its progress (a :class:`TaskRecord` per
task), and the guards of its workdir (:data:`OUTPUTS`, :data:`RESUMABLE_CHANGES`)."""

from __future__ import annotations

import dataclasses
import functools
import types
from typing import Any
from collections.abc import Callable, Mapping

from absl import logging
import jax

from cljax import data as data_lib
from cljax import models
from cljax.methods import BuildContext, Method
from cljax.methods import build as build_method
from cljax.methods import registry as method_registry
from cljax.models import hf
from cljax.models.build import build_model
from cljax.study.config import StudyConfig
from cljax.train import run as run_lib
from cljax.train import sharding
from cljax.train import steps
from cljax.train import tasks as tasks_lib
from cljax.train.checkpoint import Checkpointer

# The method's added modules are initialized from ``fold_in(seed's key, MODULES_SALT)``;
# its host hooks' keys are the task protocol's (``cljax.train.tasks.SALTS``).
MODULES_SALT = 7


# ----------------------------------------------------------------------------
# What is built once, and what a run has done so far
# ----------------------------------------------------------------------------

@dataclasses.dataclass
class TaskRecord:
  """One task's facts, from its start (:func:`~cljax.study.stages.start_task`) to its
  end (:func:`~cljax.study.stages.finish_task`, which fills the rest)."""
  name: str = ""
  train_seconds: float = 0.0            # its steps (checkpoints included)
  steps: int | None = None              # steps it trained
  method_seconds: float | None = None   # its consolidation (after_task, adjust_params)
  accuracy: list | None = None          # every task's, after this one: a matrix row
  task_aware_accuracy: list | None = None
  task_inference_accuracy: list | None = None   # per-task modules
  val_accuracy: list | None = None              # validation (--num_val)
  val_task_aware_accuracy: list | None = None
  trainable_parameters: int | None = None
  state_bytes: int | None = None        # the train state at the task's end, moments included


# RunRecord's per-task lists before TaskRecord (checkpoints of older runs), by field.
_OLD_LISTS = {"rows": "accuracy", "task_rows": "task_aware_accuracy",
              "inference_rows": "task_inference_accuracy", "val_rows": "val_accuracy",
              "val_task_rows": "val_task_aware_accuracy", "train_seconds": "train_seconds",
              "method_seconds": "method_seconds", "steps_per_task": "steps",
              "trainable_parameters": "trainable_parameters", "state_bytes": "state_bytes"}


@dataclasses.dataclass
class RunRecord(run_lib.Record):
  """The run's progress; every checkpoint stores it as JSON beside the train state."""
  task: int = 0                    # the task being trained (len(tasks) when done)
  step_in_task: int = 0            # steps of that task already taken
  global_step: int = 0
  tasks: list = dataclasses.field(default_factory=list)   # a TaskRecord per task begun
  baseline: list = dataclasses.field(default_factory=list)    # accuracy before training
  task_aware_baseline: list = dataclasses.field(default_factory=list)
  curve: list = dataclasses.field(default_factory=list)       # evaluations through the run
  eval_seconds: float = 0.0
  config: dict = dataclasses.field(default_factory=dict)     # the run's StudyConfig
  warnings: list = dataclasses.field(default_factory=list)   # e.g. a diverged task
  method_reports: list = dataclasses.field(default_factory=list)  # from the host hooks
  base_sha256: str | None = None   # the weights the run started from (None: random init)

  def where(self) -> str:
    return f": task {self.task}, step {self.step_in_task} in the task"

  def ended(self, field: str) -> list:
    """``field`` of every task that ended, in order, where it is set (``accuracy``:
    the accuracy matrix)."""
    return [getattr(t, field) for t in self.tasks[:self.task]
            if getattr(t, field) is not None]

  @classmethod
  def from_json(cls, d: dict) -> RunRecord:
    d = dict(d)
    if "tasks" not in d and "rows" in d:   # per-task lists: an older checkpoint
      n = len(d.get("train_seconds") or d["rows"])
      d["tasks"] = [{new: d[old][i] for old, new in _OLD_LISTS.items()
                     if i < len(d.get(old) or ())} for i in range(n)]
    record = super().from_json(d)
    record.tasks = [t if isinstance(t, TaskRecord) else TaskRecord(**t) for t in record.tasks]
    return record


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
  train_steps: Mapping = dataclasses.field(   # trainable set -> its jitted step
      default_factory=lambda: types.MappingProxyType({}))
  method_context: BuildContext | None = None   # what the method was built with
  base_sha256: str | None = None   # of the pretrained weights it loaded (None: random init)


# ----------------------------------------------------------------------------
# Building blocks
# ----------------------------------------------------------------------------

def study_model(cfg: StudyConfig, tokenizer, num_labels: int, label_tokens=None,
                lm_head: bool = False):
  """(model, params): pretrained weights or a random init of a named size; with
  ``label_tokens`` (``--head=lm``) a :class:`~cljax.models.GPT2LabelWords` over the
  LM's weights; ``lm_head``: a classifier keeps an untied family's LM head."""
  return build_model(cfg, tokenizer, kind="classifier" if label_tokens is None
                          else "label_words", rng=jax.random.PRNGKey(cfg.seed),
                          n_positions=cfg.max_length, num_labels=num_labels,
                          label_tokens=label_tokens, seed=cfg.seed, lm_head=lm_head)


def _lm_head_where_read(model, params, reads_lm: bool, method: str):
  """(model, params) with the classifier's untied LM head (loaded with it, once) kept
  only for a method that reads the LM (``Declarations.reads_lm``); tied heads (GPT-2's
  ``wte``) are the embedding and stay."""
  config = model.config
  if not config.classifier_lm_head:   # label words, or an LM: its head is its own
    return model, params
  if reads_lm and not config.tied:
    logging.info("%s reads the LM head: the %s classifier keeps its untied %s.", method,
                 config.family, config.LAYOUT.lm_head)
    return model, params
  if not config.tied:
    params = {k: v for k, v in params.items() if k != config.LAYOUT.lm_head}
  return model.clone(config=config.replace(classifier_lm_head=False)), params


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
  ckpt = run_lib.open_run(workdir, resume_view(cfg), resume, keep=cfg.keep_checkpoints,
                          outputs=OUTPUTS, resumable=RESUMABLE_CHANGES)
  cache_dir = run_lib.use_compilation_cache(cfg.cache_dir)
  tokenizer = hf.load_tokenizer(cfg.tokenizer or cfg.model)
  tasks = data_lib.resolve_tasks(cfg.tasks, cfg.task_classes(), cfg.data_dir,
                                 cfg.task_label_words())
  total_labels = data_lib.num_labels(tasks)
  as_text = cfg.head == "lm"
  model, params = study_model(cfg, tokenizer, total_labels,
                              data_lib.label_tokens(tasks, tokenizer) if as_text else None,
                              lm_head=True)
  method_context = BuildContext(
      num_labels=total_labels, num_tasks=len(tasks), max_length=cfg.max_length,
      n_layer=model.config.n_layer, head=cfg.head, first_new_token=len(tokenizer),
      eos_token_id=tokenizer.eos_token_id, n_embd=model.config.n_embd,
      vocab_size=model.config.vocab_size, pad_token_id=tokenizer.pad_token_id,
      answer_tokens=data_lib.answer_tokens(tasks, tokenizer) if as_text else 1,
      family=model.config.family, layout=model.config.LAYOUT, tied=model.config.tied,
      scan_layers=model.config.scan_layers)
  method = build_method(cfg.method, cfg.method_config, method_context)
  declares = method.declares
  model, params = _lm_head_where_read(model, params, declares.reads_lm, cfg.method)
  if declares.tokens:
    model, params = models.add_method_tokens(model, params, tokenizer, declares.tokens)
  if declares.model_options:
    model, params = models.add_method_modules(
        model, params, dict(declares.model_options),
        jax.random.fold_in(jax.random.PRNGKey(cfg.seed), MODULES_SALT))
  if declares.answer_marker:
    tasks = [dataclasses.replace(t, prompt=(t.prompt[0], t.prompt[1] + declares.answer_marker))
             for t in tasks]
  task_data = data_lib.load_task_data(
      tasks, tokenizer, data_dir=cfg.data_dir, num_train=cfg.num_train,
      num_test=cfg.num_test, num_val=cfg.num_val, subset=cfg.subset,
      max_length=cfg.max_length, seed=cfg.seed, as_text=as_text,
      cache_dir=cache_dir, exclude_keys=pretraining_keys(cfg))
  params = jax.device_put(params, sharding.param_shardings(mesh, params))
  eval_fn = jax.jit(lambda p, b, method_state: steps.eval_step(
      p, b, model=model, method=method, method_state=method_state),
                    in_shardings=(sharding.param_shardings(mesh, params),
                                  sharding.batch_sharding(mesh), sharding.replicated(mesh)),
                    out_shardings=sharding.replicated(mesh))
  study = Study(cfg=cfg, workdir=workdir, tasks=tasks, task_data=task_data, model=model,
               initial_params=params, param_shapes=jax.eval_shape(lambda: params),
               method=method, mesh=mesh, eval_fn=eval_fn,
               checkpointer=ckpt,
               base_rng=jax.random.PRNGKey(cfg.seed),
               warnings=tuple(data_lib.class_warnings(task_data)),
               writes_files=jax.process_index() == 0, tokenizer=tokenizer,
               buckets=data_lib.length_buckets(cfg.max_length, cfg.length_bucket),
               method_context=method_context,
               base_sha256=hf.weights_sha256(cfg.model) if cfg.init == "pretrained" else None)
  return dataclasses.replace(study, train_steps=train_steps(study))


def task_tx(study: Study, k: int):
  """Task k's optimizer, of any length (its schedule's length is a value in its state):
  the structure of its state, and its update."""
  return tasks_lib.task_optimizer(
      study.cfg, 1, tasks_lib.trainable_mask(study.method, study.param_shapes, k))[0]


def abstract_state(study: Study, tx=None) -> steps.TrainState:
  """The shapes, dtypes and shardings of the run's train state with the optimizer
  ``tx`` (:func:`task_tx`: no state for the frozen parameters), or between tasks
  (None: no optimizer state). The method's state has the structure ``method.init``
  gives it."""
  abstract = jax.eval_shape(lambda: steps.init_train_state(
      study.initial_params, tx, study.base_rng, study.method))
  return jax.tree.map(lambda a, sh: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sh),
                      abstract, sharding.state_shardings(study.mesh, abstract,
                                                         study.param_shapes))


def train_steps(study: Study) -> Mapping:
  """The jitted, sharded train step of each set of trainable parameters the run's
  tasks have (:func:`cljax.train.tasks.trainable_key`), built once, whatever a task's
  length: the schedule's length is a value in the optimizer state
  (:func:`cljax.train.optim.make_optimizer`), so one optimizer's update serves every
  task of its set."""
  out = {}
  for k in range(len(study.tasks)):
    key = tasks_lib.trainable_key(study.method, study.param_shapes, k)
    if key not in out:
      tx = task_tx(study, k)
      shardings = jax.tree.map(lambda a: a.sharding, abstract_state(study, tx))
      out[key] = jax.jit(
          functools.partial(steps.train_step, model=study.model, tx=tx, method=study.method,
                            dropout_rng_impl=study.cfg.dropout_rng_impl),
          in_shardings=(shardings, sharding.batch_sharding(study.mesh)),
          out_shardings=(shardings, sharding.replicated(study.mesh)), donate_argnums=0)
  return types.MappingProxyType(out)


def pretraining_keys(cfg: StudyConfig) -> frozenset[str]:
  """The keys of the texts ``--model`` was pretrained on, where its folder lists them
  (``pretraining_texts.json``, written by ``cljax-instruct``): the study draws none of
  them. Empty for a random init or a model without the list."""
  keys = data_lib.read_keys(cfg.model) if cfg.init == "pretrained" else frozenset()
  if keys:
    logging.info("%s lists %d pretraining texts; the study's subsets leave them out.",
                 cfg.model, len(keys))
  return keys


# What a run writes beside its checkpoints.
OUTPUTS = ("results.json", "metrics.jsonl", "tensorboard", "accuracy_matrix.png",
           "accuracy_curve.png", "generated_samples.txt", "pseudo_samples.jsonl")

# Settings that change only logging, outputs, evaluation batching or the device layout:
# a resumed run may change them (the new values are recorded).
RESUMABLE_CHANGES = frozenset({
    "checkpoint_every", "keep_checkpoints", "log_every", "eval_every", "stop_after_steps",
    "cache_dir", "eval_batch_size", "mesh_data", "mesh_model", "distributed", "remat",
    "attention", "stop_on_divergence"})


def resume_view(cfg: StudyConfig) -> dict:
  """The settings a resume compares: ``cfg.to_dict()`` with ``method_config`` cut to
  the hyperparameters the run's methods read (one added since, for another method,
  does not block a resume; one of this run's that its checkpoint lacks does)."""
  view = cfg.to_dict()
  parts = set(method_registry.parse(cfg.method))
  view["method_config"] = {k: v for k, v in view["method_config"].items()
                           if parts & set(method_registry.users(k))}
  return view
