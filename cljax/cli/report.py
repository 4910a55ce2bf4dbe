r"""Tables (Markdown, CSV) and figures over the runs of a sweep.

  cljax-report --root=runs/sweep [--outdir=DIR]   (or: python experiments/report.py)
  cljax-report --root=runs/sweep --keep=docs/results/sweep   (a copy to commit)

Several --root flags report sweeps side by side (a method and its ablation, swept
into separate roots): a method met again in a later root is named by the settings it
ran with there, and --paired_with adds its paired differences:

  cljax-report --root=runs/stream3 --root=runs/gr --root=runs/gr_gamma0 \
      --paired_with=finetune --paired_with="generative_replay (gr_gamma=0)" --outdir=DIR
"""

import os
import sys

from absl import app
from absl import flags

from cljax import cli
from cljax import report

_ROOT = flags.DEFINE_multi_string(
    "root", None, "Folder holding the runs (searched recursively for results.json); "
    "repeat it to report several sweeps side by side.", required=True)
_OUTDIR = flags.DEFINE_string("outdir", None, "Where to write report.md, report.csv and "
                              "the figures (default: --root; required with several).")
_PAIRED_WITH = flags.DEFINE_multi_string(
    "paired_with", None, "A method (as the report names it) to subtract from each other "
    "method on the runs with the same task order and seed; repeatable (default: "
    "finetune, where it ran).")
_SEEDS = flags.DEFINE_list(
    "seeds", None, "Report only these seeds' runs (comma-separated; default: every "
    "seed), e.g. the seeds every root ran, for tables that compare like with like.")
_KEEP = flags.DEFINE_string(
    "keep", None, "Copy what the report reads of every run under --root (results.json, "
    "pseudo_samples.jsonl, selection.json, orders.json; no checkpoints) to KEEP/runs, "
    "and write the report from that copy into KEEP: the part of a sweep a repository "
    "keeps.")


def main(argv):
  cli.checked(argv, _report)


def _report() -> None:
  roots, outdir = _ROOT.value, _OUTDIR.value
  if _KEEP.value and len(roots) > 1:
    raise app.UsageError("--keep copies one --root: keep each sweep with its own report, "
                         "then report over the kept copies (KEEP/runs) with --outdir.")
  if len(roots) > 1 and not outdir:
    raise app.UsageError(f"{len(roots)} --root folders: say where their report goes with "
                         "--outdir.")
  if _KEEP.value:
    if outdir:
      raise app.UsageError("--keep writes the report into KEEP; leave --outdir out.")
    roots, outdir = [os.path.join(_KEEP.value, "runs")], _KEEP.value
    n = report.keep_results(_ROOT.value[0], roots[0])
    if not n:
      raise app.UsageError(f"No results.json under --root={_ROOT.value[0]}: nothing to keep.")
    print(f"Kept {n} runs' results under {roots[0]}.")
  seeds = None
  if _SEEDS.value is not None:
    try:
      seeds = [int(x) for x in _SEEDS.value]
    except ValueError:
      raise app.UsageError(f"--seeds={','.join(_SEEDS.value)}: expected whole numbers, "
                           "comma-separated (e.g. --seeds=0,1,2).") from None
  print(report.write_report(roots, outdir, _PAIRED_WITH.value, seeds)["markdown"])


def run():
  cli.run_main(main, sys.modules[__name__])
