"""What a report reads, kept apart from a sweep's checkpoints and logs."""

from __future__ import annotations

import os
import shutil

from cljax.study.sweep import recorded_models


KEPT_FILES = ("results.json", "run.flags", "pseudo_samples.jsonl", "selection.json",
              "orders.json")


def bases(root: str) -> set:
  """The base weights' SHA-256 that the runs under ``root`` record (None: one that
  records none)."""
  return {model.get("source_sha256") for _, model in recorded_models(root)}


def keep_results(root: str, dest: str) -> int:
  """Copies the files a report reads (:data:`KEPT_FILES`: each run's results, flags
  and kept pseudo-examples, the sweep's strength choices and task orders) from under
  ``root`` to the same paths under ``dest``, leaving checkpoints and logs behind;
  returns how many runs' results it copied. Refuses, before copying, a ``dest`` that
  holds runs of another base (one table would mix them)."""
  mine, kept = bases(root), bases(dest) if os.path.isdir(dest) else set()
  if kept - mine:
    raise ValueError(f"{dest} holds runs from base weights {sorted(map(str, kept - mine))} "
                     f"and {root} none of them ({sorted(map(str, mine))}): keep into "
                     "another folder, or remove the old runs first.")
  runs = 0
  for folder, _, files in os.walk(root):
    for name in files:
      if name in KEPT_FILES:
        target = os.path.join(dest, os.path.relpath(folder, root))
        os.makedirs(target, exist_ok=True)
        shutil.copy2(os.path.join(folder, name), os.path.join(target, name))
        runs += name == "results.json"
  return runs
