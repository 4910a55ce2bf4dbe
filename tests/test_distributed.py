"""Multi-host for real: the study and a sweep of two runs as 2 JAX processes on this
machine (2 CPU devices each, a coordinator on localhost, gloo collectives) give the
matrices of 1 process with the same 4 devices and the same global batch; only process
0 writes outputs; a checkpoint the 2 processes wrote resumes in 1 process; two runs
side by side lay their run axis over the two processes and each run's batch over a
process's two devices; two runs' checkpoints are written at once."""

import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest

from cljax.study import sweep
from test_study import tiny_config

pytestmark = pytest.mark.slow

HELPER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "distributed_helper.py")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _spec(data_dir, tokenizer_dir, **overrides):
  cfg = tiny_config(data_dir, tokenizer_dir, epochs=1, **overrides)
  spec = {k: v for k, v in cfg.to_dict().items() if k != "method_config"}
  return json.dumps(spec)


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def _env(devices: int, **extra) -> dict:
  env = {k: v for k, v in os.environ.items()
         if k not in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID")}
  return dict(env, JAX_PLATFORMS="cpu", PYTHONPATH=ROOT,
              XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}", **extra)


def _outputs(procs, timeout: float) -> list[dict]:
  out = []
  for p in procs:
    try:
      stdout, stderr = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
      for q in procs:
        q.kill()
      stdout, stderr = p.communicate()
      pytest.fail(f"process {procs.index(p)} still running after {timeout} s (hung at a "
                  f"barrier?); its stderr ends:\n{stderr[-3000:]}")
    # The first traceback is the cause; what a dying process prints after it (orbax's
    # background writes cut off at shutdown) would push it out of a plain tail.
    first = stderr.find("Traceback (most recent call last)")
    assert p.returncode == 0, (stderr[first:first + 4000] if first >= 0 else "") + \
        "\n...\n" + stderr[-1500:]
    out.append(json.loads(stdout.strip().splitlines()[-1]))
  return out


def run_processes(n: int, devices: int, *args, timeout: float = 600) -> list[dict]:
  """Runs the helper as ``n`` processes of one JAX run (``devices`` CPU devices each)."""
  port = _free_port()
  procs = []
  for i in range(n):
    extra = ({} if n == 1 else dict(JAX_COORDINATOR_ADDRESS=f"localhost:{port}",
                                    JAX_NUM_PROCESSES=str(n), JAX_PROCESS_ID=str(i)))
    procs.append(subprocess.Popen([sys.executable, HELPER, *args], env=_env(devices, **extra),
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
  return _outputs(procs, timeout)


@pytest.fixture(scope="module")
def one_process(tiny_data_dir, tiny_tokenizer_dir, tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("one"))
  (out,) = run_processes(1, 4, "study", _spec(tiny_data_dir, tiny_tokenizer_dir), workdir)
  assert (out["processes"], out["devices"]) == (1, 4)
  return out


def test_two_processes_give_one_process_matrices_and_only_process_0_writes(
    one_process, tiny_data_dir, tiny_tokenizer_dir, tmp_path):
  spec = _spec(tiny_data_dir, tiny_tokenizer_dir, distributed=True)
  outs = run_processes(2, 2, "study", spec, str(tmp_path))
  assert [(o["process"], o["processes"], o["local_devices"], o["devices"]) for o in outs] == [
      (0, 2, 2, 4), (1, 2, 2, 4)]
  for o in outs:
    assert o["accuracy_matrix"] == one_process["accuracy_matrix"]
    assert o["task_aware_accuracy_matrix"] == one_process["task_aware_accuracy_matrix"]
  with open(tmp_path / "results.json") as f:
    assert json.load(f)["accuracy_matrix"] == one_process["accuracy_matrix"]
  with open(tmp_path / "metrics.jsonl") as f:
    steps = [json.loads(line)["global_step"] for line in f if '"loss"' in line]
  assert steps == sorted(set(steps))          # one writer: every step once
  events = os.listdir(tmp_path / "tensorboard")
  assert len(events) == 1, events


def test_a_checkpoint_of_two_processes_resumes_in_one(one_process, tiny_data_dir,
                                                      tiny_tokenizer_dir, tmp_path):
  spec = _spec(tiny_data_dir, tiny_tokenizer_dir, distributed=True, checkpoint_every=2,
               stop_after_steps=3)
  for o in run_processes(2, 2, "study", spec, str(tmp_path)):
    assert o["accuracy_matrix"] is None     # stopped as if killed
  assert sorted(os.listdir(tmp_path / "checkpoints"))[0].isdigit()
  resumed = json.loads(_spec(tiny_data_dir, tiny_tokenizer_dir, checkpoint_every=2))
  (out,) = run_processes(1, 4, "study", json.dumps(resumed), str(tmp_path), "resume")
  assert out["accuracy_matrix"] == one_process["accuracy_matrix"]


def test_a_sweep_of_two_runs_on_two_processes(one_process, tiny_data_dir, tiny_tokenizer_dir,
                                             tmp_path):
  spec = _spec(tiny_data_dir, tiny_tokenizer_dir, distributed=True)
  outs = run_processes(2, 2, "sweep", spec, str(tmp_path))
  for o in outs:
    np.testing.assert_array_equal(o["accuracy_matrix"], one_process["accuracy_matrix"])
  assert os.path.exists(tmp_path / "selection.json")
  cfg = json.loads(spec)
  for s in (cfg["seed"], cfg["seed"] + 1):   # the second run's study reused the started runtime
    workdir = sweep.run_dir(str(tmp_path), cfg["method"], None, None, s)
    assert os.path.exists(os.path.join(workdir, "results.json"))


def test_two_runs_checkpoints_written_at_once_on_two_processes(tmp_path):
  """Runs side by side each save in the background while the next run's save starts;
  orbax's multi-host barriers are named by step, so without a prefix per directory the
  two writes met at one barrier ("Barrier ... is already ongoing": CI failed so once)."""
  outs = run_processes(2, 2, "checkpoints", "6", str(tmp_path), timeout=180)
  assert [(o["process"], o["latest"], o["restored"]) for o in outs] == [
      (0, [6, 6], [6, 6]), (1, [6, 6], [6, 6])]
  for run in ("run0", "run1"):
    assert sorted(os.listdir(tmp_path / run)) == ["5", "6"]


def test_runs_side_by_side_lay_their_run_axis_over_two_processes(tiny_data_dir,
                                                                 tiny_tokenizer_dir, tmp_path):
  """Seeds 0 and 1 of an EWC study side by side: on one device (runs 1 x data 1), and
  on 2 processes of 2 devices (runs 2 x data 2: a run per process, its batch split over
  the process's devices) give the same accuracy matrices, and only process 0 writes."""
  spec = json.loads(_spec(tiny_data_dir, tiny_tokenizer_dir, method="ewc", num_train=24,
                          dropout_rng_impl="threefry"))
  (one,) = run_processes(1, 1, "parallel", json.dumps(spec), str(tmp_path / "one"))
  assert one["runs_mesh"] == {"runs": 1, "data": 1}
  outs = run_processes(2, 2, "parallel", json.dumps(dict(spec, distributed=True)),
                       str(tmp_path / "two"))
  for o in outs:
    assert o["runs_mesh"] == {"runs": 2, "data": 2}
    assert o["accuracy_matrix"] == one["accuracy_matrix"]
    assert o["task_aware_accuracy_matrix"] == one["task_aware_accuracy_matrix"]
  assert one["accuracy_matrix"][0] != one["accuracy_matrix"][1]   # two runs, not one twice
  for seed in (0, 1):
    with open(tmp_path / "two" / f"seed{seed}" / "results.json") as f:
      written = json.load(f)
    assert written["accuracy_matrix"] == one["accuracy_matrix"][seed]
    assert written["timing"]["runs_mesh"] == {"runs": 2, "data": 2}
    with open(tmp_path / "two" / f"seed{seed}" / "metrics.jsonl") as f:
      steps = [json.loads(line)["global_step"] for line in f if '"loss"' in line]
    assert steps == sorted(set(steps))          # one writer: every step once
