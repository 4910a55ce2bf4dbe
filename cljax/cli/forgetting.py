r"""The sequential IMDb -> AG News forgetting study.

  cljax-forgetting --workdir=runs/seed --flagfile=experiments/presets/seed.flags
  (or: python experiments/forgetting.py ...)

Trains on each task in turn, evaluates every task before training and after each
task, and writes DIR/results.json (accuracy matrices, metrics), metrics.jsonl,
figures, TensorBoard scalars and orbax checkpoints (--resume continues a run).
"""

import sys

from absl import flags

from cljax import cli
from cljax import study
from cljax.cli import flags as cljax_flags

cljax_flags.define_flags()
flags.adopt_module_key_flags(cljax_flags)  # --help lists every flag
_WORKDIR = flags.DEFINE_string("workdir", None, "Output folder of the run.", required=True)
_RESUME = flags.DEFINE_bool("resume", False, "Continue the run in --workdir from its "
                            "latest checkpoint.")


def main(argv):
  results = cli.checked(argv, lambda: study.run(
      cljax_flags.study_config(), _WORKDIR.value, resume=_RESUME.value,
      flags=cljax_flags.flag_values()))
  m = results["metrics"]
  print(f"accuracy matrix (row i: after task i): {results['accuracy_matrix']}")
  print(f"average accuracy {m['average_accuracy']:.4f}, forgetting {m['forgetting']}, "
        f"BWT {m['backward_transfer']}, FWT {m['forward_transfer']}")


def run():
  cli.run_main(main, sys.modules[__name__])
