"""End to end: the study script on a tiny random-init model and tiny local data."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from cljax import study
from cljax.methods import registry

pytestmark = pytest.mark.slow  # end-to-end runs: the full tier only

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny_config(data_dir, tokenizer_dir, **overrides):
  """2 tasks x 32 examples, 3 epochs of batch 8: 12 steps per task."""
  kwargs = dict(tasks=("imdb", "ag_news"), data_dir=data_dir, tokenizer=tokenizer_dir,
                init="random", size="tiny", num_train=32, num_test=16, max_length=24,
                batch_size=8, eval_batch_size=16, epochs=3, learning_rate=2e-3,
                checkpoint_every=0, log_every=2, seed=0)
  kwargs.update(overrides)
  return study.StudyConfig(**kwargs)


@pytest.fixture(scope="module")
def uninterrupted(tiny_data_dir, tiny_tokenizer_dir, tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("full"))
  return study.run(tiny_config(tiny_data_dir, tiny_tokenizer_dir), workdir), workdir


@pytest.mark.slow
def test_a_run_of_a_sweep_over_orders_reruns_from_its_recorded_flags_alone(
    tiny_data_dir, tiny_tokenizer_dir, tmp_path):
  """A sweep over 2 orders x 2 seeds: a run of the second order records its own order
  and seed as its flags (the sweep's apart), and the experiment script given only its
  run.flags and a new workdir trains the same run again."""
  from cljax.study import sweep
  orders = [("imdb", "ag_news"), ("ag_news", "imdb")]
  sweep_flags = {"orders": ["imdb,ag_news", "ag_news,imdb"], "seeds": ["0", "1"]}
  sweep.run_orders(tiny_config(tiny_data_dir, tiny_tokenizer_dir, epochs=1),
                   str(tmp_path / "sweep"), orders, methods=["finetune"], seeds=[0, 1],
                   flags=sweep_flags)
  run = tmp_path / "sweep" / "order2" / "finetune" / "default" / "seed1"
  r = json.loads((run / "results.json").read_text())
  assert r["flags"]["tasks"] == ["ag_news", "imdb"] and r["flags"]["seed"] == 1
  assert r["command_flags"] == sweep_flags
  workdir = tmp_path / "again"
  proc = subprocess.run([sys.executable, os.path.join(ROOT, "experiments", "forgetting.py"),
                         f"--flagfile={run / 'run.flags'}", f"--workdir={workdir}"],
                        capture_output=True, text=True, timeout=600,
                        env={**os.environ, "JAX_PLATFORMS": "cpu"})
  assert proc.returncode == 0, proc.stderr[-3000:]
  again = json.loads((workdir / "results.json").read_text())
  assert again["flags"] == r["flags"] and again["tasks"] == r["tasks"]
  assert again["accuracy_matrix"] == r["accuracy_matrix"]
  assert again["task_aware_accuracy_matrix"] == r["task_aware_accuracy_matrix"]


def test_script_writes_the_results_contract(tiny_data_dir, tiny_tokenizer_dir, tmp_path,
                                            uninterrupted):
  workdir = str(tmp_path / "run")
  cmd = [sys.executable, os.path.join(ROOT, "experiments", "forgetting.py"),
         f"--workdir={workdir}", f"--data_dir={tiny_data_dir}",
         f"--tokenizer={tiny_tokenizer_dir}", "--init=random", "--size=tiny",
         "--num_train=32", "--num_test=16", "--max_length=24", "--batch_size=8",
         "--eval_batch_size=16", "--epochs=3", "--learning_rate=2e-3", "--checkpoint_every=0",
         "--log_every=2", "--seed=0"]
  proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600,
                        env={**os.environ, "JAX_PLATFORMS": "cpu"})
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "average accuracy" in proc.stdout
  with open(os.path.join(workdir, "results.json")) as f:
    r = json.load(f)
  assert r["tasks"] == ["imdb", "ag_news"]
  assert r["task_classes"]["ag_news"] == {"classes": ["sci_tech", "sports"],
                                          "head_labels": [2, 3]}
  for key in ("accuracy_matrix", "task_aware_accuracy_matrix"):
    m = np.array(r[key])
    assert m.shape == (2, 2) and ((0 <= m) & (m <= 1)).all()
  assert r["metrics"]["average_accuracy"] == pytest.approx(np.mean(r["accuracy_matrix"][-1]))
  assert set(r["metrics"]) >= {"average_accuracy", "forgetting", "backward_transfer",
                               "forward_transfer"}
  assert r["method"] == "finetune" and r["seed"] == 0
  assert r["flags"]["learning_rate"] == 2e-3 and r["command_flags"]["workdir"] == workdir
  assert r["timing"]["train_seconds"] > 0 and r["timing"]["steps_per_task"] == [12, 12]
  assert r["data"]["imdb"] == {"train": 32, "test": 16, "val": 0,
                               "left_out_as_pretraining_text": {"train": 0, "test": 0}}
  # The same seed gives the same accuracy matrices (in-process run vs. this script).
  assert r["accuracy_matrix"] == uninterrupted[0]["accuracy_matrix"]
  assert r["task_aware_accuracy_matrix"] == uninterrupted[0]["task_aware_accuracy_matrix"]
  # Step log, figures, TensorBoard.
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    records = [json.loads(line) for line in f]
  train = [x for x in records if "loss" in x]
  assert [x["global_step"] for x in train] == list(range(2, 25, 2))
  assert all(np.isfinite(x["loss"]) and x["examples_per_s"] > 0 for x in train)
  assert train[0]["learning_rate"] > train[3]["learning_rate"]
  for name in ("accuracy_matrix.png", "accuracy_curve.png"):
    assert os.path.getsize(os.path.join(workdir, name)) > 1000
  assert os.listdir(os.path.join(workdir, "tensorboard"))


def test_the_model_learns_then_forgets(uninterrupted):
  r, _ = uninterrupted
  acc = np.array(r["accuracy_matrix"])
  assert acc[0, 0] >= 0.8          # learned task A
  assert acc[1, 1] >= 0.8          # learned task B
  assert acc[1, 0] <= 0.2          # class-incremental: A is forgotten after B
  assert r["metrics"]["forgetting"] >= 0.6


def test_resume_after_interruption_gives_the_same_matrices(tiny_data_dir, tiny_tokenizer_dir,
                                                           tmp_path, uninterrupted):
  workdir = str(tmp_path / "resumed")
  cfg = tiny_config(tiny_data_dir, tiny_tokenizer_dir, checkpoint_every=3,
                    stop_after_steps=17)
  with pytest.raises(study.Interrupted):
    study.run(cfg, workdir)  # stops mid-task B; last checkpoint at global step 15
  with pytest.raises(FileExistsError, match="--resume"):
    study.run(cfg, workdir)
  # Settings that change the computation are refused, each named (old -> new) ...
  with pytest.raises(ValueError, match=r"--batch_size 8 -> 16; .*--method 'finetune' -> "
                                       r"'ewc'; --seed 0 -> 1.*new --workdir"):
    study.run(cfg.replace(batch_size=16, seed=1, method="ewc"), workdir, resume=True)
  with pytest.raises(ValueError, match=r"--learning_rate 0.002 -> 0.001"):
    study.run(cfg.replace(learning_rate=1e-3), workdir, resume=True)
  assert not os.path.exists(os.path.join(workdir, "results.json"))
  # ... and logging-only ones may change (the resumed run still equals the full one).
  cfg = cfg.replace(log_every=3, eval_batch_size=8)
  resumed = study.run(cfg.replace(stop_after_steps=None), workdir, resume=True)
  full, _ = uninterrupted
  # Steps replayed from the checkpoint at 15 are not logged twice: the first process's
  # records past 15 go (it logged every 2 steps, the resumed one every 3).
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    logged = [x["global_step"] for x in map(json.loads, f) if "loss" in x]
  assert logged == [2, 4, 6, 8, 10, 12, 14, 18, 21, 24]
  assert resumed["accuracy_matrix"] == full["accuracy_matrix"]
  assert resumed["task_aware_accuracy_matrix"] == full["task_aware_accuracy_matrix"]
  assert resumed["baseline_accuracy"] == full["baseline_accuracy"]


def test_a_workdir_with_outputs_but_no_checkpoint_is_refused(tiny_data_dir,
                                                             tiny_tokenizer_dir, tmp_path):
  (tmp_path / "metrics.jsonl").write_text('{"global_step": 2}\n')
  (tmp_path / "results.json").write_text("{}")
  cfg = tiny_config(tiny_data_dir, tiny_tokenizer_dir)
  for resume in (False, True):
    with pytest.raises(FileExistsError, match="outputs of a previous run .results.json, "
                                              "metrics.jsonl. and no checkpoint"):
      study.run(cfg, str(tmp_path), resume=resume)
  assert (tmp_path / "results.json").read_text() == "{}"


def test_non_finite_loss_stops_with_a_clear_error(tiny_data_dir, tiny_tokenizer_dir,
                                                  tmp_path):
  cfg = tiny_config(tiny_data_dir, tiny_tokenizer_dir, learning_rate=1e30, max_grad_norm=0.0,
                    checkpoint_every=1, tasks=("imdb",))
  with pytest.raises(FloatingPointError, match="Non-finite loss or gradient at task 0"):
    study.run(cfg, str(tmp_path / "nan"))
  assert not os.path.exists(tmp_path / "nan" / "results.json")


def test_divergence_is_a_warning_in_the_results_or_an_error(tiny_data_dir, tiny_tokenizer_dir,
                                                            tmp_path):
  """lr 1e3: the loss climbs from ~0.7 to ~1e7 and stays finite; the run says so."""
  cfg = tiny_config(tiny_data_dir, tiny_tokenizer_dir, learning_rate=1e3, tasks=("imdb",),
                    epochs=1)
  r = study.run(cfg, str(tmp_path / "warn"))
  assert len(r["warnings"]) == 1 and "Training diverged on task 0 (imdb)" in r["warnings"][0]
  ok = study.run(tiny_config(tiny_data_dir, tiny_tokenizer_dir, tasks=("imdb",), epochs=1),
                 str(tmp_path / "ok"))
  assert ok["warnings"] == []
  with pytest.raises(FloatingPointError, match="diverged.*--stop_on_divergence"):
    study.run(cfg.replace(stop_on_divergence=True), str(tmp_path / "stop"))
  assert not os.path.exists(tmp_path / "stop" / "results.json")


def test_a_non_finite_state_is_never_checkpointed(tiny_data_dir, tiny_tokenizer_dir, tmp_path):
  """lr 1e39 is inf in float32: the first update makes the params non-finite while
  the loss it was computed from was finite. The checkpoint of that step is refused."""
  from cljax.train.checkpoint import Checkpointer
  cfg = tiny_config(tiny_data_dir, tiny_tokenizer_dir, learning_rate=1e39, checkpoint_every=1,
                    tasks=("imdb",))
  with pytest.raises(FloatingPointError, match="after global step 1; not saved. The last "
                                               "finite checkpoint is global step None"):
    study.run(cfg, str(tmp_path / "inf"))
  assert Checkpointer(str(tmp_path / "inf" / "checkpoints")).latest_step() is None
  assert not os.path.exists(tmp_path / "inf" / "results.json")


SMALL_HP = dict(fisher_samples=16, mas_samples=16, replay_size=16, replay_batch_size=4,
                agem_batch_size=4, ewc_lambda=100.0, gen_batch_size=8)


def _own_loop(cfg, workdir):
  """The accuracy matrix of docs/methods.md's own-loop example run with ``cfg``."""
  from test_readme import METHODS_DOC, _example
  code = _example(METHODS_DOC, "## In your own loop")
  first = next(line for line in code.splitlines() if line.startswith("cfg = "))
  code = code.replace(first, "cfg = CFG").replace('"runs/own_loop"', repr(workdir))
  scope = {"CFG": cfg}
  exec(compile(code, "docs/methods.md", "exec"), scope)  # pylint: disable=exec-used
  return scope["matrix"]


@pytest.mark.parametrize("method", registry.names())
def test_every_method_in_your_own_loop_gives_the_study_s_matrix(method, tiny_data_dir,
                                                                 tiny_tokenizer_dir, tmp_path):
  """Every registered method runs end to end in the study, and the docs' own loop on
  the task protocol (begin_task, end_task) gives the study's accuracy matrix exactly."""
  from cljax.methods import MethodConfig
  as_text = dict(head="lm", label_words=("imdb=bad,good", "ag_news=software,match"))
  # Buckets of 8 (8, 16, 24): every method sees length-bucketed batches, as in a
  # default run at --max_length=128.
  cfg = tiny_config(tiny_data_dir, tiny_tokenizer_dir, method=method, epochs=1,
                    method_config=MethodConfig(**SMALL_HP), length_bucket=8,
                    **(as_text if method == "lamol" else {}))  # LAMOL is text-only
  r = study.run(cfg, str(tmp_path / "study"))
  assert r["method"] == method
  assert np.array(r["accuracy_matrix"]).shape == (2, 2)
  assert r["method_config"]["replay_size"] == 16
  assert _own_loop(cfg, str(tmp_path / "own")) == r["accuracy_matrix"]


def test_resume_restores_method_state(tiny_data_dir, tiny_tokenizer_dir, tmp_path):
  """Quadratic (online EWC, SI), buffer (DER++) and teacher (LwF) states survive an
  interruption mid-task: the resumed run ends with the uninterrupted matrices."""
  from cljax.methods import MethodConfig
  cfg = tiny_config(tiny_data_dir, tiny_tokenizer_dir, method="online_ewc+si+derpp+lwf",
                    method_config=MethodConfig(**SMALL_HP), checkpoint_every=5)
  full = study.run(cfg, str(tmp_path / "full"))
  with pytest.raises(study.Interrupted):
    study.run(cfg.replace(stop_after_steps=17), str(tmp_path / "cut"))
  resumed = study.run(cfg, str(tmp_path / "cut"), resume=True)
  assert resumed["accuracy_matrix"] == full["accuracy_matrix"]
  assert resumed["task_aware_accuracy_matrix"] == full["task_aware_accuracy_matrix"]


def test_only_the_first_process_writes_files(tiny_data_dir, tiny_tokenizer_dir, tmp_path,
                                             monkeypatch):
  """In a multi-host run every process trains and checkpoints (orbax coordinates),
  but results.json, metrics.jsonl, TensorBoard events and figures come from process 0."""
  import dataclasses
  from cljax.study import stages
  setup = stages.setup
  monkeypatch.setattr(stages, "setup", lambda *a, **k: dataclasses.replace(
      setup(*a, **k), writes_files=False))
  cfg = tiny_config(tiny_data_dir, tiny_tokenizer_dir, tasks=("imdb",), epochs=1)
  r = study.run(cfg, str(tmp_path))
  assert np.array(r["accuracy_matrix"]).shape == (1, 1)
  assert sorted(os.listdir(tmp_path)) == ["checkpoints"]


def test_a_new_task_does_not_keep_the_previous_optimizer_state(tiny_data_dir,
                                                               tiny_tokenizer_dir, tmp_path,
                                                               monkeypatch):
  """Device memory while training task 2 is what it was on task 1: the previous task's
  Adam moments (2x the params) are released when the next task starts. Checkpoints are
  written before the next step here: a write in progress holds the arrays it saves."""
  import gc

  import jax

  from cljax.train import progress
  from cljax.train.checkpoint import Checkpointer
  peak, push, save = {}, progress.StepLogger.push, Checkpointer.save

  def saved(self, *args):
    save(self, *args)
    self.wait()

  def measuring_push(self, g, s, m):
    gc.collect()
    live = sum(a.nbytes for a in jax.live_arrays())
    peak[self._task[0]] = max(peak.get(self._task[0], 0), live)
    return push(self, g, s, m)

  monkeypatch.setattr(progress.StepLogger, "push", measuring_push)
  monkeypatch.setattr(Checkpointer, "save", saved)
  cfg = tiny_config(tiny_data_dir, tiny_tokenizer_dir, epochs=1)
  study.run(cfg, str(tmp_path))
  from cljax.models import GPT2Config
  config = GPT2Config.from_size("tiny", vocab_size=64)
  param_bytes = 4 * config.n_layer * 12 * config.n_embd ** 2   # blocks alone: a lower bound
  assert peak[1] - peak[0] < 0.5 * param_bytes, (peak, param_bytes)


def _cli(workdir, cfg_argv, *extra, file_size_limit_kb=None):
  cmd = [sys.executable, os.path.join(ROOT, "experiments", "forgetting.py"),
         f"--workdir={workdir}", *cfg_argv, *extra]
  if file_size_limit_kb:   # writes past the limit fail with EFBIG, as on a full disk
    cmd = ["bash", "-c", f'trap "" XFSZ; ulimit -f {file_size_limit_kb}; exec "$@"', "_",
           *cmd]
  return subprocess.run(cmd, capture_output=True, text=True, timeout=600,
                        env={**os.environ, "JAX_PLATFORMS": "cpu"})


def _tiny_argv(data_dir, tokenizer_dir):
  return [f"--data_dir={data_dir}", f"--tokenizer={tokenizer_dir}", "--init=random",
          "--size=tiny", "--num_train=32", "--num_test=16", "--max_length=24",
          "--batch_size=8", "--eval_batch_size=16", "--epochs=3", "--learning_rate=2e-3",
          "--log_every=2", "--seed=0", "--checkpoint_every=4"]


def test_a_corrupted_newest_checkpoint_falls_back_to_an_older_one(
    tiny_data_dir, tiny_tokenizer_dir, tmp_path, uninterrupted):
  """Truncated array files in the newest checkpoint (a disk that filled, a copy cut
  short): the resumed run says which checkpoint it skipped and why, in one warning
  (no tensorstore or asyncio tracebacks), and continues from the older one exactly."""
  workdir = tmp_path / "run"
  cfg = tiny_config(tiny_data_dir, tiny_tokenizer_dir, checkpoint_every=4,
                    stop_after_steps=10)
  with pytest.raises(study.Interrupted):
    study.run(cfg, str(workdir))   # checkpoints 4 and 8
  assert sorted(os.listdir(workdir / "checkpoints")) == ["4", "8"]
  for path in (workdir / "checkpoints" / "8" / "state").rglob("ocdbt.process_0/d/*"):
    os.truncate(path, os.path.getsize(path) // 2)
  proc = _cli(workdir, _tiny_argv(tiny_data_dir, tiny_tokenizer_dir), "--resume")
  assert proc.returncode == 0, proc.stderr[-3000:]
  skipped = [line for line in proc.stderr.splitlines() if "Skipping checkpoint" in line]
  assert len(skipped) == 1 and "Skipping checkpoint 8" in skipped[0], proc.stderr[-3000:]
  assert "OUT_OF_RANGE" in skipped[0] and "trying the next older one" in skipped[0]
  assert "checkpoint 4: task 0, step 4 in the task" in proc.stderr
  for noise in ("Traceback", "Event loop is closed", "never retrieved", "Exception ignored"):
    assert noise not in proc.stderr, noise
  with open(workdir / "results.json") as f:
    resumed = json.load(f)
  assert resumed["accuracy_matrix"] == uninterrupted[0]["accuracy_matrix"]
  assert resumed["task_aware_accuracy_matrix"] == uninterrupted[0]["task_aware_accuracy_matrix"]


def test_no_checkpoint_that_restores_is_one_line(tiny_data_dir, tiny_tokenizer_dir, tmp_path):
  workdir = tmp_path / "run"
  cfg = tiny_config(tiny_data_dir, tiny_tokenizer_dir, checkpoint_every=4, stop_after_steps=6,
                    tasks=("imdb",))
  with pytest.raises(study.Interrupted):
    study.run(cfg, str(workdir))
  for path in (workdir / "checkpoints").rglob("ocdbt.process_0/d/*"):
    path.write_bytes(b"")
  with pytest.raises(ValueError, match=r"No checkpoint in .* restores \(checkpoint 4: "
                                       r"ValueError: .*\); start a new --workdir"):
    study.run(cfg.replace(stop_after_steps=None), str(workdir), resume=True)
  assert not (workdir / "results.json").exists()


def test_a_failed_checkpoint_write_is_one_line_and_resume_recovers(
    tiny_data_dir, tiny_tokenizer_dir, tmp_path, uninterrupted):
  """Files past 100 kB cannot be written (SIGXFSZ ignored: EFBIG, "File too large",
  as ENOSPC on a full disk): the checkpoint's array file (~0.6 MB for the tiny model)
  fails; the tokenization cache, logs and TensorBoard files (all small) do not."""
  workdir = tmp_path / "run"
  argv = _tiny_argv(tiny_data_dir, tiny_tokenizer_dir)
  with pytest.raises(study.Interrupted):
    study.run(tiny_config(tiny_data_dir, tiny_tokenizer_dir, checkpoint_every=4,
                          stop_after_steps=5), str(workdir))
  proc = _cli(workdir, argv, "--resume", file_size_limit_kb=100)
  assert proc.returncode == 1
  errors = [line for line in proc.stderr.splitlines() if line[:1] in "EW"]
  assert len(errors) == 1, proc.stderr[-3000:]
  assert errors[0].endswith("Could not write checkpoint 8 to "
                            f"{workdir / 'checkpoints'} (File too large). Free disk space, "
                            "then rerun with --resume: it continues from checkpoint 4.")
  assert "Traceback" not in proc.stderr and "Event loop" not in proc.stderr
  assert not (workdir / "results.json").exists()
  proc = _cli(workdir, argv, "--resume")
  assert proc.returncode == 0, proc.stderr[-3000:]
  with open(workdir / "results.json") as f:
    assert json.load(f)["accuracy_matrix"] == uninterrupted[0]["accuracy_matrix"]


_KILLS = {  # code run before the study: SIGKILL at checkpoint 8, at two points of its write
    "after_save_returned": (
        "from cljax.train import checkpoint\nsave = checkpoint.Checkpointer.save\n"
        "def killing(self, step, *args):\n  save(self, step, *args)\n"
        "  if step == 8: os.kill(os.getpid(), signal.SIGKILL)\n"
        "checkpoint.Checkpointer.save = killing\n"),
    "before_the_rename": (
        "from orbax.checkpoint._src.path import atomicity\n"
        "finalize = atomicity.AtomicRenameTemporaryPath.finalize\n"
        "async def killing(self):\n"
        "  if self._final_path.name == '8': os.kill(os.getpid(), signal.SIGKILL)\n"
        "  return await finalize(self)\n"
        "atomicity.AtomicRenameTemporaryPath.finalize = killing\n")}


@pytest.mark.parametrize("when", sorted(_KILLS))
def test_a_run_killed_while_a_checkpoint_is_written_resumes_to_the_same_matrices(
    when, tiny_data_dir, tiny_tokenizer_dir, tmp_path, uninterrupted):
  """Checkpoints are written in the background; SIGKILL during the write of checkpoint
  8 (right after the arrays left the devices, or with every file written but the
  folder not yet renamed) leaves checkpoint 4 the newest, and --resume ends with the
  uninterrupted run's matrices."""
  workdir = tmp_path / "run"
  argv = ["forgetting", f"--workdir={workdir}",
          *_tiny_argv(tiny_data_dir, tiny_tokenizer_dir)]
  code = (f"import os, signal, sys\n{_KILLS[when]}from cljax.cli import forgetting\n"
          f"sys.argv = {argv!r}\nforgetting.run()\n")
  proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                        timeout=600, env={**os.environ, "JAX_PLATFORMS": "cpu"})
  assert proc.returncode == -9, proc.stderr[-3000:]
  assert not (workdir / "results.json").exists()
  left = sorted(os.listdir(workdir / "checkpoints"))
  assert "4" in left and "8" not in left, left
  if when == "before_the_rename":   # every file of checkpoint 8 written, in its tmp folder
    assert [n for n in left if n.startswith("8.") and "tmp" in n], left
  proc = _cli(workdir, _tiny_argv(tiny_data_dir, tiny_tokenizer_dir), "--resume")
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "checkpoint 4: task 0, step 4 in the task" in proc.stderr
  with open(workdir / "results.json") as f:
    resumed = json.load(f)
  assert resumed["accuracy_matrix"] == uninterrupted[0]["accuracy_matrix"]
  assert resumed["task_aware_accuracy_matrix"] == uninterrupted[0]["task_aware_accuracy_matrix"]
  assert [n for n in os.listdir(workdir / "checkpoints") if "tmp" in n] == []


@pytest.mark.parametrize("method", ["finetune", "ewc+replay"])
def test_classification_as_text_learns_each_task_and_forgets(method, tiny_data_dir,
                                                             tiny_tokenizer_dir, tmp_path):
  """--head=lm: every example a prompt, its class the most likely next label word."""
  from cljax.methods import MethodConfig
  cfg = tiny_config(tiny_data_dir, tiny_tokenizer_dir, head="lm", method=method,
                    label_words=("imdb=bad,good", "ag_news=software,match"),
                    method_config=MethodConfig(**SMALL_HP))
  r = study.run(cfg, str(tmp_path))
  acc, aware = np.array(r["accuracy_matrix"]), np.array(r["task_aware_accuracy_matrix"])
  assert aware[0, 0] >= 0.75 and aware[1, 1] >= 0.75, aware   # chance: 0.5
  if method == "finetune":
    assert acc[1, 0] < acc[0, 0] - 0.25, acc                   # forgetting
  assert r["head"] == "lm"
  assert r["task_classes"]["imdb"]["label_words"] == [" bad", " good"]
  assert r["task_classes"]["ag_news"]["prompt"] == ["Article: ", "\nTopic:"]


def test_random_init_on_an_accelerator_runs_on_the_host_cpu_with_the_same_values(monkeypatch):
  """On an accelerator the random init is computed by the host CPU (its compiler is
  faster), then moved to the default device: the same params as the init there."""
  import functools
  import jax
  from cljax.models import GPT2Classifier, GPT2Config, init_params, random_params
  model = GPT2Classifier(GPT2Config(vocab_size=64, n_positions=16, n_embd=16, n_layer=1,
                                    n_head=2, num_labels=4, pad_token_id=0))
  want = jax.jit(functools.partial(init_params, model))(jax.random.PRNGKey(3))
  placed = []
  real_default_device = jax.default_device

  def spy(device):
    placed.append(device.platform)
    return real_default_device(device)

  monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
  monkeypatch.setattr(jax, "default_device", spy)
  got = random_params(model, jax.random.PRNGKey(3))
  assert placed == ["cpu"]
  for a, b in zip(jax.tree.leaves(want), jax.tree.leaves(got)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert b.devices() == {jax.devices()[0]}


def test_a_study_imports_neither_torch_nor_the_auto_classes(tiny_data_dir, tiny_tokenizer_dir,
                                                             tmp_path):
  """A study on a local tokenizer folder needs no torch: its import (seconds of start-up)
  would come from AutoTokenizer or tensorboardX."""
  code = (f"import sys\nfrom cljax import cli\nfrom cljax.cli import forgetting\n"
          f"sys.argv = ['forgetting', '--workdir={tmp_path / 'run'}', "
          f"{', '.join(repr(a) for a in _tiny_argv(tiny_data_dir, tiny_tokenizer_dir))}, "
          f"'--epochs=1']\n"
          "try:\n  forgetting.run()\nexcept SystemExit as e:\n  assert not e.code, e.code\n"
          "print('torch imported:', 'torch' in sys.modules)\n")
  proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                        timeout=600, env={**os.environ, "JAX_PLATFORMS": "cpu"})
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "torch imported: False" in proc.stdout, proc.stdout[-2000:]
  assert os.path.exists(tmp_path / "run" / "results.json")


def test_every_program_compiles_before_the_first_step_and_a_rerun_only_loads(
    tiny_data_dir, tiny_tokenizer_dir, tmp_path):
  """One compile round: the tasks' train shapes (AG News's shorter buckets too), the
  evaluation's and the finiteness check, before the first step; a warm rerun in a new
  process, with cljax's default cache settings, compiles nothing."""
  argv = [*_tiny_argv(tiny_data_dir, tiny_tokenizer_dir), "--length_bucket=8",
          f"--cache_dir={tmp_path / 'cache'}"]
  timings = []
  for run in ("cold", "warm"):
    proc = _cli(tmp_path / run, argv)
    assert proc.returncode == 0, proc.stderr[-3000:]
    with open(tmp_path / run / "results.json") as f:
      timings.append(json.load(f)["timing"])
  cold, warm = timings
  assert cold["compiled_programs_this_process"] > 3
  assert cold["compiled_after_first_step"] == 0 and cold["loaded_after_first_step"] == 0
  assert warm["compiled_programs_this_process"] == 0, warm
  assert warm["loaded_programs_this_process"] >= cold["compiled_programs_this_process"]
  assert warm["loaded_after_first_step"] == 0


def _folder_bytes(path) -> int:
  return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def test_a_task_boundary_checkpoint_holds_no_optimizer_moments_and_resumes_exactly(
    uninterrupted, tiny_data_dir, tiny_tokenizer_dir, tmp_path):
  """The next task starts a fresh optimizer, so the end-of-task checkpoint leaves the
  AdamW moments out (about a third of a mid-task one) and a resume from it is exact."""
  workdir = tmp_path / "run"
  cfg = tiny_config(tiny_data_dir, tiny_tokenizer_dir, checkpoint_every=4,
                    stop_after_steps=13)   # task A: 12 steps; stop inside task B
  with pytest.raises(study.Interrupted):
    study.run(cfg, str(workdir))
  ckpts = workdir / "checkpoints"
  assert sorted(os.listdir(ckpts)) == ["12", "8"]
  mid, boundary = _folder_bytes(ckpts / "8"), _folder_bytes(ckpts / "12")
  assert boundary < 0.5 * mid, (boundary, mid)
  resumed = study.run(cfg.replace(stop_after_steps=None), str(workdir), resume=True)
  assert resumed["accuracy_matrix"] == uninterrupted[0]["accuracy_matrix"]
  assert resumed["task_aware_accuracy_matrix"] == uninterrupted[0]["task_aware_accuracy_matrix"]
