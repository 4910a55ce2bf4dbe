# Tables (Markdown, CSV) and figures over the runs of a sweep.
# The code, flags and usage live in cljax/cli/report.py (console script: cljax-report);
# --help prints that module's documentation.

from cljax.cli import report

if __name__ == "__main__":
  report.run()
