"""Generative replay and LAMOL: the pseudo-data formula, LAMOL's filter, the LM rows
and loss (against transformers' GPT2LMHeadModel loss), vocabulary growth, and whole
runs that resume mid-task with the generated data."""

import json
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import cljax
from cljax import data as data_lib
from cljax import models
from cljax import study
from cljax.methods import BuildContext, MethodConfig, StepContext, TaskContext, registry
from cljax.methods.pseudo_data import lm_arrays, lm_row, pad_rows, split_answer, split_sizes
from cljax.models import GPT2Classifier, GPT2LM, add_token_embeddings
from cljax.report import pseudo_labels

from conftest import TINY_HF, padded_batch

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

V, EOS = TINY_HF["vocab_size"], TINY_HF["eos_token_id"]
TASKS = (data_lib.Task("a", (0, 1), ("neg", "pos"), 0, (" neg", " pos")),
         data_lib.Task("b", (0, 1), ("x", "y"), 2, (" x", " y")))


def test_pseudo_examples_split_over_earlier_tasks_as_lamol():
  """N = ceil(gamma |D_k|), rounded down to a multiple of k, N / k per earlier task."""
  assert split_sizes(2000, 0.2, 1) == [400]
  assert split_sizes(2000, 0.2, 3) == [133, 133, 133]     # 400 -> 399
  assert split_sizes(1001, 0.2, 2) == [100, 100]          # ceil(200.2) = 201 -> 200
  assert split_sizes(3, 0.2, 1) == [1]                    # ceil(0.6)
  assert split_sizes(10, 0.0, 2) == [0, 0]


def test_the_lamol_filter_keeps_one_text_and_one_label_word_answer():
  ans, answers = 5, {(7,): 0, (8, 9): 3}
  assert split_answer([1, 2, ans, 7], ans, answers) == ([1, 2], 0)
  assert split_answer([1, ans, 8, 9], ans, answers) == ([1], 3)       # multi-token word
  assert split_answer([1, 2, 7], ans, answers) == "malformed"         # no answer marker
  assert split_answer([1, ans, 7, ans, 7], ans, answers) == "malformed"  # two
  assert split_answer([ans, 7], ans, answers) == "malformed"          # no text
  assert split_answer([1, ans, 8], ans, answers) == "unknown_answer"  # not a label word
  assert split_answer([1, ans], ans, answers) == "unknown_answer"     # empty answer


def test_lm_rows_cut_the_text_never_the_answer_cue():
  row = lm_row(90, [1, 2, 3, 4, 5], [6, 7], [8], eos=EOS, length=8)
  assert row == [90, 1, 2, 3, 6, 7, 8, EOS]
  assert lm_row(90, [1, 2], [], [], eos=EOS, length=8, ended=False) == [90, 1, 2]
  arrays = lm_arrays([row, [90, 1, EOS]], length=8, pad=EOS, weights={7: 5.0})
  np.testing.assert_array_equal(arrays["lm_loss_mask"],
                                [[0, 1, 1, 1, 1, 5, 1, 1], [0, 1, 1, 0, 0, 0, 0, 0]])
  np.testing.assert_array_equal(arrays["lm_attention_mask"][1], [1, 1, 1, 0, 0, 0, 0, 0])
  assert (arrays["lm_input_ids"][1, 3:] == EOS).all()


@pytest.fixture(scope="module")
def grown(torch_tiny):
  """A tiny classifier's params with two generation tokens (ids 97, 98) added."""
  model, params = cljax.load_pretrained(torch_tiny[0], num_labels=3)
  new_params, config = add_token_embeddings(params, model.config, [V, V + 1], V)
  return model, params, GPT2Classifier(config), new_params


def test_a_generation_token_grows_the_vocabulary_without_changing_any_other_logit(
    grown, tiny_batch, tmp_path):
  old_model, old, model, params = grown
  ids, mask = (jnp.asarray(a) for a in tiny_batch)
  assert model.config.vocab_size == V + 2
  wte = np.asarray(params["wte"]["embedding"])
  np.testing.assert_array_equal(wte[:V], np.asarray(old["wte"]["embedding"]))
  np.testing.assert_allclose(wte[V], wte[:V].mean(0), atol=1e-7)
  np.testing.assert_array_equal(wte[V], wte[V + 1])
  before = GPT2LM(old_model.config).apply({"params": old}, ids, mask)
  after = GPT2LM(model.config).apply({"params": params}, ids, mask)
  assert after.shape[-1] == V + 2
  np.testing.assert_allclose(after[..., :V], before, rtol=0, atol=1e-6)
  np.testing.assert_array_equal(model.apply({"params": params}, ids, mask),
                                old_model.apply({"params": old}, ids, mask))
  # Exported, transformers reads the grown table and gives the same LM logits.
  cljax.save_pretrained(params, model.config, str(tmp_path), head="lm")
  back = transformers.GPT2LMHeadModel.from_pretrained(str(tmp_path)).eval()
  assert back.config.vocab_size == V + 2
  with torch.no_grad():
    theirs = back(input_ids=torch.tensor(np.asarray(ids), dtype=torch.long),
                  attention_mask=torch.tensor(np.asarray(mask))).logits.numpy()
  m = np.asarray(mask).astype(bool)
  np.testing.assert_allclose(theirs[m], np.asarray(after)[m], atol=1e-5)


def test_the_study_adds_the_method_tokens_to_the_tokenizer(tiny_tokenizer_dir, torch_tiny):
  tokenizer = cljax.load_tokenizer(tiny_tokenizer_dir)
  n = len(tokenizer)
  model, params = cljax.load_pretrained(torch_tiny[0], num_labels=3)
  model, params = models.add_method_tokens(model, params, tokenizer, ("__g0__", "__ans__"))
  assert tokenizer.convert_tokens_to_ids(["__g0__", "__ans__"]) == [n, n + 1]
  assert tokenizer("good\nLabel:__ans__", add_special_tokens=False)["input_ids"][-1] == n + 1
  assert model.config.vocab_size == max(V, n + 2)
  with pytest.raises(ValueError, match="already holds"):
    models.add_method_tokens(model, params, tokenizer, ("__ans__",))


def _dgr(**hp):
  ctx = BuildContext(num_labels=4, num_tasks=2, max_length=16, n_layer=2,
                     first_new_token=V, eos_token_id=EOS)
  return registry.build("generative_replay", MethodConfig(**hp), ctx)


def test_the_lm_loss_equals_transformers_and_ignores_padding(grown, tmp_path):
  """DGR's LM term on ``GEN_task x EOS`` is lambda times transformers' causal-LM loss
  (mean over the target tokens of the batch); position 0 (GEN) and padding are not
  targets, and tokens in the padding change nothing."""
  _, _, model, params = grown
  method = _dgr(gr_lm_lambda=0.5)
  assert method.declares.tokens == ("__gr_task0__", "__gr_task1__")
  ids, mask = padded_batch([16, 9, 3, 12], 16, V - 1, EOS, seed=3)
  train = {"input_ids": ids, "attention_mask": mask, "labels": np.array([2, 3, 2, 3]),
           "task_ids": np.ones(4, np.int32), "class_mask": np.zeros((4, 4), bool)}
  arrays = method.train_arrays(TaskContext(task_index=1, train=train, tasks=TASKS))
  lm_ids, lm_mask, loss_mask = (arrays[k] for k in ("lm_input_ids", "lm_attention_mask",
                                                    "lm_loss_mask"))
  assert (lm_ids[:, 0] == V + 1).all()                       # task b's token
  np.testing.assert_array_equal(lm_ids[1, 1:11], np.append(ids[1, :9], EOS))
  # A full row is cut to make room for EOS (LAMOL's concat_example always ends so).
  np.testing.assert_array_equal(lm_ids[0], np.concatenate([[V + 1], ids[0, :14], [EOS]]))
  assert (loss_mask[:, 0] == 0).all()
  np.testing.assert_array_equal(loss_mask.sum(1), [15, 10, 4, 13])
  np.testing.assert_array_equal(loss_mask > 0, lm_mask.astype(bool) & (np.arange(16) > 0))

  lm = GPT2LM(model.config)

  def value(batch):
    batch = dict(batch, weights=np.ones(4, np.float32))
    batch = method.prepare_batch((), StepContext(batch=batch))
    apply = lambda p, i, m: lm.apply({"params": p}, i, m)  # noqa: E731
    return float(method.loss((), StepContext(params=params, batch=batch,
                                              lm_apply_fn=apply))[0])

  ours = value(arrays)
  cljax.save_pretrained(params, model.config, str(tmp_path), head="lm")
  back = transformers.GPT2LMHeadModel.from_pretrained(str(tmp_path)).eval()
  with torch.no_grad():
    labels = np.where(loss_mask > 0, lm_ids, -100)
    ref = back(input_ids=torch.tensor(lm_ids, dtype=torch.long),
               attention_mask=torch.tensor(lm_mask),
               labels=torch.tensor(labels, dtype=torch.long)).loss.item()
  np.testing.assert_allclose(ours, 0.5 * ref, rtol=1e-5)
  noisy = dict(arrays, lm_input_ids=np.where(lm_mask.astype(bool), lm_ids, 5))
  np.testing.assert_allclose(value(noisy), ours, rtol=1e-6)


def test_lamol_rows_end_in_the_label_word_and_weight_the_answer_token(tiny_tokenizer_dir):
  """``GEN prompt(x) __ans__ word EOS``; a text too long for the row is cut, never the
  cue; the ``__ans__`` target weighs 5 (LAMOL's tokens_weight)."""
  tok = cljax.load_tokenizer(tiny_tokenizer_dir)
  n = len(tok)
  method = registry.build("lamol", MethodConfig(), BuildContext(
      num_labels=4, num_tasks=2, max_length=12, n_layer=2, head="lm", first_new_token=n,
      eos_token_id=tok.eos_token_id))
  tok.add_tokens(list(method.declares.tokens), special_tokens=True)
  gen, ans = n, n + 1
  tasks = tuple(data_lib.Task(t.name, t.source_labels, t.class_names, t.label_offset,
                              words, ("", "\nLabel:__ans__"))
                for t, words in zip(TASKS, [(" bad", " good"), (" match", " software")]))
  texts = ["the movie was good", " ".join(["the plot was really dull"] * 5)]
  ids, mask = data_lib.tokenize(texts, tok, 12, prompt=tasks[0].prompt)
  train = {"input_ids": ids, "attention_mask": mask, "labels": np.array([1, 0]),
           "task_ids": np.zeros(2, np.int32), "class_mask": np.zeros((2, 4), bool)}
  arrays = method.train_arrays(TaskContext(task_index=0, train=train, tasks=tasks,
                                           tokenizer=tok))
  cue = tok("\nLabel:__ans__", add_special_tokens=False)["input_ids"]
  for i, word in enumerate([" good", " bad"]):
    row = arrays["lm_input_ids"][i][arrays["lm_attention_mask"][i].astype(bool)].tolist()
    word_ids = tok(word, add_special_tokens=False)["input_ids"]
    assert row[0] == gen and row[-1] == tok.eos_token_id
    assert row[-2 - len(word_ids) - len(cue) + 1:-1] == cue + word_ids
    weights = arrays["lm_loss_mask"][i][:len(row)]
    assert weights[0] == 0 and weights[row.index(ans)] == 5.0
    assert sorted(set(weights[1:].tolist())) == [1.0, 5.0]
  assert arrays["lm_attention_mask"][1].all()           # the long text fills the row


def test_the_filter_counts_what_it_drops(tiny_tokenizer_dir):
  """LAMOL keeps samples that split into one text and a label-word answer, labelled
  by the answer's class, and counts the others by reason; DGR drops empty texts."""
  from cljax.methods import generative
  tok = cljax.load_tokenizer(tiny_tokenizer_dir)
  good, bad = (tok(w, add_special_tokens=False)["input_ids"] for w in (" good", " bad"))
  tasks = tuple(data_lib.Task(t.name, t.source_labels, t.class_names, t.label_offset, w)
                for t, w in zip(TASKS, [(" bad", " good"), (" match", " software")]))
  ans = 1000
  spec = generative._Spec("lamol", 0.2, 0.25, False, lamol=True)
  setup = generative._Setup(spec, MethodConfig().for_config(generative.LamolConfig),
                            ("__gen__", "__ans__"), (999,), ans, 16, 4, EOS, True)
  texts = [[5, ans] + good, [5, 6, ans] + bad, [5, 6], [5, ans, ans] + good, [5, ans, 7],
           [ans] + good]
  tctx = TaskContext(task_index=1, tasks=tasks, tokenizer=tok)
  (kept_texts, sources, ended, labels), dropped = generative._keep(
      setup, tctx, texts, [0] * 6, [True] * 6)
  assert kept_texts == [[5], [5, 6]] and labels == [1, 0]
  assert dropped == {"malformed": 3, "unknown_answer": 1}
  dgr = setup._replace(spec=spec._replace(lamol=False), ans_id=None)
  (kept_texts, *_), dropped = generative._keep(dgr, tctx, [[5], [], [6, 7]], [0] * 3,
                                               [True] * 3)
  assert kept_texts == [[5], [6, 7]] and dropped["malformed"] == 1


def test_kept_samples_become_training_rows_after_the_task_data(tiny_tokenizer_dir,
                                                              monkeypatch):
  """Before task 1, LAMOL's generator (here a stub returning known samples) writes
  the replay: the kept samples become classification rows ``text __ans__`` labelled
  by their answer, with LM rows ``GEN text __ans__ word EOS``, appended to the task's
  own data; the report counts them."""
  from cljax.methods import generative
  tok = cljax.load_tokenizer(tiny_tokenizer_dir)
  n = len(tok)
  method = registry.build("lamol", MethodConfig(lamol_gamma=0.5), BuildContext(
      num_labels=4, num_tasks=2, max_length=12, n_layer=2, head="lm", first_new_token=n,
      eos_token_id=tok.eos_token_id))
  tok.add_tokens(list(method.declares.tokens), special_tokens=True)
  gen, ans, eos = n, n + 1, tok.eos_token_id
  good = tok(" good", add_special_tokens=False)["input_ids"]
  tasks = tuple(data_lib.Task(t.name, t.source_labels, t.class_names, t.label_offset, w,
                              ("", "\nLabel:__ans__"))
                for t, w in zip(TASKS, [(" bad", " good"), (" match", " software")]))
  samples = [[5, 6, ans] + good, [7, 7], [8, ans] + good]
  asked = []

  def stub(model, params, prompts, **kwargs):
    asked.append(prompts)
    return samples, [True, True, False], 0.5
  monkeypatch.setattr(generative, "generate_texts", stub)
  ids, mask = data_lib.tokenize(["the plot"] * 6, tok, 12, prompt=tasks[1].prompt)
  train = {"input_ids": ids, "attention_mask": mask, "labels": np.full(6, 2),
           "task_ids": np.ones(6, np.int32), "class_mask": np.zeros((6, 4), bool)}
  reports = []
  tctx = TaskContext(task_index=1, train=train, tasks=tasks, tokenizer=tok,
                     report=reports.append, rng=jax.random.key(0))
  state = method.before_task(method.init(None), tctx)
  assert asked == [[gen] * 3]                                 # ceil(0.5 * 6) from task a
  assert int(state.count) == 2 and reports[0]["dropped"]["malformed"] == 1
  arrays = method.train_arrays(tctx._replace(method_state=state))
  assert data_lib.size(arrays) == 8
  np.testing.assert_array_equal(arrays["replayed"], [0] * 6 + [1, 1])
  np.testing.assert_array_equal(arrays["labels"][6:], [1, 1])   # " good" of task a
  np.testing.assert_array_equal(arrays["task_ids"][6:], [0, 0])
  np.testing.assert_array_equal(arrays["class_mask"][6], [1, 1, 0, 0])
  row = arrays["input_ids"][6][arrays["attention_mask"][6].astype(bool)].tolist()
  assert row == [5, 6, ans]
  lm = arrays["lm_input_ids"][7][arrays["lm_attention_mask"][7].astype(bool)].tolist()
  assert lm == [gen, 8, ans] + good + [eos]
  # Every kept sample is recorded with the label it trains with, and the balance.
  kept = reports[0]["kept_samples"]
  assert [(k["task"], k["label"], k["head_label"]) for k in kept] == [("a", "pos", 1)] * 2
  assert [k["text"] for k in kept] == [tok.decode([5, 6]), tok.decode([8])]
  assert reports[0]["label_balance"] == {"a": {"neg": 0, "pos": 2}}


def test_the_old_model_labels_dgr_samples_over_the_writing_task_classes(grown,
                                                                       monkeypatch):
  from cljax.methods import generative
  _, _, model, params = grown
  model = model.clone(config=model.config.replace(num_labels=4))
  params = dict(params, score={"kernel": jax.random.normal(jax.random.key(3), (32, 4))})
  method = _dgr()
  samples = [[5, 6, 7], [8], [9, 10, 11, 12]]
  monkeypatch.setattr(generative, "generate_texts",
                      lambda *a, **k: (samples, [True] * 3, 0.1))
  train = {"input_ids": np.zeros((15, 16), np.int32), "attention_mask": np.ones((15, 16)),
           "labels": np.full(15, 2), "task_ids": np.ones(15, np.int32),
           "class_mask": np.zeros((15, 4), bool)}
  reports = []
  tctx = TaskContext(task_index=1, train=train, tasks=TASKS, model=model, params=params,
                     rng=jax.random.key(0), report=reports.append,
                     tokenizer=types.SimpleNamespace(
                         decode=lambda ids: " ".join(map(str, ids))))
  state = method.before_task(method.init(params), tctx)
  ids, mask = pad_rows(samples, 16, EOS)
  logits = np.asarray(model.apply({"params": params}, ids, mask))
  np.testing.assert_array_equal(state.labels, np.argmax(logits[:, :2], axis=1))  # task a
  np.testing.assert_allclose(state.teacher_logits, logits, rtol=1e-5)
  np.testing.assert_array_equal(state.lm_input_ids[1, :3], [V, 8, EOS])   # GEN_a x EOS
  # The recorded label is the old model's, with its probability among task a's classes.
  probs = np.exp(logits[:, :2]) / np.exp(logits[:, :2]).sum(axis=1, keepdims=True)
  kept = reports[0]["kept_samples"]
  assert [k["head_label"] for k in kept] == np.argmax(logits[:, :2], axis=1).tolist()
  np.testing.assert_allclose([k["old_model_probability"] for k in kept],
                             probs.max(axis=1), rtol=1e-5)
  assert sum(reports[0]["label_balance"]["a"].values()) == 3


def test_logit_labels_replace_the_hard_label_by_distillation():
  """``gr_labels=logits``: pseudo-texts leave the main cross-entropy (weight 0) and
  are distilled to the old model's logits over their classes at temperature 2."""
  method = _dgr(gr_labels="logits", gr_lm_lambda=0.0)
  rs = np.random.RandomState(0)
  student, teacher = rs.randn(2, 4).astype(np.float32), rs.randn(2, 4).astype(np.float32)
  classes = np.array([[0, 0, 1, 1], [1, 1, 0, 0]], bool)
  batch = {"weights": np.ones(2, np.float32), "replayed": np.array([0.0, 1.0], np.float32),
           "class_mask": classes, "teacher_logits": teacher,
           "lm_input_ids": np.zeros((2, 4), np.int32), "lm_attention_mask": np.ones((2, 4)),
           "lm_loss_mask": np.zeros((2, 4), np.float32)}
  batch = method.prepare_batch((), StepContext(batch=batch))
  np.testing.assert_array_equal(batch["weights"], [1, 0])
  value, _ = method.loss((), StepContext(
      batch=batch, logits=jnp.asarray(student),
      lm_apply_fn=lambda p, i, m: jnp.zeros(i.shape + (V,))))
  t, s = teacher[1, :2] / 2, student[1, :2] / 2
  pt, ps = np.exp(t) / np.exp(t).sum(), np.exp(s) / np.exp(s).sum()
  np.testing.assert_allclose(float(value), 4 * np.sum(pt * np.log(pt / ps)), rtol=1e-5)


def _lamol(**hp):
  ctx = BuildContext(num_labels=4, num_tasks=2, max_length=16, n_layer=2, head="lm",
                     first_new_token=V, eos_token_id=EOS, answer_tokens=2)
  return registry.build("lamol", MethodConfig(**hp), ctx)


def test_lamol_qa_loss_is_the_reference_full_vocabulary_loss(grown, tmp_path):
  """``lamol_qa_loss=vocab``: transformers' causal-LM loss of the QA rows (the LM rows
  without GEN) with the answer's tokens and EOS as the only targets, averaged over the
  batch's answers; rows of weight 0 count for nothing; the study's label-word CE gets
  weight 0 (its metrics keep theirs). ``label_words`` adds no term."""
  _, _, model, params = grown
  gen, ans = V, V + 1
  rs = np.random.RandomState(0)
  answers = [[7], [11, 12], [13], [5, 6]]          # one- and two-token answers
  rows = [lm_row(gen, rs.randint(0, V - 1, n).tolist(), [3, ans], a, eos=EOS, length=16)
          for n, a in zip([4, 30, 8, 2], answers)]   # the second is cut to fit the row
  arrays = lm_arrays(rows, length=16, pad=EOS, weights={ans: 5.0})
  weights = np.array([1, 1, 1, 0], np.float32)
  lm = GPT2LM(model.config)

  def value(method):
    batch = dict(arrays, weights=weights, labels=np.zeros(4, np.int32))
    batch = method.prepare_batch((), StepContext(batch=batch))
    def apply(p, i, m, logits_index=None):
      return lm.apply({"params": p}, i, m, logits_index=logits_index)
    loss = method.loss((), StepContext(params=params, batch=batch, lm_apply_fn=apply))[0]
    return float(loss), batch

  ours, batch = value(_lamol(lamol_lm_lambda=0.0))
  np.testing.assert_array_equal(batch["ce_weights"], np.zeros(4))
  qa_ids = arrays["lm_input_ids"][:3, 1:]
  qa_mask = arrays["lm_attention_mask"][:3, 1:]
  labels = np.full(qa_ids.shape, -100)
  for i, a in enumerate(answers[:3]):
    end = int(qa_mask[i].sum())
    labels[i, end - len(a) - 1:end] = qa_ids[i, end - len(a) - 1:end]
    assert qa_ids[i, end - len(a) - 2] == ans and qa_ids[i, end - 1] == EOS
  cljax.save_pretrained(params, model.config, str(tmp_path), head="lm")
  back = transformers.GPT2LMHeadModel.from_pretrained(str(tmp_path)).eval()
  with torch.no_grad():
    ref = back(input_ids=torch.tensor(qa_ids, dtype=torch.long),
               attention_mask=torch.tensor(qa_mask),
               labels=torch.tensor(labels, dtype=torch.long)).loss.item()
  np.testing.assert_allclose(ours, ref, rtol=1e-5)
  off, batch = value(_lamol(lamol_lm_lambda=0.0, lamol_qa_loss="label_words"))
  assert off == 0.0 and "ce_weights" not in batch
  # The objective keeps the label-word CE out of the gradient, not out of the metrics.
  logits = jnp.asarray([[2.0, 0.0], [0.0, 1.0]])
  b = {"weights": jnp.ones(2), "labels": jnp.array([0, 0]), "ce_weights": jnp.zeros(2)}
  objective, sums = cljax.steps.classification_objective(logits, b)
  assert float(objective) == 0.0
  np.testing.assert_allclose(sums["loss_sum"], float(
      cljax.steps.cross_entropy(logits, b["labels"], b["weights"])), rtol=1e-6)
  assert float(sums["correct"]) == 1.0


def test_lamol_needs_the_lm_head():
  ctx = BuildContext(num_labels=4, num_tasks=2, max_length=16, n_layer=2,
                     first_new_token=V, eos_token_id=EOS)
  with pytest.raises(ValueError, match="--head=lm"):
    registry.build("lamol", MethodConfig(), ctx)
  method = registry.build("lamol", MethodConfig(), ctx.__class__(
      **{**ctx.__dict__, "head": "lm"}))
  assert method.declares.tokens == ("__lamol_gen__", "__ans__")
  assert method.declares.answer_marker == "__ans__"


# ----------------------------------------------------------------------------
# Whole runs
# ----------------------------------------------------------------------------

def _config(data_dir, tokenizer_dir, **overrides):
  kwargs = dict(tasks=("imdb", "ag_news"), data_dir=data_dir, tokenizer=tokenizer_dir,
                init="random", size="tiny", num_train=32, num_test=16, max_length=24,
                batch_size=8, eval_batch_size=16, epochs=3, learning_rate=2e-3,
                checkpoint_every=0, log_every=2, seed=0,
                method_config=MethodConfig(gen_batch_size=8))
  kwargs.update(overrides)
  return study.StudyConfig(**kwargs)


@pytest.mark.slow
def test_generative_replay_resumes_mid_task_with_the_same_pseudo_data(
    tiny_data_dir, tiny_tokenizer_dir, tmp_path):
  """Killed mid task B (after the boundary's generation), the resumed run trains on the
  generated data from the checkpoint and ends with the uninterrupted matrices."""
  cfg = _config(tiny_data_dir, tiny_tokenizer_dir, method="generative_replay",
                checkpoint_every=5)
  full = study.run(cfg, str(tmp_path / "full"))
  (report,) = full["method_reports"]
  assert report["task"] == 1 and report["requested"] == 7          # ceil(0.2 * 32)
  assert report["kept"] + sum(report["dropped"].values()) == 7
  assert report["tokens_per_second"] > 0 and report["samples"]["imdb"]
  # Task B trains on its 32 examples and the kept pseudo-texts: 3 epochs of batch 8.
  assert full["timing"]["steps_per_task"] == [12, 3 * -(-(32 + report["kept"]) // 8)]
  with open(tmp_path / "full" / "generated_samples.txt") as f:
    assert "written as imdb" in f.read()
  with open(tmp_path / "full" / "pseudo_samples.jsonl") as f:   # every kept one, labelled
    kept = [json.loads(line) for line in f]
  assert len(kept) == report["kept"] and {k["task"] for k in kept} == {"imdb"}
  assert {k["label"] for k in kept} <= {"neg", "pos"} and all(k["boundary"] == 1 for k in kept)
  assert sum(report["label_balance"]["imdb"].values()) == report["kept"]
  with open(tmp_path / "full" / "results.json") as f:
    assert "kept_samples" not in json.load(f)["method_reports"][0]
  with pytest.raises(study.Interrupted):
    study.run(cfg.replace(stop_after_steps=17), str(tmp_path / "cut"))
  resumed = study.run(cfg, str(tmp_path / "cut"), resume=True)
  assert resumed["accuracy_matrix"] == full["accuracy_matrix"]
  assert resumed["task_aware_accuracy_matrix"] == full["task_aware_accuracy_matrix"]
  timing = ("generation_seconds", "tokens_per_second")
  same = [[{k: v for k, v in r.items() if k not in timing} for r in x["method_reports"]]
          for x in (resumed, full)]
  assert same[0] == same[1]   # the same samples, generated before the checkpoint


@pytest.mark.slow
@pytest.mark.parametrize("qa_loss", ["label_words", "vocab"])
def test_lamol_runs_as_text_with_its_answer_token(tiny_data_dir, tiny_tokenizer_dir,
                                                  tmp_path, qa_loss):
  """A whole LAMOL run as text. With the label-word QA loss the tiny model learns
  IMDb; with the reference's full-vocabulary one (the default) the QA + LM objective
  falls through task A (this model learns the answer word more slowly from it)."""
  cfg = _config(tiny_data_dir, tiny_tokenizer_dir, method="lamol", head="lm",
                label_words=("imdb=bad,good", "ag_news=software,match"),
                method_config=MethodConfig(gen_batch_size=8, lamol_gamma=0.5,
                                           lamol_qa_loss=qa_loss))
  r = study.run(cfg, str(tmp_path))
  assert r["task_classes"]["imdb"]["prompt"] == ["Review: ", "\nSentiment:__ans__"]
  (report,) = r["method_reports"]
  assert report["requested"] == 16
  assert report["kept"] + sum(report["dropped"].values()) == 16
  assert r["model"]["vocab_size"] == len(cljax.load_tokenizer(tiny_tokenizer_dir)) + 2
  if qa_loss == "label_words":
    assert np.array(r["task_aware_accuracy_matrix"])[0, 0] >= 0.75
  else:
    with open(tmp_path / "metrics.jsonl") as f:
      penalty = [m["penalty"] for m in map(json.loads, f) if m.get("task") == 0
                 and "penalty" in m]
    assert len(penalty) >= 4 and max(penalty[-2:]) < 0.8 * penalty[0], penalty


@pytest.mark.slow
def test_a_lamol_runs_kept_samples_are_written_and_judged(tiny_data_dir, tiny_tokenizer_dir,
                                                          tmp_path, monkeypatch):
  """A whole LAMOL run as text whose generator (a stub) writes known samples: the kept
  ones reach pseudo_samples.jsonl as text without the answer, labelled by the answer
  word, and the report's judge (naive Bayes on IMDb's own rows) reads them."""
  from cljax.methods import generative
  tok = cljax.load_tokenizer(tiny_tokenizer_dir)
  ans = len(tok) + 1                                  # after the generation token

  def ids(text):
    return tok(text, add_special_tokens=False)["input_ids"]
  written = ([ids("Review: good great wonderful superb film\nSentiment:") + [ans]
              + ids(" good")] * 3
             + [ids("Review: bad awful boring terrible plot\nSentiment:") + [ans] + ids(" bad"),
                ids("Review: lovely best enjoyable fine acting\nSentiment:") + [ans]
                + ids(" bad"),                                            # the judge says pos
                ids("Review: no answer here")])                           # dropped: no __ans__

  def stub(model, params, prompts, **kwargs):
    return [written[i % len(written)] for i in range(len(prompts))], [True] * len(prompts), 0.1
  monkeypatch.setattr(generative, "generate_texts", stub)
  cfg = _config(tiny_data_dir, tiny_tokenizer_dir, method="lamol", head="lm", num_train=12,
                epochs=1, label_words=("imdb=bad,good", "ag_news=software,match"),
                method_config=MethodConfig(gen_batch_size=8, lamol_gamma=0.5))
  r = study.run(cfg, str(tmp_path))
  (report,) = r["method_reports"]
  assert (report["requested"], report["kept"], report["dropped"]["malformed"]) == (6, 5, 1)
  assert report["label_balance"] == {"imdb": {"neg": 2, "pos": 3}}
  with open(tmp_path / "pseudo_samples.jsonl") as f:
    kept = [json.loads(line) for line in f]
  assert [k["label"] for k in kept] == ["pos", "pos", "pos", "neg", "neg"]
  assert kept[0]["text"] == tok.decode(ids("Review: good great wonderful superb film\nSentiment:"))
  (judged,) = pseudo_labels.judge_run(str(tmp_path))
  assert (judged["task"], judged["kept"], judged["label_balance"]) == (
      "imdb", 5, {"pos": 3, "neg": 2})
  assert judged["agreement"] == pytest.approx(4 / 5)
