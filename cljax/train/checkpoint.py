"""Orbax save and restore of everything a run needs to continue, and the rules of a
run's workdir.

A checkpoint holds the :class:`~cljax.train.steps.TrainState` (params, optimizer state,
step, RNG, method state: EWC anchors, replay buffers, ...) and a JSON ``meta`` dict
(the run's settings and progress). :func:`open_run` refuses a workdir that holds
another run, or a resume with settings that change the computation;
:func:`save_finite` never saves a non-finite state.
"""

from __future__ import annotations

import contextlib
import functools
import gc
import hashlib
import logging as std_logging
import os
import re
import sys
import threading
import time
from typing import Any

from absl import logging
import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp


class _QuietOrbax:
  """Drops orbax's INFO chatter (a dozen lines per save) from the absl log, and its
  errors too while :func:`_quiet_async_leftovers` reports them once instead."""
  errors = True
  failed = False   # after a failure, asyncio's log and "Event loop is closed" stay dropped

  def filter(self, record) -> bool:  # pylint: disable=missing-function-docstring
    return "orbax" not in record.pathname or (record.levelno >= 30 and self.errors)


_quiet = _QuietOrbax()


class Checkpointer:
  """A thin wrapper over ``orbax.checkpoint.CheckpointManager`` that writes in the
  background: :meth:`save` returns once the arrays are copied off the devices, and the
  files are written while training goes on. Orbax writes into a temporary folder and
  renames it when complete, so a process killed mid-write leaves the previous
  checkpoint the newest. A failed write (disk full) is reported at the next
  :meth:`save`, :meth:`wait` or :meth:`close` as one ``OSError``. Nothing is created on
  disk until the first save (a run refused after opening it leaves no folder)."""

  def __init__(self, directory: str, max_to_keep: int = 2):
    handler = logging.get_absl_handler()
    if _quiet not in handler.filters:
      handler.addFilter(_quiet)
    self.directory = os.path.abspath(directory)
    self._max_to_keep = max_to_keep
    self._opened = None
    self._writing: tuple[int, int | None] | None = None   # (step, the one before it)
    self.blocked_seconds = 0.0   # the callers' time in save/wait/close: what a run waits
    self.saves = 0

  @property
  def _manager(self) -> ocp.CheckpointManager:
    if self._opened is None:
      self._opened = ocp.CheckpointManager(
          self.directory,
          options=ocp.CheckpointManagerOptions(
              max_to_keep=self._max_to_keep, create=True, cleanup_tmp_directories=True,
              enable_async_checkpointing=True,
              multiprocessing_options=ocp.options.MultiprocessingOptions(
                  barrier_sync_key_prefix=_barrier_prefix(self.directory))))
    return self._opened

  def latest_step(self) -> int | None:
    """The newest complete checkpoint (waits for a write in progress)."""
    if self._opened is None and not os.path.isdir(self.directory):
      return None
    self.wait()
    return self._manager.latest_step()

  def save(self, step: int, state: Any, meta: dict) -> None:
    """Starts saving ``state`` and ``meta`` as checkpoint ``step`` (overwriting it),
    after the previous write is complete; returns when the arrays are on the host."""
    self.wait()   # counts its own blocked time
    t0 = time.perf_counter()
    previous = self.latest_step()
    try:
      with _quiet_async_leftovers():
        if step in self._manager.all_steps():
          self._manager.delete(step)
        self._manager.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)))
    except Exception as e:  # orbax and tensorstore wrap the OS error in their own types
      raise _write_error(self.directory, step, previous, e) from e
    self._writing = step, previous
    self.saves += 1
    _quiet_background(True)
    self.blocked_seconds += time.perf_counter() - t0

  def wait(self) -> None:
    """Blocks until the checkpoint being written is complete. A failed write (disk
    full, quota) is one ``OSError`` naming the last complete checkpoint."""
    if self._writing is None:
      return
    (step, previous), self._writing = self._writing, None
    t0 = time.perf_counter()
    try:
      with _quiet_async_leftovers():
        self._manager.wait_until_finished()
    except Exception as e:  # pylint: disable=broad-except
      raise _write_error(self.directory, step, previous, e) from e
    finally:
      self.blocked_seconds += time.perf_counter() - t0

  def restore_meta(self, step: int | None = None) -> dict:
    """The ``meta`` of checkpoint ``step`` (default: the newest whose meta reads)."""
    if step is not None:
      return self._restore(step, meta=ocp.args.JsonRestore())["meta"]
    return self._newest(lambda s: self._restore(s, meta=ocp.args.JsonRestore())["meta"])[0]

  def restore(self, target: Any, step: int | None = None, *,
              saved_shapes_under: str | None = None) -> tuple[Any, dict]:
    """Restores (state, meta); ``target`` is a state (or its ``jax.eval_shape``) with
    the same structure, whose shardings the restored arrays take. Arrays under the
    field ``saved_shapes_under`` (``"method_state"``: generated pseudo-data grows from
    task to task) take the shape they were saved with."""
    step = self.latest_step() if step is None else step
    abstract = jax.tree.map(
        lambda x: x if isinstance(x, jax.ShapeDtypeStruct) else
        ocp.utils.to_shape_dtype_struct(x), target)
    if saved_shapes_under:
      abstract = self._saved_shapes(abstract, step, saved_shapes_under)
    out = self._restore(step, state=ocp.args.StandardRestore(abstract),
                        meta=ocp.args.JsonRestore())
    return out["state"], out["meta"]

  def _saved_shapes(self, abstract: Any, step: int, under: str) -> Any:
    from etils import epath  # pylint: disable=import-outside-toplevel  # orbax's own
    tree = ocp.StandardCheckpointHandler().metadata(
        epath.Path(self.directory) / str(step) / "state").tree
    saved = {m.name: m.shape for m in jax.tree.leaves(tree) if hasattr(m, "name")}

    def take(path, leaf):
      name = ".".join(str(getattr(k, "name", getattr(k, "idx", getattr(k, "key", k))))
                      for k in path)
      shape = saved.get(name)
      if not name.startswith(under + ".") or shape is None or tuple(shape) == leaf.shape:
        return leaf
      return jax.ShapeDtypeStruct(tuple(shape), leaf.dtype, sharding=leaf.sharding)
    return jax.tree_util.tree_map_with_path(take, abstract)

  def restore_newest(self, target: Any, *, saved_shapes_under: str | None = None
                     ) -> tuple[Any, dict, int]:
    """(state, meta, step) of the newest checkpoint that restores: a newer one that
    does not (a truncated file) is skipped with a warning that says why. ``target`` may
    be a function of the checkpoint's meta (the state's structure depends on the task
    it was saved in: per-task trainable parameters)."""
    def one(step):
      t = target(self.restore_meta(step)) if callable(target) else target
      return self.restore(t, step, saved_shapes_under=saved_shapes_under)
    (state, meta), step = self._newest(one)
    return state, meta, step

  def _restore(self, step: int, **items):
    return self._manager.restore(step, args=ocp.args.Composite(**items))

  def _newest(self, restore) -> tuple[Any, int]:
    failures = []
    for step in sorted(self._manager.all_steps(), reverse=True):
      try:
        with _quiet_async_leftovers():
          out = restore(step)
      except Exception as e:  # pylint: disable=broad-except  # any unreadable checkpoint
        failures.append(f"checkpoint {step}: {_root_cause(e)}")
        logging.warning("Skipping checkpoint %d in %s, which does not restore (%s); trying "
                        "the next older one.", step, self.directory, _root_cause(e))
        continue
      return out, step
    why = "; ".join(failures) or "none saved"
    raise ValueError(f"No checkpoint in {self.directory} restores ({why}); start a new "
                     "--workdir.")

  def close(self) -> None:
    """Waits for the write in progress (raising its failure), then closes orbax's
    manager."""
    if self._opened is not None:
      try:
        self.wait()
      finally:
        self._opened.close()


def _barrier_prefix(directory: str) -> str:
  """The prefix of this directory's multi-host barriers. Orbax names its barriers by
  step, so two managers writing at once (runs side by side, each saving in the
  background) would wait at one barrier and fail ("Barrier ... is already ongoing").
  The directory is the same path in every process, so its hash agrees across them."""
  return "ckpt" + hashlib.sha1(directory.encode()).hexdigest()[:12]


@contextlib.contextmanager
def _quiet_async_leftovers():
  """orbax reads and writes arrays in asyncio tasks and threads; when one fails, the
  others print a traceback each ("Event loop is closed", "exception was never
  retrieved", "Exception ignored in coroutine", orbax's own error log): hundreds of
  lines. The caller reports the failure in one line; within this block those go, and
  after a failure so does "Event loop is closed" from the tasks and threads that
  outlive the block (on a loaded machine they report after it)."""
  hooks = sys.excepthook, sys.unraisablehook, threading.excepthook
  sys.excepthook = sys.unraisablehook = threading.excepthook = lambda *args: None
  _quiet_background(True)
  failed = True
  try:
    yield
    failed = False
  finally:
    if failed or _quiet.failed:  # a failed operation's tasks report when collected:
      gc.collect()                 # here, quietly
    sys.excepthook, sys.unraisablehook, threading.excepthook = (
        hooks if not failed else [_without_closed_loop(h) for h in hooks])
    _quiet.failed |= failed
    _quiet_background(False)


def _drop(record) -> bool:  # pylint: disable=unused-argument
  return False


def _quiet_background(on: bool) -> None:
  """While a checkpoint is written in the background, orbax's error log, asyncio's
  tracebacks and the "Event loop is closed" of its threads go: :meth:`Checkpointer.wait`
  reports a failure in one line."""
  _quiet.errors = not on
  if not on and _quiet.failed:  # the failed operation's tasks still report when collected
    return
  logger = std_logging.getLogger("asyncio")
  (logger.addFilter if on else logger.removeFilter)(_drop)
  change = _without_closed_loop if on else _with_closed_loop
  sys.excepthook, sys.unraisablehook, threading.excepthook = (
      change(h) for h in (sys.excepthook, sys.unraisablehook, threading.excepthook))


def _without_closed_loop(hook):
  """``hook`` wrapped by ``_unless_closed_loop`` once: a later failure does not nest it."""
  if isinstance(hook, functools.partial) and hook.func is _unless_closed_loop:
    return hook
  return functools.partial(_unless_closed_loop, hook)


def _with_closed_loop(hook):
  """The hook that ``_without_closed_loop`` wrapped."""
  if isinstance(hook, functools.partial) and hook.func is _unless_closed_loop:
    return hook.args[0]
  return hook


def _unless_closed_loop(hook, *args) -> None:
  """``hook`` (sys's, sys's unraisable or threading's) but for "Event loop is closed"."""
  value = args[0].exc_value if len(args) == 1 else args[1]
  if not (isinstance(value, RuntimeError) and "Event loop is closed" in str(value)):
    hook(*args)


def _write_error(directory: str, step: int, previous: int | None, e: BaseException
                 ) -> OSError:
  then = (f"rerun with --resume: it continues from checkpoint {previous}"
          if previous is not None else "start again in a new --workdir (no checkpoint "
          "of this run was complete)")
  return OSError(f"Could not write checkpoint {step} to {directory} "
                 f"({_os_reason(e) or _root_cause(e)}). Free disk space, then {then}.")


def _os_reason(e: BaseException) -> str | None:
  """The operating system's words for the error under ``e`` ("No space left on
  device"), from an OSError or a tensorstore message's ``os_error_code``."""
  while e is not None:
    if isinstance(e, OSError) and e.errno:
      return os.strerror(e.errno)
    code = re.search(r"os_error_code='?(\d+)", str(e))
    if code:
      return os.strerror(int(code.group(1)))
    e = e.__cause__ or e.__context__
  return None


def _root_cause(e: BaseException) -> str:
  """The first line of the innermost cause (tensorstore's own words, not orbax's
  wrapper that prints the whole array spec)."""
  while e.__cause__ is not None:
    e = e.__cause__
  return _first_line(e)


def _first_line(e: BaseException) -> str:
  """``Type: first line``, its middle elided past 300 characters (the OS error, such
  as "No space left on device", is at the end of tensorstore's messages)."""
  lines = str(e).strip().splitlines()
  line = lines[0] if lines else ""
  return f"{type(e).__name__}: {line if len(line) <= 300 else line[:120] + ' ... ' + line[-175:]}"



@jax.jit
def all_finite(tree) -> jax.Array:
  """Whether every float in ``tree`` is finite (one device scalar): the sum of every
  float times 0 is 0, or NaN where one is infinite or NaN (one reduction per leaf
  compiles in half the time of an ``all(isfinite)`` per leaf)."""
  leaves = [x for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.inexact)]
  return jnp.isfinite(sum(jnp.sum(x.astype(jnp.float32) * 0) for x in leaves))


def timing(ckpt: Checkpointer | None) -> dict:
  """The checkpoints this process saved and the seconds the run waited for them (the
  finiteness check, the copy off the devices, a previous write still in progress)."""
  return ({"checkpoints_saved": ckpt.saves,
           "checkpoint_blocked_seconds": round(ckpt.blocked_seconds, 3)} if ckpt else {})


def save_finite(ckpt: Checkpointer, step: int, state: Any, meta: dict) -> None:
  """Saves ``state`` as checkpoint ``step`` after checking on device that every float
  in it (params, optimizer and method state) is finite: a checkpoint never is not."""
  t0 = time.perf_counter()
  finite = bool(all_finite(state))
  ckpt.blocked_seconds += time.perf_counter() - t0
  if not finite:
    raise FloatingPointError(
        f"Non-finite parameters or optimizer state after global step {step}; not saved. "
        f"The last finite checkpoint is global step {ckpt.latest_step()}. Lower "
        "--learning_rate or the method's strength, or check the data, and start a new "
        "--workdir.")
  ckpt.save(step, state, meta)
