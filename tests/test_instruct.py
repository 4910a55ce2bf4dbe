"""Instruction tuning and plain-text LM training (cljax.lm.train, cljax-instruct) on
small files the tests write, with a byte-level BPE tokenizer (GPT-2's kind) trained
here on their text."""

import json
import os

import numpy as np
import pytest

import cljax
from cljax.lm import data as lm_data
from cljax.lm import train as lm_train
from cljax.train import progress

from conftest import FILLER, NEGATIVE, POSITIVE

EXAMPLES = [
    {"instruction": "Name a primary color.", "input": "", "output": "Red."},
    {"instruction": "Say the opposite.", "input": "good", "output": "bad"},
    {"instruction": "Count to three.", "input": "", "output": "one two three"},
    {"instruction": "Repeat the word.", "input": "wonderful", "output": "wonderful wonderful"},
]
HELD_OUT = [
    {"instruction": "Name a primary color.", "input": "", "output": "Blue."},
    {"instruction": "Say the opposite.", "input": "bad", "output": "good"},
]


@pytest.fixture(scope="module")
def bpe_tokenizer_dir(tmp_path_factory):
  """A byte-level BPE tokenizer (as GPT-2's) trained on the tests' text, EOS last."""
  from tokenizers import ByteLevelBPETokenizer
  from transformers import PreTrainedTokenizerFast
  corpus = [lm_data.PROMPT_INPUT, lm_data.PROMPT_NO_INPUT] + [
      " ".join(str(v) for v in e.values()) for e in EXAMPLES + HELD_OUT] + [
      " ".join(POSITIVE + NEGATIVE + FILLER)]
  bpe = ByteLevelBPETokenizer()
  bpe.train_from_iterator(corpus * 5, vocab_size=600, min_frequency=1)
  bpe.add_special_tokens(["<|endoftext|>"])
  fast = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|endoftext|>",
                                 bos_token="<|endoftext|>", unk_token="<|endoftext|>")
  folder = str(tmp_path_factory.mktemp("bpe"))
  fast.save_pretrained(folder)
  return folder


@pytest.fixture(scope="module")
def alpaca_files(tmp_path_factory):
  root = tmp_path_factory.mktemp("alpaca")
  train = root / "train.json"
  train.write_text(json.dumps(EXAMPLES, indent=1))   # the Alpaca release's format
  held = root / "held.jsonl"
  held.write_text("".join(json.dumps(e) + "\n" for e in HELD_OUT))
  prompts = root / "prompts.jsonl"
  prompts.write_text("".join(json.dumps({"instruction": e["instruction"],
                                         "input": e["input"]}) + "\n" for e in EXAMPLES))
  return str(train), str(held), str(prompts)


def test_only_the_response_and_its_eos_carry_loss(bpe_tokenizer_dir):
  tok = cljax.load_tokenizer(bpe_tokenizer_dir)
  records = [(e, f"row {i}") for i, e in enumerate(EXAMPLES)]
  arrays = lm_data.alpaca_arrays(records, tok, max_length=96)
  for e, ids, mask, loss in zip(EXAMPLES, arrays["input_ids"], arrays["attention_mask"],
                                arrays["loss_mask"]):
    prompt = lm_data.alpaca_prompt(e)
    n_prompt = len(tok(prompt)["input_ids"])
    assert prompt.endswith("### Response:") and ("### Input:" in prompt) == bool(e["input"])
    assert not loss[:n_prompt].any()                      # no prompt token is a target
    targets = ids[loss.astype(bool)].tolist()
    assert targets[-1] == tok.eos_token_id                # the EOS is one
    assert tok.decode(targets[:-1]) == e["output"]        # and the response, exactly
    assert mask.sum() == loss.sum() + n_prompt and not loss[mask == 0].any()


def test_a_row_without_instruction_or_output_names_the_file_and_line(tmp_path,
                                                                     bpe_tokenizer_dir):
  tok = cljax.load_tokenizer(bpe_tokenizer_dir)
  path = tmp_path / "bad.jsonl"
  path.write_text(json.dumps(EXAMPLES[0]) + "\n\n" + json.dumps({"instruction": "x"}) + "\n")
  with pytest.raises(ValueError, match=rf"{path}:3: expected an object with 'instruction' "
                                       "and 'output'"):
    lm_data.alpaca_arrays(lm_data.read_records(str(path)), tok, 64)
  listed = tmp_path / "bad.json"
  listed.write_text(json.dumps([EXAMPLES[0], {"output": "y"}]))
  with pytest.raises(ValueError, match=rf"{listed}:item 1: expected an object"):
    lm_data.alpaca_arrays(lm_data.read_records(str(listed)), tok, 64)
  with pytest.raises(ValueError, match="--top_p=0.0: expected a value in"):
    lm_train.LMConfig(data=str(path), top_p=0.0)
  with pytest.raises(ValueError, match="--data is required"):
    lm_train.LMConfig()


def _config(bpe_tokenizer_dir, alpaca_files, **overrides):
  train, held, prompts = alpaca_files
  kwargs = dict(data=train, eval_data=held, tokenizer=bpe_tokenizer_dir, init="random",
                size="tiny", max_length=128, batch_size=4, eval_batch_size=4, epochs=80,
                learning_rate=3e-3, dropout=0.0, log_every=10, checkpoint_every=50,
                generate=prompts, max_new_tokens=12, seed=0)
  kwargs.update(overrides)
  return lm_train.LMConfig(**kwargs)


@pytest.fixture(scope="module")
def tuned(bpe_tokenizer_dir, alpaca_files, tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("tuned"))
  return lm_train.run(_config(bpe_tokenizer_dir, alpaca_files), workdir), workdir


def test_instruction_tuning_learns_the_responses(tuned):
  """Overfitting four examples: the loss falls and greedy generation for the training
  prompts reproduces their responses."""
  results, workdir = tuned
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    losses = [r["loss"] for r in map(json.loads, f) if "loss" in r]
  assert losses[-1] < 0.05 * losses[0]
  with open(os.path.join(workdir, "generations.jsonl")) as f:
    generated = [json.loads(line) for line in f]
  assert [g["response"] for g in generated] == [e["output"] for e in EXAMPLES]
  assert results["steps"] == 80 and results["held_out_after"]["tokens"] > 0
  assert np.isfinite(results["held_out_after"]["perplexity"])


def test_the_exported_folder_loads_in_transformers_with_the_same_logits(tuned,
                                                                        bpe_tokenizer_dir):
  torch = pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  _, workdir = tuned
  folder = os.path.join(workdir, "hf_model")
  model, params = cljax.load_lm(folder)
  tok = transformers.AutoTokenizer.from_pretrained(folder)
  enc = tok([lm_data.alpaca_prompt(e) for e in EXAMPLES[:2]], return_tensors="np",
            padding=True)
  ours = np.asarray(model.apply({"params": params}, enc["input_ids"], enc["attention_mask"]))
  ref = transformers.GPT2LMHeadModel.from_pretrained(folder).eval()
  with torch.no_grad():
    theirs = ref(input_ids=torch.tensor(enc["input_ids"]),
                 attention_mask=torch.tensor(enc["attention_mask"])).logits.numpy()
  real = enc["attention_mask"].astype(bool)
  np.testing.assert_allclose(ours[real], theirs[real], atol=1e-4)


@pytest.mark.slow
def test_resume_gives_the_uninterrupted_run(bpe_tokenizer_dir, alpaca_files, tuned,
                                            tmp_path):
  cfg = _config(bpe_tokenizer_dir, alpaca_files)
  workdir = str(tmp_path / "cut")
  with pytest.raises(progress.Interrupted):
    lm_train.run(cfg.replace(stop_after_steps=65), workdir)   # checkpoint at 50
  with pytest.raises(ValueError, match="--learning_rate 0.003 -> 0.001"):
    lm_train.run(cfg.replace(learning_rate=1e-3), workdir, resume=True)
  resumed = lm_train.run(cfg.replace(max_new_tokens=10), workdir, resume=True)
  assert resumed["held_out_after"] == tuned[0]["held_out_after"]
  assert resumed["held_out_before"] == tuned[0]["held_out_before"]
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    assert [r["global_step"] for r in map(json.loads, f)] == list(range(10, 81, 10))


def test_plain_text_blocks_all_carry_loss_and_perplexity_falls(bpe_tokenizer_dir, tmp_path):
  rs = np.random.RandomState(0)
  path = tmp_path / "texts.jsonl"
  with open(path, "w") as f:
    for _ in range(60):
      f.write(json.dumps({"text": " ".join(rs.choice(POSITIVE + FILLER, 12))}) + "\n")
  tok = cljax.load_tokenizer(bpe_tokenizer_dir)
  arrays = lm_data.text_arrays(lm_data.read_records(str(path)), tok, block_size=32)
  n_tokens = sum(len(tok(r["text"])["input_ids"]) + 1 for r, _ in
                 lm_data.read_records(str(path)))
  assert arrays["input_ids"].shape == (n_tokens // 32, 32) and arrays["loss_mask"].all()
  assert (arrays["input_ids"] == tok.eos_token_id).sum() >= 40   # rows end with EOS
  cfg = lm_train.LMConfig(data=str(path), data_format="text", num_eval=10, block_size=32,
                          tokenizer=bpe_tokenizer_dir, init="random", size="tiny",
                          batch_size=8, epochs=10, learning_rate=3e-3, dropout=0.0,
                          export=False, eval_every=10)
  r = lm_train.run(cfg, str(tmp_path / "run"))
  assert r["held_out_after"]["perplexity"] < 0.5 * r["held_out_before"]["perplexity"]
  curve = [p["loss"] for p in r["held_out_curve"]]
  assert len(curve) == (r["steps"] - 1) // 10 and curve[-1] < curve[0]
  assert not os.path.exists(tmp_path / "run" / "hf_model")


@pytest.mark.slow
def test_length_buckets_change_nothing(bpe_tokenizer_dir, alpaca_files, tuned, tmp_path):
  """The tuned run cuts its batches to buckets of 32 (the rows are short); at full
  length, the same training ends with the same held-out loss."""
  cfg = _config(bpe_tokenizer_dir, alpaca_files, length_bucket=0, generate=None)
  full = lm_train.run(cfg, str(tmp_path))
  bucketed = tuned[0]
  assert lm_train.buckets(_config(bpe_tokenizer_dir, alpaca_files),
                          {"input_ids": np.zeros((1, 128))}) == (32, 64, 96, 128)
  for key in ("held_out_before", "held_out_after"):
    np.testing.assert_allclose(full[key]["loss"], bucketed[key]["loss"], rtol=1e-5)
