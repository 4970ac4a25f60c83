"""Find the built ONNX model through its manifest, and check it is the file the manifest names."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from engines import buckets
from engines.artifacts import (
    HASH_CHARS,
    INT8_MANIFEST_NAME,
    MANIFEST_NAME,
    int8_file_name,
    model_file_name,
)
from engines.errors import ModelNotBuilt

HINT = "run `make setup` (or `python -m engines.export --out {dir}`) to build it"


def not_built(model_dir: Path, why: str) -> ModelNotBuilt:
    return ModelNotBuilt(f"{why} in {model_dir}: " + HINT.format(dir=model_dir))


INT8_HINT = "run `make model` (or `python -m engines.quantize build --model-dir {dir}`)"


def int8_not_built(model_dir: Path, why: str) -> ModelNotBuilt:
    return ModelNotBuilt(f"{why} in {model_dir}: " + INT8_HINT.format(dir=model_dir))


NotBuilt = Callable[[Path, str], ModelNotBuilt]


def _read(model_dir: Path, manifest: str, fields: Sequence[str], fail: NotBuilt) -> dict[str, Any]:
    """The parsed ``manifest`` of ``model_dir``, with a string under each of ``fields``."""
    try:
        data = json.loads((model_dir / manifest).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise fail(model_dir, f"no {manifest}") from None
    except (OSError, ValueError) as exc:
        raise fail(model_dir, f"unreadable {manifest} ({exc})") from exc
    if not (isinstance(data, dict) and all(isinstance(data.get(k), str) for k in fields)):
        raise fail(model_dir, f"{manifest} lacks {'/'.join(fields)}")
    return data


def _checked(
    model_dir: Path,
    manifest: str,
    info: dict[str, Any],
    file_name: Callable[[str], str],
    fail: NotBuilt,
) -> Path:
    """The file ``info`` names, after checking its name and bytes match its sha256.

    A mismatch means a half-finished or tampered build; serving it would put wrong heatmaps
    under a cache key that claims another model, so it is refused like a missing model.
    """
    digest, name = info["sha256"], info["file"]
    if name != file_name(digest) or len(digest) != 64:
        raise fail(model_dir, f"{manifest} names {name!r}, not its hash's file")
    path = model_dir / name
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise fail(model_dir, f"{name} is missing") from None
    if hashlib.sha256(data).hexdigest() != digest:
        raise fail(model_dir, f"{name} does not match its sha256 {digest[:HASH_CHARS]}")
    return path


def read_manifest(model_dir: str | Path) -> dict[str, Any]:
    """The parsed ``model.json`` of a model folder."""
    return _read(Path(model_dir), MANIFEST_NAME, ("file", "sha256"), not_built)


def find_model(model_dir: str | Path) -> Path:
    """The model file named by the manifest, after checking its sha256."""
    model_dir = Path(model_dir)
    info = read_manifest(model_dir)
    path = _checked(model_dir, MANIFEST_NAME, info, model_file_name, not_built)
    built_for = info.get("buckets")
    # Manifests written before the buckets were recorded carry none: those were all native.
    if built_for is not None and built_for != [list(b) for b in buckets.all_buckets()]:
        raise not_built(
            model_dir,
            f"{MANIFEST_NAME} was built for other input buckets ({_short(built_for)}) than "
            f"engines/buckets.py's (short side {buckets.SHORT_SIDE})",
        )
    return path


def _short(built_for: object) -> str:
    sides = (
        [v for b in built_for if isinstance(b, list) for v in b]
        if isinstance(built_for, list)
        else []
    )
    if sides and all(isinstance(v, int) for v in sides):
        return f"short side {min(sides)}"
    return "unreadable"


def find_int8_model(model_dir: str | Path, fp32_sha256: str) -> Path:
    """The INT8 graph named by ``model-int8.json`` (engines/quantize.py), after checking its
    sha256 and that it was quantized from the FP32 model ``fp32_sha256``.

    An INT8 graph of another FP32 model (the export or the read-out changed since) is stale:
    it would answer with the old model's heatmaps under the new model's settings.
    """
    model_dir = Path(model_dir)
    fields = ("file", "sha256", "fp32_sha256")
    info = _read(model_dir, INT8_MANIFEST_NAME, fields, int8_not_built)
    if info["fp32_sha256"] != fp32_sha256:
        raise int8_not_built(
            model_dir,
            f"stale INT8 graph (quantized from model {info['fp32_sha256'][:HASH_CHARS]}, "
            f"not {fp32_sha256[:HASH_CHARS]})",
        )
    return _checked(model_dir, INT8_MANIFEST_NAME, info, int8_file_name, int8_not_built)
