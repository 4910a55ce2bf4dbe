"""The pure train and eval steps."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cljax import steps
from cljax.models import GPT2Classifier, GPT2Config, init_params

CONFIG = GPT2Config(vocab_size=97, n_positions=32, n_embd=32, n_layer=2, n_head=4,
                    num_labels=4, pad_token_id=96, eos_token_id=96)


def make_batch(seed, batch_size=4, seq_len=12, weights=None):
  rs = np.random.RandomState(seed)
  ids = rs.randint(0, 96, (batch_size, seq_len)).astype(np.int32)
  lengths = rs.randint(2, seq_len + 1, batch_size)
  mask = (np.arange(seq_len)[None] < lengths[:, None]).astype(np.int32)
  ids = np.where(mask > 0, ids, 96).astype(np.int32)
  labels = rs.randint(0, 4, batch_size).astype(np.int32)
  class_mask = np.zeros((batch_size, 4), bool)
  class_mask[:, :2] = True
  return {"input_ids": ids, "attention_mask": mask, "labels": labels % 2,
          "weights": np.ones(batch_size, np.float32) if weights is None else weights,
          "class_mask": class_mask, "task_ids": np.zeros(batch_size, np.int32)}


@pytest.fixture(scope="module")
def setup():
  model = GPT2Classifier(CONFIG)
  params = init_params(model, jax.random.PRNGKey(0))
  return model, params


def test_train_step_compiles_once(setup):
  model, params = setup
  tx, _ = steps.make_optimizer(total_steps=10)
  traces = []

  def counted(state, batch):
    traces.append(1)
    return steps.train_step(state, batch, model=model, tx=tx)

  step = jax.jit(counted, donate_argnums=0)
  state = steps.init_train_state(jax.tree.map(jnp.copy, params), tx, jax.random.PRNGKey(1))
  for seed in range(4):
    state, _ = step(state, make_batch(seed, weights=np.array([1, 1, 1, seed % 2], np.float32)))
  assert len(traces) == 1


def test_weight_zero_examples_do_not_count(setup):
  """A padded example (weight 0) changes nothing: same update as without it."""
  model, params = setup
  tx, _ = steps.make_optimizer(total_steps=10)
  step = jax.jit(functools.partial(steps.train_step, model=model, tx=tx, deterministic=True))
  full = make_batch(0, batch_size=4)
  padded = dict(full, weights=np.array([1, 1, 1, 0], np.float32))
  three = {k: v[:3] for k, v in full.items()}
  a, ma = step(steps.init_train_state(params, tx, jax.random.PRNGKey(1)), padded)
  b, mb = step(steps.init_train_state(params, tx, jax.random.PRNGKey(1)), three)
  for x, y in zip(jax.tree.leaves(a.params), jax.tree.leaves(b.params)):
    np.testing.assert_allclose(x, y, atol=1e-6)
  assert float(ma["count"]) == 3 and float(ma["loss_sum"]) == pytest.approx(
      float(mb["loss_sum"]), rel=1e-5)


def test_gradient_accumulation_equals_one_big_batch(setup):
  model, params = setup
  big = make_batch(0, batch_size=8)
  halves = [{k: v[:4] for k, v in big.items()}, {k: v[4:] for k, v in big.items()}]
  tx1, _ = steps.make_optimizer(total_steps=5, learning_rate=1e-3)
  tx2, _ = steps.make_optimizer(total_steps=5, learning_rate=1e-3, grad_accum_steps=2)
  step1 = jax.jit(functools.partial(steps.train_step, model=model, tx=tx1, deterministic=True))
  step2 = jax.jit(functools.partial(steps.train_step, model=model, tx=tx2, deterministic=True))
  s1, _ = step1(steps.init_train_state(params, tx1, jax.random.PRNGKey(0)), big)
  s2 = steps.init_train_state(params, tx2, jax.random.PRNGKey(0))
  for h in halves:
    s2, _ = step2(s2, h)
  # Within float32 roundoff of an lr-1e-3 Adam step (which normalizes tiny gradients).
  for x, y, p in zip(jax.tree.leaves(s1.params), jax.tree.leaves(s2.params),
                     jax.tree.leaves(params)):
    np.testing.assert_allclose(x, y, atol=1e-5)
    assert np.abs(np.asarray(x) - np.asarray(p)).max() > 1e-4  # and it did move


def test_schedule_is_linear_decay_from_peak():
  _, schedule = steps.make_optimizer(total_steps=100, learning_rate=5e-5)
  assert float(schedule(0)) == pytest.approx(5e-5)
  assert float(schedule(50)) == pytest.approx(2.5e-5)
  assert float(schedule(100)) == pytest.approx(0.0)
  _, warm = steps.make_optimizer(total_steps=100, warmup_steps=10, learning_rate=1e-3)
  assert float(warm(5)) == pytest.approx(5e-4) and float(warm(10)) == pytest.approx(1e-3)
  assert float(warm(55)) == pytest.approx(5e-4)


def test_weight_decay_skips_biases_and_layernorm(setup):
  _, params = setup
  mask = steps.decay_mask(params)
  assert mask["h_0"]["attn"]["c_attn"]["kernel"] and mask["wte"]["embedding"]
  assert not mask["h_0"]["attn"]["c_attn"]["bias"] and not mask["ln_f"]["scale"]


def test_frozen_parameters_are_bit_identical(setup):
  model, params = setup
  trainable = jax.tree_util.tree_map_with_path(
      lambda path, _: path[0].key == "score", params)
  tx, _ = steps.make_optimizer(total_steps=5, learning_rate=1e-2, weight_decay=0.1,
                               trainable_mask=trainable)
  state = steps.init_train_state(params, tx, jax.random.PRNGKey(0))
  step = jax.jit(functools.partial(steps.train_step, model=model, tx=tx))
  for seed in range(3):
    state, _ = step(state, make_batch(seed))
  assert not np.array_equal(state.params["score"]["kernel"], params["score"]["kernel"])
  for name in ("wte", "h_0", "ln_f"):
    for x, y in zip(jax.tree.leaves(state.params[name]), jax.tree.leaves(params[name])):
      np.testing.assert_array_equal(x, y)


def test_eval_step_sums_match_numpy(setup):
  model, params = setup
  batch = make_batch(5, batch_size=6, weights=np.array([1, 1, 1, 1, 1, 0], np.float32))
  batch["labels"] = np.array([0, 1, 2, 3, 1, 0], np.int32)
  out = jax.device_get(jax.jit(functools.partial(steps.eval_step, model=model))(params, batch))
  logits = np.asarray(jax.jit(functools.partial(steps.logits_step, model=model))(params, batch))
  w = batch["weights"]
  ci = (logits.argmax(-1) == batch["labels"]) * w
  ta = (np.where(batch["class_mask"], logits, -np.inf).argmax(-1) == batch["labels"]) * w
  logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
  assert out["count"] == 5
  assert out["correct"] == ci.sum() and out["task_correct"] == ta.sum()
  assert out["loss_sum"] == pytest.approx(-(logp[np.arange(6), batch["labels"]] * w).sum(),
                                          rel=1e-5)


def test_non_finite_is_reported(setup):
  model, params = setup
  tx, _ = steps.make_optimizer(total_steps=5)
  bad = jax.tree.map(lambda x: x, params)
  bad["score"]["kernel"] = bad["score"]["kernel"].at[0, 0].set(jnp.nan)
  step = jax.jit(functools.partial(steps.train_step, model=model, tx=tx))
  _, m = step(steps.init_train_state(bad, tx, jax.random.PRNGKey(0)), make_batch(0))
  assert not bool(m["finite"])
  _, m = step(steps.init_train_state(params, tx, jax.random.PRNGKey(0)), make_batch(0))
  assert bool(m["finite"])


def test_threefry_dropout_refuses_the_key_layout_that_moves_with_the_mesh():
  """Threefry's older, non-partitionable layout draws other masks on another mesh or
  padded length: a step that would draw with it stops with one line saying how to fix
  it (the programs set the partitionable layout explicitly)."""
  from cljax.train import steps as train_steps
  key = jax.random.PRNGKey(0)
  assert train_steps.dropout_key(key, "threefry") is key
  with jax.threefry_partitionable(False):
    with pytest.raises(ValueError, match=r"needs jax_threefry_partitionable=True .*found "
                                         r"False: unset JAX_THREEFRY_PARTITIONABLE"):
      train_steps.dropout_key(key, "threefry")
