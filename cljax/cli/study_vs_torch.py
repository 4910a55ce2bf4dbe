r"""The whole study timed end to end in cljax and in the seed's own script (transformers'
``Trainer`` over GPT2ForSequenceClassification), same rows, same size, same recipe, same
device, in one process run; ``--torch_loop`` adds a hand-written PyTorch loop over
cljax's arrays (no Trainer overhead: the per-step comparison).

  cljax-study-vs-torch --flagfile=experiments/presets/smoke_shared.flags --size=mini \
      --epochs=1 --learning_rate=5e-4 --workdir=/tmp/vs_torch

Prints one JSON line with the wall times (data loading, compilation, training and
every evaluation included), their ratios and every accuracy matrix.
"""

import json
import os
import shutil
import time

import sys

from absl import app
from absl import flags

from cljax import cli
from cljax import study
from cljax.bench import baselines
from cljax.cli import flags as cljax_flags

cljax_flags.define_flags()
flags.adopt_module_key_flags(cljax_flags)
_WORKDIR = flags.DEFINE_string("workdir", None, "Scratch folder (emptied first).",
                               required=True)
_TORCH_LOOP = flags.DEFINE_bool("torch_loop", False, "Also time a hand-written PyTorch "
                                "loop over cljax's arrays (no Trainer).")


def main(argv):
  del argv
  cfg = cljax_flags.study_config(checkpoint_every=0)
  if cfg.init != "random":
    raise app.UsageError("The comparison uses --init=random (both sides build the size).")
  shutil.rmtree(_WORKDIR.value, ignore_errors=True)
  if cfg.cache_dir is None:   # a cold start, as the Trainer's: tokenized afresh
    cfg = cfg.replace(cache_dir=os.path.join(_WORKDIR.value, "token_cache"))
  t0 = time.perf_counter()
  results = study.run(cfg, os.path.join(_WORKDIR.value, "cljax"))
  jax_wall = time.perf_counter() - t0
  out = {"arch": cfg.arch, "size": cfg.size, "dtype": cfg.dtype, "num_train": cfg.num_train,
         "num_test": cfg.num_test, "batch_size": cfg.batch_size, "epochs": cfg.epochs,
         "length_bucket": cfg.length_bucket, "device": results["environment"]["devices"][0],
         "jax_wall_seconds": jax_wall, "jax_train_seconds": results["timing"]["train_seconds"],
         "jax_eval_seconds": results["timing"]["eval_seconds"],
         "jax_compile_seconds": results["timing"]["compile_seconds_this_process"],
         "jax_accuracy_matrix": results["accuracy_matrix"],
         "jax_baseline_accuracy": results["baseline_accuracy"]}
  try:
    out.update(baselines.trainer_study(cfg, os.path.join(_WORKDIR.value, "trainer")))
    out["speedup_vs_trainer"] = out["trainer_wall_seconds"] / jax_wall
  except ImportError as e:   # Trainer needs accelerate: pip install -e '.[test]'
    out["trainer_error"] = f"{type(e).__name__}: {e}"
  if _TORCH_LOOP.value:
    out.update(baselines.torch_study(cfg))
    out["speedup_vs_torch_loop"] = out["torch_wall_seconds"] / jax_wall
  print(json.dumps(out))


def run():
  cli.run_main(main, sys.modules[__name__])
