"""The code keeps the shape its README describes: packages in floors, each importing
only its own floor or lower ones, no import cycle, no function over 80 lines,
``flax.linen`` imported only in ``cljax/models/``, nothing run at import that a
notebook would notice, and the README's layout table naming files that exist."""

import ast
import os
import re
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = os.path.join(ROOT, "cljax")

# The floors, from the ground up (DESIGN.md): a module may import its own floor or a
# lower one. ``cljax`` (the package's face) and ``cljax.steps`` gather the train floor.
FLOORS = {
    "cljax.options": 1, "cljax.metrics": 1, "cljax.data": 1,
    "cljax.models": 2,
    "cljax.train": 3, "cljax.steps": 3, "cljax": 3,
    "cljax.methods": 4, "cljax.lm": 4,
    "cljax.study": 5, "cljax.bench": 5,
    "cljax.report": 6,
    "cljax.cli": 7,
}


def _modules():
  for folder, _, files in os.walk(PACKAGE):
    for name in sorted(files):
      if name.endswith(".py"):
        path = os.path.join(folder, name)
        yield os.path.relpath(path, ROOT), open(path, encoding="utf-8").read()


def _module_name(path: str) -> str:
  name = path[:-len(".py")].replace(os.sep, ".")
  return name[:-len(".__init__")] if name.endswith(".__init__") else name


MODULES = {_module_name(p) for p, _ in _modules()}


def _floor(module: str) -> int:
  parts = module.split(".")
  for n in range(len(parts), 0, -1):
    if ".".join(parts[:n]) in FLOORS:
      return FLOORS[".".join(parts[:n])]
  raise AssertionError(f"{module} is on no floor: add its package to FLOORS")


def _imports(text: str, top_level_only: bool = False) -> set[str]:
  """The cljax modules a module's text imports (``from pkg import sub`` counts as
  ``pkg.sub`` where ``sub`` is a module)."""
  tree = ast.parse(text)
  nodes = tree.body if top_level_only else ast.walk(tree)
  out = set()
  for node in nodes:
    if isinstance(node, ast.Import):
      out.update(a.name for a in node.names if a.name.split(".")[0] == "cljax")
    elif isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "cljax":
      for a in node.names:
        sub = f"{node.module}.{a.name}"
        out.add(sub if sub in MODULES else node.module)
  return out


def test_no_module_imports_from_a_floor_above_its_own():
  upward = []
  for path, text in _modules():
    me = _module_name(path)
    upward += [f"{me} (floor {_floor(me)}) imports {m} (floor {_floor(m)})"
               for m in sorted(_imports(text)) if _floor(m) > _floor(me)]
  assert not upward, upward


def test_the_lower_floors_name_nothing_of_the_upper_ones():
  """models/ and train/ import nothing of methods/, study/, lm/, report/, bench/, cli/;
  methods/ nothing of study/ up (the floors above, checked by name)."""
  rules = {("cljax/models", "cljax/train"): ("cljax.methods", "cljax.study", "cljax.lm",
                                             "cljax.report", "cljax.bench", "cljax.cli"),
           ("cljax/methods",): ("cljax.study", "cljax.report", "cljax.bench", "cljax.cli")}
  found = []
  for path, text in _modules():
    for where, banned in rules.items():
      if path.startswith(where):
        found += [f"{path} imports {m}" for m in _imports(text)
                  if any(m == b or m.startswith(b + ".") for b in banned)]
  assert not found, found


def _cycles(graph: dict[str, set[str]]) -> list[str]:
  """The import cycles of ``graph`` (module -> the modules it imports), each as a path."""
  done, path, cycles = set(), [], []

  def visit(m):
    if m in path:
      cycles.append(" -> ".join(path[path.index(m):] + [m]))
      return
    if m in done:
      return
    path.append(m)
    for d in sorted(graph.get(m, ())):
      visit(d)
    path.pop()
    done.add(m)
  for m in sorted(graph):
    visit(m)
  return cycles


def test_no_import_cycle():
  graph = {_module_name(p): _imports(t, top_level_only=True) & MODULES for p, t in _modules()}
  # A submodule's package __init__ runs before it: importing the package is no cycle.
  graph = {m: {d for d in deps if not m.startswith(d + ".")} for m, deps in graph.items()}
  cycles = _cycles(graph)
  assert not cycles, cycles


def test_no_function_over_80_lines():
  long_functions = []
  for path, text in _modules():
    for node in ast.walk(ast.parse(text)):
      if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
        length = node.end_lineno - node.lineno + 1
        if length > 80:
          long_functions.append(f"{path}:{node.lineno} {node.name}: {length} lines")
  assert not long_functions, long_functions


def test_each_public_name_names_one_function_or_class():
  """A public top-level function or class of cljax/ is defined in one module only (the
  entry points ``run`` and ``main`` of the programs and of the study and LM runs
  aside): a reader who meets a name knows which one it is."""
  where: dict[str, list[str]] = {}
  for path, text in _modules():
    for node in ast.parse(text).body:
      if (isinstance(node, (ast.FunctionDef, ast.ClassDef)) and not node.name.startswith("_")
          and node.name not in ("run", "main")):
        where.setdefault(node.name, []).append(path)
  twice = {name: paths for name, paths in where.items() if len(paths) > 1}
  assert not twice, twice


def test_the_checks_catch_an_upward_import_and_a_cycle():
  """The checks above can fail: an upward import and a two-module cycle are found."""
  assert _floor("cljax.train.steps") < _floor("cljax.study.stages")
  assert _imports("from cljax.study import stages\nimport cljax.report") == {
      "cljax.study.stages", "cljax.report"}
  assert _imports("def f():\n  from cljax.cli import flags\n", top_level_only=True) == set()
  assert _cycles({"a": {"b"}, "b": {"a"}, "c": {"a"}}) == ["a -> b -> a"]
  assert _cycles({"a": {"b"}, "b": set()}) == []


def test_only_the_models_package_imports_flax_linen():
  outside = [path for path, text in _modules()
             if re.search(r"^\s*(import flax\.linen|from flax import linen|from flax\.linen)",
                          text, re.M) and not path.startswith(os.path.join("cljax", "models"))]
  assert not outside, outside


def test_importing_every_module_runs_no_subprocess():
  """A notebook that imports cljax pays no ``git`` (or any other program) at import
  (every module but the command-line programs, which each define their flags on
  absl's one ``FLAGS``)."""
  library = sorted(m for m in MODULES
                   if not m.startswith("cljax.cli.") or m == "cljax.cli.flags")
  code = ("import subprocess\n"
          "def refuse(*a, **k):\n"
          "  raise AssertionError(f'a subprocess at import: {a}')\n"
          "subprocess.Popen.__init__ = refuse\n"
          "import importlib\n"
          f"for m in {library!r}:\n"
          "  importlib.import_module(m)\n"
          "print('imported')\n")
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                        env=env, cwd=ROOT, timeout=300, check=False)
  assert done.returncode == 0 and "imported" in done.stdout, done.stderr[-2000:]


def test_the_readme_layout_table_names_files_that_exist():
  text = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()
  layout = text[text.index("## Layout"):]
  named = re.findall(r"^\| `([^`]+)`", layout, re.M)
  assert len(named) >= 10, named
  missing = [p for p in named if not os.path.exists(os.path.join(ROOT, p.split(" ")[0]))]
  assert not missing, missing
  # every package of cljax/ has its row
  packages = sorted(f"cljax/{d}/" for d in os.listdir(PACKAGE)
                    if os.path.isfile(os.path.join(PACKAGE, d, "__init__.py")))
  assert not [p for p in packages if p not in named], (packages, named)
