"""The README's own-loop example runs as written (on a tiny model and tiny data)."""

import os
import re

import jax
import jax.numpy as jnp

import cljax

README = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                      "README.md")


def test_own_loop_example_runs(tiny_data_dir, tiny_tokenizer_dir, tiny_tokenizer, tmp_path):
  text = open(README).read()
  section = text[text.index("### In your own loop"):]
  code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
  config = cljax.GPT2Config(vocab_size=len(tiny_tokenizer), n_positions=128, n_embd=16,
                            n_layer=2, n_head=2, num_labels=4,
                            pad_token_id=tiny_tokenizer.pad_token_id,
                            eos_token_id=tiny_tokenizer.eos_token_id)
  params = cljax.GPT2Classifier(config).init(jax.random.PRNGKey(0),
                                             jnp.zeros((1, 8), jnp.int32))["params"]
  cljax.save_pretrained(params, config, str(tmp_path / "model"))
  for old, new in [
      ('load_pretrained("gpt2"', f'load_pretrained({str(tmp_path / "model")!r}'),
      ('load_tokenizer("gpt2")', f'load_tokenizer({tiny_tokenizer_dir!r})'),
      ("data_dir=None, num_train=2000, num_test=500",
       f"data_dir={tiny_data_dir!r}, num_train=16, num_test=8"),
      ("replay_size=200", "replay_size=8, fisher_samples=8")]:
    assert old in code, old
    code = code.replace(old, new)
  scope = {}
  exec(compile(code, "README", "exec"), scope)  # pylint: disable=exec-used
  state = scope["state"]
  assert int(state.step) == 4  # 2 tasks x 2 batches of 8
  ewc_state, buffer = state.method_state
  assert float(ewc_state.active) == 1.0 and int(buffer.seen) == 32
  assert float(scope["metrics"]["count"]) == 16  # 8 new + 8 replayed examples
