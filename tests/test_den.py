"""DEN (Dynamically Expandable Networks): the units beside GPT-2's MLP and the token
rows beside wte, the sparse model's selection (checked against the group lasso's
optimality conditions), selective retraining with the L1 step, expansion with group
lasso and pruning, split and duplication of units and rows with timestamps, and a
study run's report."""

import functools
import json
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cljax import steps
from cljax import study
from cljax.methods import BuildContext, MethodConfig, StepContext, TaskContext, build
from cljax.methods import den
from cljax.models import GPT2Classifier, GPT2Config, add_peft_params, init_params
from cljax.models.config import GPT2_LAYOUT as LAYOUT
from cljax.models.den import NEVER, alive, unit_arrays, with_units

BASE = GPT2Config(vocab_size=97, n_positions=16, n_embd=32, n_layer=2, n_head=4,
                  num_labels=4, pad_token_id=96, eos_token_id=96, embd_pdrop=0.0,
                  attn_pdrop=0.0, resid_pdrop=0.0)
INNER, CAPACITY, ROWS = 128, 160, 96
W = INNER + CAPACITY


class _Task(NamedTuple):
  head_labels: tuple


TASKS = (_Task((0, 1)), _Task((2, 3)))


def _data(k, n=32, T=12, seed=0):
  """Task k's rows: label = its first class if token 5 is in the row, else its second."""
  rs = np.random.RandomState(seed + k)
  ids = rs.randint(6, 90, (n, T)).astype(np.int32)
  y = rs.randint(0, 2, n)
  ids[y == 0, rs.randint(0, T)] = 5
  labels = np.asarray(TASKS[k].head_labels)[np.where(y == 0, 0, 1)].astype(np.int32)
  class_mask = np.zeros((n, 4), bool)
  class_mask[:, list(TASKS[k].head_labels)] = True
  return {"input_ids": ids, "attention_mask": np.ones_like(ids), "labels": labels,
          "class_mask": class_mask, "task_ids": np.full((n,), k, np.int32)}


def _batches(arrays, bs=8):
  n = len(arrays["labels"])
  return [{**{k: v[i:i + bs] for k, v in arrays.items()}, "weights": np.ones(bs, np.float32)}
          for i in range(0, n, bs)]


def _method(**hp):
  hp = {"den_capacity": CAPACITY, "den_row_capacity": ROWS, "den_expand_steps": 4,
        "den_split_steps": 0, **hp}
  return build("den", MethodConfig(**hp), BuildContext(num_labels=4, num_tasks=2,
                                                        max_length=12, n_layer=2, n_embd=32,
                                                        vocab_size=97))


@pytest.fixture(scope="module")
def start():
  base = init_params(GPT2Classifier(BASE), jax.random.PRNGKey(0))
  model = GPT2Classifier(BASE.replace(den_capacity=CAPACITY, den_rows=ROWS))
  return model, base, add_peft_params(model, base, jax.random.PRNGKey(1))


def _ctx(model, k, params, state=None, reports=None):
  return TaskContext(task_index=k, train=_data(k), model=model, rng=jax.random.PRNGKey(k),
                     batch_size=8, params=params, tasks=TASKS, method_state=state,
                     report=(reports.append if reports is not None else lambda r: None))


def _train(method, model, params, mstate, k, epochs=2, lr=1e-2):
  """The study's stages for task k by hand: returns params and state after the task's
  steps (before ``after_task``)."""
  mstate = method.before_task(mstate, _ctx(model, k, params))
  tx, _ = steps.make_optimizer(learning_rate=lr, total_steps=100,
                               trainable_mask=method.declares.trainable(params, k))
  state = steps.init_train_state(params, tx, jax.random.PRNGKey(k), method, mstate)
  step = jax.jit(functools.partial(steps.train_step, model=model, tx=tx, method=method))
  for _ in range(epochs):
    for b in _batches(_data(k)):
      state, _ = step(state, b)
  return state.params, state.method_state


def _finish(method, model, params, mstate, k, reports=None):
  ctx = _ctx(model, k, params, reports=reports)
  mstate = method.after_task(mstate, ctx)
  return method.adjust_params(mstate, ctx._replace(params=params)), mstate


def _logits(model, params, k, mstate):
  """Task k's logits (its head's: its classes) with its units and token rows, on its
  data."""
  ids = _data(k)["input_ids"]
  inputs = den.network_inputs(den.alive_table(mstate)[k], mstate.rows[k], {"input_ids": ids})
  logits = model.apply({"params": params}, ids, **inputs)
  return np.asarray(logits)[:, list(TASKS[k].head_labels)]


@pytest.fixture(scope="module")
def after_first(start):
  """Params and state after task 0 (trained, consolidated) with the default method."""
  model, _, params = start
  method = _method()
  params, mstate = _train(method, model, params, method.init(params), 0)
  return _finish(method, model, params, mstate, 0)


# ----------------------------------------------------------------------------
# The units
# ----------------------------------------------------------------------------

def test_capacity_changes_no_logit_and_unit_views_round_trip(start):
  model, base, params = start
  ids = _data(0)["input_ids"]
  plain = GPT2Classifier(BASE).apply({"params": base}, ids)
  np.testing.assert_array_equal(model.apply({"params": params}, ids), plain)
  units = unit_arrays(params, 2, LAYOUT)
  assert units["fc_k"].shape == (2, 32, W) and units["proj_k"].shape == (2, W, 32)
  back = with_units(params, units, 2, LAYOUT)
  assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(back),
                                                  jax.tree.leaves(params)))
  # A unit out of use contributes nothing, whatever its weights; one in use does.
  mask = jnp.broadcast_to((jnp.arange(W) < INNER).astype(jnp.float32), (len(ids), 2, W))
  moved = with_units(params, {**units, "proj_k": units["proj_k"].at[:, INNER + 3].add(1.0)},
                     2, LAYOUT)
  np.testing.assert_array_equal(model.apply({"params": moved}, ids, den_units=mask), plain)
  on = mask.at[:, :, INNER + 3].set(1.0)
  assert np.abs(model.apply({"params": moved}, ids, den_units=on) - plain).max() > 1e-3

  # A token read from a copy row: the copy's values, wherever it sits.
  wte = params["wte"]["embedding"]
  copy = {**params, "den_wte": {"embedding": params["den_wte"]["embedding"].at[3].set(wte[5])}}
  rows = jnp.where(ids == 5, 97 + 3, ids)
  np.testing.assert_array_equal(model.apply({"params": copy}, ids, den_rows=rows), plain)
  assert np.abs(model.apply({"params": params}, ids, den_rows=rows) - plain).max() > 1e-3
  table = den.embedding_rows(params, LAYOUT)
  assert table.shape == (97 + ROWS, 32)
  np.testing.assert_array_equal(
      den.embedding_rows(den.with_rows(params, table, LAYOUT), LAYOUT), table)


# ----------------------------------------------------------------------------
# Step 1: selective retraining
# ----------------------------------------------------------------------------

def test_the_sparse_model_is_the_group_lasso_s_solution():
  """On features of which two carry the label, the fit meets the group lasso's
  optimality conditions (a zero group's gradient under the strength; a nonzero one's
  equal to it, against its direction), and it keeps the informative features."""
  rs = np.random.RandomState(0)
  y = rs.randint(0, 3, 400)
  x = rs.randn(400, 30).astype(np.float32)
  x[:, 4] += 1.5 * (y == 1)
  x[:, 9] += 1.5 * (y == 2)
  w, b, lam = den.sparse_fit(jnp.asarray(x), jnp.asarray(y), num_classes=3, ratio=0.3,
                             steps=3000)
  z = (x - x.mean(0)) / x.std(0)
  p = jax.nn.softmax(z @ np.asarray(w) + np.asarray(b))
  g = z.T @ (np.asarray(p) - np.eye(3)[y]) / len(y)
  norms = np.linalg.norm(np.asarray(w), axis=1)
  on = norms > 0
  assert on[4] and on[9] and on.sum() < 30
  assert (np.linalg.norm(g[~on], axis=1) <= float(lam) * 1.01).all()
  np.testing.assert_allclose(g[on], -float(lam) * np.asarray(w)[on] / norms[on, None],
                             atol=2e-3 * float(lam) + 1e-4)
  np.testing.assert_allclose(np.asarray(jnp.mean(p, 0)), np.bincount(y) / len(y), atol=1e-3)


def test_the_sparse_model_decides_the_selection_and_never_selects_none(start, after_first):
  model, _, _ = start
  params, mstate = after_first
  units = np.asarray(alive(mstate.birth, mstate.retired, 1))
  batches, classes, rows = _batches(_data(1)), np.asarray([2, 3]), mstate.rows[1]
  dense, _ = den.select_units(model, params, units, rows, batches, classes,
                              den.DENConfig(den_select_l1=0.0))
  np.testing.assert_array_equal(dense, units)   # no penalty: every unit in use
  some, report = den.select_units(model, params, units, rows, batches, classes,
                                  den.DENConfig(den_select_l1=0.5))
  assert 0 < some.sum() < units.sum() and not (some & ~units).any()
  assert report["select_examples"] == 32 and "select_fallback" not in report
  # at the strength that zeroes every weight, a warning and every unit retrains
  none, report = den.select_units(model, params, units, rows, batches, classes,
                                  den.DENConfig(den_select_l1=1.0))
  np.testing.assert_array_equal(none, units)
  assert report["select_fallback"] is True


def test_den_s_own_shuffles_come_from_the_run_s_key():
  arrays = _data(1)
  order = lambda rng: np.concatenate([b["input_ids"][:, 0] for b in den._batches(  # noqa: E731
      arrays, 8, 4, den._seed(rng, 2))])
  np.testing.assert_array_equal(order(jax.random.PRNGKey(0)), order(jax.random.PRNGKey(0)))
  assert not np.array_equal(order(jax.random.PRNGKey(0)), order(jax.random.PRNGKey(1)))


def test_selective_retraining_moves_only_the_selected_units(start, after_first):
  model, _, _ = start
  params, mstate = after_first
  method = _method()
  trained, state = _train(method, model, params, mstate, 1)
  selected = np.asarray(state.selected)
  assert 0 < selected.sum() < np.asarray(alive(state.birth, state.retired, 1)).sum()
  before, after = unit_arrays(params, 2, LAYOUT), unit_arrays(trained, 2, LAYOUT)
  same = {k: np.asarray(before[k]) == np.asarray(after[k]) for k in before}
  # every weight of every unit outside the selection is bit-identical
  assert same["fc_k"].all(1)[~selected].all() and same["fc_b"][~selected].all()
  assert same["proj_k"].all(2)[~selected].all()
  assert not same["fc_k"].all(1)[selected].all()   # the selection did train
  for name in ("wpe", "ln_f", "h_0", "h_1"):
    for path, x in jax.tree_util.tree_flatten_with_path(params[name])[0]:
      keys = jax.tree_util.keystr(path)
      if "c_fc" in keys or "den_" in keys or "c_proj']['kernel" in keys and "mlp" in keys:
        continue
      np.testing.assert_array_equal(x, _get(trained[name], path), err_msg=name + keys)
  score0 = np.asarray(trained["score"]["kernel"])[:, :2]
  np.testing.assert_array_equal(score0, np.asarray(params["score"]["kernel"])[:, :2])
  # the token rows: exactly those the task reads train, and move
  read = np.zeros(97 + ROWS, bool)
  read[np.unique(_data(1)["input_ids"])] = True
  np.testing.assert_array_equal(np.asarray(state.row_trained), read)
  same_rows = (np.asarray(den.embedding_rows(params, LAYOUT))
               == np.asarray(den.embedding_rows(trained, LAYOUT))).all(1)
  assert same_rows[~read].all() and not same_rows[read].any()


def test_the_l1_step_follows_every_step_on_what_the_task_trains(start, after_first):
  """An L1 step larger than every weight zeroes, after one step, exactly the weights
  the task trains: task 1 every one but the capacity's, task 2 its selected units, its
  rows and its head columns."""
  model, _, params = start
  method = _method(den_l1=10.0)
  first, _ = _train(method, model, params, method.init(params), 0, epochs=1)
  for name, x in jax.tree_util.tree_flatten_with_path(first)[0]:
    keys = jax.tree_util.keystr(name)
    want = _get(params, name) if "den_" in keys else 0.0
    np.testing.assert_array_equal(x, np.broadcast_to(want, x.shape), err_msg=keys)
  params, mstate = after_first
  trained, state = _train(method, model, params, mstate, 1, epochs=1)
  selected = np.asarray(state.selected)
  units, before = unit_arrays(trained, 2, LAYOUT), unit_arrays(params, 2, LAYOUT)
  assert (np.asarray(units["fc_k"]).transpose(0, 2, 1)[selected] == 0).all()
  assert (np.asarray(units["proj_k"])[selected] == 0).all()
  np.testing.assert_array_equal(np.asarray(units["fc_b"])[~selected],
                                np.asarray(before["fc_b"])[~selected])
  rows = np.asarray(den.embedding_rows(trained, LAYOUT))
  assert (rows[np.asarray(state.row_trained)] == 0).all()
  np.testing.assert_array_equal(rows[~np.asarray(state.row_trained)],
                                np.asarray(den.embedding_rows(params, LAYOUT))[~np.asarray(
                                    state.row_trained)])
  score = np.asarray(trained["score"]["kernel"])
  assert (score[:, 2:] == 0).all()
  np.testing.assert_array_equal(score[:, :2], np.asarray(params["score"]["kernel"])[:, :2])


def _get(tree, path):
  for k in path:
    tree = tree[k.key]
  return tree


# ----------------------------------------------------------------------------
# Step 2: expansion; step 3: split
# ----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def second(start, after_first):
  """Params and state after task 1's selective retraining (before its consolidation)."""
  model, _, _ = start
  return _train(_method(), model, *after_first, 1)


def _consolidate(start, after_first, second, **hp):
  """Task 1's steps 2 and 3 under ``hp`` (the selection and its retraining depend on
  ``den_select_l1``, ``den_l1`` and ``den_l2`` only, left at their defaults)."""
  model, _, _ = start
  params, mstate = after_first
  method = _method(**{"den_split_threshold": 1e9, **hp})
  trained, state = second
  reports = []
  final, state = _finish(method, model, trained, state, 1, reports)
  return model, params, mstate, trained, final, state, reports[-1]


def test_no_unit_is_added_when_the_loss_is_under_the_threshold(start, after_first, second):
  *_, before, _, _, state, report = _consolidate(start, after_first, second, den_loss_threshold=1e9)
  assert report["expanded"] is False and report["units_added"] == [0, 0]
  np.testing.assert_array_equal(state.birth, before.birth)
  assert report["units_split"] == [0, 0]


def test_k_units_per_block_are_added_and_the_zeroed_ones_pruned(start, after_first, second):
  k = 6
  *_, before, _, final, state, report = _consolidate(
      start, after_first, second, den_loss_threshold=0.0, den_expand_k=k, den_group_lasso=0.0)
  assert report["expanded"] is True and report["units_added"] == [k, k]
  assert report["units_pruned"] == [0, 0]
  born = np.asarray(state.birth) == 1
  assert (born.sum(1) == k).all() and (born[:, :INNER] == 0).all()
  np.testing.assert_array_equal(born, (np.asarray(before.birth) == NEVER)
                                & (np.cumsum(np.asarray(before.birth) == NEVER, 1) <= k))
  # A group lasso strong enough drives every new unit to zero: all are removed.
  *_, final, state, report = _consolidate(start, after_first, second, den_loss_threshold=0.0,
                                          den_expand_k=k, den_group_lasso=10.0)
  assert report["units_added"] == [k, k] and report["units_pruned"] == [k, k]
  np.testing.assert_array_equal(state.birth, before.birth)
  new = (np.asarray(before.birth) == NEVER) & (np.cumsum(np.asarray(before.birth) == NEVER, 1)
                                               <= k)
  assert (np.asarray(den.unit_sq(unit_arrays(final, 2, LAYOUT)))[new] == 0).all()
  # In between, exactly the units the group lasso zeroed are removed.
  *_, final, state, report = _consolidate(start, after_first, second, den_loss_threshold=0.0,
                                          den_expand_k=k, den_group_lasso=0.04)
  norm = np.asarray(den.unit_sq(unit_arrays(final, 2, LAYOUT)))
  kept = np.asarray(state.birth) == 1
  np.testing.assert_array_equal(kept, new & (norm > 0))
  assert report["units_pruned"] == (new & (norm == 0)).sum(1).tolist()
  assert 0 < sum(report["units_pruned"]) < 2 * k


def test_a_drifted_unit_is_split_and_the_old_task_gets_its_logits_back(start, after_first, second):
  model, params, mstate, trained, final, state, report = _consolidate(
      start, after_first, second, den_split_threshold=0.0, den_loss_threshold=1e9)
  selected = np.asarray(state.selected)
  assert sum(report["units_split"]) > 0 and report["split_skipped"] == [0, 0]
  # task 0 after task 1 is task 0 before it: the old copies restored, timestamps kept
  np.testing.assert_allclose(_logits(model, final, 0, state), _logits(model, params, 0, mstate),
                             atol=1e-6)
  # task 1's network is the one it trained: the new copies hold the drifted values
  np.testing.assert_allclose(_logits(model, final, 1, state),
                             _logits(model, trained, 1, mstate), atol=1e-5)
  retired = np.asarray(state.retired) == 1
  born = np.asarray(state.birth) == 1
  assert (retired.sum(1) == born.sum(1)).all() and (retired <= selected).all()
  # every row the task moved is split: the old row restored, the copy task 1's
  row_trained = np.asarray(state.row_trained)
  assert report["rows_split"] == int(row_trained.sum()) and report["rows_split_skipped"] == 0
  ids = np.flatnonzero(row_trained)
  np.testing.assert_array_equal(np.asarray(state.rows)[0], np.arange(97))
  copies = np.asarray(state.rows)[1, ids]
  assert (copies >= 97).all() and (np.asarray(state.row_token)[copies] == ids).all()
  assert (np.asarray(state.row_retired)[ids] == 1).all()
  # a threshold between the drifts splits exactly the units over it, the drift
  # measured on all of a unit's shared weights (c_fc column, bias, c_proj row)
  before, after = unit_arrays(params, 2, LAYOUT), unit_arrays(trained, 2, LAYOUT)
  drift = np.sqrt(np.asarray(den.unit_sq(jax.tree.map(jnp.subtract, after, before))))
  only_fc = np.sqrt(((np.asarray(after["fc_k"]) - np.asarray(before["fc_k"])) ** 2).sum(1))
  assert (drift[selected] > only_fc[selected]).all()
  threshold = float(np.median(drift[selected]))
  *_, state, report = _consolidate(start, after_first, second, den_split_threshold=threshold,
                                   den_loss_threshold=1e9)
  np.testing.assert_array_equal(np.asarray(state.retired) == 1,
                                selected & (drift > threshold))
  assert sum(report["units_split"]) == int((selected & (drift > threshold)).sum())


def test_the_task_given_and_inferred_evaluation_uses_each_tasks_units(start, after_first, second):
  model, params, mstate, _, final, state, _ = _consolidate(
      start, after_first, second, den_split_threshold=0.0, den_loss_threshold=1e9)
  method = _method()
  rows = {**_batches(_data(0))[0]}
  mixed = {k: np.concatenate([v, _batches(_data(1))[0][k]]) for k, v in rows.items()}

  def apply_fn(p, inputs, deterministic=True, rng=None):
    return model.apply({"params": p}, inputs["input_ids"], den_units=inputs["den_units"],
                       den_rows=inputs["den_rows"])
  logits, given, sums = method.eval_logits(state, StepContext(params=final, batch=mixed,
                                                              apply_fn=apply_fn))
  np.testing.assert_allclose(given[:8, :2], _logits(model, params, 0, mstate)[:8], atol=1e-6)
  np.testing.assert_allclose(given[8:, 2:], _logits(model, final, 1, state)[:8], atol=1e-6)
  assert logits.shape == (16, 4) and 0 <= float(sums["task_inference_correct"]) <= 16


# ----------------------------------------------------------------------------
# In the study
# ----------------------------------------------------------------------------

@pytest.mark.slow
def test_den_in_the_study_reports_its_units(tiny_data_dir, tiny_tokenizer_dir, tmp_path):
  cfg = study.StudyConfig(tasks=("imdb", "ag_news"), data_dir=tiny_data_dir,
                          tokenizer=tiny_tokenizer_dir, init="random", size="tiny",
                          num_train=16, num_test=16, max_length=24, batch_size=8,
                          eval_batch_size=16, epochs=1, learning_rate=1e-2,
                          checkpoint_every=0, method="den",
                          method_config=MethodConfig(
                              den_capacity=300, den_row_capacity=1000,
                              den_split_threshold=0.0, den_expand_k=4,
                              den_loss_threshold=0.0, den_select_steps=20,
                              den_expand_steps=2, den_split_steps=2))
  r = study.run(cfg, str(tmp_path))
  saved = json.load(open(tmp_path / "results.json"))
  reports = [x for x in saved["method_reports"] if "units_in_use" in x]
  assert [x["task"] for x in reports] == [0, 1]
  last = reports[1]
  selection = [x for x in saved["method_reports"] if x.get("stage") == "selection"]
  assert len(selection) == 1 and sum(selection[0]["units_selected"]) > 0
  # the trainable count is what DEN trained, a part of what its mask leaves trainable
  assert saved["model"]["trainable_parameters_per_task"] == [
      reports[0]["parameters_trained"], last["parameters_trained"]]
  D = 64
  assert last["parameters_trained"] == (
      (sum(selection[0]["units_selected"]) + 8) * (2 * D + 1)
      + selection[0]["rows_trained"] * D + 2 * D)
  for key in ("units_selected", "units_added", "units_pruned", "units_split",
              "parameters_in_use", "units_in_use", "train_loss"):
    assert key in last, key
  assert last["units_added"] == [4, 4] and len(last["parameters_in_use"]) == 2
  assert last["rows_split"] > 0 and last["rows_split_skipped"] == 0
  assert reports[0]["units_in_use"] == [2 * 256]
  # every drifted unit split (capacity enough): IMDb's task-aware accuracy is kept
  assert last["split_skipped"] == [0, 0]
  task_aware = r["task_aware_accuracy_matrix"]
  assert task_aware[1][0] == task_aware[0][0]
  assert r["task_inference_accuracy_matrix"] is not None


@pytest.mark.slow
def test_den_resumes_mid_task_to_the_same_results(tiny_data_dir, tiny_tokenizer_dir, tmp_path):
  """The selection, timestamps and anchor live in the method state: a run cut inside
  task 1 (after its sparse pass) resumes to the uninterrupted run's matrices."""
  cfg = study.StudyConfig(tasks=("imdb", "ag_news"), data_dir=tiny_data_dir,
                          tokenizer=tiny_tokenizer_dir, init="random", size="tiny",
                          num_train=16, num_test=16, max_length=24, batch_size=8,
                          eval_batch_size=16, epochs=2, learning_rate=1e-2,
                          checkpoint_every=1, method="den",
                          method_config=MethodConfig(den_loss_threshold=0.0, den_expand_k=3,
                                                     den_select_steps=20, den_expand_steps=2,
                                                     den_split_steps=2))
  full = study.run(cfg, str(tmp_path / "full"))
  with pytest.raises(study.Interrupted):
    study.run(cfg.replace(stop_after_steps=6), str(tmp_path / "cut"))
  resumed = study.run(cfg, str(tmp_path / "cut"), resume=True)
  for key in ("accuracy_matrix", "task_aware_accuracy_matrix", "method_reports"):
    assert resumed[key] == full[key], key


def test_den_composes_only_last():
  """den+replay would pad the replayed rows' unit masks with zeros (no unit in use):
  refused in one line that gives the order that works."""
  from cljax.methods import registry
  assert registry.parse("replay+den") == ["replay", "den"]
  with pytest.raises(ValueError, match=r"put it last \(--method=replay\+den\)"):
    registry.parse("den+replay")


def test_den_refuses_perplexity_task_inference():
  from cljax.methods import BuildContext, MethodConfig, build
  ctx = BuildContext(num_labels=4, num_tasks=2, max_length=16, n_layer=2, n_embd=8,
                     vocab_size=50)
  build("den", MethodConfig(), ctx)
  with pytest.raises(ValueError, match=r"den infers the task by entropy only"):
    build("den", MethodConfig(peft_infer="perplexity"), ctx)


@pytest.mark.parametrize("arch", ["llama", "gpt_neox"])
def test_a_capacity_unit_in_use_is_a_unit_of_the_family_s_own_mlp(arch):
  """DEN's unit in a gated MLP (Llama: a gate_proj and an up_proj column with a
  down_proj row) and in GPT-NeoX's (a dense_h_to_4h column and bias, a dense_4h_to_h
  row): with no capacity unit in use the model is the plain family's; with capacity
  unit 0 in use it equals the plain family with that unit appended to its MLP's own
  weights (intermediate size + 1). The unit arrays round-trip."""
  from cljax.models import families
  config = families.random_config(arch, "tiny", vocab_size=97, max_position_embeddings=32,
                                  pad_token_id=0)
  lay, L, inner = config.LAYOUT, config.n_layer, config.inner_dim
  model = GPT2Classifier(config.replace(den_capacity=4))
  params = init_params(model, jax.random.key(0))
  ids = jax.random.randint(jax.random.key(1), (3, 10), 1, 97)
  loaded = (jnp.arange(inner + 4) < inner).astype(jnp.float32)

  def den_logits(units_W):
    return model.apply({"params": params}, ids, den_units=jnp.broadcast_to(units_W, (3, L,
                                                                                 inner + 4)))

  def plain(extra: int):
    out = {k: v for k, v in params.items() if not k.startswith(f"{lay.block}")}
    for i in range(L):
      block = dict(params[f"{lay.block}{i}"])
      mlp = {}
      for key, name, capacity in lay.den_units:
        axis = 0 if key == "proj" else 1
        module = {"kernel": jnp.concatenate([block[lay.mlp][name]["kernel"], jnp.take(
            block[lay.mlp][capacity]["kernel"], jnp.arange(extra), axis)], axis)}
        if "bias" in block[lay.mlp][name]:
          module["bias"] = (block[lay.mlp][name]["bias"] if key == "proj" else jnp.concatenate(
              [block[lay.mlp][name]["bias"], block[lay.mlp][capacity]["bias"][:extra]]))
        mlp[name] = module
      out[f"{lay.block}{i}"] = {**block, lay.mlp: mlp}
    return GPT2Classifier(config.replace(intermediate_size=inner + extra)).apply({"params": out},
                                                                           ids)

  np.testing.assert_allclose(den_logits(loaded), plain(0), atol=1e-5, rtol=1e-5)
  with_first = loaded.at[inner].set(1.0)
  assert not np.allclose(den_logits(with_first), den_logits(loaded), atol=1e-4)
  np.testing.assert_allclose(den_logits(with_first), plain(1), atol=1e-5, rtol=1e-5)
  units = unit_arrays(params, L, lay)
  assert units["proj_k"].shape == (L, inner + 4, config.n_embd)
  back = with_units(params, units, L, lay)
  for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(params)):
    np.testing.assert_array_equal(a, b)
