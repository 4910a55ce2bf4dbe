r"""Tables (Markdown, CSV) and figures over the runs of a sweep.

  cljax-report --root=runs/sweep [--outdir=DIR]   (or: python experiments/report.py)
"""

import sys

from absl import app
from absl import flags

from cljax import cli
from cljax import report

_ROOT = flags.DEFINE_string("root", None, "Folder holding the runs (searched recursively "
                            "for results.json).", required=True)
_OUTDIR = flags.DEFINE_string("outdir", None, "Where to write report.md, report.csv and "
                              "the figures (default: --root).")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  print(report.write_report(_ROOT.value, _OUTDIR.value)["markdown"])


def run():
  cli.run_main(main, sys.modules[__name__])
