"""The study's configuration, defined once.

Each field of :class:`StudyConfig` carries its help text (and, for an enumeration,
its choices; for a number, its bound) in its metadata; ``cljax.flags`` turns every
field into an absl flag of the same name, and every registered method hyperparameter
(``MethodConfig``) into one more, so a field added here is a flag, a ``--help`` line,
a check and a ``results.json`` entry at once. The option groups (``ModelOptions``,
``OptimizerOptions``, ``CheckpointOptions``) are shared with LM training's
``LMConfig``.
"""

from __future__ import annotations

import dataclasses

from cljax.methods import MethodConfig
from cljax.methods import registry
from cljax.methods.registry import DROPOUT, NON_NEGATIVE, POSITIVE, Bound
from cljax.models import SIZE_ALIASES, SIZES, GPT2Config

COUNT = Bound("> 0, or -1 for all", lambda v: v > 0)
DEVICES = Bound("> 0, or -1 for all devices left", lambda v: v > 0 or v == -1)


def option(default, help: str, *, choices: tuple[str, ...] | None = None,  # noqa: A002
           repeatable: bool = False, bound: Bound | None = None):
  """A config field with its flag's help text; ``repeatable`` makes a flag given once
  per value (``--classes=a=x,y --classes=b=z``) instead of a comma-separated list;
  ``bound`` is the numeric constraint :meth:`Options.validate` checks."""
  return dataclasses.field(default=default, metadata={"help": help, "choices": choices,
                                                      "repeatable": repeatable,
                                                      "bound": bound})


class Options:
  """Checks its fields' declared choices and bounds (:func:`option`) when made."""

  def __post_init__(self):
    self.validate()

  def validate(self) -> None:
    """Every field with declared choices or a bound, each failure a one-line
    ``ValueError`` naming the flag, the value and what is expected."""
    for f in dataclasses.fields(self):
      value, meta = getattr(self, f.name), f.metadata
      if meta.get("choices") and value not in meta["choices"]:
        raise ValueError(f"--{f.name}={value!r}: expected one of {list(meta['choices'])}.")
      if meta.get("bound"):
        meta["bound"].check(f.name, value)

  def replace(self, **kwargs):
    return dataclasses.replace(self, **kwargs)

  def to_dict(self) -> dict:
    """Every field as JSON-ready values."""
    d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
    return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}


@dataclasses.dataclass(frozen=True)
class ModelOptions(Options):
  """The model a run starts from (shared by the study and LM training)."""

  model: str = option("gpt2", "Hub id or local folder of a GPT-2 checkpoint (config.json "
                      "+ model.safetensors or pytorch_model.bin).")
  init: str = option("pretrained", "Start from --model's weights, or from a random init of "
                     "--size.", choices=("pretrained", "random"))
  size: str = option("gpt2", "Size for --init=random: gpt2, gpt2-medium, gpt2-large, "
                     "gpt2-xl, mini (4x256) or tiny (2x64).")
  tokenizer: str | None = option(None, "Tokenizer hub id or folder (default: --model).")
  dtype: str = option("float32", "Compute dtype; params and optimizer state stay float32.",
                      choices=("float32", "bfloat16"))
  dropout: float | None = option(None, "Dropout for embeddings, attention and residuals "
                                 "(default: the checkpoint's, 0.1 for GPT-2).",
                                 bound=DROPOUT)
  remat: bool = option(False, "Rematerialize blocks in the backward pass (memory).")
  dropout_rng: str = option(
      "rbg", "How a train step draws its dropout masks: rbg (XLA's RngBitGenerator, "
      "several times faster on a CPU) or threefry (the same masks on any device mesh, "
      "inside a vmap and at any padded length: a position keeps its mask whatever length "
      "its batch is padded to; runs trained side by side use it).",
      choices=("rbg", "threefry"))
  attention: str = option("xla", "The fused attention kernel where attention has no "
                          "dropout (evaluation, generation, --dropout=0): xla, or cudnn "
                          "(NVIDIA GPUs with --dtype=bfloat16).", choices=("xla", "cudnn"))

  def config_overrides(self) -> dict:
    """The ``GPT2Config`` fields these options set: remat, the attention kernel, the
    dropout masks' layout, and dropout everywhere when it is given."""
    out: dict = {"remat": self.remat, "attention": self.attention,
                 "length_stable_dropout": self.dropout_rng == "threefry"}
    if self.dropout is not None:
      out.update(embd_pdrop=self.dropout, attn_pdrop=self.dropout, resid_pdrop=self.dropout)
    return out

  def random_init_config(self, tokenizer, n_positions: int, **fields) -> GPT2Config:
    """The config of a random init of ``--size`` for ``tokenizer`` (its vocabulary,
    pad and eos), with at least ``n_positions`` positions (1024, as GPT-2, or more)."""
    return GPT2Config.from_size(
        self.size, vocab_size=len(tokenizer), dtype=self.dtype,
        pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
        n_positions=max(1024, n_positions), **fields, **self.config_overrides())

  def check_vocabulary(self, config: GPT2Config, tokenizer) -> None:
    """A loaded model must embed every token the tokenizer can produce."""
    if config.vocab_size < len(tokenizer):
      raise ValueError(f"The model {self.model} has {config.vocab_size} token "
                       f"embeddings but the tokenizer {self.tokenizer or self.model} has "
                       f"{len(tokenizer)} tokens; use the model's own tokenizer.")

  def validate(self) -> None:
    super().validate()
    if self.init == "random" and self.size not in SIZES | SIZE_ALIASES:
      raise ValueError(f"--size={self.size!r}: expected one of "
                       f"{sorted(SIZES) + sorted(SIZE_ALIASES)}.")
    if self.attention == "cudnn" and self.dtype == "float32":
      raise ValueError("--attention=cudnn needs --dtype=bfloat16: cuDNN's fused attention "
                       "has no float32 kernel.")


@dataclasses.dataclass(frozen=True)
class OptimizerOptions(Options):
  """AdamW and its schedule, the Hugging Face Trainer's defaults."""
  batch_size: int = option(8, "Training batch size.", bound=POSITIVE)
  eval_batch_size: int = option(32, "Evaluation batch size.", bound=POSITIVE)
  epochs: int = option(1, "Epochs per task.", bound=POSITIVE)
  learning_rate: float = option(5e-5, "AdamW peak learning rate, decayed linearly to 0 over "
                                "each task (Hugging Face Trainer default 5e-5).",
                                bound=NON_NEGATIVE)
  warmup_steps: int = option(0, "Linear warmup steps per task.",
                             bound=NON_NEGATIVE)
  weight_decay: float = option(0.0, "AdamW weight decay (not on biases and LayerNorm).",
                                bound=NON_NEGATIVE)
  max_grad_norm: float = option(1.0, "Clip gradients to this global norm (0: off).",
                                 bound=NON_NEGATIVE)
  grad_accum_steps: int = option(1, "Micro-batches per update.", bound=POSITIVE)
  seed: int = option(0, "The one seed: subsets, init, data order, dropout.")


@dataclasses.dataclass(frozen=True)
class CheckpointOptions(Options):
  """Checkpoints (and ``--resume``), logging, and the testing stop."""
  checkpoint_every: int = option(200, "Save a checkpoint every N steps (0: only at the "
                                 "end of each task or of training, where one is always "
                                 "saved).",
                                 bound=NON_NEGATIVE)
  keep_checkpoints: int = option(2, "Checkpoints kept in WORKDIR/checkpoints (the newest).",
                                 bound=POSITIVE)
  log_every: int = option(10, "Log step metrics every N steps.", bound=POSITIVE)
  stop_after_steps: int | None = option(None, "Testing: stop after N steps as if killed.",
                                       bound=POSITIVE)


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


def _per_task(flag: str, items) -> dict[str, tuple[str, ...]]:
  """``("TASK=a,b", ...)`` (or ``(task, names)`` pairs from Python) as a dict."""
  out = {}
  for item in items:
    if isinstance(item, (tuple, list)):   # (task, names): the Python form
      out[item[0]] = tuple(item[1])
      continue
    task, sep, names = item.partition("=")
    if not sep or not names.strip():
      raise ValueError(f"--{flag}={item!r}: expected TASK=name,name (e.g. "
                       f"--{flag}=imdb={'neg,pos' if flag == 'classes' else 'bad,good'}).")
    out[task.strip()] = tuple(n.strip() for n in names.split(","))
  return out
