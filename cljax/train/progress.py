"""Progress of a training run: step metrics read once per logged window, rates, ETA,
compile counts, and the writers (JSON Lines and TensorBoard).

The train step returns device arrays; reading them right away would stall the host on
every step. :class:`StepLogger` holds them and reads a window of ``log_every`` steps in
one transfer once the next step has been dispatched (or at a flush: before an
evaluation, a checkpoint, the end of a task), so the device never waits. Reading them
is where a non-finite loss or gradient stops the run, naming its first such step; a
checkpoint is never written before the steps it holds were read, and never holds a
non-finite state.
"""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Callable

from absl import logging
import jax


# A task "diverged" when its last logged training loss is this many times its loss at
# the task's first step: a sign that a learning rate or a strength is far too large.
DIVERGENCE_FACTOR = 10.0


class CompileTimer:
  """XLA programs built while it is open (a context manager), from JAX's own events:
  ``programs`` compiled (``seconds``: their compile time, summed: programs compiled at
  once count each, so the sum can exceed the wall time they took) and ``loaded`` from
  the persistent cache; ``compiled_after`` and ``loaded_after``, those built after
  :meth:`mark` (the loop marks its first step, after which nothing should be built)."""

  BUILT = "/jax/core/compile/backend_compile_duration"   # compiled or loaded
  LOADED = "/jax/compilation_cache/cache_hits"            # fires first, in the same thread

  def __init__(self):
    self.seconds, self.programs, self.loaded = 0.0, 0, 0
    self.compiled_after = self.loaded_after = 0
    self._marked = False
    self._hit = threading.local()
    self._lock = threading.Lock()   # programs compile in parallel threads (compile_ahead)

  def _count(self, event: str, **kwargs) -> None:
    del kwargs
    if event == self.LOADED:
      self._hit.value = True

  def _listen(self, event: str, duration: float, **kwargs) -> None:
    del kwargs
    if event != self.BUILT:
      return
    loaded, self._hit.value = getattr(self._hit, "value", False), False
    with self._lock:
      if loaded:
        self.loaded += 1
        self.loaded_after += self._marked
      else:
        self.seconds += duration
        self.programs += 1
        self.compiled_after += self._marked

  def mark(self) -> None:
    """From now on, count the programs built in ``compiled_after`` / ``loaded_after``."""
    self._marked = True

  def summary(self) -> dict:
    """The counts for ``results.json``'s timing."""
    return {"compile_seconds_this_process": self.seconds,
            "compiled_programs_this_process": self.programs,
            "loaded_programs_this_process": self.loaded,
            "compiled_after_first_step": self.compiled_after,
            "loaded_after_first_step": self.loaded_after}

  def __enter__(self) -> CompileTimer:
    jax.monitoring.register_event_duration_secs_listener(self._listen)
    jax.monitoring.register_event_listener(self._count)
    return self

  def __exit__(self, *exc) -> None:
    jax.monitoring.unregister_event_duration_listener(self._listen)
    jax.monitoring.unregister_event_listener(self._count)


def fmt_time(seconds: float) -> str:
  seconds = int(max(seconds, 0))
  h, rem = divmod(seconds, 3600)
  m, s = divmod(rem, 60)
  return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s"


def drop_records_after(path: str, global_step: int) -> int:
  """Removes the records of ``path`` (JSON Lines) past ``global_step``, and any line cut
  short by a kill: a resumed run replays those steps. Returns how many were removed."""
  if not os.path.exists(path):
    return 0
  with open(path) as f:
    lines = [line for line in f.read().splitlines() if line.strip()]
  keep = []
  for line in lines:
    try:
      if json.loads(line).get("global_step", 0) <= global_step:
        keep.append(line)
    except json.JSONDecodeError:
      pass
  if len(keep) < len(lines):
    with open(path + ".tmp", "w") as f:
      f.write("".join(line + "\n" for line in keep))
    os.replace(path + ".tmp", path)
    logging.info("%s: dropped %d records past global step %d (replayed on resume).", path,
                 len(lines) - len(keep), global_step)
  return len(lines) - len(keep)


class Interrupted(RuntimeError):
  """Raised by ``--stop_after_steps``: the run stopped as if killed."""


class Writers:
  """Records to ``metrics.jsonl`` and TensorBoard scalars; ``enabled=False`` (every
  process but the first of a multi-host run) writes nothing."""

  def __init__(self, workdir: str, enabled: bool = True):
    self.jsonl = self.tb = None
    if not enabled:
      return
    self.jsonl = open(os.path.join(workdir, "metrics.jsonl"), "a")
    try:  # tensorboard's own writer: no TensorFlow, and no torch (tensorboardX imports it)
      from tensorboard.summary.writer.event_file_writer import (  # pylint: disable=import-outside-toplevel
          EventFileWriter)
      self.tb = EventFileWriter(os.path.join(workdir, "tensorboard"))
    except ImportError:
      self.tb = None

  def write(self, record: dict, step: int, prefix: str) -> None:
    if self.jsonl is None:
      return
    self.jsonl.write(json.dumps(record) + "\n")
    self.jsonl.flush()
    if self.tb:
      from tensorboard.compat.proto import event_pb2, summary_pb2  # pylint: disable=import-outside-toplevel
      values = [summary_pb2.Summary.Value(tag=f"{prefix}/{k}", simple_value=float(v))
                for k, v in record.items()
                if isinstance(v, (int, float)) and k not in ("step", "task")]
      self.tb.add_event(event_pb2.Event(wall_time=time.time(), step=int(step),
                                        summary=summary_pb2.Summary(value=values)))

  def close(self) -> None:
    if self.jsonl is not None:
      self.jsonl.close()
    if self.tb:
      self.tb.close()


class StepLogger:
  """Checks and logs the step metrics of one task at a time (see the module doc).

  Args:
    writers: where records go.
    log_every: a record every N steps of a task (and at its last step).
    last_checkpoint: returns the step of the last saved checkpoint (for the error).
    unit: what ``count`` counts, for the rate (``examples``; ``tokens`` in LM training).
    on_first_step: called once, when this process's first step was dispatched.
  """

  _SUMS = ("loss_sum", "correct", "count")

  def __init__(self, writers: Writers, log_every: int,
               last_checkpoint: Callable[[], int | None], unit: str = "examples",
               on_first_step: Callable[[], None] | None = None):
    self.writers, self.log_every = writers, log_every
    self.on_first_step = on_first_step
    self.unit = unit
    self.last_checkpoint = last_checkpoint
    self.steps_this_process = 0
    self._pending: list[tuple[int, int, dict]] = []
    self._start_loss = self._last_loss = None   # per task: first step, last logged window
    self._task = (0, "", 1)
    self._lr: Callable[[int], float] = lambda s: 0.0
    self._reset()

  def _reset(self) -> None:
    self._t, self._examples, self._steps = time.time(), 0.0, 0
    self._sums = dict.fromkeys(self._SUMS, 0.0)

  def start_task(self, k: int, name: str, total_steps: int,
                 learning_rate: Callable[[int], float]) -> None:
    """Starts counting a task's steps; ``learning_rate(step_in_task)`` for the log."""
    self.flush()
    self._task, self._lr = (k, name, total_steps), learning_rate
    self._start_loss = self._last_loss = None
    self._reset()

  def push(self, global_step: int, step_in_task: int, metrics: dict) -> None:
    """Holds this step's metrics (device arrays). Once ``log_every`` steps are held, all
    but this one are read to the host in one transfer and checked: the host never waits
    on the step it just dispatched, and reads the device once per logged window."""
    self._pending.append((global_step, step_in_task, metrics))
    self.steps_this_process += 1
    if self.steps_this_process == 1 and self.on_first_step:
      self.on_first_step()
    if len(self._pending) > max(self.log_every, 1):
      held, self._pending = self._pending[:-1], self._pending[-1:]
      self._read(held)

  def stop_after(self, steps: int | None) -> None:
    """Flushes and raises :class:`Interrupted` once this process has taken ``steps``
    steps (testing: a kill at a known point; None: never)."""
    if steps and self.steps_this_process >= steps:
      self.flush()
      raise Interrupted(f"Stopped after {self.steps_this_process} steps "
                        "(--stop_after_steps).")

  def flush(self) -> None:
    """Reads, checks (and logs) every held step."""
    held, self._pending = self._pending, []
    self._read(held)

  def _read(self, held: list[tuple[int, int, dict]]) -> None:
    if held:
      for (g, s, _), m in zip(held, jax.device_get([m for _, _, m in held])):
        self._check(g, s, m)

  def _check(self, g: int, s: int, m: dict) -> None:
    k, name, total = self._task
    if not m["finite"]:
      raise FloatingPointError(
          f"Non-finite loss or gradient at task {k} ({name}), step {s} (loss sum "
          f"{m['loss_sum']}, penalty {m['penalty']}, grad norm {m['grad_norm']}). Nothing "
          f"after the last good checkpoint (global step {self.last_checkpoint()}) was "
          "saved. Lower --learning_rate or the method's strength, or check the data, and "
          "start a new --workdir (--resume refuses changed settings).")
    if self._start_loss is None:
      self._start_loss = float(m["loss_sum"]) / max(float(m["count"]), 1.0)
    for key in self._SUMS:
      self._sums[key] += float(m[key])
    self._examples += float(m["count"])
    self._steps += 1
    if s % self.log_every == 0 or s == total:
      self._log(g, s, m)

  def _log(self, g: int, s: int, m: dict) -> None:
    k, name, total = self._task
    elapsed = max(time.time() - self._t, 1e-9)
    rate = self._examples / elapsed
    count = max(self._sums["count"], 1)
    record = {"global_step": g, "task": k, "step": s,
              "loss": self._sums["loss_sum"] / count, "accuracy": self._sums["correct"] / count,
              "penalty": float(m["penalty"]), "grad_norm": float(m["grad_norm"]),
              "learning_rate": float(self._lr(s)), f"{self.unit}_per_s": rate}
    self.writers.write(record, g, "train")
    self._last_loss = record["loss"]
    eta = (total - s) * elapsed / max(self._steps, 1)
    logging.info("task %d %s step %d/%d loss %.4f acc %.3f lr %.2e | %.1f %s/s, ETA task %s",
                 k, name, s, total, record["loss"], record["accuracy"],
                 record["learning_rate"], rate, self.unit, fmt_time(eta))
    self._reset()

  def divergence(self, factor: float = DIVERGENCE_FACTOR) -> str | None:
    """A warning when the task's last logged training loss is above ``factor`` times
    its loss at the task's first step (seen by this process), else None."""
    k, name, _ = self._task
    if self._start_loss is None or self._last_loss is None:
      return None
    if self._last_loss > factor * max(self._start_loss, 1e-6):
      return (f"Training diverged on task {k} ({name}): its loss ended at "
              f"{self._last_loss:.4g}, over {factor:g}x its first step's {self._start_loss:.4g}"
              "; the results are not a trained model's. Lower --learning_rate or the "
              "method's strength.")
    return None

  def evaluation(self, global_step: int, k: int, accuracies: dict[str, float]) -> None:
    """Writes an evaluation record (accuracy per task name)."""
    self.writers.write({"global_step": global_step, "task": k,
                        **{f"accuracy/{n}": a for n, a in accuracies.items()}},
                       global_step, "eval")

  def close(self) -> None:
    self.writers.close()
