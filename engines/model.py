"""Find the built ONNX model through its manifest, and check it is the file the manifest names."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from engines.artifacts import (
    HASH_CHARS,
    INT8_MANIFEST_NAME,
    MANIFEST_NAME,
    int8_file_name,
    model_file_name,
)
from engines.errors import ModelNotBuilt

HINT = "run `make setup` (or `python -m engines.export --out {dir}`) to build it"


def _not_built(model_dir: Path, why: str) -> ModelNotBuilt:
    return ModelNotBuilt(f"{why} in {model_dir}: " + HINT.format(dir=model_dir))


INT8_HINT = "run `make model` (or `python -m engines.quantize build --model-dir {dir}`)"


def _int8_not_built(model_dir: Path, why: str) -> ModelNotBuilt:
    return ModelNotBuilt(f"{why} in {model_dir}: " + INT8_HINT.format(dir=model_dir))


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


def find_int8_model(model_dir: str | Path, fp32_sha256: str) -> Path:
    """The INT8 graph named by ``model-int8.json`` (engines/quantize.py), after checking its
    sha256 and that it was quantized from the FP32 model ``fp32_sha256``.

    An INT8 graph of another FP32 model (the export or the read-out changed since) is stale:
    it would answer with the old model's heatmaps under the new model's settings.
    """
    model_dir = Path(model_dir)
    path = model_dir / INT8_MANIFEST_NAME
    try:
        info = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise _int8_not_built(model_dir, f"no {INT8_MANIFEST_NAME}") from None
    except (OSError, ValueError) as exc:
        raise _int8_not_built(model_dir, f"unreadable {INT8_MANIFEST_NAME} ({exc})") from exc
    fields = ("file", "sha256", "fp32_sha256")
    if not (isinstance(info, dict) and all(isinstance(info.get(k), str) for k in fields)):
        raise _int8_not_built(model_dir, f"{INT8_MANIFEST_NAME} lacks file/sha256/fp32_sha256")
    if info["fp32_sha256"] != fp32_sha256:
        raise _not_built(
            model_dir,
            f"stale INT8 graph (quantized from model {info['fp32_sha256'][:HASH_CHARS]}, "
            f"not {fp32_sha256[:HASH_CHARS]})",
        )
    digest, name = info["sha256"], info["file"]
    if name != int8_file_name(digest) or len(digest) != 64:
        raise _int8_not_built(
            model_dir, f"{INT8_MANIFEST_NAME} names {name!r}, not its hash's file"
        )
    try:
        data = (model_dir / name).read_bytes()
    except FileNotFoundError:
        raise _int8_not_built(model_dir, f"{name} is missing") from None
    if hashlib.sha256(data).hexdigest() != digest:
        raise _int8_not_built(model_dir, f"{name} does not match its sha256 {digest[:HASH_CHARS]}")
    return model_dir / name
