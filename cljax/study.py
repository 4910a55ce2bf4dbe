"""The sequential study: train on each task in turn, evaluate every task after each.

``run(config, workdir)`` writes ``results.json`` (the accuracy matrices and their
metrics), ``metrics.jsonl`` (step metrics), figures and TensorBoard scalars, and
orbax checkpoints from which ``run(..., resume=True)`` continues exactly.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import platform
import time
from typing import Any, Sequence

from absl import logging
import jax
import jax.numpy as jnp
import numpy as np

from cljax import data as data_lib
from cljax import hf
from cljax import metrics as metrics_lib
from cljax import sharding
from cljax import steps
from cljax.checkpoint import Checkpointer
from cljax.methods import BuildContext, MethodConfig, TaskContext
from cljax.methods import build as build_method
from cljax.methods import registry as method_registry
from cljax.model import GPT2Classifier, GPT2Config, init_params


@dataclasses.dataclass(frozen=True)
class StudyConfig:
  """Everything that defines a run (the experiment script fills it from flags)."""
  tasks: tuple[str, ...] = ("imdb", "ag_news")
  classes: tuple[tuple[str, tuple[str, ...]], ...] = ()   # ((task, (class, ...)), ...)
  data_dir: str | None = None
  num_train: int | None = 2000
  num_test: int | None = 500
  num_val: int = 0
  subset: str = "balanced"
  max_length: int = 128
  # Model.
  model: str = "gpt2"
  init: str = "pretrained"            # pretrained | random
  size: str = "gpt2"                  # for init=random
  tokenizer: str | None = None        # default: model
  dtype: str = "float32"
  dropout: float | None = None        # None: the checkpoint's (0.1 for GPT-2)
  remat: bool = False
  # Optimization (Hugging Face Trainer defaults).
  batch_size: int = 8
  eval_batch_size: int = 32
  epochs: int = 1
  learning_rate: float = 5e-5
  warmup_steps: int = 0
  weight_decay: float = 0.0
  max_grad_norm: float = 1.0
  grad_accum_steps: int = 1
  seed: int = 0
  # Method.
  method: str = "finetune"
  method_config: MethodConfig = MethodConfig()
  # Bookkeeping.
  checkpoint_every: int = 200
  keep_checkpoints: int = 2
  log_every: int = 10
  eval_every: int = 0
  cache_dir: str | None = None
  stop_after_steps: int | None = None  # testing: stop as if killed after N steps
  # Devices.
  mesh_data: int = -1                 # data-parallel axis (-1: every device left)
  mesh_model: int = 1                 # parameter-sharding axis
  distributed: bool = False           # multi-host: jax.distributed.initialize()

  def replace(self, **kwargs) -> "StudyConfig":
    return dataclasses.replace(self, **kwargs)


class Interrupted(RuntimeError):
  """Raised by ``stop_after_steps``: the run stopped as if killed."""


# ----------------------------------------------------------------------------
# Building blocks
# ----------------------------------------------------------------------------

def build_model(cfg: StudyConfig, tokenizer, num_labels: int):
  """(model, params): pretrained weights or a random init of a named size."""
  overrides: dict[str, Any] = {"remat": cfg.remat}
  if cfg.dropout is not None:
    overrides.update(embd_pdrop=cfg.dropout, attn_pdrop=cfg.dropout, resid_pdrop=cfg.dropout)
  if cfg.init == "pretrained":
    model, params = hf.load_pretrained(cfg.model, num_labels=num_labels, dtype=cfg.dtype,
                                       seed=cfg.seed, **overrides)
    if model.config.pad_token_id != tokenizer.pad_token_id:
      raise ValueError(f"The model's pad id {model.config.pad_token_id} differs from the "
                       f"tokenizer's {tokenizer.pad_token_id}; use the model's tokenizer.")
    return model, params
  if cfg.init != "random":
    raise ValueError(f"Unknown init {cfg.init!r}; expected 'pretrained' or 'random'.")
  config = GPT2Config.from_size(
      cfg.size, vocab_size=len(tokenizer), num_labels=num_labels, dtype=cfg.dtype,
      pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
      n_positions=max(1024, cfg.max_length), **overrides)
  model = GPT2Classifier(config)
  params = jax.jit(functools.partial(init_params, model))(jax.random.PRNGKey(cfg.seed))
  return model, params


def evaluate(eval_fn, params, arrays: dict[str, np.ndarray], batch_size: int,
             mesh=None) -> tuple[float, float, float]:
  """(class-incremental accuracy, task-aware accuracy, mean loss) over every example."""
  totals = None
  for batch in data_lib.batches(arrays, batch_size):
    out = eval_fn(params, batch if mesh is None else sharding.shard_batch(batch, mesh))
    totals = out if totals is None else jax.tree.map(jnp.add, totals, out)
  totals = jax.device_get(totals)
  n = float(totals["count"])
  return float(totals["correct"]) / n, float(totals["task_correct"]) / n, float(
      totals["loss_sum"]) / n


def _fmt_time(seconds: float) -> str:
  seconds = int(max(seconds, 0))
  h, rem = divmod(seconds, 3600)
  m, s = divmod(rem, 60)
  return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s"


class _Writers:
  """Step metrics to JSON Lines and TensorBoard."""

  def __init__(self, workdir: str):
    self.jsonl = open(os.path.join(workdir, "metrics.jsonl"), "a")
    try:
      from tensorboardX import SummaryWriter  # pylint: disable=import-outside-toplevel
      self.tb = SummaryWriter(os.path.join(workdir, "tensorboard"))
    except ImportError:
      self.tb = None

  def write(self, record: dict, step: int, prefix: str):
    self.jsonl.write(json.dumps(record) + "\n")
    self.jsonl.flush()
    if self.tb:
      for k, v in record.items():
        if isinstance(v, (int, float)) and k not in ("step", "task"):
          self.tb.add_scalar(f"{prefix}/{k}", v, step)

  def close(self):
    self.jsonl.close()
    if self.tb:
      self.tb.close()


# ----------------------------------------------------------------------------
# The run
# ----------------------------------------------------------------------------

def run(cfg: StudyConfig, workdir: str, *, resume: bool = False,
        flags: dict | None = None) -> dict:
  """Runs the sequential study and returns the results dict (also in results.json)."""
  t_start = time.time()
  method_registry.parse(cfg.method)  # fail on a typo before loading anything
  if cfg.distributed:
    sharding.initialize_distributed()
  mesh = sharding.make_mesh(cfg.mesh_data, cfg.mesh_model)
  sharding.check_batch_size(cfg.batch_size, mesh)
  sharding.check_batch_size(cfg.eval_batch_size, mesh, "--eval_batch_size")
  os.makedirs(workdir, exist_ok=True)
  ckpt = Checkpointer(os.path.join(workdir, "checkpoints"), cfg.keep_checkpoints)
  if ckpt.latest_step() is not None and not resume:
    raise FileExistsError(f"{workdir} already holds checkpoints of a run. Pass --resume to "
                          "continue it, or choose another --workdir.")

  tasks = data_lib.resolve_tasks(cfg.tasks, dict(cfg.classes), cfg.data_dir)
  total_labels = data_lib.num_labels(tasks)
  tokenizer = hf.load_tokenizer(cfg.tokenizer or cfg.model)
  cache_dir = cfg.cache_dir or os.path.join(os.path.expanduser("~"), ".cache", "cljax")
  task_data = data_lib.load_task_data(
      tasks, tokenizer, data_dir=cfg.data_dir, num_train=cfg.num_train,
      num_test=cfg.num_test, num_val=cfg.num_val, subset=cfg.subset,
      max_length=cfg.max_length, seed=cfg.seed, cache_dir=cache_dir)
  model, params = build_model(cfg, tokenizer, total_labels)
  params = jax.device_put(params, sharding.param_shardings(mesh, params))
  method = build_method(cfg.method, cfg.method_config, BuildContext(
      num_labels=total_labels, num_tasks=len(tasks), max_length=cfg.max_length,
      n_layer=model.config.n_layer))
  eval_fn = jax.jit(functools.partial(steps.eval_step, model=model),
                    in_shardings=(sharding.param_shardings(mesh, params),
                                  sharding.batch_sharding(mesh)),
                    out_shardings=sharding.replicated(mesh))
  base_rng = jax.random.PRNGKey(cfg.seed)

  def evaluate_all(p) -> tuple[list[float], list[float]]:
    acc, task_acc = [], []
    for d in task_data:
      a, ta, _ = evaluate(eval_fn, p, d.test, cfg.eval_batch_size, mesh)
      acc.append(a)
      task_acc.append(ta)
    return acc, task_acc

  def train_arrays(k: int) -> dict[str, np.ndarray]:
    if method.joint:
      return data_lib.concat([d.train for d in task_data[:k + 1]])
    return task_data[k].train

  optimizers: dict[int, tuple] = {}   # by number of updates: equal tasks share one
  train_fns: dict[int, Any] = {}      # compiled step per optimizer

  def optimizer_for(k: int):
    n = data_lib.size(train_arrays(k))
    batches_per_epoch = data_lib.num_batches(n, cfg.batch_size)
    updates = -(-batches_per_epoch * cfg.epochs // cfg.grad_accum_steps)
    if updates not in optimizers:
      optimizers[updates] = steps.make_optimizer(
          learning_rate=cfg.learning_rate, total_steps=updates,
          warmup_steps=cfg.warmup_steps, weight_decay=cfg.weight_decay,
          max_grad_norm=cfg.max_grad_norm, grad_accum_steps=cfg.grad_accum_steps,
          trainable_mask=method.trainable)
    tx, schedule = optimizers[updates]
    return tx, schedule, batches_per_epoch

  def train_fn_for(tx, state):
    if id(tx) not in train_fns:
      shardings = sharding.state_shardings(mesh, state, params)
      train_fns[id(tx)] = jax.jit(
          functools.partial(steps.train_step, model=model, tx=tx, method=method),
          in_shardings=(shardings, sharding.batch_sharding(mesh)),
          out_shardings=(shardings, sharding.replicated(mesh)), donate_argnums=0)
    return train_fns[id(tx)]

  def fresh_state(k: int, p, method_state):
    tx, _, _ = optimizer_for(k)
    state = steps.init_train_state(p, tx, jax.random.fold_in(base_rng, k), method,
                                   method_state)
    return jax.device_put(state, sharding.state_shardings(mesh, state, params))

  # --- start or resume -------------------------------------------------------
  writers = _Writers(workdir)
  if resume and ckpt.latest_step() is not None:
    meta = ckpt.restore_meta()
    k0 = min(meta["task"], len(tasks) - 1)
    abstract = jax.eval_shape(lambda: fresh_state(k0, params, method.init(params)))
    target = jax.tree.map(lambda a, sh: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sh),
                          abstract, sharding.state_shardings(mesh, abstract, params))
    state, meta = ckpt.restore(target)
    logging.info("Resumed from %s at task %d, step %d in the task (global step %d).",
                 ckpt.directory, meta["task"], meta["step_in_task"], meta["global_step"])
  else:
    if resume:
      logging.info("--resume given but %s holds no checkpoint: starting afresh.", workdir)
    t0 = time.time()
    base_acc, base_task_acc = evaluate_all(params)
    meta = {"task": 0, "step_in_task": 0, "global_step": 0, "rows": [], "task_rows": [],
            "baseline": base_acc, "task_aware_baseline": base_task_acc,
            "curve": [{"global_step": 0, "task": -1, "accuracy": base_acc,
                       "task_aware_accuracy": base_task_acc}],
            "train_seconds": [], "eval_seconds": time.time() - t0, "steps_per_task": [],
            "method_seconds": []}
    logging.info("Before training: accuracy %s", _fmt_accs(tasks, base_acc))
    state = None

  # --- the tasks ---------------------------------------------------------------
  steps_this_process = 0
  for k in range(meta["task"], len(tasks)):
    task = tasks[k]
    arrays = train_arrays(k)
    tx, schedule, batches_per_epoch = optimizer_for(k)
    total_batches = batches_per_epoch * cfg.epochs
    if meta["step_in_task"] == 0:
      # A new task: the method sees the params it starts from; the optimizer is fresh
      # (as a new Hugging Face Trainer per task in the original study).
      p = params if state is None else state.params
      mstate = method.init(p) if state is None else state.method_state
      mstate = method.before_task(mstate, p, TaskContext(
          k, task.name, arrays, model, jax.random.fold_in(base_rng, 10_000 + k),
          cfg.batch_size))
      state = fresh_state(k, p, mstate)
      meta["train_seconds"].append(0.0)
    train_fn = train_fn_for(tx, state)
    logging.info("Task %d/%d %s: %d examples, %d steps of batch %d (%s).", k + 1, len(tasks),
                 task.name, data_lib.size(arrays), total_batches, cfg.batch_size, method.name)

    t_task = time.time()
    t_log, ex_log = time.time(), 0
    acc_log: dict[str, float] = {"loss_sum": 0.0, "correct": 0.0, "count": 0.0}
    pending = None

    def check(pending_item):
      """Syncs on one step's metrics: stops on non-finite values, logs progress."""
      nonlocal t_log, ex_log, acc_log
      g, s, m = pending_item
      m = jax.device_get(m)
      if not m["finite"]:
        last = ckpt.latest_step()
        raise FloatingPointError(
            f"Non-finite loss or gradient at task {k} ({task.name}), step {s} (loss sum "
            f"{m['loss_sum']}, penalty {m['penalty']}, grad norm {m['grad_norm']}). Nothing "
            f"after the last good checkpoint (global step {last}) was saved. Lower "
            "--learning_rate or the method's strength, or check the data, then rerun "
            "with --resume.")
      for key in acc_log:
        acc_log[key] += float(m[key])
      ex_log += float(m["count"])
      if s % cfg.log_every == 0 or s == total_batches:
        dt = max(time.time() - t_log, 1e-9)
        rate = ex_log / dt
        record = {"global_step": g, "task": k, "step": s,
                  "loss": acc_log["loss_sum"] / max(acc_log["count"], 1),
                  "accuracy": acc_log["correct"] / max(acc_log["count"], 1),
                  "penalty": float(m["penalty"]), "grad_norm": float(m["grad_norm"]),
                  "learning_rate": float(schedule(min(s, total_batches) //
                                                  cfg.grad_accum_steps)),
                  "examples_per_s": rate}
        writers.write(record, g, "train")
        eta = (total_batches - s) * cfg.batch_size / max(rate, 1e-9)
        logging.info("task %d %s step %d/%d loss %.4f acc %.3f lr %.2e | %.1f ex/s, "
                     "ETA task %s", k, task.name, s, total_batches, record["loss"],
                     record["accuracy"], record["learning_rate"], rate, _fmt_time(eta))
        t_log, ex_log = time.time(), 0
        acc_log = {key: 0.0 for key in acc_log}

    start = meta["step_in_task"]
    for s in range(start, total_batches):
      epoch, b = divmod(s, batches_per_epoch)
      if b == 0 or s == start:
        batch_iter = data_lib.batches(arrays, cfg.batch_size,
                                      seed=_epoch_seed(cfg.seed, k, epoch), start=b)
      state, m = train_fn(state, sharding.shard_batch(next(batch_iter), mesh))
      g = meta["global_step"] + 1
      meta["global_step"], meta["step_in_task"] = g, s + 1
      if pending is not None:
        check(pending)
      pending = (g, s + 1, m)
      steps_this_process += 1
      if cfg.eval_every and g % cfg.eval_every == 0 and s + 1 < total_batches:
        check(pending)
        pending = None
        acc, task_acc = evaluate_all(state.params)
        meta["curve"].append({"global_step": g, "task": k, "accuracy": acc,
                              "task_aware_accuracy": task_acc})
        writers.write({"global_step": g, "task": k,
                       **{f"accuracy/{t.name}": a for t, a in zip(tasks, acc)}}, g, "eval")
      if cfg.checkpoint_every and g % cfg.checkpoint_every == 0 and s + 1 < total_batches:
        if pending is not None:
          check(pending)
          pending = None
        meta["train_seconds"][-1] += time.time() - t_task
        t_task = time.time()
        ckpt.save(g, state, meta)
      if cfg.stop_after_steps and steps_this_process >= cfg.stop_after_steps:
        if pending is not None:
          check(pending)
        writers.close()
        raise Interrupted(f"Stopped after {steps_this_process} steps (--stop_after_steps).")
    if pending is not None:
      check(pending)
    meta["train_seconds"][-1] += time.time() - t_task

    # --- end of task: the method's consolidation, then evaluate every task ------
    t0 = time.time()
    mstate = method.after_task(state.method_state, state.params, TaskContext(
        k, task.name, arrays, model, jax.random.fold_in(base_rng, 20_000 + k),
        cfg.batch_size))
    state = state._replace(method_state=mstate)
    method_seconds = time.time() - t0
    t0 = time.time()
    acc, task_acc = evaluate_all(state.params)
    if cfg.num_val:
      # Validation splits (carved from training data): for choosing strengths.
      val = [evaluate(eval_fn, state.params, d.val, cfg.eval_batch_size, mesh)
             for d in task_data]
      meta.setdefault("val_rows", []).append([v[0] for v in val])
      meta.setdefault("val_task_rows", []).append([v[1] for v in val])
    meta["eval_seconds"] += time.time() - t0
    meta["rows"].append(acc)
    meta["task_rows"].append(task_acc)
    meta["steps_per_task"].append(total_batches)
    meta["method_seconds"].append(method_seconds)
    meta["curve"].append({"global_step": meta["global_step"], "task": k, "accuracy": acc,
                          "task_aware_accuracy": task_acc})
    writers.write({"global_step": meta["global_step"], "task": k,
                   **{f"accuracy/{t.name}": a for t, a in zip(tasks, acc)}},
                  meta["global_step"], "eval")
    logging.info("After task %d (%s): accuracy %s | task-aware %s", k, task.name,
                 _fmt_accs(tasks, acc), _fmt_accs(tasks, task_acc))
    meta["task"], meta["step_in_task"] = k + 1, 0
    ckpt.save(meta["global_step"], state, meta)
  writers.close()
  ckpt.close()

  results = _results(cfg, tasks, task_data, model, meta, flags, time.time() - t_start)
  with open(os.path.join(workdir, "results.json"), "w") as f:
    json.dump(results, f, indent=2)
  try:
    from cljax import plots  # pylint: disable=import-outside-toplevel
    plots.study_figures(results, workdir)
  except Exception as e:  # pylint: disable=broad-except
    logging.warning("Could not draw the figures: %s", e)
  logging.info("Wrote %s", os.path.join(workdir, "results.json"))
  return results


def _epoch_seed(seed: int, task: int, epoch: int) -> int:
  return (seed * 1_000_003 + task * 7919 + epoch) % (2 ** 31)


def _fmt_accs(tasks, accs) -> str:
  return ", ".join(f"{t.name} {a:.3f}" for t, a in zip(tasks, accs))


def _results(cfg: StudyConfig, tasks, task_data, model, meta, flags, wall_s) -> dict:
  baseline = meta["baseline"]
  return {
      "tasks": [t.name for t in tasks],
      "task_classes": {t.name: {"classes": list(t.class_names),
                                "head_labels": list(t.head_labels)} for t in tasks},
      "accuracy_matrix": meta["rows"],
      "task_aware_accuracy_matrix": meta["task_rows"],
      "baseline_accuracy": baseline,
      "task_aware_baseline_accuracy": meta["task_aware_baseline"],
      "metrics": metrics_lib.summarize(meta["rows"], baseline=baseline),
      "task_aware_metrics": metrics_lib.summarize(meta["task_rows"],
                                                  baseline=meta["task_aware_baseline"]),
      "val_accuracy_matrix": meta.get("val_rows"),
      "val_task_aware_accuracy_matrix": meta.get("val_task_rows"),
      "val_metrics": (metrics_lib.summarize(meta["val_rows"]) if meta.get("val_rows")
                      else None),
      "method": cfg.method,
      "method_config": dataclasses.asdict(cfg.method_config),
      "seed": cfg.seed,
      "flags": flags if flags is not None else _config_dict(cfg),
      "data": {d.task.name: {"train": data_lib.size(d.train), "test": data_lib.size(d.test),
                             "val": data_lib.size(d.val) if d.val else 0}
               for d in task_data},
      "model": {"source": cfg.model if cfg.init == "pretrained" else f"random:{cfg.size}",
                "n_layer": model.config.n_layer, "n_embd": model.config.n_embd,
                "vocab_size": model.config.vocab_size, "dtype": cfg.dtype},
      "curve": meta["curve"],
      "timing": {"wall_seconds_this_process": wall_s,
                 "train_seconds_per_task": meta["train_seconds"],
                 "train_seconds": float(sum(meta["train_seconds"])),
                 "eval_seconds": meta["eval_seconds"],
                 "method_seconds_per_task": meta["method_seconds"],
                 "steps_per_task": meta["steps_per_task"]},
      "environment": {"jax": jax.__version__, "backend": jax.default_backend(),
                      "devices": [d.device_kind for d in jax.devices()],
                      "python": platform.python_version()},
  }


def _config_dict(cfg: StudyConfig) -> dict:
  d = dataclasses.asdict(cfg)
  d["classes"] = {t: list(c) for t, c in cfg.classes}
  return d
