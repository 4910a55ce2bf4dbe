r"""Tables (Markdown, CSV) and figures over the runs of a sweep.

  cljax-report --root=runs/sweep [--outdir=DIR]   (or: python experiments/report.py)
  cljax-report --root=runs/sweep --keep=docs/results/sweep   (a copy to commit)
"""

import os
import sys

from absl import app
from absl import flags

from cljax import cli
from cljax import report
from cljax import results as results_lib

_ROOT = flags.DEFINE_string("root", None, "Folder holding the runs (searched recursively "
                            "for results.json).", required=True)
_OUTDIR = flags.DEFINE_string("outdir", None, "Where to write report.md, report.csv and "
                              "the figures (default: --root).")
_KEEP = flags.DEFINE_string(
    "keep", None, "Copy what the report reads of every run under --root (results.json, "
    "pseudo_samples.jsonl, selection.json, orders.json; no checkpoints) to KEEP/runs, "
    "and write the report from that copy into KEEP: the part of a sweep a repository "
    "keeps.")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  root, outdir = _ROOT.value, _OUTDIR.value
  if _KEEP.value:
    if outdir:
      raise app.UsageError("--keep writes the report into KEEP; leave --outdir out.")
    root, outdir = os.path.join(_KEEP.value, "runs"), _KEEP.value
    n = results_lib.keep_results(_ROOT.value, root)
    if not n:
      raise app.UsageError(f"No results.json under --root={_ROOT.value}: nothing to keep.")
    print(f"Kept {n} runs' results under {root}.")
  print(report.write_report(root, outdir)["markdown"])


def run():
  cli.run_main(main, sys.modules[__name__])
