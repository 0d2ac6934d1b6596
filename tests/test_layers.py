"""The import graph: no circles, and every arrow points down the layers (README "Layout").

Every import counts, the ones inside functions too: a lazy import is still a dependency.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("schemas", "indexer", "consumer", "workers", "ops")

#: Layer of each part, lowest first; a module imports only from its own part or from lower layers.
#: Parts on the same layer are independent of each other (ingest and query, demo and stack).
LAYERS = [
    ["schemas"],
    ["indexer.errors", "indexer.ids"],
    ["indexer.model"],
    ["indexer.text", "indexer.images"],
    ["indexer.stores", "indexer.encoders"],
    ["indexer.state"],
    ["indexer.ingest", "indexer.query"],
    ["indexer.engine"],
    ["ops.runtime"],
    ["workers"],
    ["consumer", "ops.serve"],
    ["ops.demo", "ops.stack"],
    ["ops.eval"],
    ["ops.bench"],
    ["ops.cli"],
]
RANK = {part: rank for rank, parts in enumerate(LAYERS) for part in parts}


def modules() -> dict[str, Path]:
    found = {}
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            parts = path.relative_to(ROOT).with_suffix("").parts
            found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def imports(name: str, path: Path, known: dict[str, Path]) -> set[str]:
    """Project modules ``name`` imports; ``from package import module`` names the module."""
    out = set()
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[:len(package.split(".")) - node.level + 1] + ([base] if base else []))
            for alias in node.names:
                out.add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base)
    return {m for m in out if m in known and m != name}


def part_of(module: str) -> str:
    best = max((p for p in RANK if module == p or module.startswith(p + ".")), key=len, default=None)
    assert best is not None, f"{module} belongs to no layer: add it to LAYERS"
    return best


def graph() -> dict[str, set[str]]:
    known = modules()
    return {name: imports(name, path, known) for name, path in known.items()}


def test_every_module_has_a_layer():
    for module in modules():
        if module not in PACKAGES and module != "indexer" and module != "ops":
            part_of(module)


def test_imports_only_go_down():
    upward = []
    for source, targets in graph().items():
        if source in PACKAGES:
            continue
        for target in targets:
            if target in PACKAGES:
                continue
            a, b = part_of(source), part_of(target)
            if a != b and RANK[b] >= RANK[a]:
                upward.append(f"{source} -> {target} ({a} is layer {RANK[a]}, {b} is layer {RANK[b]})")
    assert not upward, "imports that do not go down:\n" + "\n".join(sorted(upward))


def test_no_import_circles():
    edges = graph()
    state: dict[str, int] = {}
    circles = []

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for target in sorted(edges.get(node, ())):
            if state.get(target) == 1:
                circles.append(" -> ".join(path[path.index(target):] + [target]))
            elif target not in state:
                visit(target, path + [target])
        state[node] = 2

    for node in sorted(edges):
        if node not in state:
            visit(node, [node])
    assert not circles, "import circles:\n" + "\n".join(circles)


def test_the_core_reads_no_environment_and_knows_no_transport():
    """``indexer/`` is the pure core: no Celery, Kafka or environment; ``os.environ`` lives in the runtime config."""
    for path in (ROOT / "indexer").rglob("*.py"):
        text = path.read_text()
        for word in ("os.environ", "getenv", "import celery", "from celery", "import kafka", "from kafka"):
            assert word not in text, f"{path.relative_to(ROOT)} uses {word}"
    readers = [p.relative_to(ROOT).as_posix() for package in PACKAGES for p in (ROOT / package).rglob("*.py")
               if "os.environ" in p.read_text()]
    assert readers == ["ops/runtime/config.py"], readers
