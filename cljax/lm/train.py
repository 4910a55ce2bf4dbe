"""Language-model training on the study's loop (:mod:`cljax.train.loop`): Alpaca-style
instruction tuning and plain-text (domain-adaptive) pretraining, with checkpoints,
exact ``--resume``, held-out perplexity, generations and a Hugging Face
``GPT2LMHeadModel`` export. The data itself is :mod:`cljax.lm.data`.

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

from cljax import data as data_lib
from cljax.lm import data as lm_data
from cljax.models import hf
from cljax.models.build import ModelOptions
from cljax.models.build import build_model
from cljax.models.generation import generate
from cljax.options import COUNT, NON_NEGATIVE, POSITIVE, option
from cljax.train import checkpoint
from cljax.train import loop
from cljax.train import optim
from cljax.train import run as run_lib
from cljax.train import steps
from cljax.train.optim import OptimizerOptions
from cljax.train.progress import StepLogger
from cljax.train.run import CheckpointOptions

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
  data_fraction: tuple[float, ...] = option(
      (), "Keep only a fixed part of each --data source: the rows whose text's SHA-256 "
      "falls below this fraction, the same rows in every run and every seed (one value, "
      "or one per source; empty: every row). The study's subsets leave out what a model "
      "was trained on (hf_model/pretraining_texts.json).")
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
    try:
      object.__setattr__(self, "data_fraction", tuple(float(f) for f in self.data_fraction))
    except ValueError as e:
      raise ValueError(f"--data_fraction={','.join(map(str, self.data_fraction))}: expected "
                       "numbers in (0, 1], one or one per --data source.") from e
    self.validate()

  def validate(self) -> None:
    super().validate()
    if not self.data:
      raise ValueError("--data is required: a .json / .jsonl file or a hub dataset id.")
    bad = [f for f in self.data_fraction if not 0.0 < f <= 1.0]
    if bad:
      raise ValueError(f"--data_fraction={bad[0]}: expected a fraction in (0, 1].")
    if not 0.0 < self.top_p <= 1.0:
      raise ValueError(f"--top_p={self.top_p}: expected a value in (0, 1].")


# ----------------------------------------------------------------------------
# Data
# ----------------------------------------------------------------------------

def records(cfg: LMConfig) -> tuple[list, list]:
  """(training rows, held-out rows) of the configured data: held-out rows are
  ``--num_eval`` of ``--eval_data`` (seeded sample), or carved from ``--data``; no
  training row shares a text with any row of ``--eval_data``."""
  train = lm_data.read_part(cfg.data, cfg.data_fraction, cfg.data_format, cfg.text_field)
  if cfg.eval_data:
    every = lm_data.read_sources(cfg.eval_data)
    train = lm_data.drop_texts(
        train, frozenset(k for r, _ in every
                         for k in lm_data.row_keys(r, cfg.data_format, cfg.text_field)),
        cfg.data_format, cfg.text_field, "--eval_data")
    held = lm_data.sample_records(every, cfg.num_eval or None, (cfg.seed, 1))
  else:
    order = np.random.default_rng(cfg.seed).permutation(len(train))
    n_eval = min(cfg.num_eval, len(train) // 2)
    held = [train[i] for i in order[:n_eval]]
    train = [train[i] for i in sorted(order[n_eval:])]
  return lm_data.sample_records(train, cfg.max_examples, (cfg.seed, 2)), held


def load_splits(cfg: LMConfig, tokenizer) -> tuple[dict, dict | None, frozenset[str]]:
  """(train arrays, held-out arrays or None, the training texts' keys) of
  :func:`records`."""
  train, held = records(cfg)
  if cfg.data_format == "alpaca":
    make = functools.partial(lm_data.alpaca_arrays, tokenizer=tokenizer,
                             max_length=cfg.max_length)
  else:
    make = functools.partial(lm_data.text_arrays, tokenizer=tokenizer,
                             block_size=cfg.block_size, field=cfg.text_field)
  keys = frozenset(k for r, _ in train
                   for k in lm_data.row_keys(r, cfg.data_format, cfg.text_field))
  return make(train), (make(held) if held else None), keys


# ----------------------------------------------------------------------------
# Model, evaluation, generation
# ----------------------------------------------------------------------------

def build_lm(cfg: LMConfig, tokenizer):
  """(model, params): the LM to train, ``--model``'s weights or a random init of
  ``--size`` (positions for the longest example plus the generated tokens)."""
  return build_model(cfg, tokenizer, kind="lm", rng=jax.random.key(cfg.seed),
                          n_positions=max(cfg.max_length, cfg.block_size) + cfg.max_new_tokens)


def _lm_batch(batch: dict) -> dict:
  """A batch of the LM steps: padding rows of a last, partial batch carry no loss."""
  weights = batch.pop("weights")
  return {**batch, "loss_mask": batch["loss_mask"] * weights[:, None].astype(np.int32)}


def buckets(cfg: LMConfig, arrays: dict) -> tuple[int, ...]:
  """The lengths the batches of ``arrays`` are cut to (``--length_bucket``)."""
  return data_lib.length_buckets(arrays["input_ids"].shape[1], cfg.length_bucket)


def held_out_batches(cfg: LMConfig, arrays: dict) -> list[dict]:
  """The held-out rows as LM batches of ``--eval_batch_size``, in order of length,
  each cut to its length bucket."""
  return list(map(_lm_batch, data_lib.eval_batches(arrays, cfg.eval_batch_size,
                                                   buckets(cfg, arrays))))


def evaluate_held_out(eval_fn, params, batches: list[dict]) -> dict[str, float]:
  """Held-out next-token ``loss``, ``perplexity`` and ``token_accuracy`` over the target
  tokens of ``batches`` (:func:`held_out_batches`), and their number, ``tokens``."""
  totals = loop.evaluation_totals(eval_fn, params, batches)
  loss = totals["loss_sum"] / max(totals["count"], 1.0)
  return {"loss": loss, "perplexity": float(np.exp(loss)),
          "token_accuracy": totals["correct"] / max(totals["count"], 1.0),
          "tokens": int(totals["count"])}



def answer(model, params, tokenizer, prompts: list[dict], cfg: LMConfig,
           batch_size: int = 8) -> list[dict]:
  """Generated responses (decoded up to EOS) to Alpaca-formatted prompts."""
  out = []
  rng = jax.random.key(cfg.seed)
  for start in range(0, len(prompts), batch_size):
    chunk = prompts[start:start + batch_size]
    texts = [lm_data.alpaca_prompt(p, f"prompt {start + i}") for i, p in enumerate(chunk)]
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
    "eval_every", "remat", "attention", "generate", "max_new_tokens", "temperature", "top_k",
    "top_p", "export"})


@dataclasses.dataclass
class LMRecord(run_lib.Record):
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


def _start(cfg: LMConfig, state, held, held_out) -> tuple[steps.TrainState, LMRecord]:
  """The initial state and a new record holding the held-out loss before training."""
  before = held_out(state.params) if held else None
  if before:
    logging.info("Held-out before training: loss %.4f, perplexity %.2f.", before["loss"],
                 before["perplexity"])
  return state, LMRecord(held_out_before=before, config=cfg.to_dict())


def train(cfg: LMConfig, state, record: LMRecord, arrays: dict, tx, schedule, ckpt,
          logger: StepLogger, model, held_out=None, programs=()):
  """Trains from ``record.step`` to the end on :func:`loop.train_loop`, checkpointing
  every ``checkpoint_every`` and, with ``held_out(params) -> dict``, evaluating every
  ``eval_every`` steps; a last checkpoint at the end. ``programs`` (``(jitted, args)``)
  compile in the train step's round, before the first step."""
  total = data_lib.num_batches(data_lib.size(arrays), cfg.batch_size) * cfg.epochs
  train_fn = jax.jit(functools.partial(steps.lm_train_step, model=model, tx=tx,
                                       dropout_rng_impl=cfg.dropout_rng_impl),
                     donate_argnums=0)
  logger.start_task(0, cfg.data_format, total,
                    lambda s: schedule(min(s, total) // cfg.grad_accum_steps))
  clock = loop.Stopwatch()

  def advance(step: int) -> int:
    record.step = step
    return step

  def evaluate(state) -> None:
    point = {"global_step": record.step, **held_out(state.params)}
    record.curve.append(point)
    logger.writers.write(point, record.step, "held_out")
    logging.info("step %d: held-out loss %.4f, perplexity %.2f", record.step, point["loss"],
                 point["perplexity"])

  def save(state) -> None:
    record.train_seconds += clock.lap()
    checkpoint.save_finite(ckpt, record.step, state, record.to_json())

  def batches(start: int):
    return map(_lm_batch, loop.epoch_batches(arrays, cfg.batch_size, epochs=cfg.epochs,
                                             seed=(cfg.seed,), start=start,
                                             buckets=buckets(cfg, arrays)))

  state = loop.train_loop(
      train_fn, state, batches, start=record.step, total=total, logger=logger,
      advance=advance, periodic=(loop.Periodic(cfg.eval_every if held_out else 0, evaluate),
                                 loop.Periodic(cfg.checkpoint_every, save)),
      stop_after=cfg.stop_after_steps, programs=programs)
  save(state)
  return state


def run(cfg: LMConfig, workdir: str, *, resume: bool = False, flags: dict | None = None
        ) -> dict:
  """Trains the LM, evaluates held-out loss and perplexity, generates on request,
  exports ``workdir/hf_model``; returns the results dict (also ``results.json``)."""
  t_start = time.time()
  commit = data_lib.provenance.git_commit(__file__)   # the code this run starts with
  ckpt = run_lib.open_run(workdir, cfg.to_dict(), resume, keep=cfg.keep_checkpoints,
                          outputs=OUTPUTS, resumable=RESUMABLE_CHANGES)
  run_lib.use_compilation_cache(None)
  tokenizer = hf.load_tokenizer(cfg.tokenizer or cfg.model)
  model, params = build_lm(cfg, tokenizer)
  arrays, held, text_keys = load_splits(cfg, tokenizer)
  _check_lengths(model, arrays)
  logging.info("Training on %d %s of %d tokens (%d target tokens); %s held-out.",
               data_lib.size(arrays), "examples" if cfg.data_format == "alpaca" else "blocks",
               arrays["input_ids"].shape[1], int(arrays["loss_mask"][:, 1:].sum()),
               data_lib.size(held) if held else "no")
  tx, schedule = optim.make_optimizer(
      learning_rate=cfg.learning_rate, warmup_steps=cfg.warmup_steps,
      total_steps=loop.update_count(data_lib.num_batches(data_lib.size(arrays), cfg.batch_size),
                                    cfg.epochs, cfg.grad_accum_steps),
      weight_decay=cfg.weight_decay, max_grad_norm=cfg.max_grad_norm,
      grad_accum_steps=cfg.grad_accum_steps)
  eval_fn = jax.jit(functools.partial(steps.lm_eval_step, model=model))
  held_batches = held_out_batches(cfg, held) if held else []
  held_out = held and functools.partial(evaluate_held_out, eval_fn, batches=held_batches)
  state = steps.init_train_state(params, tx, jax.random.key(cfg.seed))
  state, record = run_lib.restore_or_start(
      ckpt, resume, target=jax.eval_shape(lambda: state), record_cls=LMRecord,
      start=functools.partial(_start, cfg, state, held, held_out))
  logger = run_lib.open_logger(workdir, record.step, cfg.log_every, ckpt, unit="tokens")
  programs = [(eval_fn, (state.params, b)) for b in data_lib.one_batch_per_shape(held_batches)]
  try:
    state = train(cfg, state, record, arrays, tx, schedule, ckpt, logger, model, held_out,
                  programs + [(checkpoint.all_finite, (state,))])
  finally:
    logger.close()
    ckpt.close()
  return finish(cfg, workdir, model, state.params, tokenizer, record, held_out,
                logger.divergence(), flags, time.time() - t_start, checkpoint.timing(ckpt),
                text_keys, commit)


def export(cfg: LMConfig, workdir: str, model, params, tokenizer,
           text_keys: frozenset[str], commit: str | None = None) -> None:
  """``workdir/hf_model``: the weights, the tokenizer and ``pretraining_texts.json``
  (the keys of every text trained on, this run's and its base's)."""
  out = os.path.join(workdir, "hf_model")
  hf.save_pretrained(params, model.config, out, head="lm")
  tokenizer.save_pretrained(out)
  base = data_lib.read_keys(cfg.model) if cfg.init == "pretrained" else frozenset()
  n = data_lib.write_keys(
      out, text_keys | base, data=cfg.data, data_fraction=list(cfg.data_fraction),
      max_examples=cfg.max_examples, seed=cfg.seed, data_format=cfg.data_format,
      base_model=cfg.model if cfg.init == "pretrained" else f"random:{cfg.size}",
      base_texts=len(base), commit=commit)
  logging.info("Wrote %s: the keys of the %d texts the model was trained on.",
               os.path.join(out, data_lib.provenance.FILE), n)


def finish(cfg: LMConfig, workdir: str, model, params, tokenizer, record: LMRecord, held_out,
           diverged: str | None, flags: dict | None, wall_s: float,
           checkpoint_timing: dict | None = None,
           text_keys: frozenset[str] = frozenset(), commit: str | None = None) -> dict:
  """Held-out evaluation, generations and export after training; ``results.json``."""
  after = held_out(params) if held_out else None
  if after:
    logging.info("Held-out after training: loss %.4f, perplexity %.2f.", after["loss"],
                 after["perplexity"])
  if diverged:
    logging.warning("%s", diverged)
  if cfg.generate:
    rows = answer(model, params, tokenizer, lm_data.read_prompts(cfg.generate), cfg)
    with open(os.path.join(workdir, "generations.jsonl"), "w") as f:
      f.writelines(json.dumps(r) + "\n" for r in rows)
    logging.info("Wrote %d generations to %s.", len(rows),
                 os.path.join(workdir, "generations.jsonl"))
  if cfg.export:
    export(cfg, workdir, model, params, tokenizer, text_keys, commit)
  results = {"data_format": cfg.data_format, "steps": record.step,
             "held_out_before": record.held_out_before, "held_out_after": after,
             "held_out_curve": record.curve,
             "warnings": [diverged] if diverged else [],
             "flags": flags if flags is not None else cfg.to_dict(),
             "timing": {"train_seconds": record.train_seconds,
                        "wall_seconds_this_process": wall_s, **(checkpoint_timing or {})},
             "model": {"n_layer": model.config.n_layer, "n_embd": model.config.n_embd,
                       "vocab_size": model.config.vocab_size}}
  with open(os.path.join(workdir, "results.json"), "w") as f:
    json.dump(results, f, indent=2)
  return results
