"""Smaller input buckets and cheaper decodes against today's, paired per photo (issue 25).

    python -m bench.bucket timing [--sets fcdb_dev] [--limit N] [--variants a,b,...]
        [--rounds 2] [--out bench/results/bucket_timing.md]
    python -m bench.bucket quality [--sets fcdb_dev,food_dev,...] [--limit N]
        [--variants a,b,...] [--out bench/results/bucket_quality.md] [--json PATH]

A variant is a short side (224 the native; long sides scaled alike, multiples of 32 from the
short side to twice it, engines.buckets.long_sides) and a decode: ``thumb`` is libvips'
thumbnail (the service's decode before issue 25: its shrink-on-load keeps a factor of 2 for the
last resize); ``dct`` loads a JPEG at the largest libjpeg DCT shrink (1/2, 1/4, 1/8) that keeps
the bucket's size and resizes the rest (engines/pixels.model_pixels since issue 25, pixel for
pixel); ``under`` lets the DCT shrink undershoot the bucket down to half its sides and
upsamples the remainder. ``-linear`` swaps the last resize's Lanczos-3 kernel for a linear one.
Names read ``<short>-<decode>[-linear]``, e.g. ``192-thumb``, ``224-dct-linear``. Non-JPEGs,
JPEGs whose profile needs a colour transform and CMYK JPEGs take the thumbnail in every
variant.

``timing``: per photo, the variants in a rotating order, each decoded (header and pixels, one
libvips thread, as the service), the FP32 CNN run alone on the result (ONNX Runtime, the
settings' threads) and the face detector alone: medians and paired ratios against the first
variant, wall and CPU.

``quality``: bench.quality's protocol with one heatcrop row per variant (the service's profile,
faces as the settings say, the face detector on the variant's own pixels), the centre and
oracle rows, each row's headroom share and its paired difference against the first variant with
a 95 % bootstrap interval over photos; also the model's agreement with the first variant (the
correlation of the prepared map the search sees, brought to the first variant's grid, and the
boxes' IoU). The read-out was fitted on 224-bucket features: a smaller bucket is judged on
features it was not fitted on. It was also fitted on every dev set but fcdb_dev (in-sample
there for every variant); the held-out maps of bench.quality exist only on the 224 grid, so
these rows use the shipped read-out.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pyvips

from bench.quality import (
    CENTRE,
    CentreMethod,
    HeatcropMethod,
    ImageContext,
    Method,
    OracleMethod,
    SetResult,
    evaluate,
    git_describe,
    headroom_interval,
    headroom_share,
    to_json,
)
from engines.buckets import STRIDE, all_buckets, bucket_for
from engines.pixels import _to_rgb8, jpeg_pixels, needs_colour_transform, open_header, plain_jpeg
from training.data import Box, EvalSet, iou, load_set, publish

DECODES = ("thumb", "dct", "under")
KERNELS = ("lanczos3", "linear")
# ``under``: the DCT shrink may leave each side down to this share of the bucket's.
UNDERSHOOT = 0.5
_TRANSPOSING = frozenset((5, 6, 7, 8))
BOOTSTRAP_DRAWS = 2000
# crowd_train's face counts: shares of crops that slice a face, lower is better, no headroom.
RAW_METRICS = frozenset(("sliced", "noticed"))
DEFAULT_VARIANTS = "224-thumb,192-thumb,160-thumb,224-dct,224-dct-linear,224-under-linear"


@dataclass(frozen=True)
class Variant:
    short: int
    decode: str
    kernel: str = "lanczos3"

    @classmethod
    def parse(cls, name: str) -> Variant:
        parts = name.split("-")
        if len(parts) not in (2, 3) or not parts[0].isdigit() or parts[1] not in DECODES:
            raise ValueError(f"variant {name!r}: want <short>-<{'|'.join(DECODES)}>[-linear]")
        kernel = "linear" if parts[2:] == ["linear"] else "lanczos3"
        if len(parts) == 3 and parts[2] != "linear":
            raise ValueError(f"variant {name!r}: only -linear may follow the decode")
        short = int(parts[0])
        if short <= 0 or short % STRIDE:
            raise ValueError(f"variant {name!r}: short side must be a positive multiple of 32")
        if parts[1] == "thumb" and kernel != "lanczos3":
            raise ValueError(f"variant {name!r}: the thumbnail's kernel is not ours to change")
        return cls(short, parts[1], kernel)

    @property
    def name(self) -> str:
        return f"{self.short}-{self.decode}" + ("-linear" if self.kernel == "linear" else "")

    def buckets(self) -> tuple[tuple[int, int], ...]:
        return all_buckets(self.short)

    def bucket_for(self, width: int, height: int) -> tuple[int, int]:
        return bucket_for(width, height, self.short)


@dataclass(frozen=True)
class Decoded:
    pixels: npt.NDArray[np.uint8]
    width: int
    height: int
    format: str
    shrink: int  # the JPEG DCT shrink used; 0 where today's decode ran


def decode(data: bytes, variant: Variant) -> Decoded:
    """``data`` at the variant's bucket, by the variant's decode."""
    header = open_header(data)
    orientation = header.get("orientation") if header.get_typeof("orientation") else 1
    width, height = header.width, header.height
    if orientation in _TRANSPOSING:
        width, height = height, width
    bucket = variant.bucket_for(width, height)
    if variant.decode == "thumb" or not plain_jpeg(header, needs_colour_transform(header)):
        return Decoded(_thumbnail(data, header, bucket), width, height, "thumb", 0)
    pixels, shrink = _dct_pixels(data, header, bucket, variant)
    return Decoded(pixels, width, height, "jpeg", shrink)


def _thumbnail(data: bytes, header: pyvips.Image, bucket: tuple[int, int]) -> npt.NDArray[np.uint8]:
    """The service's pixels before issue 25: libvips' thumbnail for every format."""
    height, width = bucket
    colour = {"export_profile": "srgb"} if needs_colour_transform(header) else {}
    image = pyvips.Image.thumbnail_buffer(
        data, width, height=height, size="force", option_string="fail_on=error", **colour
    )
    image = _to_rgb8(image)
    return np.ascontiguousarray(image.numpy(), dtype=np.uint8).reshape(height, width, 3)


def _dct_pixels(
    data: bytes, header: pyvips.Image, bucket: tuple[int, int], v: Variant
) -> tuple[npt.NDArray[np.uint8], int]:
    height, width = bucket
    floor = 1.0 if v.decode == "dct" else UNDERSHOOT
    image, shrink = jpeg_pixels(data, header, bucket, floor=floor, kernel=v.kernel)
    image = _to_rgb8(image)
    if (image.height, image.width) != bucket:
        raise ValueError(f"decoded to {image.width}x{image.height}, wanted {bucket}")
    out = np.ascontiguousarray(image.numpy(), dtype=np.uint8).reshape(height, width, 3)
    return out, shrink


# --- the engine and the crop core, per variant ------------------------------------------


def engines(settings: Any, variants: Sequence[Variant]) -> tuple[Any, Any, str]:
    """The FP32 ONNX Runtime engine taking every variant's buckets, the face detector (None
    when faces are off) and a line describing them."""
    from engines.faces import FaceDetector
    from engines.model import find_model
    from engines.ort import OrtEngine
    from sidecar.faces import face_params

    shapes = sorted({b for v in variants for b in v.buckets()})
    model = find_model(settings.engine.model_dir)
    engine = OrtEngine(model, threads=settings.engine.threads, shapes=shapes)
    detector = None
    if settings.kernel.faces:
        detector = FaceDetector(settings.engine.model_dir, face_params(settings))
    line = (
        f"ONNX Runtime FP32 {model.name} ({settings.engine.threads} threads; "
        f"ort_precision=auto picks FP32 on a CPU without int8 dot products), face detector "
        f"{detector.version if detector else 'off'}"
    )
    return engine, detector, line


class VariantCore:
    """CropCore's analyse with the variant's decode; everything else is CropCore's."""

    def __init__(self, core: Any, variant: Variant) -> None:
        self.core = core
        self.variant = variant

    def analyse(self, data: bytes) -> Any:
        from sidecar.core import make_analysis

        t0 = time.perf_counter()
        decoded = decode(data, self.variant)
        t1 = time.perf_counter()
        out = self.core.engine.infer(decoded.pixels[np.newaxis])
        t2 = time.perf_counter()
        timings = {"decode": (t1 - t0) * 1e3, "infer": (t2 - t1) * 1e3}
        faces = out.faces[0] if out.faces else None
        version = f"{self.core.engine.version}-{self.variant.name}"
        return make_analysis(decoded, out.heatmaps[0], out.food_mass[0], version, timings, faces)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.core, name)


@dataclass
class Seen:
    """Per photo of a variant: the prepared map and the boxes, for the agreement."""

    maps: dict[str, npt.NDArray[np.float32]] = field(default_factory=dict)
    boxes: dict[str, list[Box]] = field(default_factory=dict)
    ms: dict[str, dict[str, float]] = field(default_factory=dict)


class VariantMethod(HeatcropMethod):
    def __init__(self, core: Any, profile: str, variant: Variant) -> None:
        super().__init__(VariantCore(core, variant), profile, False)
        self.variant = variant
        self.name = f"heatcrop {variant.name}"
        self.seen = Seen()

    def boxes(self, ctx: ImageContext, aspects: Sequence[float]) -> list[Box]:
        key = f"analyse {self.variant.name}"
        analysis = ctx.memo(key, lambda: self.core.analyse(ctx.data))
        head = self.heads.get(ctx.item.name)
        out = [Box.of(self.core.box(analysis, a, self.profile, head_box=head)) for a in aspects]
        name = f"{self.set_name}/{ctx.item.name}"
        self.seen.maps[name] = self.core.prepared(analysis, self.profile)
        self.seen.boxes[name] = out
        self.seen.ms[name] = dict(analysis.timings_ms)
        return out

    def notes(self) -> str:
        return ""


# --- paired comparison ------------------------------------------------------------------


def share_difference(
    result: SetResult, method: str, reference: str, metric: str, seed: int = 0
) -> tuple[float, float, float]:
    """(share of ``method`` − share of ``reference``, 95 % interval) of the centre → oracle
    headroom, by a paired bootstrap over photos (the same photos in both shares of a draw)."""
    m, r, c, o = (
        result.per_image(n, metric) for n in (method, reference, CENTRE, OracleMethod.name)
    )
    room = o.mean() - c.mean()
    if abs(room) < 1e-12:
        return float("nan"), float("nan"), float("nan")
    point = (m.mean() - r.mean()) / room
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(m), (BOOTSTRAP_DRAWS, len(m)))
    rooms = o[idx].mean(axis=1) - c[idx].mean(axis=1)
    diffs = (m[idx].mean(axis=1) - r[idx].mean(axis=1)) / np.where(rooms == 0, np.nan, rooms)
    lo, hi = np.nanpercentile(diffs, [2.5, 97.5])
    return float(point), float(lo), float(hi)


def raw_difference(
    result: SetResult, method: str, reference: str, metric: str, seed: int = 0
) -> tuple[float, float, float]:
    """(mean of ``method`` − mean of ``reference``, 95 % interval), paired over photos."""
    diff = result.per_image(method, metric) - result.per_image(reference, metric)
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(diff), (BOOTSTRAP_DRAWS, len(diff)))
    lo, hi = np.percentile(diff[idx].mean(axis=1), [2.5, 97.5])
    return float(diff.mean()), float(lo), float(hi)


def resized(grid: npt.NDArray[np.float32], shape: tuple[int, int]) -> npt.NDArray[np.float32]:
    """Bilinear resize of a map, cell centres aligned (both grids cover the same photo)."""
    out = grid.astype(np.float64)
    for axis, n in enumerate(shape):
        old = out.shape[axis]
        at = (np.arange(n) + 0.5) * old / n - 0.5
        grid_at = np.arange(old)
        out = np.apply_along_axis(
            lambda row, at=at, grid_at=grid_at: np.interp(at, grid_at, row), axis, out
        )
    return out.astype(np.float32)


def correlation(a: npt.NDArray[np.float32], b: npt.NDArray[np.float32]) -> float:
    x, y = a.ravel().astype(np.float64), b.ravel().astype(np.float64)
    if x.std() == 0 or y.std() == 0:
        return 1.0 if np.allclose(x, y) else 0.0
    return float(np.corrcoef(x, y)[0, 1])


def agreement(ref: Seen, other: Seen, prefix: str) -> tuple[float, float, float, float]:
    """(mean map r, lowest map r, mean box IoU, share of boxes with IoU >= 0.9) over a set."""
    names = [n for n in ref.maps if n.startswith(prefix)]
    rs = [correlation(ref.maps[n], resized(other.maps[n], ref.maps[n].shape)) for n in names]
    ious = [iou(a, b) for n in names for a, b in zip(ref.boxes[n], other.boxes[n], strict=True)]
    return (
        float(np.mean(rs)),
        float(np.min(rs)),
        float(np.mean(ious)),
        float(np.mean(np.array(ious) >= 0.9)),
    )


def quality_report(
    results: Sequence[SetResult], methods: Sequence[VariantMethod], info: dict[str, Any]
) -> str:
    ref = methods[0]
    lines = [
        f"## Quality, paired against {ref.variant.name} ({info['date']})",
        "",
        "Headroom share: (method − centre) / (oracle − centre) of each protocol metric, mean over "
        "the set's aspects, 95 % bootstrap interval over photos; Δ: the paired difference of the "
        f"share against {ref.variant.name} in points (the same photos in both, bootstrap over "
        "photos). Faces sliced and noticed sliced: the share of crops that slice a face (lower "
        "is better), Δ in points of crops. Inside the noise: no loss whose 95 % interval "
        "excludes 0.",
        "",
        "| set | photos | variant | metric | share | share 95 % | Δ share | Δ 95 % | Δ inside the "
        "noise |",
        "|---|---:|---|---|---:|---:|---:|---:|---|",
    ]
    for result in results:
        for method in methods:
            for metric in result.eval_set.protocol.metrics:
                lines.append(quality_row(result, method, ref, metric))
    lines += ["", agreement_table(results, methods), "", ms_table(results, methods)]
    return "\n".join(lines)


def quality_row(result: SetResult, method: VariantMethod, ref: VariantMethod, metric: Any) -> str:
    """One row: a headroom share, or for the faces-sliced counts (lower is better, no
    headroom) the share of crops itself; Δ paired against the reference."""
    raw = metric.key in RAW_METRICS
    if raw:
        value = f"{100 * result.mean(method.name, metric.key):.1f} % of crops"
        span = "—"
    else:
        lo, hi = headroom_interval(result, method.name, metric.key)
        value = f"{100 * headroom_share(result, method.name, metric.key, None):.1f} %"
        span = f"{100 * lo:.1f}–{100 * hi:.1f}"
    delta = band = verdict = "—"
    if method is not ref:
        difference = raw_difference if raw else share_difference
        d, dlo, dhi = difference(result, method.name, ref.name, metric.key)
        delta, band = f"{100 * d:+.1f}", f"{100 * dlo:+.1f} to {100 * dhi:+.1f}"
        # A loss: a share significantly lower, a sliced count significantly higher.
        worse = dlo > 0 if raw else dhi < 0
        verdict = "**no**" if worse else "yes"
    return (
        f"| {result.eval_set.name} | {result.n_images} | {method.variant.name} | {metric.title} "
        f"| {value} | {span} | {delta} | {band} | {verdict} |"
    )


def agreement_table(results: Sequence[SetResult], methods: Sequence[VariantMethod]) -> str:
    ref = methods[0]
    lines = [
        f"Agreement with {ref.variant.name}: the prepared map the search sees (the other's "
        "brought to its grid, bilinear), and the boxes (every aspect of the protocol, the face "
        "rule included).",
        "",
        "| set | variant | map r mean | map r lowest | box IoU mean | IoU ≥ 0.9 |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for result in results:
        prefix = f"{result.eval_set.name}/"
        for method in methods[1:]:
            r, rmin, mean_iou, close = agreement(ref.seen, method.seen, prefix)
            lines.append(
                f"| {result.eval_set.name} | {method.variant.name} | {r:.4f} | {rmin:.3f} | "
                f"{mean_iou:.3f} | {close:.1%} |"
            )
    return "\n".join(lines)


def ms_table(results: Sequence[SetResult], methods: Sequence[VariantMethod]) -> str:
    lines = [
        "Wall ms per photo inside this run (decode; engine call = CNN + face detector), in the "
        "rows' fixed order per photo under whatever load there was: `timing` is the measure.",
        "",
        "| set | variant | decode median | engine call median |",
        "|---|---|---:|---:|",
    ]
    for result in results:
        prefix = f"{result.eval_set.name}/"
        for method in methods:
            ms = [v for n, v in method.seen.ms.items() if n.startswith(prefix)]
            decode_ms = np.median([m["decode"] for m in ms])
            infer_ms = np.median([m["infer"] for m in ms])
            lines.append(
                f"| {result.eval_set.name} | {method.variant.name} | {decode_ms:.2f} | "
                f"{infer_ms:.2f} |"
            )
    return "\n".join(lines)


def run_quality(args: argparse.Namespace, variants: Sequence[Variant]) -> str:
    from sidecar import settings as settings_mod
    from sidecar.core import CropCore
    from sidecar.decode import configure_vips

    configure_vips()
    settings = settings_mod.load(args.config)
    engine, detector, line = engines(settings, variants)
    if detector is not None:
        from engines.face_engine import FaceEngine

        engine = FaceEngine(engine, detector, None)
    core = CropCore(engine, settings.kernel, settings.source, settings.engine.profile)
    rows = [VariantMethod(core, settings.engine.profile, v) for v in variants]
    methods: list[Method] = [CentreMethod(), OracleMethod(), *rows]
    sets = [load_set(args.eval_dir, name, args.limit) for name in args.sets]
    before = load_line()
    t0 = time.perf_counter()
    warm(sets, methods)
    results = [evaluate(s, methods, progress=not args.quiet) for s in sets]
    info = {"date": f"{datetime.now(UTC):%Y-%m-%d %H:%M} UTC", "engine": line}
    if args.json is not None:
        args.json.write_text(json.dumps(to_json(results, info)))
    head = header(args, results, line, before, time.perf_counter() - t0)
    return head + "\n\n" + quality_report(results, rows, info)


def warm(sets: Sequence[EvalSet], methods: Sequence[Method]) -> None:
    item = next((s.items[0] for s in sets if s.items), None)
    if item is not None:
        for method in methods:
            method.boxes(ImageContext(item), [1.0])
            method.reset()
        for method in methods:
            if isinstance(method, VariantMethod):
                method.seen = Seen()


def header(
    args: argparse.Namespace, results: Sequence[SetResult], line: str, before: str, secs: float
) -> str:
    counts = ", ".join(f"{r.eval_set.name} {r.n_images}" for r in results)
    argv = " ".join(sys.argv[1:])
    return "\n".join(
        [
            f"# Input bucket and decode variants, paired ({datetime.now(UTC):%Y-%m-%d %H:%M} UTC)",
            "",
            f"- command: `python -m bench.bucket {argv}`",
            f"- commit: {git_describe()}; {os.cpu_count()} cores",
            f"- photos: {counts}",
            f"- engine: {line}",
            f"- load before: {before}; after: {load_line()}; runtime {secs:.0f} s",
            "- the read-out was fitted on 224-bucket features, and on every set here but "
            "fcdb_dev (in-sample there for every variant)",
        ]
    )


def load_line() -> str:
    one, five, fifteen = os.getloadavg()
    return f"{datetime.now(UTC):%H:%M:%S} UTC load {one:.2f}, {five:.2f}, {fifteen:.2f}"


# --- timing -------------------------------------------------------------------------------


@dataclass
class Times:
    decode: list[float] = field(default_factory=list)
    decode_cpu: list[float] = field(default_factory=list)
    cnn: list[float] = field(default_factory=list)
    cnn_cpu: list[float] = field(default_factory=list)
    faces: list[float] = field(default_factory=list)
    shrinks: list[int] = field(default_factory=list)


def time_one(data: bytes, v: Variant, engine: Any, detector: Any, into: Times) -> None:
    w0, c0 = time.perf_counter(), time.process_time()
    decoded = decode(data, v)
    w1, c1 = time.perf_counter(), time.process_time()
    batch = decoded.pixels[np.newaxis]
    engine.infer(batch)
    w2, p2 = time.perf_counter(), time.process_time()
    if detector is not None:
        detector.detect_batch(batch)
    w3 = time.perf_counter()
    into.decode.append(1e3 * (w1 - w0))
    into.decode_cpu.append(1e3 * (c1 - c0))
    into.cnn.append(1e3 * (w2 - w1))
    into.cnn_cpu.append(1e3 * (p2 - c1))
    into.faces.append(1e3 * (w3 - w2))
    into.shrinks.append(decoded.shrink)


def run_timing(args: argparse.Namespace, variants: Sequence[Variant]) -> str:
    from sidecar import settings as settings_mod
    from sidecar.decode import configure_vips

    configure_vips()
    settings = settings_mod.load(args.config)
    engine, detector, line = engines(settings, variants)
    engine.warm_up()
    paths = [i.path for s in args.sets for i in load_set(args.eval_dir, s, args.limit).items]
    photos = [p.read_bytes() for p in paths]
    times = {v.name: Times() for v in variants}
    for v in variants:  # warm each bucket's first call and the detector
        time_one(photos[0], v, engine, detector, Times())
    before = load_line()
    t0 = time.perf_counter()
    for _ in range(args.rounds):
        for i, data in enumerate(photos):
            for k in range(len(variants)):
                v = variants[(i + k) % len(variants)]
                time_one(data, v, engine, detector, times[v.name])
    secs = time.perf_counter() - t0
    counts = f"{len(photos)} photos of {', '.join(args.sets)} x {args.rounds} rounds"
    head = [
        f"# Input bucket and decode variants: time per photo ({datetime.now(UTC):%Y-%m-%d %H:%M}"
        " UTC)",
        "",
        f"- command: `python -m bench.bucket {' '.join(sys.argv[1:])}`",
        f"- commit: {git_describe()}; {os.cpu_count()} cores; libvips concurrency 1",
        f"- photos: {counts}, variants in a rotating order photo by photo",
        f"- engine: {line}",
        f"- load before: {before}; after: {load_line()}; runtime {secs:.0f} s",
        "",
    ]
    return "\n".join(head) + timing_table(variants, times)


def timing_table(variants: Sequence[Variant], times: dict[str, Times]) -> str:
    ref = times[variants[0].name]
    lines = [
        "Medians per photo; ratio: the median of the per-photo ratios against "
        f"{variants[0].name} (paired), 95 % bootstrap interval of that median. Decode: header "
        "and pixels at libvips concurrency 1 (wall; CPU of the process). CNN: the FP32 graph alone "
        "(wall; CPU of the process, both ORT threads). Faces: the detector alone on the same "
        "pixels (wall). DCT shrinks: photos decoded at 1/1, 1/2, 1/4, 1/8 (0: today's decode).",
        "",
        "| variant | decode ms | decode CPU ms | decode ratio | CNN ms | CNN CPU ms | CNN ratio "
        "| faces ms | decode + CNN + faces ms | DCT shrinks 0/1/2/4/8 |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for v in variants:
        t = times[v.name]
        total = np.array(t.decode) + np.array(t.cnn) + np.array(t.faces)
        shrinks = "/".join(str(t.shrinks.count(s)) for s in (0, 1, 2, 4, 8))
        lines.append(
            f"| {v.name} | {np.median(t.decode):.2f} | {np.median(t.decode_cpu):.2f} | "
            f"{paired_ratio(t.decode, ref.decode)} | {np.median(t.cnn):.2f} | "
            f"{np.median(t.cnn_cpu):.2f} | {paired_ratio(t.cnn, ref.cnn)} | "
            f"{np.median(t.faces):.2f} | {np.median(total):.2f} | {shrinks} |"
        )
    return "\n".join(lines) + "\n"


def paired_ratio(values: Sequence[float], reference: Sequence[float], seed: int = 0) -> str:
    ratio = np.array(values) / np.array(reference)
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(ratio), (BOOTSTRAP_DRAWS, len(ratio)))
    lo, hi = np.percentile(np.median(ratio[idx], axis=1), [2.5, 97.5])
    return f"{np.median(ratio):.3f} ({lo:.3f}–{hi:.3f})"


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("mode", choices=("timing", "quality"))
    parser.add_argument("--sets", type=lambda s: s.split(","), default=None)
    parser.add_argument("--limit", type=int, help="first N photos of each set")
    parser.add_argument("--variants", default=DEFAULT_VARIANTS, help="the first is the reference")
    parser.add_argument("--rounds", type=int, default=2, help="timing: passes over the photos")
    parser.add_argument("--eval-dir", type=Path, default=Path("../shared/eval"))
    parser.add_argument("--out", type=Path, help="write the markdown report here")
    parser.add_argument("--json", type=Path, help="quality: bench.quality's per-photo JSON")
    parser.add_argument("--config", help="heatcrop settings TOML (default: $HEATCROP_CONFIG)")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    args = parser.parse_args(argv)
    if args.sets is None:
        args.sets = (
            ["fcdb_dev"]
            if args.mode == "timing"
            else ["fcdb_dev", "food_dev", "saliency_dev", "osie_train", "crowd_train"]
        )
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    variants = [Variant.parse(n) for n in args.variants.split(",")]
    if len({v.name for v in variants}) != len(variants):
        raise SystemExit("variants must differ")
    text = run_timing(args, variants) if args.mode == "timing" else run_quality(args, variants)
    publish(text, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
