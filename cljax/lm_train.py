"""Language-model training: Alpaca-style instruction tuning and plain-text
(domain-adaptive) pretraining, with checkpoints, exact ``--resume``, held-out
perplexity, generations and a Hugging Face ``GPT2LMHeadModel`` export.

``run(config, workdir)`` writes ``results.json`` (held-out loss and perplexity before
and after training, step counts, timing), ``metrics.jsonl``, TensorBoard scalars,
orbax checkpoints, ``generations.jsonl`` (with ``--generate``) and ``hf_model/``.

Instruction data (``--data_format=alpaca``): rows with ``instruction``, optional
``input`` and ``output``, formatted with the Stanford Alpaca prompt templates; as in
the authors' ``train.py``, the prompt is tokenized alone and with the response plus
EOS, and only the response and EOS tokens carry loss. Plain text
(``--data_format=text``): every row's ``text`` plus EOS, concatenated and cut into
blocks of ``--block_size`` tokens that all carry loss (GPT-2's pretraining recipe).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import time

from absl import logging
import jax
import numpy as np

from cljax import checkpoint
from cljax import data as data_lib
from cljax import hf
from cljax import steps
from cljax.checkpoint import Checkpointer
from cljax.config import (COUNT, NON_NEGATIVE, POSITIVE, CheckpointOptions, ModelOptions,
                          OptimizerOptions, option)
from cljax.generation import generate
from cljax.model import GPT2LM, random_params
from cljax.progress import Interrupted, StepLogger, Writers, drop_records_after  # noqa: F401

# Stanford Alpaca's prompt templates (tatsu-lab/stanford_alpaca, train.py).
PROMPT_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides "
    "further context. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:")
PROMPT_NO_INPUT = (
    "Below is an instruction that describes a task. Write a response that appropriately "
    "completes the request.\n\n### Instruction:\n{instruction}\n\n### Response:")


@dataclasses.dataclass(frozen=True)
class LMConfig(CheckpointOptions, OptimizerOptions, ModelOptions):
  """Everything that defines an LM training run (``cljax-instruct``'s flags)."""
  data: str = option("", "Training data: local .json (a list of rows) or .jsonl files "
                     "(several joined by commas), or a Hugging Face hub dataset id (e.g. "
                     "tatsu-lab/alpaca; its train split).")
  data_format: str = option("alpaca", "alpaca: instruction / input / output rows, "
                            "prompt masked; text: rows with a text field, packed into "
                            "--block_size blocks.", choices=("alpaca", "text"))
  eval_data: str | None = option(None, "Held-out data in the same format (default: "
                                 "--num_eval rows carved from --data).")
  num_eval: int = option(64, "Held-out rows: a seeded sample of --eval_data (0: all of it), "
                         "or carved from --data (0: no held-out evaluation).",
                         bound=NON_NEGATIVE)
  eval_every: int = option(0, "Evaluate the held-out loss every N steps, for the curve "
                           "(0: only before and after training).", bound=NON_NEGATIVE)
  max_examples: int | None = option(-1, "Use at most this many training rows, a seeded "
                                    "sample (-1: all).", bound=COUNT)
  text_field: str = option("text", "--data_format=text: the field holding the text.")
  block_size: int = option(128, "--data_format=text: tokens per packed block.",
                           bound=POSITIVE)
  max_length: int = option(256, "--data_format=alpaca: tokens per example (prompt, "
                           "response and EOS, truncated; right padded).", bound=POSITIVE)
  length_bucket: int = option(
      32, "Pad each batch only to the smallest multiple of N (or its full length) that "
      "holds its longest row, in training and the held-out evaluation (sorted by "
      "length): exact, one compiled program per length. 0: full length.",
      bound=NON_NEGATIVE)
  epochs: int = option(3, "Epochs over the training data.", bound=POSITIVE)
  learning_rate: float = option(2e-5, "AdamW peak learning rate, decayed linearly to 0 "
                                "(Stanford Alpaca: 2e-5, 3 epochs).", bound=NON_NEGATIVE)
  generate: str | None = option(None, "After training, answer the prompts of this file "
                                "(JSON Lines rows with instruction [and input], or a .txt "
                                "with one instruction per line) into "
                                "WORKDIR/generations.jsonl.")
  max_new_tokens: int = option(128, "Tokens generated per prompt at most.", bound=POSITIVE)
  temperature: float = option(0.0, "Sampling temperature (0: greedy).", bound=NON_NEGATIVE)
  top_k: int = option(0, "Sample from the k most likely tokens (0: all).",
                      bound=NON_NEGATIVE)
  top_p: float = option(1.0, "Nucleus sampling mass in (0, 1] (1: off).")
  export: bool = option(True, "Write WORKDIR/hf_model, a GPT2LMHeadModel folder, at the end.")

  def __post_init__(self):
    if self.max_examples == -1:
      object.__setattr__(self, "max_examples", None)
    self.validate()

  def validate(self) -> None:
    super().validate()
    if not self.data:
      raise ValueError("--data is required: a .json / .jsonl file or a hub dataset id.")
    if not 0.0 < self.top_p <= 1.0:
      raise ValueError(f"--top_p={self.top_p}: expected a value in (0, 1].")


# ----------------------------------------------------------------------------
# Data
# ----------------------------------------------------------------------------

def read_records(source: str) -> list[tuple[dict, str]]:
  """(row, where) pairs of a .json list, a .jsonl file or a hub dataset's train split;
  ``where`` ("file:line") names the row in errors."""
  path = os.path.expanduser(source)
  if os.path.isfile(path):
    return data_lib.read_json_records(path)
  if os.path.exists(path) or source.startswith((".", "/", "~")):
    raise FileNotFoundError(f"{source}: not a file; expected a .json or .jsonl file or a "
                            "Hugging Face hub dataset id.")
  try:
    import datasets  # pylint: disable=import-outside-toplevel
    ds = datasets.load_dataset(source, split="train")
  except Exception as e:  # offline, unknown id
    raise OSError(f"Could not load {source!r} from the Hugging Face hub ({type(e).__name__}:"
                  f" {e}). Offline, pass a local .json / .jsonl file.") from e
  return [(row, f"hub:{source}:{i}") for i, row in enumerate(ds)]


def alpaca_prompt(row: dict, where: str = "") -> str:
  """The Stanford Alpaca prompt of a row (with or without its ``input``)."""
  for key in ("instruction",) + (("input",) if row.get("input") else ()):
    if not isinstance(row.get(key), str):
      raise ValueError(f"{where}: {key!r} must be a string, found {row.get(key)!r:.60}.")
  if row.get("input"):
    return PROMPT_INPUT.format(instruction=row["instruction"], input=row["input"])
  return PROMPT_NO_INPUT.format(instruction=row["instruction"])


def alpaca_arrays(records, tokenizer, max_length: int) -> dict[str, np.ndarray]:
  """``input_ids``, ``attention_mask`` and ``loss_mask`` (1 on the response and its
  EOS only) of Alpaca rows, truncated to ``max_length`` and right padded."""
  n = len(records)
  ids = np.full((n, max_length), tokenizer.pad_token_id, np.int32)
  mask, loss = np.zeros((n, max_length), np.int32), np.zeros((n, max_length), np.int32)
  cut = 0
  for i, (row, where) in enumerate(records):
    if not isinstance(row, dict) or "instruction" not in row or "output" not in row:
      raise ValueError(f"{where}: expected an object with 'instruction' and 'output' (and "
                       f"optionally 'input'), found {str(row)[:80]!r}.")
    if not isinstance(row["output"], str):
      raise ValueError(f"{where}: 'output' must be a string, found {row['output']!r:.60}.")
    prompt = alpaca_prompt(row, where)
    source = tokenizer(prompt)["input_ids"]
    full = tokenizer(prompt + row["output"] + tokenizer.eos_token)["input_ids"][:max_length]
    cut += len(source) >= len(full)
    ids[i, :len(full)] = full
    mask[i, :len(full)] = 1
    loss[i, len(source):len(full)] = 1
  if cut:
    logging.warning("%d of %d examples have no response token left within --max_length=%d "
                    "(their prompts fill it); they carry no loss.", cut, n, max_length)
  return {"input_ids": ids, "attention_mask": mask, "loss_mask": loss}


def text_arrays(records, tokenizer, block_size: int, field: str = "text"
                ) -> dict[str, np.ndarray]:
  """Every row's text plus EOS, concatenated and cut into full blocks of
  ``block_size`` tokens (the remainder is dropped), every token a target."""
  texts = []
  for row, where in records:
    text = row.get(field) if isinstance(row, dict) else None
    if not isinstance(text, str) or not text.strip():
      raise ValueError(f"{where}: expected a non-empty string field {field!r}.")
    texts.append(text)
  stream = [t for ids in tokenizer(texts, verbose=False)["input_ids"]
            for t in (*ids, tokenizer.eos_token_id)]
  blocks = len(stream) // block_size
  if blocks == 0:
    raise ValueError(f"The data holds {len(stream)} tokens, less than one --block_size="
                     f"{block_size} block.")
  ids = np.asarray(stream[:blocks * block_size], np.int32).reshape(blocks, block_size)
  ones = np.ones_like(ids)
  return {"input_ids": ids, "attention_mask": ones, "loss_mask": ones}


def read_sources(sources: str) -> list[tuple[dict, str]]:
  """The rows of one source or of several joined by commas, in order."""
  return [r for source in sources.split(",") if source.strip()
          for r in read_records(source.strip())]


def _sample(records: list, n: int | None, seed) -> list:
  """At most ``n`` records, a seeded sample kept in file order (None: all)."""
  if n is None or n >= len(records):
    return records
  return [records[i] for i in sorted(np.random.default_rng(seed).permutation(len(records))[:n])]


def load_splits(cfg: LMConfig, tokenizer) -> tuple[dict, dict | None]:
  """(train arrays, held-out arrays or None) of the configured data: held-out rows are
  ``--num_eval`` of ``--eval_data`` (seeded sample), or carved from ``--data``."""
  records = read_sources(cfg.data)
  if cfg.eval_data:
    held = _sample(read_sources(cfg.eval_data), cfg.num_eval or None, (cfg.seed, 1))
  else:
    order = np.random.default_rng(cfg.seed).permutation(len(records))
    n_eval = min(cfg.num_eval, len(records) // 2)
    held = [records[i] for i in order[:n_eval]]
    records = [records[i] for i in sorted(order[n_eval:])]
  records = _sample(records, cfg.max_examples, (cfg.seed, 2))
  if cfg.data_format == "alpaca":
    make = functools.partial(alpaca_arrays, tokenizer=tokenizer, max_length=cfg.max_length)
  else:
    make = functools.partial(text_arrays, tokenizer=tokenizer, block_size=cfg.block_size,
                             field=cfg.text_field)
  train = make(records)
  return train, (make(held) if held else None)


# ----------------------------------------------------------------------------
# Model, evaluation, generation
# ----------------------------------------------------------------------------

def build_lm(cfg: LMConfig, tokenizer) -> tuple[GPT2LM, dict]:
  """The LM to train: ``--model``'s weights or a random init of ``--size``."""
  if cfg.init == "pretrained":
    model, params = hf.load_lm(cfg.model, dtype=cfg.dtype, **cfg.config_overrides())
    cfg.check_vocabulary(model.config, tokenizer)
    return model, params
  model = GPT2LM(cfg.random_init_config(
      tokenizer, max(cfg.max_length, cfg.block_size) + cfg.max_new_tokens))
  return model, random_params(model, jax.random.key(cfg.seed))


def _lm_batch(batch: dict) -> dict:
  """A batch of the LM steps: padding rows of a last, partial batch carry no loss."""
  weights = batch.pop("weights")
  return {**batch, "loss_mask": batch["loss_mask"] * weights[:, None].astype(np.int32)}


def buckets(cfg: LMConfig, arrays: dict) -> tuple[int, ...]:
  """The lengths the batches of ``arrays`` are cut to (``--length_bucket``)."""
  return data_lib.length_buckets(arrays["input_ids"].shape[1], cfg.length_bucket)


def evaluate(eval_fn, params, arrays: dict, batch_size: int, lengths=()) -> dict[str, float]:
  """Held-out next-token loss, perplexity and accuracy over the target tokens; with
  length buckets ``lengths``, in order of length, each batch cut to its bucket."""
  batches = list(map(_lm_batch, data_lib.eval_batches(arrays, batch_size, lengths)))
  steps.compile_ahead(eval_fn, [(params, b) for b in data_lib.one_batch_per_shape(batches)])
  totals = steps.accumulate(eval_fn, params, batches)
  loss = float(totals["loss_sum"]) / max(float(totals["count"]), 1.0)
  return {"loss": loss, "perplexity": float(np.exp(loss)),
          "token_accuracy": float(totals["correct"]) / max(float(totals["count"]), 1.0),
          "tokens": int(totals["count"])}


def read_prompts(path: str) -> list[dict]:
  """Prompts to answer: JSON Lines rows with ``instruction`` (and ``input``), or a text
  file with one instruction per line."""
  if path.endswith((".jsonl", ".json")):
    return [row for row, _ in read_records(path)]
  return [{"instruction": line} for line in data_lib.read_text(path).splitlines()
          if line.strip()]


def answer(model, params, tokenizer, prompts: list[dict], cfg: LMConfig,
           batch_size: int = 8) -> list[dict]:
  """Generated responses (decoded up to EOS) to Alpaca-formatted prompts."""
  out = []
  rng = jax.random.key(cfg.seed)
  for start in range(0, len(prompts), batch_size):
    chunk = prompts[start:start + batch_size]
    texts = [alpaca_prompt(p, f"prompt {start + i}") for i, p in enumerate(chunk)]
    enc = tokenizer(texts, padding="longest", return_attention_mask=True)
    rng, key = jax.random.split(rng)
    tokens = np.asarray(generate(
        model, params, np.asarray(enc["input_ids"]), np.asarray(enc["attention_mask"]),
        max_new_tokens=cfg.max_new_tokens, rng=key, temperature=cfg.temperature,
        top_k=cfg.top_k or None, top_p=cfg.top_p if cfg.top_p < 1 else None,
        eos_token_id=tokenizer.eos_token_id))
    for p, row in zip(chunk, tokens):
      row = row.tolist()
      row = row[:row.index(tokenizer.eos_token_id)] if tokenizer.eos_token_id in row else row
      out.append({**p, "response": tokenizer.decode(row)})
  return out


# ----------------------------------------------------------------------------
# The run
# ----------------------------------------------------------------------------

OUTPUTS = ("results.json", "metrics.jsonl", "tensorboard", "generations.jsonl", "hf_model")
# Settings a resumed run may change (logging, outputs, generation): recorded, not refused.
RESUMABLE_CHANGES = frozenset({
    "checkpoint_every", "keep_checkpoints", "log_every", "stop_after_steps", "eval_batch_size",
    "eval_every", "remat", "generate", "max_new_tokens", "temperature", "top_k", "top_p",
    "export"})


@dataclasses.dataclass
class LMRecord:
  """The run's progress, stored as JSON in every checkpoint."""
  step: int = 0
  held_out_before: dict | None = None
  train_seconds: float = 0.0
  config: dict = dataclasses.field(default_factory=dict)
  curve: list = dataclasses.field(default_factory=list)   # held-out loss through the run


def _check_lengths(model, train: dict) -> None:
  width = train["input_ids"].shape[1]
  if width > model.config.n_positions:
    raise ValueError(f"Examples of {width} tokens exceed the model's n_positions="
                     f"{model.config.n_positions}; lower --max_length or --block_size.")


def _restore_or_start(cfg, ckpt, params, tx, held, eval_fn):
  state = steps.init_train_state(params, tx, jax.random.key(cfg.seed))
  if ckpt is not None and ckpt.latest_step() is not None:
    state, meta, step = ckpt.restore_newest(jax.eval_shape(lambda: state))
    logging.info("Resumed from %s, checkpoint %d.", ckpt.directory, step)
    return state, LMRecord(**{k: v for k, v in meta.items()
                              if k in {f.name for f in dataclasses.fields(LMRecord)}})
  before = evaluate(eval_fn, params, held, cfg.eval_batch_size,
                    buckets(cfg, held)) if held else None
  if before:
    logging.info("Held-out before training: loss %.4f, perplexity %.2f.", before["loss"],
                 before["perplexity"])
  return state, LMRecord(held_out_before=before, config=cfg.to_dict())


def train(cfg: LMConfig, state, record: LMRecord, arrays: dict, tx, schedule, ckpt,
          logger: StepLogger, model, held_out=None):
  """Trains from ``record.step`` to the end, checkpointing every ``checkpoint_every``
  and, with ``held_out(params) -> dict``, evaluating every ``eval_every`` steps."""
  per_epoch = data_lib.num_batches(data_lib.size(arrays), cfg.batch_size)
  total = per_epoch * cfg.epochs
  train_fn = jax.jit(functools.partial(steps.lm_train_step, model=model, tx=tx),
                     donate_argnums=0)
  logger.start_task(0, cfg.data_format, total,
                    lambda s: schedule(min(s, total) // cfg.grad_accum_steps))
  t0, start = time.time(), record.step

  def batches_from(start: int):
    first_epoch, b = divmod(start, per_epoch)
    for epoch in range(first_epoch, cfg.epochs):
      yield from map(_lm_batch, data_lib.batches(
          arrays, cfg.batch_size, seed=(cfg.seed, epoch),
          start=b if epoch == first_epoch else 0, buckets=buckets(cfg, arrays)))

  steps.compile_ahead(train_fn, [(state, b) for b in
                                 data_lib.one_batch_per_shape(batches_from(start))])
  for s, batch in zip(range(start, total), batches_from(start)):
    state, m = train_fn(state, batch)
    record.step = s + 1
    logger.push(s + 1, s + 1, m)
    if held_out and cfg.eval_every and record.step % cfg.eval_every == 0 and s + 1 < total:
      logger.flush()
      point = {"global_step": record.step, **held_out(state.params)}
      record.curve.append(point)
      logger.writers.write(point, record.step, "held_out")
      logging.info("step %d: held-out loss %.4f, perplexity %.2f", record.step, point["loss"],
                   point["perplexity"])
    if cfg.checkpoint_every and record.step % cfg.checkpoint_every == 0 and s + 1 < total:
      logger.flush()
      record.train_seconds += time.time() - t0
      t0 = time.time()
      checkpoint.save_finite(ckpt, record.step, state, dataclasses.asdict(record))
    logger.stop_after(cfg.stop_after_steps)
  logger.flush()
  record.train_seconds += time.time() - t0
  checkpoint.save_finite(ckpt, record.step, state, dataclasses.asdict(record))
  return state


def run(cfg: LMConfig, workdir: str, *, resume: bool = False, flags: dict | None = None
        ) -> dict:
  """Trains the LM, evaluates held-out loss and perplexity, generates on request,
  exports ``workdir/hf_model``; returns the results dict (also ``results.json``)."""
  t_start = time.time()
  ckpt = checkpoint.open_run(workdir, cfg.to_dict(), resume, keep=cfg.keep_checkpoints,
                             outputs=OUTPUTS, resumable=RESUMABLE_CHANGES)
  tokenizer = hf.load_tokenizer(cfg.tokenizer or cfg.model)
  model, params = build_lm(cfg, tokenizer)
  arrays, held = load_splits(cfg, tokenizer)
  _check_lengths(model, arrays)
  logging.info("Training on %d %s of %d tokens (%d target tokens); %s held-out.",
               data_lib.size(arrays), "examples" if cfg.data_format == "alpaca" else "blocks",
               arrays["input_ids"].shape[1], int(arrays["loss_mask"][:, 1:].sum()),
               data_lib.size(held) if held else "no")
  updates = -(-data_lib.num_batches(data_lib.size(arrays), cfg.batch_size) * cfg.epochs
              // cfg.grad_accum_steps)
  tx, schedule = steps.make_optimizer(
      learning_rate=cfg.learning_rate, total_steps=updates, warmup_steps=cfg.warmup_steps,
      weight_decay=cfg.weight_decay, max_grad_norm=cfg.max_grad_norm,
      grad_accum_steps=cfg.grad_accum_steps)
  eval_fn = jax.jit(functools.partial(steps.lm_eval_step, model=model))
  state, record = _restore_or_start(cfg, ckpt if resume else None, params, tx, held, eval_fn)
  ckpt = ckpt or Checkpointer(os.path.join(workdir, "checkpoints"), cfg.keep_checkpoints)
  drop_records_after(os.path.join(workdir, "metrics.jsonl"), record.step)
  logger = StepLogger(Writers(workdir), cfg.log_every, ckpt.latest_step, unit="tokens")
  try:
    held_out = held and functools.partial(evaluate, eval_fn, arrays=held,
                                          batch_size=cfg.eval_batch_size,
                                          lengths=buckets(cfg, held))
    state = train(cfg, state, record, arrays, tx, schedule, ckpt, logger, model, held_out)
  finally:
    logger.close()
    ckpt.close()
  return finish(cfg, workdir, model, state.params, tokenizer, record, held, eval_fn,
                logger.divergence(), flags, time.time() - t_start)


def finish(cfg: LMConfig, workdir: str, model, params, tokenizer, record: LMRecord, held,
           eval_fn, diverged: str | None, flags: dict | None, wall_s: float) -> dict:
  """Held-out evaluation, generations and export after training; ``results.json``."""
  after = evaluate(eval_fn, params, held, cfg.eval_batch_size,
                    buckets(cfg, held)) if held else None
  if after:
    logging.info("Held-out after training: loss %.4f, perplexity %.2f.", after["loss"],
                 after["perplexity"])
  if diverged:
    logging.warning("%s", diverged)
  if cfg.generate:
    rows = answer(model, params, tokenizer, read_prompts(cfg.generate), cfg)
    with open(os.path.join(workdir, "generations.jsonl"), "w") as f:
      f.writelines(json.dumps(r) + "\n" for r in rows)
    logging.info("Wrote %d generations to %s.", len(rows),
                 os.path.join(workdir, "generations.jsonl"))
  if cfg.export:
    hf.save_pretrained(params, model.config, os.path.join(workdir, "hf_model"), head="lm")
    tokenizer.save_pretrained(os.path.join(workdir, "hf_model"))
  results = {"data_format": cfg.data_format, "steps": record.step,
             "held_out_before": record.held_out_before, "held_out_after": after,
             "held_out_curve": record.curve,
             "warnings": [diverged] if diverged else [],
             "flags": flags if flags is not None else cfg.to_dict(),
             "timing": {"train_seconds": record.train_seconds,
                        "wall_seconds_this_process": wall_s},
             "model": {"n_layer": model.config.n_layer, "n_embd": model.config.n_embd,
                       "vocab_size": model.config.vocab_size}}
  with open(os.path.join(workdir, "results.json"), "w") as f:
    json.dump(results, f, indent=2)
  return results
