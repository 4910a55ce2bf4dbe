r"""Results unchanged across a change of the code's shape: fingerprints of real runs.

  python experiments/check_unchanged.py --out=/tmp/before.json          # on the old commit
  python experiments/check_unchanged.py --out=/tmp/after.json --against=/tmp/before.json

Runs, each as a subprocess of the public programs (``experiments/*.py``), so the same
script drives any commit whose programs take these flags:

- every registered method on a tiny study (2 tasks of 32 examples from the tests'
  tiny data and word-level tokenizer, a 2-layer width-32 random init, length buckets of
  8, ``--log_every=1``, an evaluation every 2 steps); LAMOL and a ``finetune`` under
  ``--head=lm``;
- LM training twice: instruction tuning (Alpaca rows, with generations) and plain-text
  pretraining, on the bundled GPT-2 tokenizer and sample;
- runs side by side: a sweep of finetune and EWC over seeds 0 and 1, ``--parallel_runs=2``;
- the quick start (``experiments/presets/smoke.flags``).

A fingerprint is every number a run computes, not how fast: its ``results.json``
(accuracy matrices, curves, held-out losses, method reports, ...) and its
``metrics.jsonl`` records, with timing, paths and versions left out. ``--against``
compares exactly (floats included) and lists each run whose fingerprint differs, with
the first path where it does; the exit status is 1 then. About 12 minutes on 2 cores.
"""

from __future__ import annotations

import concurrent.futures
import json
import os
import subprocess
import sys
import tempfile

from absl import app
from absl import flags

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tests"))

_OUT = flags.DEFINE_string("out", None, "Write the fingerprints here (JSON).", required=True)
_AGAINST = flags.DEFINE_string("against", None, "Compare with these fingerprints.")
_ONLY = flags.DEFINE_list("only", [], "Run only the runs whose names start with these.")
_WORKROOT = flags.DEFINE_string("workroot", None, "Folder for the runs (default: a new "
                                "temporary one); a run whose results are there already is "
                                "read, not rerun (a check that stopped continues).")
_JOBS = flags.DEFINE_integer("jobs", 2, "Runs at once.", lower_bound=1)

# Fields of a record that say how fast or where, not what was computed.
VOLATILE = ("seconds", "per_s", "per_second", "_s", "time", "timing", "environment", "path",
            "workdir", "flags", "config", "cache_dir", "source", "eta")

TINY = ["--init=random", "--size=tiny", "--num_train=32", "--num_test=16", "--max_length=24",
        "--batch_size=8", "--eval_batch_size=16", "--epochs=1", "--learning_rate=2e-3",
        "--checkpoint_every=0", "--log_every=1", "--eval_every=2", "--length_bucket=8",
        "--seed=0", "--fisher_samples=16", "--mas_samples=16", "--replay_size=16",
        "--replay_batch_size=4", "--agem_batch_size=4", "--ewc_lambda=100.0",
        "--gen_batch_size=8"]
AS_TEXT = ["--head=lm", "--label_words=imdb=bad,good", "--label_words=ag_news=software,match"]
ALPACA = [
    {"instruction": "Name a primary color.", "input": "", "output": "Red."},
    {"instruction": "Say the opposite.", "input": "good", "output": "bad"},
    {"instruction": "Count to three.", "input": "", "output": "one two three"},
    {"instruction": "Repeat the word.", "input": "wonderful", "output": "wonderful wonderful"},
]
LM_COMMON = ["--init=random", "--size=tiny", f"--tokenizer={ROOT}/data/gpt2-tokenizer",
             "--batch_size=2", "--eval_batch_size=2", "--checkpoint_every=0", "--log_every=1",
             "--eval_every=2", "--learning_rate=1e-3", "--seed=0", "--export=false"]


def _runs(work: str) -> dict[str, tuple[str, list[str], list[str]]]:
  """name -> (program, its flags, the workdirs it fills)."""
  from cljax import methods  # pylint: disable=import-outside-toplevel
  data = ["--tasks=imdb,ag_news", f"--data_dir={work}/data", f"--tokenizer={work}/tok"]
  runs = {}
  for m in methods.names():
    extra = AS_TEXT if m == "lamol" else []
    runs[f"method/{m}"] = ("forgetting", [*data, *TINY, *extra, f"--method={m}"], ["."])
  runs["method/finetune_lm_head"] = ("forgetting", [*data, *TINY, *AS_TEXT], ["."])
  runs["lm/alpaca"] = ("instruct", [*LM_COMMON, f"--data={work}/alpaca.json", "--num_eval=1",
                                    "--epochs=3", "--max_length=64", "--max_new_tokens=8",
                                    f"--generate={work}/prompts.jsonl"], ["."])
  runs["lm/text"] = ("instruct", [*LM_COMMON, "--data_format=text", "--num_eval=8",
                                  f"--data={ROOT}/data/sample/imdb/test.jsonl",
                                  "--max_examples=40", "--block_size=32", "--epochs=1"], ["."])
  runs["parallel/finetune_ewc"] = (
      "sweep", [*data, *TINY, "--methods=finetune,ewc", "--seeds=0,1", "--parallel_runs=2",
                "--report=false"],
      [f"{m}/default/seed{s}" for m in ("finetune", "ewc") for s in (0, 1)])
  runs["quickstart"] = ("forgetting", [f"--flagfile={ROOT}/experiments/presets/smoke.flags",
                                       "--checkpoint_every=0"], ["."])
  return runs


def _write_inputs(work: str) -> None:
  import conftest  # pylint: disable=import-outside-toplevel
  conftest.write_tiny_data(os.path.join(work, "data"))
  conftest.build_tiny_tokenizer(os.path.join(work, "tok"))
  with open(os.path.join(work, "alpaca.json"), "w") as f:
    json.dump(ALPACA + [{"instruction": "Say hello.", "input": "", "output": "hello"}], f)
  with open(os.path.join(work, "prompts.jsonl"), "w") as f:
    f.writelines(json.dumps({"instruction": e["instruction"], "input": e["input"]}) + "\n"
                 for e in ALPACA)


def _stable(x):
  """``x`` without the fields that say how fast or where."""
  if isinstance(x, dict):
    return {k: _stable(v) for k, v in x.items()
            if not any(k == v_ or k.endswith(v_) for v_ in VOLATILE)}
  if isinstance(x, list):
    return [_stable(v) for v in x]
  return x


def _fingerprint(workdir: str) -> dict:
  out = {}
  with open(os.path.join(workdir, "results.json")) as f:
    out["results"] = _stable(json.load(f))
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    out["metrics"] = [_stable(json.loads(line)) for line in f]
  for name in ("generations.jsonl", "pseudo_samples.jsonl"):
    path = os.path.join(workdir, name)
    if os.path.exists(path):
      with open(path) as f:
        out[name] = [json.loads(line) for line in f]
  return out


def _run(name: str, program: str, args: list[str], workdirs: list[str], work: str) -> dict:
  root = os.path.join(work, "runs", name)
  where = "--root" if program == "sweep" else "--workdir"
  env = dict(os.environ, JAX_PLATFORMS="cpu", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
             JAX_DISABLE_MOST_OPTIMIZATIONS="1", PYTHONPATH=ROOT)
  cmd = [sys.executable, os.path.join(ROOT, "experiments", f"{program}.py"),
         f"{where}={root}", f"--cache_dir={work}/cache", *args]
  if program == "instruct":
    cmd.remove(f"--cache_dir={work}/cache")
  if all(os.path.exists(os.path.join(root, w, "results.json")) for w in workdirs):
    print(f"  {name}: kept from an earlier check in {root}", flush=True)
  else:
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, check=False)
    if done.returncode:
      raise RuntimeError(f"{name} failed ({' '.join(cmd)}):\n{done.stderr[-3000:]}")
    print(f"  {name}: done", flush=True)
  return {w: _fingerprint(os.path.join(root, w)) for w in workdirs}


def _first_difference(a, b, path="") -> str | None:
  if type(a) is not type(b):
    return f"{path}: {a!r} vs {b!r}"
  if isinstance(a, dict):
    for k in sorted(set(a) | set(b)):
      if k not in a or k not in b:
        return f"{path}/{k}: only in {'after' if k not in a else 'before'}"
      d = _first_difference(a[k], b[k], f"{path}/{k}")
      if d:
        return d
    return None
  if isinstance(a, list):
    if len(a) != len(b):
      return f"{path}: {len(a)} items vs {len(b)}"
    for i, (x, y) in enumerate(zip(a, b)):
      d = _first_difference(x, y, f"{path}[{i}]")
      if d:
        return d
    return None
  return None if a == b else f"{path}: {a!r} vs {b!r}"


def main(argv):
  del argv
  work = _WORKROOT.value or tempfile.mkdtemp(prefix="cljax_unchanged_")
  os.makedirs(work, exist_ok=True)
  _write_inputs(work)
  runs = {n: r for n, r in _runs(work).items()
          if not _ONLY.value or any(n.startswith(o) for o in _ONLY.value)}
  print(f"{len(runs)} runs under {work}", flush=True)
  with concurrent.futures.ThreadPoolExecutor(_JOBS.value) as ex:
    futures = {n: ex.submit(_run, n, *r, work) for n, r in runs.items()}
    prints = {n: f.result() for n, f in futures.items()}
  with open(_OUT.value, "w") as f:
    json.dump(prints, f, indent=1, sort_keys=True)
  print(f"Wrote {_OUT.value}")
  if not _AGAINST.value:
    return
  with open(_AGAINST.value) as f:
    before = json.load(f)
  differ = []
  for n in runs:
    d = _first_difference(_stable(before.get(n)), json.loads(json.dumps(prints[n])))
    if d:
      differ.append(f"{n}{d}")
  for line in differ:
    print("DIFFERS", line)
  print(f"{len(runs) - len(differ)} of {len(runs)} runs identical to {_AGAINST.value}")
  if differ:
    sys.exit(1)


if __name__ == "__main__":
  app.run(main)
