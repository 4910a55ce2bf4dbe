"""Throughput of the jitted train and eval steps (and of the same step in PyTorch), where
a step's time goes, the per-example Fisher diagonal, and generation against transformers'.
The whole-study baselines (a PyTorch loop, the Trainer script) are in ``baselines.py``.
"""

from __future__ import annotations

import functools
import os
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from cljax.models import GPT2Classifier, GPT2Config, families, init_params
from cljax.train import losses
from cljax.train import optim
from cljax.train import sharding
from cljax.train import steps

# Dense bf16 peak FLOP/s per chip, for model-FLOPs utilization.
PEAK_FLOPS = {
    "H100": 989e12, "H200": 989e12, "A100": 312e12, "L4": 121e12, "A10": 125e12,
    "TPU v4": 275e12, "TPU v5 lite": 197e12, "TPU v5e": 197e12, "TPU v5p": 459e12,
    "TPU v6 lite": 918e12, "TPU v6e": 918e12,
}


def peak_flops(device) -> float | None:
  kind = getattr(device, "device_kind", "")
  for name, flops in PEAK_FLOPS.items():
    if name.lower() in kind.lower():
      return flops
  return None


def train_flops_per_example(config: GPT2Config, seq_len: int) -> float:
  """Matmul FLOPs of forward + backward for one sequence (6N per token, N the blocks'
  projection weights, plus attention's 12 L T H d_head per token, as in the PaLM
  appendix); embeddings and the head excluded. Any family: N is counted from the
  block's kernels (GPT-2: ``4 D^2 + 2 D inner``; Llama: its grouped-query q/k/v/o and
  its three MLP matrices)."""
  plain = GPT2Classifier(config.replace(scan_layers=False))   # one subtree per block
  block = jax.eval_shape(functools.partial(init_params, plain),
                         jax.random.PRNGKey(0))[f"{config.LAYOUT.block}0"]
  n = config.n_layer * sum(int(np.prod(x.shape)) for p, x in
                           jax.tree_util.tree_flatten_with_path(block)[0]
                           if str(getattr(p[-1], "key", "")) == "kernel")
  attention = config.n_head * config.head_size
  return 6.0 * n * seq_len + 12.0 * config.n_layer * seq_len * seq_len * attention


def bench_config(arch: str, size: str, **fields):
  """The random-init config of a benchmark: GPT-2's ``size`` (``config.SIZES``) or
  another family's (``families.arch_sizes``), with ``fields``."""
  if arch == "gpt2":
    return GPT2Config.from_size(size, **fields)
  fields.setdefault("pad_token_id", 0)
  return families.random_config(arch, size, **fields)


def random_batch(config: GPT2Config, batch_size: int, seq_len: int, seed: int = 0):
  rs = np.random.default_rng(seed)
  ids = rs.integers(0, config.vocab_size - 1, (batch_size, seq_len)).astype(np.int32)
  return {
      "input_ids": ids,
      "attention_mask": np.ones_like(ids),
      "labels": rs.integers(0, config.num_labels, (batch_size,)).astype(np.int32),
      "weights": np.ones((batch_size,), np.float32),
      "class_mask": np.ones((batch_size, config.num_labels), bool),
      "task_ids": np.zeros((batch_size,), np.int32),
  }


def _time(fn, steps: int, warmup: int) -> float:
  for _ in range(warmup):
    fn()
  start = time.perf_counter()
  for _ in range(steps):
    fn()
  return (time.perf_counter() - start) / steps


def bench_jax(config: GPT2Config, batch_size: int, seq_len: int, steps_: int,
              warmup: int, mesh_data: int = -1, mesh_model: int = 1) -> dict[str, Any]:
  mesh = sharding.make_mesh(mesh_data, mesh_model)
  sharding.check_batch_size(batch_size, mesh)
  model = GPT2Classifier(config)
  params = jax.jit(functools.partial(init_params, model))(jax.random.PRNGKey(0))
  params = jax.device_put(params, sharding.param_shardings(mesh, params))
  tx, _ = optim.make_optimizer(total_steps=10_000)
  state = steps.init_train_state(params, tx, jax.random.PRNGKey(1))
  state_sh = sharding.state_shardings(mesh, state, params)
  state = jax.device_put(state, state_sh)
  batch = sharding.shard_batch(random_batch(config, batch_size, seq_len), mesh)
  train = jax.jit(functools.partial(steps.train_step, model=model, tx=tx),
                  in_shardings=(state_sh, sharding.batch_sharding(mesh)),
                  out_shardings=(state_sh, sharding.replicated(mesh)), donate_argnums=0)
  evaluate = jax.jit(functools.partial(steps.eval_step, model=model))
  box = [state]

  def train_once():
    box[0], m = train(box[0], batch)
    jax.block_until_ready(m)

  t0 = time.perf_counter()
  train_once()
  compile_s = time.perf_counter() - t0
  train_s = _time(train_once, steps_, max(warmup - 1, 0))
  eval_s = _time(lambda: jax.block_until_ready(evaluate(box[0].params, batch)), steps_, warmup)
  out = {"jax_train_examples_per_s": batch_size / train_s,
         "jax_eval_examples_per_s": batch_size / eval_s,
         "jax_train_compile_s": compile_s}
  peak = peak_flops(jax.devices()[0])
  flops = train_flops_per_example(config, seq_len) * batch_size
  out["jax_train_tflops_per_s"] = flops / train_s / 1e12
  if peak:
    out["mfu"] = flops / train_s / (peak * jax.device_count())
  return out


def bench_torch(config: GPT2Config, batch_size: int, seq_len: int, steps_: int,
                warmup: int, device: str | None = None) -> dict[str, Any]:
  """The same step in transformers' PyTorch ``*ForSequenceClassification`` of the
  config's family: AdamW, linear decay, clipping at 1.0, dropout on in training."""
  import torch  # pylint: disable=import-outside-toplevel
  import transformers  # pylint: disable=import-outside-toplevel
  from cljax.models import as_dtype  # pylint: disable=import-outside-toplevel
  device = device or ("cuda" if torch.cuda.is_available() else "cpu")
  if device == "cpu":
    torch.set_num_threads(os.cpu_count() or 1)
  if isinstance(config, GPT2Config):
    hf = transformers.GPT2Config(**{k: v for k, v in config.to_hf().items()
                                    if k not in ("architectures", "torch_dtype")})
  else:
    fields = families.hf_config(config, "score")
    hf = transformers.AutoConfig.for_model(fields.pop("model_type"), **fields)
  model = transformers.AutoModelForSequenceClassification.from_config(hf).to(device)
  opt = torch.optim.AdamW(model.parameters(), lr=5e-5, weight_decay=0.0)
  sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: max(0.0, 1 - s / 10_000))
  b = random_batch(config, batch_size, seq_len)
  ids = torch.tensor(b["input_ids"], dtype=torch.long, device=device)
  mask = torch.tensor(b["attention_mask"], device=device)
  labels = torch.tensor(b["labels"], dtype=torch.long, device=device)
  autocast = as_dtype(config.dtype) != jnp.float32
  sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)

  def train_once():
    model.train()
    with torch.autocast(device, dtype=torch.bfloat16, enabled=autocast):
      loss = model(ids, attention_mask=mask, labels=labels).loss
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    sched.step()
    opt.zero_grad(set_to_none=True)
    sync()

  def eval_once():
    model.eval()
    with torch.inference_mode(), torch.autocast(device, dtype=torch.bfloat16,
                                                 enabled=autocast):
      model(ids, attention_mask=mask).logits.float().cpu()
    sync()

  return {"torch_train_examples_per_s": batch_size / _time(train_once, steps_, warmup),
          "torch_eval_examples_per_s": batch_size / _time(eval_once, steps_, warmup),
          "torch_version": torch.__version__, "torch_threads": torch.get_num_threads()}


def run(size: str, batch_size: int, seq_len: int, steps_: int, warmup: int,
        dtype: str = "float32", remat: bool = False, compare_torch: bool = False,
        num_labels: int = 4, mesh_data: int = -1, mesh_model: int = 1,
        attention: str = "xla", attn_pdrop: float | None = None,
        arch: str = "gpt2", scan_layers: bool = False) -> dict[str, Any]:
  """Runs the JAX (and optionally PyTorch) benchmark; returns one flat dict.
  ``arch``: the family (``size`` one of its sizes); ``attention``: the fused kernel
  where attention has no dropout; ``attn_pdrop``: attention dropout (default the
  family's: GPT-2's 0.1, Llama's 0; 0 lets training use the fused kernel)."""
  config = bench_config(arch, size, num_labels=num_labels, dtype=dtype, remat=remat,
                        attention=attention, scan_layers=scan_layers,
                        **({} if attn_pdrop is None else {"attn_pdrop": attn_pdrop}))
  if seq_len > config.n_positions:
    raise ValueError(f"seq_len {seq_len} exceeds n_positions {config.n_positions}.")
  out = {"arch": arch, "size": size, "batch_size": batch_size, "seq_len": seq_len, "dtype": dtype,
         "attention": attention, "attn_pdrop": config.attn_pdrop, "remat": remat,
         "scan_layers": scan_layers,
         "steps": steps_, "backend": jax.default_backend(),
         "device": jax.devices()[0].device_kind, "device_count": jax.device_count(),
         "jax_version": jax.__version__}
  out.update(bench_jax(config, batch_size, seq_len, steps_, warmup, mesh_data, mesh_model))
  out["mesh"] = {"data": mesh_data, "model": mesh_model}
  if compare_torch:
    out.update(bench_torch(config, batch_size, seq_len, steps_, warmup))
    out["train_speedup"] = out["jax_train_examples_per_s"] / out["torch_train_examples_per_s"]
    out["eval_speedup"] = out["jax_eval_examples_per_s"] / out["torch_eval_examples_per_s"]
  return out


def step_profile(size: str, batch_size: int, seq_len: int, steps_: int, warmup: int,
                 buckets: tuple[int, ...] = (32, 64, 96)) -> dict[str, Any]:
  """Where a train step's time goes: seconds per step of its parts, each jitted alone
  (forward; forward and backward without dropout, with and without the gradient of
  the embedding table; the optimizer update alone; the whole step with dropout), then
  the whole step at shorter (bucket) lengths, and each program's compile time."""
  config = GPT2Config.from_size(size, num_labels=4)
  model = GPT2Classifier(config)
  params = jax.jit(functools.partial(init_params, model))(jax.random.PRNGKey(0))
  tx, _ = optim.make_optimizer(total_steps=10_000)
  state = steps.init_train_state(params, tx, jax.random.PRNGKey(1))
  batch = random_batch(config, batch_size, seq_len)

  def loss(p, b, wte=None):
    p = p if wte is None else dict(p, wte=wte)
    return losses.classification_objective(steps.forward(model, p, b, deterministic=True), b)[0]

  rest = {k: v for k, v in params.items() if k != "wte"}
  grads = jax.tree.map(jnp.zeros_like, params)
  parts = {
      "forward": (functools.partial(steps.eval_step, model=model), (params, batch)),
      "forward_backward": (jax.grad(loss), (params, batch)),
      "forward_backward_without_embedding_grad": (
          lambda r, b, w: jax.grad(loss)(r, b, w), (rest, batch, params["wte"])),
      "optimizer_update": (lambda g, o, p: tx.update(g, o, p), (grads, state.opt_state, params)),
      "train_step": (functools.partial(steps.train_step, model=model, tx=tx), (state, batch)),
  }
  for length in buckets:
    parts[f"train_step_at_{length}"] = (functools.partial(steps.train_step, model=model, tx=tx),
                                        (state, random_batch(config, batch_size, length)))
  out = {"size": size, "batch_size": batch_size, "seq_len": seq_len, "steps": steps_,
         "device": jax.devices()[0].device_kind, "parameters": sum(
             x.size for x in jax.tree.leaves(params)), "embedding_rows": config.vocab_size}
  for name, (fn, args) in parts.items():
    donate = name.startswith("train_step")   # as in a training loop: the state threads
    t0 = time.perf_counter()
    compiled = jax.jit(fn, donate_argnums=0 if donate else ()).lower(*args).compile()
    out[f"{name}_compile_s"] = time.perf_counter() - t0
    box = [jax.tree.map(jnp.copy, args[0]) if donate else args[0]]

    def once(c=compiled, a=args[1:], donate=donate, box=box):
      result = c(box[0], *a)
      if donate:
        box[0] = result[0]
      jax.block_until_ready(result)

    out[f"{name}_s"] = _time(once, steps_, warmup)
  return out


def _peak_memory_bytes() -> dict[str, float]:
  """Peak device memory (accelerators) and the process's peak resident set (host)."""
  import resource  # pylint: disable=import-outside-toplevel
  out = {"host_peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20}
  stats = jax.devices()[0].memory_stats() or {}
  if "peak_bytes_in_use" in stats:
    out["device_peak_gb"] = stats["peak_bytes_in_use"] / 2 ** 30
  return out


def bench_fisher(size: str, seq_len: int, num_samples: int, chunk: int,
                 num_labels: int = 4) -> dict[str, Any]:
  """Examples/s and peak memory of the per-example diagonal Fisher (EWC)."""
  from cljax.methods import per_example  # pylint: disable=import-outside-toplevel
  config = GPT2Config.from_size(size, num_labels=num_labels)
  model = GPT2Classifier(config)
  params = jax.jit(functools.partial(init_params, model))(jax.random.PRNGKey(0))
  before = _peak_memory_bytes()
  arrays = random_batch(config, num_samples, seq_len)
  warm = {k: v[:chunk] for k, v in arrays.items()}
  t0 = time.perf_counter()
  jax.block_until_ready(per_example.fisher_diagonal(model, params, warm, num_samples=chunk,
                                                     chunk=chunk))
  compile_s = time.perf_counter() - t0
  t0 = time.perf_counter()
  jax.block_until_ready(per_example.fisher_diagonal(model, params, arrays,
                                                     num_samples=num_samples, chunk=chunk))
  dt = time.perf_counter() - t0
  return {"size": size, "seq_len": seq_len, "fisher_samples": num_samples,
          "fisher_chunk": chunk, "fisher_examples_per_s": num_samples / dt,
          "fisher_compile_s": compile_s, "memory_before": before,
          "memory_after": _peak_memory_bytes(), "device": jax.devices()[0].device_kind}


def bench_generate(size: str, batch_size: int, prompt_len: int, new_tokens: int, *,
                   repeats: int = 2, compare_torch: bool = True) -> dict[str, Any]:
  """Greedy generation tokens/s: ``cljax.generate`` (compiled, KV cache) against
  transformers' ``GPT2LMHeadModel.generate`` (its KV cache) with the same random-init
  weights and prompts, in this run; both outputs are compared token for token."""
  from cljax.models import GPT2LM  # pylint: disable=import-outside-toplevel
  from cljax.models import generation, hf  # pylint: disable=import-outside-toplevel
  config = GPT2Config.from_size(size)
  if prompt_len + new_tokens > config.n_positions:
    raise ValueError(f"prompt_len + new_tokens exceeds n_positions {config.n_positions}.")
  model = GPT2LM(config)
  params = jax.jit(functools.partial(init_params, model))(jax.random.PRNGKey(0))
  ids = np.random.default_rng(0).integers(0, config.vocab_size - 1, (batch_size, prompt_len),
                                          dtype=np.int32)
  mask = np.ones_like(ids)

  def jax_once():
    return np.asarray(generation.generate(model, params, ids, mask,
                                          max_new_tokens=new_tokens))

  t0 = time.perf_counter()
  ours = jax_once()
  out = {"size": size, "batch_size": batch_size, "prompt_len": prompt_len,
         "new_tokens": new_tokens, "backend": jax.default_backend(),
         "device": jax.devices()[0].device_kind,
         "jax_generate_first_call_s": time.perf_counter() - t0}
  jax_s = _time(jax_once, repeats, 0)
  out["jax_generate_tokens_per_s"] = batch_size * new_tokens / jax_s
  if not compare_torch:
    return out
  import tempfile  # pylint: disable=import-outside-toplevel
  import torch  # pylint: disable=import-outside-toplevel
  import transformers  # pylint: disable=import-outside-toplevel
  device = "cuda" if torch.cuda.is_available() else "cpu"
  if device == "cpu":
    torch.set_num_threads(os.cpu_count() or 1)
  with tempfile.TemporaryDirectory() as folder:
    hf.save_pretrained(params, config, folder, head="lm")
    ref_model = transformers.GPT2LMHeadModel.from_pretrained(folder).to(device).eval()
  sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
  t_ids = torch.tensor(ids, dtype=torch.long, device=device)
  t_mask = torch.tensor(mask, device=device)
  box = {}

  def torch_once():
    with torch.inference_mode():
      box["out"] = ref_model.generate(input_ids=t_ids, attention_mask=t_mask,
                                      do_sample=False, max_new_tokens=new_tokens,
                                      pad_token_id=config.eos_token_id)
    sync()

  torch_s = _time(torch_once, repeats, 1)
  theirs = box["out"][:, prompt_len:].cpu().numpy()
  out.update({
      "torch_generate_tokens_per_s": batch_size * new_tokens / torch_s,
      "torch_version": torch.__version__, "torch_threads": torch.get_num_threads(),
      "same_tokens": bool(theirs.shape == ours.shape and (theirs == ours).all()),
      "tokens_agreeing": float((theirs == ours[:, :theirs.shape[1]]).mean())})
  out["generate_speedup"] = out["jax_generate_tokens_per_s"] / out["torch_generate_tokens_per_s"]
  return out
