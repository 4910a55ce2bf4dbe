"""Every bad value is one line before any work, and nothing is written.

Each case goes through the study's flags and ``study.run`` in-process and checks the
error's type is one the program turns into one log line and exit status 1
(``cli.BAD_INPUT``), its key words, and that the workdir was never created; two
subprocess runs check that the program itself does exactly that.
"""

import csv
import os
import shutil
import subprocess
import sys

from absl import flags as absl_flags
import numpy as np
import pytest

from cljax import cli
from cljax import data
from cljax import study
from cljax.cli import flags as cljax_flags
from cljax.methods import MethodConfig

from conftest import TINY_HF

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny_argv(data_dir, tokenizer_dir, cache_dir):
  return [f"--data_dir={data_dir}", f"--tokenizer={tokenizer_dir}", "--init=random",
          "--size=tiny", "--num_train=32", "--num_test=16", "--max_length=24",
          "--batch_size=8", "--eval_batch_size=16", "--epochs=1", "--learning_rate=2e-3",
          f"--cache_dir={cache_dir}"]


def refused(workdir, argv, *keywords, error=cli.BAD_INPUT):
  """Parses ``argv`` as the study's flags, runs, and checks the one-line refusal."""
  fv = absl_flags.FlagValues()
  cljax_flags.define_flags(fv)
  fv(["prog", *argv])
  with pytest.raises(error) as info:
    study.run(cljax_flags.study_config(fv), str(workdir))
  message = str(info.value)
  assert "\n" not in message, message
  for word in keywords:
    assert word in message, (word, message)
  assert not os.path.exists(workdir), "the workdir was created"
  return message


@pytest.fixture
def argv(tiny_data_dir, tiny_tokenizer_dir, tmp_path):
  return tiny_argv(tiny_data_dir, tiny_tokenizer_dir, str(tmp_path / "cache"))


@pytest.mark.parametrize("flag, words", [
    ("--batch_size=0", ["--batch_size=0", "> 0"]),
    ("--eval_batch_size=0", ["--eval_batch_size=0", "> 0"]),
    ("--grad_accum_steps=0", ["--grad_accum_steps=0", "> 0"]),
    ("--log_every=0", ["--log_every=0", "> 0"]),
    ("--num_train=0", ["--num_train=0", "-1 for all"]),
    ("--num_test=0", ["--num_test=0", "-1 for all"]),
    ("--num_train=-5", ["--num_train=-5"]),
    ("--max_length=0", ["--max_length=0", "> 0"]),
    ("--learning_rate=-1e-4", ["--learning_rate=-0.0001", ">= 0"]),
    ("--learning_rate=nan", ["--learning_rate=nan"]),
    ("--ewc_lambda=-1", ["--ewc_lambda=-1.0", ">= 0"]),
    ("--si_c=-2", ["--si_c=-2.0"]),
    ("--online_gamma=1.5", ["--online_gamma=1.5", "[0, 1]"]),
    ("--replay_size=0", ["--replay_size=0"]),
    ("--lwf_temperature=0", ["--lwf_temperature=0.0", "> 0"]),
    ("--dropout=1", ["--dropout=1.0", "[0, 1)"]),
    ("--dropout=-0.1", ["--dropout=-0.1"]),
    ("--epochs=0", ["--epochs=0", "> 0"]),
    ("--keep_checkpoints=0", ["--keep_checkpoints=0"]),
    ("--classes=imdb", ["--classes='imdb'", "TASK=name,name"]),
    ("--classes=imbd=neg,pos", ["--classes names ['imbd']", "not among --tasks"]),
    ("--tasks=imdb,imdb", ["--tasks=imdb,imdb", "more than once"]),
    ("--method=ewc+bogus", ["Unknown method 'ewc+bogus'"]),
    ("--size=huge", ["--size='huge'", "mini"]),
    ("--attention=cudnn", ["--attention=cudnn", "--dtype=bfloat16"]),
])
def test_a_bad_flag_value_is_one_line_before_any_work(flag, words, argv, tmp_path):
  refused(tmp_path / "run", [*argv, flag], *words)


def test_a_method_option_is_checked_at_the_flag_and_in_python():
  fv = absl_flags.FlagValues()
  cljax_flags.define_flags(fv)
  with pytest.raises(absl_flags.IllegalFlagValueError, match="empirical|true"):
    fv(["prog", "--fisher=bogus"])
  with pytest.raises(ValueError, match="--fisher='bogus'; expected one of"):
    MethodConfig(fisher="bogus")


def test_a_resume_compares_the_hyperparameters_of_the_run_s_methods_only():
  from cljax.train import run as run_lib
  lamol = study.resume_view(study.StudyConfig(method="lamol+ewc", head="lm"))
  assert {"lamol_qa_loss", "lamol_gamma", "ewc_lambda"} <= set(lamol["method_config"])
  assert "der_alpha" not in lamol["method_config"]
  # A checkpoint written before --lamol_qa_loss existed ran another QA loss: refused.
  old = dict(lamol, method_config={k: v for k, v in lamol["method_config"].items()
                                   if k != "lamol_qa_loss"})
  with pytest.raises(ValueError, match=r"^Cannot resume w: .*--lamol_qa_loss \(not recorded: "
                                       r"the checkpoint predates it\) -> 'vocab'\)"):
    run_lib.check_resumable(old, lamol, "w", study.RESUMABLE_CHANGES)
  run_lib.check_resumable(lamol, lamol, "w", study.RESUMABLE_CHANGES)
  # A hyperparameter added for another method (here DER's, missing from an EWC run's
  # stored settings) does not block the resume; compared unfiltered, it would.
  cfg = study.StudyConfig(method="ewc")
  saved = cfg.to_dict()
  del saved["method_config"]["der_alpha"]
  run_lib.check_resumable(saved, study.resume_view(cfg), "w", study.RESUMABLE_CHANGES)
  with pytest.raises(ValueError, match=r"--der_alpha \(not recorded"):
    run_lib.check_resumable(saved, cfg.to_dict(), "w", study.RESUMABLE_CHANGES)
  # A run stored before --dropout_rng_impl existed drew rbg keys: it resumes under rbg
  # and is refused under threefry, today's default.
  rbg = cfg.replace(dropout_rng_impl="rbg")
  before = {k: v for k, v in study.resume_view(rbg).items() if k != "dropout_rng_impl"}
  run_lib.check_resumable(before, study.resume_view(rbg), "w", study.RESUMABLE_CHANGES)
  with pytest.raises(ValueError, match=r"--dropout_rng_impl 'rbg' -> 'threefry'"):
    run_lib.check_resumable(before, study.resume_view(cfg), "w", study.RESUMABLE_CHANGES)
  # A run stored under the setting's first name, --dropout_rng, resumes under the new one
  # with the same value, and is refused under another.
  named_before = {("dropout_rng" if k == "dropout_rng_impl" else k): v
                  for k, v in study.resume_view(rbg).items()}
  assert "dropout_rng" in named_before and "dropout_rng_impl" not in named_before
  run_lib.check_resumable(named_before, study.resume_view(rbg), "w", study.RESUMABLE_CHANGES)
  with pytest.raises(ValueError, match=r"--dropout_rng_impl 'rbg' -> 'threefry'"):
    run_lib.check_resumable(named_before, study.resume_view(cfg), "w",
                            study.RESUMABLE_CHANGES)


def test_a_record_stored_as_per_task_lists_reads_as_one_record_per_task():
  """An older checkpoint's record (its per-task facts in parallel lists, stopped inside
  the second task) reads as a TaskRecord per task begun, and gives the same matrix."""
  old = {"task": 1, "step_in_task": 3, "global_step": 7, "rows": [[0.9, 0.1]],
         "task_rows": [[0.95, 0.6]], "val_rows": [], "train_seconds": [1.5, 0.25],
         "method_seconds": [0.5], "steps_per_task": [4], "trainable_parameters": [10],
         "state_bytes": [99], "inference_rows": [], "baseline": [0.5, 0.5],
         "curve": [], "warnings": [], "method_reports": []}
  record = study.RunRecord.from_json(old)
  assert [t.train_seconds for t in record.tasks] == [1.5, 0.25]
  assert record.tasks[0] == study.TaskRecord(
      train_seconds=1.5, steps=4, method_seconds=0.5, accuracy=[0.9, 0.1],
      task_aware_accuracy=[0.95, 0.6], trainable_parameters=10, state_bytes=99)
  assert record.ended("accuracy") == [[0.9, 0.1]] and record.ended("val_accuracy") == []
  assert study.RunRecord.from_json(record.to_json()) == record


def test_a_model_with_fewer_embeddings_than_the_tokenizer_has_tokens(argv, tmp_path):
  """Today's alternative: ids past the table read out NaN logits as accuracy."""
  torch = pytest.importorskip("torch")
  import transformers
  torch.manual_seed(0)
  small = {**TINY_HF, "vocab_size": 16, "pad_token_id": 15, "eos_token_id": 15,
           "bos_token_id": 15}
  folder = str(tmp_path / "small")
  transformers.GPT2ForSequenceClassification(transformers.GPT2Config(**small)).save_pretrained(
      folder)
  argv = [a for a in argv if not a.startswith(("--init", "--size"))]
  refused(tmp_path / "run", [*argv, f"--model={folder}"], "has 16 token embeddings",
          "tokens; use the model's own tokenizer")


def test_a_truncated_safetensors_file(torch_tiny, argv, tmp_path):
  folder = str(tmp_path / "truncated")
  shutil.copytree(torch_tiny[0], folder)
  weights = os.path.join(folder, "model.safetensors")
  with open(weights, "r+b") as f:
    f.truncate(os.path.getsize(weights) // 2)
  argv = [a for a in argv if not a.startswith(("--init", "--size"))]
  refused(tmp_path / "run", [*argv, f"--model={folder}"], "model.safetensors",
          "truncated", "download or export it again")


@pytest.mark.parametrize("files", [(), ("merges.txt",), ("tokenizer_config.json",)])
def test_a_tokenizer_folder_without_a_vocabulary(files, argv, tmp_path):
  folder = tmp_path / "tok"
  folder.mkdir()
  for name in files:
    (folder / name).write_text("{}")
  argv = [a for a in argv if not a.startswith("--tokenizer")]
  refused(tmp_path / "run", [*argv, f"--tokenizer={folder}"], "holds no tokenizer",
          "vocab.json and merges.txt", error=FileNotFoundError)


def _copy_data(src, dst):
  shutil.copytree(src, dst)
  return str(dst)


def test_a_non_utf8_byte_names_the_file_and_line(tiny_data_dir, argv, tmp_path):
  folder = _copy_data(tiny_data_dir, tmp_path / "data")
  path = os.path.join(folder, "imdb", "train.jsonl")
  with open(path, "rb") as f:
    lines = f.read().split(b"\n")
  lines[6] = lines[6][:12] + b"\xe9" + lines[6][12:]   # Latin-1 "e acute"
  with open(path, "wb") as f:
    f.write(b"\n".join(lines))
  argv = [a for a in argv if not a.startswith("--data_dir")]
  refused(tmp_path / "run", [*argv, f"--data_dir={folder}"],
          f"{path}:7: byte 0xe9 at column 13 is not UTF-8", "re-encode")


def test_a_utf8_byte_order_mark_is_accepted(tiny_data_dir, tmp_path):
  path = os.path.join(tiny_data_dir, "imdb", "train.jsonl")
  with open(path, "rb") as f:
    raw = f.read()
  for suffix in (".jsonl", ".csv"):
    bom = str(tmp_path / f"bom{suffix}")
    if suffix == ".csv":
      rows = data.read_rows(path)
      with open(bom, "w", encoding="utf-8-sig", newline="") as f:
        w = csv.writer(f)
        w.writerow(["text", "label"])
        w.writerows([(t, y) for t, y, _ in rows])
    else:
      with open(bom, "wb") as f:
        f.write(b"\xef\xbb\xbf" + raw)
    got = data.read_rows(bom)
    assert [r[:2] for r in got] == [r[:2] for r in data.read_rows(path)]


def test_a_training_set_of_one_class_is_a_warning(tiny_data_dir, tiny_tokenizer_dir,
                                                  tmp_path):
  """--subset=head takes the first rows of IMDb's label-sorted file: all negative."""
  fv = absl_flags.FlagValues()
  cljax_flags.define_flags(fv)
  fv(["prog", *tiny_argv(tiny_data_dir, tiny_tokenizer_dir, str(tmp_path / "c")),
      "--subset=head", "--tasks=imdb", "--num_train=8"])
  s = study.setup(cljax_flags.study_config(fv), str(tmp_path / "run"))
  assert len(s.warnings) == 1
  assert "Task imdb: its 8 training examples are all of class 'neg'" in s.warnings[0]
  _, record = study.start(s)
  assert record.warnings == list(s.warnings)   # and so results.json's "warnings"
  s.checkpointer.close()


def test_a_corrupted_tokenization_cache_is_rebuilt(tiny_tokenizer, tmp_path, caplog):
  texts = ["good movie", "bad plot and the acting was dull"]
  ids, mask = data.tokenize(texts, tiny_tokenizer, 8, cache_dir=str(tmp_path))
  path, = [tmp_path / n for n in os.listdir(tmp_path)]
  for damage in (path.read_bytes()[:40], b"not a zip file"):
    path.write_bytes(damage)
    with caplog.at_level("WARNING"):
      again, again_mask = data.tokenize(texts, tiny_tokenizer, 8, cache_dir=str(tmp_path))
    np.testing.assert_array_equal(again, ids)
    np.testing.assert_array_equal(again_mask, mask)
    assert "is unreadable" in caplog.text and "rebuilding it" in caplog.text
    caplog.clear()
    with np.load(path) as f:   # rewritten whole
      np.testing.assert_array_equal(f["input_ids"], ids)


def _program(argv, **kwargs):
  return subprocess.run([sys.executable, os.path.join(ROOT, "experiments", "forgetting.py"),
                         *argv], capture_output=True, text=True, timeout=600,
                        env={**os.environ, "JAX_PLATFORMS": "cpu"}, **kwargs)


def test_the_program_says_it_in_one_line_with_exit_status_1(argv, tmp_path):
  workdir = tmp_path / "run"
  proc = _program([f"--workdir={workdir}", *argv, "--batch_size=0"])
  assert proc.returncode == 1
  errors = [line for line in proc.stderr.splitlines() if line.startswith("E")]
  assert len(errors) == 1 and errors[0].endswith(
      "ValueError: --batch_size=0: expected a value > 0."), proc.stderr
  assert "Traceback" not in proc.stderr and not workdir.exists()
  proc = _program([f"--workdir={workdir}", *argv, "--fisher=bogus"])
  assert proc.returncode == 1 and "--fisher=bogus: value should be one of" in proc.stderr
  assert "Traceback" not in proc.stderr and not workdir.exists()


def test_freezing_the_score_head_is_refused_without_one(argv, tmp_path):
  refused(tmp_path / "run", [*argv, "--head=lm", "--method=freeze",
                             "--label_words=imdb=bad,good", "--label_words=ag_news=chip,goal"],
          "--freeze=head", "--head=lm has none", "--freeze=last_k")
