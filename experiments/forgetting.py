# The sequential IMDb -> AG News forgetting study.
# The code, flags and usage live in cljax/cli/forgetting.py (console script: cljax-forgetting);
# --help prints that module's documentation.

from cljax.cli import forgetting

if __name__ == "__main__":
  forgetting.run()
