"""The package's shape: dependencies point one way, and files and functions stay small.

Read from the source (every import, also those inside functions), so that a new cycle
or a new hub fails here rather than in a reviewer's head.
"""

import ast
import os

import pytest

PACKAGE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                       "vgg_jax")
MAX_MODULE_LINES = 500
MAX_FUNCTION_LINES = 80


def modules() -> dict[str, ast.Module]:
  return {name[:-3]: ast.parse(open(os.path.join(PACKAGE, name)).read())
          for name in sorted(os.listdir(PACKAGE)) if name.endswith(".py")}


def imported(tree: ast.Module, names) -> set[str]:
  """The package's modules that TREE imports, anywhere in it."""
  out = set()
  for node in ast.walk(tree):
    if isinstance(node, ast.ImportFrom) and node.module == "vgg_jax":
      out |= {a.name for a in node.names}
    elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("vgg_jax."):
      out.add(node.module.split(".")[1])
    elif isinstance(node, ast.Import):
      out |= {a.name.split(".")[1] for a in node.names if a.name.startswith("vgg_jax.")}
  return out & set(names)


def import_graph() -> dict[str, set[str]]:
  trees = modules()  # (a command importing its own module, as sweep's does, is no cycle)
  return {name: imported(tree, trees) - {name} for name, tree in trees.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
  """A cycle of GRAPH as a path that comes back to its start, or None."""
  state = {}  # 1: on the current path, 2: done

  def visit(node, path):
    state[node] = 1
    for nxt in sorted(graph[node]):
      if state.get(nxt) == 1:
        return path[path.index(nxt):] + [node, nxt] if nxt in path else [node, nxt]
      if nxt not in state:
        found = visit(nxt, path + [node])
        if found:
          return found
    state[node] = 2
    return None

  for node in sorted(graph):
    if node not in state:
      found = visit(node, [])
      if found:
        return found
  return None


def test_no_import_cycle():
  assert find_cycle(import_graph()) is None, " -> ".join(find_cycle(import_graph()))


def test_the_cycle_finder_finds_cycles():
  assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) is not None
  assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None


def test_training_is_wired_by_main_only():
  """main wires a run; nothing else builds on the training loop (the step benchmark
  times its step)."""
  graph = import_graph()
  assert {m for m, deps in graph.items() if "train" in deps} == {"main", "benchmark"}
  assert "evaluate" not in graph["train"] and "train" not in graph["evaluate"]
  for low in ("models", "transforms", "datasets", "pixel_stats", "input_pipeline",
              "metrics"):
    assert not graph[low] & {"train", "evaluate", "main", "sweep", "checkpointing"}, low


def test_modules_and_functions_are_small():
  long = []
  for name, tree in modules().items():
    lines = max(getattr(node, "end_lineno", 0) for node in ast.walk(tree))
    if lines > MAX_MODULE_LINES:
      long.append(f"{name}.py: {lines} lines")
    for node in ast.walk(tree):
      if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
        length = node.end_lineno - node.lineno + 1
        if length > MAX_FUNCTION_LINES:
          long.append(f"{name}.{node.name}: {length} lines")
  assert not long, long


@pytest.mark.parametrize("name", ["create_model", "validate_config", "describe",
                                  "config_differences", "read_metrics", "correct_top_k",
                                  "usable_cores"])
def test_one_owner_per_name(name):
  """A public name is defined in one module only (one meaning across the package)."""
  owners = [m for m, tree in modules().items()
            if any(isinstance(n, (ast.FunctionDef, ast.ClassDef)) and n.name == name
                   for n in tree.body)]
  assert len(owners) <= 1, owners
