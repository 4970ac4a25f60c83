"""Faces in a photo: YuNet-n (engines/faces_build.py) on ONNX Runtime's CPU provider.

``FaceDetector.detect_batch`` takes the very uint8 RGB NHWC array the heatmap model takes (one
shape bucket, H and W multiples of 32) and returns, per image, boxes ``[x0, y0, x1, y1, score]``
(float32, pixels of that image, x1/y1 exclusive). The service runs it on the CNN's own input
(engines/face_engine.py), so it needs no decode of its own: measured on crowd_train, YuNet-n on
the 224-px bucket finds 76 % of the faces people notice at precision 0.975 (docs/faces.md).

Decoding follows OpenCV's ``FaceDetectorYN``: per stride s (8, 16, 32) and grid cell (r, c),
centre ``((c + dx) s, (r + dy) s)``, size ``(exp(dw) s, exp(dh) s)``; the graph gives the score
sqrt(cls x obj). Then a score threshold, the ``top_k`` best candidates, greedy NMS at IoU
``nms``, and at most ``max_faces`` boxes, best first. The work and memory of one call are
bounded by its input (at most a 448x224 bucket: 2,058 candidates) and by ``top_k``, whatever
the photo holds.

``face_map`` turns boxes into a heat grid at any resolution (a read-out channel), and
``HeadBox`` turns the detector's boxes (brows to chin) into the head boxes a crop must not cut.

Runtime conventions are engines/ort.py's: deterministic compute, no spinning, sequential
execution, a fixed thread count; the graph is read through its manifest and refused when its
bytes do not match it.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import onnxruntime as ort
from numba import njit

from engines.artifacts import HASH_CHARS
from engines.errors import EngineError, ModelNotBuilt, first_line
from engines.ort import _session_options

FACES_MANIFEST_NAME = "faces.json"
# The vendored graph the build starts from (engines/yunet/): what faces.json must name.
SOURCE_SHA256 = "104ee26c71d5c270ce79a6b3dced91c91013260d29a6bf18f9296c5b8c4c2b12"
STRIDES = (8, 16, 32)
INPUT = "image"
OUTPUTS = ("scores", "boxes")
HINT = "run `make model` (or `python -m engines.faces_build --out {dir}`) to build it"
# A face box as the detector returns it: x0, y0, x1, y1, score.
BOX_FIELDS = 5
ALIGN = 32

F32 = npt.NDArray[np.float32]


@dataclass(frozen=True)
class FaceParams:
    """The detector's knobs. ``score``: least sqrt(cls x obj) kept (0.6 gives precision 0.975
    on crowd_train at the bucket, MTCNN's); ``nms``: IoU above which the weaker of two boxes
    goes; ``top_k``: candidates NMS considers at most; ``max_faces``: boxes kept per photo, the
    best scores first (the face rule's cost grows with them, and a crowd's smallest faces are
    sliced by any window anyway)."""

    score: float = 0.6
    nms: float = 0.3
    top_k: int = 512
    max_faces: int = 64

    def __post_init__(self) -> None:
        if not (math.isfinite(self.score) and 0.0 < self.score < 1.0):
            raise ValueError(f"score must be in (0, 1), got {self.score!r}")
        if not (math.isfinite(self.nms) and 0.0 < self.nms <= 1.0):
            raise ValueError(f"nms must be in (0, 1], got {self.nms!r}")
        if not 1 <= self.top_k <= 4096:
            raise ValueError(f"top_k must be in [1, 4096], got {self.top_k!r}")
        if not 1 <= self.max_faces <= self.top_k:
            raise ValueError(f"max_faces must be in [1, top_k], got {self.max_faces!r}")

    def key(self) -> str:
        return f"s{self.score:g}-n{self.nms:g}-k{self.top_k}-m{self.max_faces}"


def _not_built(model_dir: Path, why: str) -> ModelNotBuilt:
    return ModelNotBuilt(f"face detector: {why} in {model_dir}: " + HINT.format(dir=model_dir))


def find_face_model(model_dir: str | Path) -> tuple[Path, str]:
    """The graph ``faces.json`` names, checked against its sha256, and that sha256;
    ``ModelNotBuilt`` saying why when anything is missing or does not match."""
    model_dir = Path(model_dir)
    try:
        info = json.loads((model_dir / FACES_MANIFEST_NAME).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise _not_built(model_dir, f"no {FACES_MANIFEST_NAME}") from None
    except (OSError, ValueError) as exc:
        raise _not_built(model_dir, f"unreadable {FACES_MANIFEST_NAME} ({exc})") from exc
    if not isinstance(info, dict):
        raise _not_built(model_dir, f"{FACES_MANIFEST_NAME} is not an object")
    name, digest, source = info.get("file"), info.get("sha256"), info.get("source")
    if not (isinstance(name, str) and isinstance(digest, str) and isinstance(source, dict)):
        raise _not_built(model_dir, f"{FACES_MANIFEST_NAME} lacks file/sha256/source")
    if source.get("sha256") != SOURCE_SHA256:
        raise _not_built(model_dir, f"{FACES_MANIFEST_NAME} was built from another detector")
    if Path(name).name != name or not name.endswith(f"-{digest[:HASH_CHARS]}.onnx"):
        raise _not_built(model_dir, f"{FACES_MANIFEST_NAME} names {name!r}, not its hash's")
    try:
        data = (model_dir / name).read_bytes()
    except FileNotFoundError:
        raise _not_built(model_dir, f"{name} is missing") from None
    if hashlib.sha256(data).hexdigest() != digest:
        raise _not_built(model_dir, f"{name} does not match its sha256 (tampered or half-written)")
    return model_dir / name, digest


@functools.lru_cache(maxsize=32)
def priors(height: int, width: int) -> tuple[F32, F32, F32]:
    """Per candidate of a height x width input: its grid cell's column, row and stride, in the
    order the graph joins the strides (8, 16, 32; row-major within each)."""
    cols, rows, strides = [], [], []
    for s in STRIDES:
        r, c = np.divmod(np.arange((height // s) * (width // s)), width // s)
        cols.append(c)
        rows.append(r)
        strides.append(np.full(r.size, s))
    out = (np.concatenate(cols), np.concatenate(rows), np.concatenate(strides))
    return tuple(a.astype(np.float32) for a in out)  # type: ignore[return-value]


def decode(scores: F32, regression: F32, height: int, width: int, params: FaceParams) -> F32:
    """One image's graph outputs ([K, 1], [K, 4]) -> [n, 5] boxes in its pixels, best first."""
    score = scores.reshape(-1)
    col, row, stride = priors(height, width)
    idx = np.flatnonzero(score >= params.score)
    if idx.size > params.top_k:
        best = np.argpartition(-score[idx], params.top_k - 1)[: params.top_k]
        idx = idx[best]
    idx = idx[np.argsort(-score[idx], kind="stable")]
    reg = regression.reshape(-1, 4)[idx].astype(np.float64)
    s = stride[idx].astype(np.float64)
    # exp of an absurd regression would overflow; no face is 2^20 strides wide.
    w = np.exp(np.minimum(reg[:, 2], 20.0)) * s
    h = np.exp(np.minimum(reg[:, 3], 20.0)) * s
    cx = (col[idx] + reg[:, 0]) * s
    cy = (row[idx] + reg[:, 1]) * s
    boxes = np.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], axis=1)
    boxes[:, [0, 2]] = np.clip(boxes[:, [0, 2]], 0.0, float(width))
    boxes[:, [1, 3]] = np.clip(boxes[:, [1, 3]], 0.0, float(height))
    keep = _nms(np.ascontiguousarray(boxes), float(params.nms), int(params.max_faces))
    out = np.concatenate([boxes[keep], score[idx][keep, None]], axis=1).astype(np.float32)
    return out[(out[:, 2] > out[:, 0]) & (out[:, 3] > out[:, 1])]


@njit(cache=True)
def _nms(boxes: npt.NDArray[np.float64], threshold: float, limit: int) -> npt.NDArray[np.int64]:
    """Greedy NMS over boxes sorted best first: indices kept, at most ``limit``."""
    n = boxes.shape[0]
    area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    gone = np.zeros(n, dtype=np.bool_)
    keep = np.empty(min(n, limit), dtype=np.int64)
    k = 0
    for i in range(n):
        if gone[i]:
            continue
        keep[k] = i
        k += 1
        if k == limit:
            break
        for j in range(i + 1, n):
            if gone[j]:
                continue
            w = min(boxes[i, 2], boxes[j, 2]) - max(boxes[i, 0], boxes[j, 0])
            h = min(boxes[i, 3], boxes[j, 3]) - max(boxes[i, 1], boxes[j, 1])
            if w <= 0.0 or h <= 0.0:
                continue
            inter = w * h
            union = area[i] + area[j] - inter
            if union > 0.0 and inter / union > threshold:
                gone[j] = True
    return keep[:k].copy()


class FaceDetector:
    """YuNet-n on ONNX Runtime (CPU), one session of ``threads`` threads. ``detect_batch``
    keeps no state but the session, which is thread-safe: with one thread (the service's)
    concurrent calls run side by side on their callers' threads (the engine's lanes)."""

    def __init__(
        self, model_dir: str | Path, params: FaceParams | None = None, threads: int = 1
    ) -> None:
        if threads < 1:
            raise ValueError(f"threads must be >= 1, got {threads}")
        path, digest = find_face_model(model_dir)
        self.params = params or FaceParams()
        self._digest = digest
        try:
            self._session: ort.InferenceSession | None = ort.InferenceSession(
                path.read_bytes(),
                sess_options=_session_options(threads, False),
                providers=["CPUExecutionProvider"],
            )
        except Exception as exc:  # ORT raises its own exception types
            why = f"ONNX Runtime cannot load it ({first_line(exc)})"
            raise _not_built(Path(model_dir), why) from exc

    @property
    def version(self) -> str:
        """The graph's hash and the knobs: what face boxes are cached under."""
        return f"yunet-{self._digest[:HASH_CHARS]}-{self.params.key()}"

    def warm_up(self) -> None:
        self.detect(np.full((96, 128, 3), 127, dtype=np.uint8))

    def detect_batch(self, batch: npt.NDArray[np.uint8]) -> list[F32]:
        """Faces in each image of ``batch`` (uint8 [N, H, W, 3] RGB, H and W multiples of 32):
        [n, 5] float32 x0, y0, x1, y1, score in that image's pixels."""
        if not (isinstance(batch, np.ndarray) and batch.dtype == np.uint8 and batch.ndim == 4):
            raise ValueError("batch must be a uint8 [N, H, W, 3] array")
        n, height, width, bands = batch.shape
        if bands != 3 or n < 1 or height % ALIGN or width % ALIGN or not height or not width:
            raise ValueError(f"batch must be [N>=1, H, W, 3], H and W multiples of {ALIGN}")
        if self._session is None:
            raise EngineError("face detector used after close()")
        try:
            scores, boxes = self._session.run(list(OUTPUTS), {INPUT: np.ascontiguousarray(batch)})
        except Exception as exc:
            raise EngineError(f"face detector failed: {first_line(exc)}") from exc
        return [decode(scores[i], boxes[i], height, width, self.params) for i in range(n)]

    def detect(self, pixels: npt.NDArray[np.uint8]) -> F32:
        """Faces in one uint8 [H, W, 3] RGB image of any size: padded with black to multiples
        of 32 below and right (as OpenCV's FaceDetectorYN does), boxes in its pixels."""
        if not (isinstance(pixels, np.ndarray) and pixels.dtype == np.uint8 and pixels.ndim == 3):
            raise ValueError("pixels must be a uint8 [H, W, 3] array")
        height, width = pixels.shape[:2]
        if pixels.shape[2] != 3 or min(height, width) < 1:
            raise ValueError("pixels must be a uint8 [H, W, 3] array")
        padded = np.zeros((1, -(-height // ALIGN) * ALIGN, -(-width // ALIGN) * ALIGN, 3), np.uint8)
        padded[0, :height, :width] = pixels
        out = self.detect_batch(padded)[0]
        out[:, [0, 2]] = np.minimum(out[:, [0, 2]], float(width))
        out[:, [1, 3]] = np.minimum(out[:, [1, 3]], float(height))
        return out[(out[:, 2] > out[:, 0]) & (out[:, 3] > out[:, 1])]

    def close(self) -> None:
        self._session = None


def scale_boxes(faces: npt.NDArray[Any], source: tuple[int, int], target: tuple[int, int]) -> F32:
    """Boxes found in a ``source`` (width, height) image, in the pixels of ``target``."""
    out = np.array(faces, dtype=np.float32).reshape(-1, BOX_FIELDS)
    out[:, [0, 2]] *= target[0] / source[0]
    out[:, [1, 3]] *= target[1] / source[1]
    return out


@dataclass(frozen=True)
class HeadBox:
    """Detector box -> the box a person would draw around the head.

    The boxes labelled in crowd_train (and what a crop must not cut) cover the head, hair
    included; YuNet's cover the face. ``width``/``height`` are the detector box's share of the
    head box, ``cx``/``cy`` where the detector box's centre sits in it: medians over matched
    pairs on crowd_train (``python -m training.faces``, training/results/faces.md; the
    benchmark fits them per fold).
    """

    width: float = 0.609
    height: float = 0.626
    cx: float = 0.487
    cy: float = 0.581

    def apply(self, faces: npt.NDArray[Any]) -> F32:
        f = np.asarray(faces, dtype=np.float64).reshape(
            -1, np.shape(faces)[-1] if np.size(faces) else BOX_FIELDS
        )
        w = (f[:, 2] - f[:, 0]) / self.width
        h = (f[:, 3] - f[:, 1]) / self.height
        x0 = (f[:, 0] + f[:, 2]) / 2 - self.cx * w
        y0 = (f[:, 1] + f[:, 3]) / 2 - self.cy * h
        out = f.copy()
        out[:, 0], out[:, 1], out[:, 2], out[:, 3] = x0, y0, x0 + w, y0 + h
        return out.astype(np.float32)


def face_map(faces: npt.NDArray[Any], width: int, height: int, grid_h: int, grid_w: int) -> F32:
    """Face boxes (``[N, >= 4]``, pixels of a ``width`` x ``height`` image) as a ``grid_h`` x
    ``grid_w`` map: each cell holds the share of its area that faces cover (overlaps add, then
    capped at 1), so the map is exact at any grid resolution and 0 without faces."""
    if grid_h < 1 or grid_w < 1 or width < 1 or height < 1:
        raise ValueError("grid and image sizes must be >= 1")
    out = np.zeros((grid_h, grid_w), dtype=np.float64)
    boxes = np.asarray(faces, dtype=np.float64).reshape(
        -1, np.shape(faces)[-1] if np.size(faces) else 4
    )
    ex = np.arange(grid_w + 1) * (width / grid_w)
    ey = np.arange(grid_h + 1) * (height / grid_h)
    cell = (width / grid_w) * (height / grid_h)
    for x0, y0, x1, y1 in boxes[:, :4]:
        ox = np.clip(np.minimum(ex[1:], x1) - np.maximum(ex[:-1], x0), 0.0, None)
        oy = np.clip(np.minimum(ey[1:], y1) - np.maximum(ey[:-1], y0), 0.0, None)
        out += np.outer(oy, ox) / cell
    return np.minimum(out, 1.0).astype(np.float32)
