r"""The sequential IMDb -> AG News forgetting study.

  cljax-forgetting --workdir=runs/seed --flagfile=experiments/presets/seed.flags
  (or: python experiments/forgetting.py ...)

Trains on each task in turn, evaluates every task before training and after each
task, and writes DIR/results.json (accuracy matrices, metrics), metrics.jsonl,
figures, TensorBoard scalars and orbax checkpoints (--resume continues a run).

Flags and code: cljax/cli/forgetting.py (console script: cljax-forgetting).
"""

from cljax.cli import forgetting

if __name__ == "__main__":
  forgetting.run()
