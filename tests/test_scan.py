"""Layers under nn.scan (``scan_layers``): the scanned model is the unscanned one with
its blocks' params stacked, on every family: the same classifier and LM logits and
gradients, remat inside the scan, greedy generation through the stacked KV cache,
LoRA stacked with its blocks, and a Hugging Face folder in and out unchanged."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cljax import models
from cljax.models import families, hf, scan
from cljax.models.config import GPT2Config
from cljax.models.generation import generate

from conftest import padded_batch

# The fast tier takes the Llama; the slow tier every family.
ARCHS = (pytest.param("gpt2", marks=pytest.mark.slow), "llama",
         pytest.param("gpt_neox", marks=pytest.mark.slow))


def _config(arch, **fields):
  common = dict(vocab_size=97, pad_token_id=96, eos_token_id=96, **fields)
  if arch == "gpt2":
    return GPT2Config(n_positions=32, n_embd=32, n_layer=3, n_head=4,
                      **common)
  return families.random_config(arch, "tiny", max_position_embeddings=32, **common).replace(
      **({"num_hidden_layers": 3}))


def _pair(arch, kind, **fields):
  """(plain model, its params, scanned model, the same params stacked)."""
  cls = models.GPT2LM if kind == "lm" else models.GPT2Classifier
  cfg = _config(arch, **({} if kind == "lm" else {"num_labels": 3}), **fields)
  plain = cls(cfg)
  params = models.random_params(plain, jax.random.key(0))
  scanned = cls(cfg.replace(scan_layers=True))
  return plain, params, scanned, scan.stack_blocks(params, cfg)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("kind", ["classifier", pytest.param("lm", marks=pytest.mark.slow)])
def test_the_scanned_model_gives_the_plain_model_s_logits_and_gradients(arch, kind):
  plain, params, scanned, stacked = _pair(arch, kind)
  ids, mask = padded_batch([12, 5, 9], 12, 97, 96)
  init = scanned.init(jax.random.key(1), jnp.zeros((1, 4), jnp.int32))["params"]
  assert jax.tree.map(jnp.shape, init) == jax.tree.map(jnp.shape, stacked)
  name = scan.stacked_name(plain.config)
  assert name in stacked and f"{plain.config.LAYOUT.block}0" not in stacked
  np.testing.assert_allclose(scanned.apply({"params": stacked}, ids, mask),
                             plain.apply({"params": params}, ids, mask), atol=2e-5)

  def loss(model):
    return lambda p: jnp.sum(model.apply({"params": p}, ids, mask) ** 2)

  g_plain = scan.stack_blocks(jax.grad(loss(plain))(params), plain.config)
  remat = scanned.clone(config=scanned.config.replace(remat=True))
  for model in (scanned, remat):
    g = jax.grad(loss(model))(stacked)
    for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(g_plain)):
      np.testing.assert_allclose(a, b, atol=2e-4, rtol=2e-4)


@pytest.mark.parametrize("arch", ARCHS)
def test_greedy_generation_through_the_stacked_cache_is_token_for_token(arch):
  plain, params, scanned, stacked = _pair(arch, "lm")
  ids, mask = padded_batch([6, 3, 5], 6, 97, 96, seed=2)
  kw = dict(max_new_tokens=7)
  np.testing.assert_array_equal(generate(scanned, stacked, ids, mask, **kw),
                                generate(plain, params, ids, mask, **kw))


def test_lora_stacks_with_its_blocks_and_peft_surgery_keeps_the_logits():
  plain, params, scanned, stacked = _pair("llama", "classifier")
  lora = dict(lora_rank=2, lora_targets=("q_proj", "v_proj"), peft_slots=2)
  with_lora = scanned.clone(config=scanned.config.replace(**lora))
  grown = models.add_peft_params(with_lora, stacked, jax.random.key(3))
  assert grown["layers"]["self_attn"]["q_proj_lora"]["A_0"].shape[0] == 3
  ids, mask = padded_batch([7, 4], 8, 97, 96)
  np.testing.assert_allclose(with_lora.apply({"params": grown}, ids, mask),
                             plain.apply({"params": params}, ids, mask), atol=2e-5)


@pytest.mark.parametrize("arch", [pytest.param("gpt2", marks=pytest.mark.slow), "llama"])
def test_a_hugging_face_folder_loads_stacked_and_exports_per_block(arch, tmp_path):
  plain, params, _, _ = _pair(arch, "classifier")
  hf.save_pretrained(params, plain.config, str(tmp_path / "plain"))
  model, loaded = hf.load_pretrained(str(tmp_path / "plain"), num_labels=3, scan_layers=True)
  assert model.config.scan_layers and scan.stacked_name(model.config) in loaded
  ids, mask = padded_batch([9, 2], 9, 97, 96)
  np.testing.assert_allclose(model.apply({"params": loaded}, ids, mask),
                             plain.apply({"params": params}, ids, mask), atol=2e-5)
  hf.save_pretrained(loaded, model.config, str(tmp_path / "again"))
  again, back = hf.load_pretrained(str(tmp_path / "again"), num_labels=3)
  assert not again.config.scan_layers
  for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(params)):
    np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("method,fields", [("den", {}), ("pnn", {}),
                                           ("freeze", {"freeze": "last_k"})])
def test_methods_that_change_single_blocks_are_refused_in_one_line(method, fields):
  from cljax.methods import MethodConfig
  from cljax.methods.registry import build as build_method
  from cljax.methods.registry import BuildContext
  ctx = BuildContext(num_labels=2, num_tasks=2, max_length=16, n_layer=2, n_embd=64,
                     vocab_size=97, scan_layers=True)
  with pytest.raises(ValueError, match="--scan_layers"):
    build_method(method, MethodConfig(**fields), ctx)
