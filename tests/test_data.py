"""Tasks, remapping, subsets, row checks, tokenization and batches."""

import os

import numpy as np
import pytest

from cljax import data


def test_remapping_follows_the_stated_intent_by_default():
  imdb, ag = data.resolve_tasks(["imdb", "ag_news"])
  assert imdb.head_labels == (0, 1) and imdb.class_names == ("neg", "pos")
  # Sci/Tech (source 3) -> 2, Sports (source 1) -> 3.
  assert ag.source_labels == (3, 1) and ag.head_labels == (2, 3)


def test_exact_reproduction_keeps_world_and_sports():
  _, ag = data.resolve_tasks(["imdb", "ag_news"], {"ag_news": ["world", "sports"]})
  assert ag.source_labels == (0, 1) and ag.head_labels == (2, 3)


@pytest.mark.parametrize("names,classes,match", [
    (["imdb", "nope"], None, "Unknown task 'nope'"),
    (["ag_news"], {"ag_news": ["scitech"]}, "not distinct names among"),
    (["ag_news"], {"ag_news": ["sports", "sports"]}, "not distinct"),
    (["imdb"], {"ag_news": ["sports"]}, "not among the tasks"),
])
def test_task_errors(names, classes, match):
  with pytest.raises(ValueError, match=match):
    data.resolve_tasks(names, classes)


def _write(path, lines):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, "w") as f:
    f.write("\n".join(lines) + "\n")
  return path


@pytest.mark.parametrize("line,match", [
    ('{"text": "fine", "label": 1', "not valid JSON"),
    ('{"text": "fine"}', "expected an object with keys"),
    ('{"text": "   ", "label": 0}', "empty text"),
    ('{"text": "ok", "label": "pos"}', "must be an integer"),
    ('{"text": 3, "label": 0}', "must be a string"),
])
def test_malformed_rows_name_file_and_line(tmp_path, line, match):
  path = _write(str(tmp_path / "t.jsonl"), ['{"text": "good", "label": 0}', line])
  with pytest.raises(ValueError, match=f"t.jsonl:2: .*{match}"):
    data.read_rows(path)


def test_label_outside_classes(tmp_path):
  _write(str(tmp_path / "imdb" / "train.jsonl"), ['{"text": "a", "label": 0}',
                                                  '{"text": "b", "label": 2}'])
  task, = data.resolve_tasks(["imdb"])
  with pytest.raises(ValueError, match=r"train.jsonl:2: label 2 is outside task 'imdb'"):
    data.load_rows(task, "train", str(tmp_path))


def test_missing_split_file(tmp_path):
  task, = data.resolve_tasks(["imdb"])
  with pytest.raises(FileNotFoundError, match="No test file for task 'imdb'"):
    data.load_rows(task, "test", str(tmp_path))


def test_csv_parquet_and_local_task(tmp_path):
  import pyarrow as pa
  import pyarrow.parquet as pq
  _write(str(tmp_path / "mytask" / "train.csv"), ["text,label", '"hello, world",1', "bye,0",
                                                  "third,2"])
  pq.write_table(pa.table({"text": ["x", "y"], "label": [2, 0]}),
                 str(tmp_path / "mytask" / "test.parquet"))
  task, = data.resolve_tasks(["mytask"], data_dir=str(tmp_path))
  assert task.class_names == ("0", "1", "2")
  rows = data.load_rows(task, "train", str(tmp_path))
  assert [r[:2] for r in rows] == [("hello, world", 1), ("bye", 0), ("third", 2)]
  assert [r[:2] for r in data.load_rows(task, "test", str(tmp_path))] == [("x", 2), ("y", 0)]


def _sorted_rows(n_per_class, classes=(0, 1)):
  return [(f"t{c}-{i}", c, f"f:{i}") for c in classes for i in range(n_per_class)]


def test_head_subset_of_sorted_data_has_one_class_balanced_has_both():
  rows = _sorted_rows(50)
  task, = data.resolve_tasks(["imdb"])
  head = data.select(rows, task, 20, "head", seed=0)
  assert head == list(range(20)) and {rows[i][1] for i in head} == {0}
  bal = data.select(rows, task, 20, "balanced", seed=0)
  assert sorted(np.bincount([rows[i][1] for i in bal])) == [10, 10]
  assert bal != sorted(bal)  # shuffled
  assert bal == data.select(rows, task, 20, "balanced", seed=0)
  assert bal != data.select(rows, task, 20, "balanced", seed=1)


def test_balanced_subset_keeps_only_selected_classes_and_fills_short_classes():
  rows = _sorted_rows(10, classes=(0, 1, 2, 3))[:35]  # class 3 has 5 rows
  _, ag = data.resolve_tasks(["imdb", "ag_news"], {"ag_news": ["sci_tech", "world"]})
  idx = data.select(rows, ag, 14, "balanced", seed=0)
  counts = np.bincount([rows[i][1] for i in idx], minlength=4)
  assert counts.tolist() == [9, 0, 0, 5]


def test_validation_is_disjoint_from_train(tiny_data_dir, tiny_tokenizer):
  tasks = data.resolve_tasks(["imdb", "ag_news"])
  out = data.load_task_data(tasks, tiny_tokenizer, data_dir=tiny_data_dir, num_train=20,
                            num_test=10, num_val=10, max_length=24, seed=3)
  for d in out:
    train = {tuple(r) for r in d.train["input_ids"].tolist()}
    val = {tuple(r) for r in d.val["input_ids"].tolist()}
    assert len(val) == 10 and not train & val
  ag = out[1]
  assert set(ag.train["labels"].tolist()) == {2, 3}
  assert ag.train["class_mask"][0].tolist() == [False, False, True, True]
  assert (ag.train["task_ids"] == 1).all()


def test_tokenize_pads_truncates_and_caches(tiny_tokenizer, tmp_path):
  texts = ["good movie", " ".join(["good"] * 40)]
  ids, mask = data.tokenize(texts, tiny_tokenizer, 8, cache_dir=str(tmp_path))
  assert ids.dtype == np.int32 and ids.shape == (2, 8)
  pad = tiny_tokenizer.pad_token_id
  assert ids[0, 2:].tolist() == [pad] * 6 and mask[0].tolist() == [1, 1] + [0] * 6
  assert mask[1].all()
  assert len(os.listdir(tmp_path)) == 1

  class Boom:
    def __getattr__(self, name):
      return getattr(tiny_tokenizer, name)
    def __call__(self, *a, **k):
      raise AssertionError("re-tokenized despite the cache")
  ids2, _ = data.tokenize(texts, Boom(), 8, cache_dir=str(tmp_path))
  np.testing.assert_array_equal(ids, ids2)


def test_batches_pad_the_last_batch_and_keep_every_example():
  arrays = {"labels": np.arange(10, dtype=np.int32), "x": np.arange(20).reshape(10, 2)}
  out = list(data.batches(arrays, 4, seed=1))
  assert len(out) == 3 and all(b["labels"].shape == (4,) for b in out)
  assert out[-1]["weights"].tolist() == [1, 1, 0, 0]
  seen = np.concatenate([b["labels"][b["weights"] > 0] for b in out])
  assert sorted(seen.tolist()) == list(range(10))
  resumed = list(data.batches(arrays, 4, seed=1, start=1))
  np.testing.assert_array_equal(resumed[0]["labels"], out[1]["labels"])
  in_order = list(data.batches(arrays, 4))
  assert in_order[0]["labels"].tolist() == [0, 1, 2, 3]


def test_prompts_keep_the_answer_marker_when_the_text_is_cut(tiny_tokenizer):
  texts = ["good movie", " ".join(["great"] * 40)]
  ids, mask = data.tokenize(texts, tiny_tokenizer, 12, prompt=("the film", "was"))
  tok = tiny_tokenizer.convert_tokens_to_ids
  assert ids[0, :5].tolist() == tok(["the", "film", "good", "movie", "was"])
  assert mask[0].tolist() == [1] * 5 + [0] * 7
  assert ids[1].tolist() == tok(["the", "film"] + ["great"] * 9 + ["was"]) and mask[1].all()
  with pytest.raises(ValueError, match="leaving no room for text"):
    data.tokenize(texts, tiny_tokenizer, 3, prompt=("the film", "was"))


def test_label_words_per_task_and_their_tokens(tiny_tokenizer):
  imdb, ag = data.resolve_tasks(["imdb", "ag_news"])
  assert imdb.label_words == (" negative", " positive")
  assert ag.label_words == (" science", " sports") and ag.prompt[1] == "\nTopic:"
  imdb, ag = data.resolve_tasks(["imdb", "ag_news"], label_words={
      "imdb": (" bad", " good"), "ag_news": (" software", " match")})
  tok = tiny_tokenizer.convert_tokens_to_ids
  assert data.label_tokens([imdb, ag], tiny_tokenizer) == tuple(
      tok(["bad", "good", "software", "match"]))
  with pytest.raises(ValueError, match="' bad' and ' bad' start with the same token"):
    data.label_tokens(data.resolve_tasks(["imdb"], label_words={"imdb": (" bad", " bad")}),
                      tiny_tokenizer)
  with pytest.raises(ValueError, match="1 label words .* for 2 classes"):
    data.resolve_tasks(["imdb"], label_words={"imdb": (" bad",)})
