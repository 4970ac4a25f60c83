"""GPU throughput and latency of the TensorRT engine, against ONNX Runtime in the same run.

    python -m bench.gpu [--precisions fp16,int8,fp32] [--batches 1,8,64,256]
                        [--seconds 3] [--photos 512] [--out bench/results/gpu.md]

1. Heatmaps/s and latency (p50, p99) of one engine call at each batch size, per precision,
   on the 224x224 bucket, with plans built for it (batch 1..max of --batches) into
   build/bench-engines by engines/build_trt.py (reused when current; INT8 is calibrated on
   the photos). Host-to-device copy of the uint8 input and the copy-out are included.
2. Baseline: ONNX Runtime on all CPU cores, batch 8, same bucket, same run.
3. End to end: the photos decoded by sidecar/decode.py in a pool of one thread per core and
   inferred in batches of 64 (fp16) as they come, against decode alone with the same pool:
   when the two rates are close, decoding and not the GPU is the limit.

Without a CUDA GPU, TensorRT and pycuda it measures nothing: it prints
"GPU figures: not measured (<why>)" and exits with status 1.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import numpy.typing as npt

from engines.plans import Machine, Probe, Unavailable, detect_machine
from training.data import publish

if TYPE_CHECKING:
    from engines.trt import TrtEngine

BUCKET = (224, 224)
DEFAULT_PHOTOS = Path("../shared/eval/fcdb_dev/images")
PLAN_DIR = Path("build/bench-engines")
E2E_BATCH = 64
ORT_BATCH = 8


def rates(latencies_s: Sequence[float], batch: int) -> tuple[float, float, float]:
    """(heatmaps/s, p50 ms, p99 ms) of back-to-back calls of ``batch`` images."""
    if not latencies_s:
        raise ValueError("no calls measured")
    ordered = sorted(latencies_s)
    p99 = ordered[min(len(ordered) - 1, round(0.99 * (len(ordered) - 1)))]
    return batch * len(ordered) / sum(ordered), statistics.median(ordered) * 1e3, p99 * 1e3


def time_calls(
    call: Callable[[], object], seconds: float, min_calls: int = 20, warm: int = 3
) -> list[float]:
    """Seconds per call, calling back to back for about ``seconds`` after ``warm`` calls."""
    for _ in range(warm):
        call()
    out: list[float] = []
    end = time.perf_counter() + seconds
    while len(out) < min_calls or time.perf_counter() < end:
        t0 = time.perf_counter()
        call()
        out.append(time.perf_counter() - t0)
    return out


def _batch_of(pixels: list[npt.NDArray[np.uint8]], n: int) -> npt.NDArray[np.uint8]:
    return np.stack([pixels[i % len(pixels)] for i in range(n)])


def _decode(data: bytes) -> npt.NDArray[np.uint8]:
    from sidecar.decode import decode_to

    return decode_to(data, BUCKET, max_bytes=1 << 30, max_pixels=1 << 30).pixels


def _engines(
    machine: Machine, precisions: Sequence[str], max_batch: int, calib_dir: Path
) -> dict[str, TrtEngine | str]:
    """A TrtEngine per precision, or the reason there is none."""
    from engines.build_trt import BuildSpec, build
    from engines.model import read_manifest
    from engines.trt import TrtEngine

    model_dir = Path("build/model")
    digest = str(read_manifest(model_dir)["sha256"])
    out: dict[str, TrtEngine | str] = {}
    for precision in precisions:
        spec = BuildSpec(precision=precision, max_batch=max_batch, buckets=(BUCKET,))
        try:
            outcome = build(
                model_dir,
                PLAN_DIR,
                spec,
                calib_dir=calib_dir if precision == "int8" else None,
                machine=machine,
            )
            out[precision] = TrtEngine(outcome.manifest, machine, digest)
        except Exception as exc:  # a row saying why beats no table at all
            out[precision] = f"not built: {str(exc).splitlines()[0]}"
    return out


def main(argv: Sequence[str] | None = None, probe: Callable[[], Probe] = detect_machine) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--precisions", default="fp16,int8,fp32")
    parser.add_argument("--batches", default="1,8,64,256")
    parser.add_argument("--seconds", type=float, default=3.0, help="per measurement")
    parser.add_argument("--photos", type=int, default=512, help="dev photos for end to end")
    parser.add_argument("--dir", type=Path, default=DEFAULT_PHOTOS)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    machine = probe()
    if isinstance(machine, Unavailable):
        print(f"GPU figures: not measured ({machine.reason})")
        return 1
    precisions = [p.strip() for p in args.precisions.split(",") if p.strip()]
    batches = [int(b) for b in args.batches.split(",")]
    paths = sorted(args.dir.glob("*.jpg"))[: args.photos]
    if not paths:
        print(f"GPU figures: not measured (no photos in {args.dir})")
        return 1
    lines = _measure(machine, precisions, batches, paths, args.seconds)
    text = "\n".join(lines) + "\n"
    publish(text, args.out)
    return 0


def _measure(
    machine: Machine,
    precisions: list[str],
    batches: list[int],
    paths: list[Path],
    seconds: float,
) -> list[str]:
    from engines.model import find_model
    from engines.ort import OrtEngine
    from sidecar.decode import configure_vips

    configure_vips()
    cores = os.cpu_count() or 1
    photos = [p.read_bytes() for p in paths]
    pixels = [_decode(data) for data in photos[:64]]

    ort_engine = OrtEngine(find_model("build/model"), threads=cores, shapes=[BUCKET])
    ort_batch = _batch_of(pixels, ORT_BATCH)
    ort_rate, ort_p50, _ = rates(
        time_calls(lambda: ort_engine.infer(ort_batch), seconds, 5), ORT_BATCH
    )
    ort_engine.close()

    engines = _engines(machine, precisions, max(batches), paths[0].parent)
    lines = [
        f"# heatcrop GPU benchmark ({datetime.now(UTC):%Y-%m-%d %H:%M} UTC)",
        "",
        f"GPU: **{machine.gpu_name}** ({machine.sm}), TensorRT {machine.trt_version}; "
        f"{cores} CPU cores. Bucket {BUCKET[0]}x{BUCKET[1]}, ~{seconds:g} s per row, "
        "times include the uint8 upload and the copy-out.",
        "",
        "| precision | batch | heatmaps/s | p50 ms | p99 ms | × ONNX Runtime CPU |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for precision in precisions:
        engine = engines[precision]
        if isinstance(engine, str):
            lines.append(f"| {precision} | | {engine} | | | |")
            continue
        for n in batches:
            batch = _batch_of(pixels, n)
            rate, p50, p99 = rates(time_calls(lambda e=engine, b=batch: e.infer(b), seconds), n)
            lines.append(
                f"| {precision} | {n} | {rate:,.0f} | {p50:.2f} | {p99:.2f} | "
                f"{rate / ort_rate:.1f} |"
            )
    lines += [
        "",
        f"Baseline: ONNX Runtime CPU, {cores} threads, batch {ORT_BATCH}: "
        f"{ort_rate:,.0f} heatmaps/s (p50 {ort_p50:.1f} ms per call).",
        "",
    ]
    fp16 = engines.get("fp16")
    if fp16 is not None and not isinstance(fp16, str):
        lines += _end_to_end(fp16, photos, cores)
    for engine in engines.values():
        if not isinstance(engine, str):
            engine.close()
    return lines


def _end_to_end(engine: TrtEngine, photos: list[bytes], cores: int) -> list[str]:
    with ThreadPoolExecutor(cores) as pool:
        list(pool.map(_decode, photos[:cores]))
        t0 = time.perf_counter()
        decoded = list(pool.map(_decode, photos))
        decode_rate = len(decoded) / (time.perf_counter() - t0)
        t0 = time.perf_counter()
        pending: list[npt.NDArray[np.uint8]] = []
        for pixels in pool.map(_decode, photos):
            pending.append(pixels)
            if len(pending) == E2E_BATCH:
                engine.infer(np.stack(pending))
                pending = []
        if pending:
            engine.infer(np.stack(pending))
        e2e_rate = len(photos) / (time.perf_counter() - t0)
    limit = "decode (CPU)" if e2e_rate >= 0.8 * decode_rate else "inference"
    return [
        f"End to end, {len(photos)} dev photos, {cores} decode threads, fp16 batches of "
        f"{E2E_BATCH}: **{e2e_rate:,.0f} images/s** with inference, {decode_rate:,.0f} images/s "
        f"decode alone: the limit is {limit}.",
    ]


if __name__ == "__main__":
    sys.exit(main())
