r"""Which parts must train after the first task for the second to be learned?

  python experiments/den_parts.py --root=runs/den_parts \
      --out=docs/results/den_parts/table.md

The smoke preset on the shared data (smoke_shared.flags: a tiny GPT-2 from a random
init, IMDb then AG News Sci/Tech + Sports) with every parameter trained on IMDb and
then only some parts free on AG News (``--method=freeze --freeze=parts
--freeze_from=2``, plain AdamW: no DEN code), over seeds. The table gives AG News'
task-aware accuracy after it for each set of parts, and IMDb's after IMDb: the most a
method that adapts only those parts after its first task (DEN) can learn, at this
size. Each set is one sweep in ROOT/PARTS (a rerun continues an interrupted one).
"""

import json
import os
import subprocess
import sys
import time

from absl import app
from absl import flags
import numpy as np

_ROOT = flags.DEFINE_string("root", "runs/den_parts", "Folder of the sweeps, one per set.")
_OUT = flags.DEFINE_string("out", None, "Also write the table here (markdown).")
_SEEDS = flags.DEFINE_list("seeds", ["0", "1", "2"], "Seeds of each set.")
_SETS = flags.DEFINE_list(
    "sets", ["all", "head", "mlp+head", "mlp+attention+head", "tokens+head",
             "mlp+tokens+head", "mlp+tokens+positions+head"],
    "Sets of parts free on the second task, each parts joined by '+' (all: fine-tuning).")
_PRESET = flags.DEFINE_string("preset", "experiments/presets/smoke_shared.flags",
                              "The study's flagfile.")


def _sweep(parts: str) -> str:
  root = os.path.join(_ROOT.value, parts)
  method = (["--methods=finetune"] if parts == "all" else
            ["--methods=freeze", "--freeze=parts", "--freeze_from=2",
             f"--freeze_parts={parts.replace('+', ',')}"])
  subprocess.run([sys.executable, "experiments/sweep.py", f"--flagfile={_PRESET.value}",
                  *method, f"--seeds={','.join(_SEEDS.value)}", f"--root={root}",
                  "--report=false"], check=True)
  return root


def _accuracies(root: str) -> tuple[list[float], list[float]]:
  """(task-aware accuracy on task 2 after it, on task 1 after it), over the seeds."""
  second, first = [], []
  for folder, _, files in sorted(os.walk(root)):
    if "results.json" in files:
      with open(os.path.join(folder, "results.json")) as f:
        m = json.load(f)["task_aware_accuracy_matrix"]
      second.append(m[1][1])
      first.append(m[0][0])
  return second, first


def _cell(values: list[float]) -> str:
  from scipy import stats  # pylint: disable=import-outside-toplevel
  mean = float(np.mean(values))
  if len(values) < 2:
    return f"{mean:.3f}"
  half = stats.t.ppf(0.975, len(values) - 1) * np.std(values, ddof=1) / np.sqrt(len(values))
  return f"{mean:.3f} ± {half:.3f}"


def main(argv):
  del argv
  rows = []
  for parts in _SETS.value:
    t0 = time.time()
    second, first = _accuracies(_sweep(parts))
    print(f"{parts}: AG News task-aware {second}, IMDb after IMDb {first} "
          f"({time.time() - t0:.0f} s)", flush=True)
    rows.append(f"| {parts.replace('+', ', ')} | {_cell(second)} | {_cell(first)} |")
  text = "\n".join([
      f"{time.strftime('%Y-%m-%d')}: `python experiments/den_parts.py --root={_ROOT.value}` "
      f"({_PRESET.value}, seeds {','.join(_SEEDS.value)}; mean ± the half-width of the "
      "95 % t-interval)", "",
      "| free on AG News | AG News task-aware after it | IMDb after IMDb |",
      "|---|---|---|", *rows]) + "\n"
  print(text, end="")
  if _OUT.value:
    os.makedirs(os.path.dirname(_OUT.value) or ".", exist_ok=True)
    with open(_OUT.value, "w") as f:
      f.write(text)


if __name__ == "__main__":
  app.run(main)
