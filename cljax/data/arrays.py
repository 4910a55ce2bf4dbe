"""A task's examples as arrays: tokenization (cached by content; a prompt around each
text for classification as text), the ``int32`` arrays of a subset with its labels
remapped onto the shared head, and ``load_task_data``, which reads, subsets and
tokenizes every task's splits into ``TaskData``.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
from collections.abc import Sequence

from absl import logging
import numpy as np

from cljax.data.files import Row
from cljax.data.subsets import task_subsets
from cljax.data.tasks import Task, num_labels

# ----------------------------------------------------------------------------
# Tokenization
# ----------------------------------------------------------------------------

def _tokenizer_fingerprint(tokenizer) -> str:
  vocab = tokenizer.get_vocab()
  h = hashlib.sha256(json.dumps(sorted(vocab.items())[:2000] + [len(vocab)]).encode())
  h.update(str(tokenizer.pad_token_id).encode())
  return h.hexdigest()[:16]


def _read_cache(path: str, shape: tuple[int, int]) -> tuple[np.ndarray, np.ndarray] | None:
  """A cached tokenization, or None (and the file removed) when it does not read
  back whole: it is then rebuilt."""
  try:
    with np.load(path) as f:
      ids, mask = f["input_ids"], f["attention_mask"]
    if ids.shape == mask.shape == shape:
      return ids, mask
    why = f"arrays of shape {ids.shape}, expected {shape}"
  except Exception as e:  # pylint: disable=broad-except  # truncated, not a zip, no key
    why = f"{type(e).__name__}: {e}"
  logging.warning("Tokenization cache %s is unreadable (%s); rebuilding it.", path, why)
  os.remove(path)
  return None


def _encode_prompts(texts: Sequence[str], tokenizer, max_length: int,
                    prompt: tuple[str, str]) -> dict[str, list]:
  """``prefix + text + suffix`` per text, the text truncated so that the whole fits
  ``max_length`` (the suffix, the answer marker, is never cut), right padded."""
  prefix, suffix = (tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompt)
  room = max_length - len(prefix) - len(suffix)
  if room < 1:
    raise ValueError(f"The prompt {prompt!r} takes {len(prefix) + len(suffix)} tokens, "
                     f"leaving no room for text in --max_length={max_length}.")
  ids, mask = [], []
  for text in tokenizer(list(texts), add_special_tokens=False, verbose=False)["input_ids"]:
    row = prefix + text[:room] + suffix
    ids.append(row + [tokenizer.pad_token_id] * (max_length - len(row)))
    mask.append([1] * len(row) + [0] * (max_length - len(row)))
  return {"input_ids": ids, "attention_mask": mask}


def tokenize(texts: Sequence[str], tokenizer, max_length: int,
             cache_dir: str | None = None, prompt: tuple[str, str] | None = None
             ) -> tuple[np.ndarray, np.ndarray]:
  """Token ids and attention mask, ``int32 [N, max_length]``: truncated, right padded
  with the pad (= eos) id. With ``prompt`` (before, after): each text placed between
  them, classification as text. Cached under ``cache_dir`` by content."""
  key = hashlib.sha256()
  key.update(_tokenizer_fingerprint(tokenizer).encode())
  key.update(str(max_length).encode())
  if prompt is not None:
    key.update(json.dumps(list(prompt)).encode())
  for t in texts:
    key.update(t.encode("utf-8"))
    key.update(b"\0")
  path = os.path.join(cache_dir, f"tok-{key.hexdigest()[:24]}.npz") if cache_dir else None
  if path and os.path.exists(path):
    cached = _read_cache(path, (len(texts), max_length))
    if cached is not None:
      return cached
  enc = (_encode_prompts(texts, tokenizer, max_length, prompt) if prompt is not None else
         tokenizer(list(texts), truncation=True, max_length=max_length,
                   padding="max_length", return_attention_mask=True))
  ids = np.asarray(enc["input_ids"], dtype=np.int32)
  mask = np.asarray(enc["attention_mask"], dtype=np.int32)
  if ids.shape != (len(texts), max_length):
    raise ValueError(f"Tokenizer returned shape {ids.shape}, expected "
                     f"{(len(texts), max_length)}.")
  if (mask.sum(1) == 0).any():
    bad = int(np.argmax(mask.sum(1) == 0))
    raise ValueError(f"Text {bad} ({texts[bad][:60]!r}) encodes to no tokens; check the "
                     "tokenizer (load it from a folder with load_tokenizer).")
  if path:
    os.makedirs(cache_dir, exist_ok=True)
    tmp = path + f".{os.getpid()}.tmp.npz"
    np.savez(tmp, input_ids=ids, attention_mask=mask)
    os.replace(tmp, path)
  return ids, mask


# ----------------------------------------------------------------------------
# Arrays
# ----------------------------------------------------------------------------

def make_arrays(rows: Sequence[Row], indices: Sequence[int], task: Task, task_index: int,
                total_labels: int, tokenizer, max_length: int,
                cache_dir: str | None = None, as_text: bool = False
                ) -> dict[str, np.ndarray]:
  """The arrays of one split of one task, labels remapped onto the shared head;
  ``as_text``: each text inside the task's prompt (classification as text)."""
  texts = [rows[i][0] for i in indices]
  ids, mask = tokenize(texts, tokenizer, max_length, cache_dir,
                       prompt=task.prompt if as_text else None)
  remap = task.label_map
  class_mask = np.zeros((total_labels,), bool)
  class_mask[list(task.head_labels)] = True
  n = len(indices)
  return {
      "input_ids": ids,
      "attention_mask": mask,
      "labels": np.array([remap[rows[i][1]] for i in indices], np.int32),
      "task_ids": np.full((n,), task_index, np.int32),
      "class_mask": np.broadcast_to(class_mask, (n, total_labels)).copy(),
  }


def concat(arrays: Sequence[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
  return {k: np.concatenate([a[k] for a in arrays]) for k in arrays[0]}


def size(arrays: dict[str, np.ndarray]) -> int:
  """Examples in a dict of arrays (they share their leading dimension)."""
  return len(next(iter(arrays.values())))


# ----------------------------------------------------------------------------
# Task data
# ----------------------------------------------------------------------------

@dataclasses.dataclass
class TaskData:
  task: Task
  train: dict[str, np.ndarray]
  test: dict[str, np.ndarray]
  val: dict[str, np.ndarray] | None = None
  excluded: dict[str, int] = dataclasses.field(default_factory=dict)  # base's texts left out


def load_task_data(tasks: Sequence[Task], tokenizer, *, data_dir: str | None,
                   num_train: int | None, num_test: int | None, num_val: int = 0,
                   subset: str = "balanced", max_length: int = 128, seed: int = 0,
                   cache_dir: str | None = None, as_text: bool = False,
                   exclude_keys: frozenset[str] = frozenset()) -> list[TaskData]:
  """Reads, subsets (:func:`~cljax.data.subsets.task_subsets`) and tokenizes every
  task's train, test (and validation) splits (``as_text``: inside each task's prompt,
  for classification as text)."""
  total = num_labels(tasks)
  out = []
  for k, task in enumerate(tasks):
    sub = task_subsets(task, data_dir=data_dir, num_train=num_train, num_test=num_test,
                       num_val=num_val, subset=subset, seed=seed, exclude_keys=exclude_keys)
    make = functools.partial(make_arrays, task=task, task_index=k, total_labels=total,
                             tokenizer=tokenizer, max_length=max_length,
                             cache_dir=cache_dir, as_text=as_text)
    data = TaskData(task, make(sub.train_rows, sub.train), make(sub.test_rows, sub.test),
                    make(sub.train_rows, sub.val) if num_val else None, sub.excluded)
    counts = np.bincount(data.train["labels"], minlength=total)[list(task.head_labels)]
    logging.info("Task %d %s: %d train (per class %s), %d test, %s validation; classes %s "
                 "-> head labels %s.", k, task.name, size(data.train),
                 dict(zip(task.class_names, counts.tolist())), size(data.test),
                 size(data.val) if num_val else 0, list(task.class_names),
                 list(task.head_labels))
    out.append(data)
  return out


def class_warnings(task_data: Sequence[TaskData]) -> list[str]:
  """A warning (also logged) for each task whose training subset holds a single
  class: the model can only learn to predict that class."""
  out = []
  for d in task_data:
    present = sorted(set(np.unique(d.train["labels"]).tolist()))
    if len(present) < 2 <= len(d.task.head_labels):
      name = d.task.class_names[d.task.head_labels.index(present[0])]
      out.append(f"Task {d.task.name}: its {size(d.train)} training examples are all of "
                 f"class {name!r}; check --subset (head takes the first rows of a "
                 "label-sorted file) and the data.")
      logging.warning("%s", out[-1])
  return out
