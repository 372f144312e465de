"""The package's import structure, read from the source with `ast` (nothing is imported).

- no import cycle anywhere in `micromoe` (module-level and function-level imports alike);
- no imports inside functions in `micromoe.plan` (an import inside a function is a sign that two
  files want to be arranged differently);
- `micromoe.plan` and `micromoe.sim` never import torch, not even through another module;
- the packages are layered plan <- (top-level utilities) <- runtime <- model <- train, sim <- cli:
  a lower layer never imports a higher one, and sim never imports runtime, model or train (layers
  that do not exist yet are simply absent).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1] / "micromoe"

# what each package may import from micromoe besides itself; top-level utility modules
# (`allocator`, `routing_log`) sit just above plan: they may import plan, and every package but
# plan may import them
ALLOWED = {
    "plan": set(),
    "runtime": {"plan"},
    "model": {"plan", "runtime"},
    "train": {"plan", "runtime", "model"},
    "sim": {"plan"},
    "cli": {"plan", "runtime", "model", "train", "sim"},
}
NO_TORCH = ("plan", "sim")


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


MODULES = {_module_name(p): p for p in sorted(ROOT.rglob("*.py"))}


def _is_package(name: str) -> bool:
    return MODULES[name].name == "__init__.py"


def _imports(name: str) -> list[tuple[str, bool, int]]:
    """(imported module, inside a function?, line) for every import statement of module `name`."""
    tree = ast.parse(MODULES[name].read_text(), filename=str(MODULES[name]))
    package = name if _is_package(name) else name.rpartition(".")[0]
    out: list[tuple[str, bool, int]] = []

    def visit(node: ast.AST, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            nested = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            if isinstance(child, ast.Import):
                out.extend((alias.name, in_function, child.lineno) for alias in child.names)
            elif isinstance(child, ast.ImportFrom):
                base = child.module or ""
                if child.level:
                    anchor = package.split(".")[: len(package.split(".")) - (child.level - 1)]
                    base = ".".join(anchor + ([base] if base else []))
                out.append((base, in_function, child.lineno))
                for alias in child.names:  # `from pkg import submodule`
                    if f"{base}.{alias.name}" in MODULES:
                        out.append((f"{base}.{alias.name}", in_function, child.lineno))
            visit(child, nested)

    visit(tree, False)
    return out


def _graph() -> dict[str, set[str]]:
    """Edges between micromoe modules (an import of `a.b.c` points at the longest known prefix)."""
    graph: dict[str, set[str]] = {}
    for name in MODULES:
        deps = set()
        for target, _, _ in _imports(name):
            parts = target.split(".")
            for k in range(len(parts), 0, -1):
                prefix = ".".join(parts[:k])
                if prefix in MODULES and prefix != "micromoe":
                    deps.add(prefix)
                    break
        deps.discard(name)
        graph[name] = deps
    return graph


def _layer(name: str) -> str | None:
    """The package a module belongs to ('cli' for the entry points micromoe.cli and micromoe.__main__);
    None for top-level utilities."""
    parts = name.split(".")
    if len(parts) == 1:
        return None
    if parts[1] in ("cli", "__main__"):
        return "cli"
    if len(parts) == 2 and not _is_package(name):
        return None  # micromoe.allocator, micromoe.routing_log, ...: below every package
    return parts[1]


def test_no_import_cycle():
    graph = _graph()
    state: dict[str, int] = {}  # 1 = on the DFS stack, 2 = done
    stack: list[str] = []

    def dfs(u: str) -> None:
        state[u] = 1
        stack.append(u)
        for v in sorted(graph[u]):
            if state.get(v) == 1:
                cycle = stack[stack.index(v) :] + [v]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if v not in state:
                dfs(v)
        stack.pop()
        state[u] = 2

    for u in sorted(graph):
        if u not in state:
            dfs(u)


def test_no_imports_inside_functions_in_plan():
    bad = [
        f"{name}:{line} imports {target}"
        for name in MODULES
        if name.startswith("micromoe.plan")
        for target, in_function, line in _imports(name)
        if in_function
    ]
    assert not bad, "imports inside functions in micromoe.plan:\n" + "\n".join(bad)


@pytest.mark.parametrize("package", NO_TORCH)
def test_package_never_imports_torch(package):
    graph = _graph()
    start = [n for n in MODULES if _layer(n) == package]
    assert start, f"micromoe.{package} has no modules"
    seen, todo = set(start), list(start)
    while todo:
        u = todo.pop()
        for v in graph[u]:
            if v not in seen:
                seen.add(v)
                todo.append(v)
    bad = [
        f"{name}:{line} imports {target}"
        for name in sorted(seen)
        for target, _, line in _imports(name)
        if target == "torch" or target.startswith("torch.")
    ]
    assert not bad, f"micromoe.{package} reaches torch:\n" + "\n".join(bad)


def test_layers_import_one_way():
    bad = []
    for name, deps in _graph().items():
        layer = _layer(name)
        if layer is None:
            reached = sorted(d for d in deps if _layer(d) not in (None, "plan"))
            bad += [f"{name} (a top-level utility) imports {d}" for d in reached]
            continue
        assert layer in ALLOWED, f"new package micromoe.{layer}: add it to ALLOWED in this test"
        for d in deps:
            other = _layer(d)
            if other is None and layer == "plan":
                bad.append(f"{name} (plan) imports the top-level utility {d}")
            if other is not None and other != layer and other not in ALLOWED[layer]:
                bad.append(f"{name} ({layer}) imports {d} ({other})")
    assert not bad, (
        "imports against the layering plan <- runtime <- model <- train, sim <- cli:\n"
        + "\n".join(sorted(bad))
    )


def test_the_checker_sees_imports():
    """The parser finds module-level, function-level and relative imports (guards the tests above)."""
    graph = _graph()
    assert "micromoe.plan.checks" in graph["micromoe.plan.schedule"]
    assert "micromoe.plan" in graph["micromoe.sim.balancers"]
    assert any(t == "micromoe.sim.plot" and f for t, f, _ in _imports("micromoe.sim.command"))
