r"""Examples per second of the jitted train and eval steps (and PyTorch's).

  cljax-benchmark --size=gpt2 --batch_size=8 --seq_len=128 \
      --compare_torch

Prints one JSON line: JAX train/eval examples/s, with --compare_torch the
transformers PyTorch model's figures measured in the same run and their ratios,
and on a GPU/TPU the model-FLOPs utilization.

Flags and code: cljax/cli/benchmark.py (console script: cljax-benchmark).
"""

from cljax.cli import benchmark

if __name__ == "__main__":
  benchmark.run()
