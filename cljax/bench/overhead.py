"""What runs around the steps, measured against a baseline in the same process:

- :func:`loop_overhead`: the study's loop (:func:`loop.train_loop`: the step logger,
  the step records, the callbacks, the next batch put on the devices while the step
  runs) against a bare Python loop of the same jitted step over the same batches,
  already on the devices.
- :func:`compile_overhead`: the compile time of cljax's train program against a
  minimal Flax GPT-2 (:mod:`cljax.models.minimal`) with an optax AdamW step of the
  same shapes, with the persistent cache off.
- :func:`checkpoint_overhead`: how long a task-boundary checkpoint blocks training,
  against the time its write takes.

Quote ratios: the machines these run on are shared and noisy.
"""

from __future__ import annotations

import functools
import os
import shutil
import tempfile
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from cljax.bench.throughput import random_batch
from cljax.models import GPT2Classifier, GPT2Config, init_params
from cljax.models.minimal import MinimalGPT2Classifier
from cljax.train import checkpoint
from cljax.train import loop
from cljax.train import optim
from cljax.train import sharding
from cljax.train import steps
from cljax.train.progress import StepLogger, Writers


def _setup(size: str, batch_size: int, seq_len: int, dtype: str = "float32"):
  config = GPT2Config.from_size(size, num_labels=4, dtype=dtype)
  model = GPT2Classifier(config)
  tx, _ = optim.make_optimizer(total_steps=10_000)
  step = jax.jit(functools.partial(steps.train_step, model=model, tx=tx), donate_argnums=0)
  params = jax.jit(functools.partial(init_params, model))(jax.random.PRNGKey(0))
  return config, model, tx, step, params


def loop_overhead(size: str = "tiny", batch_size: int = 8, seq_len: int = 128,
                  steps_: int = 300, repeats: int = 3) -> dict[str, Any]:
  """Steps per second of the bare loop and of :func:`loop.train_loop`, over
  device-resident batches and over host batches (put on the devices as the study
  does); the best of ``repeats`` alternating runs of each."""
  config, _, tx, step, params = _setup(size, batch_size, seq_len)
  mesh = sharding.make_mesh(-1, 1)
  host = [random_batch(config, batch_size, seq_len, seed=i) for i in range(steps_)]
  device = [sharding.shard_batch(b, mesh) for b in host]
  fresh = lambda: steps.init_train_state(jax.tree.map(jnp.copy, params), tx,
                                         jax.random.PRNGKey(1))
  state, _ = step(fresh(), device[0])   # compiled here, outside the timings
  jax.block_until_ready(state)

  def bare() -> float:
    state, t0 = fresh(), time.perf_counter()
    for b in device:
      state, _ = step(state, b)
    jax.block_until_ready(state)
    return time.perf_counter() - t0

  def looped(batches, put) -> float:
    state = fresh()
    logger = StepLogger(Writers("", enabled=False), 50, lambda: None)
    logger.start_task(0, "bench", steps_, lambda s: 0.0)
    t0 = time.perf_counter()
    state = loop.train_loop(step, state, lambda start: batches[start:], start=0,
                            total=steps_, logger=logger, advance=lambda s: s,
                            periodic=(loop.Periodic(0, lambda s: None),), put=put)
    jax.block_until_ready(state)
    return time.perf_counter() - t0

  times = {"bare": [], "loop_device_batches": [], "loop_host_batches": []}
  for _ in range(repeats):
    times["bare"].append(bare())
    times["loop_device_batches"].append(looped(device, lambda b: b))
    times["loop_host_batches"].append(looped(
        host, functools.partial(sharding.shard_batch, mesh=mesh)))
  best = {k: min(v) for k, v in times.items()}
  return {"size": size, "batch_size": batch_size, "seq_len": seq_len, "steps": steps_,
          "backend": jax.default_backend(),
          **{f"{k}_steps_per_s": steps_ / v for k, v in best.items()},
          "loop_over_bare_device_batches": best["bare"] / best["loop_device_batches"],
          "loop_over_bare_host_batches": best["bare"] / best["loop_host_batches"]}


def _minimal_step(config: GPT2Config, dtype):
  """The minimal model's jitted step (CE at the last token, training dropout, the
  Trainer's clipping and AdamW) and its init."""
  model = MinimalGPT2Classifier(config.vocab_size, config.n_positions, config.n_embd,
                                config.n_layer, config.n_head, config.num_labels, dtype)
  tx = optax.chain(optax.clip_by_global_norm(1.0),
                   optax.adamw(optax.linear_schedule(5e-5, 0.0, 10_000), weight_decay=0.0))

  def step(state, batch):
    params, opt_state, rng = state

    def loss(p):
      logits = model.apply({"params": p}, batch["input_ids"], batch["attention_mask"],
                           train=True, rngs={"dropout": jax.random.fold_in(rng, 0)})
      return optax.softmax_cross_entropy_with_integer_labels(logits, batch["labels"]).mean()

    value, grads = jax.value_and_grad(loss)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return (optax.apply_updates(params, updates), opt_state, jax.random.fold_in(rng, 1)), value

  def init(batch):
    params = model.init(jax.random.PRNGKey(0), batch["input_ids"],
                        batch["attention_mask"])["params"]
    return params, tx.init(params), jax.random.PRNGKey(1)
  return jax.jit(step, donate_argnums=0), init


def _compile_seconds(jitted, *args) -> float:
  t0 = time.perf_counter()
  jitted.lower(*args).compile()
  return time.perf_counter() - t0


def compile_overhead(size: str = "gpt2", batch_size: int = 8, seq_len: int = 128,
                     dtypes=("float32", "bfloat16"), repeats: int = 2) -> dict[str, Any]:
  """Seconds to compile cljax's train program and the minimal one, side by side in
  this process with the persistent cache off (the best of ``repeats``, alternating),
  per compute dtype."""
  jax.config.update("jax_enable_compilation_cache", False)
  out = {"size": size, "batch_size": batch_size, "seq_len": seq_len,
         "backend": jax.default_backend()}
  for dtype in dtypes:
    config, _, tx, step, params = _setup(size, batch_size, seq_len, dtype)
    batch = jax.tree.map(jnp.asarray, random_batch(config, batch_size, seq_len))
    state = jax.eval_shape(functools.partial(steps.init_train_state, params, tx),
                           jax.random.PRNGKey(1))
    minimal, init = _minimal_step(config, jnp.dtype(dtype))
    mstate = jax.eval_shape(init, batch)
    ours, theirs = [], []
    for _ in range(repeats):
      jax.clear_caches()
      ours.append(_compile_seconds(step, state, batch))
      theirs.append(_compile_seconds(minimal, mstate, batch))
    out[f"{dtype}_cljax_compile_s"] = min(ours)
    out[f"{dtype}_minimal_compile_s"] = min(theirs)
    out[f"{dtype}_ratio"] = min(ours) / min(theirs)
    out[f"{dtype}_spread"] = {"cljax": [float(np.round(t, 2)) for t in ours],
                              "minimal": [float(np.round(t, 2)) for t in theirs]}
  return out


def checkpoint_overhead(size: str = "gpt2", batch_size: int = 8, seq_len: int = 128,
                        steps_: int = 10, repeats: int = 2,
                        directory: str | None = None) -> dict[str, Any]:
  """A task-boundary checkpoint (params, RNG, step: what the next task needs) saved as
  the study saves it (:func:`checkpoint.save_finite`), timed three ways: written with
  nothing else running (``write_s``: save and wait); saved, then ``steps_`` train steps
  while it is written (``blocked_s``: the time the save call held the loop;
  ``steps_during_write_s``); and the same steps with no write (``steps_s``). The best
  of ``repeats`` of each. ``directory``: where to write (default: a temporary folder)."""
  config, _, tx, step, params = _setup(size, batch_size, seq_len)
  mesh = sharding.make_mesh(-1, 1)
  batches = [sharding.shard_batch(random_batch(config, batch_size, seq_len, seed=i), mesh)
             for i in range(steps_)]
  train = steps.init_train_state(jax.tree.map(jnp.copy, params), tx, jax.random.PRNGKey(1))
  boundary = steps.init_train_state(params, None, jax.random.PRNGKey(2))   # no optimizer
  train, _ = step(train, batches[0])   # compiled here, outside the timings
  jax.block_until_ready((train, checkpoint.all_finite(boundary)))
  root = tempfile.mkdtemp(dir=directory)

  def run_steps(state):
    for b in batches:
      state, _ = step(state, b)
    return jax.block_until_ready(state)

  times: dict[str, list[float]] = {k: [] for k in ("write_s", "blocked_s",
                                                   "steps_during_write_s", "steps_s")}
  try:
    for r in range(repeats):
      ckpt = checkpoint.Checkpointer(os.path.join(root, str(r)), max_to_keep=1)
      t0 = time.perf_counter()
      checkpoint.save_finite(ckpt, 1, boundary, {})
      ckpt.wait()
      times["write_s"].append(time.perf_counter() - t0)
      t0 = time.perf_counter()
      checkpoint.save_finite(ckpt, 2, boundary, {})
      times["blocked_s"].append(time.perf_counter() - t0)
      train = run_steps(train)
      times["steps_during_write_s"].append(time.perf_counter() - t0)
      ckpt.close()
      t0 = time.perf_counter()
      train = run_steps(train)
      times["steps_s"].append(time.perf_counter() - t0)
  finally:
    shutil.rmtree(root, ignore_errors=True)
  best = {k: min(v) for k, v in times.items()}
  return {"size": size, "batch_size": batch_size, "seq_len": seq_len, "steps": steps_,
          "backend": jax.default_backend(),
          "checkpoint_bytes": int(sum(x.nbytes for x in jax.tree.leaves(boundary))),
          **best, "blocked_over_write": best["blocked_s"] / best["write_s"],
          "steps_slowdown_during_write": best["steps_during_write_s"] / best["steps_s"],
          "spread": {k: [float(np.round(t, 3)) for t in v] for k, v in times.items()}}
