# The whole study timed end to end in cljax and in plain PyTorch.
# The code, flags and usage live in cljax/cli/study_vs_torch.py (console script:
# cljax-study-vs-torch); --help prints that module's documentation.

from cljax.cli import study_vs_torch

if __name__ == "__main__":
  study_vs_torch.run()
