"""Shared fixtures: tiny Hugging Face checkpoints built with transformers, tiny data."""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np
import pytest

FIXTURES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures")
SHARED = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "..",
                      "shared")

TINY_HF = dict(vocab_size=97, n_positions=32, n_embd=32, n_layer=2, n_head=4,
               pad_token_id=96, eos_token_id=96, bos_token_id=96)


def padded_batch(lengths, seq_len, vocab_size, pad_id, seed=0):
  """Random ids of mixed lengths, right-padded with ``pad_id``, and their mask."""
  rs = np.random.RandomState(seed)
  ids = rs.randint(0, pad_id, (len(lengths), seq_len)).astype(np.int32)
  mask = np.zeros_like(ids)
  for i, n in enumerate(lengths):
    ids[i, n:] = pad_id
    mask[i, :n] = 1
  return ids, mask


@pytest.fixture(scope="session")
def torch_tiny(tmp_path_factory):
  """(folder, torch model, hf config) of a tiny GPT2ForSequenceClassification with
  3 labels saved by transformers (keys prefixed with ``transformer.``)."""
  torch = pytest.importorskip("torch")
  import transformers
  torch.manual_seed(0)
  config = transformers.GPT2Config(num_labels=3, **TINY_HF)
  model = transformers.GPT2ForSequenceClassification(config).eval()
  folder = str(tmp_path_factory.mktemp("tiny_cls"))
  model.save_pretrained(folder)
  return folder, model, config


@pytest.fixture(scope="session")
def tiny_batch():
  return padded_batch([16, 10, 3, 7, 1, 16], 16, TINY_HF["vocab_size"],
                      TINY_HF["pad_token_id"])
