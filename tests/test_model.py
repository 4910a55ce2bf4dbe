"""The Flax GPT-2 classifier: shapes, parameter count, pooling, dropout, remat."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cljax import models as model_lib
from cljax.models import GPT2Classifier, GPT2Config

TINY = GPT2Config(vocab_size=97, n_positions=32, n_embd=32, n_layer=2, n_head=4,
                  num_labels=3, pad_token_id=96, eos_token_id=96)


def expected_param_count(c: GPT2Config) -> int:
  d, f = c.n_embd, c.inner_dim
  block = 2 * (2 * d) + (d * 3 * d + 3 * d) + (d * d + d) + (d * f + f) + (f * d + d)
  return c.vocab_size * d + c.n_positions * d + c.n_layer * block + 2 * d + d * c.num_labels


@pytest.mark.parametrize("size", ["gpt2", "gpt2-medium", "tiny"])
def test_param_shapes_and_count(size):
  config = GPT2Config.from_size(size, num_labels=4)
  shapes = model_lib.param_shapes(GPT2Classifier(config))
  count = sum(int(np.prod(s.shape)) for s in jax.tree.leaves(shapes))
  assert count == expected_param_count(config)
  if size == "gpt2":  # 124,439,808 in the LM + a 768x4 head, minus nothing tied
    assert count == 124_439_808 + 768 * 4
  assert shapes["h_0"]["attn"]["c_attn"]["kernel"].shape == (config.n_embd, 3 * config.n_embd)
  assert shapes["score"]["kernel"].shape == (config.n_embd, 4)
  assert "bias" not in shapes["score"]


def test_unknown_size_is_a_clear_error():
  with pytest.raises(ValueError, match="Unknown GPT-2 size 'gpt3'.*expected one of"):
    GPT2Config.from_size("gpt3")


def test_pool_index_is_rightmost_non_pad():
  ids = jnp.array([[5, 6, 9, 9], [9, 9, 9, 9], [9, 3, 9, 4], [1, 2, 3, 4]])
  np.testing.assert_array_equal(model_lib.pool_index(ids, 9), [1, 0, 3, 3])
  np.testing.assert_array_equal(model_lib.pool_index(ids, None), [3, 3, 3, 3])


def test_padding_does_not_change_logits():
  """Right padding with a mask gives the logits of the unpadded sequence."""
  model = GPT2Classifier(TINY)
  params = model_lib.init_params(model, jax.random.key(0))
  ids = jnp.array([[1, 2, 3, 4, 5]])
  padded = jnp.array([[1, 2, 3, 4, 5, 96, 96, 96]])
  mask = (padded != 96).astype(jnp.int32)
  a = model.apply({"params": params}, ids)
  b = model.apply({"params": params}, padded, mask)
  np.testing.assert_allclose(a, b, atol=1e-6)


def test_dropout_only_when_not_deterministic():
  model = GPT2Classifier(TINY)
  params = model_lib.init_params(model, jax.random.key(0))
  ids = jnp.arange(16).reshape(2, 8)
  apply = jax.jit(model.apply, static_argnames="deterministic")
  a = apply({"params": params}, ids)
  b = apply({"params": params}, ids, deterministic=True)
  np.testing.assert_array_equal(a, b)
  c = apply({"params": params}, ids, deterministic=False, rngs={"dropout": jax.random.key(1)})
  d = apply({"params": params}, ids, deterministic=False, rngs={"dropout": jax.random.key(2)})
  assert not np.allclose(a, c) and not np.allclose(c, d)


_DROPOUT = dict(vocab_size=97, max_position_embeddings=32, pad_token_id=0, attn_pdrop=0.1,
                resid_pdrop=0.1, embd_pdrop=0.1)


@pytest.mark.parametrize("arch", ["gpt2", "llama", "gpt_neox"])
def test_remat_gives_the_same_gradients(arch):
  """Each family's blocks rematerialized: the same gradients, dropout included."""
  from cljax.models import families
  config = TINY if arch == "gpt2" else families.random_config(arch, "tiny", **_DROPOUT)
  ids = jnp.arange(16).reshape(2, 8)
  def grads(config):
    model = GPT2Classifier(config)
    params = model_lib.init_params(model, jax.random.key(0))
    loss = lambda p: model.apply({"params": p}, ids, deterministic=False,
                                 rngs={"dropout": jax.random.key(3)}).sum()
    return jax.jit(jax.grad(loss))(params)
  for a, b in zip(jax.tree.leaves(grads(config)),
                  jax.tree.leaves(grads(config.replace(remat=True)))):
    np.testing.assert_allclose(a, b, atol=1e-5)


def test_config_round_trips_through_hf_dict():
  assert GPT2Config.from_hf(TINY.to_hf()) == TINY


def test_the_attention_kernel_reaches_dot_product_attention(monkeypatch):
  """--attention=cudnn asks jax.nn.dot_product_attention for cuDNN's kernel wherever
  attention has no dropout, and only there (run here on XLA's: no GPU), and is refused
  with float32 compute; the default asks for XLA's."""
  from cljax.study.config import ModelOptions
  asked, real = [], jax.nn.dot_product_attention

  def spy(*args, implementation=None, **kwargs):
    asked.append(implementation)
    return real(*args, implementation="xla", **kwargs)

  monkeypatch.setattr(jax.nn, "dot_product_attention", spy)
  overrides = ModelOptions(attention="cudnn", dtype="bfloat16").config_overrides()
  cfg = GPT2Config(vocab_size=32, n_positions=16, n_embd=16, n_layer=2, n_head=2,
                   num_labels=2, pad_token_id=0, dtype="bfloat16", **overrides)
  model = GPT2Classifier(cfg)
  ids, mask = jnp.ones((2, 8), jnp.int32), jnp.ones((2, 8), jnp.int32)
  params = model.init(jax.random.PRNGKey(0), ids, mask)["params"]
  asked.clear()
  model.apply({"params": params}, ids, mask, deterministic=True)
  assert asked == ["cudnn", "cudnn"]
  model.apply({"params": params}, ids, mask, deterministic=False,
              rngs={"dropout": jax.random.PRNGKey(1)})   # attention dropout: spelled out
  assert asked == ["cudnn", "cudnn"]
  GPT2Classifier(cfg.replace(attention="xla")).apply({"params": params}, ids, mask,
                                                     deterministic=True)
  assert asked[2:] == ["xla", "xla"]
  with pytest.raises(ValueError, match="cudnn.*bfloat16"):
    GPT2Config(dtype="float32", attention="cudnn")
  with pytest.raises(ValueError, match="expected 'xla' or 'cudnn'"):
    GPT2Config(attention="flash")
