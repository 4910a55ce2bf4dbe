"""Tasks, label remapping, seeded subsets, tokenization and fixed-shape batches.

A task's examples flow: rows ``{"text", "label"}`` (from the hub through
``datasets`` or from local JSONL / CSV / Parquet files) -> the task's selected
classes, remapped onto the shared head after the previous tasks' labels -> a
seeded subset -> ``int32`` arrays of fixed length -> batches of fixed shape whose
last one is padded and masked (``weights`` 0), never dropped.
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import io
import json
import os
from typing import Any
from collections.abc import Iterable, Iterator, Sequence

from absl import logging
import numpy as np

# ----------------------------------------------------------------------------
# Task definitions
# ----------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class TaskSpec:
  """A classification dataset: where it lives and what its label ids mean."""
  name: str
  class_names: tuple[str, ...]      # source label id -> name
  hub_id: str | None = None         # Hugging Face datasets id
  default_classes: tuple[str, ...] | None = None   # None: all classes
  text_field: str = "text"
  label_field: str = "label"
  # Classification as text (--head=lm): the prompt around the text, and each class's
  # label word (source label order; None: the class names after a space).
  prompt: tuple[str, str] = ("", "\nLabel:")
  label_words: tuple[str, ...] | None = None


TASKS: dict[str, TaskSpec] = {
    "imdb": TaskSpec("imdb", ("neg", "pos"), hub_id="stanfordnlp/imdb",
                     prompt=("Review: ", "\nSentiment:"),
                     label_words=(" negative", " positive")),
    # AG News label ids: 0 World, 1 Sports, 2 Business, 3 Sci/Tech. The study's
    # stated intent is Sci/Tech and Sports (its code kept World and Sports).
    "ag_news": TaskSpec("ag_news", ("world", "sports", "business", "sci_tech"),
                        hub_id="fancyzhx/ag_news", default_classes=("sci_tech", "sports"),
                        prompt=("Article: ", "\nTopic:"),
                        label_words=(" world", " sports", " business", " science")),
}

SUFFIXES = (".jsonl", ".json", ".csv", ".parquet")


@dataclasses.dataclass(frozen=True)
class Task:
  """A task as trained: its selected source classes and their ids on the shared head."""
  name: str
  source_labels: tuple[int, ...]    # selected source label ids, in head order
  class_names: tuple[str, ...]      # their names
  label_offset: int                 # head id of the first selected class
  label_words: tuple[str, ...] = ()           # (--head=lm) per selected class
  prompt: tuple[str, str] = ("", "\nLabel:")  # (--head=lm) text before, after

  @property
  def head_labels(self) -> tuple[int, ...]:
    return tuple(range(self.label_offset, self.label_offset + len(self.source_labels)))

  @property
  def label_map(self) -> dict[int, int]:
    """Source label id -> its id on the shared head."""
    return dict(zip(self.source_labels, self.head_labels))


def local_task_spec(name: str, data_dir: str) -> TaskSpec:
  """A task read from ``data_dir/name``, its classes the integer labels of its
  training file (named by their id)."""
  rows = read_rows(find_split_file(data_dir, name, "train"))
  labels = sorted({label for _, label, _ in rows})
  if labels != list(range(len(labels))):
    raise ValueError(f"Task {name!r}: labels in {data_dir}/{name}/train are {labels}; a "
                     "local task needs labels 0..K-1.")
  return TaskSpec(name, tuple(str(i) for i in labels))


def resolve_tasks(names: Sequence[str], classes: dict[str, Sequence[str]] | None = None,
                  data_dir: str | None = None,
                  label_words: dict[str, Sequence[str]] | None = None) -> list[Task]:
  """Tasks in order, each one's classes placed on the shared head after the last.

  Args:
    names: task names (``imdb``, ``ag_news``, or a folder under ``data_dir``).
    classes: optional class names per task (``{"ag_news": ["sci_tech", "sports"]}``);
      their order is the order on the head.
    data_dir: where local tasks live.
    label_words: optional label words per task for classification as text, one per
      selected class in the same order (default: the task's, or " " + class name).
  """
  classes, label_words = dict(classes or {}), dict(label_words or {})
  unknown = (set(classes) | set(label_words)) - set(names)
  if unknown:
    raise ValueError(f"Classes or label words given for {sorted(unknown)}, which are not "
                     f"among the tasks {list(names)}.")
  tasks, offset = [], 0
  for name in names:
    if name in TASKS:
      spec = TASKS[name]
    elif data_dir and os.path.isdir(os.path.join(data_dir, name)):
      spec = local_task_spec(name, data_dir)
    else:
      raise ValueError(f"Unknown task {name!r}: expected one of {sorted(TASKS)} or a folder "
                       f"{name}/ under --data_dir holding train and test files.")
    wanted = tuple(classes.get(name) or spec.default_classes or spec.class_names)
    bad = [c for c in wanted if c not in spec.class_names]
    if bad or len(set(wanted)) != len(wanted) or not wanted:
      raise ValueError(f"Task {name!r}: classes {list(wanted)} are not distinct names among "
                       f"{list(spec.class_names)}.")
    ids = tuple(spec.class_names.index(c) for c in wanted)
    words = tuple(label_words.get(name) or (
        [spec.label_words[i] for i in ids] if spec.label_words else [" " + c for c in wanted]))
    if len(words) != len(ids):
      raise ValueError(f"Task {name!r}: {len(words)} label words {list(words)} for "
                       f"{len(ids)} classes {list(wanted)}; give one per class, in order.")
    tasks.append(Task(name, ids, wanted, offset, words, spec.prompt))
    offset += len(ids)
  return tasks


def num_labels(tasks: Sequence[Task]) -> int:
  return sum(len(t.source_labels) for t in tasks)


def answer_tokens(tasks: Sequence[Task], tokenizer) -> int:
  """The most tokens any class's label word takes (an answer written after the cue)."""
  return max((len(tokenizer(w, add_special_tokens=False)["input_ids"])
              for t in tasks for w in t.label_words), default=1)


def label_tokens(tasks: Sequence[Task], tokenizer) -> tuple[int, ...]:
  """The first token of every class's label word, in head order (classification as
  text reads the LM's next-token logits there); they must differ."""
  words = [w for t in tasks for w in t.label_words]
  ids = []
  for w in words:
    tokens = tokenizer(w, add_special_tokens=False)["input_ids"]
    if not tokens:
      raise ValueError(f"Label word {w!r} encodes to no token.")
    ids.append(tokens[0])
  ids = tuple(ids)
  seen: dict[int, str] = {}
  for w, i in zip(words, ids):
    if i in seen:
      raise ValueError(f"Label words {seen[i]!r} and {w!r} start with the same token; "
                       "choose label words whose first tokens differ "
                       "(--label_words=TASK=w1,w2).")
    seen[i] = w
  return ids


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


def _check_row(text: Any, label: Any, where: str) -> Row:
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
      rows.append(_check_row(obj[text_field], obj[label_field], where))
  elif path.endswith(".csv"):
    reader = csv.DictReader(io.StringIO(read_text(path), newline=""))
    if not reader.fieldnames or {text_field, label_field} - set(reader.fieldnames):
      raise ValueError(f"{path}: expected a header with columns {text_field!r} and "
                       f"{label_field!r}, found {reader.fieldnames}.")
    for obj in reader:
      rows.append(_check_row(obj[text_field], obj[label_field],
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
      rows.append(_check_row(text, label, f"{path}:row {n}"))
  else:
    raise ValueError(f"{path}: unsupported file type; expected one of {SUFFIXES}.")
  if not rows:
    raise ValueError(f"{path}: no rows.")
  return rows


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
  return [_check_row(text, label, f"{where}:{i}") for i, (text, label) in
          enumerate(zip(ds[spec.text_field], ds[spec.label_field]))]


def load_rows(task: Task, split: str, data_dir: str | None) -> list[Row]:
  """Rows of one split of a task, checking every label is a known class id."""
  spec = TASKS.get(task.name)
  if data_dir:
    path = find_split_file(data_dir, task.name, split)
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


@dataclasses.dataclass
class TaskData:
  task: Task
  train: dict[str, np.ndarray]
  test: dict[str, np.ndarray]
  val: dict[str, np.ndarray] | None = None


def task_subsets(task: Task, k: int, *, data_dir: str | None, num_train: int | None,
                 num_test: int | None, subset: str = "balanced", seed: int = 0):
  """(train rows, the training subset's indices, test rows, the test subset's indices)
  of task ``k``: the rows every run with these settings trains and tests on."""
  train_rows = load_rows(task, "train", data_dir)
  test_rows = load_rows(task, "test", data_dir)
  return (train_rows, select(train_rows, task, num_train, subset, (seed, k, 0)),
          test_rows, select(test_rows, task, num_test, subset, (seed, k, 2)))


def load_task_data(tasks: Sequence[Task], tokenizer, *, data_dir: str | None,
                   num_train: int | None, num_test: int | None, num_val: int = 0,
                   subset: str = "balanced", max_length: int = 128, seed: int = 0,
                   cache_dir: str | None = None, as_text: bool = False) -> list[TaskData]:
  """Reads, subsets and tokenizes every task's train, test (and validation) splits
  (``as_text``: inside each task's prompt, for classification as text).

  The validation split (``num_val`` > 0) is carved from the training file, disjoint
  from the training subset, so that strengths are never chosen on test data.
  """
  total = num_labels(tasks)
  out = []
  for k, task in enumerate(tasks):
    train_rows, train_idx, test_rows, test_idx = task_subsets(
        task, k, data_dir=data_dir, num_train=num_train, num_test=num_test, subset=subset,
        seed=seed)
    val = None
    if num_val:
      val_idx = select(train_rows, task, num_val, "balanced", (seed, k, 1),
                       exclude=frozenset(train_idx))
      val = make_arrays(train_rows, val_idx, task, k, total, tokenizer, max_length, cache_dir,
                        as_text)
    data = TaskData(
        task,
        make_arrays(train_rows, train_idx, task, k, total, tokenizer, max_length, cache_dir,
                    as_text),
        make_arrays(test_rows, test_idx, task, k, total, tokenizer, max_length, cache_dir,
                    as_text),
        val)
    counts = np.bincount(data.train["labels"], minlength=total)[list(task.head_labels)]
    logging.info("Task %d %s: %d train (per class %s), %d test, %s validation; classes %s "
                 "-> head labels %s.", k, task.name, size(data.train),
                 dict(zip(task.class_names, counts.tolist())), size(data.test),
                 size(val) if val else 0, list(task.class_names), list(task.head_labels))
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


# ----------------------------------------------------------------------------
# Batches
# ----------------------------------------------------------------------------

def num_batches(n: int, batch_size: int) -> int:
  return -(-n // batch_size)


def batches(arrays: dict[str, np.ndarray], batch_size: int, *,
            seed: int | Sequence[int] | None = None, start: int = 0,
            buckets: Sequence[int] = ()) -> Iterator[dict[str, np.ndarray]]:
  """Fixed-shape batches; shuffled by ``seed`` (None: in order), any
  ``np.random.default_rng`` seed: the study uses ``(seed, task, epoch)``.

  The last batch is padded with copies of the first example at ``weights`` 0, so
  every example counts once and the batch size never changes. ``start`` skips that
  many batches (to resume mid-epoch). With ``buckets`` (sequence lengths, see
  :func:`length_buckets`) each batch's trailing padding is cut to the smallest bucket
  that holds its longest row (:func:`trim_to_bucket`).
  """
  n = size(arrays)
  order = np.arange(n) if seed is None else np.random.default_rng(seed).permutation(n)
  for b in range(start, num_batches(n, batch_size)):
    idx = order[b * batch_size:(b + 1) * batch_size]
    real = len(idx)
    if real < batch_size:
      idx = np.concatenate([idx, np.full(batch_size - real, idx[0])])
    batch = {k: v[idx] for k, v in arrays.items()}
    batch["weights"] = (np.arange(batch_size) < real).astype(np.float32)
    yield trim_to_bucket(batch, buckets) if buckets else batch


# ----------------------------------------------------------------------------
# Length buckets
# ----------------------------------------------------------------------------

# The [N, T] arrays of a batch, in groups that share their padding: the first of each
# group is its token ids, the others masks (a row's length is past its last nonzero).
SEQUENCE_GROUPS = (("input_ids", "attention_mask", "loss_mask"),
                   ("lm_input_ids", "lm_attention_mask", "lm_loss_mask"))


def length_buckets(max_length: int, multiple: int) -> tuple[int, ...]:
  """The lengths a batch may be padded to: the multiples of ``multiple`` below
  ``max_length``, and ``max_length`` (``multiple`` 0: ``max_length`` only)."""
  if multiple <= 0:
    return (max_length,)
  return (*range(multiple, max_length, multiple), max_length)


def row_lengths(arrays: dict[str, np.ndarray]) -> np.ndarray:
  """Each row's length: one past its last nonzero mask entry, over every sequence
  group (0 for a row with no real token)."""
  out = np.zeros((size(arrays),), np.int64)
  for group in SEQUENCE_GROUPS:
    for key in group[1:]:
      if key in arrays:
        nonzero = np.asarray(arrays[key]) != 0
        last = nonzero.shape[1] - np.argmax(nonzero[:, ::-1], axis=1)
        out = np.maximum(out, np.where(nonzero.any(1), last, 0))
  return out


def trim_to_bucket(batch: dict[str, np.ndarray], buckets: Sequence[int]
                   ) -> dict[str, np.ndarray]:
  """``batch`` with every sequence array cut to the smallest bucket that holds its
  longest row (never longer than it was).

  Exact for right-padded rows: with causal attention no real position sees the cut
  ones, the pooled token (the last that is not the pad id) is kept, and masked
  positions carry no loss, so logits, losses and gradients do not change; a jitted
  step compiles once per bucket."""
  need = int(row_lengths(batch).max(initial=1))
  length = next((b for b in sorted(buckets) if b >= need), None)
  if length is None:
    raise ValueError(f"A row of {need} tokens is longer than the largest length bucket "
                     f"{max(buckets)}; the buckets must reach --max_length.")
  seq = {k for g in SEQUENCE_GROUPS for k in g}
  return {k: v[:, :length] if k in seq else v for k, v in batch.items()}


def eval_batches(arrays: dict[str, np.ndarray], batch_size: int, buckets: Sequence[int] = ()
                 ) -> Iterator[dict[str, np.ndarray]]:
  """In-order batches for an evaluation (where order does not matter); with
  ``buckets``, the rows go in order of length and each batch is cut to its bucket."""
  if buckets:
    arrays = sort_by_length(arrays)
  return batches(arrays, batch_size, buckets=buckets)


def one_batch_per_shape(batches: Iterable[dict[str, np.ndarray]]
                        ) -> list[dict[str, np.ndarray]]:
  """The first batch of each distinct set of array shapes and dtypes among ``batches``
  (with length buckets: one per bucket met), in order of appearance."""
  out: dict[tuple, dict[str, np.ndarray]] = {}
  for b in batches:
    out.setdefault(tuple(sorted((k, v.shape, v.dtype.str) for k, v in b.items())), b)
  return list(out.values())


def sort_by_length(arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  """The rows in order of length (stable): batches of similar rows take small buckets
  (for evaluation, where order does not matter)."""
  order = np.argsort(row_lengths(arrays), kind="stable")
  return {k: v[order] for k, v in arrays.items()}
