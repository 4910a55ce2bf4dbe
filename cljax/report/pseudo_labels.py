"""What generative replay wrote, judged: the labels of the kept pseudo-examples against
a classifier of the old task trained separately on that task's own training rows.

The judge is a multinomial naive Bayes over lower-cased words (Laplace smoothing), a
model that shares nothing with the GPT-2 being studied; it is trained on exactly the
training rows the run drew for the task (the same seed, classes and left-out
pretraining texts) and its accuracy on the task's test rows says how far to trust it.
``judge_run(workdir)`` reads a run's ``results.json`` and ``pseudo_samples.jsonl``
(paths in its flags are taken from the current directory, as the run took them).
"""

from __future__ import annotations

import collections
import dataclasses
import json
import os
import re
from collections.abc import Sequence

import numpy as np

from cljax import data as data_lib
from cljax.metrics import fmt_interval, mean_std

_WORD = re.compile(r"[a-z0-9']+")


def words(text: str) -> list[str]:
  return _WORD.findall(text.replace("<br />", " ").lower())


@dataclasses.dataclass
class NaiveBayes:
  """Multinomial naive Bayes with add-one smoothing over the training vocabulary."""
  classes: list
  log_prior: np.ndarray        # [C]
  log_likelihood: dict         # word -> [C]

  @classmethod
  def fit(cls, texts: Sequence[str], labels: Sequence) -> NaiveBayes:
    classes = sorted(set(labels))
    counts = {c: collections.Counter() for c in classes}
    for text, label in zip(texts, labels):
      counts[label].update(words(text))
    vocab = sorted(set().union(*counts.values()))
    table = np.array([[counts[c][w] for c in classes] for w in vocab], np.float64) + 1.0
    table = np.log(table / table.sum(axis=0, keepdims=True))
    prior = np.array([sum(1 for y in labels if y == c) for c in classes], np.float64)
    return cls(classes, np.log(prior / prior.sum()), dict(zip(vocab, table)))

  def predict(self, texts: Sequence[str]) -> list:
    out = []
    zero = np.zeros_like(self.log_prior)
    for text in texts:
      score = self.log_prior + sum((self.log_likelihood.get(w, zero) for w in words(text)),
                                   zero)
      out.append(self.classes[int(np.argmax(score))])
    return out


def _study_config(results: dict):
  from cljax.study.config import StudyConfig  # pylint: disable=import-outside-toplevel
  return StudyConfig.from_flags(results["flags"])


def judge_run(workdir: str) -> list[dict]:
  """Per task boundary and old task: how many pseudo-examples were kept, their label
  balance, how often the judge gives the same label, and the judge's test accuracy.
  Empty where the run kept no pseudo-example."""
  path = os.path.join(workdir, "pseudo_samples.jsonl")
  if not os.path.exists(path):
    return []
  with open(path) as f:
    samples = [json.loads(line) for line in f]
  with open(os.path.join(workdir, "results.json")) as f:
    results = json.load(f)
  cfg = _study_config(results)
  keys = data_lib.read_keys(cfg.model) if cfg.init == "pretrained" else frozenset()
  tasks = {t.name: t for t in data_lib.resolve_tasks(cfg.tasks, cfg.task_classes(),
                                                      cfg.data_dir, cfg.task_label_words())}
  out = []
  for task_name in dict.fromkeys(s["task"] for s in samples):
    task = tasks[task_name]
    sub = data_lib.task_subsets(task, data_dir=cfg.data_dir, num_train=cfg.num_train,
                                num_test=cfg.num_test, subset=cfg.subset, seed=cfg.seed,
                                exclude_keys=keys)
    ran = (results.get("data") or {}).get(task_name, {})
    if ran and (len(sub.train), sub.excluded) != (
        ran["train"], ran.get("left_out_as_pretraining_text", sub.excluded)):
      raise ValueError(f"{workdir}: cannot draw the rows task {task_name} trained on again "
                       f"(the run drew {ran['train']}, leaving out "
                       f"{ran.get('left_out_as_pretraining_text')}; now {len(sub.train)}, "
                       f"leaving out {sub.excluded}). Run the report from the directory the "
                       f"run started in, with its data and its base model ({cfg.model}).")
    name = dict(zip(task.source_labels, task.class_names))
    judge = NaiveBayes.fit([sub.train_rows[i][0] for i in sub.train],
                           [name[sub.train_rows[i][1]] for i in sub.train])
    test = judge.predict([sub.test_rows[i][0] for i in sub.test])
    test_acc = float(np.mean([p == name[sub.test_rows[i][1]] for p, i in zip(test, sub.test)]))
    for boundary in sorted({s["boundary"] for s in samples if s["task"] == task_name}):
      mine = [s for s in samples if s["task"] == task_name and s["boundary"] == boundary]
      said = judge.predict([s["text"] for s in mine])
      out.append({"boundary": boundary, "task": task_name, "kept": len(mine),
                  "label_balance": dict(collections.Counter(s["label"] for s in mine)),
                  "agreement": float(np.mean([p == s["label"] for p, s in zip(said, mine)])),
                  "judge_test_accuracy": test_acc})
  return out


def report_lines(results: list[dict]) -> list[str]:
  """A Markdown table over the runs that kept pseudo-examples: per method, boundary
  and old task, the kept count, the share of the commonest label and the judge's
  agreement (mean ± 95 % t-interval over the runs), the judge's test accuracy and each
  run's label counts. Orders come as they first appear in ``results``."""
  rows = collections.defaultdict(list)
  rank = {}
  for r in results:
    if not os.path.exists(os.path.join(r["workdir"], "pseudo_samples.jsonl")):
      continue
    try:
      judged = judge_run(r["workdir"])
    except (OSError, ValueError, KeyError) as e:
      return [f"(Pseudo-labels not judged: {r['workdir']}: {e})", ""]
    order = rank.setdefault(" -> ".join(r["tasks"]), len(rank))
    for j in judged:
      rows[(order, r["method"], j["boundary"], j["task"])].append(j)
  if not rows:
    return []
  lines = ["## Pseudo-labels", "",
           "Every kept pseudo-example's label against a naive Bayes classifier trained "
           "separately on the old task's own training rows (`cljax/pseudo_labels.py`); "
           "commonest label: its share of the kept examples. Mean ± 95 % t-interval "
           "over the runs; the last column counts each run's kept examples per label.", "",
           "| order | method | before task | old task | runs | kept | commonest label | "
           "agreement | judge's test accuracy | labels per run |", "|---" * 10 + "|"]
  names = list(rank)
  for (order, method, boundary, task), js in sorted(rows.items()):
    share = [max(j["label_balance"].values()) / j["kept"] for j in js]
    lines.append(f"| {names[order]} | {method} | {boundary + 1} | {task} | {len(js)} | "
                 f"{fmt_interval(mean_std([j['kept'] for j in js]), 1)} | "
                 f"{fmt_interval(mean_std(share))} | "
                 f"{fmt_interval(mean_std([j['agreement'] for j in js]))} | "
                 f"{fmt_interval(mean_std([j['judge_test_accuracy'] for j in js]))} | "
                 f"{_label_counts(js)} |")
  return lines + [""]


def _label_counts(judged: list[dict]) -> str:
  """``neg:pos 29:171, 107:93``: each run's kept examples per label (names sorted)."""
  names = sorted({n for j in judged for n in j["label_balance"]})
  runs = ", ".join(":".join(str(j["label_balance"].get(n, 0)) for n in names)
                   for j in judged)
  return f"{':'.join(names)} {runs}"
