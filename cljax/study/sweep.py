"""Sweeps over methods x seeds x method strengths, run one after another in one
process, each into its own workdir; an interrupted sweep continues where it stopped.

Strengths are chosen on validation data carved from the training files, never on
test sets: every candidate strength of a method runs on the first seed (or on a
``selection_seed`` that is not reported), the one with the best validation average
accuracy is kept, and only it runs on the other seeds. The choice and its candidates
are written to ``ROOT/selection.json``. ``run_orders`` runs one sweep per task order,
each in its own root.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Sequence

from absl import logging
import jax
from jax.experimental import multihost_utils

from cljax import data as data_lib
from cljax.methods import registry
from cljax.models import hf
from cljax.study import stages
from cljax.study.config import StudyConfig
from cljax.study.setup import OUTPUTS
from cljax.train import sharding
from cljax.train.checkpoint import Checkpointer
from cljax.train.progress import fmt_time

RESULTS = "results.json"


def base_of(cfg: StudyConfig) -> dict:
  """The weights a run of ``cfg`` starts from, as its results record them
  (``model.source``, ``model.source_sha256``; None for a random init, which the
  source and the seed make)."""
  if cfg.init != "pretrained":
    return {"source": f"random:{cfg.size}", "source_sha256": None}
  return {"source": cfg.model, "source_sha256": hf.weights_sha256(cfg.model)}


def _other_base(recorded: dict, base: dict) -> str | None:
  """Why a run whose results record ``recorded`` (their ``model``) did not start from
  ``base`` (:func:`base_of`); None where it did."""
  sha = recorded.get("source_sha256")
  if base["source_sha256"] is None:
    same = recorded.get("source") == base["source"]
    return None if same else f"started from {recorded.get('source')}"
  if sha is None:
    return "records no base SHA-256, so it cannot be shown to come from the same weights"
  return None if sha == base["source_sha256"] else f"started from weights SHA-256 {sha[:12]}"


def recorded_models(root: str):
  """(folder, the ``model`` its results record) of every finished run under ``root``."""
  for folder, _, files in sorted(os.walk(root)):
    if RESULTS in files:
      with open(os.path.join(folder, RESULTS)) as f:
        yield folder, json.load(f).get("model") or {}


def check_base(root: str, cfg: StudyConfig) -> None:
  """Refuses, in one line, a sweep root with a finished run that did not start from
  the weights ``cfg`` starts from: a missing run would otherwise be filled from
  another base without a word. (A run stopped part way keeps its base's SHA-256 in its
  checkpoint, and refuses to resume from other weights: :func:`stages.start`.)"""
  base = None
  for folder, recorded in recorded_models(root):
    base = base or base_of(cfg)   # hashed only when there is a run to compare with
    why = _other_base(recorded, base)
    if why:
      raise ValueError(f"{folder} {why}, not from --model={base['source']} (SHA-256 "
                       f"{(base['source_sha256'] or 'none: random init')[:12]}): sweep into "
                       "another --root, or give the --model its runs started from.")


def parse_grid(items: Sequence[str]) -> dict[str, tuple[str, list[float]]]:
  """``["ewc:ewc_lambda=1e2,1e4"]`` -> ``{"ewc": ("ewc_lambda", [100.0, 10000.0])}``."""
  fields = {name: hp.type for name, hp in registry.hparams().items()}
  out = {}
  for item in items:
    method, _, rest = item.partition(":")
    name, _, values = rest.partition("=")
    if not method or not name or not values:
      raise ValueError(f"Strength grid {item!r}: expected METHOD:FIELD=v1,v2.")
    if name not in fields:
      raise ValueError(f"Strength grid {item!r}: {name!r} is not a method hyperparameter; "
                       f"expected one of {sorted(fields)}.")
    cast = int if fields[name] is int else float
    out[method.strip()] = (name, [cast(v) for v in values.split(",")])
  return out


def expand_methods(methods: Sequence[str], head: str | None = None) -> list[str]:
  """``["all"]`` -> every registered method (that works with ``head``), in
  registration order."""
  out = []
  for m in methods:
    out.extend(registry.names(head) if m == "all" else [m])
  return list(dict.fromkeys(out))


def default_grids(methods: Sequence[str]) -> dict[str, tuple[str, list]]:
  """The registered strength grid (its first field) of each single method that has one."""
  out = {}
  for m in methods:
    if "+" not in m and registry.registration(m).grid:
      field, values = next(iter(registry.registration(m).grid.items()))
      out[m] = (field, list(values))
  return out


def tag(field: str | None, value) -> str:
  return "default" if field is None else f"{field}={value:g}"


def run_dir(root: str, method: str, field: str | None, value, seed: int) -> str:
  return os.path.join(root, method, tag(field, value), f"seed{seed}")


def _has_checkpoint(ckpt_dir: str) -> bool:
  if not os.path.isdir(ckpt_dir):
    return False
  ckpt = Checkpointer(ckpt_dir)
  try:
    return ckpt.latest_step() is not None
  finally:
    ckpt.close()


def _remove_partial_outputs(workdir: str) -> None:
  """A run killed before its first checkpoint starts over: its partial outputs go.
  Process 0 removes them (the outputs are its own) while the others wait, so that no
  process of a multi-host run deletes what another is removing or starting to write."""
  if jax.process_index() == 0:
    for name in OUTPUTS:
      path = os.path.join(workdir, name)
      if os.path.isdir(path):
        shutil.rmtree(path)
      elif os.path.exists(path):
        os.remove(path)
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(f"cljax sweep: partial outputs removed in {workdir}")


def _finished(workdir: str) -> dict | None:
  """A run's results if it finished; otherwise None, its outputs removed when it left
  no checkpoint to resume from (a run killed before its first starts over)."""
  path = os.path.join(workdir, RESULTS)
  if os.path.exists(path):
    with open(path) as f:
      return json.load(f)
  if not _has_checkpoint(os.path.join(workdir, "checkpoints")):
    _remove_partial_outputs(workdir)
  return None


def _strength(base: StudyConfig, field: str | None, value):
  """The method hyperparameters of ``base`` with ``field`` set to ``value``."""
  return base.method_config if field is None else base.method_config.replace(**{field: value})


def run_one(cfg: StudyConfig, workdir: str, flags: dict | None = None) -> dict:
  """Runs (or resumes, or just reads) one configuration; ``flags``: the sweep's own,
  recorded as the run's ``command_flags``."""
  done = _finished(workdir)
  if done is not None:
    return done
  resume = os.path.isdir(os.path.join(workdir, "checkpoints"))
  return stages.run(cfg, workdir, resume=resume, flags=flags)


def _side_by_side(base: StudyConfig, root: str, method: str, field: str | None,
                  runs: Sequence[tuple], flags: dict | None) -> list[tuple[str, dict]]:
  """(workdir, results) of ``runs`` ((strength, seed) pairs): those not done yet trained
  side by side (:func:`cljax.study.parallel.run_parallel`), resuming the ones with
  checkpoints."""
  from cljax.study import parallel  # pylint: disable=import-outside-toplevel
  workdirs = [run_dir(root, method, field, value, seed) for value, seed in runs]
  done = [_finished(w) for w in workdirs]
  todo = [i for i, d in enumerate(done) if d is None]
  if todo:
    ran = parallel.run_parallel(
        [base.replace(method=method, seed=runs[i][1],
                      method_config=_strength(base, field, runs[i][0])) for i in todo],
        [workdirs[i] for i in todo], resume=True, flags=[flags] * len(todo))
    for i, results in zip(todo, ran):
      done[i] = results
  return list(zip(workdirs, done))


def _write_json(path: str, value) -> None:
  if jax.process_index() == 0:   # one writer in a multi-host run
    with open(path, "w") as f:
      json.dump(value, f, indent=2)


def _val_score(results: dict) -> float:
  if not results.get("val_metrics"):
    raise ValueError("Choosing a strength needs validation data: set --num_val > 0.")
  return results["val_metrics"]["average_accuracy"]


def candidates_text(candidates: list[dict]) -> str:
  """A strength selection's candidates as ``value: validation score`` (or
  ``diverged``), comma-separated."""
  return ", ".join(f"{c['value']:g}: " + ("diverged" if c["val_average_accuracy"] is None
                                          else f"{c['val_average_accuracy']:.3f}")
                   for c in candidates)


def _chosen(method: str, field: str, values: Sequence, scores: Sequence, errors: Sequence,
            seed: int, held_out: bool) -> dict:
  """The ``selection.json`` entry of the best candidate on validation. A candidate that
  diverged (score None; its error in ``errors``) is never chosen; if every one did, the
  sweep stops with a one-line error."""
  for v, e in zip(values, errors):
    if e:
      logging.warning("%s %s diverged on seed %d and is not a candidate: %s", method,
                      tag(field, v), seed, e)
  finite = [i for i, s in enumerate(scores) if s is not None]
  if not finite:
    raise ValueError(f"Every {method} candidate diverged ({field} "
                     f"{', '.join(f'{v:g}' for v in values)}): lower --learning_rate or "
                     "give the grid smaller strengths.")
  best = max(finite, key=lambda i: scores[i])
  entry = {"field": field, "chosen": values[best], "chosen_on": "validation average accuracy",
           "seed": seed, "held_out_seed": held_out, "tag": tag(field, values[best]),
           "candidates": [{"value": v, "val_average_accuracy": s} | ({"diverged": e} if e
                                                                       else {})
                          for v, s, e in zip(values, scores, errors)]}
  logging.info("%s: chose %s=%s on validation (%s).", method, field, values[best],
               candidates_text(entry["candidates"]))
  return entry


def check_arguments(methods: Sequence[str], seeds: Sequence[int], grids: dict,
                    selection_seed: int | None) -> None:
  """Raises a one-line ValueError for a sweep that cannot run as asked: an unknown
  method, a strength grid for a method not swept, a selection seed among the reported
  ones."""
  unknown = set(grids) - set(methods)
  if unknown:
    raise ValueError(f"Strength grids for {sorted(unknown)}, which are not in --methods.")
  if selection_seed is not None and selection_seed in seeds:
    raise ValueError(f"--selection_seed={selection_seed} is among --seeds; choose a seed "
                     "that is not reported.")
  for m in methods:
    registry.parse(m)   # an unknown method: its one-line error names the registered ones


def parse_orders(values: Sequence[str]) -> list[tuple[str, ...]]:
  """``--orders`` values, each a comma-separated ``--tasks``, as task tuples."""
  return [tuple(t.strip() for t in v.split(",") if t.strip()) for v in values]


def check_orders(base: StudyConfig, orders: Sequence[Sequence[str]]) -> None:
  """Each task order a valid ``--tasks`` (its classes and label words too), before any
  run of a sweep over orders."""
  for order in orders:
    b = base.replace(tasks=tuple(order))
    data_lib.resolve_tasks(b.tasks, b.task_classes(), b.data_dir, b.task_label_words())


def _open_sweep(base: StudyConfig, root: str, methods: Sequence[str],
                seeds: Sequence[int], grids: dict, selection_seed: int | None) -> dict:
  """Checks the sweep's arguments, makes its root and shared compilation cache, and
  returns the strength choices made so far (``selection.json``)."""
  check_arguments(methods, seeds, grids, selection_seed)
  if base.distributed:   # before anything asks JAX for its processes
    sharding.initialize_distributed()
  os.makedirs(root, exist_ok=True)
  check_base(root, base)
  # One persistent compilation cache for the whole sweep: later runs reuse compiled steps.
  jax.config.update("jax_compilation_cache_dir", os.path.join(root, ".jax_cache"))
  path = os.path.join(root, "selection.json")
  if not os.path.exists(path):
    return {}
  with open(path) as f:
    return json.load(f)


def run_sweep(base: StudyConfig, root: str, methods: Sequence[str],
              seeds: Sequence[int], grids: dict[str, tuple[str, list]] | None = None,
              flags: dict | None = None, selection_seed: int | None = None,
              parallel_runs: int = 1) -> dict:
  """Runs every method on every seed (strengths chosen on validation; see module doc;
  ``selection_seed``: the candidates run on that seed, which the report leaves out,
  and the chosen strength on every seed of ``seeds``; ``parallel_runs`` > 1: the
  seeds at the chosen strength trained that many side by side, and so the strength
  candidates where the method reads its strength as a traced value,
  :mod:`cljax.study.parallel`).

  A candidate whose loss diverges (run one after another) is not chosen (:func:`_chosen`;
  a resumed sweep runs it again from its last checkpoint). Returns ``{"selection": ...,
  "runs": [workdir, ...], "results": [results or None where it diverged, ...]}``.
  """
  grids = dict(grids or {})
  selection_path = os.path.join(root, "selection.json")
  selection = _open_sweep(base, root, methods, seeds, grids, selection_seed)
  runs, all_results = [], []
  held_out = selection_seed is not None
  total = sum(len(seeds) + (len(grids[m][1]) - (0 if held_out else 1) if m in grids else 0)
              for m in methods)
  t0 = time.time()

  def candidate(method, field, value, seed):   # (score, None) or (None, why it diverged)
    try:
      return _val_score(one(method, field, value, seed)), None
    except FloatingPointError as e:
      runs.append(run_dir(root, method, field, value, seed))
      all_results.append(None)
      return None, str(e)

  def one(method, field, value, seed):
    hp = _strength(base, field, value)
    workdir = run_dir(root, method, field, value, seed)
    logging.info("[sweep %d/%d, %s elapsed] %s %s seed %d -> %s", len(runs) + 1, total,
                 fmt_time(time.time() - t0), method, tag(field, value), seed, workdir)
    results = run_one(base.replace(method=method, seed=seed, method_config=hp), workdir,
                      flags)
    runs.append(workdir)
    all_results.append(results)
    return results

  def together(method, field, pairs):
    out = []
    for i in range(0, len(pairs), parallel_runs):
      chunk = pairs[i:i + parallel_runs]
      logging.info("[sweep %d-%d/%d, %s elapsed] %s side by side: %s", len(runs) + 1,
                   len(runs) + len(chunk), total, fmt_time(time.time() - t0), method,
                   ", ".join(f"{tag(field, v)} seed {s}" for v, s in chunk))
      for workdir, results in _side_by_side(base, root, method, field, chunk, flags):
        runs.append(workdir)
        all_results.append(results)
        out.append(results)
    return out

  for method in methods:
    field, values = grids.get(method, (None, [None]))
    if len(values) > 1:
      on = selection_seed if held_out else seeds[0]
      if parallel_runs > 1 and field in registry.traced(method):
        scores = [_val_score(r) for r in together(method, field, [(v, on) for v in values])]
        errors = [None] * len(values)
      else:
        scores, errors = zip(*(candidate(method, field, v, on) for v in values))
      selection[method] = _chosen(method, field, values, scores, errors, on, held_out)
      _write_json(selection_path, selection)
      chosen, rest = selection[method]["chosen"], (seeds if held_out else seeds[1:])
    else:
      chosen, rest = values[0], seeds
      if field is not None:
        selection[method] = {"field": field, "chosen": chosen, "chosen_on": "single value",
                             "tag": tag(field, chosen), "candidates": []}
    if parallel_runs > 1:
      together(method, field, [(chosen, seed) for seed in rest])
    else:
      for seed in rest:
        one(method, field, chosen, seed)
  _write_json(selection_path, selection)
  return {"selection": selection, "runs": runs, "results": all_results}


def run_orders(base: StudyConfig, root: str, orders: Sequence[Sequence[str]],
               only: Sequence[int] | None = None, **kwargs) -> list[dict]:
  """One :func:`run_sweep` per task order, in ``root/order1``, ``root/order2``, ...
  (the orders are written to ``root/orders.json``); a task draws the same rows in
  every order. ``only``: the orders (1-based) to run now, each still in its own
  numbered folder. A root's orders may be run again in part: its first orders alone
  (say more seeds of order 1), or all of them and new ones after them."""
  os.makedirs(root, exist_ok=True)
  orders = [tuple(o) for o in orders]
  only = list(only or range(1, len(orders) + 1))
  if not set(only) <= set(range(1, len(orders) + 1)):
    raise ValueError(f"--only_orders={','.join(map(str, only))}: expected numbers from 1 to "
                     f"{len(orders)}, the positions of --orders.")
  path = os.path.join(root, "orders.json")
  before = []
  if os.path.exists(path):
    with open(path) as f:
      before = [tuple(o) for o in json.load(f)]
    n = min(len(before), len(orders))
    if before[:n] != orders[:n]:
      raise ValueError(f"{root} holds a sweep over the orders {before}; continue it with "
                       "those orders in that order (its first ones alone, or new ones "
                       "after them), or use another --root.")
  _write_json(path, [list(o) for o in max(before, orders, key=len)])
  out = []
  for i in only:
    logging.info("Order %d of %d: %s", i, len(orders), " -> ".join(orders[i - 1]))
    out.append(run_sweep(base.replace(tasks=orders[i - 1]), os.path.join(root, f"order{i}"),
                         **kwargs))
  return out
