r"""The whole study timed end to end in cljax and in plain PyTorch (transformers'
GPT2ForSequenceClassification), same data, same size, same recipe, same device.

  cljax-study-vs-torch --flagfile=experiments/presets/smoke.flags \
      --workdir=/tmp/vs_torch

Prints one JSON line with both wall times (data loading, compilation, training and
every evaluation included) and their ratio.

Flags and code: cljax/cli/study_vs_torch.py (console script: cljax-study-vs-torch).
"""

from cljax.cli import study_vs_torch

if __name__ == "__main__":
  study_vs_torch.run()
