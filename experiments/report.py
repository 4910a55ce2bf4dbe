r"""Tables (Markdown, CSV) and figures over the runs of a sweep.

  cljax-report --root=runs/sweep [--outdir=DIR]   (or: python experiments/report.py)

Flags and code: cljax/cli/report.py (console script: cljax-report).
"""

from cljax.cli import report

if __name__ == "__main__":
  report.run()
