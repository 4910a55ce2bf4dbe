r"""The sequential IMDb -> AG News forgetting study.

  python experiments/forgetting.py --workdir=runs/seed \
      --flagfile=experiments/presets/seed.flags

Trains on each task in turn, evaluates every task before training and after each
task, and writes DIR/results.json (accuracy matrices, metrics), metrics.jsonl,
figures, TensorBoard scalars and orbax checkpoints (--resume continues a run).
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from absl import app  # pylint: disable=g-import-not-at-top
from absl import flags
from absl import logging

import flags_common  # pylint: disable=unused-import
from cljax import study

flags.adopt_module_key_flags(flags_common)  # --help lists every flag
_WORKDIR = flags.DEFINE_string("workdir", None, "Output folder of the run.", required=True)
_RESUME = flags.DEFINE_bool("resume", False, "Continue the run in --workdir from its "
                            "latest checkpoint.")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  logging.set_verbosity(logging.INFO)
  cfg = flags_common.study_config()
  try:
    results = study.run(cfg, _WORKDIR.value, resume=_RESUME.value,
                        flags=flags_common.flag_values())
  except (ValueError, OSError, FloatingPointError) as e:  # bad input: say it, no traceback
    logging.error("%s: %s", type(e).__name__, e)
    sys.exit(1)
  m = results["metrics"]
  print(f"accuracy matrix (row i: after task i): {results['accuracy_matrix']}")
  print(f"average accuracy {m['average_accuracy']:.4f}, forgetting {m['forgetting']}, "
        f"BWT {m['backward_transfer']}, FWT {m['forward_transfer']}")


if __name__ == "__main__":
  app.run(main)
