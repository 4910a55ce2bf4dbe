"""Exact length bucketing: a batch cut to its bucket gives the same logits, losses and
gradients as the same batch at full length; the study compiles one program per
bucket and ends with the same matrices."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cljax import data as data_lib
from cljax import steps
from cljax.methods import BuildContext, build
from cljax.methods import regularizers
from cljax.methods import replay as replay_lib
from cljax.models import GPT2Classifier, GPT2Config, GPT2LabelWords, GPT2LM, init_params
from cljax.study.config import MethodConfig

from conftest import TINY_HF, padded_batch

PAD = TINY_HF["pad_token_id"]
T = 32
BUCKETS = data_lib.length_buckets(T, 8)
CTX = BuildContext(num_labels=4, num_tasks=2, max_length=T, n_layer=2, pad_token_id=PAD)


def _config(**kw):
  return GPT2Config(vocab_size=TINY_HF["vocab_size"], n_positions=T, n_embd=32, n_layer=2,
                    n_head=4, num_labels=4, pad_token_id=PAD, **kw)


def _batch(lengths=(13, 10, 3, 7, 1, 12), seed=0):
  ids, mask = padded_batch(list(lengths), T, TINY_HF["vocab_size"], PAD, seed=seed)
  n = len(lengths)
  rs = np.random.RandomState(seed)
  class_mask = np.zeros((n, 4), bool)
  class_mask[:, :2] = True
  return {"input_ids": ids, "attention_mask": mask,
          "labels": rs.randint(0, 2, n).astype(np.int32),
          "weights": np.array([1.0] * (n - 1) + [0.0], np.float32),
          "task_ids": np.zeros(n, np.int32), "class_mask": class_mask}


def _close(a, b, tol=1e-6):
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_allclose(np.asarray(x, np.float64), np.asarray(y, np.float64),
                               atol=tol, rtol=tol)


def test_buckets_are_multiples_up_to_max_length():
  assert data_lib.length_buckets(128, 32) == (32, 64, 96, 128)
  assert data_lib.length_buckets(100, 32) == (32, 64, 96, 100)
  assert data_lib.length_buckets(24, 32) == (24,)
  assert data_lib.length_buckets(128, 0) == (128,)


def test_a_batch_is_cut_to_the_smallest_bucket_holding_its_longest_row():
  batch = _batch((13, 10, 3))
  cut = data_lib.trim_to_bucket(batch, BUCKETS)
  assert cut["input_ids"].shape == (3, 16) and cut["attention_mask"].shape == (3, 16)
  assert cut["class_mask"].shape == (3, 4)   # not a sequence
  np.testing.assert_array_equal(cut["input_ids"], batch["input_ids"][:, :16])
  # An LM group (generative replay) sets the length too: its rows are longer.
  lm = dict(batch, lm_input_ids=batch["input_ids"], lm_attention_mask=np.zeros((3, T), int),
            lm_loss_mask=np.zeros((3, T), np.float32))
  lm["lm_loss_mask"][1, 20] = 1.0
  assert data_lib.row_lengths(lm).tolist() == [13, 21, 3]
  assert data_lib.trim_to_bucket(lm, BUCKETS)["lm_loss_mask"].shape == (3, 24)
  assert data_lib.trim_to_bucket(_batch((32, 1)), BUCKETS)["input_ids"].shape == (2, 32)
  with pytest.raises(ValueError, match="longer than the largest length bucket 16"):
    data_lib.trim_to_bucket(_batch((20,)), (8, 16))


def test_sorting_by_length_is_stable_and_batches_take_small_buckets():
  arrays = _batch((13, 2, 30, 2, 5, 9))
  arrays["labels"] = np.arange(6, dtype=np.int32)
  ordered = data_lib.sort_by_length(arrays)
  assert ordered["labels"].tolist() == [1, 3, 4, 5, 0, 2]
  widths = [b["input_ids"].shape[1]
            for b in data_lib.batches(ordered, 2, buckets=BUCKETS)]
  assert widths == [8, 16, 32]


@pytest.mark.parametrize("head", ["score", "lm"])
def test_bucketed_logits_loss_and_gradients_equal_full_length(head):
  config = _config()
  model = GPT2Classifier(config) if head == "score" else GPT2LabelWords(config, (5, 6, 7, 8))
  params = init_params(model, jax.random.PRNGKey(0))
  full = _batch()
  cut = data_lib.trim_to_bucket(full, BUCKETS)
  assert cut["input_ids"].shape[1] == 16

  def loss(p, b):
    logits = steps.forward(model, p, b, deterministic=True)
    return steps.classification_objective(logits, b)[0], logits

  grad_fn = jax.jit(jax.value_and_grad(loss, has_aux=True))
  (l_full, z_full), g_full = grad_fn(params, full)
  (l_cut, z_cut), g_cut = grad_fn(params, cut)
  _close(z_full, z_cut)
  _close(l_full, l_cut)
  _close(g_full, g_cut)


def test_bucketed_language_model_loss_and_gradients_equal_full_length():
  lm = GPT2LM(_config())
  params = init_params(lm, jax.random.PRNGKey(1))
  full = _batch()
  full["loss_mask"] = full["attention_mask"].astype(np.float32)
  cut = data_lib.trim_to_bucket(full, BUCKETS)

  def loss(p, b):
    logits = lm.apply({"params": p}, b["input_ids"], b["attention_mask"])
    s, n, _ = steps.lm_cross_entropy(logits, b["input_ids"], b["loss_mask"])
    return s / n

  grad_fn = jax.jit(jax.value_and_grad(loss))
  _close(grad_fn(params, full), grad_fn(params, cut))


@pytest.mark.parametrize("method", ["replay", "derpp", "er_ace"])
def test_a_bucketed_batch_mixes_with_full_length_replay_exactly(method):
  """The buffer stores rows at max_length: the bucketed batch is padded back up inside
  the step, so the step, its loss and the buffer it writes are the same."""
  model = GPT2Classifier(_config())
  params = init_params(model, jax.random.PRNGKey(2))
  m = build(method, MethodConfig(replay_batch_size=3), CTX)
  tx = steps.make_optimizer(learning_rate=1e-3, total_steps=10)[0]
  state = steps.init_train_state(params, tx, jax.random.PRNGKey(3), m)
  step = jax.jit(functools.partial(steps.train_step, model=model, tx=tx, method=m,
                                   deterministic=True))
  state, _ = step(state, _batch((30, 20, 25, 9, 31, 12), seed=5))  # fills the buffer
  full = _batch(seed=6)
  a, ma = step(state, full)
  b, mb = step(state, data_lib.trim_to_bucket(full, BUCKETS))
  _close((a.params, a.method_state, ma["loss_sum"]), (b.params, b.method_state, mb["loss_sum"]))


@pytest.mark.parametrize("stat", ["fisher", "mas"])
def test_bucketed_fisher_and_mas_equal_full_length(stat):
  model = GPT2Classifier(_config())
  params = init_params(model, jax.random.PRNGKey(4))
  arrays = data_lib.concat([_batch(seed=7), _batch((4, 5, 6, 2, 9, 11), seed=8)])
  fn = regularizers.fisher_diagonal if stat == "fisher" else regularizers.mas_importance
  kw = dict(num_samples=12, chunk=4, rng=jax.random.PRNGKey(5))
  _close(fn(model, params, arrays, **kw), fn(model, params, arrays, buckets=BUCKETS, **kw))


def test_the_replay_buffer_refuses_rows_of_another_width():
  buf = replay_lib.init(4, T, 4)
  with pytest.raises(ValueError, match="widen"):
    replay_lib.add(buf, jax.tree.map(jnp.asarray, data_lib.trim_to_bucket(_batch(),
                                                                            BUCKETS)),
                   jax.random.PRNGKey(0))


def _run_stages(cfg, workdir):
  """The study's stages (as ``study.run``), returning the Study to inspect."""
  from cljax import study
  from cljax.train.progress import StepLogger, Writers
  s = study.setup(cfg, workdir)
  state, record = study.start(s)
  logger = StepLogger(Writers(workdir, enabled=False), cfg.log_every, lambda: None)
  for k in range(len(s.tasks)):
    state, plan = study.start_task(s, k, state, record)
    state = study.train_task(s, plan, state, record, logger)
    state = study.finish_task(s, plan, state, record, logger)
  logger.close()
  s.checkpointer.close()
  return s, record


@pytest.mark.slow
def test_a_bucketed_study_compiles_once_per_bucket_and_ends_with_the_same_matrices(
    tiny_data_dir, tiny_tokenizer_dir, tmp_path):
  from test_study import tiny_config
  runs = {}
  for bucket in (0, 8):
    cfg = tiny_config(tiny_data_dir, tiny_tokenizer_dir, length_bucket=bucket,
                      method="ewc+replay",
                      method_config=MethodConfig(replay_size=8, replay_batch_size=2,
                                                 fisher_samples=16))
    runs[bucket] = _run_stages(cfg, str(tmp_path / str(bucket)))
  s, record = runs[8]
  assert s.buckets == (8, 16, 24)
  train_fns = list(s.train_steps.values())
  assert train_fns and all(1 <= f._cache_size() <= 3 for f in train_fns)
  assert 2 <= s.eval_fn._cache_size() <= 3     # sorted evaluation: several buckets
  assert runs[0][0].eval_fn._cache_size() == 1
  for matrix in ("accuracy", "task_aware_accuracy"):
    np.testing.assert_array_equal(record.ended(matrix), runs[0][1].ended(matrix))


def test_one_batch_per_shape_keeps_the_first_of_each_bucket():
  arrays = {k: v for k, v in _batch(lengths=(3, 30, 5, 20, 2, 4, 31, 1)).items()
            if k in ("input_ids", "attention_mask", "labels")}
  got = data_lib.one_batch_per_shape(data_lib.batches(arrays, 2, buckets=BUCKETS))
  # rows in pairs: (3, 30) -> 32, (5, 20) -> 24, (2, 4) -> 8, (31, 1) -> 32
  assert [b["input_ids"].shape[1] for b in got] == [32, 24, 8]
  np.testing.assert_array_equal(got[0]["labels"], arrays["labels"][:2])


def test_compile_ahead_compiles_every_shape_once_and_the_calls_compile_nothing():
  from cljax.train.progress import CompileTimer
  fn = jax.jit(lambda x: jnp.tanh(x @ x.T).sum())
  args = [(np.ones((n, 4), np.float32),) for n in (2, 3, 5)]
  with CompileTimer() as ahead:
    steps.compile_ahead(fn, args)
    steps.compile_ahead(fn, args)   # already compiled: nothing again
  with CompileTimer() as calls:
    got = [float(fn(*a)) for a in args]
  # built (compiled, or loaded where an earlier test left the persistent cache on) once
  assert ahead.programs + ahead.loaded == 3 and calls.programs + calls.loaded == 0
  np.testing.assert_allclose(got, [float(jnp.tanh(a @ a.T).sum()) for (a,) in args],
                             rtol=1e-6)
