"""The INT8 graph for ONNX Runtime on the CPU: ``python -m engines.quantize``.

    python -m engines.quantize build [--model-dir build/model]       # make setup (no photos)
    python -m engines.quantize calibrate --photos DIR [DIR ...] \\
        [--method entropy|percentile|minmax] [--per-folder 64]        # offline, ../shared/eval

Static quantization with onnxruntime's own tooling (``onnxruntime.quantization``): QDQ format,
uint8 activations, int8 weights per output channel, int32 biases, of the FP32 graph that
engines/export.py writes (dynamic batch and size, the same inputs and outputs).

Two steps, so that a fresh machine without the photos still gets the INT8 graph:

* ``calibrate`` runs one of onnxruntime's calibrators (``CalibrationMethod``) over photos
  decoded exactly as the service decodes them (engines/pixels.py, each photo to its own shape
  bucket) and writes the range of every tensor the quantizer needs, a small JSON file committed
  as ``engines/int8_calibration.json``. It names the FP32 model's sha256 it was measured on.
* ``build`` (``make model``) feeds those committed ranges to ``quantize_static`` as its
  calibration cache (no data reader, no photos), and writes
  ``heatcrop-lite0-int8-<sha256[:12]>.onnx`` and its manifest ``model-int8.json`` beside the
  FP32 model. Deterministic: the same FP32 graph, ranges and onnxruntime version give the same
  bytes. When the calibration was measured on another FP32 model (the graph or the read-out
  weights changed) nothing is built and any INT8 manifest is removed: ranges of another graph
  would give wrong heatmaps under a name that looks right. Recalibrate then.

Kept in float (``nodes_to_exclude``, ``KEEP_FLOAT_PREFIXES``):

* the read-out heads after the backbone's last feature map (food CAM, feature RMS, learned
  read-out with its pooling and centre bias, logits and food mass): ~0.1 % of the
  multiply-adds, and where the maps' dynamic range matters (exp, log, square, max);
* the stem and block 0 (one 3x3 convolution, one depthwise and one projection on 32
  channels at stride 2). Measured on the 560 dev photos (bench/int8.py's protocol): with
  them in float, boxes identical to FP32 rise from 72-78 % to 77-85 % of crops and the
  learned map's correlation from 0.996-0.998 to 0.998-0.999, for ~5 % of the INT8 speed-up.

Calibrator: percentile (99.999, asymmetric) over entropy and minmax, the best agreement of
the three on every dev set at equal speed (the same protocol; calibrated on 64 photos each
of fcdb_train, osie_train and crowd_train, never on a dev set).
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import logging
import sys
import tempfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from engines.artifacts import (
    HASH_CHARS,
    INT8_MANIFEST_NAME,
    int8_file_name,
    sha256_hex,
    write_atomic,
)
from engines.base import INPUT_NAME

# Both INT8 calibrators take the same photos under the same limits.
from engines.build_trt import (
    PHOTO_SUFFIXES,
    calibration_pixels,
)

log = logging.getLogger("heatcrop.quantize")

CALIBRATION_PATH = Path(__file__).with_name("int8_calibration.json")
CALIBRATION_FORMAT = 1
INT8_MANIFEST_FORMAT = 1
METHODS = ("entropy", "percentile", "minmax")
DEFAULT_METHOD = "percentile"
# Options of each calibrator (onnxruntime's create_calibrator keys). Percentile's default is a
# symmetric range, which wastes half the codes of the ReLU6 outputs; asymmetric here.
CALIBRATOR_OPTIONS: dict[str, dict[str, Any]] = {
    "entropy": {"num_bins": 128, "num_quantized_bins": 128, "symmetric": False},
    "percentile": {"num_bins": 2048, "percentile": 99.999, "symmetric": False},
    "minmax": {"symmetric": False},
}
# The input steps of engines/graph.py take exactly 256 values: x - 127 the integers -127..128
# and (x - 127) / 128 those over 128. uint8 with scale 1 (1/128) and zero point 127 holds
# them all exactly, whatever the photos showed; a calibrated range would clip or round them
# (entropy gave -121..122.9 for the first).
EXACT_RANGES: dict[str, tuple[float, float]] = {
    "image.centred": (-127.0, 128.0),
    "image.scaled": (-127.0 / 128.0, 128.0 / 128.0),
}
# Node-name prefixes (engines/graph.py naming) that stay float; see the module docstring.
KEEP_FLOAT_PREFIXES: tuple[str, ...] = (
    "_conv_stem",
    "_blocks.0.",
    "food.",
    "generic.",
    "readout.",
    "pooled",
    "logits",
    "probs",
    "heatmaps",
    "food_mass",
)
# Everything that decides the INT8 bytes besides the FP32 graph, the ranges and onnxruntime.
QUANT_SETTINGS: dict[str, Any] = {
    "format": "QDQ",
    "activations": "uint8",
    "weights": "int8, per channel",
    # 7-bit weights: x86 CPUs without VNNI (AVX2 only) multiply u8 x s8 with VPMADDUBSW, whose
    # int16 pairwise sums saturate with full-range weights; on such a CPU (an AMD EPYC dev box)
    # the demo photos' boxes agreed with FP32 at mean IoU 0.947 without it, 0.987 with it.
    "reduce_range": True,
    "keep_float": list(KEEP_FLOAT_PREFIXES),
}


# -- calibration (offline, with photos) ---------------------------------------------------------


def calibration_photos(folders: Sequence[Path], per_folder: int) -> list[Path]:
    """Up to ``per_folder`` photos of each folder, evenly spread over its sorted listing."""
    chosen: list[Path] = []
    for folder in folders:
        found = sorted(p for p in folder.rglob("*") if p.suffix.lower() in PHOTO_SUFFIXES)
        if not found:
            raise ValueError(f"no photos in {folder}")
        step = max(1, len(found) // per_folder)
        chosen.extend(found[::step][:per_folder])
    return chosen


def decoded_photos(
    paths: Sequence[Path], on_skip: Callable[[Path, str], None] | None = None
) -> Iterator[tuple[Path, npt.NDArray[np.uint8]]]:
    """(path, pixels) of every photo that decodes, each to its own bucket; the others go to
    ``on_skip`` (the TensorRT calibrator's loop, engines.build_trt.calibration_pixels)."""
    return calibration_pixels(paths, None, on_skip)


class _Reader:
    """A CalibrationDataReader over a list of [1, H, W, 3] inputs (shapes may differ)."""

    def __init__(self, batches: Sequence[npt.NDArray[np.uint8]]) -> None:
        self._batches = iter(batches)

    def get_next(self) -> dict[str, npt.NDArray[np.uint8]] | None:
        batch = next(self._batches, None)
        return None if batch is None else {INPUT_NAME: batch}


def calibrate(
    model_path: Path,
    photos: Sequence[npt.NDArray[np.uint8]],
    method: str = DEFAULT_METHOD,
    *,
    chunk: int = 8,
) -> dict[str, tuple[float, float]]:
    """{tensor: (lowest, highest)} from onnxruntime's ``method`` calibrator over ``photos``
    ([H, W, 3] uint8 each, fed one at a time, up to ``chunk`` photos of one shape per
    collection pass)."""
    from onnxruntime.quantization import CalibrationMethod, create_calibrator

    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if not photos:
        raise ValueError("calibration needs at least one photo")
    enum = {
        "entropy": CalibrationMethod.Entropy,
        "percentile": CalibrationMethod.Percentile,
        "minmax": CalibrationMethod.MinMax,
    }[method]
    with tempfile.TemporaryDirectory(prefix="heatcrop-calib.") as tmp:
        calibrator = create_calibrator(
            Path(model_path),
            _op_types(),
            augmented_model_path=str(Path(tmp) / "augmented.onnx"),
            calibrate_method=enum,
            providers=["CPUExecutionProvider"],
            extra_options=dict(CALIBRATOR_OPTIONS[method]),
        )
        # The histogram calibrators stack one pass's outputs: one shape bucket per pass.
        by_shape: dict[tuple[int, ...], list[npt.NDArray[np.uint8]]] = {}
        for photo in photos:
            by_shape.setdefault(photo.shape, []).append(photo[np.newaxis])
        for shape in sorted(by_shape):
            same = by_shape[shape]
            for start in range(0, len(same), chunk):
                calibrator.collect_data(_Reader(same[start : start + chunk]))
        data = calibrator.compute_data()
    ranges = {}
    for name, tensor in sorted(data.items()):
        lowest, highest = tensor.range_value
        ranges[name] = (_f32(lowest), _f32(highest))
    for name, exact in EXACT_RANGES.items():
        if name in ranges:
            ranges[name] = exact
    return ranges


def _f32(value: Any) -> float:
    """A float32 as the Python float that holds it exactly (JSON round-trips it)."""
    return float(np.float32(np.asarray(value).reshape(-1)[0]))


def _op_types() -> list[str]:
    # quantize_static's default: every op type either registry knows.
    from onnxruntime.quantization.registry import QDQRegistry, QLinearOpsRegistry

    return sorted(set(QLinearOpsRegistry) | set(QDQRegistry))


@dataclass(frozen=True)
class Calibration:
    """What ``calibrate`` measured: the committed file's content."""

    method: str
    model_sha256: str  # the FP32 model the ranges were measured on
    ranges: dict[str, tuple[float, float]]
    photos: dict[str, Any]  # where they came from (counts per folder, content digest)

    def to_json(self) -> str:
        doc = {
            "format": CALIBRATION_FORMAT,
            "method": self.method,
            "options": CALIBRATOR_OPTIONS[self.method],
            "model_sha256": self.model_sha256,
            "photos": self.photos,
            "ranges": {k: list(v) for k, v in sorted(self.ranges.items())},
        }
        return json.dumps(doc, indent=1, sort_keys=False) + "\n"

    @classmethod
    def from_json(cls, text: str) -> Calibration:
        doc = json.loads(text)
        if not isinstance(doc, dict) or doc.get("format") != CALIBRATION_FORMAT:
            raise ValueError(f"not an INT8 calibration file of format {CALIBRATION_FORMAT}")
        ranges = {str(k): (float(v[0]), float(v[1])) for k, v in doc["ranges"].items()}
        return cls(str(doc["method"]), str(doc["model_sha256"]), ranges, dict(doc["photos"]))


def read_calibration(path: Path = CALIBRATION_PATH) -> Calibration:
    return Calibration.from_json(path.read_text(encoding="utf-8"))


# -- the INT8 graph (make setup, no photos) ---------------------------------------------------


def keep_float_nodes(
    node_names: Sequence[str], prefixes: Sequence[str] = KEEP_FLOAT_PREFIXES
) -> list[str]:
    return [n for n in node_names if n.startswith(tuple(prefixes))]


def quantized_bytes(
    fp32: bytes, calibration: Calibration, keep_float: Sequence[str] = KEEP_FLOAT_PREFIXES
) -> bytes:
    """The INT8 (QDQ) graph of the FP32 graph ``fp32`` with ``calibration``'s ranges; nodes
    whose names start with one of ``keep_float`` stay float."""
    import onnx
    from onnxruntime.quantization import (
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )
    from onnxruntime.quantization.calibrate import TensorData, TensorsData, save_tensors_data

    model = onnx.load_from_string(fp32)
    exclude = keep_float_nodes([n.name for n in model.graph.node], keep_float)
    # quantize_static checks the cache was made by the method it is told; the method changes
    # nothing else once the ranges are given.
    method = CalibrationMethod.MinMax
    tensors = TensorsData(
        method,
        {
            name: TensorData(lowest=np.float32(lo), highest=np.float32(hi))
            for name, (lo, hi) in sorted(calibration.ranges.items())
        },
    )
    with tempfile.TemporaryDirectory(prefix="heatcrop-int8.") as tmp:
        cache = Path(tmp) / "ranges.json"
        save_tensors_data(tensors, cache)
        source = Path(tmp) / "fp32.onnx"
        source.write_bytes(fp32)
        out = Path(tmp) / "int8.onnx"
        with _quiet_quantizer():
            quantize_static(
                source,
                out,
                calibration_data_reader=None,
                quant_format=QuantFormat.QDQ,
                op_types_to_quantize=_op_types(),
                per_channel=True,
                reduce_range=bool(QUANT_SETTINGS["reduce_range"]),
                activation_type=QuantType.QUInt8,
                weight_type=QuantType.QInt8,
                nodes_to_exclude=exclude,
                calibrate_method=method,
                calibration_cache_path=cache,
            )
        quantized = onnx.load(str(out))
    quantized.doc_string = (
        f"{quantized.doc_string} INT8 (QDQ) by engines/quantize.py, {calibration.method} "
        f"calibration of {calibration.model_sha256[:HASH_CHARS]}"
    ).strip()
    return quantized.SerializeToString(deterministic=True)


@contextlib.contextmanager
def _quiet_quantizer() -> Iterator[None]:
    # quantize_static logs a pre-processing hint at WARNING on every call; it does not apply
    # (the graph is already folded and shape-inferred by the exporter). It logs through the
    # root logger, so that is raised for the call only.
    root = logging.getLogger()
    before = root.level
    root.setLevel(max(before, logging.ERROR))
    try:
        yield
    finally:
        root.setLevel(before)


@dataclass(frozen=True)
class Int8Manifest:
    """``model-int8.json``: the INT8 graph and what it was made from."""

    file: str
    sha256: str
    fp32_sha256: str
    calibration_sha256: str
    method: str
    onnxruntime: str

    def to_json(self) -> str:
        doc = {"format": INT8_MANIFEST_FORMAT, **self.__dict__, "settings": QUANT_SETTINGS}
        return json.dumps(doc, indent=1) + "\n"


def build(model_dir: Path, calibration_path: Path = CALIBRATION_PATH) -> Path | None:
    """Write the INT8 graph and its manifest beside the FP32 model in ``model_dir``; return
    its path, or None (and remove any INT8 manifest) when the calibration was measured on
    another FP32 model. Does nothing when the manifest already names this very build."""
    import onnxruntime

    from engines.model import find_model, read_manifest

    fp32_path = find_model(model_dir)
    fp32_sha = str(read_manifest(model_dir)["sha256"])
    manifest_path = model_dir / INT8_MANIFEST_NAME
    try:
        raw = calibration_path.read_bytes()
    except FileNotFoundError:
        manifest_path.unlink(missing_ok=True)
        log.warning("no INT8 graph: no calibration file %s", calibration_path)
        return None
    calibration = Calibration.from_json(raw.decode("utf-8"))
    if calibration.model_sha256 != fp32_sha:
        manifest_path.unlink(missing_ok=True)
        log.warning(
            "no INT8 graph: %s was measured on model %s, this one is %s; recalibrate with "
            "`python -m engines.quantize calibrate --photos DIR ...`",
            calibration_path.name,
            calibration.model_sha256[:HASH_CHARS],
            fp32_sha[:HASH_CHARS],
        )
        return None
    wanted = {
        "fp32_sha256": fp32_sha,
        "calibration_sha256": sha256_hex(raw),
        "method": calibration.method,
        "onnxruntime": onnxruntime.__version__,
    }
    existing = _current(model_dir, wanted)
    if existing is not None:
        return existing
    data = quantized_bytes(fp32_path.read_bytes(), calibration)
    digest = sha256_hex(data)
    path = model_dir / int8_file_name(digest)
    write_atomic(path, data)
    manifest = Int8Manifest(file=path.name, sha256=digest, **wanted)
    write_atomic(manifest_path, manifest.to_json().encode("utf-8"))
    log.info("wrote %s (%d bytes) from %s", path, len(data), fp32_path.name)
    return path


def _current(model_dir: Path, wanted: dict[str, str]) -> Path | None:
    """The INT8 graph the manifest names when it was made from exactly ``wanted`` with today's
    ``QUANT_SETTINGS`` (a changed setting changes the bytes, so the graph is built again)."""
    from engines.errors import ModelNotBuilt
    from engines.model import find_int8_model

    try:
        path = find_int8_model(model_dir, wanted["fp32_sha256"])
        doc = json.loads((model_dir / INT8_MANIFEST_NAME).read_text(encoding="utf-8"))
    except (ModelNotBuilt, OSError, ValueError):
        return None
    same = all(doc.get(k) == v for k, v in wanted.items())
    return path if same and doc.get("settings") == QUANT_SETTINGS else None


# -- command line ---------------------------------------------------------------------------


def _calibrate_command(args: argparse.Namespace) -> int:
    from engines.model import find_model, read_manifest

    model_dir = Path(args.model_dir)
    model = find_model(model_dir)
    paths = calibration_photos([Path(d) for d in args.photos], args.per_folder)
    skipped: list[str] = []
    decoded = list(decoded_photos(paths, lambda p, why: skipped.append(f"{p}: {why}")))
    for line in skipped:
        log.warning("skipped %s", line)
    digest = hashlib.sha256()
    for path, pixels in decoded:
        digest.update(path.name.encode("utf-8") + b"\0" + pixels.tobytes())
    ranges = calibrate(model, [pixels for _, pixels in decoded], args.method)
    folders: dict[str, int] = {}
    for path, _ in decoded:
        key = _folder_label(next(Path(d) for d in args.photos if path.is_relative_to(d)))
        folders[key] = folders.get(key, 0) + 1
    photos = {"folders": folders, "skipped": len(skipped), "pixels_sha256": digest.hexdigest()}
    result = Calibration(args.method, str(read_manifest(model_dir)["sha256"]), ranges, photos)
    write_atomic(Path(args.out), result.to_json().encode("utf-8"))
    log.info("wrote %s: %d ranges from %d photos", args.out, len(ranges), len(decoded))
    return 0


def _folder_label(folder: Path) -> str:
    # ../shared/eval/<set>/images -> <set>: the set's name, not the machine's path.
    return folder.parent.name if folder.name == "images" else folder.name


def _build_command(args: argparse.Namespace) -> int:
    path = build(Path(args.model_dir), Path(args.calibration))
    print(path if path is not None else "no INT8 graph (see the warning above)")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m engines.quantize", description=__doc__.split("\n")[0]
    )
    sub = parser.add_subparsers(dest="command", required=True)
    b = sub.add_parser("build", help="the INT8 graph from the committed calibration (no photos)")
    b.add_argument("--model-dir", default="build/model")
    b.add_argument("--calibration", default=str(CALIBRATION_PATH))
    b.set_defaults(run=_build_command)
    c = sub.add_parser("calibrate", help="measure the ranges on photos (offline)")
    c.add_argument("--model-dir", default="build/model")
    c.add_argument("--photos", nargs="+", required=True, help="folders of photos")
    c.add_argument("--method", choices=METHODS, default=DEFAULT_METHOD)
    c.add_argument("--per-folder", type=int, default=64)
    c.add_argument("--out", default=str(CALIBRATION_PATH))
    c.set_defaults(run=_calibrate_command)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    return int(args.run(args))


if __name__ == "__main__":
    sys.exit(main())
