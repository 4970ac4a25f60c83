"""Which modules a process loads: the engines stand without the service, and the service runs
without the model exporter (``onnx``, the weights unpickler). Each check imports in a fresh
interpreter, so what other tests imported does not count."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import engines.errors
import sidecar.errors

ROOT = Path(__file__).resolve().parents[1]
ENGINE_MODULES = sorted(f"engines.{p.stem}" for p in (ROOT / "engines").glob("*.py"))
# The app factory, the command line that serves it, and what load_engine imports lazily.
SERVING_MODULES = ["sidecar.app", "sidecar.cli", "engines.model", "engines.ort", "engines.trt"]


def modules_after_importing(names: list[str]) -> set[str]:
    code = (
        "import importlib, json, sys\n"
        f"for name in {names!r}:\n"
        "    importlib.import_module(name)\n"
        "print(json.dumps(sorted(sys.modules)))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True
    )
    return set(json.loads(done.stdout.splitlines()[-1]))


def test_engines_import_nothing_from_the_service() -> None:
    assert "engines.loader" in ENGINE_MODULES and "engines.build_trt" in ENGINE_MODULES
    loaded = modules_after_importing(ENGINE_MODULES)
    assert sorted(m for m in loaded if m.split(".")[0] == "sidecar") == []


def test_the_service_does_not_load_the_exporter() -> None:
    loaded = modules_after_importing(SERVING_MODULES)
    assert "sidecar.app" in loaded and "engines.loader" in loaded
    for module in ("onnx", "engines.export", "engines.graph", "engines.weights"):
        assert module not in loaded, f"{module} is imported by the serving path"


def test_the_service_raises_and_catches_the_engines_own_errors() -> None:
    assert sidecar.errors.HeatcropError is engines.errors.HeatcropError
    assert sidecar.errors.EngineError is engines.errors.EngineError
    assert sidecar.errors.ModelNotBuilt is engines.errors.ModelNotBuilt
    engine, missing = sidecar.errors.EngineError(), sidecar.errors.ModelNotBuilt()
    assert (engine.status, engine.public_message, engine.fallback) == (500, "engine failure", True)
    assert (missing.status, missing.public_message, missing.fallback) == (
        503,
        "model not built",
        True,
    )


def _imports(path: Path, package: str) -> set[str]:
    """The package's modules that ``path`` imports at module level (not under TYPE_CHECKING)."""
    import ast

    found = set()
    for node in ast.parse(path.read_text()).body:
        names = []
        if isinstance(node, ast.ImportFrom) and node.module:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        found |= {n for n in names if n.split(".")[0] == package and n.count(".") == 1}
    return found


def test_the_service_has_no_import_circle() -> None:
    modules = {f"sidecar.{p.stem}": p for p in (ROOT / "sidecar").glob("*.py")}
    graph = {name: _imports(path, "sidecar") & set(modules) for name, path in modules.items()}
    done: set[str] = set()

    def visit(name: str, trail: tuple[str, ...]) -> None:
        assert name not in trail, " -> ".join((*trail, name))
        if name in done:
            return
        for other in sorted(graph[name]):
            visit(other, (*trail, name))
        done.add(name)

    for name in sorted(graph):
        visit(name, ())
    assert graph["sidecar.debug"] >= {"sidecar.routes"}  # raw_tail's home
