"""Reading rows from local files: ``data_dir/task/split`` as JSON Lines, JSON, CSV or
Parquet, each row checked and named by file and line in errors; text files as UTF-8.
"""

from __future__ import annotations

import csv
import io
import json
import os
from typing import Any

import numpy as np

SUFFIXES = (".jsonl", ".json", ".csv", ".parquet")

# ----------------------------------------------------------------------------
# Reading rows
# ----------------------------------------------------------------------------

Row = tuple[str, int, str]   # (text, source label, where: "file:line")


def find_split_file(data_dir: str, task: str, split: str) -> str:
  """``data_dir/task/split.{jsonl,json,csv,parquet}``, with a clear error if absent."""
  folder = os.path.join(data_dir, task)
  for suffix in SUFFIXES:
    path = os.path.join(folder, split + suffix)
    if os.path.exists(path):
      return path
  found = sorted(os.listdir(folder)) if os.path.isdir(folder) else "no such folder"
  raise FileNotFoundError(
      f"No {split} file for task {task!r}: expected {folder}/{split}" + "{"
      + ",".join(SUFFIXES) + "} with columns text and label; found: " + str(found))


def check_row(text: Any, label: Any, where: str) -> Row:
  """``(text, label, where)`` once checked: the text a non-empty string, the label an
  integer class id (``1.0`` and ``"1"`` are read as 1); errors name ``where``."""
  if not isinstance(text, str):
    raise ValueError(f"{where}: 'text' must be a string, found {type(text).__name__}.")
  if not text.strip():
    raise ValueError(f"{where}: empty text. Remove the row or fill it in.")
  if isinstance(label, float) and label.is_integer():
    label = int(label)
  if isinstance(label, str) and label.strip().lstrip("-").isdigit():
    label = int(label)
  if isinstance(label, bool) or not isinstance(label, (int, np.integer)):
    raise ValueError(f"{where}: 'label' must be an integer class id, found {label!r}.")
  return text, int(label), where


def read_text(path: str) -> str:
  """A text file's contents as UTF-8 (a leading byte-order mark is dropped); a byte
  that is not UTF-8 is an error naming the file, line and column."""
  with open(path, "rb") as f:
    raw = f.read()
  try:
    return raw.decode("utf-8-sig")
  except UnicodeDecodeError as e:
    line = raw.count(b"\n", 0, e.start) + 1
    column = e.start - (raw.rfind(b"\n", 0, e.start) + 1) + 1
    raise ValueError(f"{path}:{line}: byte {raw[e.start]:#04x} at column {column} is not "
                     "UTF-8; re-encode the file as UTF-8 (e.g. iconv -f latin1 -t utf-8)."
                     ) from None


def read_json_records(path: str) -> list[tuple[Any, str]]:
  """(object, where) pairs of a JSON Lines file, or of a .json file holding one list;
  ``where`` ("file:line", or "file:item i") names the row in errors."""
  text = read_text(path)
  if path.endswith(".json") and text.lstrip().startswith("["):
    try:
      items = json.loads(text)
    except json.JSONDecodeError as e:
      raise ValueError(f"{path}:{e.lineno}: not valid JSON ({e.msg}).") from None
    return [(item, f"{path}:item {i}") for i, item in enumerate(items)]
  out = []
  for n, line in enumerate(text.split("\n"), 1):
    if line.strip():
      try:
        out.append((json.loads(line), f"{path}:{n}"))
      except json.JSONDecodeError as e:
        raise ValueError(f"{path}:{n}: not valid JSON ({e.msg}); expected one object per "
                         "line.") from None
  return out


def read_rows(path: str, text_field: str = "text", label_field: str = "label") -> list[Row]:
  """Rows of a JSONL / CSV / Parquet file, each checked; errors name file and line."""
  rows: list[Row] = []
  if path.endswith((".jsonl", ".json")):
    for obj, where in read_json_records(path):
      if not isinstance(obj, dict) or text_field not in obj or label_field not in obj:
        raise ValueError(f"{where}: expected an object with keys {text_field!r} and "
                         f"{label_field!r}, found {str(obj)[:80]!r}.")
      rows.append(check_row(obj[text_field], obj[label_field], where))
  elif path.endswith(".csv"):
    reader = csv.DictReader(io.StringIO(read_text(path), newline=""))
    if not reader.fieldnames or {text_field, label_field} - set(reader.fieldnames):
      raise ValueError(f"{path}: expected a header with columns {text_field!r} and "
                       f"{label_field!r}, found {reader.fieldnames}.")
    for obj in reader:
      rows.append(check_row(obj[text_field], obj[label_field],
                             f"{path}:{reader.line_num}"))
  elif path.endswith(".parquet"):
    import pyarrow.parquet as pq  # pylint: disable=import-outside-toplevel
    table = pq.read_table(path)
    missing = {text_field, label_field} - set(table.column_names)
    if missing:
      raise ValueError(f"{path}: missing columns {sorted(missing)}; found "
                       f"{table.column_names}.")
    for n, (text, label) in enumerate(zip(table.column(text_field).to_pylist(),
                                          table.column(label_field).to_pylist())):
      rows.append(check_row(text, label, f"{path}:row {n}"))
  else:
    raise ValueError(f"{path}: unsupported file type; expected one of {SUFFIXES}.")
  if not rows:
    raise ValueError(f"{path}: no rows.")
  return rows
