"""INT8 against FP32 on every dev photo: does the quantized graph crop like the float one?

    python -m bench.int8 [--sets fcdb_dev,food_dev,saliency_dev] [--limit N]
        [--methods percentile,entropy,minmax] [--calib-photos DIR ...] [--per-folder 64]
        [--out bench/results/int8.md] [--eval-dir ../shared/eval]

For each calibrator in ``--methods``, ranges are measured on the calibration photos (by default
64 each of fcdb_train, osie_train and crowd_train: never a dev set) and an INT8 graph is
quantized from them exactly as ``make model`` does; ``percentile`` is also checked against
the committed ``engines/int8_calibration.json`` (same photos, same bytes expected). Then every
dev photo goes through the service's CropCore once per engine, and the report gives, per set
and engine against FP32:

* the correlation of the prepared map the search sees (mean and lowest over photos);
* the share of boxes identical to FP32's, and with IoU >= 0.98;
* ``bench.quality``'s headroom share (centre -> oracle) of each protocol metric, FP32 and
  INT8 side by side. The rule (issue 15): INT8 is the default only if no share is more than
  one point below FP32's. The verdict also gives the largest gap either way: food's
  "all dishes >= 90 %" is a yes/no count on 60 photos where one photo is ~5 points of its
  headroom, so it cannot be held to one point in either direction; a gain there is one photo
  that INT8 happens to crop better.

food_dev and saliency_dev were fitted on by the read-out, so their shares are in-sample for
both engines; the comparison is of the two engines, not of the model.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from bench.quality import (
    CentreMethod,
    ImageContext,
    Method,
    OracleMethod,
    SetResult,
    evaluate,
    git_describe,
    headroom_share,
)
from training.data import DEFAULT_SETS, Box, iou, load_set, publish

CALIB_SETS = ("fcdb_train", "osie_train", "crowd_train")
FP32 = "FP32"
# Agreement the default must keep (issue 15): no headroom share more than a point below FP32.
MAX_SHARE_GAP = 0.01
IOU_CLOSE = 0.98

BoxTuple = tuple[int, int, int, int]


class EngineMethod(Method):
    """The service's box for every aspect from one engine; keeps its maps and boxes."""

    def __init__(self, name: str, core: Any) -> None:
        self.name = name
        self.core = core
        self.maps: dict[str, npt.NDArray[np.float32]] = {}
        self.found: dict[str, list[BoxTuple]] = {}
        self.infer_ms: list[float] = []

    def boxes(self, ctx: ImageContext, aspects: Sequence[float]) -> list[Box]:
        analysis = self.core.analyse(ctx.data)
        self.infer_ms.append(analysis.timings_ms["infer"])
        key = str(ctx.item.path)
        self.maps[key] = self.core.prepared(analysis)
        out = []
        for aspect in aspects:
            box = self.core.box(analysis, aspect)
            if not self.core.is_confident(box):
                box = self.core.center(analysis, aspect)
            out.append(box)
        self.found[key] = [b.as_tuple() for b in out]
        return [Box.of(b) for b in out]


@dataclass(frozen=True)
class Agreement:
    map_r_mean: float
    map_r_min: float
    identical: float
    close: float  # IoU >= IOU_CLOSE
    mean_iou: float
    boxes: int


def agreement(reference: EngineMethod, other: EngineMethod, keys: Sequence[str]) -> Agreement:
    rs = [_correlation(reference.maps[k], other.maps[k]) for k in keys]
    pairs = [(a, b) for k in keys for a, b in zip(reference.found[k], other.found[k], strict=True)]
    ious = np.array([iou(Box(*a), Box(*b)) for a, b in pairs])
    return Agreement(
        float(np.mean(rs)),
        float(np.min(rs)),
        float(np.mean([a == b for a, b in pairs])),
        float(np.mean(ious >= IOU_CLOSE)),
        float(ious.mean()),
        len(pairs),
    )


def _correlation(a: npt.NDArray[np.float32], b: npt.NDArray[np.float32]) -> float:
    x, y = a.ravel().astype(np.float64), b.ravel().astype(np.float64)
    if x.std() == 0 or y.std() == 0:
        return 1.0 if np.array_equal(x, y) else 0.0
    return float(np.corrcoef(x, y)[0, 1])


def int8_graphs(
    model_dir: Path, methods: Sequence[str], photo_dirs: Sequence[Path], per_folder: int, tmp: Path
) -> dict[str, tuple[Path, str]]:
    """{calibrator: (INT8 graph, how its ranges compare with the committed file)}."""
    from engines import quantize
    from engines.model import find_model, read_manifest

    fp32 = find_model(model_dir)
    fp32_sha = str(read_manifest(model_dir)["sha256"])
    paths = quantize.calibration_photos(photo_dirs, per_folder)
    photos = [pixels for _, pixels in quantize.decoded_photos(paths)]
    committed = quantize.read_calibration()
    graphs = {}
    for method in methods:
        t0 = time.perf_counter()
        ranges = quantize.calibrate(fp32, photos, method)
        calibration = quantize.Calibration(method, fp32_sha, ranges, {"photos": len(photos)})
        note = f"{len(photos)} photos, {time.perf_counter() - t0:.0f} s"
        if method == committed.method:
            same = ranges == committed.ranges and committed.model_sha256 == fp32_sha
            note += "; ranges = committed file" if same else "; ranges DIFFER from committed file"
        path = tmp / f"int8-{method}.onnx"
        path.write_bytes(quantize.quantized_bytes(fp32.read_bytes(), calibration))
        graphs[method] = (path, note)
    return graphs


def report(
    results: Sequence[SetResult],
    engines: Sequence[EngineMethod],
    notes: dict[str, str],
    info: dict[str, str],
) -> str:
    reference = engines[0]
    lines = [
        "# INT8 against FP32 (bench/int8.py)",
        "",
        f"{info['date']}, commit {info['commit']}; FP32 model {info['model']}; "
        f"threads {info['threads']}; profile {info['profile']}; calibration photos: "
        f"{info['calibration']}.",
        "",
    ]
    lines += [f"- INT8 {name}: {note}" for name, note in notes.items()]
    lines += ["", "## Agreement with FP32 (every box of every aspect)", ""]
    lines += [
        f"| set | engine | map r mean | map r min | boxes identical | IoU >= {IOU_CLOSE} "
        "| mean IoU | boxes |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for result in results:
        keys = [str(item.path) for item in result.eval_set.items]
        for engine in engines[1:]:
            a = agreement(reference, engine, keys)
            lines.append(
                f"| {result.eval_set.name} | {engine.name} | {a.map_r_mean:.4f} | "
                f"{a.map_r_min:.4f} | {a.identical:.1%} | {a.close:.1%} | {a.mean_iou:.4f} | "
                f"{a.boxes} |"
            )
    lines += ["", "## Headroom share (centre -> oracle), all aspects", ""]
    header = " | ".join(e.name for e in engines)
    lines += [
        f"| set | metric | {header} | largest gap |",
        "|---|---|" + "---:|" * len(engines) + "---:|",
    ]
    # Largest loss (FP32's share minus INT8's: INT8 worse) and largest gap either way.
    loss: dict[str, float] = {e.name: 0.0 for e in engines[1:]}
    gap: dict[str, float] = {e.name: 0.0 for e in engines[1:]}
    for result in results:
        for metric in result.eval_set.protocol.metrics:
            shares = [headroom_share(result, e.name, metric.key, None) for e in engines]
            for engine, share in zip(engines[1:], shares[1:], strict=True):
                loss[engine.name] = max(loss[engine.name], shares[0] - share)
                gap[engine.name] = max(gap[engine.name], abs(shares[0] - share))
            gaps = [abs(s - shares[0]) for s in shares[1:]]
            cells = " | ".join(f"{s:.1%}" for s in shares)
            lines.append(f"| {result.eval_set.name} | {metric.key} | {cells} | {max(gaps):.1%} |")
    lines += ["", "## Verdict and speed", ""]
    for engine in engines:
        ms = np.median(engine.infer_ms)
        if engine is reference:
            lines.append(f"- {engine.name}: CNN median {ms:.2f} ms per photo (in this run)")
            continue
        verdict = "holds" if loss[engine.name] <= MAX_SHARE_GAP else "does NOT hold"
        lines.append(
            f"- {engine.name}: CNN median {ms:.2f} ms per photo, "
            f"{np.median(reference.infer_ms) / ms:.2f}x FP32's; largest headroom-share loss "
            f"against FP32 {max(loss[engine.name], 0.0):.2%}, largest gap either way "
            f"{gap[engine.name]:.2%}: the one-point rule {verdict}"
        )
    lines += [
        "",
        "CNN times are a by-product of this run (one photo at a time, decode apart); "
        "`make bench-speed` is the speed benchmark.",
        "",
    ]
    return "\n".join(lines)


def run(args: argparse.Namespace) -> str:
    from datetime import UTC, datetime

    from engines.model import find_model, read_manifest
    from engines.ort import OrtEngine
    from sidecar import settings as settings_mod
    from sidecar.core import CropCore
    from sidecar.decode import configure_vips

    configure_vips()
    settings = settings_mod.load(args.config)
    model_dir = Path(settings.engine.model_dir)
    threads = settings.engine.threads
    sets = [load_set(args.eval_dir, name, args.limit) for name in args.sets]
    photo_dirs = args.calib_photos or [args.eval_dir / s / "images" for s in CALIB_SETS]
    with tempfile.TemporaryDirectory(prefix="heatcrop-int8bench.") as tmp:
        graphs = int8_graphs(model_dir, args.methods, photo_dirs, args.per_folder, Path(tmp))
        paths = {FP32: find_model(model_dir), **{f"INT8 {m}": p for m, (p, _) in graphs.items()}}
        engines = []
        for name, path in paths.items():
            engine = OrtEngine(path, threads=threads)
            engine.warm_up()
            core = CropCore(engine, settings.kernel, settings.source, settings.engine.profile)
            core.warm()
            engines.append(EngineMethod(name, core))
        methods: list[Method] = [CentreMethod(), OracleMethod(), *engines]
        results = [evaluate(s, methods, progress=not args.quiet) for s in sets]
    info = {
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "commit": git_describe(),
        "model": str(read_manifest(model_dir)["sha256"])[:12],
        "threads": str(threads),
        "profile": settings.engine.profile,
        "calibration": ", ".join(f"{args.per_folder} of {d}" for d in photo_dirs),
    }
    notes = {m: note for m, (_, note) in graphs.items()}
    return report(results, engines, notes, info)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    from engines.quantize import METHODS

    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    split = lambda s: [x for x in s.split(",") if x]  # noqa: E731
    parser.add_argument("--sets", type=split, default=list(DEFAULT_SETS))
    parser.add_argument("--limit", type=int, help="first N images of each set")
    parser.add_argument("--methods", type=split, default=list(METHODS))
    parser.add_argument("--calib-photos", type=Path, nargs="+", help="calibration folders")
    parser.add_argument("--per-folder", type=int, default=64)
    parser.add_argument("--eval-dir", type=Path, default=Path("../shared/eval"))
    parser.add_argument("--out", type=Path)
    parser.add_argument("--config", help="heatcrop settings TOML (default: $HEATCROP_CONFIG)")
    parser.add_argument("--quiet", action="store_true")
    args = parser.parse_args(argv)
    if any(m not in METHODS for m in args.methods):
        parser.error(f"--methods must be among {METHODS}")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    text = run(args)
    publish(text, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
