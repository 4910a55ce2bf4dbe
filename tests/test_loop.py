"""The one training loop (cljax.train.loop) that the study and LM training share: its
callbacks, resume point, batches and evaluation sums, on a counting step."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cljax.train import loop
from cljax.train.progress import Interrupted, StepLogger, Writers


def _arrays(n=10, width=6):
  ids = np.arange(n * width, dtype=np.int32).reshape(n, width)
  return {"input_ids": ids, "attention_mask": np.ones_like(ids),
          "labels": np.arange(n, dtype=np.int32) % 2}


def _count_step(state, batch):
  """state: (steps taken, sum of the real rows' first tokens seen)."""
  steps_, seen = state
  w = batch["weights"]
  m = {"loss_sum": jnp.sum(w), "correct": jnp.sum(w), "count": jnp.sum(w),
       "grad_norm": jnp.float32(1.0), "finite": jnp.bool_(True), "penalty": jnp.float32(0.0)}
  return (steps_ + 1, seen + jnp.sum(batch["input_ids"][:, 0] * w)), m


def _logger(tmp_path):
  return StepLogger(Writers(str(tmp_path), enabled=False), 1000, lambda: None)


def _run(tmp_path, *, start=0, total=None, every=(), stop_after=None, state=None):
  arrays = _arrays()
  batches = lambda s: loop.epoch_batches(arrays, 4, epochs=2, seed=(0, 1), start=s)
  total = total or 2 * 3   # 10 rows in batches of 4: 3 a epoch
  calls, advanced = [], []

  def advance(s):
    advanced.append(s)
    return 100 + s   # a global step ahead of the task's own

  periodic = tuple(loop.Periodic(n, lambda st, n=n: calls.append((n, int(st[0]))))
                   for n in every)
  logger = _logger(tmp_path)
  logger.start_task(0, "t", total, lambda s: 0.0)
  state = loop.train_loop(jax.jit(_count_step), state or (jnp.int32(0), jnp.int32(0)),
                          batches, start=start, total=total, logger=logger,
                          advance=advance, periodic=periodic, stop_after=stop_after)
  return state, calls, advanced


def test_callbacks_run_on_global_steps_but_not_after_the_last(tmp_path):
  state, calls, advanced = _run(tmp_path, every=(2, 3, 0))
  assert int(state[0]) == 6 and advanced == [1, 2, 3, 4, 5, 6]
  # global steps 101..106: every 2 at 102, 104 (106 is the last step); every 3 at 102, 105
  assert calls == [(2, 2), (3, 2), (2, 4), (3, 5)]


def test_a_resumed_loop_sees_exactly_the_rest_of_the_batches(tmp_path):
  full, _, _ = _run(tmp_path)
  with pytest.raises(Interrupted):
    _run(tmp_path, stop_after=4)
  first, _, _ = _run(tmp_path, total=4)
  rest, _, advanced = _run(tmp_path, start=4, state=first)
  assert advanced == [5, 6]
  assert int(rest[1]) == int(full[1]) and int(rest[0]) == 6


def test_epoch_batches_cover_every_row_once_per_epoch_in_a_seeded_order():
  arrays = _arrays()
  batches = list(loop.epoch_batches(arrays, 4, epochs=2, seed=(3,)))
  assert len(batches) == 6
  for epoch in (batches[:3], batches[3:]):
    rows = np.concatenate([b["input_ids"][b["weights"] > 0, 0] for b in epoch])
    assert sorted(rows.tolist()) == sorted(arrays["input_ids"][:, 0].tolist())
  again = list(loop.epoch_batches(arrays, 4, epochs=2, seed=(3,), start=2))
  for a, b in zip(again, batches[2:]):
    np.testing.assert_array_equal(a["input_ids"], b["input_ids"])
  assert loop.update_count(3, 2, grad_accum_steps=4) == 2   # a partial accumulation counts


def test_evaluation_totals_sum_every_batch_to_host_floats():
  arrays = _arrays(n=7)
  batches = list(loop.epoch_batches(arrays, 4, epochs=1, seed=(0,)))
  fn = jax.jit(lambda p, b: {"count": jnp.sum(b["weights"]),
                             "correct": jnp.sum((b["labels"] == p) * b["weights"])})
  totals = loop.evaluation_totals(fn, jnp.int32(1), batches)
  assert totals == {"count": 7.0, "correct": 3.0}
  assert all(type(v) is float for v in totals.values())


def test_writers_keep_json_lines_and_tensorboard_scalars(tmp_path):
  from tensorboard.backend.event_processing import event_accumulator
  writers = Writers(str(tmp_path))
  writers.write({"step": 3, "loss": 0.5, "accuracy": 0.75, "task": 0, "name": "x"}, 3, "train")
  writers.write({"step": 4, "loss": 0.25}, 4, "train")
  writers.close()
  lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
  assert len(lines) == 2 and '"name": "x"' in lines[0]
  events = event_accumulator.EventAccumulator(str(tmp_path / "tensorboard"))
  events.Reload()
  assert sorted(events.Tags()["scalars"]) == ["train/accuracy", "train/loss"]
  assert [(e.step, e.value) for e in events.Scalars("train/loss")] == [(3, 0.5), (4, 0.25)]


@pytest.mark.parametrize("bad", [np.inf, -np.inf, np.nan])
def test_all_finite_finds_one_non_finite_float_in_any_leaf_and_dtype(bad):
  """The check before every checkpoint: one bad value anywhere (float32 or bfloat16)
  makes it False; integer leaves (the step, PRNG keys) are not read."""
  from cljax.train.checkpoint import all_finite
  tree = {"w": np.ones((3, 4), np.float32), "b": jnp.zeros((5,), jnp.bfloat16),
          "step": np.int32(7), "big": np.full((2,), 3e38, np.float32)}
  assert bool(all_finite(tree))
  for name in ("w", "b"):
    x = np.array(tree[name], np.float32)
    x.flat[-1] = bad
    assert not bool(all_finite({**tree, name: jnp.asarray(x, tree[name].dtype)})), name
