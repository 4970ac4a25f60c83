"""What the build writes and the runtimes read: file names, hashes, and atomic writes.

Shared by the exporter (engines/export.py), the model and plan readers (engines/model.py,
engines/plans.py) and the TensorRT builder, so that reading a model or a plan never imports the
exporter (and with it ``onnx`` and the weights unpickler).
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path

MODEL_STEM = "heatcrop-lite0"
MANIFEST_NAME = "model.json"
INT8_MANIFEST_NAME = "model-int8.json"
# Hash characters in file names, engine versions and messages.
HASH_CHARS = 12


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def model_file_name(digest: str) -> str:
    return f"{MODEL_STEM}-{digest[:HASH_CHARS]}.onnx"


def int8_file_name(digest: str) -> str:
    return f"{MODEL_STEM}-int8-{digest[:HASH_CHARS]}.onnx"


def write_atomic(path: Path, data: bytes) -> None:
    """Readers never see a half-written file: write beside it, then rename over it."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        # mkstemp makes the file private; the service may run as another user.
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
