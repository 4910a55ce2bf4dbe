r"""The whole study timed end to end in cljax and in plain PyTorch (transformers'
GPT2ForSequenceClassification), same data, same size, same recipe, same device.

  cljax-study-vs-torch --flagfile=experiments/presets/smoke.flags \
      --workdir=/tmp/vs_torch

Prints one JSON line with both wall times (data loading, compilation, training and
every evaluation included) and their ratio.
"""

import json
import shutil
import time

import sys

from absl import app
from absl import flags

from cljax import cli
from cljax import bench
from cljax import flags as cljax_flags
from cljax import study

cljax_flags.define_flags()
flags.adopt_module_key_flags(cljax_flags)
_WORKDIR = flags.DEFINE_string("workdir", None, "Scratch folder (emptied first).",
                               required=True)


def main(argv):
  del argv
  cfg = cljax_flags.study_config(checkpoint_every=0)
  if cfg.init != "random":
    raise app.UsageError("The comparison uses --init=random (both sides build the size).")
  shutil.rmtree(_WORKDIR.value, ignore_errors=True)
  t0 = time.perf_counter()
  results = study.run(cfg, _WORKDIR.value)
  jax_wall = time.perf_counter() - t0
  torch_out = bench.torch_study(cfg)
  out = {"size": cfg.size, "dtype": cfg.dtype, "num_train": cfg.num_train,
         "jax_wall_seconds": jax_wall, "jax_train_seconds": results["timing"]["train_seconds"],
         "jax_accuracy_matrix": results["accuracy_matrix"], **torch_out,
         "device": results["environment"]["devices"][0]}
  out["end_to_end_speedup"] = torch_out["torch_wall_seconds"] / jax_wall
  print(json.dumps(out))


def run():
  cli.run_main(main, sys.modules[__name__])
