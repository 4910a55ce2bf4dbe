"""Runs side by side (``cljax.study.parallel``): the stacking, and runs that equal the same
runs alone (threefry dropout both ways): the same accuracy matrices and, from their
last checkpoints, logits within 1e-5 on every test example."""

import functools
import json
import os

import jax
import numpy as np
import optax
import pytest

from cljax import data as data_lib
from cljax import steps
from cljax import study
from cljax.methods import MethodConfig
from cljax.methods import build as build_method
from cljax.study import parallel, stages
from cljax.train import sharding
from cljax.train import tasks as tasks_lib


def test_stack_pads_what_differs_and_batches_share_one_bucket():
  a = {"w": np.ones((2, 3)), "rows": np.ones((2, 4))}
  b = {"w": np.zeros((2, 3)), "rows": np.full((5, 4), 2.0)}
  s = parallel.stack([a, b])
  assert s["w"].shape == (2, 2, 3) and s["rows"].shape == (2, 5, 4)
  np.testing.assert_array_equal(s["rows"][0, 2:], 0)           # padded rows
  np.testing.assert_array_equal(parallel.unstack(s, 1)["rows"], b["rows"])
  short = {"input_ids": np.array([[5, 6, 0, 0, 0, 0, 0, 0]]),
           "attention_mask": np.array([[1, 1, 0, 0, 0, 0, 0, 0]]), "labels": np.array([1])}
  long = {"input_ids": np.array([[5, 6, 7, 8, 9, 0, 0, 0]]),
          "attention_mask": np.array([[1, 1, 1, 1, 1, 0, 0, 0]]), "labels": np.array([0])}
  batch = parallel.stack_batches([short, long], buckets=(4, 8))
  assert batch["input_ids"].shape == (2, 1, 8)    # the longest row of the step (5) -> 8
  batch = parallel.stack_batches([short, short], buckets=(4, 8))
  assert batch["input_ids"].shape == (2, 1, 4) and batch["labels"].tolist() == [[1], [1]]


def test_runs_side_by_side_must_differ_only_in_seed_and_traced_strengths():
  base = study.StudyConfig()
  with pytest.raises(ValueError, match="only in --seed; seed 1 also differs in --learning_rate"):
    parallel.side_by_side([base, base.replace(seed=1, learning_rate=1.0)])
  with pytest.raises(ValueError, match=r"must differ, found \(seed\) \[\(0,\), \(0,\)\]"):
    parallel.side_by_side([base, base])
  assert [c.dropout_rng_impl for c in parallel.side_by_side([base, base.replace(seed=3)])] == [
      "threefry"] * 2
  with pytest.raises(ValueError, match=r"--dropout_rng_impl=rbg \(seed 0\) draws other dropout "
                                       "masks inside a vmap than alone"):
    parallel.side_by_side([base.replace(dropout_rng_impl="rbg"), base.replace(seed=3)])
  # EWC's lambda is a traced strength: runs may differ in it, on one seed or several;
  # its other hyperparameters, and another method's strengths, may not differ.
  ewc = base.replace(method="ewc")
  strong = ewc.replace(method_config=ewc.method_config.replace(ewc_lambda=1e6))
  assert parallel.varying(parallel.side_by_side([ewc, strong])) == ("ewc_lambda",)
  assert parallel.varying([ewc, ewc.replace(seed=1)]) == ()
  with pytest.raises(ValueError, match=r"only in --seed, --ewc_lambda; seed 0 also differs "
                                       r"in --fisher_samples"):
    parallel.side_by_side([ewc, ewc.replace(method_config=ewc.method_config.replace(
        fisher_samples=7))])
  with pytest.raises(ValueError, match="also differs in --lwf_alpha"):
    parallel.side_by_side([ewc, ewc.replace(method_config=ewc.method_config.replace(
        lwf_alpha=3.0))])
  with pytest.raises(ValueError, match="also differs in --method"):
    parallel.side_by_side([ewc, base.replace(seed=1)])


SGD = optax.sgd(1.0)   # an update is the gradient itself: every parameter's is compared


def _step_states(runs, k):
  """Each run's state and plan at the first step of task k, the optimizer SGD; for
  k = 1, through task 0 untrained (EWC's Fisher and anchor taken) and then moved off
  the anchor, so that the penalty pulls at that step."""
  out = []
  for s in runs:
    state, record = study.start(s)
    if k:
      state, plan = study.start_task(s, 0, state, record)
      state = tasks_lib.end_task(s.method, state, stages.task_context(s, 0, record), plan,
                                 rng=s.base_rng)
      state = state._replace(params=jax.tree.map(lambda p: p + 0.01, state.params))
      record.task = 1
    state, plan = study.start_task(s, k, state, record)
    out.append((state._replace(opt_state=SGD.init(state.params)), plan))
  return out


@pytest.fixture
def xla_optimized():
  """XLA's optimizations on, as in a user's run (the suite turns most off to compile
  faster: conftest.py); without them the bodies of a program fuse otherwise than the
  same steps alone."""
  before = jax.config.read("jax_disable_most_optimizations")
  jax.config.update("jax_disable_most_optimizations", False)
  yield
  jax.config.update("jax_disable_most_optimizations", before)


@pytest.mark.parametrize("case", ["two_seeds", "two_strengths"])
def test_one_step_side_by_side_is_each_runs_step_alone(case, tiny_data_dir, tiny_tokenizer_dir,
                                                        tmp_path, xla_optimized):
  """Two runs' states and batches of different lengths: the step of both (padded to
  the longer bucket) gives each run's step alone bit for bit, dropout on, every
  parameter (at SGD with learning rate 1 an update is the gradient, so a wrong head,
  LayerNorm or bias gradient shows); two EWC strengths, the strength a traced value,
  at a step where the penalty pulls. The held step moves its active run as alone and
  keeps the held one exactly."""
  lambdas = (1e2, 1e4) if case == "two_strengths" else (1e2, 1e2)
  cfgs = parallel.side_by_side([_config(tiny_data_dir, tiny_tokenizer_dir, seed=s,
                                        method="ewc", method_config=MethodConfig(
                                            gen_batch_size=8, fisher_samples=8,
                                            ewc_lambda=lam))
                                for s, lam in zip((0, 1), lambdas)])
  names = parallel.varying(cfgs)
  assert names == (("ewc_lambda",) if case == "two_strengths" else ())
  runs = [study.setup(c, str(tmp_path / f"r{c.seed}"), False) for c in cfgs]
  k = 1 if case == "two_strengths" else 0
  states, plans = zip(*_step_states(runs, k))
  axis = sharding.RunAxis.over(runs[0].mesh, 2)
  rebuild = (functools.partial(build_method, cfgs[0].method, cfgs[0].method_config,
                               runs[0].method_context) if names else None)
  fns = parallel.make_step_fns(runs[0].model, SGD, runs[0].method, axis, rebuild)
  values = {n: np.asarray(lambdas, np.float32) for n in names}
  for padded in (False, True):
    batches = [{n: np.array(v[:8]) for n, v in dict(
        p.arrays, weights=np.ones(len(p.arrays["labels"]), np.float32)).items()}
        for p in plans]
    if padded:   # run 0's rows are shorter: alone at length 8, side by side at 24
      batches[0]["attention_mask"][:, 6:] = 0
      batches[0]["input_ids"][:, 6:] = runs[0].tokenizer.pad_token_id
    _check_one_step(runs, states, batches, fns, values, exact=not padded, penalty=bool(k))
  for s in runs:
    s.checkpointer.close()


def _alone_step(s, state):
  """The run's step alone at SGD, jitted with the shardings the study's steps have."""
  shardings = jax.tree.map(lambda a: a.sharding, state)
  return jax.jit(functools.partial(steps.train_step, model=s.model, tx=SGD, method=s.method),
                 in_shardings=(shardings, sharding.batch_sharding(s.mesh)),
                 out_shardings=(shardings, sharding.replicated(s.mesh)))


def _check_one_step(runs, states, batches, fns, values, *, exact, penalty):
  """The step of both runs against each run's step alone: bit for bit where both run at
  their own length (one device: parallel.over_runs), to float32 rounding where one is
  padded to the other's (a longer sum rounds otherwise); the held step likewise."""
  alone = [_alone_step(s, st)(jax.tree.map(jax.numpy.copy, st),
                              data_lib.trim_to_bucket(b, (8, 24)))
           for s, st, b in zip(runs, states, batches)]
  assert all(float(m["penalty"]) > 0 for _, m in alone) == penalty
  both = parallel.stack_batches(batches, (8, 24))
  assert both["input_ids"].shape[-1] == 24

  def same(a, b, **where):
    if exact:
      np.testing.assert_array_equal(a, b, **where)
    else:
      np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6, **where)

  def same_params(got, want):
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(got.params),
                            jax.tree.leaves(want.params)):
      same(a, b, err_msg=jax.tree_util.keystr(path))
  new, metrics = fns.full(parallel.stack(states), both, values)
  for i, (state_i, metrics_i) in enumerate(alone):
    same_params(parallel.unstack(new, i), state_i)
    for name in ("loss_sum", "penalty", "grad_norm", "correct"):
      same(metrics[name][i], metrics_i[name])
  held, _ = fns.held(parallel.stack(states), both, values, np.asarray([False, True]))
  for a, b in zip(jax.tree.leaves(parallel.unstack(held, 0)), jax.tree.leaves(states[0])):
    np.testing.assert_array_equal(a, b)
  same_params(parallel.unstack(held, 1), alone[1][0])


def _config(data_dir, tokenizer_dir, **overrides):
  kwargs = dict(tasks=("imdb", "ag_news"), data_dir=data_dir, tokenizer=tokenizer_dir,
                init="random", size="tiny", num_train=24, num_test=16, max_length=24,
                batch_size=8, eval_batch_size=16, epochs=2, learning_rate=2e-3,
                checkpoint_every=0, log_every=2, dropout_rng_impl="threefry", dropout=0.1,
                method_config=MethodConfig(gen_batch_size=8, replay_size=8))
  kwargs.update(overrides)
  return study.StudyConfig(**kwargs)


def _losses(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [r["loss"] for r in map(json.loads, f) if "loss" in r]


def _final_logits(cfg, workdir):
  """Every test example's logits from the run's last checkpoint."""
  s = study.setup(cfg, workdir, resume=True)
  state, _ = study.start(s, resume=True)
  s.checkpointer.close()
  test = data_lib.concat([d.test for d in s.task_data])
  fn = jax.jit(lambda p, b: steps.logits_step(p, b, model=s.model))
  return np.asarray(fn(state.params, {"input_ids": test["input_ids"],
                                      "attention_mask": test["attention_mask"]}))


# Generative replay keeps a seed's pseudo-examples only where their text is not empty:
# at these settings seed 0 keeps 25 of 25 and seed 1 24, so task 2 takes 14 steps
# against 12 and seed 1 is held for the last two.
UNEQUAL = dict(gr_gamma=1.02, gen_temperature=2.0)


@pytest.mark.slow
@pytest.mark.parametrize("method,bucket,lambdas,hp", [
    ("finetune", 0, None, {}), ("finetune", 8, None, {}), ("ewc", 8, None, {}),
    ("replay", 8, None, {}), ("generative_replay", 8, None, UNEQUAL),
    ("ewc", 8, (1e2, 1e6), {})], ids=["finetune", "finetune_buckets", "ewc", "replay",
                                      "generative_replay_unequal_lengths", "ewc_strengths"])
def test_runs_side_by_side_equal_the_same_runs_alone(tiny_data_dir, tiny_tokenizer_dir,
                                                     tmp_path, method, bucket, lambdas, hp):
  """Two seeds side by side; or (``lambdas``) two EWC strengths on seeds 0 and 1, the
  strength a traced value of the one step; generative replay with tasks of unequal
  lengths (a run held while the other trains)."""
  cfgs = [_config(tiny_data_dir, tiny_tokenizer_dir, method=method, length_bucket=bucket,
                  seed=seed) for seed in (0, 1)]
  cfgs = [c.replace(method_config=c.method_config.replace(**hp)) for c in cfgs]
  if lambdas:
    cfgs = [c.replace(method_config=c.method_config.replace(ewc_lambda=v))
            for c, v in zip(cfgs, lambdas)]
    assert parallel.varying(cfgs) == ("ewc_lambda",)
  together = parallel.run_parallel(cfgs, [str(tmp_path / f"par{s}") for s in (0, 1)])
  if hp is UNEQUAL:
    assert [r["timing"]["steps_per_task"] for r in together] == [[6, 14], [6, 12]]
  for cfg, got in zip(cfgs, together):
    alone = study.run(cfg, str(tmp_path / f"alone{cfg.seed}"))
    assert got["accuracy_matrix"] == alone["accuracy_matrix"]
    assert got["task_aware_accuracy_matrix"] == alone["task_aware_accuracy_matrix"]
    assert got["timing"]["steps_per_task"] == alone["timing"]["steps_per_task"]
    assert got["timing"]["runs_side_by_side"] == 2
    # Every logged step's loss (the same rows, order and dropout masks: a wrong one
    # differs at the first step by far more) ...
    np.testing.assert_allclose(*(_losses(tmp_path / f"{w}{cfg.seed}") for w in ("par", "alone")),
                               atol=1e-4)
    # ... and the final logits equal up to rounding: measured at most 4.3e-5 (finetune),
    # 1.5e-6 (replay), 2.2e-5 (generative replay). A vmapped matrix product rounds
    # differently, and AdamW turns a gradient of rounding's size into a step of about
    # the learning rate, so where a penalty leaves such gradients (EWC) the final
    # logits differ by up to about 1e-2 (1.03e-2 measured; the size depends on the CPU).
    side, solo = (_final_logits(cfg, str(tmp_path / f"{w}{cfg.seed}")) for w in ("par", "alone"))
    print(f"{method} bucket {bucket} seed {cfg.seed}: max |logit difference| "
          f"{np.abs(side - solo).max():.2e}")
    np.testing.assert_allclose(side, solo, atol=3e-2 if method == "ewc" else 2e-4)
  assert together[0]["accuracy_matrix"] != together[1]["accuracy_matrix"] or \
      together[0]["curve"] != together[1]["curve"]      # two runs, not one twice
  assert os.path.exists(tmp_path / "par1" / "results.json")


@pytest.mark.slow
def test_runs_side_by_side_killed_resume_to_the_same_matrices(tiny_data_dir,
                                                              tiny_tokenizer_dir, tmp_path):
  cfgs = [_config(tiny_data_dir, tiny_tokenizer_dir, method="replay", length_bucket=8,
                  checkpoint_every=2, seed=seed) for seed in (0, 1)]
  full = parallel.run_parallel(cfgs, [str(tmp_path / f"full{s}") for s in (0, 1)])
  cut = [str(tmp_path / f"cut{s}") for s in (0, 1)]
  with pytest.raises(study.Interrupted):
    parallel.run_parallel([c.replace(stop_after_steps=5) for c in cfgs], cut)
  resumed = parallel.run_parallel(cfgs, cut, resume=True)
  for a, b in zip(full, resumed):
    assert a["accuracy_matrix"] == b["accuracy_matrix"]
    assert a["task_aware_accuracy_matrix"] == b["task_aware_accuracy_matrix"]
    assert a["curve"] == b["curve"]


@pytest.mark.slow
def test_a_sweep_trains_its_seeds_side_by_side(tiny_data_dir, tiny_tokenizer_dir, tmp_path,
                                               monkeypatch):
  from cljax.study import sweep
  base = _config(tiny_data_dir, tiny_tokenizer_dir)
  out = sweep.run_sweep(base, str(tmp_path), ["finetune"], [0, 1, 2], parallel_runs=2,
                        flags={"seeds": ["0", "1", "2"]})
  assert [r["seed"] for r in out["results"]] == [0, 1, 2]
  assert [r["timing"]["runs_side_by_side"] for r in out["results"]] == [2, 2, 1]
  for seed, r in zip((0, 1, 2), out["results"]):
    assert r["flags"]["seed"] == seed and r["flags"]["dropout_rng_impl"] == "threefry"
    assert r["command_flags"] == {"seeds": ["0", "1", "2"]}   # the sweep's, apart
  monkeypatch.setattr(parallel, "run_parallel", lambda *a, **k: pytest.fail("ran again"))
  again = sweep.run_sweep(base, str(tmp_path), ["finetune"], [0, 1, 2], parallel_runs=2)
  assert [r["accuracy_matrix"] for r in again["results"]] == [
      r["accuracy_matrix"] for r in out["results"]]


def test_a_non_finite_run_side_by_side_names_itself(tiny_data_dir, tiny_tokenizer_dir,
                                                    tmp_path):
  cfgs = [_config(tiny_data_dir, tiny_tokenizer_dir, learning_rate=1e30, max_grad_norm=0.0,
                  tasks=("imdb",), seed=seed) for seed in (0, 1)]
  with pytest.raises(FloatingPointError, match=r"Run .*r0 \(seed 0\), trained side by side: "
                                               "Non-finite loss or gradient at task 0"):
    parallel.run_parallel(cfgs, [str(tmp_path / f"r{s}") for s in (0, 1)])
  assert not os.path.exists(tmp_path / "r0" / "results.json")


@pytest.mark.slow
def test_a_sweep_trains_traced_strength_candidates_side_by_side(tiny_data_dir,
                                                                tiny_tokenizer_dir, tmp_path):
  """EWC's lambda candidates on the selection seed run as one program, then the chosen
  strength on the reported seed; the choice is the better validation score."""
  from cljax.study import sweep
  base = _config(tiny_data_dir, tiny_tokenizer_dir, num_val=8, epochs=1)
  out = sweep.run_sweep(base, str(tmp_path), ["ewc"], [0], selection_seed=5, parallel_runs=2,
                        grids={"ewc": ("ewc_lambda", [1e2, 1e6])})
  candidates, (reported,) = out["results"][:2], out["results"][2:]
  assert [(r["flags"]["ewc_lambda"], r["flags"]["seed"]) for r in candidates] == [
      (1e2, 5), (1e6, 5)]
  assert [r["timing"]["runs_side_by_side"] for r in candidates] == [2, 2]
  assert [r["method_config"]["ewc_lambda"] for r in candidates] == [1e2, 1e6]
  scores = [r["val_metrics"]["average_accuracy"] for r in candidates]
  chosen = out["selection"]["ewc"]["chosen"]
  assert chosen == (1e2, 1e6)[int(np.argmax(scores))]
  assert reported["flags"]["seed"] == 0 and reported["flags"]["ewc_lambda"] == chosen
