"""The judge of generative replay's pseudo-labels: naive Bayes by hand, and a run's kept
samples judged against a classifier of the old task trained on the run's own rows."""

import json
import os

import numpy as np
import pytest

from cljax.report import pseudo_labels


def test_naive_bayes_by_hand():
  nb = pseudo_labels.NaiveBayes.fit(["good fun", "bad", "bad good"], ["pos", "neg", "neg"])
  # Counts + 1 over the vocabulary (bad, fun, good): pos 1, 2, 2 of 5; neg 3, 1, 2 of 6.
  np.testing.assert_allclose(nb.log_likelihood["good"], np.log([2 / 6, 2 / 5]))
  np.testing.assert_allclose(nb.log_likelihood["bad"], np.log([3 / 6, 1 / 5]))
  np.testing.assert_allclose(nb.log_prior, np.log([2 / 3, 1 / 3]))
  # "good": neg log(2/3) + log(2/6) = -1.504 > pos log(1/3) + log(2/5) = -2.015;
  # "fun good": pos -2.931 > neg -3.296; an unknown word changes nothing.
  assert nb.predict(["good", "fun good", "Good zebra<br />"]) == ["neg", "pos", "neg"]


def _fake_run(root, data_dir, tokenizer_dir, samples, train=64):
  os.makedirs(root)
  flags = {"tasks": ["imdb", "ag_news"], "data_dir": data_dir, "num_train": 64,
           "num_test": 32, "seed": 0, "init": "random", "size": "tiny",
           "tokenizer": tokenizer_dir, "method": "generative_replay"}
  none = {"train": 0, "test": 0}
  with open(os.path.join(root, "results.json"), "w") as f:
    json.dump({"flags": flags, "tasks": ["imdb", "ag_news"], "method": "generative_replay",
               "data": {"imdb": {"train": train, "left_out_as_pretraining_text": none}}}, f)
  with open(os.path.join(root, "pseudo_samples.jsonl"), "w") as f:
    f.writelines(json.dumps(dict(s, boundary=1, task="imdb")) + "\n" for s in samples)
  return str(root)


def test_a_runs_pseudo_labels_are_judged_against_the_old_task(tiny_data_dir,
                                                              tiny_tokenizer_dir, tmp_path):
  samples = [{"text": "good great wonderful superb film", "label": "pos"},
             {"text": "bad awful boring terrible plot", "label": "neg"},
             {"text": "lovely best enjoyable fine acting", "label": "neg"}]   # wrong
  run = _fake_run(tmp_path / "gr" / "seed0", tiny_data_dir, tiny_tokenizer_dir, samples)
  (judged,) = pseudo_labels.judge_run(run)
  assert judged["kept"] == 3 and judged["label_balance"] == {"pos": 1, "neg": 2}
  assert judged["agreement"] == pytest.approx(2 / 3)
  assert judged["judge_test_accuracy"] > 0.9          # the tiny reviews are easy
  lines = pseudo_labels.report_lines([{"workdir": run, "tasks": ["imdb", "ag_news"],
                                       "method": "generative_replay"}])
  assert any(line.startswith("| imdb -> ag_news | generative_replay | 2 | imdb | 1 | 3.0 | "
                             "0.667 | 0.667 |") and line.endswith("| neg:pos 2:1 |")
             for line in lines)
  # Orders keep the order they come in (a report's order 1 first), not the alphabet's.
  lines = pseudo_labels.report_lines([{"workdir": run, "tasks": t, "method": "generative_replay"}
                                      for t in (["imdb", "ag_news"], ["ag_news", "imdb"])])
  assert [line.split(" | ")[0] for line in lines if "| generative_replay |" in line] == [
      "| imdb -> ag_news", "| ag_news -> imdb"]
  # A run whose rows cannot be drawn again (another data folder, a missing base) is
  # refused, not judged on other rows.
  moved = _fake_run(tmp_path / "gr" / "seed1", tiny_data_dir, tiny_tokenizer_dir, samples,
                    train=50)
  with pytest.raises(ValueError, match="cannot draw the rows task imdb trained on again"):
    pseudo_labels.judge_run(moved)
