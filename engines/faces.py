"""Faces in a photo: the MTCNN cascade (engines/faces_export.py) on ONNX Runtime's CPU provider.

``FaceDetector.detect`` takes RGB pixels and returns boxes ``[x0, y0, x1, y1, score]`` (float32,
pixels of the image given, x1/y1 exclusive). The cascade is facenet-pytorch 2.6.0's
``detect_face`` in numpy: an image pyramid from ``min_face`` up (each level an area resize, as
torch's ``interpolate(mode="area")``), P-Net over every level, NMS per level and across them,
R-Net on 24x24 crops, O-Net on 48x48 crops, box regression and NMS after each stage.

``face_map`` turns boxes into a heat grid at any resolution (the model's heatmap grid): the
channel a read-out head can learn to weigh (training/), and the boxes themselves drive the
window search's face rule (kernels/faces.py).

Runtime conventions are engines/ort.py's: deterministic compute, no spinning, sequential
execution, a fixed thread count; the graphs are read through their manifest and refused when
their bytes do not match it.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import onnxruntime as ort
import pyvips
from numba import njit

from engines.artifacts import HASH_CHARS
from engines.errors import EngineError, ModelNotBuilt
from engines.ort import _session_options
from engines.pixels import _to_rgb8, needs_colour_transform, open_header

FACES_MANIFEST_NAME = "faces.json"
NETS = ("pnet", "rnet", "onet")
HINT = "run `make model` (or `python -m engines.faces_export --out {dir}`) to build it"
# A face box as the detector returns it: x0, y0, x1, y1, score.
BOX_FIELDS = 5
CELL = 12
STRIDE = 2
RNET_SIDE = 24
ONET_SIDE = 48
# R-Net and O-Net take their crops in batches of at most this many: bounded memory on photos
# where P-Net proposes thousands of boxes.
BATCH = 256


@dataclass(frozen=True)
class FaceParams:
    """The cascade's knobs. Smaller ``min_face`` finds smaller faces at the cost of pyramid
    levels (P-Net's work grows ~ 1/min_face²); thresholds are per stage, as in MTCNN.

    Chosen on the first 60 crowd_train photos (training/faces.py's measure; no fitting): min
    face 12 instead of 20 found 3 points more of the labelled faces for 2.3x the time; max
    side 640 or 512 instead of 768 lost 6 and 17 points of recall; a P-Net threshold of 0.7
    instead of facenet-pytorch's 0.6 cost 0.3 points and 6 % of the time (fewer proposals
    for R-Net)."""

    min_face: float = 20.0
    thresholds: tuple[float, float, float] = (0.7, 0.7, 0.7)
    factor: float = 0.709
    # The detector sees the photo shrunk to fit this many pixels on its long side.
    max_side: int = 768

    def __post_init__(self) -> None:
        if not (math.isfinite(self.min_face) and 12.0 <= self.min_face <= 1000.0):
            raise ValueError(f"min_face must be in [12, 1000], got {self.min_face!r}")
        if len(self.thresholds) != 3 or not all(0.0 <= t < 1.0 for t in self.thresholds):
            raise ValueError(f"thresholds must be three numbers in [0, 1), got {self.thresholds}")
        if not 0.3 <= self.factor <= 0.95:
            raise ValueError(f"factor must be in [0.3, 0.95], got {self.factor!r}")
        if not 48 <= self.max_side <= 4096:
            raise ValueError(f"max_side must be in [48, 4096], got {self.max_side!r}")

    def key(self) -> str:
        t = ",".join(f"{v:g}" for v in self.thresholds)
        return f"m{self.min_face:g}-t{t}-f{self.factor:g}-s{self.max_side}"


def _not_built(model_dir: Path, why: str) -> ModelNotBuilt:
    return ModelNotBuilt(f"face detector: {why} in {model_dir}: " + HINT.format(dir=model_dir))


def find_face_model(model_dir: str | Path) -> tuple[dict[str, Path], str]:
    """The three graphs named by ``faces.json`` (each checked against its sha256) and the
    detector version; ``ModelNotBuilt`` when anything is missing or does not match."""
    model_dir = Path(model_dir)
    try:
        info = json.loads((model_dir / FACES_MANIFEST_NAME).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise _not_built(model_dir, f"no {FACES_MANIFEST_NAME}") from None
    except (OSError, ValueError) as exc:
        raise _not_built(model_dir, f"unreadable {FACES_MANIFEST_NAME} ({exc})") from exc
    nets = info.get("nets") if isinstance(info, dict) else None
    version = info.get("version") if isinstance(info, dict) else None
    if not isinstance(nets, dict) or not isinstance(version, str):
        raise _not_built(model_dir, f"{FACES_MANIFEST_NAME} lacks nets/version")
    paths: dict[str, Path] = {}
    for net in NETS:
        entry = nets.get(net)
        if not (
            isinstance(entry, dict)
            and isinstance(entry.get("file"), str)
            and isinstance(entry.get("sha256"), str)
        ):
            raise _not_built(model_dir, f"{FACES_MANIFEST_NAME} lacks {net}")
        name, digest = entry["file"], entry["sha256"]
        if Path(name).name != name or not name.endswith(f"-{digest[:HASH_CHARS]}.onnx"):
            raise _not_built(model_dir, f"{FACES_MANIFEST_NAME} names {name!r}, not its hash's")
        try:
            data = (model_dir / name).read_bytes()
        except FileNotFoundError:
            raise _not_built(model_dir, f"{name} is missing") from None
        if hashlib.sha256(data).hexdigest() != digest:
            raise _not_built(model_dir, f"{name} does not match its sha256")
        paths[net] = model_dir / name
    return paths, version


def area_resize(integral: npt.NDArray[np.int64], out_h: int, out_w: int) -> npt.NDArray[Any]:
    """torch ``interpolate(mode="area")`` (adaptive average pooling) from an integral image.

    ``integral`` is ``integral_image(pixels)``: [H+1, W+1, 3]. Output pixel (i, j) averages the
    source rows floor(i H / h) .. ceil((i+1) H / h) and the same for columns.
    """
    h, w = integral.shape[0] - 1, integral.shape[1] - 1
    return _pool(integral, 0, h, 0, w, out_h, out_w)[0]


def integral_image(pixels: npt.NDArray[np.uint8]) -> npt.NDArray[np.int64]:
    # int32 while the whole image's sum fits (every photo up to ~2900 px square): half the
    # memory traffic of int64 in the cumulative sums and in every gather from them.
    fits = pixels.shape[0] * pixels.shape[1] * 255 < 2**31
    dtype = np.int32 if fits else np.int64
    out = np.zeros((pixels.shape[0] + 1, pixels.shape[1] + 1, 3), dtype=dtype)
    np.cumsum(pixels, axis=0, dtype=dtype, out=out[1:, 1:])
    np.cumsum(out[1:, 1:], axis=1, out=out[1:, 1:])
    return out


def _pool(
    integral: npt.NDArray[np.int64],
    y0: npt.ArrayLike,
    y1: npt.ArrayLike,
    x0: npt.ArrayLike,
    x1: npt.ArrayLike,
    out_h: int,
    out_w: int,
) -> npt.NDArray[np.float32]:
    """Adaptive average pooling of the boxes [y0, y1) x [x0, x1) (ints, one per box) to
    out_h x out_w: [N, out_h, out_w, 3] float32."""
    y0a, y1a = np.atleast_1d(y0).astype(np.int64), np.atleast_1d(y1).astype(np.int64)
    x0a, x1a = np.atleast_1d(x0).astype(np.int64), np.atleast_1d(x1).astype(np.int64)
    hs, ws = (y1a - y0a)[:, None], (x1a - x0a)[:, None]
    i, j = np.arange(out_h)[None, :], np.arange(out_w)[None, :]
    r0 = y0a[:, None] + (i * hs) // out_h
    r1 = y0a[:, None] + -((-(i + 1) * hs) // out_h)
    c0 = x0a[:, None] + (j * ws) // out_w
    c1 = x0a[:, None] + -((-(j + 1) * ws) // out_w)
    r0, r1 = r0[:, :, None], r1[:, :, None]
    c0, c1 = c0[:, None, :], c1[:, None, :]
    total = integral[r1, c1] - integral[r0, c1] - integral[r1, c0] + integral[r0, c0]
    area = ((r1 - r0) * (c1 - c0))[..., None]
    return (total / area).astype(np.float32)


def nms(
    boxes: npt.NDArray[Any], scores: npt.NDArray[Any], threshold: float, *, by_min: bool = False
) -> npt.NDArray[np.int64]:
    """Greedy non-maximum suppression, MTCNN's (inclusive pixel areas, +1), best score first;
    ``by_min`` divides the overlap by the smaller box's area instead of the union."""
    if boxes.shape[0] == 0:
        return np.zeros(0, dtype=np.int64)
    b = np.ascontiguousarray(boxes[:, :4], dtype=np.float64)
    # Stable, so equal scores keep their input order whatever numpy's sort does.
    order = np.argsort(-np.asarray(scores, dtype=np.float64), kind="stable")
    return _nms_kernel(b, order, float(threshold), bool(by_min))


@njit(cache=True)
def _nms_kernel(
    b: npt.NDArray[np.float64], order: npt.NDArray[np.int64], threshold: float, by_min: bool
) -> npt.NDArray[np.int64]:
    n = order.size
    area = (b[:, 2] - b[:, 0] + 1.0) * (b[:, 3] - b[:, 1] + 1.0)
    gone = np.zeros(n, dtype=np.bool_)
    keep = np.empty(n, dtype=np.int64)
    k = 0
    for a in range(n):
        i = order[a]
        if gone[i]:
            continue
        keep[k] = i
        k += 1
        for c in range(a + 1, n):
            j = order[c]
            if gone[j]:
                continue
            w = min(b[i, 2], b[j, 2]) - max(b[i, 0], b[j, 0]) + 1.0
            h = min(b[i, 3], b[j, 3]) - max(b[i, 1], b[j, 1]) + 1.0
            if w <= 0.0 or h <= 0.0:
                continue
            inter = w * h
            denom = min(area[i], area[j]) if by_min else area[i] + area[j] - inter
            if inter / denom > threshold:
                gone[j] = True
    return keep[:k].copy()


def _regress(
    boxes: npt.NDArray[np.float64], reg: npt.NDArray[Any], plus_one: bool
) -> npt.NDArray[np.float64]:
    w = boxes[:, 2] - boxes[:, 0] + (1.0 if plus_one else 0.0)
    h = boxes[:, 3] - boxes[:, 1] + (1.0 if plus_one else 0.0)
    out = boxes.copy()
    out[:, 0] += reg[:, 0] * w
    out[:, 1] += reg[:, 1] * h
    out[:, 2] += reg[:, 2] * w
    out[:, 3] += reg[:, 3] * h
    return out


def _square(boxes: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
    h = boxes[:, 3] - boxes[:, 1]
    w = boxes[:, 2] - boxes[:, 0]
    side = np.maximum(w, h)
    out = boxes.copy()
    out[:, 0] = boxes[:, 0] + w * 0.5 - side * 0.5
    out[:, 1] = boxes[:, 1] + h * 0.5 - side * 0.5
    out[:, 2] = out[:, 0] + side
    out[:, 3] = out[:, 1] + side
    return out


def _crop_bounds(
    boxes: npt.NDArray[np.float64], width: int, height: int
) -> tuple[npt.NDArray[np.int64], ...]:
    """facenet-pytorch's ``pad``: truncated, clipped to the image (1-based starts), and only
    the boxes with something left inside."""
    b = np.trunc(boxes[:, :4]).astype(np.int64)
    x = np.maximum(b[:, 0], 1)
    y = np.maximum(b[:, 1], 1)
    ex = np.minimum(b[:, 2], width)
    ey = np.minimum(b[:, 3], height)
    ok = (ey > y - 1) & (ex > x - 1)
    return ok, y - 1, ey, x - 1, ex


class FaceDetector:
    """MTCNN on ONNX Runtime (CPU). ``detect`` is safe to call from one thread at a time per
    instance; the service calls it from its engine-side worker."""

    def __init__(
        self, model_dir: str | Path, params: FaceParams | None = None, threads: int = 1
    ) -> None:
        if threads < 1:
            raise ValueError(f"threads must be >= 1, got {threads}")
        paths, version = find_face_model(model_dir)
        self.params = params or FaceParams()
        self._model_version = version
        options = _session_options(threads, False)
        try:
            self._sessions = {
                net: ort.InferenceSession(
                    str(paths[net]), sess_options=options, providers=["CPUExecutionProvider"]
                )
                for net in NETS
            }
        except Exception as exc:  # ORT raises its own exception types
            raise EngineError(f"face detector cannot start: {exc}") from exc

    @property
    def version(self) -> str:
        """The graphs' hash and the cascade's knobs: what face boxes are cached under."""
        return f"mtcnn-{self._model_version}-{self.params.key()}"

    def warm_up(self) -> None:
        self.detect(np.full((96, 128, 3), 127, dtype=np.uint8))

    def _run(self, net: str, image: npt.NDArray[np.float32]) -> tuple[npt.NDArray[np.float32], ...]:
        try:
            prob, reg = self._sessions[net].run(["prob", "reg"], {"image": image})
        except Exception as exc:
            raise EngineError(f"face detector ({net}) failed: {exc}") from exc
        return np.asarray(prob, dtype=np.float32), np.asarray(reg, dtype=np.float32)

    def _refine(
        self, net: str, integral: npt.NDArray[np.int64], boxes: npt.NDArray[np.float64], side: int
    ) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.float32], npt.NDArray[np.float32]]:
        height, width = integral.shape[0] - 1, integral.shape[1] - 1
        ok, y0, y1, x0, x1 = _crop_bounds(boxes, width, height)
        boxes = boxes[ok]
        probs, regs = [], []
        for at in range(0, boxes.shape[0], BATCH):
            sl = slice(at, at + BATCH)
            crops = _pool(integral, y0[ok][sl], y1[ok][sl], x0[ok][sl], x1[ok][sl], side, side)
            p, r = self._run(net, crops)
            probs.append(p.reshape(-1))
            regs.append(r.reshape(-1, 4))
        if not probs:
            return boxes, np.zeros(0, np.float32), np.zeros((0, 4), np.float32)
        return boxes, np.concatenate(probs), np.concatenate(regs)

    def detect(self, pixels: npt.NDArray[np.uint8]) -> npt.NDArray[np.float32]:
        """Faces in ``pixels`` (uint8 [H, W, 3] RGB): [N, 5] float32 x0, y0, x1, y1, score."""
        if not (
            isinstance(pixels, np.ndarray)
            and pixels.dtype == np.uint8
            and pixels.ndim == 3
            and pixels.shape[2] == 3
        ):
            raise ValueError("pixels must be a uint8 [H, W, 3] array")
        height, width = pixels.shape[:2]
        p = self.params
        empty = np.zeros((0, BOX_FIELDS), dtype=np.float32)
        if min(height, width) < CELL:
            return empty
        integral = integral_image(pixels)
        image = pyvips.Image.new_from_array(pixels, interpretation="srgb")
        # Stage 1: P-Net over the pyramid.
        scale = CELL / p.min_face
        side = min(height, width) * scale
        found = []
        while side >= CELL:
            hs, ws = int(height * scale + 1), int(width * scale + 1)
            # libvips' resize (a box shrink, then a linear reduce) stands in for the area
            # resize of facenet-pytorch: the same averaging, a tenth of numpy's time.
            small = image.resize(ws / width, vscale=hs / height, kernel="linear")
            level = small.numpy()[None, :hs, :ws, :3].astype(np.float32)
            prob, reg = self._run("pnet", level)
            prob, reg = prob[0], reg[0]
            ys, xs = np.nonzero(prob >= p.thresholds[0])
            if ys.size:
                q0x = np.floor((STRIDE * xs + 1) / scale)
                q0y = np.floor((STRIDE * ys + 1) / scale)
                q1x = np.floor((STRIDE * xs + CELL) / scale)
                q1y = np.floor((STRIDE * ys + CELL) / scale)
                cand = np.stack(
                    [q0x, q0y, q1x, q1y, prob[ys, xs], *(reg[k, ys, xs] for k in range(4))],
                    axis=1,
                ).astype(np.float64)
                found.append(cand[nms(cand[:, :4], cand[:, 4], 0.5)])
            scale *= p.factor
            side *= p.factor
        if not found:
            return empty
        boxes = np.concatenate(found)
        boxes = boxes[nms(boxes[:, :4], boxes[:, 4], 0.7)]
        boxes = np.concatenate(
            [_regress(boxes[:, :4], boxes[:, 5:9], plus_one=False), boxes[:, 4:5]], axis=1
        )
        boxes = _square(boxes)
        # Stage 2: R-Net.
        boxes, prob, reg = self._refine("rnet", integral, boxes, RNET_SIDE)
        keep = prob > p.thresholds[1]
        boxes, prob, reg = boxes[keep], prob[keep], reg[keep]
        if boxes.shape[0] == 0:
            return empty
        boxes = np.concatenate([boxes[:, :4], prob[:, None]], axis=1)
        pick = nms(boxes[:, :4], boxes[:, 4], 0.7)
        boxes, reg = boxes[pick], reg[pick]
        boxes[:, :4] = _regress(boxes[:, :4], reg, plus_one=True)
        boxes = _square(boxes)
        # Stage 3: O-Net.
        boxes, prob, reg = self._refine("onet", integral, boxes, ONET_SIDE)
        keep = prob > p.thresholds[2]
        boxes, prob, reg = boxes[keep], prob[keep], reg[keep]
        if boxes.shape[0] == 0:
            return empty
        boxes = np.concatenate([boxes[:, :4], prob[:, None]], axis=1)
        boxes[:, :4] = _regress(boxes[:, :4], reg, plus_one=True)
        boxes = boxes[nms(boxes[:, :4], boxes[:, 4], 0.7, by_min=True)]
        out = boxes.astype(np.float32)
        # Inside the image, x1/y1 exclusive like every box in heatcrop.
        out[:, [0, 2]] = np.clip(out[:, [0, 2]], 0.0, float(width))
        out[:, [1, 3]] = np.clip(out[:, [1, 3]], 0.0, float(height))
        out = out[(out[:, 2] > out[:, 0]) & (out[:, 3] > out[:, 1])]
        return np.ascontiguousarray(out)

    def detect_bytes(self, data: bytes) -> tuple[npt.NDArray[np.float32], tuple[int, int]]:
        """Faces in an encoded image, decoded to fit ``params.max_side`` (shrink-on-load, EXIF
        orientation applied, sRGB): boxes in the pixels of that decode, and its (width, height).
        Raises ``pyvips.Error`` for data libvips cannot decode."""
        pixels = face_pixels(data, self.params.max_side)
        return self.detect(pixels), (pixels.shape[1], pixels.shape[0])

    def close(self) -> None:
        self._sessions = {}


def face_pixels(data: bytes, max_side: int) -> npt.NDArray[np.uint8]:
    """``data`` shrunk (never enlarged) to fit max_side x max_side: uint8 [H, W, 3] sRGB.

    The detector needs more pixels than the heatmap model's 224-px bucket (a 20-px face of a
    768-px photo would be 6 px there), so it has its own decode, the same pipeline otherwise
    (engines/pixels.py).
    """
    colour = {"export_profile": "srgb"} if needs_colour_transform(open_header(data)) else {}
    image = pyvips.Image.thumbnail_buffer(
        data, max_side, height=max_side, size="down", option_string="fail_on=error", **colour
    )
    image = _to_rgb8(image)
    return np.ascontiguousarray(image.numpy(), dtype=np.uint8).reshape(image.height, image.width, 3)


def scale_boxes(
    faces: npt.NDArray[Any], source: tuple[int, int], target: tuple[int, int]
) -> npt.NDArray[np.float32]:
    """Boxes found in a ``source`` (width, height) image, in the pixels of ``target``."""
    out = np.array(faces, dtype=np.float32).reshape(-1, BOX_FIELDS)
    out[:, [0, 2]] *= target[0] / source[0]
    out[:, [1, 3]] *= target[1] / source[1]
    return out


@dataclass(frozen=True)
class HeadBox:
    """Detector box -> the box a person would draw around the head.

    MTCNN's boxes cover brows to chin; the boxes labelled in crowd_train (and what a crop must
    not cut) cover the head: matched pairs there have the detector box at ~0.56 of the
    labelled width and ~0.61 of its height, centred at 0.48 across and 0.59 down it (hair
    above; training/results/faces.md). ``width``/``height`` are the detector box's share of
    the head box, ``cx``/``cy`` where the detector box's centre sits in it. Fitted on
    crowd_train by training/faces.py (medians over matched pairs; the benchmark fits them per
    fold).
    """

    width: float = 0.556
    height: float = 0.606
    cx: float = 0.482
    cy: float = 0.589

    def apply(self, faces: npt.NDArray[Any]) -> npt.NDArray[np.float32]:
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


def face_map(
    faces: npt.NDArray[Any], width: int, height: int, grid_h: int, grid_w: int
) -> npt.NDArray[np.float32]:
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
