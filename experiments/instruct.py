# Language-model training: Alpaca-style instruction tuning, or plain-text pretraining.
# The code, flags and usage live in cljax/cli/instruct.py (console script: cljax-instruct);
# --help prints that module's documentation.

from cljax.cli import instruct

if __name__ == "__main__":
  instruct.run()
