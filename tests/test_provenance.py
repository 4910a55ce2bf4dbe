"""A pretrained base never saw a row the study trains, validates or tests on: the fixed
part of a file LM pretraining keeps (by content), the keys its model folder lists,
the study leaving them out; and streams of several tasks of one dataset, each task
drawing the same rows in every order."""

import glob
import hashlib
import json
import os
import re
import shlex
import shutil
import subprocess

from absl import flags as absl_flags
import pytest
import safetensors.numpy

from cljax import data as data_lib
from cljax.cli import flags as cljax_flags
from cljax.lm import data as lm_data
from cljax.lm import train as lm_train
from cljax.study import results
from conftest import SHARED

PRESETS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                       "experiments", "presets")


def _key(text):   # by hand, not through cljax
  return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def _write(path, texts):
  with open(path, "w") as f:
    f.writelines(json.dumps({"text": t, "label": i % 2}) + "\n" for i, t in enumerate(texts))
  return str(path)


def test_the_pretraining_part_is_chosen_by_content(tmp_path):
  texts = [f"review number {i} of a film" for i in range(2000)]
  a = _write(tmp_path / "a.jsonl", texts)
  b = _write(tmp_path / "b.jsonl", texts[::-1])   # the same rows, another order
  part = {r["text"] for r, _ in lm_data.read_part(a, (0.3,), "text")}
  assert part == {r["text"] for r, _ in lm_data.read_part(b, (0.3,), "text")}
  assert part == {t for t in texts if int(_key(t), 16) < 0.3 * 16 ** 16}
  assert 500 < len(part) < 700
  assert len(lm_data.read_part(a, (1.0,), "text")) == 2000
  both = lm_data.read_part(f"{a},{b}", (0.3, 1.0), "text")
  assert len(both) == len(part) + 2000
  with pytest.raises(ValueError, match="--data_fraction has 3 values for 2 --data sources"):
    lm_data.read_part(f"{a},{b}", (0.1, 0.2, 0.3), "text")
  with pytest.raises(ValueError, match=r"--data_fraction=1.5: expected a fraction in \(0, 1\]"):
    lm_train.LMConfig(data=a, data_fraction=(1.5,))


def test_resolve_tasks_takes_several_tasks_of_one_dataset(tiny_data_dir):
  tasks = data_lib.resolve_tasks(["imdb", "ag_news:sci_tech+sports", "ag_news:world+business"],
                                 data_dir=tiny_data_dir)
  assert [t.dataset for t in tasks] == ["imdb", "ag_news", "ag_news"]
  assert [t.head_labels for t in tasks] == [(0, 1), (2, 3), (4, 5)]
  assert tasks[1].label_map == {3: 2, 1: 3} and tasks[2].label_map == {0: 4, 2: 5}
  with pytest.raises(ValueError, match=r"classes \['sports'\] of ag_news are in an earlier"):
    data_lib.resolve_tasks(["ag_news:sci_tech+sports", "ag_news:sports+world"])
  with pytest.raises(ValueError, match="expected DATASET or DATASET:CLASS"):
    data_lib.resolve_tasks(["ag_news:"])
  with pytest.raises(ValueError, match="names its classes; drop --classes"):
    data_lib.resolve_tasks(["ag_news:world"], classes={"ag_news:world": ["sports"]})


def test_a_task_draws_the_same_rows_in_every_order(tiny_data_dir):
  names = ["imdb", "ag_news:sci_tech+sports", "ag_news:world+business"]
  drawn = {}
  for order in (names, names[1:] + names[:1], names[2:] + names[:2]):
    for task in data_lib.resolve_tasks(order, data_dir=tiny_data_dir):
      sub = data_lib.task_subsets(task, data_dir=tiny_data_dir, num_train=20, num_test=10,
                                  num_val=6, seed=3)
      texts = tuple(sub.train_rows[i][0] for i in sub.train + sub.val + [-1]) + tuple(
          sub.test_rows[i][0] for i in sub.test)
      assert drawn.setdefault(task.name, texts) == texts
  assert len(set(drawn.values())) == 3


def test_the_study_leaves_out_what_its_base_was_trained_on(tiny_data_dir, tiny_tokenizer):
  tasks = data_lib.resolve_tasks(["imdb", "ag_news"], data_dir=tiny_data_dir)
  rows = data_lib.load_rows(tasks[0], "train", tiny_data_dir)
  test_rows = data_lib.load_rows(tasks[0], "test", tiny_data_dir)
  seen = {_key(t) for t, _, _ in rows[::3]} | {_key(test_rows[0][0])}
  for task in tasks:
    sub = data_lib.task_subsets(task, data_dir=tiny_data_dir, num_train=None, num_test=None,
                                seed=0, exclude_keys=frozenset(seen))
    drawn = ([sub.train_rows[i][0] for i in sub.train + sub.val] +
             [sub.test_rows[i][0] for i in sub.test])
    assert not {_key(t) for t in drawn} & seen
    if task.name == "imdb":
      assert sub.excluded == {"train": len(rows[::3]), "test": 1}
      assert len(sub.train) == len(rows) - len(rows[::3])
    else:
      assert sub.excluded == {"train": 0, "test": 0}
  data = data_lib.load_task_data(tasks, tiny_tokenizer, data_dir=tiny_data_dir,
                                 num_train=None, num_test=None, max_length=16,
                                 exclude_keys=frozenset(seen))
  assert data[0].excluded == {"train": len(rows[::3]), "test": 1}


@pytest.mark.slow
def test_pretraining_lists_its_texts_and_a_study_from_it_draws_none(
    tiny_data_dir, tiny_tokenizer_dir, tmp_path):
  """End to end: LM pretraining on the fixed half of a training file, one of its rows
  also in --eval_data; the exported folder lists exactly the texts trained on (counted
  by hand); a study started from the folder reports them left out and draws none."""
  from cljax import study
  from cljax.study.config import StudyConfig
  train = os.path.join(tiny_data_dir, "imdb", "train.jsonl")
  texts = [json.loads(line)["text"] for line in open(train)]
  half = [t for t in texts if int(_key(t), 16) < 0.5 * 16 ** 16]
  held = _write(tmp_path / "held.jsonl", [half[0], "the movie was really good " * 8])
  workdir = str(tmp_path / "lm")
  lm_train.run(lm_train.LMConfig(
      data=train, data_fraction=(0.5,), eval_data=held, data_format="text",
      tokenizer=tiny_tokenizer_dir, init="random", size="tiny", block_size=16,
      batch_size=4, eval_batch_size=4, epochs=1, dropout=0.0, checkpoint_every=0,
      max_new_tokens=4), workdir)
  with open(os.path.join(workdir, "hf_model", "pretraining_texts.json")) as f:
    listed = json.load(f)
  assert set(listed["text_keys"]) == {_key(t) for t in half[1:]}
  assert listed["about"]["data_fraction"] == [0.5]
  assert re.fullmatch(r"[0-9a-f]{40}(-dirty)?", listed["about"]["commit"] or "0" * 40)
  results = study.run(StudyConfig(
      init="pretrained", model=os.path.join(workdir, "hf_model"), data_dir=tiny_data_dir,
      tokenizer=tiny_tokenizer_dir, num_train=len(texts) - len(half) - 3, num_test=-1,
      num_val=4, max_length=32, batch_size=8, epochs=1, checkpoint_every=0),
      str(tmp_path / "study"))
  imdb = results["data"]["imdb"]
  assert imdb["left_out_as_pretraining_text"] == {"train": len(half) - 1, "test": 0}
  # The run names the weights it started from: the sha256sum of the exported file.
  with open(os.path.join(workdir, "hf_model", "model.safetensors"), "rb") as f:
    assert results["model"]["source_sha256"] == hashlib.sha256(f.read()).hexdigest()
  assert (imdb["train"], imdb["val"]) == (len(texts) - len(half) - 3, 4)
  assert results["data"]["ag_news"]["left_out_as_pretraining_text"] == {"train": 0, "test": 0}
  # A run stopped part way resumes only on the weights it started from.
  base = tmp_path / "base"
  shutil.copytree(os.path.join(workdir, "hf_model"), base)
  cut = StudyConfig(init="pretrained", model=str(base), data_dir=tiny_data_dir,
                    tokenizer=tiny_tokenizer_dir, num_train=24, num_test=8, max_length=32,
                    batch_size=8, epochs=1, checkpoint_every=1, tasks=("imdb",))
  with pytest.raises(study.Interrupted):
    study.run(cut.replace(stop_after_steps=2), str(tmp_path / "cut"))
  started = (base / "model.safetensors").read_bytes()
  weights = safetensors.numpy.load_file(str(base / "model.safetensors"))
  name = sorted(weights)[0]
  weights[name] = weights[name] + 1e-3
  safetensors.numpy.save_file(weights, str(base / "model.safetensors"))
  with pytest.raises(ValueError, match=r"^Cannot resume .*cut: it started from weights "
                                       r"SHA-256 [0-9a-f]{12}, and --model=.*base now holds"):
    study.run(cut, str(tmp_path / "cut"), resume=True)
  (base / "model.safetensors").write_bytes(started)
  resumed = study.run(cut, str(tmp_path / "cut"), resume=True)
  assert resumed["model"]["source_sha256"] == hashlib.sha256(started).hexdigest()
  # Asking for one row more than is left is one clear line.
  with pytest.raises(ValueError, match="imdb: no validation rows left to draw"):
    study.run(StudyConfig(
        init="pretrained", model=os.path.join(workdir, "hf_model"), data_dir=tiny_data_dir,
        tokenizer=tiny_tokenizer_dir, num_train=len(texts) - len(half) + 1, num_val=4),
        str(tmp_path / "study2"))


# ----------------------------------------------------------------------------
# The shipped presets, on the real data
# ----------------------------------------------------------------------------

def _preset_flags(path, seen=()):
  """A flagfile's flags, nested --flagfile lines expanded (later wins), as a dict."""
  out = {}
  for line in open(path):
    line = line.strip()
    if not line or line.startswith("#"):
      continue
    name, eq, value = line[2:].partition("=")
    if name == "flagfile":
      out.update(_preset_flags(os.path.join(os.path.dirname(PRESETS), "..", value), seen))
    else:
      out[name] = value if eq else "true"   # a bare --flag is a boolean set true
  return out


def _studies_from_the_base():
  """(preset, its flags) of every preset that starts from the pretrained mini base."""
  out = []
  for path in sorted(glob.glob(os.path.join(PRESETS, "*.flags"))):
    flags = _preset_flags(path)
    if flags.get("model", "").endswith("pretrain_mini/hf_model"):
      out.append((os.path.basename(path), flags))
  return out


@pytest.mark.skipif(not os.path.isdir(os.path.join(SHARED, "data")),
                    reason="needs the project's shared data beside the repository")
def test_no_pretraining_text_is_in_any_study_row_of_the_presets(monkeypatch):
  """The texts pretrain_mini.flags trains on (computed from its flags, no model
  needed) against every training, validation and test row of every preset that
  starts from its model, for seeds 0-4, the sweeps' seeds (the strength-selection
  seed too) and the stream's three orders; the presets also get every row they ask
  for from what is left."""
  root = os.path.dirname(PRESETS)
  monkeypatch.chdir(os.path.join(root, ".."))
  lm_flags = _preset_flags(os.path.join(PRESETS, "pretrain_mini.flags"))
  cfg = lm_train.LMConfig(data=lm_flags["data"], eval_data=lm_flags["eval_data"],
                          data_format="text", num_eval=int(lm_flags["num_eval"]),
                          data_fraction=tuple(lm_flags["data_fraction"].split(",")))
  corpus = {r["text"] for r, _ in lm_train.records(cfg)[0]}
  assert len(corpus) > 6000
  keys = frozenset(_key(t) for t in corpus)
  # A task draws the same rows in every order of the stream (its rows are seeded by
  # its dataset and classes: test_a_task_draws_the_same_rows_in_every_order), so each
  # (task, sizes, seed) is drawn once for every order and preset that asks for it.
  checked, drawn_by = 0, {}
  for name, flags in _studies_from_the_base():
    fv = absl_flags.FlagValues()
    cljax_flags.define_flags(fv)
    fv(["prog"] + [f"--{k}={v}" for k, v in flags.items()
                   if k in fv])
    study_cfg = cljax_flags.study_config(fv)
    seeds = set(range(5)) | {int(x) for x in flags.get("seeds", "0").split(",")} | (
        {int(flags["selection_seed"])} if "selection_seed" in flags else set())
    sizes = (study_cfg.data_dir, study_cfg.num_train, study_cfg.num_test, study_cfg.num_val,
             study_cfg.subset)
    for task in data_lib.resolve_tasks(study_cfg.tasks, study_cfg.task_classes(),
                                       study_cfg.data_dir):
      for seed in sorted(seeds):
        drawn_by.setdefault((task.name, task.class_names, sizes, seed), (name, task))
  for (_, _, sizes, seed), (name, task) in drawn_by.items():
    data_dir, num_train, num_test, num_val, subset = sizes
    sub = data_lib.task_subsets(task, data_dir=data_dir, num_train=num_train,
                                num_test=num_test, num_val=num_val, subset=subset, seed=seed,
                                exclude_keys=keys)
    drawn = ([sub.train_rows[i][0] for i in sub.train + sub.val] +
             [sub.test_rows[i][0] for i in sub.test])
    assert not set(drawn) & corpus, (name, task.name, seed)
    assert (len(sub.train), len(sub.test), len(sub.val)) == (num_train, num_test, num_val), (
        name, task.name)
    checked += 1
  assert checked >= 3 * 5, shlex.join(n for n, _ in _studies_from_the_base())


# ----------------------------------------------------------------------------
# The code a run ran: its git commit in results.json
# ----------------------------------------------------------------------------

def _git(cwd, *args):
  return subprocess.run(["git", "-C", str(cwd), *args], capture_output=True, text=True,
                        check=True).stdout.strip()


def test_a_run_records_the_commit_of_the_cljax_checkout_it_imported(tmp_path):
  """results.json's environment names the commit of the cljax checkout (and whether
  the package differs from it); a package in no checkout of cljax records None."""
  repo = tmp_path / "repo"
  (repo / "cljax").mkdir(parents=True)
  (repo / "cljax" / "__init__.py").write_text("x = 1\n")
  (repo / "README.md").write_text("readme\n")
  _git(repo, "init", "-q")
  _git(repo, "add", ".")
  _git(repo, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "c")
  head = _git(repo, "rev-parse", "HEAD")
  assert results.code_version(str(repo / "cljax")) == {"commit": head, "modified": False}
  (repo / "README.md").write_text("edited\n")   # outside the package: not its code
  assert results.code_version(str(repo / "cljax"))["modified"] is False
  (repo / "cljax" / "new.py").write_text("y = 2\n")
  assert results.code_version(str(repo / "cljax")) == {"commit": head, "modified": True}
  (repo / "other" / "cljax").mkdir(parents=True)   # inside some other repository
  assert results.code_version(str(repo / "other" / "cljax")) is None
  (tmp_path / "wheel" / "cljax").mkdir(parents=True)   # in no repository
  assert results.code_version(str(tmp_path / "wheel" / "cljax")) is None
