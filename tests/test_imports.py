"""How the modules depend on each other: deployment code loads no training code."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path


def _modules_after_import(module: str) -> set[str]:
    code = f"import json, sys, {module}; print(json.dumps(sorted(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    return set(json.loads(out))


def test_export_and_onnx_scoring_load_no_training_code():
    for module in ("anomaseg.export", "anomaseg.scoring", "anomaseg.scorer", "anomaseg.calibration"):
        loaded = _modules_after_import(module)
        assert module in loaded
        assert not {"anomaseg.training", "anomaseg.distributed", "anomaseg.compilation", "lightning"} & loaded, module


# --------------------------------------------------------------------------- the static import graph
SRC = Path(__file__).resolve().parents[1] / "src"
REGISTRIES = ("anomaseg.models", "anomaseg.predictors")  # packages whose modules may import each other


def _modules() -> dict[str, Path]:
    """Every module of the package by dotted name (a package by its own name, not `.__init__`)."""
    out = {}
    for path in sorted((SRC / "anomaseg").rglob("*.py")):
        parts = list(path.relative_to(SRC).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


def _imports(name: str, path: Path, modules: dict) -> list[tuple[str, str]]:
    """(imported module, imported name or "") for every import of anomaseg code anywhere in the
    file: at module level and inside functions alike (a deferred import is still a dependency)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            found += [(alias.name, "") for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from the package, up level - 1
                up = package.split(".")[:len(package.split(".")) - (node.level - 1)]
                base = ".".join(up + ([base] if base else []))
            for alias in node.names:
                submodule = f"{base}.{alias.name}"
                found.append((submodule, "") if submodule in modules else (base, alias.name))
    return [(module, imported) for module, imported in found if module in modules and module != name]


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan's algorithm, iterative)."""
    index, low, on_stack, stack, found = {}, {}, set(), [], []
    for root in graph:
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = len(index)
        stack.append(root), on_stack.add(root)
        while work:
            node, edges = work[-1]
            for nxt in edges:
                if nxt not in index:
                    index[nxt] = low[nxt] = len(index)
                    stack.append(nxt), on_stack.add(nxt)
                    work.append((nxt, iter(sorted(graph[nxt]))))
                    break
                if nxt in on_stack:
                    low[node] = min(low[node], index[nxt])
            else:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[node])
                if low[node] == index[node]:
                    component = []
                    while True:
                        member = stack.pop()
                        on_stack.discard(member)
                        component.append(member)
                        if member == node:
                            break
                    if len(component) > 1:
                        found.append(sorted(component))
    return found


def _in_registry(component: list[str]) -> bool:
    return any(all(m == r or m.startswith(r + ".") for m in component) for r in REGISTRIES)


def test_the_cycle_finder_finds_a_cycle_and_only_one():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycle_outside_the_registries():
    modules = _modules()
    graph = {name: {m for m, _ in _imports(name, path, modules)} for name, path in modules.items()}
    assert "anomaseg.scorer" in graph["anomaseg.export"]  # the graph sees imports
    assert [c for c in _cycles(graph) if not _in_registry(c)] == []


def test_no_module_imports_a_private_name_of_another():
    modules = _modules()
    private = sorted(f"{name} imports {imported} from {module}" for name, path in modules.items()
                     for module, imported in _imports(name, path, modules)
                     if imported.startswith("_") and not imported.endswith("__"))  # __version__ is public
    assert private == []
