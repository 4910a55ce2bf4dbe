"""The code keeps the shape its README describes: no module of ``cljax/`` over 400
lines, no function over 80, ``flax.linen`` imported only in ``cljax/models/``, and
the README's layout table naming files that exist."""

import ast
import os
import re

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = os.path.join(ROOT, "cljax")


def _modules():
  for folder, _, files in os.walk(PACKAGE):
    for name in files:
      if name.endswith(".py"):
        path = os.path.join(folder, name)
        yield os.path.relpath(path, ROOT), open(path, encoding="utf-8").read()


def test_no_module_over_400_lines_and_no_function_over_80():
  long_files, long_functions = [], []
  for path, text in _modules():
    if text.count("\n") > 400:
      long_files.append(f"{path}: {text.count(chr(10))} lines")
    for node in ast.walk(ast.parse(text)):
      if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
        length = node.end_lineno - node.lineno + 1
        if length > 80:
          long_functions.append(f"{path}:{node.lineno} {node.name}: {length} lines")
  assert not long_files, long_files
  assert not long_functions, long_functions


def test_only_the_models_package_imports_flax_linen():
  outside = [path for path, text in _modules()
             if re.search(r"^\s*(import flax\.linen|from flax import linen|from flax\.linen)",
                          text, re.M) and not path.startswith(os.path.join("cljax", "models"))]
  assert not outside, outside


def test_the_readme_layout_table_names_files_that_exist():
  text = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()
  layout = text[text.index("## Layout"):]
  named = re.findall(r"^\| `([^`]+)`", layout, re.M)
  assert len(named) >= 10, named
  missing = [p for p in named if not os.path.exists(os.path.join(ROOT, p.split(" ")[0]))]
  assert not missing, missing
