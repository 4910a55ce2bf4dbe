"""What a report reads, kept apart from a sweep's checkpoints and logs."""

from __future__ import annotations

import os
import shutil


KEPT_FILES = ("results.json", "pseudo_samples.jsonl", "selection.json", "orders.json")


def keep_results(root: str, dest: str) -> int:
  """Copies the files a report reads (:data:`KEPT_FILES`: each run's results and kept
  pseudo-examples, the sweep's strength choices and task orders) from under ``root``
  to the same paths under ``dest``, leaving checkpoints and logs behind; returns how
  many runs' results it copied."""
  runs = 0
  for folder, _, files in os.walk(root):
    for name in files:
      if name in KEPT_FILES:
        target = os.path.join(dest, os.path.relpath(folder, root))
        os.makedirs(target, exist_ok=True)
        shutil.copy2(os.path.join(folder, name), os.path.join(target, name))
        runs += name == "results.json"
  return runs
