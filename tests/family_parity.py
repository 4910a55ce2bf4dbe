"""The two comparisons every family's parity tests make against transformers' torch
model (tests/test_llama.py, tests/test_gpt_neox.py): logits on a right-padded batch,
and greedy generation row by row."""

import numpy as np
import torch

import cljax
from cljax.models.heads import GPT2LM, GPT2Classifier


def assert_logits_equal(cfg, params_of, torch_model, head: str, ids, mask):
  """The classifier's (``head="classifier"``) or the LM's logits of cljax's model
  (params ``params_of(state_dict, cfg)``) equal ``torch_model``'s within 1e-5, the
  LM's at the real tokens."""
  with torch.no_grad():
    want = torch_model(input_ids=torch.tensor(ids),
                       attention_mask=torch.tensor(mask)).logits.numpy()
  params = params_of(torch_model.state_dict(), cfg)
  module = GPT2LM(cfg) if head == "lm" else GPT2Classifier(cfg)
  got = np.asarray(module.apply({"params": params}, ids, mask))
  if head == "lm":
    real = mask.astype(bool)
    got, want = got[real], want[real]
  np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)


def assert_greedy_equal(cfg, params, lm, ids, mask, *, eos: int, pad: int,
                        max_new_tokens: int = 8):
  """``cljax.generate`` on the right-padded batch against transformers' greedy
  ``generate`` of each row alone (no padding on the torch side), for as long as
  neither stops."""
  got = cljax.generate(GPT2LM(cfg), params, ids, mask, max_new_tokens=max_new_tokens)
  for b, n in enumerate(mask.sum(1)):
    with torch.no_grad():
      want = lm.generate(torch.tensor(ids[b:b + 1, :n]), max_new_tokens=max_new_tokens,
                         do_sample=False, eos_token_id=eos, pad_token_id=pad)[0, n:].numpy()
    np.testing.assert_array_equal(got[b, :len(want)], want)
