"""A run's life around its steps: its options (checkpoints, logging, the testing stop),
its workdir's guards (:func:`open_run`: another run's checkpoints or outputs, a resume
with settings that change the computation), its compiled programs kept on disk
(:func:`use_compilation_cache`), its step logger (:func:`open_logger`), and the state
it continues from (:func:`restore_or_start`: the newest checkpoint that restores, or
a fresh start) with its progress :class:`Record`, stored as JSON in every checkpoint.
The study and LM training both open their runs here."""

from __future__ import annotations

import dataclasses
import os
from typing import Any
from collections.abc import Callable

from absl import logging
import jax

from cljax.options import NON_NEGATIVE, POSITIVE, Options, option, with_current_names
from cljax.train.checkpoint import Checkpointer
from cljax.train.progress import StepLogger, Writers, drop_records_after


@dataclasses.dataclass(frozen=True)
class CheckpointOptions(Options):
  """Checkpoints (and ``--resume``), logging, and the testing stop."""
  checkpoint_every: int = option(200, "Save a checkpoint every N steps (0: only at the "
                                 "end of each task or of training, where one is always "
                                 "saved).",
                                 bound=NON_NEGATIVE)
  keep_checkpoints: int = option(2, "Checkpoints kept in WORKDIR/checkpoints (the newest).",
                                 bound=POSITIVE)
  log_every: int = option(10, "Log step metrics every N steps.", bound=POSITIVE)
  stop_after_steps: int | None = option(None, "Testing: stop after N steps as if killed.",
                                       bound=POSITIVE)


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


def open_run(workdir: str, config: dict, resume: bool, *, keep: int, outputs: tuple[str, ...],
             resumable: frozenset[str]) -> Checkpointer:
  """The run's checkpointer (``workdir/checkpoints``), after refusing: checkpoints
  without ``resume``; a resume whose ``config`` differs from the stored one in a
  setting not in ``resumable``; ``outputs`` of a previous run with no checkpoint to
  resume. Nothing is written here (the folder is made by the first save)."""
  directory = os.path.join(workdir, "checkpoints")
  ckpt = Checkpointer(directory, keep)
  latest = ckpt.latest_step() if os.path.isdir(directory) else None
  if latest is not None and not resume:
    raise FileExistsError(f"{workdir} already holds checkpoints of a run. Pass --resume to "
                          "continue it, or choose another --workdir.")
  if latest is not None:
    check_resumable(ckpt.restore_meta().get("config"), config, workdir, resumable)
  found = [n for n in outputs if os.path.exists(os.path.join(workdir, n))]
  if latest is None and found:
    raise FileExistsError(f"{workdir} holds outputs of a previous run ({', '.join(found)}) "
                          "and no checkpoint to resume from; choose another --workdir, or "
                          "remove them.")
  return ckpt


# Settings added after runs were stored, each with the value that computes what the
# code did before it existed (``--dropout_rng_impl``, first ``--dropout_rng``: every run
# before it drew rbg keys). A stored run that lacks one of these ran with that value;
# any other setting it lacks is refused, its value in that run being unknown.
BEFORE_IT_EXISTED = {"dropout_rng_impl": "rbg"}


def check_resumable(saved: dict | None, now: dict, workdir: str,
                    resumable: frozenset[str]) -> None:
  """Refuses to resume a run with settings that change its computation: one line
  listing every such setting (old -> new); method hyperparameters are compared one
  by one, and one in ``now`` that the stored run did not record is refused (its value
  in that run is unknown: the code that wrote it predates the hyperparameter), unless
  :data:`BEFORE_IT_EXISTED` says what the code did before it. A setting stored under
  an older name (:data:`cljax.options.RENAMED`) is compared under its current one."""
  if not saved:
    logging.warning("The checkpoints in %s predate stored configurations: resuming without "
                    "checking that the settings match.", workdir)
    return
  saved = {**{k: v for k, v in BEFORE_IT_EXISTED.items() if k in now},
           **with_current_names(saved)}
  changed = [f"--{k} {saved.get(k)!r} -> {now.get(k)!r}" for k in sorted(set(saved) | set(now))
             if k not in resumable and k != "method_config" and saved.get(k) != now.get(k)]
  old_hp, new_hp = saved.get("method_config") or {}, now.get("method_config") or {}
  changed += [f"--{k} {old_hp[k]!r} -> {new_hp[k]!r}" if k in old_hp else
              f"--{k} (not recorded: the checkpoint predates it) -> {new_hp[k]!r}"
              for k in sorted(new_hp) if k not in old_hp or old_hp[k] != new_hp[k]]
  if changed:
    raise ValueError(f"Cannot resume {workdir}: its run used other settings ({'; '.join(changed)})"
                     ". Resuming would mix two runs under one label: rerun with the original "
                     "settings, or start a new --workdir.")


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
