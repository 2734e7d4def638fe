"""The package's layers: imports point one way, and no module imports itself round a cycle.

Every `import` counts, including those inside functions (a cycle hidden by a
function-level import is still a cycle). Read from the source with `ast`, so
nothing is imported to check it.

    config, distributed, disk,     leaves
    kernels
    data, store                    import only the leaves and data
    nn                             the leaves
    learn                          nn, data and the leaves
    swarm                          learn, store and below
    run, capture                   swarm and below
    api                            run and below: the Python API
    serve, daemon                  api, capture and below (serve uses the API's learner, and
                                   writes what users liked into a capture spool)
    cli                            on top
    entry points                   the root package and `__main__` modules: import anything,
                                   imported by nothing
"""

import ast
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
_LEAVES = {"config", "distributed", "disk", "kernels"}
_LEARN = _LEAVES | {"nn", "data", "learn"}
_SWARM = _LEARN | {"store", "swarm"}
_RUN = _SWARM | {"run"}
ALLOWED = {
    "config": set(), "distributed": set(), "disk": set(), "kernels": set(),
    "data": {"config", "distributed", "disk"},
    "store": {"config", "distributed", "disk", "data"},
    "nn": {"config", "distributed", "kernels"},
    "learn": _LEARN,
    "swarm": _SWARM,
    "run": _RUN, "capture": _RUN - {"swarm", "learn", "nn", "kernels"},
    "serve": _RUN | {"api", "capture"},
    "daemon": _RUN | {"api", "capture", "serve"},
    "api": _RUN,
    "cli": _RUN | {"api", "capture", "serve", "daemon"},
}


def package_modules() -> dict[str, Path]:
  """streamlearn's module names -> source files (kernels/ installs as streamlearn.kernels)."""
  modules = {}
  for folder, prefix in ((ROOT / "streamlearn", "streamlearn"),
                         (ROOT / "kernels", "streamlearn.kernels")):
    for path in folder.rglob("*.py"):
      parts = list(path.relative_to(folder).with_suffix("").parts)
      if parts[-1] == "__init__":
        parts = parts[:-1]
      modules[".".join([prefix] + parts)] = path
  return modules


def imports_of(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
  """The package modules `name` imports anywhere in its file (functions included)."""
  is_package = path.name == "__init__.py"
  found = set()
  for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
    targets = []
    if isinstance(node, ast.Import):
      targets = [alias.name for alias in node.names]
    elif isinstance(node, ast.ImportFrom):
      base = node.module or ""
      if node.level:  # relative: from the module's own package upwards
        package = name.split(".") if is_package else name.split(".")[:-1]
        base = ".".join(package[:len(package) - node.level + 1] + ([base] if base else []))
      # `from pkg import mod` imports the submodule; `from mod import name` the module.
      targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base
                 for a in node.names]
    for target in targets:
      while target and target not in modules:  # `import a.b.c` where only a.b is ours
        target = target.rpartition(".")[0]
      if target and target != name:
        found.add(target)
  return found


def group_of(module: str) -> str:
  """The layer a module belongs to: its first component under streamlearn."""
  parts = module.split(".")
  if len(parts) == 1 or parts[-1] == "__main__":
    return "entry"
  return parts[1].removesuffix(".py")


def import_graph() -> dict[str, set[str]]:
  modules = package_modules()
  return {name: imports_of(name, path, modules) for name, path in modules.items()}


def test_every_module_is_in_a_layer():
  unknown = sorted(m for m in import_graph() if group_of(m) not in ALLOWED | {"entry": None})
  assert not unknown, f"modules outside every layer (add them to ALLOWED): {unknown}"


def test_imports_point_down_the_layers():
  wrong = []
  for module, targets in sorted(import_graph().items()):
    group = group_of(module)
    for target in sorted(targets):
      target_group = group_of(target)
      if target_group == "entry":
        wrong.append(f"{module} imports the entry point {target}")
      elif group != "entry" and target_group != group and target_group not in ALLOWED[group]:
        wrong.append(f"{module} ({group}) imports {target} ({target_group})")
  assert not wrong, "upward imports:\n" + "\n".join(wrong)


def test_no_import_cycles():
  graph = import_graph()
  cycles = [scc for scc in strongly_connected(graph) if len(scc) > 1]
  assert not cycles, "import cycles: " + "; ".join(" <-> ".join(sorted(c)) for c in cycles)


def strongly_connected(graph: dict[str, set[str]]) -> list[set[str]]:
  """Tarjan's algorithm, iteratively (no recursion limit to meet)."""
  index, low, on_stack, stack, result, counter = {}, {}, set(), [], [], [0]
  for root in graph:
    if root in index:
      continue
    work = [(root, iter(sorted(graph[root])))]
    index[root] = low[root] = counter[0]
    counter[0] += 1
    stack.append(root)
    on_stack.add(root)
    while work:
      node, children = work[-1]
      child = next(children, None)
      if child is not None:
        if child not in index:
          index[child] = low[child] = counter[0]
          counter[0] += 1
          stack.append(child)
          on_stack.add(child)
          work.append((child, iter(sorted(graph.get(child, ())))))
        elif child in on_stack:
          low[node] = min(low[node], index[child])
        continue
      work.pop()
      if work:
        low[work[-1][0]] = min(low[work[-1][0]], low[node])
      if low[node] == index[node]:
        scc = set()
        while True:
          member = stack.pop()
          on_stack.discard(member)
          scc.add(member)
          if member == node:
            break
        result.append(scc)
  return result


def test_the_checker_sees_cycles_and_function_level_imports(tmp_path, monkeypatch):
  """The checker itself: a cycle through an import inside a function is found."""
  package = tmp_path / "streamlearn"
  (package / "nn").mkdir(parents=True)
  (package / "__init__.py").write_text("")
  (package / "config.py").write_text("def f():\n  from streamlearn.nn import model\n")
  (package / "nn" / "__init__.py").write_text("")
  (package / "nn" / "model.py").write_text("from streamlearn.config import f\n")
  (tmp_path / "kernels").mkdir()
  monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
  graph = import_graph()
  assert graph["streamlearn.config"] == {"streamlearn.nn.model"}
  assert {"streamlearn.config", "streamlearn.nn.model"} in strongly_connected(graph)
