"""The layering of docs/architecture.md, checked on every module's imports (parsed, never run).

Imports inside functions count (a lazy import is still a dependency); imports under
`if TYPE_CHECKING:` do not (annotations only).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import tetriinfer

PACKAGE_ROOT = Path(tetriinfer.__file__).parent

# The `tetriinfer` packages (or top-level modules) each layer may import at run time, itself included.
ALLOWED_IMPORTS: dict[str, frozenset[str]] = {
    "sched": frozenset({"sched"}),  # the bottom layer: pure policies (config imports sched's names)
    "config": frozenset({"config", "sched"}),
    "metrics": frozenset({"metrics"}),
    "net": frozenset({"net"}),
    "presets": frozenset({"presets"}),
    "sim": frozenset({"sim", "sched", "config", "presets", "metrics"}),
    # bench drives a real server over HTTP (a `tetriinfer serve` subprocess), never through cluster
    "bench": frozenset({"bench", "sim", "sched", "config", "presets", "metrics", "net"}),
}
# Packages the simulator and the benchmarks run without (the torch-free layers).
TORCH_FREE = ("sched", "config", "metrics", "net", "presets", "sim", "bench")
HEAVY_MODULES = frozenset({"torch", "triton", "transformers"})
# sched takes time as an argument and does no I/O: no clock, files, processes, sockets or logging.
IO_MODULES = frozenset({
    "os", "io", "sys", "pathlib", "shutil", "tempfile", "glob", "fileinput", "json", "csv", "gzip", "pickle",
    "sqlite3", "logging", "time", "datetime", "socket", "ssl", "select", "selectors", "subprocess", "signal",
    "threading", "multiprocessing", "concurrent", "asyncio", "urllib", "http", "httpx", "aiohttp", "zmq",
    "msgspec", "fastapi", "uvicorn", "ray", "tqdm",
})


def layer_of(path: Path) -> str:
    """`sched` for tetriinfer/sched/x.py, `presets` for tetriinfer/presets.py."""
    return path.relative_to(PACKAGE_ROOT).with_suffix("").parts[0]


def runtime_imports(source: str, module: str) -> list[tuple[int, str]]:
    """(line, imported module) for every import of `source` (module `module`, dotted) outside
    `if TYPE_CHECKING:` blocks; relative imports resolved."""
    tree = ast.parse(source)
    type_only: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            type_only.update(id(n) for stmt in node.body for n in ast.walk(stmt))
    found = []
    for node in ast.walk(tree):
        if id(node) in type_only:
            continue
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = module.split(".")[: -node.level]
                name = ".".join(base + ([node.module] if node.module else []))
            else:
                name = node.module
            found.append((node.lineno, name))
    return found


def violations(layer: str, source: str, module: str) -> list[str]:
    """What `source` (a module of `layer`) imports against the rules above."""
    problems = []
    for line, name in runtime_imports(source, module):
        top, *rest = name.split(".")
        if top == "__future__":
            continue
        if top == "tetriinfer":
            target = rest[0] if rest else "tetriinfer"
            if layer in ALLOWED_IMPORTS and target not in ALLOWED_IMPORTS[layer]:
                problems.append(f"line {line}: {layer} imports {name}")
        elif layer in TORCH_FREE and top in HEAVY_MODULES:
            problems.append(f"line {line}: {layer} must run without {top}, imports {name}")
        elif layer == "sched" and top in IO_MODULES:
            problems.append(f"line {line}: sched does no I/O and reads no clock, imports {name}")
    return problems


def modules_of(layer: str) -> list[Path]:
    single = PACKAGE_ROOT / f"{layer}.py"
    return [single] if single.exists() else sorted((PACKAGE_ROOT / layer).rglob("*.py"))


@pytest.mark.parametrize("layer", sorted(ALLOWED_IMPORTS))
def test_layer_imports_only_what_it_may(layer):
    paths = modules_of(layer)
    assert paths, f"no modules for layer {layer}"
    problems = []
    for path in paths:
        module = ".".join(("tetriinfer", *path.relative_to(PACKAGE_ROOT).with_suffix("").parts))
        problems += [f"{path.relative_to(PACKAGE_ROOT.parent)} {p}" for p in violations(layer, path.read_text(), module)]
    assert not problems, "layering broken (docs/architecture.md):\n" + "\n".join(problems)


def test_every_module_belongs_to_a_known_layer():
    """A new top-level package or module must be placed in the layer picture first."""
    known = set(ALLOWED_IMPORTS) | {
        "__init__", "cli", "llm", "sampling_params", "model", "kernels", "engine", "cluster", "server",
        "predictor", "entrypoints",
    }
    found = {layer_of(p) for p in PACKAGE_ROOT.rglob("*.py")}
    assert found <= known, f"place these in docs/architecture.md and here: {sorted(found - known)}"


@pytest.mark.parametrize("layer, source, expected", [
    ("sched", "import torch\n", "must run without torch"),
    ("sched", "from tetriinfer.cluster import messages\n", "sched imports tetriinfer.cluster"),
    ("sched", "def f():\n    import time\n", "reads no clock"),
    ("sched", "from ..engine import block_manager\n", "sched imports tetriinfer.engine"),
    ("sim", "from tetriinfer.bench.workload import RequestSpec\n", "sim imports tetriinfer.bench"),
    ("bench", "from tetriinfer.cluster.launcher import free_port\n", "bench imports tetriinfer.cluster"),
])
def test_a_forbidden_import_is_caught(layer, source, expected):
    found = violations(layer, source, f"tetriinfer.{layer}.example")
    assert any(expected in p for p in found), found


def test_type_checking_imports_are_not_dependencies():
    source = "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from tetriinfer.config import FlipConfig\n"
    assert violations("sched", source, "tetriinfer.sched.flip") == []
