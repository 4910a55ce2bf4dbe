"""Shared fixtures: tiny Hugging Face checkpoints built with transformers, tiny data."""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Tiny models: compiling dominates, so fewer XLA passes make the suite about a third
# faster; every comparison runs both sides under the same setting (subprocesses too).
os.environ.setdefault("JAX_DISABLE_MOST_OPTIMIZATIONS", "1")

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


# ----------------------------------------------------------------------------
# Tiny tokenizer and data: no download, no ../shared needed
# ----------------------------------------------------------------------------

POSITIVE = ["good", "great", "wonderful", "superb", "lovely", "fine", "best", "enjoyable"]
NEGATIVE = ["bad", "awful", "boring", "terrible", "poor", "worst", "dull", "weak"]
FILLER = ["the", "movie", "film", "plot", "acting", "was", "really", "quite", "and", "a",
          "story", "cast", "it"]
TOPICS = {0: ["election", "minister", "war", "treaty"], 1: ["match", "goal", "team", "coach"],
          2: ["market", "shares", "profit", "bank"], 3: ["software", "chip", "internet",
                                                         "space"]}
NEWS_FILLER = ["the", "report", "said", "on", "monday", "new", "after", "in", "a", "of"]


def _sentences(rs, words, filler, n_words, p_topic=0.4):
  return " ".join(rs.choice(words) if rs.rand() < p_topic else rs.choice(filler)
                  for _ in range(n_words))


def write_tiny_data(root, n_train=64, n_test=32, seed=0):
  """IMDb-like (sorted by label, as the real files) and AG-News-like JSONL tasks."""
  import json
  rs = np.random.RandomState(seed)
  for split, n in (("train", n_train), ("test", n_test)):
    os.makedirs(os.path.join(root, "imdb"), exist_ok=True)
    with open(os.path.join(root, "imdb", f"{split}.jsonl"), "w") as f:
      for label in (0, 1):
        for _ in range(n // 2):
          words = NEGATIVE if label == 0 else POSITIVE
          f.write(json.dumps({"text": _sentences(rs, words, FILLER, rs.randint(5, 20)),
                              "label": label}) + "\n")
    os.makedirs(os.path.join(root, "ag_news"), exist_ok=True)
    with open(os.path.join(root, "ag_news", f"{split}.jsonl"), "w") as f:
      for i in range(2 * n):
        label = i % 4
        # Denser topic words than the reviews' sentiment words: a tiny model trained
        # from scratch on the reviews first then learns these in a few steps for any
        # seed (with 0.4 it stalls at chance on the second task for about half the
        # seeds, in cljax and in transformers' PyTorch model alike).
        f.write(json.dumps({"text": _sentences(rs, TOPICS[label], NEWS_FILLER,
                                               rs.randint(5, 15), p_topic=0.8),
                            "label": label}) + "\n")
  return str(root)


def build_tiny_tokenizer(folder):
  """A word-level tokenizer over the tiny data's words, with GPT-2's eos as pad,
  saved as a Hugging Face folder that ``cljax.load_tokenizer`` loads."""
  from tokenizers import Tokenizer, models, pre_tokenizers
  from transformers import PreTrainedTokenizerFast
  words = sorted(set(POSITIVE + NEGATIVE + FILLER + NEWS_FILLER +
                     sum(TOPICS.values(), [])))
  vocab = {"<unk>": 0, **{w: i + 1 for i, w in enumerate(words)}}
  vocab["<|endoftext|>"] = len(vocab)
  tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
  tok.pre_tokenizer = pre_tokenizers.Whitespace()
  fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>",
                                 eos_token="<|endoftext|>", bos_token="<|endoftext|>")
  fast.save_pretrained(folder)
  return str(folder)


@pytest.fixture(scope="session")
def tiny_data_dir(tmp_path_factory):
  return write_tiny_data(tmp_path_factory.mktemp("data"))


@pytest.fixture(scope="session")
def tiny_tokenizer_dir(tmp_path_factory):
  return build_tiny_tokenizer(tmp_path_factory.mktemp("tokenizer"))


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_tokenizer_dir):
  import cljax
  return cljax.load_tokenizer(tiny_tokenizer_dir)
