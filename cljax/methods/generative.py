"""Generative replay: the model replays the earlier tasks from text it writes itself,
and stores no example (Shin et al. 2017; LAMOL: Sun, Ho and Lee, ICLR 2020).

Both methods train the trunk, beside the task's own objective, as a language model of
the task's text after a generation token ``GEN`` (one per task, or one shared):

    L = L_task(x, y) + lm_lambda * LM(GEN x [answer] EOS)

where LM is the mean next-token cross-entropy over the sequence after ``GEN`` through
its EOS (the tied LM head, ``wte``). Before task k (k > 0) the model as it stood after
task k-1 writes ``N = ceil(gamma * |D_k|)`` pseudo-examples, rounded down to a multiple
of k and split evenly over the earlier tasks, ``N / k`` each, prompted with that task's
``GEN`` (top-k sampling, k = 20, temperature 1, as LAMOL), and they train with task k's
data (concatenated with it and shuffled, as LAMOL's ``train_extra_data``), under both
losses.

- ``generative_replay`` (DGR for the classifier, any ``--head``): the text is the
  task's input row; the frozen old model labels each pseudo-text (``gr_labels=hard``:
  the argmax over the classes of the task that wrote it, or of every earlier task with
  a shared token; ``logits``: the main loss on pseudo-texts is replaced by the
  distillation loss to the old model's logits over those classes, temperature 2).
- ``lamol`` (``--head=lm``): each example is ``prompt(x) __ans__ label-word EOS``;
  LAMOL's QA loss is the reference's full-vocabulary cross-entropy of the answer's
  tokens and EOS given that row (``lamol_qa_loss=vocab``; it replaces the study's
  cross-entropy over the label words, which ``label_words`` keeps instead), and the LM
  loss covers ``GEN prompt(x) __ans__ label-word EOS`` with the target ``__ans__``
  weighted 5 (the reference code's ``tokens_weight``). A pseudo-example is kept only
  if it splits into exactly one text and one answer at ``__ans__`` and the answer is
  an earlier task's label word (its class is then the label).

The generated pseudo-data lives in the method state (so in checkpoints: a resumed run
trains on the same samples), and each boundary reports its cost (seconds, tokens/s),
how many samples were kept and why the others were dropped, and the first few texts.

This file holds the two methods, their configs and hooks; the pseudo-data pieces that
hold no method state (generation, LAMOL's filter, the rows, the QA loss) are in
``pseudo_data.py``.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import NamedTuple

from absl import logging
import jax
import jax.numpy as jnp
import numpy as np

from cljax import data as data_lib
from cljax.methods.distill import distillation_loss
from cljax.methods.pseudo_data import (PseudoData, empty_pseudo_data, generate_texts, lm_arrays,
                                       lm_row, pad_rows, qa_loss, split_answer, split_sizes)
from cljax.methods.registry import BuildContext, hparam, register
from cljax.options import NON_NEGATIVE, POSITIVE
from cljax.train import losses
from cljax.train import steps
from cljax.train.method import Declarations, Method, StepContext, TaskContext

ANSWER_TOKEN = "__ans__"
LABEL_CHOICES = ("hard", "logits")
QA_LOSS_CHOICES = ("vocab", "label_words")


# ----------------------------------------------------------------------------
# Host pieces: the method state on the host, the prompt's answer cue
# ----------------------------------------------------------------------------

def _host(x) -> np.ndarray:
  """A replicated state array on the host (under several processes each holds it whole)."""
  if isinstance(x, jax.Array) and not x.is_fully_addressable:
    return np.asarray(x.addressable_data(0))
  return np.asarray(x)


def _tail_length(task, tokenizer, as_text: bool) -> int:
  """Tokens of the prompt after the text (the answer cue; LAMOL's ends in
  ``__ans__``), which LM rows never cut (``as_text``: ``--head=lm``)."""
  return len(tokenizer(task.prompt[1], add_special_tokens=False)["input_ids"]) if as_text else 0


# ----------------------------------------------------------------------------
# The method
# ----------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class GenerationConfig:
  gen_top_k: int = hparam(20, "Generative replay / LAMOL: top-k of the pseudo-sample "
                          "sampling.", bound=POSITIVE)
  gen_temperature: float = hparam(1.0, "Generative replay / LAMOL: sampling temperature.",
                                  bound=POSITIVE)
  gen_batch_size: int = hparam(64, "Generative replay / LAMOL: rows generated at once.",
                               bound=POSITIVE)
  gen_log_samples: int = hparam(5, "Generative replay / LAMOL: pseudo-samples per task "
                                "written to the log and results.json.", bound=NON_NEGATIVE)


@dataclasses.dataclass(frozen=True)
class GenerativeReplayConfig(GenerationConfig):
  gr_gamma: float = hparam(0.2, "Generative replay: pseudo-examples per boundary, as a "
                           "fraction of the new task's training set.", bound=NON_NEGATIVE)
  gr_lm_lambda: float = hparam(0.25, "Generative replay: weight of the LM loss.",
                               bound=NON_NEGATIVE)
  gr_task_tokens: bool = hparam(True, "Generative replay: one generation token per task "
                                "(else one shared token).")
  gr_labels: str = hparam("hard", "Generative replay: how the old model labels "
                          "pseudo-texts: hard (argmax) or logits (distillation).",
                          choices=LABEL_CHOICES)


@dataclasses.dataclass(frozen=True)
class LamolConfig(GenerationConfig):
  lamol_gamma: float = hparam(0.2, "LAMOL: pseudo-examples per boundary, as a fraction "
                              "of the new task's training set.", bound=NON_NEGATIVE)
  lamol_lm_lambda: float = hparam(0.25, "LAMOL: weight of the LM loss.", bound=NON_NEGATIVE)
  lamol_task_tokens: bool = hparam(False, "LAMOL: one generation token per task "
                                   "(LAMOL_TASK) instead of the shared __gen__ (LAMOL_GEN).")
  lamol_ans_weight: float = hparam(5.0, "LAMOL: LM-loss weight of the __ans__ target "
                                   "(the reference code's tokens_weight).", bound=NON_NEGATIVE)
  lamol_qa_loss: str = hparam("vocab", "LAMOL: the QA loss. vocab: the reference's "
                              "full-vocabulary cross-entropy of the answer's tokens and EOS "
                              "after __ans__ (replacing the study's label-word loss); "
                              "label_words: the study's cross-entropy over the label words' "
                              "first tokens.", choices=QA_LOSS_CHOICES)


class _Spec(NamedTuple):
  """What distinguishes the two methods."""
  name: str
  gamma: float
  lm_lambda: float
  task_tokens: bool
  lamol: bool
  labels: str = "hard"
  ans_weight: float = 1.0
  qa_loss: str = "label_words"   # LAMOL: vocab replaces the study's CE by the reference's


def _tokens(spec: _Spec, num_tasks: int) -> tuple[str, ...]:
  prefix = "__lamol" if spec.lamol else "__gr"
  gens = (tuple(f"{prefix}_task{k}__" for k in range(num_tasks)) if spec.task_tokens
          else (f"{prefix}_gen__",))
  return gens + ((ANSWER_TOKEN,) if spec.lamol else ())


class _Setup(NamedTuple):
  """What every hook of one generative method knows."""
  spec: _Spec
  gen: GenerationConfig
  tokens: tuple[str, ...]
  gen_ids: tuple[int, ...]      # the generation token(s)
  ans_id: int | None            # LAMOL's __ans__
  length: int                   # T
  num_labels: int               # C
  eos: int
  as_text: bool                 # --head=lm: rows end in the prompt's answer cue
  answer_tokens: int = 1        # the most tokens of a label word (LAMOL's QA loss)

  def gen_token(self, k: int) -> int:
    return self.gen_ids[k] if self.spec.task_tokens else self.gen_ids[0]

  @property
  def weights(self) -> dict[int, float]:
    return {self.ans_id: self.spec.ans_weight} if self.spec.lamol else {}


def _label_words(tctx: TaskContext, upto: int) -> dict[tuple[int, ...], int]:
  """Every label word of the first ``upto`` tasks (its tokens) -> its class."""
  out = {}
  for task in tctx.tasks[:upto]:
    for c, word in zip(task.head_labels, task.label_words):
      out[tuple(tctx.tokenizer(word, add_special_tokens=False)["input_ids"])] = c
  return out


def _owner(tctx: TaskContext) -> dict[int, int]:
  return {c: j for j, task in enumerate(tctx.tasks) for c in task.head_labels}


def _real_lm_rows(s: _Setup, tctx: TaskContext, train) -> dict[str, np.ndarray]:
  """LM rows of the task's own examples: ``GEN_k row [label word] EOS``."""
  k = tctx.task_index
  tail = _tail_length(tctx.tasks[k], tctx.tokenizer, s.as_text)
  words = {c: list(w) for w, c in _label_words(tctx, k + 1).items()} if s.spec.lamol else {}
  rows = []
  for row, n, label in zip(train["input_ids"], train["attention_mask"].sum(1),
                           train["labels"]):
    real = row[:n].tolist()
    rows.append(lm_row(s.gen_token(k), real[:n - tail], real[n - tail:],
                       words.get(int(label), []), eos=s.eos, length=s.length))
  return lm_arrays(rows, length=s.length, pad=s.eos, weights=s.weights)


def _train_arrays(s: _Setup, tctx: TaskContext):
  """The task's examples with their LM rows, then the pseudo-examples of the state."""
  own = dict(tctx.train, **_real_lm_rows(s, tctx, tctx.train))
  n = data_lib.size(own)
  own.update(replayed=np.zeros((n,), np.float32),
             teacher_logits=np.zeros((n, s.num_labels), np.float32))
  p = tctx.method_state
  count = 0 if p is None else int(_host(p.count))
  if not count:
    return own
  fake = {f: _host(getattr(p, f))[:count] for f in PseudoData._fields if f != "count"}
  fake["replayed"] = np.ones((count,), np.float32)
  return data_lib.concat([own, fake])


def _label_by_old_model(s: _Setup, tctx: TaskContext, texts, sources):
  """DGR: rows, the old model's labels and logits, over the classes of the task that
  wrote each text (or of every earlier task, with a shared token)."""
  ids, mask = pad_rows(texts, s.length, s.eos)
  logits_fn = jax.jit(lambda p, b: steps.logits_step(p, b, model=tctx.model))
  logits = np.concatenate([
      np.asarray(logits_fn(tctx.params, {"input_ids": b["input_ids"],
                                         "attention_mask": b["attention_mask"]}))
      for b in data_lib.batches({"input_ids": ids, "attention_mask": mask},
                                s.gen.gen_batch_size)])[:len(texts)]
  allowed = np.zeros((len(texts), s.num_labels), bool)
  for i, j in enumerate(sources):
    for task in (tctx.tasks[j:j + 1] if s.spec.task_tokens else tctx.tasks[:tctx.task_index]):
      allowed[i, list(task.head_labels)] = True
  return ids, mask, np.argmax(np.where(allowed, logits, -np.inf), axis=1), logits


def _pseudo_data(s: _Setup, tctx: TaskContext, texts, sources, ended, labels) -> PseudoData:
  """The kept samples as training rows: LAMOL's labelled by their answer, DGR's by the
  old model; with their LM rows."""
  n, owner = len(texts), _owner(tctx)
  if s.spec.lamol:
    words = {c: list(w) for w, c in _label_words(tctx, tctx.task_index).items()}
    rows = [t + [s.ans_id] for t in texts]
    ids, mask = pad_rows(rows, s.length, s.eos)
    teacher = np.zeros((n, s.num_labels), np.float32)
    lm = [lm_row(s.gen_token(j), r, [], words[c], eos=s.eos, length=s.length)
          for r, j, c in zip(rows, sources, labels)]
  else:
    ids, mask, labels, teacher = _label_by_old_model(s, tctx, texts, sources)
    lm = [lm_row(s.gen_token(j), t, [], [], eos=s.eos, length=s.length, ended=e)
          for t, j, e in zip(texts, sources, ended)]
  task_ids = np.asarray([owner[int(c)] for c in labels], np.int32)
  class_mask = np.zeros((n, s.num_labels), bool)
  for i, j in enumerate(task_ids):
    class_mask[i, list(tctx.tasks[j].head_labels)] = True
  a = lm_arrays(lm, length=s.length, pad=s.eos, weights=s.weights)
  return PseudoData(*(jnp.asarray(x) for x in (
      ids, mask, np.asarray(labels, np.int32), task_ids, class_mask,
      teacher.astype(np.float32), a["lm_input_ids"], a["lm_attention_mask"],
      a["lm_loss_mask"], np.int32(n))))


def _keep(s: _Setup, tctx: TaskContext, texts, sources, ended):
  """The samples that make examples (LAMOL's filter; DGR drops empty texts), and
  the count of the others by reason."""
  dropped = {"malformed": 0, "unknown_answer": 0}
  kept = ([], [], [], [])   # texts, sources, ended, labels
  answers = _label_words(tctx, tctx.task_index) if s.spec.lamol else {}
  for text, j, e in zip(texts, sources, ended):
    label = None
    if s.spec.lamol:
      split = split_answer(text, s.ans_id, answers)
      if isinstance(split, str):
        dropped[split] += 1
        continue
      text, label = split
    elif not text:
      dropped["malformed"] += 1
      continue
    for out, value in zip(kept, (text, j, e, label)):
      out.append(value)
  return kept, dropped


def _before_task(s: _Setup, state: PseudoData, tctx: TaskContext) -> PseudoData:
  """Before task k > 0: the model as it is writes the pseudo-examples of the earlier
  tasks; the kept ones replace the state's (they are generated afresh each time)."""
  del state
  k = tctx.task_index
  sizes = split_sizes(data_lib.size(tctx.train), s.spec.gamma, k) if k else []
  if not sum(sizes):
    return empty_pseudo_data(s.length, s.num_labels)
  sources = [j for j, n in enumerate(sizes) for _ in range(n)]
  texts, ended, seconds = generate_texts(
      tctx.model, tctx.params, [s.gen_token(j) for j in sources], length=s.length,
      batch_size=s.gen.gen_batch_size, rng=tctx.rng, top_k=s.gen.gen_top_k,
      temperature=s.gen.gen_temperature, eos=s.eos)
  kept, dropped = _keep(s, tctx, texts, sources, ended)
  generated = sum(len(t) + int(e) for t, e in zip(texts, ended))
  report = {"method": s.spec.name, "requested": len(texts), "kept": len(kept[0]),
            "dropped": dropped, "drop_rate": 1 - len(kept[0]) / len(texts),
            "per_task": {tctx.tasks[j].name: n for j, n in enumerate(sizes)},
            "generation_seconds": seconds, "generated_tokens": generated,
            "tokens_per_second": generated / max(seconds, 1e-9),
            "samples": {tctx.tasks[j].name: [
                tctx.tokenizer.decode([s.gen_token(j)] + t)
                for t, src in zip(texts, sources) if src == j][:s.gen.gen_log_samples]
                        for j in range(k)}}
  data = _pseudo_data(s, tctx, *kept) if kept[0] else empty_pseudo_data(s.length,
                                                                        s.num_labels)
  report["kept_samples"], report["label_balance"] = _written(s, tctx, kept, data)
  tctx.report(report)
  logging.info("%s before task %d: generated %d pseudo-examples (%d tokens) in %.1f s "
               "(%.0f tokens/s); kept %d, dropped %s; labels %s.", s.spec.name, k, len(texts),
               generated, seconds, report["tokens_per_second"], len(kept[0]), dropped,
               report["label_balance"])
  return data


def _written(s: _Setup, tctx: TaskContext, kept, data: PseudoData) -> tuple[list, dict]:
  """Every kept pseudo-example as a person reads it (the task whose token wrote it,
  its text, the task and class it trains as; for DGR the old model's probability of
  that class among the task's), and the label balance: per task, kept examples per
  class."""
  n = int(_host(data.count))
  labels, mask = _host(data.labels)[:n], _host(data.class_mask)[:n]
  logits = np.where(mask, _host(data.teacher_logits)[:n], -np.inf)
  probs = np.exp(logits - logits.max(axis=1, keepdims=True))
  probs /= probs.sum(axis=1, keepdims=True)
  owner = {c: (t, t.class_names[i]) for t in tctx.tasks for i, c in enumerate(t.head_labels)}
  samples, balance = [], {}
  for i, (text, j) in enumerate(zip(kept[0], kept[1])):
    task, name = owner[int(labels[i])]
    samples.append({"written_as": tctx.tasks[j].name, "task": task.name, "label": name,
                    "head_label": int(labels[i]), "text": tctx.tokenizer.decode(text),
                    "old_model_probability": None if s.spec.lamol else float(
                        probs[i, labels[i]])})
    counts = balance.setdefault(task.name, dict.fromkeys(task.class_names, 0))
    counts[name] += 1
  return samples, balance


def _prepare_batch(s: _Setup, state, sctx: StepContext):
  del state
  batch = dict(sctx.batch, lm_weight=sctx.batch["weights"])
  if s.spec.labels == "logits":  # pseudo-texts train on the distillation loss instead
    batch["weights"] = batch["weights"] * (1.0 - batch["replayed"])
  if s.spec.qa_loss == "vocab":  # LAMOL's QA loss replaces the label-word CE
    batch["ce_weights"] = jnp.zeros_like(batch["weights"])
  return batch

def _loss(s: _Setup, state, sctx: StepContext):
  """``lm_lambda`` times the weighted mean next-token CE of the batch's LM rows (and
  LAMOL's full-vocabulary QA loss; with ``gr_labels=logits``, the distillation of the
  pseudo-texts)."""
  del state
  b = sctx.batch
  logits = sctx.lm_apply_fn(sctx.params, b["lm_input_ids"], b["lm_attention_mask"])
  loss_sum, count, _ = losses.lm_cross_entropy(
      logits, b["lm_input_ids"], b["lm_loss_mask"] * b["lm_weight"][:, None])
  total = s.spec.lm_lambda * loss_sum / jnp.maximum(count, 1e-9)
  if s.spec.qa_loss == "vocab":
    total += qa_loss(sctx.lm_apply_fn, sctx.params, b, ans_id=s.ans_id,
                     k=s.answer_tokens + 1, pad=s.eos)
  if s.spec.labels == "logits":
    old = b["class_mask"] & (b["replayed"][:, None] > 0)
    total += distillation_loss(sctx.logits, b["teacher_logits"], old,
                               b["lm_weight"] * b["replayed"], 2.0)
  return total, ()


def _generative_method(spec: _Spec, gen: GenerationConfig, ctx: BuildContext) -> Method:
  tokens = _tokens(spec, ctx.num_tasks)
  first, eos = ctx.need("first_new_token", spec.name), ctx.need("eos_token_id", spec.name)
  ids = {t: first + i for i, t in enumerate(tokens)}
  s = _Setup(spec, gen, tokens, tuple(ids[t] for t in tokens if t != ANSWER_TOKEN),
             ids.get(ANSWER_TOKEN), ctx.max_length, ctx.num_labels, eos,
             ctx.head == "lm", ctx.answer_tokens)
  return Method(name=spec.name, init=lambda params: empty_pseudo_data(s.length, s.num_labels),
                before_task=functools.partial(_before_task, s),
                train_arrays=functools.partial(_train_arrays, s),
                prepare_batch=functools.partial(_prepare_batch, s),
                loss=functools.partial(_loss, s), declares=Declarations(
                    tokens=tokens, answer_marker=ANSWER_TOKEN if spec.lamol else "",
                    reads_lm=True))


@register("generative_replay", "deep generative replay: the trunk also learns to write "
          "each task's text and replays pseudo-texts the old model labels (Shin et al. "
          "2017)", GenerativeReplayConfig,
          grid={"gr_gamma": (0.05, 0.2, 0.5), "gr_lm_lambda": (0.25, 1.0)})
def generative_replay(hp: GenerativeReplayConfig, ctx: BuildContext) -> Method:
  return _generative_method(_Spec("generative_replay", hp.gr_gamma, hp.gr_lm_lambda,
                                  hp.gr_task_tokens, lamol=False, labels=hp.gr_labels),
                            hp, ctx)


@register("lamol", "LAMOL: the LM writes question-answer pseudo-samples of earlier tasks "
          "(Sun, Ho and Lee 2020; --head=lm)", LamolConfig,
          grid={"lamol_gamma": (0.05, 0.2, 0.5), "lamol_lm_lambda": (0.25, 1.0)},
          heads=("lm",))
def lamol(hp: LamolConfig, ctx: BuildContext) -> Method:
  if ctx.head != "lm":
    raise ValueError("--method=lamol trains classification as text: add --head=lm (or use "
                     "--method=generative_replay with the score head).")
  return _generative_method(_Spec("lamol", hp.lamol_gamma, hp.lamol_lm_lambda,
                                  hp.lamol_task_tokens, lamol=True,
                                  ans_weight=hp.lamol_ans_weight,
                                  qa_loss=hp.lamol_qa_loss), hp, ctx)
