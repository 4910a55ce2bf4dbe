# Examples per second of the jitted train and eval steps (and PyTorch's).
# The code, flags and usage live in cljax/cli/benchmark.py (console script: cljax-benchmark);
# --help prints that module's documentation.

from cljax.cli import benchmark

if __name__ == "__main__":
  benchmark.run()
