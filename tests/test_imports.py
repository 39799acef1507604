"""The package reads as the data flows: no import cycle anywhere in dit_jax/, function-local imports included."""
from __future__ import annotations

import ast
import pathlib

PACKAGE = pathlib.Path(__file__).resolve().parents[1] / "dit_jax"
ROOT = "dit_jax"


def _modules() -> dict[str, pathlib.Path]:
  names = {}
  for path in PACKAGE.rglob("*.py"):
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    names[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
  return names


def _resolve(module: str, level: int, current: str, is_package: bool) -> str:
  if not level:
    return module
  base = current.split(".")[: len(current.split(".")) - level + (1 if is_package else 0)]
  return ".".join(base + ([module] if module else []))


def import_graph() -> dict[str, set[str]]:
  """module -> the dit_jax modules it imports. Importing ``a.b.c`` also runs the packages ``a.b`` (but the root
  package, which every import runs first, is only an edge where it is imported by name)."""
  modules = _modules()
  graph: dict[str, set[str]] = {}
  for name, path in modules.items():
    targets = set()
    for node in ast.walk(ast.parse(path.read_text())):
      if isinstance(node, ast.Import):
        targets |= {a.name for a in node.names}
      elif isinstance(node, ast.ImportFrom):
        base = _resolve(node.module or "", node.level, name, path.name == "__init__.py")
        subs = {f"{base}.{a.name}" for a in node.names if f"{base}.{a.name}" in modules}
        targets |= subs or {base}
        if len(subs) < len(node.names):
          targets.add(base)
    edges = set()
    for target in targets:
      if target != ROOT and not target.startswith(ROOT + "."):
        continue
      while target not in modules:
        target = target.rpartition(".")[0]
      edges.add(target)
      parent = target.rpartition(".")[0]
      while parent and parent != ROOT:  # the packages a submodule import runs first
        edges.add(parent)
        parent = parent.rpartition(".")[0]
    edges.discard(name)
    graph[name] = edges - {p for p in edges if name.startswith(p + ".")}  # a module's own packages are running
  return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
  """One cycle as [a, b, ..., a], or None."""
  state: dict[str, int] = {}  # 1 on the stack, 2 done
  stack: list[str] = []

  def visit(node: str) -> list[str] | None:
    state[node] = 1
    stack.append(node)
    for nxt in sorted(graph.get(node, ())):
      if state.get(nxt) == 1:
        return stack[stack.index(nxt):] + [nxt]
      if nxt not in state and (cycle := visit(nxt)):
        return cycle
    stack.pop()
    state[node] = 2
    return None

  for node in sorted(graph):
    if node not in state and (cycle := visit(node)):
      return cycle
  return None


def test_no_import_cycles():
  graph = import_graph()
  assert "dit_jax.train" in graph and "dit_jax.checkpoint" in graph["dit_jax.train"], "the walk found no imports"
  cycle = find_cycle(graph)
  assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_cycle_finder_sees_function_local_and_package_cycles():
  """The finder itself can fail: a function-local import back, and a package __init__ importing its user."""
  assert find_cycle({"a": {"b"}, "b": {"a"}}) == ["a", "b", "a"]
  assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None
  graph = import_graph()
  graph["dit_jax.checkpoint"] = graph["dit_jax.checkpoint"] | {"dit_jax.train"}  # what load() used to do
  assert find_cycle(graph) is not None
