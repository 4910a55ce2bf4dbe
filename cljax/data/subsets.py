"""The rows each task trains and tests on: one split of a task read from the hub
(through ``datasets``) or from ``--data_dir``, its labels checked against the task's
classes, and the seeded ``balanced`` or ``head`` subsets of it.
"""

from __future__ import annotations

import dataclasses
import zlib
from collections.abc import Sequence

from absl import logging
import numpy as np

from cljax.data.files import Row, check_row, find_split_file, read_rows
from cljax.data.provenance import text_key
from cljax.data.tasks import TASKS, Task, TaskSpec

# ----------------------------------------------------------------------------
# Loading a task's rows
# ----------------------------------------------------------------------------

def load_hub_rows(spec: TaskSpec, split: str) -> list[Row]:
  """Rows of a hub dataset split, through ``datasets``."""
  if spec.hub_id is None:
    raise ValueError(f"Task {spec.name!r} has no hub dataset; pass --data_dir.")
  try:
    import datasets  # pylint: disable=import-outside-toplevel
    ds = datasets.load_dataset(spec.hub_id, split=split)
  except Exception as e:  # offline, renamed dataset, ...
    raise OSError(
        f"Could not load {spec.hub_id!r} split {split!r} from the Hugging Face hub "
        f"({type(e).__name__}: {e}). Offline, pass --data_dir=DIR with "
        f"DIR/{spec.name}/{{train,test}}.jsonl (one {{\"text\", \"label\"}} per line).") from e
  where = f"hub:{spec.hub_id}/{split}"
  return [check_row(text, label, f"{where}:{i}") for i, (text, label) in
          enumerate(zip(ds[spec.text_field], ds[spec.label_field]))]


def load_rows(task: Task, split: str, data_dir: str | None) -> list[Row]:
  """Rows of one split of a task, checking every label is a known class id."""
  spec = TASKS.get(task.dataset)
  if data_dir:
    path = find_split_file(data_dir, task.dataset, split)
    rows = read_rows(path, *(spec.text_field, spec.label_field) if spec else ())
  else:
    rows = load_hub_rows(spec, split)
  n_classes = len(spec.class_names) if spec else None
  if n_classes is not None:
    for _, label, where in rows:
      if not 0 <= label < n_classes:
        raise ValueError(f"{where}: label {label} is outside task {task.name!r}'s classes "
                         f"0..{n_classes - 1} ({', '.join(spec.class_names)}).")
  return rows


# ----------------------------------------------------------------------------
# Subsets
# ----------------------------------------------------------------------------

def select(rows: Sequence[Row], task: Task, num: int | None, mode: str,
           seed: int | Sequence[int], exclude: frozenset[int] = frozenset()) -> list[int]:
  """Indices of a subset of ``rows`` restricted to the task's classes.

  ``balanced``: seeded, shuffled, as equal as possible per class. ``head``: the first
  ``num`` rows of the selected classes in file order (with all classes selected,
  the literal ``split[:num]`` of the original script). ``num=None`` takes all.
  ``exclude`` removes indices already used (a validation split carved from train).
  ``seed`` is any ``np.random.default_rng`` seed (``(seed, task, split)`` here).
  """
  pool = [i for i, (_, label, _) in enumerate(rows)
          if label in task.source_labels and i not in exclude]
  if num is None or num >= len(pool):
    if num is not None and num > len(pool):
      logging.warning("Task %s: asked for %d examples, only %d available; using all.",
                      task.name, num, len(pool))
    num = len(pool)
  if mode == "head":
    return pool[:num]
  if mode != "balanced":
    raise ValueError(f"Unknown subset mode {mode!r}; expected 'balanced' or 'head'.")
  rs = np.random.default_rng(seed)
  by_class = {c: [i for i in pool if rows[i][1] == c] for c in task.source_labels}
  for c in by_class:
    rs.shuffle(by_class[c])
  # Equal shares; a class with too few examples gives its remainder to the others.
  quota = {c: 0 for c in by_class}
  left = num
  while left > 0:
    open_classes = [c for c in by_class if quota[c] < len(by_class[c])]
    share = max(left // len(open_classes), 1)
    for c in open_classes:
      take = min(share, len(by_class[c]) - quota[c], left)
      quota[c] += take
      left -= take
      if left == 0:
        break
  chosen = [i for c in by_class for i in by_class[c][:quota[c]]]
  rs.shuffle(chosen)
  return chosen


@dataclasses.dataclass(frozen=True)
class Subsets:
  """The rows a task trains, validates and tests on: indices into its files' rows."""
  train_rows: list
  train: list[int]
  test_rows: list
  test: list[int]
  val: list[int]
  excluded: dict[str, int]     # rows left out as a base model's pretraining text


def task_seed(task: Task) -> int:
  """A number naming the task by its dataset and classes, not by its place in the
  stream: a task draws the same rows in every order of the tasks."""
  return zlib.crc32(f"{task.dataset}:{sorted(task.source_labels)}".encode())


def task_subsets(task: Task, *, data_dir: str | None, num_train: int | None,
                 num_test: int | None, num_val: int = 0, subset: str = "balanced",
                 seed: int = 0, exclude_keys: frozenset[str] = frozenset()) -> Subsets:
  """The rows every run with these settings trains, validates and tests on.

  Rows whose text key (:func:`cljax.data.provenance.text_key`) is in
  ``exclude_keys`` (the texts a base model was pretrained on) are never drawn. The
  validation split (``num_val`` > 0) is carved from the training file, disjoint from
  the training subset, so that strengths are never chosen on test data."""
  train_rows = load_rows(task, "train", data_dir)
  test_rows = load_rows(task, "test", data_dir)
  seen = lambda rows: frozenset(  # noqa: E731
      i for i, (text, label, _) in enumerate(rows)
      if exclude_keys and label in task.source_labels and text_key(text) in exclude_keys)
  out_train, out_test = seen(train_rows), seen(test_rows)
  name = task_seed(task)
  train = select(train_rows, task, num_train, subset, (seed, name, 0), exclude=out_train)
  val = (select(train_rows, task, num_val, "balanced", (seed, name, 1),
                exclude=out_train | frozenset(train)) if num_val else [])
  test = select(test_rows, task, num_test, subset, (seed, name, 2), exclude=out_test)
  for split, drawn, asked, left_out in (("training", train, num_train, out_train),
                                        ("validation", val, num_val, out_train),
                                        ("test", test, num_test, out_test)):
    if not drawn and asked != 0:
      raise ValueError(f"Task {task.name}: no {split} rows left to draw ({len(left_out)} left "
                       "out as the base model's pretraining text, the rest taken by the "
                       "training subset); lower --num_train or --num_val, or pretrain on "
                       "other rows.")
  if out_train or out_test:
    logging.info("Task %s: left out %d training and %d test rows that the base model was "
                 "pretrained on.", task.name, len(out_train), len(out_test))
  return Subsets(train_rows, train, test_rows, test, val,
                 {"train": len(out_train), "test": len(out_test)})
