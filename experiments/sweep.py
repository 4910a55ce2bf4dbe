r"""Methods x seeds x strengths of the forgetting study, one run after another.

  python experiments/sweep.py --flagfile=experiments/presets/smoke.flags \
      --root=runs/sweep --methods=finetune,ewc,replay --seeds=0,1,2 --num_val=200 \
      --grid=ewc:ewc_lambda=1e2,1e4,1e6

Each run writes its own workdir ROOT/METHOD/STRENGTH/seedN; rerunning the same
command continues an interrupted sweep. Strengths are chosen on validation data
(--num_val), on the first seed. Then: python experiments/report.py --root=ROOT.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from absl import app  # pylint: disable=g-import-not-at-top
from absl import flags
from absl import logging

import flags_common
from cljax import report
from cljax import sweep

flags.adopt_module_key_flags(flags_common)
_ROOT = flags.DEFINE_string("root", None, "Folder of the sweep.", required=True)
_METHODS = flags.DEFINE_list("methods", ["finetune"], "Methods (each may be a '+' "
                             "composition).")
_SEEDS = flags.DEFINE_list("seeds", ["0", "1", "2"], "Seeds.")
_GRID = flags.DEFINE_multi_string("grid", [], "Strengths to choose from, METHOD:FIELD=v1,v2 "
                                  "(repeatable), e.g. ewc:ewc_lambda=1e2,1e4.")
_REPORT = flags.DEFINE_bool("report", True, "Write the report when the sweep ends.")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  logging.set_verbosity(logging.INFO)
  out = sweep.run_sweep(flags_common.study_config(), _ROOT.value, _METHODS.value,
                        [int(s) for s in _SEEDS.value], sweep.parse_grid(_GRID.value),
                        flags=flags_common.flag_values())
  print(f"{len(out['runs'])} runs under {_ROOT.value}")
  if _REPORT.value:
    print(report.write_report(_ROOT.value)["markdown"])


if __name__ == "__main__":
  app.run(main)
