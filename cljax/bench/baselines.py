"""The whole study as the baselines ``cljax-study-vs-torch`` times ``cljax.study.run``
against, same rows, size and recipe: a hand-written PyTorch loop over cljax's arrays
(``torch_study``) and the seed's own script, transformers' ``Trainer`` per task
(``trainer_study``). The step, Fisher and generation benchmarks are in ``bench.py``.
"""

from __future__ import annotations

import functools
import time
from typing import Any

import numpy as np

from cljax.models import GPT2Config, families

# ----------------------------------------------------------------------------
# A PyTorch loop over cljax's arrays
# ----------------------------------------------------------------------------

def _linear_warmup_decay(s: int, *, warm: int, total: int) -> float:
  """The learning-rate factor of the Hugging Face Trainer's linear schedule."""
  return s / warm if s < warm else max(0.0, (total - s) / (total - warm))


def torch_study(cfg, device: str | None = None) -> dict[str, Any]:
  """The sequential study in plain PyTorch with transformers'
  GPT2ForSequenceClassification: the same data arrays, random init of the same size,
  AdamW with linear decay and clipping, fresh optimizer per task, evaluation of every
  task before training and after each task. The baseline for ``cljax.study.run``."""
  import torch  # pylint: disable=import-outside-toplevel
  from cljax import data as data_lib
  from cljax.models import hf  # pylint: disable=import-outside-toplevel
  device = device or ("cuda" if torch.cuda.is_available() else "cpu")
  t_start = time.perf_counter()
  tasks = data_lib.resolve_tasks(cfg.tasks, cfg.task_classes(), cfg.data_dir)
  tokenizer = hf.load_tokenizer(cfg.tokenizer or cfg.model)
  task_data = data_lib.load_task_data(
      tasks, tokenizer, data_dir=cfg.data_dir, num_train=cfg.num_train,
      num_test=cfg.num_test, subset=cfg.subset, max_length=cfg.max_length, seed=cfg.seed,
      cache_dir=cfg.cache_dir)
  model = _hf_model(cfg, tokenizer, data_lib.num_labels(tasks)).to(device)
  autocast = cfg.dtype == "bfloat16"
  sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)

  def to_torch(batch):
    return {k: torch.as_tensor(batch[k]).to(device, non_blocking=True)
            for k in ("input_ids", "attention_mask", "labels", "weights")}

  def evaluate():
    model.eval()
    accs = []
    with torch.inference_mode(), torch.autocast(device, torch.bfloat16, enabled=autocast):
      for d in task_data:
        correct = count = 0.0
        for batch in data_lib.batches(d.test, cfg.eval_batch_size):
          b = to_torch(batch)
          logits = model(b["input_ids"].long(), attention_mask=b["attention_mask"]).logits
          correct += float(((logits.argmax(-1) == b["labels"]) * b["weights"]).sum())
          count += float(b["weights"].sum())
        accs.append(correct / count)
    return accs

  rows, train_s = [evaluate()], []
  for k, d in enumerate(task_data):
    n_steps = data_lib.num_batches(data_lib.size(d.train), cfg.batch_size) * cfg.epochs
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.learning_rate,
                            weight_decay=cfg.weight_decay)
    warm = min(cfg.warmup_steps, n_steps)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, functools.partial(_linear_warmup_decay, warm=warm, total=n_steps))
    model.train()
    sync()
    t0 = time.perf_counter()
    for epoch in range(cfg.epochs):
      for batch in data_lib.batches(d.train, cfg.batch_size, seed=(cfg.seed, k, epoch)):
        b = to_torch(batch)
        with torch.autocast(device, torch.bfloat16, enabled=autocast):
          logits = model(b["input_ids"].long(), attention_mask=b["attention_mask"]).logits
        losses = torch.nn.functional.cross_entropy(logits.float(), b["labels"].long(),
                                                   reduction="none")
        loss = (losses * b["weights"]).sum() / b["weights"].sum().clamp(min=1)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
    sync()
    train_s.append(time.perf_counter() - t0)
    rows.append(evaluate())
  return {"torch_accuracy_matrix": rows[1:], "torch_baseline_accuracy": rows[0],
          "torch_train_seconds": sum(train_s),
          "torch_wall_seconds": time.perf_counter() - t_start}


def _hf_model(cfg, tokenizer, num_labels: int):
  """transformers' ``*ForSequenceClassification`` of ``cfg.arch`` (GPT-2's
  GPT2ForSequenceClassification by default), random init of ``cfg.size``."""
  import torch  # pylint: disable=import-outside-toplevel
  import transformers  # pylint: disable=import-outside-toplevel
  if cfg.arch != "gpt2":   # the family's random-init shape, as the study builds it
    config = cfg.random_init_config(tokenizer, cfg.max_length, num_labels=num_labels)
    fields = families.hf_config(config, "score")
    hf_config = transformers.AutoConfig.for_model(fields.pop("model_type"), **fields)
    torch.manual_seed(cfg.seed)
    return transformers.AutoModelForSequenceClassification.from_config(hf_config)
  config = GPT2Config.from_size(cfg.size, vocab_size=len(tokenizer), num_labels=num_labels,
                                pad_token_id=tokenizer.pad_token_id,
                                eos_token_id=tokenizer.eos_token_id)
  hf_config = transformers.GPT2Config(**{k: v for k, v in config.to_hf().items()
                                         if k not in ("architectures", "torch_dtype")})
  torch.manual_seed(cfg.seed)
  return transformers.GPT2ForSequenceClassification(hf_config)


# ----------------------------------------------------------------------------
# The seed's script: transformers' Trainer per task
# ----------------------------------------------------------------------------

def _trainer_datasets(cfg, tasks, tokenizer, use_datasets: bool | None = None):
  """Per task, (train, test) datasets of the rows cljax uses, labels on the shared head,
  tokenized as the seed script does (``datasets.map``, padding to max_length). Without
  the ``datasets`` package (``use_datasets=None`` tries it), a list of the same feature
  dicts, which ``Trainer`` takes as well. Returns (splits, "datasets.map" or "list")."""
  from cljax import data as data_lib  # pylint: disable=import-outside-toplevel
  datasets = None
  if use_datasets is not False:
    try:
      import datasets  # pylint: disable=import-outside-toplevel
    except Exception:  # not installed, or a pyarrow/fsspec it cannot use
      if use_datasets:
        raise

  def tokenize(batch):
    return tokenizer(batch["text"], padding="max_length", truncation=True,
                     max_length=cfg.max_length)

  def dataset(texts, labels):
    if datasets is not None:
      ds = datasets.Dataset.from_dict({"text": texts, "label": labels})
      return ds.map(tokenize, batched=True, remove_columns=["text"])
    enc = tokenize({"text": texts})
    return [{"input_ids": ids, "attention_mask": m, "label": y}
            for ids, m, y in zip(enc["input_ids"], enc["attention_mask"], labels)]

  out = []
  for task in tasks:
    sub = data_lib.task_subsets(task, data_dir=cfg.data_dir, num_train=cfg.num_train,
                                num_test=cfg.num_test, subset=cfg.subset, seed=cfg.seed)
    remap = task.label_map
    out.append(tuple(dataset([rows[i][0] for i in idx], [remap[rows[i][1]] for i in idx])
                     for rows, idx in ((sub.train_rows, sub.train),
                                       (sub.test_rows, sub.test))))
  return out, "datasets.map" if datasets is not None else "list"


def trainer_study(cfg, workdir: str) -> dict[str, Any]:
  """The seed's own script: transformers' ``Trainer`` per task (a fresh one, as the
  original), ``TrainingArguments`` from the study's recipe (batch, epochs, lr, linear
  decay, warmup, clipping), ``DataCollatorWithPadding``, rows tokenized by
  ``datasets.map`` with padding to max_length, ``eval_strategy="epoch"`` over every
  task's test set (no evaluation before training: the study's baseline row is work
  the seed script does not do). Same rows and random-init size as
  ``cljax.study.run``; offline. Returns its wall time and accuracy matrix."""
  import torch  # pylint: disable=import-outside-toplevel
  import transformers  # pylint: disable=import-outside-toplevel
  from cljax import data as data_lib
  from cljax.models import hf  # pylint: disable=import-outside-toplevel
  t_start = time.perf_counter()
  tasks = data_lib.resolve_tasks(cfg.tasks, cfg.task_classes(), cfg.data_dir)
  tokenizer = hf.load_tokenizer(cfg.tokenizer or cfg.model)
  splits, data_path = _trainer_datasets(cfg, tasks, tokenizer)
  model = _hf_model(cfg, tokenizer, data_lib.num_labels(tasks))
  evals = {t.name: test for t, (_, test) in zip(tasks, splits)}

  def accuracy(p):
    return {"accuracy": float(np.mean(np.argmax(p.predictions, -1) == p.label_ids))}

  def trainer(train):
    args = transformers.TrainingArguments(
        output_dir=workdir, num_train_epochs=cfg.epochs,
        per_device_train_batch_size=cfg.batch_size,
        per_device_eval_batch_size=cfg.eval_batch_size, learning_rate=cfg.learning_rate,
        warmup_steps=cfg.warmup_steps, weight_decay=cfg.weight_decay,
        max_grad_norm=cfg.max_grad_norm, eval_strategy="epoch", save_strategy="no",
        report_to="none", seed=cfg.seed, bf16=cfg.dtype == "bfloat16",
        use_cpu=not torch.cuda.is_available(), disable_tqdm=True, logging_steps=50)
    return transformers.Trainer(model=model, args=args, train_dataset=train,
                                eval_dataset=evals, compute_metrics=accuracy,
                                data_collator=transformers.DataCollatorWithPadding(tokenizer))

  def row(metrics):
    return [metrics[f"eval_{t.name}_accuracy"] for t in tasks]

  rows, train_s = [], []
  for train, _ in splits:
    t0 = time.perf_counter()
    tr = trainer(train)
    tr.train()
    train_s.append(time.perf_counter() - t0)
    last = {}
    for entry in tr.state.log_history:   # the evaluations at the last epoch's end
      last.update({k: v for k, v in entry.items() if k.startswith("eval_")})
    rows.append(row(last))
  return {"trainer_accuracy_matrix": rows, "trainer_train_and_eval_seconds": sum(train_s),
          "trainer_wall_seconds": time.perf_counter() - t_start, "trainer_data": data_path,
          "trainer_model": type(model).__name__,
          "transformers": transformers.__version__, "torch": torch.__version__}
