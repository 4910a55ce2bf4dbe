"""The study's configuration, defined once.

Each field of :class:`StudyConfig` carries its help text (and, for an enumeration,
its choices; for a number, its bound) in its metadata (:func:`cljax.options.option`);
``cljax.cli.flags`` turns every field into an absl flag of the same name, and every
registered method hyperparameter (``MethodConfig``) into one more, so a field added
here is a flag, a ``--help`` line, a check and a ``results.json`` entry at once. The
option groups it is made of are shared with LM training's ``LMConfig``: the model's
(:class:`cljax.models.build.ModelOptions`), the optimizer's
(:class:`cljax.train.optim.OptimizerOptions`) and the run's checkpoints and logging
(:class:`cljax.train.run.CheckpointOptions`).
"""

from __future__ import annotations

import dataclasses

from cljax.methods import MethodConfig
from cljax.methods import registry
from cljax.models.build import ModelOptions
from cljax.options import COUNT, DEVICES, NON_NEGATIVE, POSITIVE, option, with_current_names
from cljax.train.optim import OptimizerOptions
from cljax.train.run import CheckpointOptions


@dataclasses.dataclass(frozen=True)
class StudyConfig(CheckpointOptions, OptimizerOptions, ModelOptions):
  """Everything that defines a run; the experiment scripts fill it from flags.

  Checked when made (:meth:`validate`): a bad value is a one-line ``ValueError``
  before any data, model or compilation."""
  # --- data ---------------------------------------------------------------------
  tasks: tuple[str, ...] = option(
      ("imdb", "ag_news"), "Tasks in training order: imdb, ag_news, or a folder name "
      "under --data_dir (TASK/train.jsonl and TASK/test.jsonl); DATASET:CLASS+CLASS "
      "takes those classes of a dataset, so that one dataset gives several tasks "
      "(--tasks=imdb,ag_news:sci_tech+sports,ag_news:world+business).")
  ag_news_classes: tuple[str, ...] = option(
      ("sci_tech", "sports"), "AG News classes, in head order (world, sports, business, "
      "sci_tech). The study's prose names Sci/Tech and Sports (default: Sci/Tech -> head "
      "label 2, Sports -> 3); its original code kept world,sports.")
  classes: tuple[str, ...] = option(
      (), "Classes of any task, TASK=name,name (repeatable); e.g. --classes=imdb=neg,pos. "
      "Overrides --ag_news_classes.", repeatable=True)
  head: str = option("score", "score: a linear classification head on the last token "
                     "(GPT2ForSequenceClassification). lm: classification as text, each "
                     "example a prompt (text, then an answer marker) and its class the "
                     "label word the LM finds most likely next (no new parameters).",
                     choices=("score", "lm"))
  label_words: tuple[str, ...] = option(
      (), "--head=lm: label words of a task's classes, TASK=word,word in class order "
      "(repeatable; default imdb=negative,positive, ag_news=world,sports,business,"
      "science, a local task's class names); a leading space is added.", repeatable=True)
  data_dir: str | None = option(
      None, "Folder of local data, DIR/TASK/{train,test}.jsonl (or .csv / .parquet) with "
      "text and label columns. Unset: the Hugging Face hub (stanfordnlp/imdb, "
      "fancyzhx/ag_news).")
  num_train: int | None = option(2000, "Training examples per task (-1: all).",
                                 bound=COUNT)
  num_test: int | None = option(500, "Test examples per task (-1: all).",
                                bound=COUNT)
  num_val: int = option(0, "Validation examples per task, carved from the training file "
                        "(disjoint from the training subset), for choosing method "
                        "strengths without touching test data.",
                        bound=NON_NEGATIVE)
  subset: str = option("balanced", "balanced: seeded, shuffled, label-balanced subsets. "
                       "head: the literal first rows, as the original script; on the "
                       "label-sorted IMDb splits that is a single class.",
                       choices=("balanced", "head"))
  max_length: int = option(128, "Tokens per example (truncated, right padded with eos).",
                       bound=POSITIVE)
  length_bucket: int = option(
      32, "Pad each batch only to the smallest multiple of N (or --max_length) that holds "
      "its longest row, for training, evaluation (sorted by length) and the Fisher/MAS "
      "passes: exact (right padding, causal attention), one compiled program per length. "
      "0: every batch at --max_length.", bound=NON_NEGATIVE)
  cache_dir: str | None = option(None, "Cache of tokenized data and of compiled XLA "
                                 "programs (CACHE/xla; reruns skip compilation); default "
                                 "~/.cache/cljax.")
  # --- method (its hyperparameters are flags of their own) -------------------------
  method: str = option("finetune", "Method, or several joined by '+' (see the list below).")
  method_config: MethodConfig = dataclasses.field(default=MethodConfig(),
                                                  metadata={"flag": False})
  # --- bookkeeping ----------------------------------------------------------------
  eval_every: int = option(0, "Evaluate every task every N steps, for the accuracy curve "
                           "(0: only after each task).", bound=NON_NEGATIVE)
  stop_on_divergence: bool = option(False, "Stop with an error, not a warning, when a "
                                    "task's training loss ends over 10x its value at the "
                                    "task's first step.")
  # --- devices --------------------------------------------------------------------
  mesh_data: int = option(-1, "Devices on the data-parallel mesh axis (-1: all devices "
                          "that --mesh_model leaves). --batch_size is global.",
                          bound=DEVICES)
  mesh_model: int = option(1, "Devices on the parameter-sharding axis (params, optimizer "
                           "state and EWC state split; for large/xl sizes).",
                           bound=POSITIVE)
  distributed: bool = option(False, "Multi-host: call jax.distributed.initialize() (TPU "
                             "pods, SLURM, or JAX_COORDINATOR_*).")

  def __post_init__(self):
    for name in ("num_train", "num_test"):   # -1 (the flags' "all") is None
      if getattr(self, name) == -1:
        object.__setattr__(self, name, None)
    for name in ("tasks", "ag_news_classes", "classes", "label_words"):
      value = getattr(self, name)
      object.__setattr__(self, name, (value,) if isinstance(value, str) else tuple(value))
    for name in ("classes", "label_words"):   # (task, names) pairs as their flags say them
      object.__setattr__(self, name, tuple(
          item if isinstance(item, str) else f"{item[0]}={','.join(item[1])}"
          for item in getattr(self, name)))
    self.validate()

  def validate(self) -> None:
    """Every value checked, each failure a one-line ``ValueError`` naming the flag, the
    value and what is expected (method hyperparameters are checked by MethodConfig)."""
    super().validate()
    if not self.tasks:
      raise ValueError("--tasks is empty: name at least one task (e.g. --tasks=imdb,ag_news).")
    twice = sorted({t for t in self.tasks if self.tasks.count(t) > 1})
    if twice:
      raise ValueError(f"--tasks={','.join(self.tasks)} names {twice} more than once; each "
                       "task is trained once (a repeated task would share its results row).")
    for name, given in (("classes", self.task_classes()),
                        ("label_words", self.task_label_words())):
      unknown = sorted(set(given) - set(self.tasks))
      if unknown:
        raise ValueError(f"--{name} names {unknown}, which are not among --tasks="
                         f"{','.join(self.tasks)}.")
    registry.parse(self.method)

  def task_classes(self) -> dict[str, tuple[str, ...]]:
    """Class names per task: ``--ag_news_classes``, then each ``--classes`` item
    (``"TASK=name,name"``, or a ``(task, names)`` pair from Python)."""
    out = {"ag_news": self.ag_news_classes} if "ag_news" in self.tasks else {}
    return {**out, **_per_task("classes", self.classes)}

  def task_label_words(self) -> dict[str, tuple[str, ...]]:
    """``--label_words`` per task, each word with a leading space (GPT-2's tokens for
    a word after the answer marker)."""
    return {task: tuple(" " + w.strip() for w in words)
            for task, words in _per_task("label_words", self.label_words).items()}

  def to_dict(self) -> dict:
    """Every field as JSON-ready values (method hyperparameters by name)."""
    return {**super().to_dict(), "method_config": self.method_config.to_dict()}

  def to_flags(self) -> dict:
    """The flags that make this config, by flag name (method hyperparameters flat,
    "all" as -1): what ``results.json`` records as a run's ``flags`` and
    :func:`flagfile` writes out."""
    out = {}
    for f in dataclasses.fields(self):
      if f.metadata.get("flag", True):
        value = getattr(self, f.name)
        if f.name in ("num_train", "num_test") and value is None:
          value = -1
        out[f.name] = list(value) if isinstance(value, tuple) else value
    return {**out, **self.method_config.to_dict()}

  @classmethod
  def from_flags(cls, flags: dict) -> StudyConfig:
    """The config that recorded ``flags`` (:meth:`to_flags`; a stored run's, older
    names read as today's) describe; keys that are no setting (``workdir``) ignored."""
    flags = with_current_names(flags)
    names = {f.name for f in dataclasses.fields(cls) if f.metadata.get("flag", True)}
    return cls(**{k: v for k, v in flags.items() if k in names},
               method_config=MethodConfig(**{k: v for k, v in flags.items()
                                             if k in registry.hparams()}))


def flagfile(flags: dict) -> str:
  """An absl flagfile of ``flags`` (:meth:`StudyConfig.to_flags`): with it and a
  ``--workdir``, the experiment script makes the same config again. A None is left
  out (it is the flag's default: checked by the round-trip test)."""
  repeatable = {f.name for f in dataclasses.fields(StudyConfig) if f.metadata.get("repeatable")}
  lines = []
  for name, value in flags.items():
    if value is None:
      continue
    if name in repeatable:
      lines += [f"--{name}={v}" for v in value]
    elif isinstance(value, list):
      lines.append(f"--{name}={','.join(str(v) for v in value)}")
    elif isinstance(value, bool):
      lines.append(f"--{name}={str(value).lower()}")
    else:
      lines.append(f"--{name}={value}")
  return "\n".join(lines) + "\n"


def _per_task(flag: str, items) -> dict[str, tuple[str, ...]]:
  """``("TASK=a,b", ...)`` (``(task, names)`` pairs from Python are made this form
  when the config is made) as a dict."""
  out = {}
  for item in items:
    task, sep, names = item.partition("=")
    if not sep or not names.strip():
      raise ValueError(f"--{flag}={item!r}: expected TASK=name,name (e.g. "
                       f"--{flag}=imdb={'neg,pos' if flag == 'classes' else 'bad,good'}).")
    out[task.strip()] = tuple(n.strip() for n in names.split(","))
  return out
