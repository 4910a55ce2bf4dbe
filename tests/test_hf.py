"""Weight loading and saving against transformers' PyTorch GPT-2."""

import hashlib
import json
import os
import shutil

import jax.numpy as jnp
import numpy as np
import pytest

import cljax
from cljax.models import hf
from conftest import FIXTURES, SHARED

ATOL = 1e-5


def torch_logits(model, ids, mask):
  import torch
  with torch.no_grad():
    return model(torch.tensor(ids, dtype=torch.long),
                 attention_mask=torch.tensor(mask)).logits.numpy()


def cljax_logits(model, params, ids, mask):
  return np.asarray(model.apply({"params": params}, jnp.asarray(ids), jnp.asarray(mask)))


def test_golden_fixture_matches_committed_transformers_logits():
  """Runs without torch: logits recorded from transformers for a committed checkpoint."""
  folder = os.path.join(FIXTURES, "tiny-gpt2")
  with open(os.path.join(folder, "golden.json")) as f:
    golden = json.load(f)
  model, params = cljax.load_pretrained(folder, num_labels=4)
  out = cljax_logits(model, params, np.array(golden["input_ids"]),
                     np.array(golden["attention_mask"]))
  np.testing.assert_allclose(out, np.array(golden["logits"]), atol=ATOL, rtol=0)


def test_parity_prefixed_checkpoint_with_head(torch_tiny, tiny_batch):
  folder, tmodel, _ = torch_tiny
  ids, mask = tiny_batch
  model, params = cljax.load_pretrained(folder, num_labels=3)
  diff = np.abs(cljax_logits(model, params, ids, mask) - torch_logits(tmodel, ids, mask))
  assert diff.max() < ATOL


def test_parity_without_mask_and_all_pad_row(torch_tiny):
  folder, tmodel, config = torch_tiny
  ids = np.full((2, 8), config.pad_token_id)
  ids[0, :5] = np.arange(5)
  model, params = cljax.load_pretrained(folder, num_labels=3)
  out = np.asarray(model.apply({"params": params}, jnp.asarray(ids)))
  import torch
  with torch.no_grad():
    ref = tmodel(torch.tensor(ids)).logits.numpy()
  np.testing.assert_allclose(out, ref, atol=ATOL, rtol=0)


def test_unprefixed_trunk_gets_fresh_head(torch_tiny, tiny_batch, tmp_path):
  """A GPT2Model checkpoint (keys without 'transformer.', no score) loads the trunk;
  the fresh head, copied into torch, gives the same logits."""
  import torch
  folder, tmodel, _ = torch_tiny
  tmodel.transformer.save_pretrained(tmp_path)
  with open(tmp_path / "config.json") as f:
    assert json.load(f)["architectures"] == ["GPT2Model"]
  model, params = cljax.load_pretrained(str(tmp_path), num_labels=5, seed=3)
  head = np.asarray(params["score"]["kernel"])
  assert head.shape == (32, 5) and 0.005 < head.std() < 0.05
  import transformers
  ref_model = transformers.GPT2ForSequenceClassification.from_pretrained(
      str(tmp_path), num_labels=5).eval()
  with torch.no_grad():
    ref_model.score.weight.copy_(torch.tensor(head.T))
  ids, mask = tiny_batch
  np.testing.assert_allclose(cljax_logits(model, params, ids, mask),
                             torch_logits(ref_model, ids, mask), atol=ATOL, rtol=0)


def test_head_of_wrong_size_is_fresh(torch_tiny):
  folder, _, _ = torch_tiny
  _, params = cljax.load_pretrained(folder, num_labels=4)
  assert params["score"]["kernel"].shape == (32, 4)


def test_sharded_safetensors_and_pytorch_bin(torch_tiny, tiny_batch, tmp_path):
  folder, tmodel, _ = torch_tiny
  ids, mask = tiny_batch
  ref = torch_logits(tmodel, ids, mask)
  tmodel.save_pretrained(tmp_path / "sharded", max_shard_size="20KB")
  assert os.path.exists(tmp_path / "sharded" / "model.safetensors.index.json")
  import torch
  os.makedirs(tmp_path / "bin")
  shutil.copy(os.path.join(folder, "config.json"), tmp_path / "bin")
  torch.save(tmodel.state_dict(), tmp_path / "bin" / "pytorch_model.bin")
  for sub in ("sharded", "bin"):
    model, params = cljax.load_pretrained(str(tmp_path / sub), num_labels=3)
    np.testing.assert_allclose(cljax_logits(model, params, ids, mask), ref, atol=ATOL,
                               rtol=0)
  # What a run records as its base: the weights files' bytes in the order they are
  # read (the shards the index lists, by name; the one .bin), hashed by hand here.
  with open(tmp_path / "sharded" / "model.safetensors.index.json") as f:
    shards = sorted(set(json.load(f)["weight_map"].values()))
  assert len(shards) > 1
  digest = hashlib.sha256(b"".join((tmp_path / "sharded" / n).read_bytes() for n in shards))
  assert hf.weights_sha256(str(tmp_path / "sharded")) == digest.hexdigest()
  assert hf.weights_sha256(str(tmp_path / "bin")) == hashlib.sha256(
      (tmp_path / "bin" / "pytorch_model.bin").read_bytes()).hexdigest()


def test_bfloat16_compute_close_to_float32(torch_tiny, tiny_batch):
  folder, _, _ = torch_tiny
  ids, mask = tiny_batch
  m32, p32 = cljax.load_pretrained(folder, num_labels=3)
  m16, p16 = cljax.load_pretrained(folder, num_labels=3, dtype="bfloat16")
  assert p16["h_0"]["attn"]["c_attn"]["kernel"].dtype == jnp.float32  # master weights
  out16 = cljax_logits(m16, p16, ids, mask)
  assert out16.dtype == np.float32
  out32 = cljax_logits(m32, p32, ids, mask)
  assert np.abs(out16 - out32).max() < 0.05
  assert not np.array_equal(out16, out32)  # it really computed in bfloat16


def test_save_pretrained_round_trip_through_transformers(tiny_batch, tmp_path):
  """cljax random init -> save_pretrained -> transformers from_pretrained: same logits;
  and loading the folder back into cljax gives identical params."""
  pytest.importorskip("torch")
  import jax
  import transformers
  config = cljax.GPT2Config(vocab_size=97, n_positions=32, n_embd=32, n_layer=2, n_head=4,
                            num_labels=3, pad_token_id=96, eos_token_id=96)
  model = cljax.GPT2Classifier(config)
  params = model.init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32))["params"]
  cljax.save_pretrained(params, config, str(tmp_path))
  tmodel = transformers.GPT2ForSequenceClassification.from_pretrained(str(tmp_path)).eval()
  ids, mask = tiny_batch
  np.testing.assert_allclose(torch_logits(tmodel, ids, mask),
                             cljax_logits(model, params, ids, mask), atol=ATOL, rtol=0)
  _, loaded = cljax.load_pretrained(str(tmp_path), num_labels=3)
  for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(loaded)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


# ----------------------------------------------------------------------------
# Bad input
# ----------------------------------------------------------------------------

def _copy_fixture(tmp_path):
  dst = tmp_path / "ckpt"
  shutil.copytree(os.path.join(FIXTURES, "tiny-gpt2"), dst)
  return dst


def test_folder_without_weights(tmp_path):
  dst = _copy_fixture(tmp_path)
  os.remove(dst / "model.safetensors")
  with pytest.raises(FileNotFoundError, match="No weights.*model.safetensors"):
    cljax.load_pretrained(str(dst), num_labels=4)


def test_missing_folder_is_not_sent_to_the_hub(tmp_path):
  with pytest.raises(FileNotFoundError, match="not a folder"):
    cljax.load_pretrained(str(tmp_path / "nope"), num_labels=2)


def test_hub_unreachable_says_how_to_pass_a_folder():
  with pytest.raises(OSError, match="local folder"):
    cljax.load_pretrained("no-such-org/no-such-model-cljax", num_labels=2)


def test_other_architecture(tmp_path):
  dst = _copy_fixture(tmp_path)
  cfg = json.loads((dst / "config.json").read_text())
  cfg["model_type"] = "bert"
  (dst / "config.json").write_text(json.dumps(cfg))
  with pytest.raises(ValueError, match="model_type='bert'"):
    cljax.load_pretrained(str(dst), num_labels=4)


def test_shape_mismatch_lists_tensors(tmp_path):
  dst = _copy_fixture(tmp_path)
  cfg = json.loads((dst / "config.json").read_text())
  cfg["n_positions"] = 64
  (dst / "config.json").write_text(json.dumps(cfg))
  with pytest.raises(ValueError, match=r"1 mis-shaped: wpe.weight: checkpoint \(32, 16\)"):
    cljax.load_pretrained(str(dst), num_labels=4)


def test_missing_and_extra_tensors_are_listed(tmp_path):
  from safetensors.numpy import load_file, save_file
  dst = _copy_fixture(tmp_path)
  tensors = load_file(dst / "model.safetensors")
  tensors.pop("transformer.h.1.mlp.c_fc.bias")
  tensors["transformer.h.2.ln_1.weight"] = np.ones(16, np.float32)
  tensors["transformer.h.0.attn.bias"] = np.ones((1, 1, 4, 4), np.float32)  # old buffer: ignored
  save_file(tensors, dst / "model.safetensors", metadata={"format": "pt"})
  with pytest.raises(ValueError) as e:
    cljax.load_pretrained(str(dst), num_labels=4)
  msg = str(e.value)
  assert "1 missing: h.1.mlp.c_fc.bias" in msg
  assert "1 unexpected: h.2.ln_1.weight" in msg
  assert "attn.bias" not in msg


def test_name_table_round_trips():
  assert hf.hf_name("h_11/attn/c_attn/kernel") == "h.11.attn.c_attn.weight"
  assert hf.hf_name("h_0/ln_2/scale") == "h.0.ln_2.weight"
  assert hf.hf_name("wte/embedding") == "wte.weight"
  assert hf.hf_name("ln_f/bias") == "ln_f.bias"


# ----------------------------------------------------------------------------
# Tokenizer
# ----------------------------------------------------------------------------

@pytest.mark.skipif(not os.path.isdir(os.path.join(SHARED, "gpt2-tokenizer")),
                    reason="needs ../shared/gpt2-tokenizer")
def test_real_gpt2_tokenizer_pads_with_eos_on_the_right():
  tok = cljax.load_tokenizer(os.path.join(SHARED, "gpt2-tokenizer"))
  assert tok.pad_token_id == tok.eos_token_id == 50256
  assert tok.padding_side == "right"
  enc = tok(["Hello world", "A much longer sentence here"], padding="max_length",
            max_length=8)
  assert enc["input_ids"][0][:2] == [15496, 995]
  assert enc["input_ids"][0][2:] == [50256] * 6
  assert enc["attention_mask"][0] == [1, 1] + [0] * 6


def test_tokenizer_missing_folder(tmp_path):
  with pytest.raises(FileNotFoundError, match="does not exist"):
    cljax.load_tokenizer(str(tmp_path / "missing"))
