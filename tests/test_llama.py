"""The Llama family (Llama with the llama3 RoPE scaling, Mistral, Qwen2, Qwen3) against
transformers' torch models on tiny random configs: classifier and LM logits in float32
with right padding, grouped-query attention with 1 and 2 key-value heads, tied and
untied embeddings, Qwen2's biases and Qwen3's q/k norms."""

import functools

import jax
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from cljax.models import llama  # noqa: E402
from cljax.models.heads import GPT2LM, GPT2Classifier  # noqa: E402
from family_parity import assert_greedy_equal, assert_logits_equal  # noqa: E402

PAD = 0
TINY = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
            num_attention_heads=4, max_position_embeddings=64, pad_token_id=PAD,
            num_labels=3)
CASES = {
    "llama_gqa2_llama3_rope": ("LlamaConfig", dict(num_key_value_heads=2, rope_scaling={
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
        "high_freq_factor": 4.0, "original_max_position_embeddings": 16}, rope_theta=500.0)),
    "llama_mqa_tied_bias": ("LlamaConfig", dict(num_key_value_heads=1,
                                                tie_word_embeddings=True, attention_bias=True)),
    "mistral_gqa2": ("MistralConfig", dict(num_key_value_heads=2, sliding_window=None)),
    "qwen2_biases_tied": ("Qwen2Config", dict(num_key_value_heads=2, tie_word_embeddings=True)),
    "qwen3_norms_head_dim": ("Qwen3Config", dict(num_key_value_heads=2, head_dim=24)),
}


def _inputs():
  rs = np.random.RandomState(0)
  ids = rs.randint(1, 128, (3, 11))
  lengths = [11, 7, 4]
  mask = np.arange(11)[None] < np.asarray(lengths)[:, None]
  return np.where(mask, ids, PAD), mask.astype(np.int64)


@pytest.fixture(scope="module", params=sorted(CASES))
def case(request):
  kind, extra = CASES[request.param]
  hf_cfg = getattr(transformers, kind)(**TINY, **extra, attn_implementation="eager")
  torch.manual_seed(0)
  lm = transformers.AutoModelForCausalLM.from_config(hf_cfg).eval()
  torch.manual_seed(1)
  clf = transformers.AutoModelForSequenceClassification.from_config(hf_cfg).eval()
  return hf_cfg, lm, clf


@pytest.mark.parametrize("head", ["lm", "classifier"])
def test_the_logits_equal_transformers(case, head):
  hf_cfg, lm, clf = case
  cfg = llama.LlamaConfig.from_hf(hf_cfg.to_dict())
  assert_logits_equal(cfg, llama.llama_params, lm if head == "lm" else clf, head, *_inputs())


def test_an_unsupported_rope_or_window_is_one_line():
  with pytest.raises(ValueError, match="supported are default and llama3"):
    llama.LlamaConfig.from_hf({"model_type": "llama", "rope_scaling": {"rope_type": "yarn"}})
  with pytest.raises(ValueError, match="sliding-window attention is not implemented"):
    llama.LlamaConfig.from_hf({"model_type": "qwen2", "use_sliding_window": True})
  with pytest.raises(ValueError, match="the Llama family here is llama, mistral"):
    llama.LlamaConfig(model_type="gpt_neox")
  # Mistral's window: full attention equals it up to the window; longer is refused
  hf = transformers.MistralConfig(**TINY, num_key_value_heads=2, sliding_window=8).to_dict()
  cfg = llama.LlamaConfig.from_hf(hf)
  assert cfg.n_positions == 8 and llama.LlamaConfig.from_hf(
      {**hf, "model_type": "qwen2"}).n_positions == TINY["max_position_embeddings"]
  ids = np.ones((1, 9), np.int32)
  with pytest.raises(ValueError, match="Sequence length 9 exceeds n_positions=8"):
    GPT2LM(cfg).init(jax.random.key(0), ids)


@pytest.mark.parametrize("kind", ["Qwen3Config", "GPTNeoXConfig"])
def test_a_saved_sharded_folder_loads_through_the_public_contract(kind, tmp_path):
  """transformers' save_pretrained (safetensors, sharded: an index) -> cljax.load_lm and
  cljax.load_pretrained give the torch models' logits; the study's classifier that keeps
  the LM head (for generative replay) keeps the checkpoint's."""
  import cljax
  extra = (dict(num_key_value_heads=2) if kind == "Qwen3Config"
           else dict(hidden_dropout=0.0, attention_dropout=0.0))
  hf_cfg = getattr(transformers, kind)(**TINY, **extra, attn_implementation="eager")
  ids, mask = _inputs()
  for loader, auto in ((cljax.load_lm, transformers.AutoModelForCausalLM),
                       (cljax.load_pretrained, transformers.AutoModelForSequenceClassification)):
    torch.manual_seed(0)
    torch_model = auto.from_config(hf_cfg).eval()
    folder = tmp_path / auto.__name__
    torch_model.save_pretrained(folder, max_shard_size="100KB")
    assert (folder / "model.safetensors.index.json").exists()
    with torch.no_grad():
      want = torch_model(input_ids=torch.tensor(ids),
                         attention_mask=torch.tensor(mask)).logits.numpy()
    model, params = loader(str(folder), **({} if loader is cljax.load_lm else {"num_labels": 3}))
    got = np.asarray(model.apply({"params": params}, ids, mask))
    if loader is cljax.load_lm:
      got, want = got[mask.astype(bool)], want[mask.astype(bool)]
      lm_folder = folder
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)
  from cljax.models import build
  from cljax.study import StudyConfig
  tokenizer = type("Tokenizer", (), {"pad_token_id": PAD, "eos_token_id": PAD,
                                     "__len__": lambda self: 128})()
  classifier, params = build.build_model(
      StudyConfig(init="pretrained", model=str(lm_folder)), tokenizer, kind="classifier",
      rng=None, n_positions=64, num_labels=3, lm_head=True)
  lm, lm_params = cljax.load_lm(str(lm_folder))
  head = classifier.config.LAYOUT.lm_head
  np.testing.assert_array_equal(params[head]["kernel"], lm_params[head]["kernel"])
  assert classifier.apply({"params": params}, ids, mask).shape == (len(ids), 3)
  from cljax.models import build
  from cljax.study import StudyConfig
  tokenizer = type("Tokenizer", (), {"pad_token_id": PAD, "eos_token_id": PAD,
                                     "__len__": lambda self: 128})()
  model, params = build.build_model(StudyConfig(init="pretrained", model=str(folder)),
                                    tokenizer, kind="classifier", rng=None, n_positions=64,
                                    num_labels=3)
  np.testing.assert_allclose(np.asarray(model.apply({"params": params}, ids, mask)), want,
                             atol=1e-5, rtol=1e-5)   # the study loads the family's folder


def test_an_unknown_model_type_lists_the_supported_ones(tmp_path):
  import json
  import cljax
  (tmp_path / "config.json").write_text(json.dumps({"model_type": "mamba"}))
  (tmp_path / "model.safetensors").write_bytes(b"")
  with pytest.raises(ValueError, match="model_type='mamba'; cljax implements gpt2, llama, "
                                       "mistral, qwen2, qwen3, gpt_neox"):
    cljax.load_pretrained(str(tmp_path), num_labels=2)


@pytest.mark.parametrize("kind", ["Qwen2Config", "LlamaConfig", "GPTNeoXConfig"])
def test_save_pretrained_writes_a_folder_transformers_loads_with_the_same_logits(kind,
                                                                                tmp_path):
  import cljax
  extra = {"Qwen2Config": dict(num_key_value_heads=2, tie_word_embeddings=True),
           "LlamaConfig": dict(num_key_value_heads=1, rope_scaling=CASES[
               "llama_gqa2_llama3_rope"][1]["rope_scaling"]),
           "GPTNeoXConfig": dict(rotary_pct=0.5, hidden_dropout=0.0, attention_dropout=0.0)}
  hf_cfg = getattr(transformers, kind)(**TINY, **extra[kind], attn_implementation="eager")
  ids, mask = _inputs()
  for head, auto in (("lm", transformers.AutoModelForCausalLM),
                     ("score", transformers.AutoModelForSequenceClassification)):
    torch.manual_seed(0)
    src = tmp_path / f"src_{head}"
    auto.from_config(hf_cfg).save_pretrained(src)
    loader = cljax.load_lm if head == "lm" else functools.partial(cljax.load_pretrained,
                                                                  num_labels=3)
    model, params = loader(str(src))
    ours = np.asarray(model.apply({"params": params}, ids, mask))
    cljax.save_pretrained(params, model.config, str(tmp_path / head), head=head)
    back = auto.from_pretrained(tmp_path / head, attn_implementation="eager").eval()
    with torch.no_grad():
      theirs = back(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask)).logits.numpy()
    if head == "lm":
      ours, theirs = ours[mask.astype(bool)], theirs[mask.astype(bool)]
    np.testing.assert_allclose(theirs, ours, atol=1e-5, rtol=1e-5)


def test_real_tokens_with_gpt2_s_tokenizer_give_transformers_logits():
  """Real text (the GPT-2 tokenizer shipped in data/, its 50,257-row vocabulary, right
  padding with its end-of-text id as the pad) through a Llama with 2 key-value heads."""
  import os
  import cljax
  tokenizer = cljax.load_tokenizer(os.path.join(os.path.dirname(__file__), "..", "data",
                                                "gpt2-tokenizer"))
  pad = tokenizer.eos_token_id
  texts = ["A film that keeps its promise to the very last scene.",
           "Stocks fell on Monday.", "The match went to extra time after a late goal."]
  rows = [tokenizer(t)["input_ids"] for t in texts]
  T = max(map(len, rows))
  ids = np.asarray([r + [pad] * (T - len(r)) for r in rows])
  mask = (np.arange(T)[None] < np.asarray([len(r) for r in rows])[:, None]).astype(np.int64)
  hf_cfg = transformers.LlamaConfig(**{**TINY, "vocab_size": 50257, "pad_token_id": pad},
                                    num_key_value_heads=2, attn_implementation="eager")
  for auto, module in ((transformers.AutoModelForCausalLM, GPT2LM),
                       (transformers.AutoModelForSequenceClassification, GPT2Classifier)):
    torch.manual_seed(0)
    torch_model = auto.from_config(hf_cfg).eval()
    with torch.no_grad():
      want = torch_model(input_ids=torch.tensor(ids),
                         attention_mask=torch.tensor(mask)).logits.numpy()
    cfg = llama.LlamaConfig.from_hf(hf_cfg.to_dict())
    got = np.asarray(module(cfg).apply({"params": llama.llama_params(
        torch_model.state_dict(), cfg)}, ids, mask))
    if module is GPT2LM:
      got, want = got[mask.astype(bool)], want[mask.astype(bool)]
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)


def test_greedy_generate_equals_transformers_token_for_token(case):
  """cljax.generate (KV cache, grouped-query heads, each row's rotary positions from
  its own length, right-padded prompts) against transformers' greedy generate, row by
  row (no padding on the torch side), for as long as neither stops."""
  hf_cfg, lm, _ = case
  cfg = llama.LlamaConfig.from_hf(hf_cfg.to_dict(), eos_token_id=127)
  assert_greedy_equal(cfg, llama.llama_params(lm.state_dict(), cfg), lm, *_inputs(), eos=127,
                      pad=PAD)


@pytest.mark.parametrize("kind", ["Qwen3Config", "GPTNeoXConfig"])
def test_bfloat16_compute_over_float32_master_weights(kind, tmp_path):
  """``dtype="bfloat16"``: the params stay float32, the matmuls run in bfloat16, and
  the logits (float32) stay within 0.05 of transformers' float32 ones."""
  import cljax
  extra = (dict(num_key_value_heads=2) if kind == "Qwen3Config"
           else dict(hidden_dropout=0.0, attention_dropout=0.0))
  hf_cfg = getattr(transformers, kind)(**TINY, **extra, attn_implementation="eager")
  torch.manual_seed(0)
  torch_model = transformers.AutoModelForSequenceClassification.from_config(hf_cfg).eval()
  torch_model.save_pretrained(tmp_path)
  ids, mask = _inputs()
  with torch.no_grad():
    want = torch_model(input_ids=torch.tensor(ids),
                       attention_mask=torch.tensor(mask)).logits.numpy()
  model, params = cljax.load_pretrained(str(tmp_path), num_labels=3, dtype="bfloat16")
  assert {x.dtype for x in jax.tree.leaves(params)} == {np.dtype(np.float32)}
  apply = functools.partial(model.apply, {"params": params})
  assert "bf16[3,11,64]" in str(jax.make_jaxpr(apply)(ids, mask))   # bfloat16 activations
  got = np.asarray(apply(ids, mask))
  assert got.dtype == np.float32
  assert np.abs(got - want).max() < 0.05 and not np.allclose(got, want, atol=1e-5)
