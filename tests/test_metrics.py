"""Continual-learning metrics against hand-computed values."""

import pytest

from cljax.metrics import summarize

R = [[0.9, 0.1, 0.2],
     [0.6, 0.8, 0.3],
     [0.5, 0.7, 0.95]]


def test_three_task_matrix_by_hand():
  m = summarize(R, baseline=[0.5, 0.25, 0.1])
  assert m["average_accuracy"] == pytest.approx((0.5 + 0.7 + 0.95) / 3)
  # Task 0: best 0.9 -> 0.5 (0.4); task 1: best 0.8 -> 0.7 (0.1).
  assert m["forgetting_per_task"] == pytest.approx([0.4, 0.1])
  assert m["forgetting"] == pytest.approx(0.25)
  assert m["backward_transfer"] == pytest.approx(((0.5 - 0.9) + (0.7 - 0.8)) / 2)
  # R[0][1] - b1 = 0.1 - 0.25; R[1][2] - b2 = 0.3 - 0.1.
  assert m["forward_transfer"] == pytest.approx(((0.1 - 0.25) + (0.3 - 0.1)) / 2)


def test_forgetting_uses_the_best_accuracy_after_learning():
  # Task 0 improves after task 1 (0.7 -> 0.9) then drops to 0.6: forgetting 0.3.
  m = summarize([[0.7, 0.0, 0.0], [0.9, 0.8, 0.0], [0.6, 0.8, 0.9]])
  assert m["forgetting_per_task"] == pytest.approx([0.3, 0.0])
  assert m["forward_transfer"] is None


def test_single_task_and_bad_shapes():
  m = summarize([[0.8]])
  assert m["average_accuracy"] == 0.8 and m["forgetting"] is None
  with pytest.raises(ValueError, match="square"):
    summarize([[0.1, 0.2]])
  with pytest.raises(ValueError, match="one accuracy per task"):
    summarize(R, baseline=[0.1])
