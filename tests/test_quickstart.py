"""The quick start runs from a fresh clone alone, offline; its shipped data is intact."""

import collections
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest

from conftest import SHARED

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SAMPLE = os.path.join(ROOT, "data", "sample")
TOKENIZER = os.path.join(ROOT, "data", "gpt2-tokenizer")
PRESET = os.path.join(ROOT, "experiments", "presets", "smoke.flags")


def sha256(path):
  with open(path, "rb") as f:
    return hashlib.sha256(f.read()).hexdigest()


def listed_files(readme):
  """{file: (rows, {label: rows}, bytes, sha256)} from a README's files table."""
  with open(readme, encoding="utf-8") as f:
    text = f.read()
  out = {}
  for m in re.finditer(r"^\| `([^`]+)` \| ([\d,]+) \| ([^|]+) \| ([\d,]+) \| `([0-9a-f]{64})` \|$",
                       text, re.M):
    name, rows, per_label, size, digest = m.groups()
    labels = {int(k): int(v.replace(",", "")) for k, v in
              (item.split(":") for item in per_label.split("·"))}
    out[name] = (int(rows.replace(",", "")), labels, int(size.replace(",", "")), digest)
  return out


def test_the_sample_matches_its_readme():
  listed = listed_files(os.path.join(SAMPLE, "README.md"))
  on_disk = sorted(os.path.relpath(os.path.join(d, f), SAMPLE)
                   for d, _, files in os.walk(SAMPLE) for f in files if f.endswith(".jsonl"))
  assert sorted(listed) == on_disk == ["ag_news/test.jsonl", "ag_news/train.jsonl",
                                       "imdb/test.jsonl", "imdb/train.jsonl"]
  for name, (rows, per_label, size, digest) in listed.items():
    path = os.path.join(SAMPLE, name)
    assert sha256(path) == digest, name
    assert os.path.getsize(path) == size, name
    with open(path, "rb") as f:
      raw = f.read()
    lines = raw.split(b"\n")
    assert lines[-1] == b"" and all(lines[:-1]), name  # one object a line, newline-ended
    objects = [json.loads(line) for line in lines[:-1]]
    assert all(set(o) == {"text", "label"} and o["text"].strip() for o in objects), name
    # Written as the source is: json.dumps(row, ensure_ascii=False), UTF-8.
    assert [json.dumps(o, ensure_ascii=False).encode() for o in objects] == lines[:-1], name
    labels = [o["label"] for o in objects]
    assert len(labels) == rows and dict(collections.Counter(labels)) == per_label, name
    if name.startswith("imdb/"):
      assert labels == sorted(labels), name  # sorted by label, as the source is
    assert len(set(o["text"] for o in objects)) == rows, name
  total = sum(size for _, _, size, _ in listed.values())
  with open(os.path.join(SAMPLE, "README.md"), encoding="utf-8") as f:
    assert f"Total: {total:,} bytes." in f.read()


def test_the_tokenizer_matches_its_readme():
  with open(os.path.join(TOKENIZER, "README.md"), encoding="utf-8") as f:
    rows = re.findall(r"^\| `([^`]+)` \| ([\d,]+) \| `([0-9a-f]{64})` \|", f.read(), re.M)
  assert sorted(name for name, _, _ in rows) == sorted(
      f for f in os.listdir(TOKENIZER) if f != "README.md")
  for name, size, digest in rows:
    path = os.path.join(TOKENIZER, name)
    assert (os.path.getsize(path), sha256(path)) == (int(size.replace(",", "")), digest), name


def test_the_preset_reads_only_the_repository():
  with open(PRESET) as f:
    flags = [line.strip() for line in f if line.startswith("--")]
  assert "--data_dir=data/sample" in flags and "--tokenizer=data/gpt2-tokenizer" in flags
  assert not [f for f in flags if "shared" in f]
  # The subsets the preset asks for are in the sample (no "only N available" fallback).
  sizes = dict(f[2:].split("=", 1) for f in flags)
  listed = listed_files(os.path.join(SAMPLE, "README.md"))
  classes = {"imdb": (0, 1), "ag_news": (3, 1)}  # --ag_news_classes=sci_tech,sports
  assert sizes["ag_news_classes"] == "sci_tech,sports"
  for task, ids in classes.items():
    for split in ("train", "test"):
      available = sum(listed[f"{task}/{split}.jsonl"][1][c] for c in ids)
      assert int(sizes[f"num_{split}"]) <= available, (task, split)


SHARED_DATA = os.path.join(SHARED, "data")


@pytest.mark.skipif(not os.path.isdir(os.path.join(SHARED_DATA, "imdb")),
                    reason="needs the project's shared data beside the repository")
def test_make_sample_reproduces_the_sample(tmp_path):
  proc = subprocess.run([sys.executable, os.path.join(SAMPLE, "make_sample.py"), SHARED_DATA,
                         f"--out={tmp_path}"], capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  for name in ("README.md", "imdb/train.jsonl", "imdb/test.jsonl", "ag_news/train.jsonl",
               "ag_news/test.jsonl"):
    assert sha256(os.path.join(tmp_path, name)) == sha256(os.path.join(SAMPLE, name)), name


def repository_files():
  """The files a clone would hold, and the ones not yet committed that git does not
  ignore (the working tree as the lead will commit it)."""
  out = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard",
                        "-z"], cwd=ROOT, capture_output=True, check=True).stdout
  return [p for p in out.decode().split("\0") if p and os.path.isfile(os.path.join(ROOT, p))]


@pytest.mark.slow
def test_quick_start_runs_from_a_fresh_copy_offline(tmp_path):
  if shutil.which("git") is None or not os.path.isdir(os.path.join(ROOT, ".git")):
    pytest.skip("needs the repository's git metadata to list its files")
  clone = tmp_path / "clone"
  for rel in repository_files():
    dest = clone / rel
    dest.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy2(os.path.join(ROOT, rel), dest)
  assert not (tmp_path / "shared").exists() and not (clone / ".venv").exists()
  workdir = tmp_path / "run"
  argv = ["experiments/forgetting.py", "--flagfile=experiments/presets/smoke.flags",
          f"--workdir={workdir}", "--num_train=64", "--num_test=32", "--epochs=1"]
  # The script as `python experiments/forgetting.py ...` runs it (sys.path[0] is the
  # script's folder), after printing where cljax was imported from.
  driver = ("import os, runpy, sys; sys.path[0] = os.path.abspath('experiments'); "
            "import cljax; print('CLJAX_FROM', os.path.abspath(cljax.__file__), flush=True); "
            f"sys.argv = {argv!r}; runpy.run_path(sys.argv[0], run_name='__main__')")
  env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "PYTHON"))}
  env.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", JAX_PLATFORMS="cpu",
             PYTHONPATH=str(clone), TRANSFORMERS_OFFLINE="1",
             HF_HOME=str(tmp_path / "hf_home"))  # no hub cache to fall back on
  proc = subprocess.run([sys.executable, "-c", driver], cwd=clone, env=env,
                        capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
  imported = re.search(r"^CLJAX_FROM (.+)$", proc.stdout, re.M).group(1)
  assert imported == str(clone / "cljax" / "__init__.py")
  with open(workdir / "results.json") as f:
    r = json.load(f)
  m = np.array(r["accuracy_matrix"])
  assert m.shape == (2, 2) and ((0 <= m) & (m <= 1)).all()
  assert r["tasks"] == ["imdb", "ag_news"]
  assert r["flags"]["data_dir"] == "data/sample"
  assert r["flags"]["tokenizer"] == "data/gpt2-tokenizer"
  none_left_out = {"train": 0, "test": 0}      # a random init saw no text
  assert r["data"] == {
      "imdb": {"train": 64, "test": 32, "val": 0, "left_out_as_pretraining_text": none_left_out},
      "ag_news": {"train": 64, "test": 32, "val": 0,
                  "left_out_as_pretraining_text": none_left_out}}
  assert r["warnings"] == []
