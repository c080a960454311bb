"""The package layers, checked from the source: no module imports from a higher layer, no file cycles.

base (errors, manifest, registry, artifact, backends, confine, fixtures) < runtime < exporters <
validation < quantize < benchmarks < application (cli, build, demo, the fixture trainers).
Function-local imports count too: hiding an upward import inside a function still couples the layers.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
FOLDERS = {  # source folder -> the package it installs as (pyproject's package-dir)
    "modelkiln": "modelkiln",
    "runtime": "modelkiln.runtime",
    "exporters": "modelkiln.exporters",
    "quantize": "modelkiln.quantize",
    "benchmarks": "modelkiln.benchmarks",
}
# Lowest first. A module belongs to the layer of its longest matching prefix.
LAYERS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("base", ("modelkiln",)),
    ("runtime", ("modelkiln.runtime",)),
    ("exporters", ("modelkiln.exporters",)),
    ("validation", ("modelkiln.validation",)),
    ("quantize", ("modelkiln.quantize",)),
    ("benchmarks", ("modelkiln.benchmarks",)),
    (
        "application",
        (
            "modelkiln.cli",
            "modelkiln.build",
            "modelkiln.demo",
            "modelkiln.readme_tables",
            "modelkiln.fixtures.train_captioner",
            "modelkiln.fixtures.train_text_to_image",
        ),
    ),
)


def _modules() -> dict[str, Path]:
    found = {}
    for folder, package in FOLDERS.items():
        for path in (ROOT / folder).rglob("*.py"):
            parts = [package, *path.relative_to(ROOT / folder).with_suffix("").parts]
            found[".".join(parts).removesuffix(".__init__")] = path
    return found


def _layer(module: str) -> int:
    matches = [
        (len(prefix), index)
        for index, (_, prefixes) in enumerate(LAYERS)
        for prefix in prefixes
        if module == prefix or module.startswith(prefix + ".")
    ]
    return max(matches)[1]


def _imports(module: str, path: Path, known: set[str]) -> set[str]:
    """The project modules ``module`` imports, anywhere in the file."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    targets = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = package.split(".")[: len(package.split(".")) - node.level + 1] if node.level else []
            stem = ".".join([*base, *([node.module] if node.module else [])])
            targets |= {f"{stem}.{alias.name}" for alias in node.names} | {stem}
    # `from pkg import module` names a module; `from module import function` names the module itself.
    return {target for target in targets if target in known and target != module}


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    return {name: _imports(name, path, set(modules)) for name, path in modules.items()}


def test_no_module_imports_from_a_higher_layer():
    upward = [
        f"{module} ({LAYERS[_layer(module)][0]}) imports {target} ({LAYERS[_layer(target)][0]})"
        for module, targets in _graph().items()
        for target in sorted(targets)
        if _layer(target) > _layer(module)
    ]
    assert upward == []


def test_no_import_cycles_between_files():
    graph = _graph()
    # A package's __init__ importing its own modules is how packages expose an API, not a cycle.
    edges = {
        m: {t for t in ts if not (m.startswith(t + ".") and graph.get(t) is not None)}
        for m, ts in graph.items()
    }
    cycles, state = [], {}

    def visit(node: str, stack: list[str]) -> None:
        state[node] = "open"
        for target in sorted(edges[node]):
            if state.get(target) == "open":
                cycles.append(" -> ".join([*stack[stack.index(target) :], target]))
            elif target not in state:
                visit(target, [*stack, target])
        state[node] = "done"

    for node in sorted(edges):
        if node not in state:
            visit(node, [node])
    assert cycles == []
