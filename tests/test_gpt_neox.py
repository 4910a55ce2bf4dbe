"""GPT-NeoX (Pythia's architecture) against transformers' torch model on tiny random
configs: classifier and LM logits in float32 with right padding, partial rotary,
parallel and sequential residuals."""

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from cljax.models import gpt_neox  # noqa: E402
from family_parity import assert_greedy_equal, assert_logits_equal  # noqa: E402

PAD = 0
TINY = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
            num_attention_heads=4, max_position_embeddings=64, pad_token_id=PAD,
            num_labels=3, hidden_dropout=0.0, attention_dropout=0.0)
CASES = {"parallel_quarter_rotary": dict(rotary_pct=0.25),
         "sequential_half_rotary": dict(rotary_pct=0.5, use_parallel_residual=False)}


def _inputs():
  rs = np.random.RandomState(0)
  ids = rs.randint(1, 128, (3, 11))
  mask = np.arange(11)[None] < np.asarray([11, 6, 3])[:, None]
  return np.where(mask, ids, PAD), mask.astype(np.int64)


@pytest.fixture(scope="module", params=sorted(CASES))
def case(request):
  hf_cfg = transformers.GPTNeoXConfig(**TINY, **CASES[request.param],
                                      attn_implementation="eager")
  torch.manual_seed(0)
  lm = transformers.GPTNeoXForCausalLM(hf_cfg).eval()
  torch.manual_seed(1)
  clf = transformers.GPTNeoXForSequenceClassification(hf_cfg).eval()
  return hf_cfg, lm, clf


@pytest.mark.parametrize("head", ["lm", "classifier"])
def test_the_logits_equal_transformers(case, head):
  hf_cfg, lm, clf = case
  cfg = gpt_neox.GPTNeoXConfig.from_hf(hf_cfg.to_dict())
  assert cfg.rotary_dims == int(16 * hf_cfg.to_dict()["rope_parameters"]["partial_rotary_factor"])
  assert_logits_equal(cfg, gpt_neox.neox_params, lm if head == "lm" else clf, head,
                      *_inputs())


def test_a_checkpoint_s_names_convert_alike(case):
  """Pythia's files name the LM head embed_out (transformers 5 says lm_head in memory)
  and old ones keep causal-mask buffers: both read to the same params."""
  hf_cfg, lm, _ = case
  cfg = gpt_neox.GPTNeoXConfig.from_hf(hf_cfg.to_dict())
  sd = lm.state_dict()
  on_disk = {("embed_out.weight" if k == "lm_head.weight" else k): v for k, v in sd.items()}
  on_disk["gpt_neox.layers.0.attention.bias"] = torch.ones(1, 1, 4, 4, dtype=torch.bool)
  on_disk["gpt_neox.layers.0.attention.masked_bias"] = torch.tensor(-1e9)
  a, b = gpt_neox.neox_params(sd, cfg), gpt_neox.neox_params(on_disk, cfg)
  import jax
  assert jax.tree.structure(a) == jax.tree.structure(b)
  assert all(np.array_equal(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def test_greedy_generate_equals_transformers_token_for_token(case):
  """cljax.generate with the KV cache (partial rotary from each row's own length,
  right-padded prompts) against transformers' greedy generate, row by row."""
  hf_cfg, lm, _ = case
  cfg = gpt_neox.GPTNeoXConfig.from_hf(hf_cfg.to_dict(), eos_token_id=127)
  assert_greedy_equal(cfg, gpt_neox.neox_params(lm.state_dict(), cfg), lm, *_inputs(),
                      eos=127, pad=PAD)
