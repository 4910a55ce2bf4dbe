"""One process of a multi-process JAX run on this machine's CPUs (the test sets
XLA_FLAGS for its devices and JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES and
JAX_PROCESS_ID when there are several processes):

  python distributed_helper.py study CONFIG_JSON WORKDIR [resume]
  python distributed_helper.py sweep CONFIG_JSON ROOT     (seeds s and s + 1; prints s)
  python distributed_helper.py parallel CONFIG_JSON ROOT  (seeds s and s + 1 side by side)

Prints one JSON line: this process's index and count, its devices and the run's
accuracy matrices.
"""

import json
import sys

import os

import jax

from cljax import parallel, study, sweep


def main(mode, config_json, workdir, *rest):
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
