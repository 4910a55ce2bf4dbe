"""GPT-2 as a language model: the tied LM head against transformers' GPT2LMHeadModel,
loading and exporting LM checkpoints, compiled KV-cache generation against
``generate``, sampling filters and the causal-LM step."""

import functools
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import cljax
from cljax import steps
from cljax.models import GPT2Config, GPT2LM, init_params
from cljax.models import generation as gen_lib
from cljax.models.kv_cache import init_cache

from conftest import TINY_HF, padded_batch

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def torch_lm(tmp_path_factory):
  """(folder, torch GPT2LMHeadModel) of a tiny random LM saved by transformers."""
  torch.manual_seed(1)
  model = transformers.GPT2LMHeadModel(transformers.GPT2Config(**TINY_HF)).eval()
  folder = str(tmp_path_factory.mktemp("tiny_lm"))
  model.save_pretrained(folder)
  return folder, model


@pytest.fixture(scope="module")
def lm(torch_lm):
  return cljax.load_lm(torch_lm[0])


def _torch_logits(model, ids, mask=None):
  with torch.no_grad():
    out = model(input_ids=torch.tensor(ids, dtype=torch.long),
                attention_mask=None if mask is None else torch.tensor(mask))
  return out.logits.numpy()


def test_lm_logits_match_transformers_on_a_padded_batch(torch_lm, lm, tiny_batch):
  ids, mask = tiny_batch
  model, params = lm
  ours = np.asarray(model.apply({"params": params}, jnp.asarray(ids), jnp.asarray(mask)))
  ref = _torch_logits(torch_lm[1], ids, mask)
  assert ours.shape == ref.shape == (*ids.shape, TINY_HF["vocab_size"])
  real = mask.astype(bool)
  np.testing.assert_allclose(ours[real], ref[real], atol=1e-5, rtol=1e-5)
  assert "lm_head" not in params and "score" not in params   # tied: no new parameters


def test_an_lm_exported_loads_in_transformers_with_the_same_logits(lm, tiny_batch, tmp_path):
  model, params = lm
  folder = str(tmp_path / "export")
  cljax.save_pretrained(params, model.config, folder)
  back = transformers.GPT2LMHeadModel.from_pretrained(folder).eval()
  assert back.lm_head.weight.data_ptr() == back.transformer.wte.weight.data_ptr()   # tied
  ids, mask = tiny_batch
  ours = np.asarray(model.apply({"params": params}, jnp.asarray(ids), jnp.asarray(mask)))
  np.testing.assert_allclose(_torch_logits(back, ids, mask)[mask.astype(bool)],
                             ours[mask.astype(bool)], atol=1e-5)
  # ... and round trips into cljax bit for bit.
  _, again = cljax.load_lm(folder)
  for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(again)):
    np.testing.assert_array_equal(a, b)


def test_one_params_tree_classifies_and_generates(torch_tiny, tiny_batch):
  """A classifier's params (trunk + score) drive the LM directly: its LM head is the
  tied wte. The same trunk loaded by transformers as GPT2LMHeadModel agrees."""
  folder, _, _ = torch_tiny
  classifier, cls_params = cljax.load_pretrained(folder, num_labels=3)
  lm_model, lm_params = cljax.load_lm(folder)    # a classifier checkpoint: score ignored
  assert "score" in cls_params and "score" not in lm_params
  ids, mask = tiny_batch
  from_cls = np.asarray(lm_model.apply({"params": cls_params}, ids, mask))
  from_lm = np.asarray(lm_model.apply({"params": lm_params}, ids, mask))
  np.testing.assert_array_equal(from_cls, from_lm)
  ref = transformers.GPT2LMHeadModel.from_pretrained(folder).eval()
  np.testing.assert_allclose(from_lm[mask.astype(bool)],
                             _torch_logits(ref, ids, mask)[mask.astype(bool)], atol=1e-5)
  logits = classifier.apply({"params": cls_params}, ids, mask)
  assert logits.shape == (len(ids), 3)


def test_an_untied_lm_head_is_refused(torch_lm, tmp_path):
  from safetensors.numpy import load_file, save_file
  folder = str(tmp_path / "untied")
  os.makedirs(folder)
  tensors = load_file(os.path.join(torch_lm[0], "model.safetensors"))
  tensors["lm_head.weight"] = tensors["transformer.wte.weight"] + 1.0
  save_file(tensors, os.path.join(folder, "model.safetensors"))
  with open(os.path.join(torch_lm[0], "config.json")) as f, \
       open(os.path.join(folder, "config.json"), "w") as g:
    g.write(f.read())
  with pytest.raises(ValueError, match="lm_head.weight differs from .*wte"):
    cljax.load_lm(folder)


# ----------------------------------------------------------------------------
# Generation
# ----------------------------------------------------------------------------

PROMPT_LENGTHS = [7, 3, 12, 1, 9]


def _prompts(lengths=PROMPT_LENGTHS, width=12, seed=3):
  return padded_batch(lengths, width, TINY_HF["vocab_size"], TINY_HF["pad_token_id"],
                      seed=seed)


def test_greedy_generation_equals_transformers_generate(torch_lm, lm):
  """Prompts of different lengths: ours right-padded, transformers' left-padded."""
  ids, mask = _prompts()
  model, params = lm
  new = 10
  ours = np.asarray(cljax.generate(model, params, ids, mask, max_new_tokens=new))
  pad = TINY_HF["pad_token_id"]
  width = ids.shape[1]
  left = np.full_like(ids, pad)
  left_mask = np.zeros_like(mask)
  for b, n in enumerate(PROMPT_LENGTHS):
    left[b, width - n:] = ids[b, :n]
    left_mask[b, width - n:] = 1
  with torch.no_grad():
    ref = torch_lm[1].generate(input_ids=torch.tensor(left, dtype=torch.long),
                               attention_mask=torch.tensor(left_mask), do_sample=False,
                               max_new_tokens=new, pad_token_id=pad,
                               eos_token_id=TINY_HF["eos_token_id"]).numpy()[:, width:]
  assert ours.shape == (len(ids), new)
  np.testing.assert_array_equal(ours[:, :ref.shape[1]], ref)
  assert (ours[:, ref.shape[1]:] == pad).all()


def _cached_logits(model, params, ids, mask, tokens):
  """Logits of every step of the cached path (prefill, then one token per step)."""
  B, P = ids.shape
  lengths = mask.sum(1)
  cache = init_cache(model.config, B, P + tokens.shape[1])
  logits, cache = model.apply({"params": params}, ids, mask,
                              positions=jnp.broadcast_to(jnp.arange(P), (B, P)),
                              cache=cache, logits_index=jnp.asarray(lengths - 1))
  out = [logits]
  for t in range(tokens.shape[1] - 1):
    logits, cache = gen_lib._decode(model, params, jnp.asarray(tokens[:, t]),
                                    jnp.asarray(lengths + t), P + t, cache)
    out.append(logits)
  return np.stack(out, 1)


def test_cached_decoding_equals_recomputing_the_whole_sequence(lm):
  ids, mask = _prompts()
  model, params = lm
  rng = jax.random.key(0)
  tokens = np.asarray(cljax.generate(model, params, ids, mask, max_new_tokens=8, rng=rng,
                                     temperature=1.0))
  cached = _cached_logits(model, params, ids, mask, tokens)
  for b, n in enumerate(PROMPT_LENGTHS):
    full_ids = np.concatenate([ids[b, :n], tokens[b]])[None]
    full = np.asarray(model.apply({"params": params}, full_ids))[0]
    np.testing.assert_allclose(cached[b], full[n - 1:n - 1 + tokens.shape[1]], atol=1e-5)


def test_eos_stops_a_row_and_the_rest_is_padding(lm):
  ids, mask = _prompts()
  model, params = lm
  free = np.asarray(cljax.generate(model, params, ids, mask, max_new_tokens=8,
                                   eos_token_id=0))   # token 0: rarely the argmax
  eos = int(free[0, 2])   # make row 0's third token the EOS
  stopped = np.asarray(cljax.generate(model, params, ids, mask, max_new_tokens=8,
                                      eos_token_id=eos, pad_token_id=5))
  for b in range(len(ids)):
    hits = np.flatnonzero(free[b] == eos)
    if len(hits) == 0:
      np.testing.assert_array_equal(stopped[b], free[b])
      continue
    first = hits[0]
    np.testing.assert_array_equal(stopped[b, :first + 1], free[b, :first + 1])
    assert (stopped[b, first + 1:] == 5).all()
  first = int(np.flatnonzero(free[0] == eos)[0])    # 2, or earlier if it came before
  assert stopped[0, first] == eos and (stopped[0, first + 1:] == 5).all() and first <= 2


def test_no_retrace_for_new_prompts_of_the_same_bucket():
  config = GPT2Config.from_size("tiny", vocab_size=97, n_positions=128, pad_token_id=96,
                                eos_token_id=96)
  model = GPT2LM(config)
  params = init_params(model, jax.random.key(0))
  before = gen_lib._generate._cache_size()
  for seed, lengths in enumerate(([5, 9], [12, 2], [30, 17], [32, 1])):
    ids, mask = _prompts(lengths, width=max(lengths) + seed, seed=seed)
    cljax.generate(model, params, ids, mask, max_new_tokens=4)
  assert gen_lib._generate._cache_size() - before == 1
  ids, mask = _prompts([33, 4], width=40)       # the next bucket: one more program
  cljax.generate(model, params, ids, mask, max_new_tokens=4)
  assert gen_lib._generate._cache_size() - before == 2


def test_top_k_and_top_p_keep_exactly_transformers_sets():
  """On logits we control, the tokens a filter allows are transformers' warpers'
  (temperature, then top-k, then top-p), and samples never leave that set."""
  from transformers.generation.logits_process import (TemperatureLogitsWarper,
                                                      TopKLogitsWarper, TopPLogitsWarper)
  rs = np.random.RandomState(0)
  logits = rs.randn(6, 50).astype(np.float32) * 2
  for temperature, top_k, top_p in [(1.0, 5, None), (0.7, None, 0.6), (1.3, 10, 0.9),
                                    (1.0, None, 0.05), (1.0, 1, None)]:
    ref = torch.tensor(logits)
    ref = TemperatureLogitsWarper(temperature)(None, ref)
    if top_k:
      ref = TopKLogitsWarper(top_k)(None, ref)
    if top_p:
      ref = TopPLogitsWarper(top_p)(None, ref)
    allowed = np.isfinite(ref.numpy())
    keys = jax.random.split(jax.random.key(1), 400)
    sample = functools.partial(gen_lib.sample_logits, jnp.asarray(logits),
                               temperature=temperature, top_k=top_k, top_p=top_p)
    draws = np.asarray(jax.vmap(sample)(keys))
    seen = np.zeros_like(allowed)
    for row in range(len(logits)):
      seen[row, np.unique(draws[:, row])] = True
    assert not (seen & ~allowed).any(), (temperature, top_k, top_p)
    assert seen.sum() >= min(allowed.sum(), 0.5 * allowed.sum() + 1)   # the set is used


def test_sampling_follows_the_renormalized_distribution():
  probs = np.array([0.5, 0.3, 0.15, 0.05])
  logits = jnp.log(jnp.asarray(probs))[None]
  keys = jax.random.split(jax.random.key(2), 4000)
  draws = np.asarray(jax.vmap(lambda k: gen_lib.sample_logits(
      logits, k, temperature=1.0, top_p=0.8))(keys))[:, 0]
  freq = np.bincount(draws, minlength=4) / len(draws)
  np.testing.assert_allclose(freq, [0.5 / 0.8, 0.3 / 0.8, 0, 0], atol=0.03)


@pytest.mark.parametrize("kwargs, match", [
    (dict(top_p=0.0, temperature=1.0), r"top_p=0.0: expected a value in \(0, 1\]"),
    (dict(top_p=1.5, temperature=1.0), "top_p=1.5"),
    (dict(top_k=0, temperature=1.0), "top_k=0"),
    (dict(temperature=1.0, rng=None), "needs rng"),
    (dict(max_new_tokens=30), "exceeds the model's n_positions=32"),
    (dict(max_new_tokens=0), "max_new_tokens=0"),
])
def test_bad_generation_settings_are_one_line_errors(lm, kwargs, match):
  model, params = lm
  ids, mask = _prompts()
  kwargs = {"max_new_tokens": 4, "rng": jax.random.key(0), **kwargs}
  with pytest.raises(ValueError, match=match):
    cljax.generate(model, params, ids, mask, **kwargs)


def test_left_padded_prompts_are_refused(lm):
  model, params = lm
  ids, mask = _prompts([3, 5], width=5)
  with pytest.raises(ValueError, match="right-padded"):
    cljax.generate(model, params, ids, mask[:, ::-1], max_new_tokens=2)


# ----------------------------------------------------------------------------
# The causal-LM step
# ----------------------------------------------------------------------------

def test_lm_loss_counts_only_masked_target_tokens():
  config = GPT2Config(**{k: v for k, v in TINY_HF.items() if k != "bos_token_id"},
                      embd_pdrop=0.0, attn_pdrop=0.0, resid_pdrop=0.0)
  model = GPT2LM(config)
  params = init_params(model, jax.random.key(0))
  ids, mask = padded_batch([9, 6, 4], 10, TINY_HF["vocab_size"], TINY_HF["pad_token_id"])
  loss_mask = np.zeros_like(mask)
  loss_mask[0, 5:9] = 1      # a response after a 5-token prompt
  loss_mask[1, 1:6] = 1      # everything after the first token
  batch = {"input_ids": ids, "attention_mask": mask, "loss_mask": loss_mask}
  logits = np.asarray(model.apply({"params": params}, ids, mask), np.float64)
  logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
  expect = -sum(logp[b, t - 1, ids[b, t]] for b, t in zip(*np.nonzero(loss_mask)))
  tx = optax.sgd(0.0)
  state = steps.init_train_state(params, tx, jax.random.key(1))
  _, m = steps.lm_train_step(state, batch, model=model, tx=tx, deterministic=True)
  np.testing.assert_allclose(float(m["loss_sum"]), expect, rtol=1e-5)
  assert float(m["count"]) == loss_mask.sum() == 9
  ev = steps.lm_eval_step(params, batch, model=model)
  np.testing.assert_allclose(float(ev["loss_sum"]), expect, rtol=1e-5)
  # Changing a token that is neither a target nor before one changes nothing.
  ids2 = ids.copy()
  ids2[2, 2] = (ids2[2, 2] + 1) % 90
  _, m2 = steps.lm_train_step(state, {**batch, "input_ids": ids2}, model=model, tx=tx,
                              deterministic=True)
  assert float(m2["loss_sum"]) == pytest.approx(float(m["loss_sum"]), rel=1e-6)


def test_the_lm_step_learns_a_sequence():
  config = GPT2Config.from_size("tiny", vocab_size=32, n_positions=16, pad_token_id=31,
                                eos_token_id=31)
  model = GPT2LM(config)
  params = init_params(model, jax.random.key(0))
  ids = np.array([[3, 1, 4, 1, 5, 9, 2, 6, 5, 3, 31, 31]] * 4, np.int32)
  mask = (ids != 31).astype(np.int32)
  mask[:, 10] = 1   # the EOS is a target
  batch = {"input_ids": ids, "attention_mask": mask, "loss_mask": mask}
  tx = optax.adam(3e-3)
  state = steps.init_train_state(params, tx, jax.random.key(1))
  step = jax.jit(lambda s, b: steps.lm_train_step(s, b, model=model, tx=tx))
  losses = []
  for _ in range(60):
    state, m = step(state, batch)
    losses.append(float(m["loss_sum"] / m["count"]))
  assert losses[-1] < 0.1 * losses[0]
  out = cljax.generate(model, state.params, ids[:1, :3], mask[:1, :3], max_new_tokens=8)
  assert np.asarray(out)[0].tolist() == [1, 5, 9, 2, 6, 5, 3, 31]


# ----------------------------------------------------------------------------
# Classification as text (--head=lm)
# ----------------------------------------------------------------------------

def test_label_word_logits_are_the_lm_next_token_logits(torch_lm, lm, tiny_batch):
  """GPT2LabelWords reads transformers' GPT2LMHeadModel next-token logits after the
  last real token, at the label words' tokens, from the same (LM) params."""
  from cljax.models import GPT2LabelWords
  ids, mask = tiny_batch
  lm_model, params = lm
  words = (5, 17, 3, 60)
  model = GPT2LabelWords(lm_model.config, words)
  ours = np.asarray(model.apply({"params": params}, ids, mask))
  ref = _torch_logits(torch_lm[1], ids, mask)
  last = cljax.models.pool_index(jnp.asarray(ids), TINY_HF["pad_token_id"])
  expect = ref[np.arange(len(ids)), np.asarray(last)][:, list(words)]
  np.testing.assert_allclose(ours, expect, atol=1e-5)
