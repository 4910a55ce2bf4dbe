r"""Examples per second of the jitted train and eval steps (and PyTorch's).

  cljax-benchmark --size=gpt2 --batch_size=8 --seq_len=128 \
      --compare_torch
  cljax-benchmark --size=gpt2 --batch_size=8 --seq_len=64 --generate_tokens=128 \
      --compare_torch     # generation tokens/s
  cljax-benchmark --size=tiny --loop_overhead --steps=300   # the loop against a bare one
  cljax-benchmark --size=gpt2 --compile_overhead   # compile against a minimal GPT-2
  cljax-benchmark --size=gpt2 --checkpoint_overhead  # a boundary checkpoint's blocking
  cljax-benchmark --arch=llama --size=smollm2-135m --compare_torch  # any family's step

Prints one JSON line: JAX train/eval examples/s, with --compare_torch the
transformers PyTorch model's figures measured in the same run and their ratios,
and on a GPU/TPU the model-FLOPs utilization.
"""

import json

import sys

from absl import app
from absl import flags

from cljax import cli
from cljax.bench import overhead as bench_overhead
from cljax.bench import throughput as bench
from cljax.models import families

_ARCH = flags.DEFINE_enum("arch", "gpt2", list(families.SUPPORTED), "Family of the "
                          "train/eval step benchmark (config.json's model_type; random init).")
_SIZE = flags.DEFINE_string("size", "gpt2", "Model size: gpt2 (small), gpt2-medium, "
                            "gpt2-large, gpt2-xl, mini or tiny for --arch=gpt2; another "
                            "family's: tiny, mini or a real shape such as llama-3.2-1b. "
                            "Random init.")
_BATCH = flags.DEFINE_integer("batch_size", 8, "Examples per step (global).")
_SEQ = flags.DEFINE_integer("seq_len", 128, "Tokens per example.")
_STEPS = flags.DEFINE_integer("steps", 10, "Timed steps (after warmup).")
_WARMUP = flags.DEFINE_integer("warmup", 2, "Untimed steps before timing (the first "
                               "compiles).")
_DTYPE = flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"],
                           "Compute dtype; params and optimizer state stay float32.")
_REMAT = flags.DEFINE_bool("remat", False, "Rematerialize each block in the backward pass.")
_SCAN = flags.DEFINE_bool("scan_layers", False, "The blocks under nn.scan, their params "
                          "stacked (one block's compile whatever the depth).")
_ATTENTION = flags.DEFINE_enum("attention", "xla", ["xla", "cudnn"], "The fused attention "
                               "kernel where attention has no dropout (cudnn: NVIDIA GPUs, "
                               "--dtype=bfloat16).")
_ATTN_PDROP = flags.DEFINE_float("attn_pdrop", None, "Attention dropout (default GPT-2's "
                                 "0.1; 0 lets training use the fused kernel).")
_TORCH = flags.DEFINE_bool("compare_torch", False, "Also time transformers' PyTorch "
                           "GPT2ForSequenceClassification with the same config and "
                           "optimizer, in this run.")
_MESH_DATA = flags.DEFINE_integer("mesh_data", -1, "Devices on the data axis (-1: all).")
_MESH_MODEL = flags.DEFINE_integer("mesh_model", 1, "Devices sharding params and optimizer "
                                   "state.")
_FISHER = flags.DEFINE_integer("fisher_samples", 0, "If > 0: instead, time EWC's "
                               "per-example Fisher over this many examples.")
_FISHER_CHUNK = flags.DEFINE_integer("fisher_chunk", 8, "Examples per vmapped chunk.")
_GENERATE = flags.DEFINE_integer("generate_tokens", 0, "If > 0: instead, time greedy "
                                 "generation of this many new tokens after --seq_len-token "
                                 "prompts (with --compare_torch: against transformers' "
                                 "generate, same weights and prompts).")
_REPEATS = flags.DEFINE_integer("repeats", 2, "Timed generation calls (after the first).")
_PROFILE = flags.DEFINE_bool("profile_step", False, "Instead, where a train step's time "
                             "goes: its parts timed alone, and the step at shorter lengths.")
_LOOP = flags.DEFINE_bool("loop_overhead", False, "Instead, steps/s of the study's loop "
                          "against a bare loop of the same jitted step (--steps steps).")
_COMPILE = flags.DEFINE_bool("compile_overhead", False, "Instead, the seconds to compile "
                             "the train program against a minimal Flax GPT-2 + AdamW step "
                             "of the same shapes, in float32 and bfloat16.")
_COMPILE_DTYPES = flags.DEFINE_list("compile_dtypes", ["float32", "bfloat16"],
                                    "--compile_overhead: the compute dtypes to time.")
_COMPILE_REPEATS = flags.DEFINE_integer("compile_repeats", 2, "--compile_overhead: "
                                        "compiles of each program (the best is kept).")
_CKPT = flags.DEFINE_bool("checkpoint_overhead", False, "Instead, how long a task-boundary "
                          "checkpoint blocks training against the time its write takes "
                          "(--steps train steps run while it is written).")
_CKPT_DIR = flags.DEFINE_string("checkpoint_dir", None, "--checkpoint_overhead: where to "
                                "write (default: a temporary folder).")
_OUT = flags.DEFINE_string("output", None, "Also append the JSON line to this file.")


def main(argv):
  del argv
  modes = {"--loop_overhead": _LOOP.value, "--compile_overhead": _COMPILE.value,
           "--checkpoint_overhead": _CKPT.value, "--profile_step": _PROFILE.value,
           "--fisher_samples": _FISHER.value, "--generate_tokens": _GENERATE.value}
  if _ARCH.value != "gpt2" and any(modes.values()):
    raise app.UsageError(f"{', '.join(k for k, v in modes.items() if v)} times GPT-2 "
                         f"only; --arch={_ARCH.value} times the train and eval steps "
                         "(drop the flag).")
  if _LOOP.value:
    result = bench_overhead.loop_overhead(_SIZE.value, _BATCH.value, _SEQ.value, _STEPS.value)
  elif _COMPILE.value:
    result = bench_overhead.compile_overhead(_SIZE.value, _BATCH.value, _SEQ.value,
                                             tuple(_COMPILE_DTYPES.value),
                                             _COMPILE_REPEATS.value)
  elif _CKPT.value:
    result = bench_overhead.checkpoint_overhead(_SIZE.value, _BATCH.value, _SEQ.value,
                                                _STEPS.value, directory=_CKPT_DIR.value)
  elif _PROFILE.value:
    result = bench.step_profile(_SIZE.value, _BATCH.value, _SEQ.value, _STEPS.value,
                                _WARMUP.value)
  elif _FISHER.value:
    result = bench.bench_fisher(_SIZE.value, _SEQ.value, _FISHER.value, _FISHER_CHUNK.value)
  elif _GENERATE.value:
    result = bench.bench_generate(_SIZE.value, _BATCH.value, _SEQ.value, _GENERATE.value,
                                  repeats=_REPEATS.value, compare_torch=_TORCH.value)
  else:
    result = bench.run(_SIZE.value, _BATCH.value, _SEQ.value, _STEPS.value, _WARMUP.value,
                       dtype=_DTYPE.value, remat=_REMAT.value, scan_layers=_SCAN.value,
                       attention=_ATTENTION.value,
                       attn_pdrop=_ATTN_PDROP.value,
                       compare_torch=_TORCH.value, mesh_data=_MESH_DATA.value,
                       mesh_model=_MESH_MODEL.value, arch=_ARCH.value)
  line = json.dumps(result)
  print(line)
  if _OUT.value:
    with open(_OUT.value, "a") as f:
      f.write(line + "\n")


def run():
  cli.run_main(main, sys.modules[__name__])
