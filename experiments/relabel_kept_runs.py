r"""Gives every kept run under docs/results the flags that reproduce it.

Runs made before a run recorded its own flags (2026-12-07) kept the flags of the
process that ran them: a sweep over task orders recorded its first order's --tasks
in the runs of every order. For each kept ``results.json`` of a study run this moves
those flags to ``command_flags`` and writes the run's own as ``flags`` (its tasks,
seed, method and hyperparameters as the run recorded them; a setting the run
predates at the value the code then used, ``cljax.train.run.BEFORE_IT_EXISTED``;
others at today's defaults), and the same as a flagfile, ``run.flags``. It also moves
the LAMOL_TASK runs, order 2 of the three-task stream, to ``order2/`` under a root
that lists the stream's three orders. Idempotent: a run that has ``command_flags``
is left as it is.

  python experiments/relabel_kept_runs.py [--root=docs/results] [--dry_run]
"""

import json
import os
import shutil
import sys

from absl import app
from absl import flags

from cljax.options import with_current_names
from cljax.study.config import StudyConfig
from cljax.study.results import write_run_flags
from cljax.train.run import BEFORE_IT_EXISTED

_ROOT = flags.DEFINE_string("root", "docs/results", "Folder of kept runs.")
_DRY = flags.DEFINE_bool("dry_run", False, "Only say what would change.")

LAMOL_TASK = "stream3_lamol_task/runs"
STREAM3_ORDERS = "stream3_lamol/runs/orders.json"


def own_flags(results: dict) -> dict:
  """A kept run's own flags, from the flags it recorded and its recorded facts."""
  recorded = with_current_names(results["flags"])
  given = {**BEFORE_IT_EXISTED, **recorded, **results["method_config"],
           "tasks": results["tasks"], "seed": results["seed"], "method": results["method"]}
  return StudyConfig.from_flags(given).to_flags()


def relabel(path: str, dry_run: bool) -> str | None:
  """Rewrites one results.json; returns what changed (None: nothing)."""
  with open(path) as f:
    results = json.load(f)
  if "accuracy_matrix" not in results or "command_flags" in results:
    return None   # not a study run (LM pretraining), or relabelled already
  old = results["flags"]
  new = own_flags(results)
  changed = sorted(k for k in new if k in old and with_current_names(old).get(k) != new[k])
  if not dry_run:
    results["command_flags"], results["flags"] = old, new
    with open(path, "w") as f:
      json.dump(results, f, indent=2)
    write_run_flags(os.path.dirname(path), new)
  return ", ".join(changed) or "moved to command_flags"


def move_lamol_task(root: str, dry_run: bool) -> None:
  """LAMOL_TASK ran order 2 alone, which its sweep named order1: moved to order2."""
  runs = os.path.join(root, LAMOL_TASK)
  if not os.path.isdir(os.path.join(runs, "order1")):
    return
  with open(os.path.join(root, STREAM3_ORDERS)) as f:
    orders = json.load(f)
  with open(os.path.join(runs, "orders.json")) as f:
    assert json.load(f) == [orders[1]], "LAMOL_TASK's runs are not order 2 of the stream"
  print(f"{runs}/order1 -> order2 (the stream's order 2), orders.json: the three orders")
  if not dry_run:
    shutil.move(os.path.join(runs, "order1"), os.path.join(runs, "order2"))
    with open(os.path.join(runs, "orders.json"), "w") as f:
      json.dump(orders, f, indent=2)


def main(argv):
  del argv
  move_lamol_task(_ROOT.value, _DRY.value)
  n = 0
  for folder, _, files in sorted(os.walk(_ROOT.value)):
    if "results.json" in files:
      what = relabel(os.path.join(folder, "results.json"), _DRY.value)
      if what:
        n += 1
        print(f"{folder}: {what}")
  print(f"{n} runs relabelled{' (dry run)' if _DRY.value else ''}.", file=sys.stderr)


if __name__ == "__main__":
  app.run(main)
