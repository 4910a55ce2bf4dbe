"""Each mitigation's mechanism against an independent reference."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cljax import steps
from cljax.methods import (BuildContext, MethodConfig, StepContext, TaskContext, build,
                           distill, projection)
from cljax.methods import per_example
from cljax.methods import regularizers as reg
from cljax.methods import replay
from cljax.models import GPT2Classifier, GPT2Config, init_params

CTX = BuildContext(num_labels=4, num_tasks=2, max_length=12, n_layer=2, pad_token_id=49)


class Linear:
  """A softmax-regression 'model' with the classifier's apply signature; its
  'input_ids' are float features."""

  def apply(self, variables, x, mask=None, deterministic=True, rngs=None):
    del mask, deterministic, rngs
    return x @ variables["params"]["w"]


def _features(n=64, d=3, c=3, seed=0):
  rs = np.random.RandomState(seed)
  x = rs.randn(n, d).astype(np.float32)
  w = rs.randn(d, c).astype(np.float32)
  y = rs.randint(0, c, n).astype(np.int32)
  arrays = {"input_ids": x, "attention_mask": np.ones((n, 1), np.int32), "labels": y}
  return arrays, {"w": jnp.asarray(w)}


def _softmax(z):
  e = np.exp(z - z.max(-1, keepdims=True))
  return e / e.sum(-1, keepdims=True)


# ----------------------------------------------------------------------------
# Fisher, MAS
# ----------------------------------------------------------------------------

def test_empirical_fisher_matches_closed_form_for_softmax_regression():
  arrays, params = _features()
  x, y = arrays["input_ids"], arrays["labels"]
  p = _softmax(x @ np.asarray(params["w"]))
  g = np.einsum("nd,nc->ndc", x, np.eye(3)[y] - p)      # d log p(y|x) / dW per example
  expected = (g ** 2).mean(0)
  fisher = per_example.fisher_diagonal(Linear(), params, arrays, mode="empirical", num_samples=64,
                               chunk=5)  # 64 = 12 chunks of 5 + a padded one
  np.testing.assert_allclose(fisher["w"], expected, rtol=1e-5, atol=1e-7)


def test_true_fisher_converges_to_the_expected_fisher():
  arrays, params = _features(n=1, seed=1)
  n = 40000
  many = {k: np.repeat(v, n, axis=0) for k, v in arrays.items()}
  x = arrays["input_ids"][0]
  p = _softmax(x @ np.asarray(params["w"]))
  expected = sum(p[c] * np.outer(x, np.eye(3)[c] - p) ** 2 for c in range(3))
  fisher = per_example.fisher_diagonal(Linear(), params, many, mode="true", num_samples=n,
                               chunk=4000, rng=jax.random.PRNGKey(3))
  # Monte Carlo error: 5 standard errors of the mean of per-sample squared gradients.
  second = sum(p[c] * np.outer(x, np.eye(3)[c] - p) ** 4 for c in range(3))
  sem = np.sqrt((second - expected ** 2) / n)
  assert (np.abs(np.asarray(fisher["w"]) - expected) < 5 * sem + 1e-6).all()
  # And the empirical Fisher of this single example is a different quantity.
  assert not np.allclose(per_example.fisher_diagonal(Linear(), params, arrays)["w"], expected,
                         rtol=0.1)


@pytest.mark.slow
def test_fisher_on_tiny_gpt2_matches_a_plain_per_example_loop():
  config = GPT2Config(vocab_size=50, n_positions=16, n_embd=16, n_layer=1, n_head=2,
                      num_labels=4, pad_token_id=49, eos_token_id=49)
  model = GPT2Classifier(config)
  params = init_params(model, jax.random.PRNGKey(0))
  rs = np.random.RandomState(0)
  n = 7
  ids = rs.randint(0, 49, (n, 10)).astype(np.int32)
  mask = np.ones_like(ids)
  ids[2, 6:], mask[2, 6:] = 49, 0
  arrays = {"input_ids": ids, "attention_mask": mask,
            "labels": rs.randint(0, 4, n).astype(np.int32)}
  fisher = per_example.fisher_diagonal(model, params, arrays, num_samples=n, chunk=3)

  def logp(p, i):
    logits = model.apply({"params": p}, ids[i:i + 1], mask[i:i + 1])[0]
    return jax.nn.log_softmax(logits)[arrays["labels"][i]]
  grads = [jax.grad(logp)(params, i) for i in range(n)]
  expected = jax.tree.map(lambda *g: sum(np.square(np.asarray(x)) for x in g) / n, *grads)
  for a, b in zip(jax.tree.leaves(fisher), jax.tree.leaves(expected)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-9)


def test_ewc_names_its_fisher_programs_ahead_and_the_pass_compiles_none(caplog):
  """EWC's ``programs`` hook gives the per-chunk programs its Fisher pass will call (one
  per chunk length, with the lengths bucketed): compiled first, the pass that follows
  builds no program of its own."""
  config = GPT2Config(vocab_size=50, n_positions=16, n_embd=16, n_layer=1, n_head=2,
                      num_labels=4, pad_token_id=49, eos_token_id=49)
  model = GPT2Classifier(config)
  params = init_params(model, jax.random.PRNGKey(0))
  rs = np.random.RandomState(1)
  ids = rs.randint(0, 49, (11, 16)).astype(np.int32)
  mask = (np.arange(16)[None] < rs.randint(3, 17, (11, 1))).astype(np.int32)
  arrays = {"input_ids": ids, "attention_mask": mask, "labels": rs.randint(0, 4, 11),
            "weights": np.ones(11, np.float32)}
  arrays["labels"] = arrays["labels"].astype(np.int32)
  method = build("ewc", MethodConfig(fisher_samples=9, fisher_chunk=2), CTX)
  ctx = TaskContext(train=arrays, model=model, params=params, rng=jax.random.PRNGKey(5),
                    length_buckets=(4, 8, 12, 16))
  programs = method.declares.programs(method.init(params), ctx)
  assert len({b["input_ids"].shape for _, (_, b, _) in programs}) == len(programs) > 1

  def chunk_compiles(fn) -> int:
    caplog.clear()
    with jax.log_compiles(), caplog.at_level("WARNING"):
      fn()
    return sum("Compiling jit(_chunk_stat)" in r.getMessage() for r in caplog.records)
  assert chunk_compiles(lambda: steps.compile_programs(programs)) == len(programs)
  assert chunk_compiles(lambda: method.after_task(method.init(params), ctx)) == 0
  other = build("ewc", MethodConfig(fisher_samples=9, fisher_chunk=3), CTX)  # not named
  assert chunk_compiles(lambda: other.after_task(other.init(params), ctx)) >= 1


def test_mas_importance_matches_hand_computed_gradient_of_output_norm():
  arrays, params = _features(n=10, d=4, c=2, seed=2)
  x = arrays["input_ids"]
  out = x @ np.asarray(params["w"])
  expected = np.abs(2 * np.einsum("nd,nc->ndc", x, out)).mean(0)
  omega = per_example.mas_importance(Linear(), params, arrays, num_samples=10, chunk=4)
  np.testing.assert_allclose(omega["w"], expected, rtol=1e-5)


# ----------------------------------------------------------------------------
# Penalties
# ----------------------------------------------------------------------------

def _tree(seed, shape=(3, 2)):
  rs = np.random.RandomState(seed)
  return {"a": jnp.asarray(rs.randn(*shape), jnp.float32),
          "b": {"c": jnp.asarray(rs.randn(4), jnp.float32)}}


def _penalty_grad(method, state, theta):
  return jax.grad(lambda p: method.loss(state, StepContext(params=p))[0])(theta)


def test_ewc_penalty_gradient_is_lam_f_times_displacement():
  hp = MethodConfig(ewc_lambda=7.0)
  method = build("ewc", hp, CTX)
  anchor, theta = _tree(0), _tree(1)
  fisher = jax.tree.map(jnp.abs, _tree(2))
  state = reg.consolidate_ewc(method.init(anchor), fisher, anchor)
  grad = _penalty_grad(method, state, theta)
  expected = jax.tree.map(lambda f, t, a: 7.0 * f * (t - a), fisher, theta, anchor)
  for g, e in zip(jax.tree.leaves(grad), jax.tree.leaves(expected)):
    np.testing.assert_allclose(g, e, rtol=1e-5, atol=1e-6)
  value = method.loss(state, StepContext(params=theta))[0]
  by_hand = sum(float((7.0 / 2 * f * (t - a) ** 2).sum()) for f, t, a in zip(
      jax.tree.leaves(fisher), jax.tree.leaves(theta), jax.tree.leaves(anchor)))
  assert float(value) == pytest.approx(by_hand, rel=1e-5)
  # Before any task ends the penalty is zero.
  assert float(method.loss(method.init(anchor), StepContext(params=theta))[0]) == 0.0


def test_ewc_keeps_one_penalty_per_task_and_online_ewc_decays():
  lam = 3.0
  anchors = [_tree(10), _tree(11)]
  fishers = [jax.tree.map(jnp.abs, _tree(12)), jax.tree.map(jnp.abs, _tree(13))]
  theta = _tree(14)
  method = build("ewc", MethodConfig(ewc_lambda=lam), CTX)
  state = method.init(theta)
  for f, a in zip(fishers, anchors):
    state = reg.consolidate_ewc(state, f, a)
  expected = jax.tree.map(lambda f0, a0, f1, a1, t: lam * (f0 * (t - a0) + f1 * (t - a1)),
                          fishers[0], anchors[0], fishers[1], anchors[1], theta)
  for g, e in zip(jax.tree.leaves(_penalty_grad(method, state, theta)),
                  jax.tree.leaves(expected)):
    np.testing.assert_allclose(g, e, rtol=1e-4, atol=1e-5)
  # Online: F = gamma * F0 + F1 around the latest anchor.
  online = build("online_ewc", MethodConfig(ewc_lambda=lam, online_gamma=0.5), CTX)
  ostate = online.init(theta)
  for f, a in zip(fishers, anchors):
    ostate = reg.consolidate_online(ostate, f, a, 0.5)
  expected = jax.tree.map(lambda f0, f1, a1, t: lam * (0.5 * f0 + f1) * (t - a1),
                          fishers[0], fishers[1], anchors[1], theta)
  for g, e in zip(jax.tree.leaves(_penalty_grad(online, ostate, theta)),
                  jax.tree.leaves(expected)):
    np.testing.assert_allclose(g, e, rtol=1e-5, atol=1e-6)


def test_si_importance_by_hand():
  """Two steps on a 2-parameter model: w = -sum g * dtheta, Omega = w / (D^2 + xi)."""
  xi = 0.1
  method = build("si", MethodConfig(si_c=2.0, si_xi=xi), CTX)
  theta0 = {"p": jnp.array([1.0, -1.0])}
  state = method.before_task(method.init(theta0), TaskContext(params=theta0))
  traj = [theta0, {"p": jnp.array([0.8, -0.7])}, {"p": jnp.array([0.5, -0.6])}]
  grads = [{"p": jnp.array([2.0, -3.0])}, {"p": jnp.array([3.0, -1.0])}]
  for old, new, g in zip(traj, traj[1:], grads):
    state = method.after_step(state, StepContext(old_params=old, new_params=new, grads=g))
  w = -(np.array([2.0, -3.0]) * np.array([-0.2, 0.3]) + np.array([3.0, -1.0]) *
        np.array([-0.3, 0.1]))
  np.testing.assert_allclose(state.path["p"], w, rtol=1e-6)
  state = method.after_task(state, TaskContext(params=traj[-1]))
  delta = np.array([0.5, -0.6]) - np.array([1.0, -1.0])
  omega = w / (delta ** 2 + xi)
  np.testing.assert_allclose(state.quad.importance["p"], omega, rtol=1e-6)
  np.testing.assert_allclose(state.quad.anchor["p"], [0.5, -0.6])
  assert not np.asarray(state.path["p"]).any()
  theta = {"p": jnp.array([0.0, 0.0])}
  grad = _penalty_grad(method, state, theta)
  np.testing.assert_allclose(grad["p"], 2 * 2.0 * omega * (0 - np.array([0.5, -0.6])),
                             rtol=1e-5)


def test_l2_penalty_gradient():
  method = build("l2", MethodConfig(l2_lambda=0.5), CTX)
  anchor, theta = _tree(3), _tree(4)
  state = method.after_task(method.init(anchor), TaskContext(params=anchor))
  for g, t, a in zip(jax.tree.leaves(_penalty_grad(method, state, theta)),
                     jax.tree.leaves(theta), jax.tree.leaves(anchor)):
    np.testing.assert_allclose(g, 0.5 * (t - a), rtol=1e-5, atol=1e-7)


# ----------------------------------------------------------------------------
# Replay buffers
# ----------------------------------------------------------------------------

def _stream(labels, max_length=4, num_labels=4):
  n = len(labels)
  return {"input_ids": jnp.arange(n, dtype=jnp.int32)[:, None] * jnp.ones((1, max_length),
                                                                          jnp.int32),
          "attention_mask": jnp.ones((n, max_length), jnp.int32),
          "labels": jnp.asarray(labels, jnp.int32), "task_ids": jnp.zeros((n,), jnp.int32),
          "class_mask": jnp.ones((n, num_labels), bool), "weights": jnp.ones((n,))}


def test_reservoir_inclusion_is_uniform():
  n, capacity, trials = 100, 10, 2000
  stream = _stream(np.zeros(n, int))

  @jax.jit
  @jax.vmap
  def final_ids(key):
    buf = replay.init(capacity, 4, 4)
    for i in range(0, n, 20):  # offered in batches of 20
      chunk = jax.tree.map(lambda v, i=i: v[i:i + 20], stream)
      buf = replay.add(buf, chunk, jax.random.fold_in(key, i))
    return buf.input_ids[:, 0], buf.size, buf.seen

  ids, size, seen = final_ids(jax.random.split(jax.random.PRNGKey(0), trials))
  assert (np.asarray(size) == capacity).all() and (np.asarray(seen) == n).all()
  counts = np.bincount(np.asarray(ids).ravel(), minlength=n)
  p = capacity / n
  sd = np.sqrt(trials * p * (1 - p))
  # Every item's inclusion count is Binomial(trials, 0.1): within 4.5 sd of 200.
  assert np.abs(counts - trials * p).max() < 4.5 * sd
  # Early and late items equally likely (algorithm R's whole point).
  assert abs(counts[:50].mean() - counts[50:].mean()) < 0.5 * sd


def test_class_balanced_buffer_is_balanced_on_an_imbalanced_stream():
  rs = np.random.RandomState(0)
  labels = rs.permutation([0] * 150 + [1] * 30 + [2] * 20)
  stream = _stream(labels)
  buf = replay.init(21, 4, 4)
  buf = jax.jit(functools.partial(replay.add, policy="class_balanced"))(
      buf, stream, jax.random.PRNGKey(1))
  counts = np.bincount(np.asarray(buf.labels), minlength=3)
  assert counts.tolist() == [7, 7, 7]
  reservoir = replay.add(replay.init(21, 4, 4), stream, jax.random.PRNGKey(1))
  assert np.bincount(np.asarray(reservoir.labels))[0] > 10  # plain reservoir is not


def test_padded_examples_are_never_stored_and_sampling_an_empty_buffer_is_masked():
  stream = _stream([1, 2, 3])
  stream["weights"] = jnp.array([1.0, 0.0, 1.0])
  buf = replay.add(replay.init(5, 4, 4), stream, jax.random.PRNGKey(0))
  assert int(buf.size) == 2 and sorted(np.asarray(buf.labels)[:2].tolist()) == [1, 3]
  empty = replay.sample(replay.init(5, 4, 4), jax.random.PRNGKey(0), 3)
  assert not np.asarray(empty["weights"]).any()


def test_replay_train_step_does_not_retrace_as_the_buffer_fills():
  config = GPT2Config(vocab_size=50, n_positions=16, n_embd=16, n_layer=1, n_head=2,
                      num_labels=4, pad_token_id=49, eos_token_id=49)
  model = GPT2Classifier(config)
  params = init_params(model, jax.random.PRNGKey(0))
  method = build("derpp", MethodConfig(replay_size=6, replay_batch_size=2),
                 BuildContext(num_labels=4, num_tasks=2, max_length=8, n_layer=1,
                              pad_token_id=49))
  tx, _ = steps.make_optimizer(total_steps=10)
  traces = []

  def counted(state, batch):
    traces.append(1)
    return steps.train_step(state, batch, model=model, tx=tx, method=method)

  step = jax.jit(counted, donate_argnums=0)
  state = steps.init_train_state(params, tx, jax.random.PRNGKey(0), method)
  for i in range(5):
    batch = {k: np.asarray(v) for k, v in _stream([i % 4, (i + 1) % 4], 8).items()}
    state, m = step(state, batch)
  assert len(traces) == 1
  assert int(state.method_state.size) == 6 and int(state.method_state.seen) == 10
  assert float(m["penalty"]) > 0  # DER++ terms are live once the buffer holds examples


# ----------------------------------------------------------------------------
# Distillation, projection, freezing
# ----------------------------------------------------------------------------

def test_distillation_loss_by_hand():
  s = jnp.array([[1.0, 2.0, 0.5, -1.0]])
  t = jnp.array([[0.5, 1.0, 3.0, 3.0]])
  mask = jnp.array([[True, True, False, False]])
  temp = 2.0
  ps, pt = _softmax(np.array([0.5, 1.0])), _softmax(np.array([0.25, 0.5]))
  kl = (pt * (np.log(pt) - np.log(ps))).sum()
  out = distill.distillation_loss(s, t, mask, jnp.ones(1), temp)
  assert float(out) == pytest.approx(temp ** 2 * kl, rel=1e-5)
  assert float(distill.distillation_loss(s, s, mask, jnp.ones(1), temp)) == pytest.approx(0.0,
                                                                                        abs=1e-7)


def test_agem_projection_never_conflicts_with_the_memory_gradient():
  rs = np.random.RandomState(0)
  for _ in range(20):
    g = {"a": jnp.asarray(rs.randn(5)), "b": jnp.asarray(rs.randn(2, 2))}
    ref = {"a": jnp.asarray(rs.randn(5)), "b": jnp.asarray(rs.randn(2, 2))}
    out = projection.project(g, ref)
    dot = float(projection.tree_dot(g, ref))
    assert float(projection.tree_dot(out, ref)) >= -1e-5
    if dot >= 0:
      for x, y in zip(jax.tree.leaves(out), jax.tree.leaves(g)):
        np.testing.assert_array_equal(x, y)
    else:  # projected onto the plane orthogonal to ref
      assert float(projection.tree_dot(out, ref)) == pytest.approx(0.0, abs=1e-5)


def test_freeze_masks():
  params = {"wte": {"embedding": 0}, "h_0": {"w": 0}, "h_1": {"w": 0}, "ln_f": {"scale": 0},
            "score": {"kernel": 0}}
  head = build("freeze", MethodConfig(freeze="head"), CTX).declares.trainable(params)
  assert head == {"wte": {"embedding": False}, "h_0": {"w": False}, "h_1": {"w": False},
                  "ln_f": {"scale": False}, "score": {"kernel": True}}
  last = build("freeze", MethodConfig(freeze="last_k", freeze_k=1), CTX).declares.trainable(params)
  assert last["h_1"]["w"] and last["ln_f"]["scale"] and not last["h_0"]["w"]
  with pytest.raises(ValueError, match="freeze_k"):
    build("freeze", MethodConfig(freeze="last_k", freeze_k=5), CTX)


def test_freeze_parts_trains_the_named_parts_from_the_named_task():
  params = {"wte": {"embedding": 0}, "wpe": {"embedding": 0},
            "h_0": {"attn": {"c_attn": {"kernel": 0}}, "ln_1": {"scale": 0},
                    "mlp": {"c_fc": {"kernel": 0}}},
            "ln_f": {"scale": 0}, "score": {"kernel": 0}}
  method = build("freeze", MethodConfig(freeze="parts", freeze_parts="mlp,tokens,head",
                                        freeze_from=2), CTX)
  assert all(jax.tree.leaves(method.declares.trainable(params, 0)))
  later = method.declares.trainable(params, 1)
  assert later == {"wte": {"embedding": True}, "wpe": {"embedding": False},
                   "h_0": {"attn": {"c_attn": {"kernel": False}}, "ln_1": {"scale": False},
                           "mlp": {"c_fc": {"kernel": True}}},
                   "ln_f": {"scale": False}, "score": {"kernel": True}}
  with pytest.raises(ValueError, match="expected some of tokens"):
    build("freeze", MethodConfig(freeze="parts", freeze_parts="mlp,embedings"), CTX)


def test_registry_errors_and_composition():
  with pytest.raises(ValueError, match="Unknown method 'ewk'.*expected one of"):
    build("ewk", MethodConfig(), CTX)
  with pytest.raises(ValueError, match="twice"):
    build("ewc+ewc", MethodConfig(), CTX)
  composed = build("ewc+der++", MethodConfig(), CTX)
  assert composed.name == "ewc+derpp"
  with pytest.raises(ValueError, match="replay_policy"):
    build("replay", MethodConfig(replay_policy="fifo"), CTX)
