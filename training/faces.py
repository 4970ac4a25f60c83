"""The face detector against crowd_train's labelled faces: ``python -m training.faces``.

    python -m training.faces [--eval-dir ../shared/eval] [--min-face 20] [--limit N]
        [--out training/results/faces.md]

What it measures, for the detector as the service runs it (engines/faces.py, photos decoded to
fit 768 px): recall of the labelled frontal and profile faces (not `back`), precision of the
detections (a detection that overlaps no labelled face at all, `back` ones included, is a
false one), and ms per photo. A labelled face is found when a detection's centre lies inside
it and their IoU is at least 0.2 (the detector's box covers brows to chin, the labelled one
the head: their IoU is low even when both are right), one detection per face, best IoU first.

It also fits the head-box transform (engines.faces.HeadBox: where the detector's box sits in
the labelled head box, medians over matched pairs), the numbers the face rule turns detections
into head boxes with; the report gives them fitted on all photos (what ships) and, to show
how much they move, on each of 5 folds by photo (what bench/quality.py does, so that no photo
is scored with a transform fitted on it).
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import numpy.typing as npt

from engines.faces import FaceDetector, FaceParams, HeadBox, scale_boxes
from training.data import EvalItem, EvalSet, load_set, publish
from training.features import fold_of

F64 = npt.NDArray[np.float64]
MATCH_IOU = 0.2
FOLDS = 5
SET = "crowd_train"


@dataclass(frozen=True)
class Detections:
    """Per photo (by image name): boxes in original pixels [N, 5], and the seconds it took."""

    boxes: dict[str, npt.NDArray[np.float32]]
    seconds: dict[str, float]


def detect_original(detector: FaceDetector, item: EvalItem) -> npt.NDArray[np.float32]:
    """The photo's faces as the service finds them, in the original's pixels."""
    found, size = detector.detect_bytes(item.path.read_bytes())
    return scale_boxes(found, size, (item.width, item.height))


def detect_set(detector: FaceDetector, eval_set: EvalSet) -> Detections:
    boxes, seconds = {}, {}
    for item in eval_set.items:
        t0 = time.perf_counter()
        boxes[item.name] = detect_original(detector, item)
        seconds[item.name] = time.perf_counter() - t0
    return Detections(boxes, seconds)


def _iou(a: F64, b: F64) -> F64:
    lo, hi = (
        np.maximum(a[:, None, :2], b[None, :, :2]),
        np.minimum(a[:, None, 2:4], b[None, :, 2:4]),
    )
    ix, iy = np.clip(hi - lo, 0, None).transpose(2, 0, 1)
    inter = ix * iy
    area_a = (a[:, 2] - a[:, 0]) * (a[:, 3] - a[:, 1])
    area_b = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    return inter / np.maximum(area_a[:, None] + area_b[None, :] - inter, 1e-9)


def _centre_inside(det: F64, gt: F64) -> npt.NDArray[np.bool_]:
    cx, cy = (det[:, 0] + det[:, 2]) / 2, (det[:, 1] + det[:, 3]) / 2
    return (
        (cx[:, None] >= gt[None, :, 0])
        & (cx[:, None] < gt[None, :, 2])
        & (cy[:, None] >= gt[None, :, 1])
        & (cy[:, None] < gt[None, :, 3])
    )


def match(det: F64, gt: F64) -> list[tuple[int, int]]:
    """(detection, labelled face) pairs, one to one, best IoU first."""
    if len(det) == 0 or len(gt) == 0:
        return []
    overlap = _iou(det[:, :4], gt)
    ok = (overlap >= MATCH_IOU) & _centre_inside(det[:, :4], gt)
    pairs = sorted(zip(*np.nonzero(ok), strict=True), key=lambda p: (-overlap[p], p))
    used_d: set[int] = set()
    used_g: set[int] = set()
    out = []
    for i, j in pairs:
        if i not in used_d and j not in used_g:
            used_d.add(int(i))
            used_g.add(int(j))
            out.append((int(i), int(j)))
    return out


def labelled(item: EvalItem) -> F64:
    return np.array([b.as_list() for b in item.faces], dtype=np.float64).reshape(-1, 4)


@functools.cache
def _every_face(manifest: Path) -> dict[str, F64]:
    entries = json.loads(manifest.read_text())
    return {
        e["image"]: np.array([f["box"] for f in e.get("faces", ())], np.float64).reshape(-1, 4)
        for e in entries
    }


def all_labelled(eval_dir: Path, item: EvalItem) -> F64:
    """Every labelled face of the photo, `back` ones included (for precision)."""
    return _every_face(Path(eval_dir) / SET / "manifest.json")[item.name]


def head_box_pairs(items: Sequence[EvalItem], det: Detections) -> F64:
    """[n, 4]: per matched pair, the detection's width and height over the labelled box's, and
    its centre's position inside the labelled box (0..1 across, 0..1 down)."""
    rows = []
    for item in items:
        d = det.boxes[item.name].astype(np.float64)
        g = labelled(item)
        for i, j in match(d, g):
            gw, gh = g[j, 2] - g[j, 0], g[j, 3] - g[j, 1]
            rows.append(
                (
                    (d[i, 2] - d[i, 0]) / gw,
                    (d[i, 3] - d[i, 1]) / gh,
                    ((d[i, 0] + d[i, 2]) / 2 - g[j, 0]) / gw,
                    ((d[i, 1] + d[i, 3]) / 2 - g[j, 1]) / gh,
                )
            )
    return np.array(rows, dtype=np.float64).reshape(-1, 4)


def fit_head_box(items: Sequence[EvalItem], det: Detections) -> HeadBox:
    pairs = head_box_pairs(items, det)
    if len(pairs) == 0:
        return HeadBox()
    w, h, cx, cy = (round(float(v), 3) for v in np.median(pairs, axis=0))
    return HeadBox(w, h, cx, cy)


def fold_head_boxes(eval_set: EvalSet, det: Detections, folds: int = FOLDS) -> dict[str, HeadBox]:
    """Each photo's head-box transform, fitted on the other folds' photos."""
    fold = fold_of(len(eval_set.items), folds)
    out = {}
    for k in range(folds):
        train = [it for it, f in zip(eval_set.items, fold, strict=True) if f != k]
        head = fit_head_box(train, det)
        for it, f in zip(eval_set.items, fold, strict=True):
            if f == k:
                out[it.name] = head
    return out


def recall_precision(
    eval_dir: Path, eval_set: EvalSet, det: Detections, min_score: float = 0.0
) -> tuple[float, float, int, int]:
    """(recall, precision, labelled faces, detections)."""
    found = labelled_n = false = n_det = 0
    for item in eval_set.items:
        d = det.boxes[item.name].astype(np.float64)
        d = d[d[:, 4] >= min_score]
        g = labelled(item)
        labelled_n += len(g)
        n_det += len(d)
        found += len(match(d, g))
        every = all_labelled(eval_dir, item)
        if len(d):
            if len(every):
                near = (_iou(d[:, :4], every) >= 0.1) | _centre_inside(d[:, :4], every)
                false += int((~near.any(axis=1)).sum())
            else:
                false += len(d)
    return found / max(labelled_n, 1), 1.0 - false / max(n_det, 1), labelled_n, n_det


def report(eval_dir: Path, eval_set: EvalSet, det: Detections, detector: FaceDetector) -> str:
    ms = np.array(list(det.seconds.values())) * 1e3
    recall, precision, n_gt, n_det = recall_precision(eval_dir, eval_set, det)
    head = fit_head_box(eval_set.items, det)
    folds = fold_head_boxes(eval_set, det)
    per_fold = sorted({(h.width, h.height, h.cx, h.cy) for h in folds.values()})
    lines = [
        f"# Face detector on {eval_set.name} ({datetime.now(UTC):%Y-%m-%d %H:%M} UTC)",
        "",
        f"- detector: {detector.version} (engines/faces.py; `python -m training.faces`)",
        f"- photos: {len(eval_set.items)}; labelled frontal/profile faces: {n_gt}; "
        f"detections: {n_det}",
        f"- recall {recall:.3f}, precision {precision:.3f} (a face is found when a detection's "
        f"centre is inside it and IoU >= {MATCH_IOU}; a false detection overlaps no labelled "
        "face, `back` ones included)",
        f"- ms per photo (decode to 768 px + MTCNN, one thread): median {np.median(ms):.1f}, "
        f"p90 {np.percentile(ms, 90):.1f}, mean {ms.mean():.1f}",
        f"- head box (engines.faces.HeadBox) fitted on all photos: width {head.width}, height "
        f"{head.height}, cx {head.cx}, cy {head.cy}; per fold (5 by photo): "
        + "; ".join(f"{w}/{h}/{x}/{y}" for w, h, x, y in per_fold),
        "",
        "| score at least | recall | precision | detections |",
        "|---:|---:|---:|---:|",
    ]
    for cut in (0.7, 0.8, 0.9, 0.95, 0.99):
        r, p, _, n = recall_precision(eval_dir, eval_set, det, cut)
        lines.append(f"| {cut} | {r:.3f} | {p:.3f} | {n} |")
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--eval-dir", type=Path, default=Path("../shared/eval"))
    ap.add_argument("--model-dir", default="build/model")
    ap.add_argument("--min-face", type=float, default=FaceParams().min_face)
    ap.add_argument("--max-side", type=int, default=FaceParams().max_side)
    ap.add_argument("--limit", type=int)
    ap.add_argument("--out", type=Path, help="write the markdown report here")
    args = ap.parse_args(argv)
    detector = FaceDetector(
        args.model_dir, FaceParams(min_face=args.min_face, max_side=args.max_side)
    )
    detector.warm_up()
    eval_set = load_set(args.eval_dir, SET, args.limit)
    det = detect_set(detector, eval_set)
    text = report(args.eval_dir, eval_set, det, detector)
    publish(text, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
