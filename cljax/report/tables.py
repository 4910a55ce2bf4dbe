"""The tables a report adds across its per-order tables: each method over every run
of every order, each method's difference to a reference method paired by order and
seed, and the units and parameters a growing network's tasks use (DEN).

Each cell is a mean over runs ± the half-width of its 95 % t-interval
(:func:`cljax.metrics.mean_std`). Runs of two methods with the same task order and
seed train on the same rows from the same initial weights, so their paired
differences carry less noise than the gap between two unpaired means.
"""

from __future__ import annotations

from collections import defaultdict

from cljax.metrics import fmt_interval, mean_std

# (header, function of one results dict): what the tables over runs compare.
COLUMNS = (("avg acc", lambda r: r["metrics"]["average_accuracy"]),
           ("forgetting", lambda r: r["metrics"]["forgetting"]),
           ("BWT", lambda r: r["metrics"]["backward_transfer"]),
           ("first task final", lambda r: r["accuracy_matrix"][-1][0]),
           ("last task final", lambda r: r["accuracy_matrix"][-1][-1]),
           ("task-aware avg acc", lambda r: r["task_aware_metrics"]["average_accuracy"]))


def _by_method(rows_by_order: list[list[dict]]) -> tuple[dict, dict]:
  runs: dict[str, list[dict]] = defaultdict(list)
  strengths: dict[str, set] = defaultdict(set)
  for rows in rows_by_order:
    for row in rows:   # a method's strength may be chosen differently in each order
      runs[row["method"]].extend(row["runs"])
      strengths[row["method"]].add(row["strength"])
  return runs, strengths


def over_orders(rows_by_order: list[list[dict]]) -> list[str]:
  """Each method over every run of every order (the interval over all of them): the
  average accuracy, forgetting, BWT, the first task's accuracy after the last
  (whichever task comes first in its order) and the task-aware average accuracy."""
  runs, strengths = _by_method(rows_by_order)
  lines = ["| method | strength | runs | " + " | ".join(c for c, _ in COLUMNS) + " |",
           "|---" * (3 + len(COLUMNS)) + "|"]
  for method, rs in sorted(runs.items()):
    cells = [fmt_interval(mean_std([get(r) for r in rs])) for _, get in COLUMNS]
    lines.append(f"| {method} | {', '.join(sorted(strengths[method]))} | {len(rs)} | "
                 + " | ".join(cells) + " |")
  return lines


def _key(r: dict) -> tuple:
  return tuple(r["tasks"]), r["seed"]


def _pairs(runs: list[dict], reference: list[dict]) -> list[tuple[dict, dict]]:
  """(run, the reference's run with the same task order and seed) for each run that
  has one."""
  ref = {_key(r): r for r in reference}
  return [(r, ref[_key(r)]) for r in runs if _key(r) in ref]


def _paired(pairs: list[tuple[dict, dict]], get) -> str:
  """The interval over the pairs' differences of ``get`` (None where either lacks it)."""
  values = [(get(a), get(b)) for a, b in pairs]
  return fmt_interval(mean_std([None if x is None or y is None else x - y
                                for x, y in values]))


def paired_differences(rows_by_order: list[list[dict]], reference: str = "finetune"
                       ) -> list[str]:
  """Each method minus ``reference`` on the runs they share (same task order and
  seed), the interval over those differences; with several orders, also the average
  accuracy's paired difference in each order alone. No lines without the reference or
  without a shared run."""
  runs, _ = _by_method(rows_by_order)
  orders = [tuple(rows[0]["runs"][0]["tasks"]) for rows in rows_by_order]
  lines, per_order = [], []
  for method, rs in sorted(runs.items()):
    pairs = _pairs(rs, runs.get(reference, [])) if method != reference else []
    if not pairs:
      continue
    lines.append(f"| {method} | {len(pairs)} | "
                 + " | ".join(_paired(pairs, get) for _, get in COLUMNS) + " |")
    cells = []
    for order in orders:
      in_order = [p for p in pairs if tuple(p[0]["tasks"]) == order]
      cells.append(f"{_paired(in_order, COLUMNS[0][1])} ({len(in_order)})" if in_order
                   else "-")
    per_order.append(f"| {method} | " + " | ".join(cells) + " |")
  if not lines:
    return []
  head = [f"## Against {reference}, paired", "",
          f"Each method minus {reference} on the same task order and seed (the same rows "
          "and initial weights), the mean of those differences ± the half-width of its 95 % "
          "t-interval; where the interval holds 0, these runs do not separate the method "
          f"from {reference}.", "",
          "| method | pairs | " + " | ".join(c for c, _ in COLUMNS) + " |",
          "|---" * (2 + len(COLUMNS)) + "|"]
  out = head + lines + [""]
  if len(rows_by_order) > 1:
    out += [f"Average accuracy minus {reference}'s, paired, in each order alone (pairs):",
            "", "| method | " + " | ".join(f"order {k + 1}" for k in range(len(rows_by_order)))
            + " |", "|---" * (1 + len(rows_by_order)) + "|"] + per_order + [""]
  return out


def growth_lines(results: list[dict]) -> list[str]:
  """A table for methods whose runs report the parameters each task's network uses
  (``parameters_in_use`` in ``method_reports``: DEN): per method, order and task, the
  parameters and MLP units the task uses after the last task, and the units selected,
  added, pruned and split when it trained, each the mean over the runs ± the
  half-width of its 95 % t-interval."""
  runs: dict[tuple, list[list[dict]]] = defaultdict(list)
  for r in results:
    reps = [m for m in r.get("method_reports") or [] if "parameters_in_use" in m]
    if reps:
      runs[(r["method"], tuple(r["tasks"]))].append(reps)
  if not runs:
    return []
  head = ["method", "task", "seeds", "parameters in use (k)", "units in use",
          "units selected", "added", "pruned", "split"]
  lines = ["## Units and parameters in use", "",
           "Each task's network after the last task (parameters in thousands, MLP units "
           "over all blocks), and what happened to the units when the task trained.", "",
           "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
  for (method, tasks), reps in runs.items():
    for k, name in enumerate(tasks):
      values = [[rs[-1]["parameters_in_use"][k] / 1e3 for rs in reps],
                [rs[-1]["units_in_use"][k] for rs in reps]]
      values += [[sum(rs[k].get(key) or [0]) for rs in reps]
                 for key in ("units_selected", "units_added", "units_pruned", "units_split")]
      cells = [method, name, str(len(reps))] + [fmt_interval(mean_std(v), 1) for v in values]
      lines.append("| " + " | ".join(cells) + " |")
  return lines + [""]
