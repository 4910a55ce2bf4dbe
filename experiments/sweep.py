# Methods x seeds x strengths of the forgetting study, one run after another.
# The code, flags and usage live in cljax/cli/sweep.py (console script: cljax-sweep);
# --help prints that module's documentation.

from cljax.cli import sweep

if __name__ == "__main__":
  sweep.run()
