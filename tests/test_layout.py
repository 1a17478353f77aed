"""The package layout: dependencies point one way, and no module imports itself in a circle.

Read from the source with ``ast`` (imports inside functions count too), so a lazy import that
goes the wrong way is caught as well as a top-level one.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("suffix_tree", "policies", "rollouts", "das")

# layer -> the layers its modules may import. A layer is a top-level package, or a subpackage
# of ``das`` (``das`` alone is its core modules).
ALLOWED = {
    "suffix_tree": {"suffix_tree"},
    "policies": {"policies"},
    "rollouts": {"rollouts", "suffix_tree", "policies"},
    "das": {"das", "rollouts", "suffix_tree", "policies"},
    "das.vllm": {"das.vllm", "das", "rollouts", "suffix_tree", "policies"},
    "das.verl": {"das.verl", "das.vllm", "das", "rollouts", "suffix_tree", "policies"},
    "das.bench": {"das.bench", "das.vllm", "das", "rollouts", "suffix_tree", "policies"},
    "das.cli": {"das.cli", "das.bench", "das.vllm", "das", "rollouts", "suffix_tree", "policies"},
}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def layer_of(module: str) -> str:
    parts = module.split(".")
    if parts[0] == "das" and len(parts) > 1 and f"das.{parts[1]}" in ALLOWED:
        return f"das.{parts[1]}"
    return parts[0]


def project_imports(path: Path, top_level_only: bool = False) -> set[str]:
    """Modules of this project that ``path`` imports."""
    tree = ast.parse(path.read_text(), filename=str(path))
    nodes = tree.body if top_level_only else ast.walk(tree)
    found = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
        else:
            continue
        found.update(name for name in names if name.split(".")[0] in PACKAGES)
    return found


def all_modules() -> dict[str, Path]:
    return {
        module_name(path): path for package in PACKAGES for path in (ROOT / package).rglob("*.py")
    }


def test_every_import_points_down_the_layers():
    modules = all_modules()
    wrong = []
    for name, path in modules.items():
        layer = layer_of(name)
        for imported in project_imports(path):
            if layer_of(imported) not in ALLOWED[layer]:
                wrong.append(f"{name} ({layer}) imports {imported}")
    assert not wrong, "\n".join(sorted(wrong))


def test_no_module_level_import_circle():
    modules = all_modules()
    graph = {
        name: {m for m in project_imports(path, top_level_only=True) if m in modules} - {name}
        for name, path in modules.items()
    }
    # A package's ``__init__`` importing its own submodules is not a circle.
    for name in graph:
        graph[name] = {m for m in graph[name] if not m.startswith(name + ".")}
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    cycles = []

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycles.append(" -> ".join([*path[path.index(nxt) :], nxt]))
            elif nxt not in state:
                visit(nxt, [*path, nxt])
        state[node] = 2

    for name in sorted(graph):
        if name not in state:
            visit(name, [name])
    assert not cycles, "\n".join(cycles)


def test_the_subpackages_import_without_their_engines():
    """``das.vllm``/``das.verl`` name their engines, but importing them loads neither."""
    code = (
        "import sys, das.vllm, das.verl, das.cli, das.bench; "
        "print(sorted(m for m in ('vllm', 'verl', 'torch') if m in sys.modules))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120
    )
    assert result.stdout.strip() == "[]", result.stdout
