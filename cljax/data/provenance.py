"""What a model was trained on, by content.

Every text has a key, the first 16 hex digits of its UTF-8 SHA-256. LM training can
keep a fixed part of a file (``--data_fraction``: the rows whose key falls below the
fraction, the same rows for every seed and row order) and writes the keys of every
text it trained on into the exported model folder (``pretraining_texts.json``, with
the keys of the model it started from). A study started from that folder leaves
those texts out of its training subsets, validation splits and test sets, so that a
pretrained base never saw a row the study trains or tests on.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable

FILE = "pretraining_texts.json"
_KEY_SPACE = 16 ** 16


def text_key(text: str) -> str:
  """The key of a text: the first 16 hex digits of its UTF-8 SHA-256."""
  return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def in_fraction(text: str, fraction: float) -> bool:
  """Whether a text falls in the part of size ``fraction`` that is chosen by its key
  (uniform over texts; the same answer in every run)."""
  return int(text_key(text), 16) < fraction * _KEY_SPACE


def read_keys(model: str | None) -> frozenset[str]:
  """The keys of the texts the model folder ``model`` was trained on (empty where the
  folder keeps no list: a hub id, a folder from elsewhere)."""
  path = os.path.join(os.path.expanduser(model), FILE) if model else ""
  if not path or not os.path.isfile(path):
    return frozenset()
  with open(path) as f:
    record = json.load(f)
  keys = record.get("text_keys") if isinstance(record, dict) else None
  if not isinstance(keys, list):
    raise ValueError(f"{path}: expected an object with a 'text_keys' list; the file is "
                     "damaged, so the texts the model was trained on are unknown. Restore "
                     "it from the training run, or delete it to use the model anyway.")
  return frozenset(keys)


def write_keys(model_dir: str, keys: Iterable[str], **about) -> int:
  """Writes ``model_dir/pretraining_texts.json``: the sorted keys and ``about`` (the
  sources, the commit); returns how many keys it holds."""
  keys = sorted(set(keys))
  with open(os.path.join(model_dir, FILE), "w") as f:
    json.dump({"about": about, "count": len(keys), "text_keys": keys}, f, indent=0)
  return len(keys)


def git_commit(path: str) -> str | None:
  """The commit of the git checkout holding ``path``, with ``-dirty`` where a tracked
  file differs from it (None outside a checkout)."""
  import subprocess  # pylint: disable=import-outside-toplevel
  where = ["git", "-C", os.path.dirname(os.path.abspath(path))]
  try:
    head = subprocess.run(where + ["rev-parse", "HEAD"], capture_output=True, text=True,
                          timeout=10, check=True).stdout.strip()
    dirty = subprocess.run(where + ["status", "--porcelain", "-uno"], capture_output=True,
                           text=True, timeout=10, check=True).stdout.strip()
  except (OSError, subprocess.SubprocessError):
    return None
  return (head + ("-dirty" if dirty else "")) or None
