"""Orbax save and restore of everything a run needs to continue.

A checkpoint holds the :class:`~cljax.steps.TrainState` (params, optimizer state,
step, RNG, method state: EWC anchors, replay buffers, ...) and a JSON ``meta`` dict
(task index, position in the task, accuracy rows so far, timings).
"""

from __future__ import annotations

import os
from typing import Any

from absl import logging
import jax
import orbax.checkpoint as ocp


class _QuietOrbax:
  """Drops orbax's INFO chatter (a dozen lines per save) from the absl log."""

  def filter(self, record) -> bool:  # pylint: disable=missing-function-docstring
    return record.levelno >= 30 or "orbax" not in record.pathname


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
    """Saves ``state`` and ``meta`` as checkpoint ``step`` (overwriting it)."""
    if step in self._manager.all_steps():
      self._manager.delete(step)
    self._manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)))
    self._manager.wait_until_finished()

  def restore_meta(self, step: int | None = None) -> dict:
    step = self.latest_step() if step is None else step
    return self._manager.restore(step, args=ocp.args.Composite(
        meta=ocp.args.JsonRestore()))["meta"]

  def restore(self, target: Any, step: int | None = None) -> tuple[Any, dict]:
    """Restores (state, meta); ``target`` is a state (or its ``jax.eval_shape``) with
    the same structure, whose shardings the restored arrays take."""
    step = self.latest_step() if step is None else step
    abstract = jax.tree.map(
        lambda x: x if isinstance(x, jax.ShapeDtypeStruct) else
        ocp.utils.to_shape_dtype_struct(x), target)
    out = self._manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore()))
    return out["state"], out["meta"]

  def close(self):
    self._manager.close()
