"""The package's shape: imports run only downward, kernels/ is a leaf, a plain install works."""

import ast
import os
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _modules():
  """``{module name: path}`` of every module of the installed layout (kernels/ as
  sparsejax.kernels, experiments/ as sparsejax.experiments)."""
  found = {}
  for folder, package in ((ROOT / "sparsejax", "sparsejax"), (ROOT / "kernels", "sparsejax.kernels"),
                          (ROOT / "experiments", "sparsejax.experiments")):
    for path in folder.rglob("*.py"):
      parts = list(path.relative_to(folder).with_suffix("").parts)
      if parts[-1] == "__init__":
        parts = parts[:-1]
      found[".".join([package, *parts])] = path
  return found


MODULES = _modules()


def _is_package(name: str) -> bool:
  return MODULES[name].name == "__init__.py"


def _imports(name: str) -> set[str]:
  """The sparsejax modules that module ``name`` imports (at any depth of its code)."""
  package = name if _is_package(name) else name.rpartition(".")[0]
  out = set()
  for node in ast.walk(ast.parse(MODULES[name].read_text())):
    if isinstance(node, ast.Import):
      targets = [alias.name for alias in node.names]
    elif isinstance(node, ast.ImportFrom):
      base = node.module or ""
      if node.level:
        anchor = package.split(".")[:len(package.split(".")) - (node.level - 1)]
        base = ".".join(anchor + ([base] if base else []))
      # "from pkg import sub" imports the module pkg.sub where sub is one.
      targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in MODULES else base
                 for alias in node.names]
    else:
      continue
    out.update(t for t in targets if t in MODULES and t != name)
  return out


def test_kernels_import_nothing_of_the_core():
  for name in MODULES:
    if name.startswith("sparsejax.kernels"):
      outside = {m for m in _imports(name) if not m.startswith("sparsejax.kernels")}
      assert not outside, f"{MODULES[name]} imports {sorted(outside)}: kernels/ must be a leaf"


def test_imports_run_only_downward():
  """The modules (package ``__init__`` re-exports aside) import each other without a cycle."""
  graph = {name: {m for m in _imports(name) if not _is_package(m)}
           for name in MODULES if not _is_package(name)}
  state = {}

  def visit(name, chain):
    if state.get(name) == "done":
      return
    assert state.get(name) != "open", f"import cycle: {' -> '.join(chain + [name])}"
    state[name] = "open"
    for target in sorted(graph[name]):
      visit(target, chain + [name])
    state[name] = "done"

  for name in sorted(graph):
    visit(name, [])


def test_the_core_imports_no_experiment():
  for name in MODULES:
    if not name.startswith("sparsejax.experiments"):
      outside = {m for m in _imports(name) if m.startswith("sparsejax.experiments")}
      assert not outside, f"{MODULES[name]} imports {sorted(outside)}: experiments sit on top"


def test_a_plain_install_has_working_kernels_and_launchers(tmp_path):
  """``pip install .`` (not editable) maps kernels/ and experiments/ with every module, and the
  trainer's console script runs from any directory."""
  target = tmp_path / "site"
  # Build isolation fetches setuptools and wheel, which a fresh venv may lack.
  build = subprocess.run(
      [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(target),
       str(ROOT)], capture_output=True, text=True)
  assert build.returncode == 0, build.stderr[-3000:]
  names = sorted(MODULES)
  probe = ("import importlib, sparsejax\n"
           f"for name in {names!r}:\n"
           "  importlib.import_module(name)\n"
           "print(sparsejax.__file__)")
  env = {**os.environ, "PYTHONPATH": str(target)}
  result = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, env=env,
                          capture_output=True, text=True)
  assert result.returncode == 0, result.stderr[-3000:]
  assert pathlib.Path(result.stdout.strip()).is_relative_to(target)
  script = subprocess.run([str(target / "bin" / "sparsejax-xmc"), "--epochs=0"], cwd=tmp_path,
                          env=env, capture_output=True, text=True)
  assert script.returncode == 2 and script.stderr == "error: --epochs must be >= 1, got 0\n"

