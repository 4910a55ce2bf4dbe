"""One process of a multi-process JAX run on this machine's CPUs (the test sets
XLA_FLAGS for its devices and JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES and
JAX_PROCESS_ID when there are several processes):

  python distributed_helper.py study CONFIG_JSON WORKDIR [resume]
  python distributed_helper.py sweep CONFIG_JSON ROOT     (seeds s and s + 1; prints s)
  python distributed_helper.py parallel CONFIG_JSON ROOT  (seeds s and s + 1 side by side)
  python distributed_helper.py checkpoints STEPS ROOT     (two checkpointers, saves overlapping)

Prints one JSON line: this process's index and count, its devices and the run's
accuracy matrices.
"""

import json
import sys

import os

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from cljax import study
from cljax.study import parallel
from cljax.study import sweep
from cljax.train import checkpoint
from cljax.train import sharding


def overlapping_saves(steps: int, root: str) -> dict:
  """Two checkpointers (two runs side by side) each save steps 1..``steps`` of a
  replicated array, one after the other without waiting: each write is in the
  background while the other run's save starts."""
  sharding.initialize_distributed()
  replicated = NamedSharding(jax.make_mesh((jax.device_count(),), ("d",)), PartitionSpec())
  runs = [checkpoint.Checkpointer(os.path.join(root, f"run{i}")) for i in range(2)]
  for step in range(1, steps + 1):
    for i, c in enumerate(runs):
      value = np.full((8, 8), 10 * step + i, np.float32)
      w = jax.make_array_from_callback((8, 8), replicated, lambda idx, v=value: v[idx])
      c.save(step, {"w": w}, {"step": step})
  latest = [c.latest_step() for c in runs]
  restored = [c.restore_meta()["step"] for c in runs]
  for c in runs:
    c.close()
  return {"process": jax.process_index(), "latest": latest, "restored": restored}


def main(mode, config_json, workdir, *rest):
  if mode == "checkpoints":
    print(json.dumps(overlapping_saves(int(config_json), workdir)))
    return
  spec = {k: tuple(v) if isinstance(v, list) else v for k, v in json.loads(config_json).items()}
  cfg = study.StudyConfig(**spec)
  if mode == "parallel":
    seeds = (cfg.seed, cfg.seed + 1)
    both = parallel.run_parallel([cfg.replace(seed=s) for s in seeds],
                                 [os.path.join(workdir, f"seed{s}") for s in seeds])
    results = {"accuracy_matrix": [r["accuracy_matrix"] for r in both],
               "task_aware_accuracy_matrix": [r["task_aware_accuracy_matrix"] for r in both],
               "runs_mesh": both[0]["timing"]["runs_mesh"]}
  elif mode == "study":
    try:
      results = study.run(cfg, workdir, resume="resume" in rest)
    except study.Interrupted:   # --stop_after_steps: as if killed
      results = {"accuracy_matrix": None, "task_aware_accuracy_matrix": None}
  else:
    # The sweep's own results: reading results.json here instead would race process 0's
    # write (a process that misses it would start a resumed run alone and hang).
    # Two seeds: the second run starts a study in a process whose runtime is up.
    results = sweep.run_sweep(cfg, workdir, methods=[cfg.method],
                              seeds=[cfg.seed, cfg.seed + 1])["results"][0]
  print(json.dumps({"process": jax.process_index(), "processes": jax.process_count(),
                    "local_devices": jax.local_device_count(), "devices": jax.device_count(),
                    "accuracy_matrix": results["accuracy_matrix"],
                    "task_aware_accuracy_matrix": results["task_aware_accuracy_matrix"],
                    "runs_mesh": results.get("runs_mesh")}))


if __name__ == "__main__":
  main(*sys.argv[1:])
