"""Where a cold crop's milliseconds go, and what each alternative would change.

    python -m bench.cold_path [--photos 40] [--dir ../shared/eval/fcdb_dev/images]
        [--rounds 3] [--out bench/results/cold_path.md]

Three tables, every row timed in the same run, photo by photo in a rotating order (the
machine is shared: a burst of load elsewhere hits every row alike), best round's median:

1. decode: the service's ``decode`` against its parts and against other ways to the same
   pixels (pyvips' header alone; ``thumbnail_buffer`` with and without ``fail_on``; a JPEG
   loaded at its DCT shrink and resized, sequential or random access; the DCT shrink alone,
   a lower bound). Each row's pixels are compared with the service's (mean and largest
   absolute difference): a faster decode that feeds the model other pixels changes the
   heatmaps and needs the quality benchmark again.
2. ONNX Runtime: the INT8 and FP32 graphs under session options (graph optimisation level,
   threads, memory arena), on the decoded photos; and capacity, one session of 2 threads
   serving photos one after another against two sessions of 1 thread serving in parallel.
3. the search's preparation (blend, upsample, blur) and the search for one aspect.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import threading
import time
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import numpy.typing as npt
import onnxruntime as ort
import pyvips

from engines.base import INPUT_NAME, OUTPUT_NAMES
from engines.buckets import bucket_for
from engines.pixels import model_pixels, open_header
from sidecar import settings as settings_mod
from sidecar.core import CropCore
from sidecar.decode import configure_vips, decode
from training.data import publish

Pixels = npt.NDArray[np.uint8]
LIMITS = {"max_bytes": 50 * 1024 * 1024, "max_pixels": 100_000_000}


def rotating(fns: dict[str, Callable[[int], object]], count: int, rounds: int) -> dict[str, float]:
    """{name: median ms of its best round}; ``fns[name](i)`` handles item i."""
    names = list(fns)
    for name in names:
        fns[name](0)
    best = dict.fromkeys(names, float("inf"))
    for r in range(rounds):
        times: dict[str, list[float]] = {n: [] for n in names}
        for i in range(count):
            shift = (r + i) % len(names)
            for name in names[shift:] + names[:shift]:
                t0 = time.perf_counter()
                fns[name](i)
                times[name].append((time.perf_counter() - t0) * 1e3)
        for name in names:
            best[name] = min(best[name], statistics.median(times[name]))
    return best


def _shrink_resize(data: bytes, bucket: tuple[int, int], access: str) -> Pixels:
    """A JPEG at its largest DCT shrink that stays >= the bucket, then resized to it."""
    height, width = bucket
    header = pyvips.Image.new_from_buffer(data, "")
    factor = min(header.width / width, header.height / height)
    shrink = max(s for s in (1, 2, 4, 8) if s <= factor)
    image = pyvips.Image.new_from_buffer(
        data, "fail_on=error", shrink=shrink, access=access
    ).autorot()
    image = image.resize(width / image.width, vscale=height / image.height)
    return np.asarray(image.numpy(), dtype=np.uint8)


def decode_rows(photos: Sequence[bytes], rounds: int) -> list[str]:
    headers = [open_header(d) for d in photos]
    buckets = [bucket_for(h.width, h.height) for h in headers]
    shipped = [decode(d, **LIMITS).pixels for d in photos]

    def thumbnail(option_string: str) -> Callable[[int], Pixels]:
        def run(i: int) -> Pixels:
            height, width = buckets[i]
            image = pyvips.Image.thumbnail_buffer(
                photos[i], width, height=height, size="force", option_string=option_string
            )
            return np.asarray(image.numpy(), dtype=np.uint8)

        return run

    def shrink_only(i: int) -> Pixels:
        height, width = buckets[i]
        header = headers[i]
        factor = min(header.width / width, header.height / height)
        shrink = max(s for s in (1, 2, 4, 8) if s <= factor)
        return np.asarray(pyvips.Image.jpegload_buffer(photos[i], shrink=shrink).numpy())

    variants: dict[str, Callable[[int], object]] = {
        "service `decode` (sniff, header, limits, thumbnail, sRGB, numpy)": lambda i: (
            decode(photos[i], **LIMITS).pixels
        ),
        "`model_pixels` alone (thumbnail fail_on=error + sRGB + numpy)": lambda i: model_pixels(
            photos[i], headers[i], buckets[i]
        ),
        "header only (`new_from_buffer`, sequential)": lambda i: open_header(photos[i]).width,
        "thumbnail, no fail_on": thumbnail(""),
        "JPEG at DCT shrink + resize, sequential": lambda i: _shrink_resize(
            photos[i], buckets[i], "sequential"
        ),
        "JPEG at DCT shrink + resize, random access": lambda i: _shrink_resize(
            photos[i], buckets[i], "random"
        ),
        "JPEG at DCT shrink only (not the bucket's size: lower bound)": shrink_only,
        "libvips attention 400x300 (the baseline)": lambda i: pyvips.Image.thumbnail_buffer(
            photos[i], 400, height=300, crop="attention"
        ).avg(),
    }
    best = rotating(variants, len(photos), rounds)
    rows = []
    for name, fn in variants.items():
        diff = "—"
        out = fn(0)
        if isinstance(out, np.ndarray) and out.shape == shipped[0].shape:
            d = [
                np.abs(fn(i).astype(np.int16) - shipped[i].astype(np.int16))  # type: ignore[union-attr]
                for i in range(len(photos))
            ]
            diff = f"{np.mean([x.mean() for x in d]):.2f} / {max(int(x.max()) for x in d)}"
        rows.append(f"| {name} | {best[name]:.2f} | {diff} |")
    return [
        "## Decode: the service's pipeline, its parts, and alternatives",
        "",
        "| variant | ms/photo (median) | pixels vs service's (mean / max abs diff) |",
        "|---|---:|---:|",
        *rows,
        "",
    ]


def _session(path: Path, threads: int, level: str = "all", arena: bool = True) -> Callable:
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = {
        "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
        "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
        "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
    }[level]
    options.enable_cpu_mem_arena = arena
    options.use_deterministic_compute = True
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.log_severity_level = 3
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return lambda x: session.run(list(OUTPUT_NAMES), {INPUT_NAME: x})


def ort_rows(graphs: dict[str, Path], inputs: Sequence[Pixels], rounds: int) -> list[str]:
    variants: dict[str, Callable[[int], object]] = {}
    for precision, path in graphs.items():
        for label, kwargs in (
            ("2 threads, all optimisations (shipped)", {"threads": 2}),
            ("2 threads, extended", {"threads": 2, "level": "extended"}),
            ("2 threads, basic", {"threads": 2, "level": "basic"}),
            ("2 threads, no memory arena", {"threads": 2, "arena": False}),
            ("1 thread", {"threads": 1}),
        ):
            run = _session(path, **kwargs)  # type: ignore[arg-type]
            variants[f"{precision}, {label}"] = lambda i, run=run: run(inputs[i])
    best = rotating(variants, len(inputs), rounds)
    rows = [f"| {name} | {ms:.2f} |" for name, ms in best.items()]
    rows += [
        f"| {precision}, capacity: {label} | {rate:.1f} photos/s |"
        for precision, path in graphs.items()
        for label, rate in capacity(path, inputs).items()
    ]
    return [
        "## ONNX Runtime: session options (decoded photos, batch 1)",
        "",
        "| graph, options | ms/photo (median) |",
        "|---|---:|",
        *rows,
        "",
    ]


def capacity(path: Path, inputs: Sequence[Pixels], seconds: float = 4.0) -> dict[str, float]:
    """Photos per second: one 2-thread session serving one photo after another, against two
    1-thread sessions serving in parallel (how the service could use 2 cores instead)."""
    out = {}
    for label, sessions in (
        ("one session x 2 threads", [_session(path, 2)]),
        ("two sessions x 1 thread, in parallel", [_session(path, 1), _session(path, 1)]),
    ):
        for run in sessions:
            run(inputs[0])
        done = [0] * len(sessions)
        stop = time.perf_counter() + seconds
        t0 = time.perf_counter()
        workers = [
            threading.Thread(target=_serve, args=(run, inputs, k, len(sessions), stop, done))
            for k, run in enumerate(sessions)
        ]
        for w in workers:
            w.start()
        for w in workers:
            w.join()
        out[label] = sum(done) / (time.perf_counter() - t0)
    return out


def _serve(
    run: Callable, inputs: Sequence[Pixels], k: int, step: int, stop: float, done: list[int]
) -> None:
    """Worker ``k`` of ``step``: its share of the photos, round and round, until ``stop``."""
    i = k
    while time.perf_counter() < stop:
        run(inputs[i % len(inputs)])
        done[k] += 1
        i += step


def search_rows(core: CropCore, photos: Sequence[bytes], rounds: int) -> list[str]:
    analyses = [core.analyse(d) for d in photos]
    variants: dict[str, Callable[[int], object]] = {
        "prepare the map (blend, upsample, blur)": lambda i: core.prepared(analyses[i]),
        "prepare + search, one aspect (4:3)": lambda i: core.box(analyses[i], 4 / 3),
    }
    best = rotating(variants, len(analyses), rounds)
    return [
        "## Search (the service's kernel settings)",
        "",
        "| step | ms/photo (median) |",
        "|---|---:|",
        *[f"| {n} | {ms:.3f} |" for n, ms in best.items()],
        "",
    ]


def main(argv: Sequence[str] | None = None) -> int:
    from engines.loader import load_engine
    from engines.model import find_int8_model, find_model, read_manifest

    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--photos", type=int, default=40)
    parser.add_argument("--dir", type=Path, default=Path("../shared/eval/fcdb_dev/images"))
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    configure_vips()
    photos = [p.read_bytes() for p in sorted(args.dir.glob("*.jpg"))[: args.photos]]
    if not photos:
        sys.exit(f"no photos in {args.dir}")
    settings = settings_mod.load()
    model_dir = Path(settings.engine.model_dir)
    fp32 = find_model(model_dir)
    graphs = {
        "INT8": find_int8_model(model_dir, str(read_manifest(model_dir)["sha256"])),
        "FP32": fp32,
    }
    inputs = [decode(d, **LIMITS).pixels[np.newaxis] for d in photos]
    lines = [
        f"# Cold path, stage by stage ({datetime.now(UTC):%Y-%m-%d %H:%M} UTC)",
        "",
        f"{len(photos)} photos from `{args.dir}`, best of {args.rounds} rounds; "
        f"libvips {'.'.join(str(pyvips.version(i)) for i in range(3))}, "
        f"onnxruntime {ort.__version__}; `python -m bench.cold_path`.",
        "",
    ]
    lines += decode_rows(photos, args.rounds)
    lines += ort_rows(graphs, inputs, args.rounds)
    core = CropCore.from_settings(settings, load_engine(settings.engine))
    lines += search_rows(core, photos, args.rounds)
    text = "\n".join(lines) + "\n"
    publish(text, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
