"""Orbax save and restore of everything a run needs to continue.

A checkpoint holds the :class:`~cljax.steps.TrainState` (params, optimizer state,
step, RNG, method state: EWC anchors, replay buffers, ...) and a JSON ``meta`` dict
(task index, position in the task, accuracy rows so far, timings).
"""

from __future__ import annotations

import contextlib
import gc
import logging as std_logging
import os
import re
import sys
from typing import Any

from absl import logging
import jax
import orbax.checkpoint as ocp


class _QuietOrbax:
  """Drops orbax's INFO chatter (a dozen lines per save) from the absl log, and its
  errors too while :func:`_quiet_async_leftovers` reports them once instead."""
  errors = True

  def filter(self, record) -> bool:  # pylint: disable=missing-function-docstring
    return "orbax" not in record.pathname or (record.levelno >= 30 and self.errors)


_quiet = _QuietOrbax()


class Checkpointer:
  """A thin wrapper over ``orbax.checkpoint.CheckpointManager``."""

  def __init__(self, directory: str, max_to_keep: int = 2):
    handler = logging.get_absl_handler()
    if _quiet not in handler.filters:
      handler.addFilter(_quiet)
    self.directory = os.path.abspath(directory)
    self._manager = ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True,
                                             enable_async_checkpointing=False))

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def save(self, step: int, state: Any, meta: dict) -> None:
    """Saves ``state`` and ``meta`` as checkpoint ``step`` (overwriting it). A failed
    write (disk full, quota) is one ``OSError`` naming the last complete checkpoint."""
    previous = self.latest_step()
    try:
      with _quiet_async_leftovers():
        if step in self._manager.all_steps():
          self._manager.delete(step)
        self._manager.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)))
        self._manager.wait_until_finished()
    except Exception as e:  # orbax and tensorstore wrap the OS error in their own types
      then = (f"rerun with --resume: it continues from checkpoint {previous}"
              if previous is not None else "start again in a new --workdir (no checkpoint "
              "of this run was complete)")
      raise OSError(f"Could not write checkpoint {step} to {self.directory} "
                    f"({_os_reason(e) or _root_cause(e)}). Free disk space, then {then}."
                    ) from e

  def restore_meta(self, step: int | None = None) -> dict:
    """The ``meta`` of checkpoint ``step`` (default: the newest whose meta reads)."""
    if step is not None:
      return self._restore(step, meta=ocp.args.JsonRestore())["meta"]
    return self._newest(lambda s: self._restore(s, meta=ocp.args.JsonRestore())["meta"])[0]

  def restore(self, target: Any, step: int | None = None) -> tuple[Any, dict]:
    """Restores (state, meta); ``target`` is a state (or its ``jax.eval_shape``) with
    the same structure, whose shardings the restored arrays take."""
    step = self.latest_step() if step is None else step
    abstract = jax.tree.map(
        lambda x: x if isinstance(x, jax.ShapeDtypeStruct) else
        ocp.utils.to_shape_dtype_struct(x), target)
    out = self._restore(step, state=ocp.args.StandardRestore(abstract),
                        meta=ocp.args.JsonRestore())
    return out["state"], out["meta"]

  def restore_newest(self, target: Any) -> tuple[Any, dict, int]:
    """(state, meta, step) of the newest checkpoint that restores: a newer one that
    does not (a truncated file) is skipped with a warning that says why."""
    (state, meta), step = self._newest(lambda s: self.restore(target, s))
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

  def close(self):
    self._manager.close()


@contextlib.contextmanager
def _quiet_async_leftovers():
  """orbax reads and writes arrays in asyncio tasks and threads; when one fails, the
  others print a traceback each ("Event loop is closed", "exception was never
  retrieved", "Exception ignored in coroutine", orbax's own error log): hundreds of
  lines. The caller reports the failure in one line; within this block those go."""
  hooks = sys.excepthook, sys.unraisablehook
  sys.excepthook = sys.unraisablehook = lambda *args: None
  drop = lambda record: False  # noqa: E731
  std_logging.getLogger("asyncio").addFilter(drop)
  _quiet.errors = False
  failed = True
  try:
    yield
    failed = False
  finally:
    gc.collect()
    sys.excepthook, sys.unraisablehook = hooks
    _quiet.errors = True
    if not failed:  # else the failed operation's tasks still report when collected
      std_logging.getLogger("asyncio").removeFilter(drop)


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
