"""Many runs in one program: runs of one study that differ only in their seed and in
the strengths their method reads as traced values (``registry.register(traced=...)``:
the step builds the method from each run's value), trained side by side as one
train step over their stacked states (:func:`over_runs`: each run's step in turn
inside the program where the runs share devices, bit for bit the step alone;
``jax.vmap`` where the run axis spreads them over devices). The run axis is laid over the
devices (:class:`cljax.train.sharding.RunAxis`: ``gcd(runs, devices)`` of them on the run
axis, each run's batch split over the rest), over every process of a multi-host run.

Each run keeps everything a run alone has: its own subsets and data order, dropout
keys, method state, checkpoints, record, logger and workdir outputs; only the train
step is shared. Per task, the runs still in it (:func:`run_parallel` groups them by
task, so a resumed group whose runs stopped at different points catches up) start
with their own ``before_task`` hooks and optimizers, train in lock step (each step
stacks every run's next batch, padded to the longest row of that step across the
runs, which length bucketing makes exact; a run whose task has fewer steps, or that
resumed further in, is held with its state unchanged), and end with their own
``after_task`` hooks, evaluations and checkpoints.

The dropout masks are drawn with threefry in a layout that ignores the padded length
(``--dropout_rng_impl=threefry``, the default; ``rbg`` is refused here: XLA's
RngBitGenerator gives other bits inside a vmap than alone), so a run side by side
equals the same run alone: bit for bit where its batch is at its own length, to
rounding where it is padded to another run's longer one (``tests/test_parallel.py``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import itertools
import time
from collections.abc import Callable, Sequence
from typing import NamedTuple

from absl import logging
import jax
import jax.numpy as jnp
import numpy as np

from cljax import data as data_lib
from cljax.methods import build as build_method
from cljax.methods import registry as method_registry
from cljax.study import stages as study_lib
from cljax.study.config import StudyConfig
from cljax.study.results import make_results, run_code_version, write_results
from cljax.train import checkpoint
from cljax.train import compile as compile_lib
from cljax.train import loop
from cljax.train import run as run_lib
from cljax.train import sharding
from cljax.train import steps
from cljax.train import tasks as tasks_lib
from cljax.train.progress import CompileTimer

DROPOUT_RNG = "threefry"


@dataclasses.dataclass
class _Run:
  """One run of the group: what it built, its state, record and logger; its task."""
  study: study_lib.Study
  state: steps.TrainState
  record: study_lib.RunRecord
  logger: object
  plan: study_lib.TaskPlan | None = None
  hooks: study_lib.TaskHooks | None = None
  mesh: dict | None = None   # the (runs, data) mesh it last trained on


def _settings(cfg: StudyConfig, traced: frozenset[str]) -> dict:
  """Every setting of ``cfg`` as flags, but its seed and its traced strengths."""
  d = {k: v for k, v in cfg.to_dict().items() if k not in ("seed", "method_config")}
  d.update({k: v for k, v in cfg.method_config.to_dict().items() if k not in traced})
  return d


def varying(cfgs: Sequence[StudyConfig]) -> tuple[str, ...]:
  """The traced strengths (``registry.traced``) whose values differ across ``cfgs``."""
  values = [c.method_config.to_dict() for c in cfgs]
  return tuple(sorted(k for k in method_registry.traced(cfgs[0].method)
                      if len({v[k] for v in values}) > 1))


def side_by_side(cfgs: Sequence[StudyConfig]) -> list[StudyConfig]:
  """The configs, after checking that they can run side by side: threefry dropout
  (the default; rbg draws other masks inside a vmap than alone) and no difference but
  their seed and the strengths their method reads as traced values (EWC's lambda...).
  Each failure is one line that says what to change."""
  other = next((c for c in cfgs if c.dropout_rng_impl != DROPOUT_RNG), None)
  if other:
    raise ValueError(f"--dropout_rng_impl={other.dropout_rng_impl} (seed {other.seed}) draws "
                     "other dropout masks inside a vmap than alone, so runs side by side "
                     f"would not equal the same runs alone: use --dropout_rng_impl={DROPOUT_RNG} "
                     "(the default), or --parallel_runs=1.")
  traced = method_registry.traced(cfgs[0].method)
  first = _settings(cfgs[0], traced)
  may = "--seed" + "".join(f", --{t}" for t in sorted(traced))
  for c in cfgs[1:]:
    other = _settings(c, traced) if c.method == cfgs[0].method else {"method": c.method}
    diff = sorted(k for k in first if k in other and first[k] != other[k])
    if diff:
      raise ValueError(f"Runs side by side must differ only in {may}; seed {c.seed} also "
                       f"differs in {', '.join('--' + d for d in diff)}. Run those one "
                       "after another.")
  names = varying(cfgs)
  runs = [(c.seed, *(c.method_config.to_dict()[n] for n in names)) for c in cfgs]
  if len(set(runs)) != len(runs):
    raise ValueError(f"Runs side by side must differ, found (seed{''.join(', ' + n for n in names)}"
                     f") {runs}.")
  if cfgs[0].mesh_model != 1:
    raise ValueError(f"Runs side by side lay their run axis and batches over the devices; "
                     f"--mesh_model={cfgs[0].mesh_model} (parameters sharded) is not supported "
                     "with them: use --mesh_model=1, or run them one after another.")
  return cfgs


# ----------------------------------------------------------------------------
# Stacking
# ----------------------------------------------------------------------------

def _stack(trees: Sequence) -> object:
  def one(*xs):
    shape = tuple(max(d) for d in zip(*(x.shape for x in xs)))
    return jnp.stack([x if x.shape == shape else
                      jnp.pad(x, [(0, m - n) for n, m in zip(x.shape, shape)]) for x in xs])
  return jax.tree.map(one, *trees)


def _unstack(tree, i):
  return jax.tree.map(lambda x: x[i], tree)


@functools.cache
def _placed(fn: Callable, out_sharding) -> Callable:
  """``fn`` jitted, its outputs on ``out_sharding`` (None: where jit puts them)."""
  return jax.jit(fn) if out_sharding is None else jax.jit(fn, out_shardings=out_sharding)


def stack(trees: Sequence, out_sharding=None) -> object:
  """The trees stacked on a new leading axis (one program), on ``out_sharding`` (the
  run axis of a :func:`cljax.train.sharding.runs_mesh`); a leaf whose shapes differ across
  the trees (generated pseudo-data, kept in different numbers) is zero-padded to the
  largest (the method reads only its first ``count`` rows)."""
  return _placed(_stack, out_sharding)(list(trees))


def unstack(tree, i: int, out_sharding=None):
  """Run ``i``'s tree (one program for every ``i``), on ``out_sharding`` (the run's
  own mesh, as its evaluation and hooks expect it)."""
  return _placed(_unstack, out_sharding)(tree, i)


def stack_batches(batches: Sequence[dict], buckets: Sequence[int]) -> dict:
  """The runs' batches of one step (each at full length) as one ``[runs, batch, ...]``
  batch, cut to the smallest bucket that holds the longest row of any of them."""
  n, b = len(batches), data_lib.size(batches[0])
  joined = data_lib.concat(batches)
  if buckets:
    joined = data_lib.trim_to_bucket(joined, buckets)
  return {k: v.reshape((n, b) + v.shape[1:]) for k, v in joined.items()}


class StepFns(NamedTuple):
  """The jitted step of every run at once: ``full`` when every run steps, ``held``
  (``active`` per run: a run with 0 keeps its state) when some do not; the select over
  the whole state costs about a third of a step at the tiny size on a CPU, so only
  the steps that need it pay it."""
  full: Callable
  held: Callable


def over_runs(fn: Callable, axis: sharding.RunAxis) -> Callable:
  """``fn`` of one run over the stacked runs: where the runs share their devices (a
  run axis of 1 on the mesh), each run's step in turn inside the one program
  (``jax.lax.map``), which computes bit for bit what the run's step alone does; where
  the run axis spreads them over devices, ``jax.vmap``, whose batched products round
  differently from a run alone (by about 1e-8, which training can amplify)."""
  if axis.mesh.shape["runs"] > 1:
    return jax.vmap(fn)
  return lambda *args: jax.lax.map(lambda xs: fn(*xs), args)


def make_step_fns(model, tx, method, axis: sharding.RunAxis,
                  rebuild: Callable[[dict], object] | None = None) -> StepFns:
  """The steps take ``(state, batch, values)`` (and ``active``), ``values`` each run's
  traced strengths (``{name: [runs]}``, empty when the runs share them): with
  ``rebuild``, the method is built inside the step from them; over the runs as
  :func:`over_runs` says."""
  def one(state, batch, values):
    m = method if rebuild is None else rebuild(values)
    return steps.train_step(state, batch, model=model, tx=tx, method=m,
                            dropout_rng_impl=DROPOUT_RNG)

  def one_held(state, batch, values, active):
    new, metrics = one(state, batch, values)
    return jax.tree.map(lambda a, b: jnp.where(active, a, b), new, state), metrics
  out = (axis.runs, axis.replicated)
  return StepFns(
      jax.jit(over_runs(one, axis), in_shardings=(axis.runs, axis.batches, axis.runs),
              out_shardings=out, donate_argnums=0),
      jax.jit(over_runs(one_held, axis),
              in_shardings=(axis.runs, axis.batches, axis.runs, axis.replicated),
              out_shardings=out, donate_argnums=0))


def _values(runs: Sequence[_Run], names: Sequence[str], axis: sharding.RunAxis) -> dict:
  """The runs' traced strengths ``names``, one float32 per run, on the run axis."""
  return {n: sharding.put_global(np.asarray([r.study.cfg.method_config.to_dict()[n]
                                             for r in runs], np.float32), axis.runs)
          for n in names}


# ----------------------------------------------------------------------------
# A task, side by side
# ----------------------------------------------------------------------------

class _Metrics:
  """One step's stacked metrics, read to the host once, when a run's logger first
  reads its share (at its log point): no per-run slicing on the device."""

  def __init__(self, metrics: dict):
    self.metrics, self.host = metrics, None

  def of(self, i: int) -> _RunMetrics:
    return _RunMetrics(self, i)

  def read(self) -> dict:
    if self.host is None:
      self.host = jax.device_get(self.metrics)
    return self.host


class _RunMetrics:
  """Run ``i``'s metrics of a step, as the step logger reads them (``m[key]``)."""

  def __init__(self, shared: _Metrics, i: int):
    self.shared, self.i = shared, i

  def __getitem__(self, key: str):
    return self.shared.read()[key][self.i]


def _batch_streams(runs: Sequence[_Run], k: int):
  """Each run's batches of task k from where it stands, at full length; and a batch
  of each run to hold it with once its task is over."""
  streams, spare = [], []
  for r in runs:
    cfg = r.study.cfg
    make = functools.partial(loop.epoch_batches, r.plan.arrays, cfg.batch_size,
                             epochs=cfg.epochs, seed=(cfg.seed, k))
    streams.append(make(start=r.record.step_in_task))
    spare.append(next(make(start=0)))
  return streams, spare


def _later_stacked_batches(runs: Sequence[_Run], k: int):
  """The stacked batches the later tasks that share task k's step will train on (each
  run's own data, as it draws it), so that their programs compile in this round."""
  study = runs[0].study
  for j in study_lib.later_tasks_alike(study, runs[0].plan):
    streams = [loop.epoch_batches(r.study.task_data[j].train, r.study.cfg.batch_size,
                                  epochs=r.study.cfg.epochs, seed=(r.study.cfg.seed, j))
               for r in runs]
    for batches in zip(*streams):
      yield stack_batches(list(batches), study.buckets)


@contextlib.contextmanager
def _naming(r: _Run):
  """A run's non-finite loss stops the group; the error names the run."""
  try:
    yield
  except FloatingPointError as e:
    raise FloatingPointError(f"Run {r.study.workdir} (seed {r.study.cfg.seed}), trained "
                             f"side by side: {e}") from e


def train_side_by_side(runs: Sequence[_Run], k: int, step_fns: dict) -> None:
  """Task k for every run of ``runs`` (each after its ``start_task``), in lock step."""
  study = runs[0].study
  cfg = study.cfg
  for r in runs:
    r.hooks = study_lib.task_hooks(r.study, r.plan, r.record, r.logger)
  starts = [r.record.step_in_task for r in runs]
  totals = [r.plan.total_steps for r in runs]
  logging.info("Task %d/%d %s: %d runs side by side (seeds %s), %s steps of batch %d (%s).",
               k + 1, len(study.tasks), study.tasks[k].name, len(runs),
               [r.study.cfg.seed for r in runs], totals, cfg.batch_size, study.method.name)
  axis = sharding.RunAxis.over(study.mesh, len(runs))
  names = varying([r.study.cfg for r in runs])
  key = (tasks_lib.trainable_key(study.method, study.param_shapes, k),
         axis.mesh.shape["runs"], names)
  if key not in step_fns:
    rebuild = functools.partial(build_method, cfg.method, cfg.method_config,
                                study.method_context) if names else None
    step_fns[key] = make_step_fns(study.model, runs[0].plan.tx, study.method, axis, rebuild)
  fns = step_fns[key]
  values = _values(runs, names, axis)
  own = sharding.replicated(study.mesh)   # a run's state alone (--mesh_model=1)
  stacked = stack([r.state for r in runs], axis.runs)
  for r in runs:
    r.mesh = dict(axis.mesh.shape)
    r.state = None   # the stacked copy is the state now (and holds the memory)
  streams, spare = _batch_streams(runs, k)
  plan = []   # (step, who steps, the stacked batch), all made ahead
  for s in range(min(starts), max(totals)):
    active = [a <= s < t for a, t in zip(starts, totals)]
    plan.append((s, active, stack_batches(
        [next(it) if on else x for it, x, on in zip(streams, spare, active)], study.buckets)))
  ahead = itertools.chain((b for _, active, b in plan if all(active)),
                          _later_stacked_batches(runs, k))
  compile_lib.compile_programs([(fns.full, (stacked, axis.batch_shapes(b), values))
                          for b in data_lib.one_batch_per_shape(ahead)])
  for s, active, batch in plan:
    if all(active):
      stacked, metrics = fns.full(stacked, axis.put_batch(batch), values)
    else:
      stacked, metrics = fns.held(stacked, axis.put_batch(batch), values,
                                  sharding.put_global(np.asarray(active), axis.replicated))
    shared = _Metrics(metrics)
    for i, r in enumerate(runs):
      if active[i]:
        with _naming(r):
          loop.record_step(s + 1, shared.of(i), lambda i=i, st=stacked: unstack(st, i, own),
                           total=r.plan.total_steps, logger=r.logger,
                           advance=r.hooks.advance, periodic=r.hooks.periodic)
    for r in runs:
      r.logger.stop_after(cfg.stop_after_steps)
  for i, r in enumerate(runs):
    r.state = unstack(stacked, i, own)
    with _naming(r):
      r.logger.flush()
    r.hooks.finish()


# ----------------------------------------------------------------------------
# The runs
# ----------------------------------------------------------------------------

def _open(cfgs: Sequence[StudyConfig], workdirs: Sequence[str], resume: bool,
          compiling: CompileTimer) -> list[_Run]:
  """Each run's study, state, record and logger; the runs share the first one's model
  and evaluation program, so each compiles once, and its method (with its hooks'
  programs) unless their strengths differ."""
  runs = []
  own_methods = bool(varying(cfgs))
  for i, (cfg, workdir) in enumerate(zip(cfgs, workdirs)):
    study = study_lib.setup(cfg, workdir, resume)
    if runs:
      first = runs[0].study
      study = dataclasses.replace(study, model=first.model, eval_fn=first.eval_fn,
                                  method=study.method if own_methods else first.method)
    state, record = study_lib.start(study, resume)
    logger = run_lib.open_logger(workdir, record.global_step, cfg.log_every,
                                 study.checkpointer, enabled=study.writes_files,
                                 on_first_step=compiling.mark if i == 0 else None)
    runs.append(_Run(study, state, record, logger))
  return runs


def run_parallel(cfgs: Sequence[StudyConfig], workdirs: Sequence[str], *,
                 resume: bool = False, flags: Sequence[dict | None] | None = None
                 ) -> list[dict]:
  """Runs the studies ``cfgs`` (differing only in seed) side by side, each into its
  workdir, and returns each one's results dict (also in its ``results.json``), as
  :func:`cljax.study.run` would alone with ``--dropout_rng_impl=threefry``."""
  t_start = time.time()
  run_code_version()   # the code this run starts with, read before any work
  cfgs = side_by_side(cfgs)
  flags = list(flags or [None] * len(cfgs))
  with CompileTimer() as compiling:
    runs = _open(cfgs, workdirs, resume, compiling)
    step_fns: dict = {}
    try:
      for k in range(min(r.record.task for r in runs), len(runs[0].study.tasks)):
        group = [r for r in runs if r.record.task == k]
        for r in group:
          r.state, r.plan = study_lib.start_task(r.study, k, r.state, r.record)
        train_side_by_side(group, k, step_fns)
        for r in group:
          r.state = study_lib.finish_task(r.study, r.plan, r.state, r.record, r.logger)
    finally:
      for r in runs:
        r.logger.close()
        r.study.checkpointer.close()
  out = []
  for r, f in zip(runs, flags):
    results = make_results(r.study, r.record, f, time.time() - t_start)
    results["timing"].update(compiling.summary(), runs_side_by_side=len(runs),
                             runs_mesh=r.mesh)
    results["timing"].update(checkpoint.timing(r.study.checkpointer))
    if r.study.writes_files:
      write_results(results, r.study.workdir)
    out.append(results)
  return out

