"""Tables and figures over many runs: per method, the mean over seeds with its 95 %
t-interval.

``collect(root)`` reads every ``results.json`` under ``root``; ``aggregate`` groups
them by method and strength; ``write_report`` writes Markdown and CSV tables and
the figures, one table per task order (a sweep with ``--orders``), one over the
orders and one of each method's difference to fine-tuning paired by order and seed
(:mod:`cljax.report.tables`). A report over several roots (a method and its ablation
swept into separate roots) names a method met again in a later root by the settings
it ran with there (``generative_replay (gr_gamma=0)``).
"""

from __future__ import annotations

import csv
import json
import os
from collections import Counter, defaultdict
from typing import Any
from collections.abc import Sequence

import numpy as np

from cljax.metrics import fmt_interval as _fmt
from cljax.metrics import mean_std
from cljax.report import pseudo_labels
from cljax.report import tables as report_tables
from cljax.study import sweep

# (column key, header, function of one results dict)
def _task0_after(i):
  return lambda r, key="accuracy_matrix": r[key][i][0] if i < len(r[key]) else None


def metric_columns(num_tasks: int, first_task: str) -> list[tuple[str, str, Any]]:
  cols = [
      ("average_accuracy", "avg acc", lambda r: r["metrics"]["average_accuracy"]),
      ("forgetting", "forgetting", lambda r: r["metrics"]["forgetting"]),
      ("backward_transfer", "BWT", lambda r: r["metrics"]["backward_transfer"]),
      ("forward_transfer", "FWT", lambda r: r["metrics"]["forward_transfer"]),
  ]
  for i in range(num_tasks):
    cols.append((f"task0_after_{i}", f"{first_task} after task {i + 1}", _task0_after(i)))
  cols += [
      ("ta_average_accuracy", "task-aware avg acc",
       lambda r: r["task_aware_metrics"]["average_accuracy"]),
      ("ta_forgetting", "task-aware forgetting",
       lambda r: r["task_aware_metrics"]["forgetting"]),
      ("ta_task0_final", f"task-aware {first_task} final",
       lambda r: r["task_aware_accuracy_matrix"][-1][0]),
      ("train_seconds", "train s", lambda r: r["timing"]["train_seconds"]),
      ("generation_seconds", "generation s", _generation_seconds),
      ("task_inference", "task inference final", _task_inference),
      ("trainable_k", "trainable params k", lambda r: _model_stat(r, "trainable_parameters"
                                                                    "_per_task", 1e3)),
      ("state_mb", "train state MB", lambda r: _model_stat(r, "train_state_bytes_per_task",
                                                           2 ** 20)),
  ]
  return cols


def _task_inference(r: dict) -> float | None:
  """Per-task modules: how often the task was inferred right after the last task, over
  every task's test examples (mean of the tasks)."""
  rows = r.get("task_inference_accuracy_matrix")
  return float(np.mean(rows[-1])) if rows else None


def _model_stat(r: dict, key: str, unit: float) -> float | None:
  """The largest per-task value of ``results["model"][key]``, in ``unit``s."""
  values = (r.get("model") or {}).get(key)
  return max(values) / unit if values else None


def _generation_seconds(r: dict) -> float | None:
  """Seconds a generative method spent writing pseudo-data at the task boundaries."""
  spent = [m["generation_seconds"] for m in r.get("method_reports") or []
           if "generation_seconds" in m]
  return float(sum(spent)) if spent else None


def collect(root: str) -> list[dict]:
  """Every results.json under ``root``, with its ``workdir`` and strength ``tag``."""
  out = []
  for dirpath, dirnames, filenames in os.walk(root):
    dirnames[:] = sorted(d for d in dirnames if d not in ("checkpoints", "tensorboard",
                                                          ".jax_cache"))
    if "results.json" in filenames:
      with open(os.path.join(dirpath, "results.json")) as f:
        r = json.load(f)
      r["workdir"] = dirpath
      parent = os.path.basename(os.path.dirname(dirpath))
      r["tag"] = parent if os.path.basename(dirpath).startswith("seed") and parent != \
          r["method"] else "default"
      out.append(r)
  return out


def _variant(method: str, config: dict, earlier: dict, root: str) -> str:
  """A name for ``method`` run with ``config`` where an earlier root ran it with
  ``earlier``: the model family where it differs, the settings that differ, or the
  root when nothing does (``config``'s ``family``: the run's ``model.family``)."""
  changed = [str(v) if k == "family" else f"{k}={v:g}" if isinstance(v, float)
             else f"{k}={v}" for k, v in sorted(config.items()) if earlier.get(k) != v]
  return f"{method} ({', '.join(changed) or os.path.normpath(root)})"


def _setting(run: dict) -> dict:
  """What names a run's variant: its method's settings and its model's family."""
  return {**(run.get("method_config") or {}),
          "family": (run.get("model") or {}).get("family", "gpt2")}


def collect_roots(roots: Sequence[str]) -> list[dict]:
  """:func:`collect` over several roots. A method already met in an earlier root is
  renamed in a later one by the settings that differ (:func:`_variant`), so that a
  method and its ablation are two rows and pair by order and seed."""
  out: list[dict] = []
  for root in roots:
    runs = collect(root)
    if not runs:
      raise ValueError(f"No results.json found under {root}.")
    earlier = {r["method"]: _setting(r) for r in out}
    for r in runs:
      if r["method"] in earlier:
        r["method"] = _variant(r["method"], _setting(r), earlier[r["method"]], root)
    out += runs
  return out


def aggregate(results: list[dict], selection: dict | None = None) -> list[dict]:
  """One row per method (at its selected strength): mean, std and n of each column.

  Runs at strengths that were not selected are left out of the table (they are
  candidates, shown in the strength figure).
  """
  if not results:
    raise ValueError("No results.json found.")
  selection = selection or {}
  tasks = results[0]["tasks"]
  cols = metric_columns(len(tasks), tasks[0])
  groups: dict[tuple[str, str], list[dict]] = defaultdict(list)
  for r in results:
    sel = selection.get(r["method"], {})
    if sel.get("held_out_seed") and r["seed"] == sel.get("seed"):
      continue    # the seed the strength was chosen on, kept out of the table
    groups[(r["method"], r["tag"])].append(r)
  rows = []
  for (method, tg), runs in sorted(groups.items()):
    chosen = selection.get(method, {}).get("tag")
    if chosen is not None and tg != chosen:
      continue
    row = {"method": method, "strength": tg, "seeds": sorted(r["seed"] for r in runs),
           "n": len(runs), "runs": runs}
    for key, _, fn in cols:
      row[key] = mean_std([fn(r) for r in runs])
    rows.append(row)
  return rows


def markdown_table(rows: list[dict], tasks: Sequence[str]) -> str:
  cols = metric_columns(len(tasks), tasks[0])
  header = ["method", "strength", "seeds"] + [h for _, h, _ in cols]
  lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
  for row in rows:
    cells = [row["method"], row["strength"], str(row["n"])]
    cells += [_fmt(row[key], 1 if key.endswith(("_seconds", "_k", "_mb")) else 3)
              for key, _, _ in cols]
    lines.append("| " + " | ".join(cells) + " |")
  return "\n".join(lines)


def write_csv(rows: list[dict], tasks: Sequence[str], path: str) -> None:
  cols = metric_columns(len(tasks), tasks[0])
  with open(path, "w", newline="") as f:
    w = csv.writer(f)
    w.writerow(["method", "strength", "n_seeds", "seeds"] +
               [f"{k}_{s}" for k, _, _ in cols for s in ("mean", "std", "ci95")])
    for row in rows:
      w.writerow([row["method"], row["strength"], row["n"], " ".join(map(str, row["seeds"]))]
                 + [x for k, _, _ in cols for x in (*row[k][:2], row[k][3])])


# ----------------------------------------------------------------------------
# Figures
# ----------------------------------------------------------------------------

def figures(rows: list[dict], results: list[dict], selection: dict, outdir: str) -> list[str]:
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
  from cljax.study.figures import accuracy_matrix_axes  # pylint: disable=import-outside-toplevel
  tasks = results[0]["tasks"]
  paths = []

  # Mean accuracy matrices per method (class-incremental on top, task-aware below).
  n = len(rows)
  fig, axes = plt.subplots(2, n, figsize=(2.6 * n + 1, 5.5), squeeze=False)
  for i, row in enumerate(rows):
    for j, key in enumerate(("accuracy_matrix", "task_aware_accuracy_matrix")):
      mean = np.mean([r[key] for r in row["runs"]], axis=0)
      accuracy_matrix_axes(axes[j][i], mean, tasks,
                           f"{row['method']}\n{'class-incr.' if j == 0 else 'task-aware'}")
      if i:
        axes[j][i].set_yticks([])
  fig.suptitle("Mean accuracy matrices (row: after task; column: evaluated on)")
  paths.append(os.path.join(outdir, "report_matrices.png"))
  fig.savefig(paths[-1], dpi=110, bbox_inches="tight")
  plt.close(fig)

  # Accuracy on each task through the run, mean over seeds.
  fig, axes = plt.subplots(1, n, figsize=(2.8 * n + 1, 3.2), sharey=True, squeeze=False)
  for i, row in enumerate(rows):
    ax = axes[0][i]
    steps = [c["global_step"] for c in row["runs"][0]["curve"]]
    for j, name in enumerate(tasks):
      curves = [[c["accuracy"][j] for c in r["curve"]] for r in row["runs"]
                if len(r["curve"]) == len(steps)]
      ax.plot(steps, np.mean(curves, axis=0), marker="o", ms=3, label=name)
    for b in np.cumsum(row["runs"][0]["timing"]["steps_per_task"])[:-1]:
      ax.axvline(b, color="gray", ls=":", lw=1)
    ax.set_title(row["method"])
    ax.set_ylim(0, 1)
    ax.set_xlabel("step")
  axes[0][0].set_ylabel("test accuracy (class-incr.)")
  axes[0][-1].legend(fontsize=8)
  paths.append(os.path.join(outdir, "report_curves.png"))
  fig.savefig(paths[-1], dpi=110, bbox_inches="tight")
  plt.close(fig)

  # Forgetting against final average accuracy.
  fig, ax = plt.subplots(figsize=(6, 4.5))
  for row in rows:
    (fm, _, _, fh), (am, _, _, ah) = row["forgetting"], row["average_accuracy"]
    ax.errorbar(fm, am, xerr=np.nan_to_num(fh), yerr=np.nan_to_num(ah), fmt="o", capsize=3)
    ax.annotate(row["method"], (fm, am), textcoords="offset points", xytext=(4, 4),
                fontsize=8)
  ax.set_xlabel("forgetting (lower is better); bars: 95 % t-intervals")
  ax.set_ylabel("average accuracy after the last task")
  ax.grid(alpha=0.3)
  paths.append(os.path.join(outdir, "report_forgetting_vs_accuracy.png"))
  fig.savefig(paths[-1], dpi=110, bbox_inches="tight")
  plt.close(fig)

  # EWC-family strength against forgetting.
  grid = [(m, s) for m, s in selection.items() if s.get("candidates")]
  if grid:
    fig, ax = plt.subplots(figsize=(6, 4))
    for method, sel in grid:
      pts = sorted((r["method_config"][sel["field"]], r["metrics"]["forgetting"],
                    r["metrics"]["average_accuracy"]) for r in results
                   if r["method"] == method and r["seed"] == sel["seed"])
      if pts:
        x, f, a = zip(*pts)
        line, = ax.plot(x, f, marker="o", label=f"{method} forgetting")
        ax.plot(x, a, marker="s", ls="--", color=line.get_color(),
                label=f"{method} avg acc")
    ax.set_xscale("log")
    ax.set_xlabel("strength")
    ax.set_ylabel("test metric (seed of the selection)")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    paths.append(os.path.join(outdir, "report_strength.png"))
    fig.savefig(paths[-1], dpi=110, bbox_inches="tight")
    plt.close(fig)
  return paths


def _selection(results: list[dict], roots: Sequence[str]) -> dict:
  """The strength choices of the sweeps under ``roots`` these runs belong to
  (``selection.json`` in each sweep root, SWEEP/METHOD/STRENGTH/seedN)."""
  out = {}
  swept = {os.path.abspath(os.path.join(r["workdir"], "..", "..", "..")) for r in results}
  for root in roots:
    inside = os.path.abspath(root)
    for sweep_root in sorted(swept | {inside}):
      if os.path.commonpath([sweep_root, inside]) != inside:
        continue   # above the report's root: not this report's sweep
      if os.path.exists(os.path.join(sweep_root, "selection.json")):
        with open(os.path.join(sweep_root, "selection.json")) as f:
          out.update(json.load(f))
  return out


def _order_section(results: list[dict], roots: Sequence[str], outdir: str, suffix: str,
                   seeds: Sequence[int] | None = None) -> tuple[list, list[str]]:
  """(rows, Markdown lines and figures) of the runs of one task order; with ``seeds``,
  only those seeds' runs (and the runs a strength was chosen on)."""
  selection = _selection(results, roots)
  if seeds is not None:
    held = {s["seed"] for s in selection.values() if s.get("held_out_seed")}
    results = [r for r in results if r["seed"] in seeds or r["seed"] in held]
  rows = aggregate(results, selection)
  tasks = results[0]["tasks"]
  lines = [markdown_table(rows, tasks), ""]
  if selection:
    lines += ["Strengths chosen on validation data carved from the training files "
              "(never on test):", ""]
    for method, sel in sorted(selection.items()):
      cands = sweep.candidates_text(sel["candidates"]) or "one value"
      seed = (f", on seed {sel['seed']}" + (", not reported" if sel.get("held_out_seed")
                                            else "")) if "seed" in sel else ""
      lines.append(f"- {method}: {sel['field']}={sel['chosen']:g} ({sel['chosen_on']}{seed}; "
                   f"candidates {cands})")
    lines.append("")
  paths = figures(rows, results, selection, outdir)
  if suffix:
    for i, p in enumerate(paths):
      paths[i] = p.replace(".png", f"{suffix}.png")
      os.replace(p, paths[i])
  lines += [f"![{os.path.basename(p)}]({os.path.basename(p)})" for p in paths]
  return rows, lines


def _model_text(results: list[dict]) -> str:
  """The base the runs started from: its source and size, and the SHA-256 of its
  weights as the runs recorded it (``model.source_sha256``), with how many runs
  started from each where they differ."""
  model = results[0]["model"]
  text = f"Model {model['source']} ({model['n_layer']} layers, width {model['n_embd']})"
  bases = Counter(r["model"].get("source_sha256") for r in results)
  if list(bases) == [None]:
    return text
  if len(bases) == 1:
    return f"{text}, weights SHA-256 {next(iter(bases))}"
  return text + ", from more than one base (weights SHA-256: " + ", ".join(
      f"{sha[:12] if sha else 'not recorded'} in {n} run{'s' * (n != 1)}"
      for sha, n in sorted(bases.items(), key=lambda kv: (-kv[1], kv[0] or ""))) + ")"


def write_report(root: str | Sequence[str], outdir: str | None = None,
                 paired_with: Sequence[str] | None = None,
                 seeds: Sequence[int] | None = None) -> dict:
  """Writes report.md, report.csv and figures for the runs under ``root`` (one folder
  or several, :func:`collect_roots`): one table per task order, one over the orders
  where there are several, and each method's difference to each method of
  ``paired_with`` (default: fine-tuning, where it ran), paired by order and seed.
  ``seeds``: report only these seeds' runs (default: every seed). ``outdir`` defaults
  to the (first) root."""
  roots = [root] if isinstance(root, str) else list(root)
  outdir = outdir or roots[0]
  results = collect_roots(roots)
  if seeds is not None:
    found = {r["seed"] for r in results}
    if not set(seeds) <= found:
      raise ValueError(f"No run of seed {sorted(set(seeds) - found)} under "
                       f"{', '.join(roots)}; the seeds there are {sorted(found)}.")
  methods = sorted({r["method"] for r in results})
  missing = [m for m in paired_with or () if m not in methods]
  if missing:
    raise ValueError(f"Cannot pair with {', '.join(missing)}: no such method under "
                     f"{', '.join(roots)}; the methods are {', '.join(methods)}.")
  os.makedirs(outdir, exist_ok=True)
  orders: dict[tuple, list[dict]] = defaultdict(list)
  for r in results:
    orders[tuple(r["tasks"])].append(r)
  first = results[0]
  lines = [
      "# Forgetting study report", "",
      f"{_model_text(results)}; data per task {first['data']}; devices "
      f"{first['environment']['devices']}.", "",
      "Class-incremental accuracy takes the argmax over every class of the shared head; "
      "task-aware restricts it to the task's own classes. Each cell: the mean over "
      "seeds ± the half-width of its 95 % t-interval (Student's t with n - 1 degrees of "
      "freedom over the runs' values; the mean alone for one run)."
      + (f" Only seeds {', '.join(map(str, seeds))} are reported here." if seeds is not None
         else ""), ""]
  all_rows, csv_rows = [], []
  rank = []   # the first sweep's --orders, in their order
  listed = next((p for p in (os.path.join(r, "orders.json") for r in roots)
                 if os.path.exists(p)), None)
  if listed:
    with open(listed) as f:
      rank = [tuple(o) for o in json.load(f)]
  ranked = sorted(orders.items(), key=lambda kv: rank.index(kv[0]) if kv[0] in rank else
                  len(rank))
  for k, (tasks, runs) in enumerate(ranked):
    suffix = f"_order{k + 1}" if len(orders) > 1 else ""
    rows, section = _order_section(runs, roots, outdir, suffix, seeds)
    head = [f"## Order {k + 1}: {' -> '.join(tasks)}", ""] if len(orders) > 1 else [
        f"Tasks: {' -> '.join(tasks)}.", ""]
    lines += head + section + [""]
    all_rows.append(rows)
    csv_rows.append((rows, tasks, suffix))
  if len(orders) > 1:
    lines += ["## Over the orders", "",
              "Every run of every order; the interval over all of them (orders and seeds "
              "alike).", ""] + report_tables.over_orders(all_rows) + [""]
  for reference in paired_with or ["finetune"]:
    lines += report_tables.paired_differences(all_rows, reference)
  results = [r for _, runs in ranked for r in runs   # in the orders' order
             if seeds is None or r["seed"] in seeds]
  lines += pseudo_labels.report_lines(results)
  lines += report_tables.growth_lines(results)
  with open(os.path.join(outdir, "report.md"), "w") as f:
    f.write("\n".join(lines) + "\n")
  for rows, tasks, suffix in csv_rows:
    write_csv(rows, tasks, os.path.join(outdir, f"report{suffix}.csv"))
  return {"rows": [r for rows in all_rows for r in rows], "markdown": "\n".join(lines),
          "figures": [line for line in lines if line.startswith("![")]}
