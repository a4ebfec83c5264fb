"""The house reads as its parts: no import cycles, no private names across packages, and only
the packages that need torch import it (checked package by package)."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

import adapterkit

ROOT = Path(adapterkit.__file__).parent


def _modules() -> dict[str, Path]:
    out = {}
    for path in ROOT.rglob("*.py"):
        parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def _imports(path: Path) -> list[tuple[str, list[str]]]:
    """Every ``adapterkit`` import in the file, module-level and inside functions alike."""
    found = []
    tree = ast.parse(path.read_text(encoding="utf-8"))
    typing_only = {id(n) for block in ast.walk(tree) if isinstance(block, ast.If)
                   and ast.unparse(block.test).endswith("TYPE_CHECKING")
                   for n in ast.walk(block)}  # never executed: no cycle at run time
    for node in ast.walk(tree):
        if id(node) in typing_only:
            continue
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0 \
                and node.module.split(".")[0] == "adapterkit":
            found.append((node.module, [a.name for a in node.names]))
        elif isinstance(node, ast.Import):
            found += [(a.name, []) for a in node.names if a.name.split(".")[0] == "adapterkit"]
    return found


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    graph: dict[str, set[str]] = {m: set() for m in modules}
    for name, path in modules.items():
        for module, names in _imports(path):
            targets = [f"{module}.{n}" if f"{module}.{n}" in modules else module for n in names] \
                or [module]
            graph[name] |= {t for t in targets if t in modules and t != name}
    return graph


def test_no_import_cycles_between_modules():
    graph = _graph()
    graph.pop("adapterkit", None)  # the package façade: lazy re-exports (PEP 562) only
    for deps in graph.values():
        deps.discard("adapterkit")
    state: dict[str, int] = {}
    cycles = []

    def visit(node: str, stack: list[str]) -> None:
        state[node] = 1
        for dep in sorted(graph.get(node, ())):
            if state.get(dep) == 1:
                cycles.append(stack[stack.index(dep):] + [dep])
            elif dep not in state:
                visit(dep, stack + [dep])
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    assert not cycles, "import cycles: " + "; ".join(" -> ".join(c) for c in cycles)


PACKAGES = ("cli", "plugin_api", "library", "base", "lora", "runtime", "training", "serving")


def test_no_import_cycles_between_packages():
    """The packages form a hierarchy (the data flow), not a web: no package reaches back into
    one that depends on it. Top-level modules (errors, files, the façade) are not packages."""
    def package(module: str) -> str | None:
        parts = module.split(".")
        return parts[1] if len(parts) > 1 and parts[1] in PACKAGES else None

    edges: dict[str, set[str]] = {p: set() for p in PACKAGES}
    why: dict[tuple[str, str], str] = {}
    for module, deps in _graph().items():
        for dep in deps:
            a, b = package(module), package(dep)
            if a and b and a != b:
                edges[a].add(b)
                why.setdefault((a, b), f"{module} -> {dep}")
    # the data flow of docs/architecture.md: a package imports only from lower levels
    level = {"plugin_api": 0, "base": 0, "library": 1, "lora": 2, "runtime": 3, "training": 4,
             "serving": 5, "cli": 6}
    upward = [why[(a, b)] for a in PACKAGES for b in edges[a] if level[b] >= level[a]]
    assert not upward, upward
    # serving sits beside training, not on it: a server never trains
    assert "training" not in edges["serving"], why.get(("serving", "training"))


def test_no_module_imports_a_private_name_from_another_package():
    offenders = []
    for name, path in _modules().items():
        package = name.rsplit(".", 1)[0]
        for module, names in _imports(path):
            source_package = module.rsplit(".", 1)[0]
            private = [n for n in names if n.startswith("_") and not n.startswith("__")]
            if source_package != package and (private or "._" in module):
                offenders.append(f"{name} imports {module} {private}")
    assert not offenders, offenders


#: The only modules that import torch when imported: they subclass ``torch.nn.Module`` (the
#: dropout one also ``torch.autograd.Function``).
NEEDS_TORCH = {"adapterkit.lora.slots", "adapterkit.serving.rows", "adapterkit.training.dropout"}


def _imports_torch(modules: list[str]) -> bool:
    code = f"import sys, {', '.join(modules)}; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout.strip()
    return out == "True"


def test_only_the_modules_that_subclass_torch_import_it():
    """Every other module imports torch (and transformers, peft...) inside the functions that
    need it, so the CLI's fast commands, the library and the plugin API stay light. Checked
    for all modules in one fresh interpreter, then one by one to name the culprit."""
    light = sorted(m for m in _modules() if m not in NEEDS_TORCH and not m.endswith("__main__"))
    if _imports_torch(light):
        culprits = [m for m in light if _imports_torch([m])]
        pytest.fail(f"these modules import torch when imported: {culprits}")
