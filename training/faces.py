"""The face detector against crowd_train's labelled faces: ``python -m training.faces``.

    python -m training.faces [--eval-dir ../shared/eval] [--limit N] [--scales 1,1.3,2]
        [--source path/to/another/yunet.onnx] [--out training/results/faces.md]

What it measures, for the detector as the service runs it (engines/faces.py on the CNN's own
input: the photo decoded by the service's decode to its shape bucket, 224 px on the short side),
and on larger decodes of the same photo (the bucket times ``--scales``, rounded to multiples of
32) for comparison: recall of the labelled frontal and profile faces (not `back`) by labelled
face height, recall of the faces people notice (height >= 1/12 of the photo's, the quality
protocol's), precision of the detections (a detection that overlaps no labelled face at all,
`back` ones included, is a false one), the detector's ms per photo (the graph, the decode of its
outputs, NMS; one thread) and the decode's: at the bucket the detector reads pixels the service
decodes anyway, a larger decode costs its difference to the bucket's.

A labelled face is found when a detection's centre lies inside it and their IoU is at least 0.2
(the detector's box covers the face, the labelled one the head), one detection per face, best
IoU first. It also fits the head-box transform (engines.faces.HeadBox: where the detector's box
sits in the labelled head box, medians over matched pairs), on all photos (what ships) and on
each of 5 folds by photo (what bench/quality.py uses, so that no photo is scored with a
transform fitted on it).
"""

from __future__ import annotations

import argparse
import functools
import itertools
import json
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import numpy.typing as npt

from engines import faces_build
from engines.buckets import bucket_for
from engines.face_engine import in_pixels, shares
from engines.faces import FaceDetector, FaceParams, HeadBox
from sidecar.decode import configure_vips, decode_to
from training.data import EvalItem, EvalSet, load_set, publish
from training.features import fold_of

F32 = npt.NDArray[np.float32]
F64 = npt.NDArray[np.float64]
MATCH_IOU = 0.2
FOLDS = 5
SET = "crowd_train"
# Labelled face heights (pixels of the 576-px photos) the recall is broken down by.
HEIGHT_BINS = (0, 24, 48, 96, 10_000)
NOTICED = 1 / 12
SHIPPED_SCORE = FaceParams().score
LIMITS = {"max_bytes": 64 << 20, "max_pixels": 100_000_000}


@dataclass(frozen=True)
class Detections:
    """Per photo (by image name): boxes in original pixels [N, 5], and the detector's seconds
    and the decode's seconds (at the size the detector read)."""

    boxes: dict[str, F32]
    seconds: dict[str, float]
    decode_seconds: dict[str, float] | None = None


def detector_input(width: int, height: int, scale: float = 1.0) -> tuple[int, int]:
    """The (height, width) the detector reads for a width x height photo: its shape bucket
    (what the service decodes for the CNN), times ``scale`` rounded to multiples of 32."""
    h, w = bucket_for(width, height)
    return max(32, round(h * scale / 32) * 32), max(32, round(w * scale / 32) * 32)


def detect_original(
    detector: FaceDetector, item: EvalItem, scale: float = 1.0
) -> tuple[F32, float, float]:
    """The photo's faces as the service finds them (``scale`` 1), in the original's pixels;
    the detector's seconds and the decode's."""
    data = item.path.read_bytes()
    t0 = time.perf_counter()
    decoded = decode_to(data, detector_input(item.width, item.height, scale), **LIMITS)
    t1 = time.perf_counter()
    (found,) = detector.detect_batch(decoded.pixels[None])
    t2 = time.perf_counter()
    h, w = decoded.pixels.shape[:2]
    return in_pixels(shares(found, w, h), item.width, item.height), t2 - t1, t1 - t0


def detect_set(detector: FaceDetector, eval_set: EvalSet, scale: float = 1.0) -> Detections:
    return detect_runs(eval_set, [(detector, scale)])[0]


def detect_runs(eval_set: EvalSet, runs: Sequence[tuple[FaceDetector, float]]) -> list[Detections]:
    """Each (detector, scale) on every photo; the runs take turns photo by photo, so that the
    machine's load weighs on their timings alike."""
    out = [Detections({}, {}, {}) for _ in runs]
    for item in eval_set.items:
        for (detector, scale), det in zip(runs, out, strict=True):
            assert det.decode_seconds is not None
            found, seconds, decode_s = detect_original(detector, item, scale)
            det.boxes[item.name], det.seconds[item.name] = found, seconds
            det.decode_seconds[item.name] = decode_s
    return out


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


@dataclass(frozen=True)
class Recall:
    """Found / labelled per height bin (HEIGHT_BINS), noticed faces, all; false detections."""

    found: npt.NDArray[np.int64]
    total: npt.NDArray[np.int64]
    noticed: tuple[int, int]
    false: int
    detections: int

    def share(self, i: int) -> float:
        return float(self.found[i]) / max(int(self.total[i]), 1)

    @property
    def recall(self) -> float:
        return float(self.found.sum()) / max(int(self.total.sum()), 1)

    @property
    def noticed_recall(self) -> float:
        return self.noticed[0] / max(self.noticed[1], 1)

    @property
    def precision(self) -> float:
        return 1.0 - self.false / max(self.detections, 1)


def recall_precision(
    eval_dir: Path, eval_set: EvalSet, det: Detections, min_score: float = 0.0
) -> Recall:
    bins = len(HEIGHT_BINS) - 1
    found, total = np.zeros(bins, np.int64), np.zeros(bins, np.int64)
    noticed = [0, 0]
    false = n_det = 0
    for item in eval_set.items:
        d = det.boxes[item.name].astype(np.float64)
        d = d[d[:, 4] >= min_score]
        g = labelled(item)
        heights = g[:, 3] - g[:, 1]
        which = np.clip(np.searchsorted(HEIGHT_BINS, heights, side="right") - 1, 0, bins - 1)
        hit = np.zeros(len(g), bool)
        hit[[j for _, j in match(d, g)]] = True
        np.add.at(total, which, 1)
        np.add.at(found, which[hit], 1)
        big = heights >= NOTICED * item.height
        noticed[0] += int((hit & big).sum())
        noticed[1] += int(big.sum())
        n_det += len(d)
        every = all_labelled(eval_dir, item)
        if len(d):
            if len(every):
                near = (_iou(d[:, :4], every) >= 0.1) | _centre_inside(d[:, :4], every)
                false += int((~near.any(axis=1)).sum())
            else:
                false += len(d)
    return Recall(found, total, (noticed[0], noticed[1]), false, n_det)


def _ms(values: dict[str, float]) -> float:
    return float(np.median(list(values.values()))) * 1e3


def report_rows(
    label: str, eval_dir: Path, eval_set: EvalSet, det: Detections, extra_decode_ms: float
) -> list[str]:
    r = recall_precision(eval_dir, eval_set, det, SHIPPED_SCORE)
    extra = extra_decode_ms
    bins = " | ".join(f"{r.share(i):.2f}" for i in range(len(HEIGHT_BINS) - 1))
    return [
        f"| {label} | {r.recall:.3f} | {r.noticed_recall:.3f} | {bins} | {r.precision:.3f} | "
        f"{r.detections} | {_ms(det.seconds):.2f} | {extra:.2f} |"
    ]


def report(
    eval_dir: Path,
    eval_set: EvalSet,
    runs: list[tuple[str, float, Detections]],
    detector: FaceDetector,
    load: str,
) -> str:
    ship = runs[0][2]
    bucket_decode_ms = _ms(ship.decode_seconds or {})
    head = fit_head_box(eval_set.items, ship)
    folds = fold_head_boxes(eval_set, ship)
    per_fold = sorted({(h.width, h.height, h.cx, h.cy) for h in folds.values()})
    r = recall_precision(eval_dir, eval_set, ship, SHIPPED_SCORE)
    bins = " | ".join(
        f"{lo}-{hi if hi < 10_000 else ''} px" for lo, hi in itertools.pairwise(HEIGHT_BINS)
    )
    lines = [
        f"# Face detector on {eval_set.name} ({datetime.now(UTC):%Y-%m-%d %H:%M} UTC)",
        "",
        f"- command: `python -m training.faces --out training/results/faces.md` "
        f"(engines/faces.py, training/faces.py); machine load (uptime) at the start: {load}",
        f"- detector: {detector.version}, one ONNX Runtime thread; the first table at the "
        f"service's least score {SHIPPED_SCORE} (kernel.face_score)",
        f"- photos: {len(eval_set.items)}; labelled frontal/profile faces: {int(r.total.sum())}"
        f", of which noticed (height >= 1/12 of the photo's): {r.noticed[1]}",
        "- a face is found when a detection's centre is inside it and IoU >= "
        f"{MATCH_IOU}; a false detection overlaps no labelled face, `back` ones included",
        "- ms: medians per photo; detector = graph + decode of its outputs + NMS; extra decode ="
        f" the decode at that size minus the bucket's ({bucket_decode_ms:.2f} ms), which the "
        "service makes anyway",
        f"- head box (engines.faces.HeadBox) fitted on all photos at the bucket: width "
        f"{head.width}, height {head.height}, cx {head.cx}, cy {head.cy}; per fold (5 by photo): "
        + "; ".join(f"{w}/{h}/{x}/{y}" for w, h, x, y in per_fold),
        "",
        f"| detector input | recall | noticed recall | {bins} | precision | detections "
        "| detector ms | extra decode ms |",
        "|---|---:|---:|" + "---:|" * (len(HEIGHT_BINS) - 1) + "---:|---:|---:|---:|",
    ]
    for label, scale, det in runs:
        # At the bucket the detector reads the service's own decode: nothing extra, by design.
        decode_ms = _ms(det.decode_seconds or {})
        extra = 0.0 if scale == 1 else max(0.0, decode_ms - bucket_decode_ms)
        lines += report_rows(label, eval_dir, eval_set, det, extra)
    lines += ["", "At the bucket, by least score:", ""]
    lines += ["| score at least | recall | noticed recall | precision | detections |"]
    lines += ["|---:|---:|---:|---:|---:|"]
    for cut in (0.5, 0.55, 0.6, 0.65, 0.7, 0.8):
        c = recall_precision(eval_dir, eval_set, ship, cut)
        lines.append(
            f"| {cut} | {c.recall:.3f} | {c.noticed_recall:.3f} | {c.precision:.3f} | "
            f"{c.detections} |"
        )
    return "\n".join(lines) + "\n"


def _load() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "unknown"


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--eval-dir", type=Path, default=Path("../shared/eval"))
    ap.add_argument("--model-dir", default="build/model")
    ap.add_argument("--scales", default="1,1.3,2", help="detector inputs: the bucket times these")
    ap.add_argument(
        "--source",
        type=Path,
        action="append",
        default=[],
        help="another YuNet graph to compare at the bucket (built unpinned into a temp folder)",
    )
    ap.add_argument("--limit", type=int)
    ap.add_argument("--out", type=Path, help="write the markdown report here")
    args = ap.parse_args(argv)
    configure_vips()
    load = _load()
    params = FaceParams(score=0.5)  # the report's score table cuts from here
    detector = FaceDetector(args.model_dir, params)
    detector.warm_up()
    eval_set = load_set(args.eval_dir, SET, args.limit)
    labels, configs = [], []
    for scale in (float(s) for s in args.scales.split(",")):
        h, w = detector_input(768, 576, scale)
        labels.append("the bucket (shipped)" if scale == 1 else f"bucket x {scale:g} ({w}x{h})")
        configs.append((detector, scale))
    with tempfile.TemporaryDirectory() as tmp:
        for i, source in enumerate(args.source):
            folder = Path(tmp) / str(i)
            faces_build.build(folder, source, pinned=False)
            other = FaceDetector(folder, params)
            other.warm_up()
            labels.append(f"{source.name} at the bucket")
            configs.append((other, 1.0))
        found = detect_runs(eval_set, configs)
        runs = [(lab, c[1], d) for lab, c, d in zip(labels, configs, found, strict=True)]
    publish(report(args.eval_dir, eval_set, runs, detector, load), args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
