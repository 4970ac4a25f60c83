"""Find the built ONNX model through its manifest, and check it is the file the manifest names."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from engines.artifacts import HASH_CHARS, MANIFEST_NAME, model_file_name
from engines.errors import ModelNotBuilt

HINT = "run `make setup` (or `python -m engines.export --out {dir}`) to build it"


def _not_built(model_dir: Path, why: str) -> ModelNotBuilt:
    return ModelNotBuilt(f"{why} in {model_dir}: " + HINT.format(dir=model_dir))


def read_manifest(model_dir: str | Path) -> dict[str, Any]:
    """The parsed ``model.json`` of a model folder."""
    model_dir = Path(model_dir)
    path = model_dir / MANIFEST_NAME
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise _not_built(model_dir, f"no {MANIFEST_NAME}") from None
    except (OSError, ValueError) as exc:
        raise _not_built(model_dir, f"unreadable {MANIFEST_NAME} ({exc})") from exc
    if not (
        isinstance(data, dict)
        and isinstance(data.get("file"), str)
        and isinstance(data.get("sha256"), str)
    ):
        raise _not_built(model_dir, f"{MANIFEST_NAME} lacks file/sha256")
    return data


def find_model(model_dir: str | Path) -> Path:
    """The model file named by the manifest, after checking its sha256.

    A mismatch means a half-finished or tampered build; serving it would put wrong heatmaps
    under a cache key that claims another model, so it is refused like a missing model.
    """
    model_dir = Path(model_dir)
    info = read_manifest(model_dir)
    digest = info["sha256"]
    name = info["file"]
    if name != model_file_name(digest) or len(digest) != 64:
        raise _not_built(model_dir, f"{MANIFEST_NAME} names {name!r}, not its hash's file")
    path = model_dir / name
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise _not_built(model_dir, f"{name} is missing") from None
    if hashlib.sha256(data).hexdigest() != digest:
        raise _not_built(model_dir, f"{name} does not match its sha256 {digest[:HASH_CHARS]}")
    return path
