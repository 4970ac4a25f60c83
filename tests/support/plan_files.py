"""Plan folders for the TensorRT tests that run without a GPU.

The plan bytes are arbitrary: these tests exercise naming, manifests, matching and selection,
which never hand a plan to TensorRT (a mismatched one must not get that far at all).
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from engines import buckets
from engines.artifacts import sha256_hex
from engines.plans import Machine, PlanManifest, plan_stem, write_manifest

H100 = Machine("NVIDIA H100 80GB HBM3", (9, 0), "10.16.1.11")
L4 = Machine("NVIDIA L4", (8, 9), "10.16.1.11")
MODEL_SHA = "39519606ea2c" + "0" * 52
OLD_MODEL_SHA = "0123456789ab" + "f" * 52


def write_plan(
    plan_dir: Path,
    machine: Machine = H100,
    model_sha256: str = MODEL_SHA,
    precision: str = "fp16",
    *,
    max_batch: int = 64,
    shapes: tuple[tuple[int, int], ...] | None = None,
    payload: bytes = b"not a real plan",
    built_at: str = "2026-11-30T05:00:00+00:00",
    stem: str | None = None,
) -> PlanManifest:
    """A plan file and its manifest, as build_trt would write them."""
    plan_dir.mkdir(parents=True, exist_ok=True)
    stem = stem or plan_stem(model_sha256, machine, precision)
    (plan_dir / f"{stem}.plan").write_bytes(payload)
    manifest = PlanManifest(
        path=plan_dir / f"{stem}.json",
        plan_file=f"{stem}.plan",
        plan_sha256=sha256_hex(payload),
        plan_bytes=len(payload),
        model_file=f"heatcrop-lite0-{model_sha256[:12]}.onnx",
        model_sha256=model_sha256,
        gpu_name=machine.gpu_name,
        compute_capability=machine.compute_capability,
        trt_version=machine.trt_version,
        precision=precision,
        min_batch=1,
        opt_batch=max_batch,
        max_batch=max_batch,
        buckets=shapes or buckets.all_buckets(),
        built_at=built_at,
    )
    write_manifest(manifest)
    return manifest


def other_trt(machine: Machine, version: str = "10.3.0") -> Machine:
    return replace(machine, trt_version=version)
