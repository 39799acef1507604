"""The test suite's own layout: shared builders live in tests/helpers, so no test file (nor a helper, nor a script
a test runs in a subprocess) imports another test module or conftest, and conftest holds only configuration and
fixtures."""
from __future__ import annotations

import ast
import pathlib
import textwrap

TESTS = pathlib.Path(__file__).resolve().parent


def _imported_modules(tree: ast.AST) -> set[str]:
  """Every module an import statement names, also inside functions and inside string constants that parse as
  Python (scripts run with ``python -c``); relative imports keep their leading dots."""
  out = set()
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      out.update(alias.name for alias in node.names)
    elif isinstance(node, ast.ImportFrom):
      base = "." * node.level + (node.module or "")
      out.add(base)
      out.update(f"{base}.{alias.name}" if node.module else base + alias.name for alias in node.names)
    elif isinstance(node, ast.Constant) and isinstance(node.value, str) and "import" in node.value:
      try:
        out |= _imported_modules(ast.parse(textwrap.dedent(node.value)))
      except SyntaxError:
        pass
  return out


def _is_test_module(name: str) -> bool:
  parts = name.lstrip(".").split(".")
  return any(part.startswith("test_") or part == "conftest" for part in parts)


def test_no_file_imports_a_test_module_or_conftest():
  files = sorted(TESTS.glob("*.py")) + sorted((TESTS / "helpers").glob("*.py"))
  files.remove(pathlib.Path(__file__).resolve())  # its examples below are bad imports on purpose
  assert len(files) > 20
  bad = {f"{path.relative_to(TESTS)}: {name}" for path in files
         for name in _imported_modules(ast.parse(path.read_text())) if _is_test_module(name)}
  assert not bad, f"import shared code from tests.helpers instead: {sorted(bad)}"


def test_the_checker_sees_every_kind_of_import():
  code = textwrap.dedent('''
      import tests.test_a
      from tests import conftest
      from .test_b import x
      def f():
          from tests.test_c import y
      SCRIPT = """
          from tests.test_d import z
      """
  ''')
  found = {name for name in _imported_modules(ast.parse(code)) if _is_test_module(name)}
  assert {"tests.test_a", "tests.conftest", ".test_b", "tests.test_c", "tests.test_d"} <= found
  assert not any(_is_test_module(n) for n in _imported_modules(ast.parse("from tests.helpers import rel_err")))


def test_conftest_holds_only_configuration_and_fixtures():
  tree = ast.parse((TESTS / "conftest.py").read_text())
  for node in tree.body:
    if isinstance(node, ast.FunctionDef | ast.ClassDef):
      fixture = any("fixture" in ast.unparse(d) for d in getattr(node, "decorator_list", []))
      assert fixture or node.name.startswith("pytest_"), f"conftest.py: {node.name} belongs in tests/helpers"
    elif isinstance(node, ast.Assign | ast.AnnAssign):
      raise AssertionError(f"conftest.py: module-level value {ast.unparse(node)[:60]!r} belongs in tests/helpers")
