"""The README and the docs/ pages: their code examples run as written (on a tiny model
and tiny data), every --flag they name exists, and every relative link they hold
points at a file (and a heading) that exists."""

import glob
import os
import re

import jax
import jax.numpy as jnp
import pytest

import cljax

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README = os.path.join(ROOT, "README.md")
DOCS = os.path.join(ROOT, "docs")
METHODS_DOC = os.path.join(DOCS, "methods.md")
LM_DOC = os.path.join(DOCS, "lm.md")
README_MAX_LINES = 300


def _pages():
  """README.md and every docs/*.md page."""
  return [README] + sorted(glob.glob(os.path.join(DOCS, "*.md")))


def _example(path, heading):
  """The first ```python block under ``heading`` in the page at ``path``."""
  text = open(path, encoding="utf-8").read()
  assert heading in text, f"{heading!r} not in {os.path.relpath(path, ROOT)}"
  section = text[text.index(heading):]
  return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_add_a_method_example_registers_a_working_method():
  from cljax.methods import BuildContext, MethodConfig, StepContext, TaskContext, build
  from cljax.methods import registry
  code = _example(METHODS_DOC, "## Add a method: one file")
  exec(compile(code, "docs/methods.md", "exec"), {})  # pylint: disable=exec-used
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


def _named_flags(text):
  """Every --flag a page names, outside link targets (a heading anchor such as
  `#classification-as-text---headlm` is no flag)."""
  text = re.sub(r"\]\([^)]*\)", "]", text)
  return set(re.findall(r"--([a-z][a-z_0-9]*)", text))


@pytest.mark.slow
def test_every_flag_the_docs_name_exists():
  """Each --flag in README.md and docs/*.md is a flag of one of the scripts (the
  add-a-method example's own --l1_lambda and absl's --help aside)."""
  import subprocess
  import sys
  known = set()
  for script in ("forgetting", "sweep", "report", "benchmark", "study_vs_torch", "instruct",
                 "parallel_equal", "relabel_kept_runs"):
    out = subprocess.run([sys.executable, os.path.join(ROOT, "experiments", f"{script}.py"),
                          "--helpfull"], capture_output=True, text=True, timeout=300).stdout
    known.update(re.findall(r"^\s+--(?:\[no\])?([a-z_0-9]+)", out, re.M))
  unknown = {}
  for page in _pages():
    missing = _named_flags(open(page, encoding="utf-8").read()) - known - {"l1_lambda", "help"}
    if missing:
      unknown[os.path.relpath(page, ROOT)] = sorted(missing)
  assert not unknown, unknown


def test_generation_example_runs(tiny_tokenizer_dir, tiny_tokenizer, tmp_path):
  code = _example(LM_DOC, "## The LM head and generation")
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
  exec(compile(code, "docs/lm.md", "exec"), scope)  # pylint: disable=exec-used
  assert scope["new"].shape == (2, 20)


def _prose(text):
  """The page without fenced code blocks and inline code spans."""
  text = re.sub(r"^```.*?^```[^\n]*$", "", text, flags=re.S | re.M)
  return re.sub(r"`[^`\n]*`", "", text)


def github_anchor(heading):
  """GitHub's anchor for a heading: lowercase, punctuation dropped (letters, digits,
  spaces, '-' and '_' kept), each space a '-'."""
  return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def _anchors(path):
  """Every heading anchor of a Markdown page, duplicates numbered as GitHub does."""
  text = re.sub(r"^```.*?^```[^\n]*$", "", open(path, encoding="utf-8").read(),
                flags=re.S | re.M)
  anchors, seen = set(), {}
  for heading in re.findall(r"^#{1,6}\s+(.+?)\s*#*\s*$", text, re.M):
    anchor = github_anchor(heading)
    n = seen.get(anchor, 0)
    seen[anchor] = n + 1
    anchors.add(anchor if n == 0 else f"{anchor}-{n}")
  return anchors


def _links(path):
  """The relative link targets (links and images) of a page, outside code."""
  targets = re.findall(r"!?\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)",
                       _prose(open(path, encoding="utf-8").read()))
  return [t for t in targets if not re.match(r"[a-z][a-z0-9+.-]*:", t, re.I)]


def test_github_anchor_rule():
  assert github_anchor("Classification as text (`--head=lm`)") == \
      "classification-as-text---headlm"
  assert github_anchor("On a GPU: one H100, measured") == "on-a-gpu-one-h100-measured"
  assert github_anchor("Outputs: the `results.json` contract") == \
      "outputs-the-resultsjson-contract"


def test_every_relative_link_points_at_an_existing_file_and_heading():
  broken = []
  for page in _pages():
    for target in _links(page):
      path, _, anchor = target.partition("#")
      resolved = os.path.normpath(os.path.join(os.path.dirname(page), path)) if path else page
      where = f"{os.path.relpath(page, ROOT)}: {target}"
      if not os.path.exists(resolved):
        broken.append(f"{where} (no such file)")
      elif anchor and resolved.endswith(".md") and anchor not in _anchors(resolved):
        broken.append(f"{where} (no such heading)")
  assert not broken, broken


def test_readme_is_a_front_page_that_links_every_docs_page():
  lines = open(README, encoding="utf-8").read().count("\n")
  assert lines < README_MAX_LINES, f"README.md has {lines} lines"
  linked = {os.path.normpath(os.path.join(ROOT, t.partition("#")[0])) for t in _links(README)}
  pages = sorted(glob.glob(os.path.join(DOCS, "*.md")))
  assert pages
  assert not [p for p in pages if p not in linked], "docs pages the README does not link"
  for page in pages:  # and each page links back
    assert README in {os.path.normpath(os.path.join(DOCS, t.partition("#")[0]))
                      for t in _links(page)}, page


def test_readme_keeps_the_test_command_ci_runs():
  """.ci/run runs the first line of the ```bash block after <!-- test-command -->."""
  text = open(README, encoding="utf-8").read()
  after = text[text.index("<!-- test-command -->"):]
  block = re.search(r"^```bash\n(.*?)\n", after, re.M).group(1)
  assert "pytest" in block, block
