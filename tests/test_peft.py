"""LoRA, adapters and the per-task methods: the modules against plain GPT-2 and
transformers, the freezing, task inference and O-LoRA's penalty by hand."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import cljax
from cljax import study
from cljax.methods import BuildContext, MethodConfig, StepContext, build, peft
from cljax.models import (GPT2Classifier, GPT2Config, GPT2LM, add_peft_params, init_params,
                         merge_lora, peft_slot_of)
from cljax.train.progress import StepLogger, Writers

BASE = GPT2Config(vocab_size=97, n_positions=32, n_embd=32, n_layer=2, n_head=4,
                  num_labels=3, pad_token_id=96, eos_token_id=96)
PEFT = BASE.replace(lora_rank=4, lora_alpha=8.0, lora_targets=("c_attn", "c_proj", "c_fc"),
                    adapter_size=8, peft_slots=3)


def _randomize_peft(params, seed=0):
  """Every LoRA / adapter leaf random (a trained module), the base leaves as they are."""
  leaves, treedef = jax.tree_util.tree_flatten_with_path(params)
  keys = jax.random.split(jax.random.PRNGKey(seed), len(leaves))
  out = [0.1 * jax.random.normal(k, x.shape) if peft_slot_of(p) is not None else x
         for (p, x), k in zip(leaves, keys)]
  return jax.tree_util.tree_unflatten(treedef, out)


@pytest.fixture(scope="module")
def base_params():
  return init_params(GPT2Classifier(BASE), jax.random.PRNGKey(0))


def test_new_modules_leave_every_logit_unchanged(base_params, tiny_batch):
  ids, mask = tiny_batch
  model = GPT2Classifier(PEFT)
  params = add_peft_params(model, base_params, jax.random.PRNGKey(1))
  plain = GPT2Classifier(BASE).apply({"params": base_params}, ids, mask)
  for slot in (None, jnp.zeros(len(ids), jnp.int32), jnp.arange(len(ids)) % 3):
    np.testing.assert_array_equal(model.apply({"params": params}, ids, mask, peft_slot=slot),
                                  plain)
  lm_plain = GPT2LM(BASE).apply({"params": base_params}, ids, mask)
  np.testing.assert_array_equal(GPT2LM(PEFT).apply({"params": params}, ids, mask), lm_plain)
  # The base leaves are the same objects' values; the new ones are all LoRA / adapter.
  flat = jax.tree_util.tree_flatten_with_path(params)[0]
  assert {peft_slot_of(p) for p, _ in flat} == {None, 0, 1, 2}


def test_a_slot_is_its_own_model(base_params, tiny_batch):
  """Per-example slots give each row the logits of its slot alone, and the sum of
  slots (no peft_slot) is the LoRA sum, checked against merged weights."""
  ids, mask = tiny_batch
  model = GPT2Classifier(PEFT.replace(adapter_size=0))
  params = _randomize_peft(add_peft_params(model, base_params, jax.random.PRNGKey(1)))
  slots = jnp.asarray([0, 1, 2, 0, 1, 2])
  mixed = model.apply({"params": params}, ids, mask, peft_slot=slots)
  for s in range(3):
    alone = model.apply({"params": params}, ids, mask, peft_slot=jnp.full(6, s))
    np.testing.assert_allclose(mixed[slots == s], alone[slots == s], atol=1e-6)
    merged, config = merge_lora(params, model.config, slot=s)
    np.testing.assert_allclose(GPT2Classifier(config).apply({"params": merged}, ids, mask),
                               alone, atol=1e-5)
  summed, config = merge_lora(params, model.config)
  np.testing.assert_allclose(GPT2Classifier(config).apply({"params": summed}, ids, mask),
                             model.apply({"params": params}, ids, mask), atol=1e-5)


def test_merged_lora_exports_a_plain_folder_transformers_loads(base_params, tiny_batch,
                                                               tmp_path):
  torch = pytest.importorskip("torch")
  import transformers
  model = GPT2Classifier(PEFT.replace(adapter_size=0, peft_slots=1))
  params = _randomize_peft(add_peft_params(model, base_params, jax.random.PRNGKey(1)))
  with pytest.raises(ValueError, match="merge LoRA first"):
    cljax.save_pretrained(params, model.config, str(tmp_path / "unmerged"))
  merged, config = merge_lora(params, model.config)
  cljax.save_pretrained(merged, config, str(tmp_path / "merged"))
  ref = transformers.GPT2ForSequenceClassification.from_pretrained(str(tmp_path / "merged"))
  ids, mask = tiny_batch
  with torch.no_grad():
    theirs = ref.eval()(torch.tensor(ids, dtype=torch.long),
                        attention_mask=torch.tensor(mask)).logits.numpy()
  np.testing.assert_allclose(theirs, model.apply({"params": params}, ids, mask), atol=1e-5)
  with pytest.raises(ValueError, match="not linear updates"):
    merge_lora(params, PEFT)


# ----------------------------------------------------------------------------
# Task inference and O-LoRA by hand
# ----------------------------------------------------------------------------

def test_task_inference_keeps_the_most_confident_trained_slot():
  # Slot s's "model": fixed logits per slot, so the entropies are known.
  table = jnp.asarray([[[4.0, 0.0, 9.0, 9.0]] * 3,      # slot 0: confident, task 0 classes
                       [[0.0, 0.0, 0.1, 0.0]] * 3,      # slot 1: unsure
                       [[0.0, 0.0, 0.0, 8.0]] * 3])     # slot 2: never trained
  def apply_fn(params, batch, deterministic=True, rng=None):
    return table[batch["peft_slot"], jnp.arange(3)]
  state = peft.PerTaskState(jnp.asarray([True, True, False]),
                            jnp.asarray([[1, 1, 0, 0], [0, 0, 1, 1], [0, 0, 0, 0]], bool))
  batch = {"labels": jnp.asarray([0, 2, 1]), "task_ids": jnp.asarray([0, 1, 0]),
           "weights": jnp.asarray([1.0, 1.0, 0.0])}
  logits, given, sums = peft.infer_task(state, StepContext(params=None, batch=batch,
                                                           apply_fn=apply_fn), "entropy")
  # Slot 0 (entropy of softmax(4, 0) over classes 0, 1) beats slot 1 (near log 2);
  # slot 2 has the lowest entropy of all but has not been trained: never chosen.
  np.testing.assert_array_equal(np.asarray(logits), [[4.0, 0.0, -1e9, -1e9]] * 3)
  np.testing.assert_array_equal(np.asarray(given), np.asarray(table[jnp.asarray([0, 1, 0]),
                                                                    jnp.arange(3)]))
  assert float(sums["task_inference_correct"]) == 1.0   # row 0 right, row 1 wrong, row 2 pad


def test_olora_penalty_by_hand():
  rs = np.random.RandomState(0)
  A = [rs.randn(5, 2).astype(np.float32) for _ in range(3)]
  B = [rs.randn(2, 4).astype(np.float32) for _ in range(3)]
  params = {"h_0": {"attn": {"c_attn_lora": {**{f"A_{s}": A[s] for s in range(3)},
                                             **{f"B_{s}": B[s] for s in range(3)}}}}}
  got = float(peft.olora_penalty(params, jnp.int32(2), 0.5, 0.1))
  orth = np.abs(A[0].T @ A[2]).sum() + np.abs(A[1].T @ A[2]).sum()
  expected = 0.5 * orth + 0.1 * (np.linalg.norm(A[2]) + np.linalg.norm(B[2]))
  assert got == pytest.approx(expected, rel=1e-5)
  assert float(peft.olora_penalty(params, jnp.int32(0), 0.5, 0.0)) == 0.0
  # A new B starts at zero: the norm's gradient there is 0, not NaN.
  params["h_0"]["attn"]["c_attn_lora"]["B_2"] = np.zeros((2, 4), np.float32)
  grads = jax.grad(peft.olora_penalty)(params, jnp.int32(2), 0.5, 0.1)
  assert all(np.isfinite(np.asarray(g)).all() for g in jax.tree.leaves(grads))


def test_bad_lora_targets_are_one_line():
  ctx = BuildContext(num_labels=4, num_tasks=2, max_length=8, n_layer=1)
  with pytest.raises(ValueError, match="--lora_targets='q_proj'.*c_attn"):
    build("lora_per_task", MethodConfig(lora_targets="q_proj"), ctx)
  with pytest.raises(ValueError, match="At most one"):
    build("lora_per_task+olora", MethodConfig(), ctx)


# ----------------------------------------------------------------------------
# In the study: frozen base, earlier modules untouched
# ----------------------------------------------------------------------------

def _numpy(tree):
  return jax.tree.map(lambda x: np.array(x), tree)


@pytest.mark.slow
@pytest.mark.parametrize("method", ["lora_per_task", "adapter_per_task"])
def test_training_moves_only_the_current_slot(method, tiny_data_dir, tiny_tokenizer_dir,
                                              tmp_path):
  cfg = study.StudyConfig(tasks=("imdb", "ag_news"), data_dir=tiny_data_dir,
                          tokenizer=tiny_tokenizer_dir, init="random", size="tiny",
                          num_train=16, num_test=16, max_length=24, batch_size=8,
                          eval_batch_size=16, epochs=1, learning_rate=1e-2,
                          checkpoint_every=0, method=method,
                          method_config=MethodConfig(lora_rank=2, adapter_size=4))
  s = study.setup(cfg, str(tmp_path))
  start = _numpy(s.initial_params)
  state, record = study.start(s)
  logger = StepLogger(Writers(str(tmp_path), enabled=False), 100, lambda: None)
  after = []
  for k in range(2):
    state, plan = study.start_task(s, k, state, record)
    state = study.train_task(s, plan, state, record, logger)
    state = study.finish_task(s, plan, state, record, logger)
    after.append(_numpy(state.params))
  s.checkpointer.close()

  def leaves(tree):
    return {jax.tree_util.keystr(p): x for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]}
  first, second, initial = leaves(after[0]), leaves(after[1]), leaves(start)
  slot = {p: peft_slot_of(path) for path, _ in jax.tree_util.tree_flatten_with_path(start)[0]
          for p in [jax.tree_util.keystr(path)]}
  for name, x in initial.items():
    if slot[name] is None and "score" not in name:       # the base: bit-identical
      np.testing.assert_array_equal(second[name], x, err_msg=name)
    if slot[name] == 0:                                  # task 0's module, after task 1
      np.testing.assert_array_equal(second[name], first[name], err_msg=name)
  moved = [n for n in initial if slot[n] == 1 and not np.array_equal(second[n], first[n])]
  assert moved                                           # task 1 trained its own slot
  head0 = second["['score']['kernel']"][:, :2]           # IMDb's head rows, after AG News
  np.testing.assert_array_equal(head0, first["['score']['kernel']"][:, :2])
  inference = record.ended("task_inference_accuracy")
  assert inference and len(inference[1]) == 2
  assert record.tasks[0].trainable_parameters < sum(x.size for x in initial.values()) / 10


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_resume_mid_task_with_per_task_modules(arch, tiny_data_dir, tiny_tokenizer_dir,
                                               tmp_path):
  """A checkpoint inside task 1 holds task 1's optimizer (slot 1 trainable, the rest
  without optimizer state); resuming restores it and ends with the same matrices, on
  GPT-2 and on a grouped-query Llama."""
  cfg = study.StudyConfig(tasks=("imdb", "ag_news"), data_dir=tiny_data_dir,
                          tokenizer=tiny_tokenizer_dir, init="random", size="tiny", arch=arch,
                          num_train=32, num_test=16, max_length=24, batch_size=8,
                          eval_batch_size=16, epochs=1, learning_rate=1e-2,
                          checkpoint_every=1, method="lora_per_task",
                          method_config=MethodConfig(lora_rank=2))
  full = study.run(cfg, str(tmp_path / "full"))
  with pytest.raises(study.Interrupted):
    study.run(cfg.replace(stop_after_steps=6), str(tmp_path / "cut"))
  resumed = study.run(cfg, str(tmp_path / "cut"), resume=True)
  for key in ("accuracy_matrix", "task_aware_accuracy_matrix",
              "task_inference_accuracy_matrix"):
    assert resumed[key] == full[key], key
  assert full["model"]["trainable_parameters_per_task"][0] < full["model"]["parameters"] / 10


def test_soft_prompts_unused_or_empty_give_the_base_logits_and_padding_pools(base_params,
                                                                            tiny_batch):
  ids, mask = tiny_batch
  plain = GPT2Classifier(BASE).apply({"params": base_params}, ids, mask)
  empty = GPT2Classifier(BASE.replace(prompt_length=0, peft_slots=2))
  np.testing.assert_array_equal(empty.apply({"params": base_params}, ids, mask), plain)
  model = GPT2Classifier(BASE.replace(prompt_length=3, peft_slots=2))
  params = add_peft_params(model, base_params, jax.random.PRNGKey(1))
  none = jnp.zeros((len(ids), 2), bool)
  np.testing.assert_allclose(model.apply({"params": params}, ids, mask, prompt_active=none),
                             plain, atol=1e-6)
  first = jnp.asarray([[True, False]] * len(ids))
  with_prompt = model.apply({"params": params}, ids, mask, prompt_active=first)
  assert np.abs(with_prompt - plain).max() > 1e-3
  # Pooling still finds each row's last real token: a row alone, cut to its length,
  # gives the logits it has in the padded batch.
  for i in range(len(ids)):
    n = int(mask[i].sum())
    alone = model.apply({"params": params}, ids[i:i + 1, :n], mask[i:i + 1, :n],
                        prompt_active=first[:1])
    np.testing.assert_allclose(alone[0], with_prompt[i], atol=1e-5)
  # Slot 1's prompt in front of slot 0's: [P_1; P_0; x] is not [P_0; x].
  both = model.apply({"params": _randomize_peft(params)}, ids, mask,
                     prompt_active=jnp.ones((len(ids), 2), bool))
  assert np.abs(both - with_prompt).max() > 1e-3


def test_pnn_columns_start_as_plain_gpt2_and_read_only_earlier_columns(base_params,
                                                                      tiny_batch):
  ids, mask = tiny_batch
  plain = GPT2Classifier(BASE).apply({"params": base_params}, ids, mask)
  model = GPT2Classifier(BASE.replace(pnn_columns=3))
  params = add_peft_params(model, base_params, jax.random.PRNGKey(1))
  for c in range(3):   # column 1 is the loaded GPT-2; new columns are copies of it
    np.testing.assert_array_equal(
        model.apply({"params": params}, ids, mask, peft_slot=jnp.full(len(ids), c)), plain)
  # Laterals on: column 2 depends on columns 0 and 1, column 0 on nothing else.
  trained = _randomize_all_laterals(params)
  col = {c: model.apply({"params": trained}, ids, mask, peft_slot=jnp.full(len(ids), c))
         for c in range(3)}
  np.testing.assert_array_equal(col[0], plain)
  assert np.abs(col[2] - plain).max() > 1e-3
  moved = {**trained, "h_0": jax.tree.map(lambda x: x + 0.05, trained["h_0"])}
  again = {c: model.apply({"params": moved}, ids, mask, peft_slot=jnp.full(len(ids), c))
           for c in range(3)}
  assert all(np.abs(again[c] - col[c]).max() > 1e-4 for c in range(3))
  shifted = {**trained, "col2_h_0": jax.tree.map(lambda x: x + 0.05, trained["col2_h_0"])}
  for c in (0, 1):
    np.testing.assert_array_equal(
        model.apply({"params": shifted}, ids, mask, peft_slot=jnp.full(len(ids), c)), col[c])
  mask0 = peft.column_trainable(params, 0)
  mask1 = peft.column_trainable(params, 1)
  assert mask0["h_0"]["attn"]["c_attn"]["kernel"] and not mask1["h_0"]["attn"]["c_attn"]["kernel"]
  assert mask1["col1_lateral_1"]["U_0"] and not mask1["col2_h_0"]["ln_1"]["scale"]
  with pytest.raises(ValueError, match="refused above GPT-2 small's width"):
    build("pnn", MethodConfig(), BuildContext(num_labels=4, num_tasks=2, max_length=8,
                                              n_layer=1, n_embd=1024))


def _randomize_all_laterals(params):
  out = dict(params)
  for name in params:
    if "lateral" in name:
      out[name] = jax.tree.map(lambda x: 0.2 * jax.random.normal(jax.random.PRNGKey(3),
                                                                 x.shape) + 0.0 * x,
                               params[name])
  return out


@pytest.mark.slow
def test_per_task_lora_as_text_infers_the_task_by_perplexity(tiny_data_dir, tiny_tokenizer_dir,
                                                             tmp_path):
  cfg = study.StudyConfig(tasks=("imdb", "ag_news"), data_dir=tiny_data_dir,
                          tokenizer=tiny_tokenizer_dir, init="random", size="tiny",
                          num_train=32, num_test=16, max_length=24, batch_size=8,
                          eval_batch_size=16, epochs=2, learning_rate=1e-2,
                          checkpoint_every=0, head="lm", method="lora_per_task",
                          label_words=("imdb=bad,good", "ag_news=software,match"),
                          method_config=MethodConfig(lora_rank=2, peft_infer="perplexity"))
  r = study.run(cfg, str(tmp_path))
  inference = np.array(r["task_inference_accuracy_matrix"])
  assert inference.shape == (2, 2) and ((0 <= inference) & (inference <= 1)).all()
  assert inference[0, 0] == 1.0 and inference[0, 1] == 0.0   # one slot: always slot 0
  assert r["model"]["trainable_parameters_per_task"][0] < r["model"]["parameters"] / 10


def test_replayed_rows_take_their_task_slot_and_the_prompts_in_use():
  ctx = BuildContext(num_labels=4, num_tasks=2, max_length=4, n_layer=1, pad_token_id=96)
  from cljax.methods import replay
  stored = {"input_ids": jnp.ones((2, 4), jnp.int32), "attention_mask": jnp.ones((2, 4), jnp.int32),
            "labels": jnp.asarray([0, 1]), "task_ids": jnp.asarray([0, 0]),
            "class_mask": jnp.asarray([[1, 1, 0, 0]] * 2, bool), "weights": jnp.ones(2)}
  incoming = dict(stored, labels=jnp.asarray([2, 3, 2]), task_ids=jnp.asarray([1, 1, 1]),
                  class_mask=jnp.asarray([[0, 0, 1, 1]] * 3, bool), weights=jnp.ones(3),
                  input_ids=jnp.ones((3, 4), jnp.int32),
                  attention_mask=jnp.ones((3, 4), jnp.int32))
  for spec, key, expected in [("lora_per_task+replay", "peft_slot", [1, 1, 1, 0, 0]),
                              ("progressive_prompts+replay", "prompt_active",
                               [[True, True]] * 5)]:
    method = build(spec, MethodConfig(replay_size=2, replay_batch_size=2), ctx)
    first, buf = method.init(None)
    buf = replay.add(buf, stored, jax.random.PRNGKey(0))
    if spec.startswith("progressive"):
      first = jnp.int32(1)
    out = method.prepare_batch((first, buf), StepContext(batch=incoming,
                                                         rng=jax.random.PRNGKey(1)))
    np.testing.assert_array_equal(np.asarray(out[key]), expected)
    # incoming rows over their task's classes, replayed rows over every class
    np.testing.assert_array_equal(np.asarray(out["ce_exclude"]),
                                  [[True, True, False, False]] * 3 + [[False] * 4] * 2)
