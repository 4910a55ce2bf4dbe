"""Task definitions: the known datasets (``TASKS``), local tasks under ``--data_dir``,
and ``resolve_tasks``, which places each task's selected classes on the shared head
after the previous tasks' labels; the label words and their tokens of classification
as text (``--head=lm``).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence

from cljax.data.files import find_split_file, read_rows

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


@dataclasses.dataclass(frozen=True)
class Task:
  """A task as trained: its selected source classes and their ids on the shared head.

  ``name`` is the task's entry in ``--tasks`` (``imdb``, or ``ag_news:world+business``
  for a dataset's chosen classes); ``dataset`` the dataset it reads (``TASKS`` or a
  folder under ``--data_dir``)."""
  name: str
  source_labels: tuple[int, ...]    # selected source label ids, in head order
  class_names: tuple[str, ...]      # their names
  label_offset: int                 # head id of the first selected class
  label_words: tuple[str, ...] = ()           # (--head=lm) per selected class
  prompt: tuple[str, str] = ("", "\nLabel:")  # (--head=lm) text before, after
  dataset: str = ""

  def __post_init__(self):
    if not self.dataset:
      object.__setattr__(self, "dataset", self.name)

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


def split_entry(entry: str) -> tuple[str, tuple[str, ...] | None]:
  """``ag_news:world+business`` -> ("ag_news", ("world", "business")); ``imdb`` ->
  ("imdb", None)."""
  dataset, sep, classes = entry.partition(":")
  if not sep:
    return entry, None
  names = tuple(c for c in classes.split("+"))
  if not dataset or not all(names):
    raise ValueError(f"Task {entry!r}: expected DATASET or DATASET:CLASS+CLASS (for example "
                     "ag_news:world+business).")
  return dataset, names


def _spec(dataset: str, data_dir: str | None) -> TaskSpec:
  if dataset in TASKS:
    return TASKS[dataset]
  if data_dir and os.path.isdir(os.path.join(data_dir, dataset)):
    return local_task_spec(dataset, data_dir)
  raise ValueError(f"Unknown task {dataset!r}: expected one of {sorted(TASKS)} or a folder "
                   f"{dataset}/ under --data_dir holding train and test files.")


def resolve_tasks(names: Sequence[str], classes: dict[str, Sequence[str]] | None = None,
                  data_dir: str | None = None,
                  label_words: dict[str, Sequence[str]] | None = None) -> list[Task]:
  """Tasks in order, each one's classes placed on the shared head after the last.

  Args:
    names: task entries: a dataset (``imdb``, ``ag_news``, or a folder under
      ``data_dir``), or a dataset and its classes (``ag_news:world+business``), so that
      one dataset can give several tasks of disjoint classes.
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
  if len(set(names)) != len(names):
    raise ValueError(f"--tasks={','.join(names)} names a task twice; give each task once "
                     "(several tasks of one dataset: DATASET:CLASS+CLASS with disjoint "
                     "classes).")
  tasks, offset, used = [], 0, {}
  for name in names:
    dataset, inline = split_entry(name)
    spec = _spec(dataset, data_dir)
    if inline and name in classes:
      raise ValueError(f"Task {name!r} names its classes; drop --classes={name}=...")
    wanted = tuple(inline or classes.get(name) or spec.default_classes or spec.class_names)
    bad = [c for c in wanted if c not in spec.class_names]
    if bad or len(set(wanted)) != len(wanted) or not wanted:
      raise ValueError(f"Task {name!r}: classes {list(wanted)} are not distinct names among "
                       f"{list(spec.class_names)}.")
    again = set(wanted) & used.get(dataset, set())
    if again:
      raise ValueError(f"Task {name!r}: classes {sorted(again)} of {dataset} are in an "
                       "earlier task too; tasks of one dataset need disjoint classes.")
    used.setdefault(dataset, set()).update(wanted)
    ids = tuple(spec.class_names.index(c) for c in wanted)
    words = tuple(label_words.get(name) or (
        [spec.label_words[i] for i in ids] if spec.label_words else [" " + c for c in wanted]))
    if len(words) != len(ids):
      raise ValueError(f"Task {name!r}: {len(words)} label words {list(words)} for "
                       f"{len(ids)} classes {list(wanted)}; give one per class, in order.")
    tasks.append(Task(name, ids, wanted, offset, words, spec.prompt, dataset))
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
