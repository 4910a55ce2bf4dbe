r"""Does --parallel_runs change what a sweep computes, and what does each dropout cost?

  python experiments/parallel_equal.py --out=docs/results/cpu_overhead/parallel_default.txt

With default flags, the smoke preset's sweep of fine-tuning and EWC + replay over
seeds 0-2 runs one after another (--parallel_runs=1) and side by side (3), each sweep
in a fresh root with its own empty compilation cache, and the six pairs of accuracy
matrices are compared. Then the cost of the default (threefry) against rbg: the
smoke preset's fine-tuning run alone with each, in fresh folders. Every figure is a
wall time of this machine, measured in this process's run; quote ratios.
"""

import json
import os
import subprocess
import sys
import tempfile
import time

from absl import app
from absl import flags

_OUT = flags.DEFINE_string("out", None, "Also write the report here.")
_SEEDS = flags.DEFINE_list("seeds", ["0", "1", "2"], "Seeds of the sweeps.")
_METHODS = flags.DEFINE_list("methods", ["finetune", "ewc+replay"], "Methods swept.")

PRESET = "experiments/presets/smoke.flags"


def _timed(cmd: list[str]) -> float:
  """The wall seconds of ``cmd`` (each run's --cache_dir a new folder: nothing cached)."""
  t0 = time.time()
  subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  return time.time() - t0


def _matrices(root: str) -> dict:
  out = {}
  for folder, _, files in os.walk(root):
    if "results.json" in files:
      with open(os.path.join(folder, "results.json")) as f:
        r = json.load(f)
      out[(r["method"], r["seed"])] = (r["accuracy_matrix"], r["task_aware_accuracy_matrix"])
  return out


def _sweep(tmp: str, parallel: int) -> tuple[float, dict]:
  root = os.path.join(tmp, f"parallel{parallel}")
  seconds = _timed([sys.executable, "experiments/sweep.py", f"--flagfile={PRESET}",
                    f"--methods={','.join(_METHODS.value)}", f"--seeds={','.join(_SEEDS.value)}",
                    f"--parallel_runs={parallel}", f"--root={root}", "--report=false",
                    f"--cache_dir={root}_cache"])
  return seconds, _matrices(root)


def _alone(tmp: str, impl: str) -> tuple[float, float]:
  workdir = os.path.join(tmp, f"alone_{impl}")
  seconds = _timed([sys.executable, "experiments/forgetting.py", f"--flagfile={PRESET}",
                    f"--dropout_rng_impl={impl}", f"--workdir={workdir}",
                    f"--cache_dir={workdir}_cache"])
  with open(os.path.join(workdir, "results.json")) as f:
    return seconds, json.load(f)["timing"]["train_seconds"]


def main(argv):
  del argv
  lines = [f"{time.strftime('%Y-%m-%d')}, {os.cpu_count()} CPUs, default flags, {PRESET}"]
  with tempfile.TemporaryDirectory() as tmp:
    (one, a), (three, b) = _sweep(tmp, 1), _sweep(tmp, 3)
    same = [k for k in a if a[k] == b.get(k)]
    lines.append(f"sweep {'+'.join(_METHODS.value)} x seeds {','.join(_SEEDS.value)}: "
                 f"--parallel_runs=1 {one:.1f} s, --parallel_runs=3 {three:.1f} s "
                 f"({one / three:.2f}x); {len(same)} of {len(a)} runs give the same "
                 "accuracy and task-aware matrices")
    lines += [f"  {m} seed {s}: {a[(m, s)][0]} | {b.get((m, s), [None])[0]}" for m, s in sorted(a)]
    (t_wall, t_train), (r_wall, r_train) = _alone(tmp, "threefry"), _alone(tmp, "rbg")
    lines.append(f"fine-tuning alone: threefry {t_wall:.1f} s wall, {t_train:.1f} s training; "
                 f"rbg {r_wall:.1f} s wall, {r_train:.1f} s training (threefry/rbg "
                 f"{t_wall / r_wall:.2f}x wall, {t_train / r_train:.2f}x training)")
  text = "\n".join(lines) + "\n"
  print(text, end="")
  if _OUT.value:
    with open(_OUT.value, "w") as f:
      f.write(text)
  if len(same) != len(a):
    sys.exit("Runs side by side differ from the same runs alone.")


if __name__ == "__main__":
  app.run(main)
