"""The baselines the benchmarks time: the seed's Trainer script sees the rows cljax
trains and tests on, tokenized the same way, and runs the study."""

import sys

import numpy as np
import pytest

from cljax import data as data_lib
from cljax.bench import baselines
from cljax.models import hf
from cljax.study.config import StudyConfig


def _config(data_dir, tokenizer_dir, **kw):
  return StudyConfig(tasks=("imdb", "ag_news"), data_dir=data_dir, tokenizer=tokenizer_dir,
                     init="random", size="tiny", num_train=16, num_test=8, max_length=24,
                     batch_size=8, eval_batch_size=8, epochs=1, learning_rate=1e-3, **kw)


@pytest.mark.parametrize("use_datasets", [True, False])
def test_the_trainer_script_sees_cljaxs_rows_and_tokens(tiny_data_dir, tiny_tokenizer_dir,
                                                        use_datasets):
  cfg = _config(tiny_data_dir, tiny_tokenizer_dir)
  tokenizer = hf.load_tokenizer(tiny_tokenizer_dir)
  tasks = data_lib.resolve_tasks(cfg.tasks, cfg.task_classes(), cfg.data_dir)
  ours = data_lib.load_task_data(tasks, tokenizer, data_dir=cfg.data_dir,
                                 num_train=cfg.num_train, num_test=cfg.num_test,
                                 max_length=cfg.max_length, seed=cfg.seed)
  theirs, path = baselines._trainer_datasets(cfg, tasks, tokenizer, use_datasets)
  assert path == ("datasets.map" if use_datasets else "list")
  for d, splits in zip(ours, theirs):
    for arrays, ds in zip((d.train, d.test), splits):
      for key, want in (("input_ids", "input_ids"), ("attention_mask", "attention_mask"),
                        ("label", "labels")):
        np.testing.assert_array_equal(np.array([row[key] for row in ds]), arrays[want])


@pytest.mark.slow
@pytest.mark.parametrize("has_datasets,arch", [(True, "gpt2"), (False, "gpt2"),
                                              (True, "llama")])
def test_the_trainer_script_runs_the_study(tiny_data_dir, tiny_tokenizer_dir, tmp_path,
                                           monkeypatch, has_datasets, arch):
  pytest.importorskip("accelerate")
  if not has_datasets:   # a machine without the package: the same rows from a list
    monkeypatch.setitem(sys.modules, "datasets", None)
  out = baselines.trainer_study(_config(tiny_data_dir, tiny_tokenizer_dir, arch=arch),
                                str(tmp_path))
  assert out["trainer_data"] == ("datasets.map" if has_datasets else "list")
  assert out["trainer_model"] == {"gpt2": "GPT2", "llama": "Llama"}[arch] + (
      "ForSequenceClassification")
  matrix = np.array(out["trainer_accuracy_matrix"])
  assert matrix.shape == (2, 2) and ((0 <= matrix) & (matrix <= 1)).all()
  assert out["trainer_wall_seconds"] > out["trainer_train_and_eval_seconds"] > 0


def test_train_flops_count_each_family_s_block_kernels():
  """6N per token (N: the blocks' projection weights) plus attention's 12 L T^2 H d_head,
  checked against the closed forms: GPT-2's 4 D^2 + 2 D inner per block, and a
  grouped-query Llama's q, o (D x D), k, v (D x D/2 with 2 of 4 heads) and three MLP
  matrices."""
  from cljax.bench import throughput
  T = 16
  gpt2 = throughput.bench_config("gpt2", "tiny")
  D, L, inner = gpt2.n_embd, gpt2.n_layer, gpt2.inner_dim
  assert throughput.train_flops_per_example(gpt2, T) == (
      6 * L * (4 * D * D + 2 * D * inner) * T + 12 * L * T * T * D)
  llama = throughput.bench_config("llama", "tiny")
  D, L, inner = llama.n_embd, llama.n_layer, llama.inner_dim
  assert llama.kv_heads * 2 == llama.n_head
  per_block = 2 * D * D + 2 * D * (D // 2) + 3 * D * inner
  assert throughput.train_flops_per_example(llama, T) == (
      6 * L * per_block * T + 12 * L * T * T * D)
