"""The sidecar never imports Ray: only ``heatcrop backfill`` does (sidecar/backfill_ray.py)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _imports_ray(module: str) -> bool:
    code = f"import sys, {module}; print(any(m.split('.')[0] == 'ray' for m in sys.modules))"
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    return done.stdout.strip() == "True"


@pytest.mark.parametrize(
    "module",
    # The service and what it is built from; the command line (its parser names backfill);
    # the Ray-free half of the backfill, which the CPU tasks and actors run.
    ["sidecar.app", "sidecar.cli", "sidecar.backfill", "sidecar.warm"],
)
def test_the_sidecar_never_imports_ray(module: str) -> None:
    assert not _imports_ray(module)


def test_the_check_sees_ray_where_it_is_imported() -> None:
    assert _imports_ray("sidecar.backfill_ray")
