"""Data-parallel and parameter-sharded runs on 8 simulated CPU devices."""

import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow  # end-to-end runs: the full tier only

HELPER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "sharding_helper.py")


def _run(devices, *args):
  env = dict(os.environ, JAX_PLATFORMS="cpu",
             XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
  proc = subprocess.run([sys.executable, HELPER, *args], capture_output=True, text=True,
                        env=env, timeout=600)
  assert proc.returncode == 0 and "OK" in proc.stdout, proc.stdout + proc.stderr[-4000:]
  return proc.stdout


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_mesh_training_matches_one_device(arch):
  """finetune, EWC (Fisher computed on the mesh) and replay: 4 steps on a 4 x 2 mesh
  (batch split 4 ways, params and optimizer state split 2 ways) match one device, on
  GPT-2 and a grouped-query Llama."""
  out = _run(8, "steps", arch)
  for method in ("finetune", "ewc", "replay"):
    assert f"{method}: max" in out


def test_sharded_checkpoint_restores_on_another_device_count(tmp_path):
  _run(8, "save", str(tmp_path / "ckpt"))
  _run(2, "restore", str(tmp_path / "ckpt"))
  _run(1, "restore", str(tmp_path / "ckpt"))
