"""The README's own-loop example runs as written (on a tiny model and tiny data)."""

import os
import re

import jax
import jax.numpy as jnp
import pytest

import cljax

README = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                      "README.md")


@pytest.mark.slow
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


def test_add_a_method_example_registers_a_working_method():
  from cljax.methods import BuildContext, MethodConfig, StepContext, TaskContext, build
  from cljax.methods import registry
  text = open(README).read()
  section = text[text.index("### Add a method: one file"):]
  code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
  exec(compile(code, "README", "exec"), {})  # pylint: disable=exec-used
  try:
    assert registry.hparams()["l1_lambda"].default == 0.1
    method = build("l1", MethodConfig(l1_lambda=0.5), BuildContext(4, 2, 8, 1))
    anchor = {"w": jnp.array([1.0, -2.0])}
    state = method.after_task(method.init(anchor), TaskContext(params=anchor))
    theta = {"w": jnp.array([0.0, 1.0])}
    value, _ = method.loss(state, StepContext(params=theta))
    assert float(value) == 0.5 * (1.0 + 3.0)
    assert float(method.loss(method.init(anchor), StepContext(params=theta))[0]) == 0.0
  finally:
    registry.unregister("l1")


@pytest.mark.slow
def test_every_flag_the_readme_names_exists():
  """Each --flag in the README is a flag of one of the scripts (the add-a-method
  example's own --l1_lambda and absl's --help aside)."""
  import subprocess
  import sys
  root = os.path.dirname(README)
  known = set()
  for script in ("forgetting", "sweep", "report", "benchmark", "study_vs_torch", "instruct"):
    out = subprocess.run([sys.executable, os.path.join(root, "experiments", f"{script}.py"),
                          "--helpfull"], capture_output=True, text=True, timeout=300).stdout
    known.update(re.findall(r"^\s+--(?:\[no\])?([a-z_0-9]+)", out, re.M))
  named = set(re.findall(r"--([a-z][a-z_0-9]*)", open(README).read())) - {"l1_lambda", "help"}
  assert named <= known, sorted(named - known)


def test_generation_example_runs(tiny_tokenizer_dir, tiny_tokenizer, tmp_path):
  text = open(README).read()
  section = text[text.index("## GPT-2 as a language model"):]
  code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
  config = cljax.GPT2Config(vocab_size=len(tiny_tokenizer), n_positions=64, n_embd=16,
                            n_layer=2, n_head=2, pad_token_id=tiny_tokenizer.pad_token_id,
                            eos_token_id=tiny_tokenizer.eos_token_id)
  params = cljax.GPT2LM(config).init(jax.random.PRNGKey(0),
                                     jnp.zeros((1, 8), jnp.int32))["params"]
  cljax.save_pretrained(params, config, str(tmp_path / "lm"), head="lm")
  for old, new in [('load_lm("gpt2")', f'load_lm({str(tmp_path / "lm")!r})'),
                   ('load_tokenizer("gpt2")', f'load_tokenizer({tiny_tokenizer_dir!r})')]:
    assert old in code, old
    code = code.replace(old, new)
  scope = {}
  exec(compile(code, "README", "exec"), scope)  # pylint: disable=exec-used
  assert scope["new"].shape == (2, 20)
