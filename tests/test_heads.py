"""The class-incremental head fixes: labels trick, ER-ACE, weight aligning."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from cljax import data as data_lib
from cljax import steps
from cljax.methods import BuildContext, MethodConfig, StepContext, TaskContext, build, replay
from cljax.methods import head_fixes
from cljax.models import GPT2Classifier, GPT2Config, init_params

CTX = BuildContext(num_labels=4, num_tasks=2, max_length=8, n_layer=1, pad_token_id=49)
TASKS = (data_lib.Task("a", (0, 1), ("n", "p"), 0), data_lib.Task("b", (0, 1), ("x", "y"), 2))


def _log_softmax(z):
  z = z - z.max(-1, keepdims=True)
  return z - np.log(np.exp(z).sum(-1, keepdims=True))


def _batch(labels, task_classes, seed=0, T=8):
  """A batch of random token rows of the given labels, every row of one task."""
  rs = np.random.RandomState(seed)
  n = len(labels)
  class_mask = np.zeros((n, 4), bool)
  class_mask[:, list(task_classes)] = True
  return {k: jnp.asarray(v) for k, v in {"input_ids": rs.randint(0, 40, (n, T)).astype(np.int32),
          "attention_mask": np.ones((n, T), np.int32),
          "labels": np.asarray(labels, np.int32), "weights": np.ones(n, np.float32),
          "class_mask": class_mask, "task_ids": np.ones(n, np.int32)}.items()}


@pytest.fixture(scope="module")
def tiny():
  config = GPT2Config(vocab_size=50, n_positions=16, n_embd=16, n_layer=1, n_head=2,
                      num_labels=4, pad_token_id=49, eos_token_id=49)
  model = GPT2Classifier(config)
  return model, init_params(model, jax.random.PRNGKey(0))


def _sgd_step(model, params, method, batch):
  """One plain-SGD step (lr 1, no clipping): the params move by minus the gradient."""
  tx = optax.sgd(1.0)
  state = steps.init_train_state(params, tx, jax.random.PRNGKey(1), method)
  new, metrics = jax.jit(lambda s, b: steps.train_step(s, b, model=model, tx=tx,
                                                       method=method, deterministic=True)
                         )(state, batch)
  return new, metrics


# ----------------------------------------------------------------------------
# Labels trick
# ----------------------------------------------------------------------------

def test_labels_trick_gives_other_tasks_head_rows_exactly_zero_gradient(tiny):
  model, params = tiny
  batch = _batch([2, 3, 3, 2], (2, 3))
  trick = build("labels_trick", MethodConfig(), CTX)
  new, metrics = _sgd_step(model, params, trick, batch)
  before, after = np.asarray(params["score"]["kernel"]), np.asarray(new.params["score"]["kernel"])
  np.testing.assert_array_equal(after[:, :2], before[:, :2])      # the other task's rows
  assert np.abs(after[:, 2:] - before[:, 2:]).max() > 1e-4         # the task's own rows
  # The loss is the CE of a softmax over the task's two classes, by hand.
  logits = np.asarray(model.apply({"params": params}, batch["input_ids"]))
  expected = -_log_softmax(logits[:, 2:])[np.arange(4), batch["labels"] - 2].mean()
  assert float(metrics["loss_sum"] / metrics["count"]) == pytest.approx(expected, rel=1e-5)
  # Without the trick those rows do move: the test above can fail.
  plain, _ = _sgd_step(model, params, build("finetune", MethodConfig(), CTX), batch)
  assert np.abs(np.asarray(plain.params["score"]["kernel"])[:, :2] - before[:, :2]).max() > 1e-4


@pytest.mark.parametrize("spec", ["labels_trick+replay", "replay+labels_trick"])
def test_labels_trick_leaves_replayed_rows_every_class(spec):
  method = build(spec, MethodConfig(replay_size=4, replay_batch_size=2), CTX)
  state = method.init(None)
  trick_i = spec.split("+").index("labels_trick")
  buf = replay.add(state[1 - trick_i], _batch([0, 1], (0, 1)), jax.random.PRNGKey(0))
  state = tuple(buf if i != trick_i else s for i, s in enumerate(state))
  out = method.prepare_batch(state, StepContext(batch=_batch([2, 3, 2], (2, 3)),
                                                rng=jax.random.PRNGKey(2)))
  exclude = np.asarray(out[head_fixes.EXCLUDE])
  assert exclude.shape == (5, 4)
  np.testing.assert_array_equal(exclude[:3], [[True, True, False, False]] * 3)
  assert not exclude[3:].any()   # replayed rows: a softmax over every class


# ----------------------------------------------------------------------------
# ER-ACE
# ----------------------------------------------------------------------------

def test_er_ace_masks_seen_classes_absent_from_the_incoming_batch():
  method = build("er_ace", MethodConfig(replay_size=4, replay_batch_size=2), CTX)
  state = method.init(None)
  stored = _batch([0, 1], (0, 1), seed=3)
  state = state._replace(buffer=replay.add(state.buffer, stored, jax.random.PRNGKey(0)))
  incoming = _batch([2, 2, 2], (2, 3))   # class 3 not present (and never seen)
  # Task 0 (no masking yet), then the second task with classes 0, 1 and 2 seen.
  first = method.prepare_batch(state, StepContext(batch=incoming, rng=jax.random.PRNGKey(1)))
  assert not np.asarray(first[head_fixes.EXCLUDE]).any()
  state = state._replace(seen=jnp.array([True, True, True, False]), task=jnp.int32(1))
  out = method.prepare_batch(state, StepContext(batch=incoming, rng=jax.random.PRNGKey(1)))
  exclude = np.asarray(out[head_fixes.EXCLUDE])
  np.testing.assert_array_equal(exclude[:3], [[True, True, False, False]] * 3)
  assert not exclude[3:].any()
  np.testing.assert_array_equal(np.asarray(out["weights"]), [1, 1, 1, 0, 0])

  # L = CE_in over classes {2, 3} + CE_buffer over all four, each a mean, by hand.
  logits = np.random.RandomState(4).randn(5, 4).astype(np.float32)
  labels = np.asarray(out["labels"])
  ce_in, _ = steps.classification_objective(jnp.asarray(logits), out)
  ce_buf, _ = method.loss(state, StepContext(batch=out, logits=jnp.asarray(logits)))
  hand_in = -_log_softmax(logits[:3, 2:])[np.arange(3), labels[:3] - 2].mean()
  hand_buf = -_log_softmax(logits[3:])[np.arange(2), labels[3:]].mean()
  assert float(ce_in) == pytest.approx(hand_in, rel=1e-5)
  assert float(ce_buf) == pytest.approx(hand_buf, rel=1e-5)
  assert set(labels[3:]) <= {0, 1}


def test_er_ace_stores_incoming_examples_and_marks_their_classes_seen(tiny):
  model, params = tiny
  method = build("er_ace", MethodConfig(replay_size=4, replay_batch_size=2), CTX)
  new, metrics = _sgd_step(model, params, method, _batch([2, 3, 2], (2, 3)))
  assert int(new.method_state.buffer.size) == 3
  np.testing.assert_array_equal(np.asarray(new.method_state.seen), [False, False, True, True])
  assert float(metrics["count"]) == 3   # the (empty) buffer's rows are not counted
  done = method.after_task(new.method_state, TaskContext())
  assert int(done.task) == 1


# ----------------------------------------------------------------------------
# Weight aligning
# ----------------------------------------------------------------------------

def test_weight_align_rescales_the_new_rows_to_the_old_mean_norm():
  rs = np.random.RandomState(0)
  kernel = rs.randn(6, 4).astype(np.float32) * np.array([1.0, 2.0, 5.0, 7.0], np.float32)
  params = {"h_0": {"w": jnp.ones(3)}, "score": {"kernel": jnp.asarray(kernel)}}
  method = build("weight_align", MethodConfig(), CTX)
  reports = []
  first = method.adjust_params((), TaskContext(task_index=0, params=params, tasks=TASKS))
  assert first is params                 # nothing to align after the first task
  out = method.adjust_params((), TaskContext(task_index=1, params=params, tasks=TASKS,
                                             report=reports.append))
  norms = np.linalg.norm(kernel, axis=0)
  gamma = norms[:2].mean() / norms[2:].mean()
  got = np.asarray(out["score"]["kernel"])
  np.testing.assert_array_equal(got[:, :2], kernel[:, :2])
  np.testing.assert_allclose(got[:, 2:], kernel[:, 2:] * gamma, rtol=1e-6)
  np.testing.assert_allclose(np.linalg.norm(got[:, 2:], axis=0).mean(), norms[:2].mean(),
                             rtol=1e-6)
  assert reports == [{"method": "weight_align", "gamma": pytest.approx(gamma, rel=1e-6)}]
  assert out["h_0"] is params["h_0"]


def test_weight_align_refuses_the_lm_head_in_one_line():
  with pytest.raises(ValueError, match="weight_align.*--head=lm.*--head=score"):
    build("weight_align", MethodConfig(), BuildContext(num_labels=4, num_tasks=2,
                                                       max_length=8, n_layer=1, head="lm"))
