"""Build TensorRT plans of the ONNX model for the GPU this runs on (``make engines``).

    python -m engines.build_trt --model-dir build/model --out build/engines \\
        [--precision fp16|int8|fp32] [--calib-dir DIR] [--max-batch 64]

One plan per precision, with one optimisation profile per shape bucket (batch 1..max, H and W
fixed), written with a manifest (engines/plans.py). A plan that already matches this GPU,
TensorRT version, model and build options is left alone; plans of this GPU + TensorRT built
from an older model are stale and removed once the new plan is written. Plans of other GPUs
or TensorRT versions in the same folder are kept: a shared folder can serve several boxes.

The timing cache (kernel timings per GPU model + TensorRT version) is loaded before and saved
after each build, so rebuilding after a model change is much faster than the first build.
INT8 uses an entropy calibrator fed with photos from ``--calib-dir``, decoded by the pixel
pipeline the service's decode uses (engines/pixels.py); its scales are cached per model + photo
set. Every
ONNX parser error is printed, and on a failed build the end of TensorRT's log too.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import numpy.typing as npt

from engines import buckets
from engines.artifacts import sha256_hex, write_atomic
from engines.base import INPUT_NAME
from engines.errors import HeatcropError
from engines.plans import (
    MANIFEST_SUFFIX,
    PLAN_SUFFIX,
    PRECISIONS,
    Importer,
    Machine,
    PlanError,
    PlanManifest,
    Probe,
    Status,
    Unavailable,
    calibration_cache_path,
    detect_machine,
    judge,
    list_plans,
    plan_stem,
    profile_shapes,
    read_manifest,
    read_plan,
    timing_cache_path,
    write_manifest,
)

Shape = tuple[int, int]
PHOTO_SUFFIXES = frozenset((".jpg", ".jpeg", ".png", ".webp", ".tif", ".tiff", ".gif", ".avif"))
# Calibration runs at one shape: the square bucket, which every photo can be squashed to.
CALIB_BUCKET: Shape = (buckets.SHORT_SIDE, buckets.SHORT_SIDE)
CALIB_MAX_BYTES = 50 * 1024 * 1024
CALIB_MAX_PIXELS = 100_000_000


class BuildError(Exception):
    """The plan could not be built; the message carries the parser errors or the log tail."""


class NoTensorRT(BuildError):
    """Nothing can be built on this machine: no TensorRT, no pycuda or no GPU."""


@dataclass(frozen=True)
class BuildSpec:
    """What to build: the options a plan is judged up to date against."""

    precision: str = "fp16"
    max_batch: int = 64
    opt_batch: int = 0  # 0: same as max_batch
    buckets: tuple[Shape, ...] = buckets.all_buckets()
    workspace_mb: int = 4096
    calib_batch: int = 16

    @property
    def opt(self) -> int:
        return self.opt_batch or self.max_batch

    def check(self) -> None:
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {self.precision!r}")
        if not self.buckets:
            raise ValueError("no shape buckets to build")
        for bucket in self.buckets:
            profile_shapes(bucket, 1, self.opt, self.max_batch)
        if self.calib_batch < 1 or self.workspace_mb < 1:
            raise ValueError("calib_batch and workspace_mb must be >= 1")


def plan_manifest_path(plan_dir: Path, model_sha256: str, machine: Machine, precision: str) -> Path:
    return plan_dir / (plan_stem(model_sha256, machine, precision) + MANIFEST_SUFFIX)


def needs_build(plan_dir: Path, spec: BuildSpec, machine: Machine, model_sha256: str) -> str:
    """Why the plan for ``spec`` must be (re)built, or "" when the one on disk is current."""
    path = plan_manifest_path(plan_dir, model_sha256, machine, spec.precision)
    if not path.is_file():
        return "missing"
    try:
        manifest = read_manifest(path)
    except PlanError as exc:
        return f"unreadable manifest ({exc.detail})"
    verdict = judge(manifest, machine, model_sha256, spec.buckets, spec.precision)
    if not verdict.ok:
        return f"{verdict.status.value}: {verdict.reason}"
    if manifest.buckets != spec.buckets:
        return "other shape buckets"
    if (manifest.min_batch, manifest.opt_batch, manifest.max_batch) != (
        1,
        spec.opt,
        spec.max_batch,
    ):
        return f"batch range {manifest.min_batch}..{manifest.max_batch} (opt {manifest.opt_batch})"
    try:
        read_plan(manifest)
    except PlanError as exc:
        return f"corrupt plan ({exc.detail})"
    return ""


def stale_plans(plan_dir: Path, machine: Machine, model_sha256: str) -> list[PlanManifest]:
    """Plans for this GPU + TensorRT built from another model than the current one."""
    out = []
    for entry in list_plans(plan_dir):
        manifest = entry.manifest
        if manifest is None or manifest.machine != machine:
            continue
        if judge(manifest, machine, model_sha256).status is Status.STALE:
            out.append(manifest)
    return out


def cast_before_transpose(model_bytes: bytes) -> bytes:
    """The same graph with the input's uint8 NHWC->NCHW Transpose moved after its Cast.

    The two commute exactly (a transpose moves values, a cast changes each one alone), but
    TensorRT accepts UINT8 tensors only at the network boundary and into a Cast, not through a
    Shuffle layer. The plan's manifest still names the hash of the file as exported: this
    rewrite is part of how that file is built, like TensorRT's own layer fusions.
    """
    import onnx

    model = onnx.load_from_string(model_bytes)
    graph = model.graph
    users = [n for n in graph.node if INPUT_NAME in n.input]
    if len(users) != 1 or users[0].op_type != "Transpose":
        return model_bytes
    transpose = users[0]
    between = transpose.output[0]
    casts = [n for n in graph.node if between in n.input]
    if len(casts) != 1 or casts[0].op_type != "Cast" or between in {o.name for o in graph.output}:
        return model_bytes
    cast = casts[0]
    after = cast.output[0]
    cast_nhwc = f"{after}.nhwc"
    cast.input[0], cast.output[0] = INPUT_NAME, cast_nhwc
    transpose.input[0], transpose.output[0] = cast_nhwc, after
    nodes = [n for n in graph.node if n is not cast]
    nodes.insert(nodes.index(transpose), cast)
    del graph.node[:]
    graph.node.extend(nodes)
    kept = [v for v in graph.value_info if v.name != between]
    del graph.value_info[:]
    graph.value_info.extend(kept)
    return model.SerializeToString()


# -- INT8 calibration data (CPU side) ---------------------------------------------------------


def calibration_photos(folder: Path, limit: int) -> list[Path]:
    """Up to ``limit`` photos of ``folder`` (recursively), in a stable order."""
    if not folder.is_dir():
        raise BuildError(f"--calib-dir {folder} is not a folder")
    found = sorted(p for p in folder.rglob("*") if p.suffix.lower() in PHOTO_SUFFIXES)
    if not found:
        raise BuildError(f"no photos ({', '.join(sorted(PHOTO_SUFFIXES))}) in {folder}")
    return found[:limit]


def photos_digest(paths: Sequence[Path]) -> str:
    """Identifies a calibration set by content: the INT8 cache is reused only for the same one."""
    digest = hashlib.sha256()
    for path in paths:
        digest.update(f"{path.name}\0{sha256_hex(path.read_bytes())}\n".encode())
    return digest.hexdigest()


def own_bucket(header: Any) -> Shape:
    """The input bucket the service sends this photo to: display orientation picks it, so
    the transposing EXIF orientations swap the sides first (sidecar/decode.py)."""
    from engines.buckets import bucket_for

    orientation = header.get("orientation") if header.get_typeof("orientation") else 1
    width, height = header.width, header.height
    if orientation in (5, 6, 7, 8):
        width, height = height, width
    return bucket_for(width, height)


def calibration_pixels(
    paths: Sequence[Path],
    bucket: Shape | None = None,
    on_skip: Callable[[Path, str], None] | None = None,
) -> Iterator[tuple[Path, npt.NDArray[np.uint8]]]:
    """(path, [H, W, 3] uint8) of every usable photo, decoded as the service decodes it, to
    ``bucket`` (None: each photo to its own bucket, as the service would send it). Photos that
    do not decode, or are over the byte or pixel limit, are skipped and reported to
    ``on_skip``. Both INT8 calibrators read their photos through this loop."""
    import pyvips

    from engines.pixels import model_pixels, open_header

    for path in paths:
        try:
            data = path.read_bytes()
            if len(data) > CALIB_MAX_BYTES:
                raise ValueError(f"{len(data)} bytes > limit {CALIB_MAX_BYTES}")
            header = open_header(data)
            if header.width * header.height > CALIB_MAX_PIXELS:
                raise ValueError(
                    f"{header.width}x{header.height} > limit {CALIB_MAX_PIXELS} pixels"
                )
            pixels = model_pixels(data, header, bucket or own_bucket(header))
        except (OSError, pyvips.Error, ValueError) as exc:  # model_pixels' WrongSize is one
            if on_skip is not None:
                on_skip(path, " ".join(str(exc).split()))
            continue
        yield path, pixels


def calibration_batches(
    paths: Sequence[Path],
    bucket: Shape,
    batch: int,
    on_skip: Callable[[Path, str], None] | None = None,
) -> Iterator[npt.NDArray[np.uint8]]:
    """[batch, H, W, 3] uint8 batches of the usable photos (`calibration_pixels`) at one
    bucket. A last, incomplete batch is dropped, since TensorRT calibrates at one fixed batch
    size. Fewer usable photos than one batch is a BuildError, not a calibration on nothing.
    """
    pending: list[npt.NDArray[np.uint8]] = []
    yielded = 0
    for _, pixels in calibration_pixels(paths, bucket, on_skip):
        pending.append(pixels)
        if len(pending) == batch:
            yielded += 1
            yield np.stack(pending)
            pending = []
    if yielded == 0:
        raise BuildError(
            f"calibration needs at least {batch} usable photos (--calib-batch), got {len(pending)}"
        )


def make_calibrator(
    trt: ModuleType,
    cuda: ModuleType,
    batches: Iterator[npt.NDArray[np.uint8]],
    batch_shape: tuple[int, int, int, int],
    cache_path: Path,
) -> Any:
    """An IInt8EntropyCalibrator2 that feeds ``batches`` through one device buffer."""
    if not hasattr(trt, "IInt8EntropyCalibrator2"):
        raise BuildError(
            f"TensorRT {trt.__version__} has no INT8 calibrator (implicit quantization was "
            "removed); build fp16 or use TensorRT 10"
        )

    class EntropyCalibrator(trt.IInt8EntropyCalibrator2):
        def __init__(self) -> None:
            trt.IInt8EntropyCalibrator2.__init__(self)
            self.host = cuda.pagelocked_empty(batch_shape, np.uint8)
            self.device = cuda.mem_alloc(self.host.nbytes)
            self.batches_fed = 0
            self.error: BaseException | None = None

        def get_batch_size(self) -> int:
            return batch_shape[0]

        def get_batch(self, names: list[str]) -> list[int] | None:
            # An exception must not cross back into TensorRT: keep it and end calibration.
            try:
                chunk = next(batches)
                np.copyto(self.host, chunk)
                cuda.memcpy_htod(self.device, self.host)
            except StopIteration:
                return None
            except BaseException as exc:
                self.error = exc
                return None
            self.batches_fed += 1
            return [int(self.device)]

        def read_calibration_cache(self) -> bytes | None:
            return cache_path.read_bytes() if cache_path.is_file() else None

        def write_calibration_cache(self, cache: Any) -> None:
            write_atomic(cache_path, bytes(cache))

    return EntropyCalibrator()


# -- the build (GPU side) ---------------------------------------------------------------------


def _print_err(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def build_plan(
    trt: ModuleType,
    onnx_bytes: bytes,
    spec: BuildSpec,
    timing_cache: Path,
    *,
    calibrator: Any = None,
    verbose: bool = False,
) -> bytes:
    """Serialize a plan for ``spec``; raises BuildError with the parser errors or log tail."""
    from engines.trt import make_logger, read_profiles

    logger = make_logger(trt, _print_err, verbose=verbose)
    builder = trt.Builder(logger)
    # TensorRT 10 networks are always explicit-batch (the old flag is deprecated): flags 0.
    network = builder.create_network(0)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse(cast_before_transpose(onnx_bytes)):
        errors = [str(parser.get_error(i)) for i in range(parser.num_errors)]
        for i, error in enumerate(errors, 1):
            _print_err(f"ONNX parser error {i}/{len(errors)}: {error}")
        raise BuildError(
            f"the ONNX parser failed with {len(errors)} error(s); end of TensorRT's log:\n"
            + logger.tail(30)
        )
    if spec.precision != "fp32" and not hasattr(trt.BuilderFlag, "FP16"):
        raise BuildError(
            f"TensorRT {trt.__version__} has no FP16/INT8 builder flags (removed in 11): "
            "use TensorRT 10 (pip install -e '.[gpu]') or --precision fp32"
        )
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, spec.workspace_mb << 20)
    if spec.precision in ("fp16", "int8"):
        config.set_flag(trt.BuilderFlag.FP16)
    if spec.precision == "int8":
        if calibrator is None:
            raise BuildError("int8 needs a calibrator (--calib-dir)")
        config.set_flag(trt.BuilderFlag.INT8)
        config.int8_calibrator = calibrator
        calib_profile = builder.create_optimization_profile()
        shape = (spec.calib_batch, *CALIB_BUCKET, 3)
        calib_profile.set_shape(INPUT_NAME, shape, shape, shape)
        if config.set_calibration_profile(calib_profile) is False:
            raise BuildError(f"TensorRT refused the calibration profile {shape}")
    for index, bucket in enumerate(spec.buckets):
        profile = builder.create_optimization_profile()
        profile.set_shape(INPUT_NAME, *profile_shapes(bucket, 1, spec.opt, spec.max_batch))
        if config.add_optimization_profile(profile) != index:
            raise BuildError(f"TensorRT refused the optimisation profile for {bucket}")
    # Held until the build is over: the config only points to the cache object.
    cache = _load_timing_cache(config, timing_cache)
    started = time.perf_counter()
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise BuildError("TensorRT could not build the plan; end of its log:\n" + logger.tail(60))
    if calibrator is not None and calibrator.error is not None:
        raise BuildError(f"calibration data failed: {calibrator.error!r}")
    write_atomic(timing_cache, bytes(memoryview(config.get_timing_cache().serialize())))
    del cache, config
    plan = bytes(memoryview(serialized))
    _print_err(f"  built in {time.perf_counter() - started:.0f} s")
    engine = trt.Runtime(logger).deserialize_cuda_engine(plan)
    if engine is None:
        raise BuildError("the plan just built does not deserialize:\n" + logger.tail(30))
    got = [(bucket, low, high) for bucket, low, high in read_profiles(engine)]
    want = [(bucket, 1, spec.max_batch) for bucket in spec.buckets]
    if got != want:
        raise BuildError(f"the plan's profiles {got} are not the ones asked for {want}")
    return plan


def _load_timing_cache(config: Any, path: Path) -> Any:
    """The saved timing cache, or a fresh one if there is none or it does not fit."""
    data = path.read_bytes() if path.is_file() else b""
    cache = config.create_timing_cache(data)
    if config.set_timing_cache(cache, ignore_mismatch=False) is not False:
        if data:
            _print_err(f"  reusing timing cache {path}")
        return cache
    _print_err(f"  timing cache {path} does not fit this GPU/TensorRT; starting a fresh one")
    cache = config.create_timing_cache(b"")
    if config.set_timing_cache(cache, ignore_mismatch=False) is False:
        raise BuildError("TensorRT refused an empty timing cache")
    return cache


@dataclass(frozen=True)
class Outcome:
    manifest: PlanManifest
    built: bool
    reason: str
    removed: tuple[Path, ...] = ()


def build(
    model_dir: Path,
    out: Path,
    spec: BuildSpec,
    *,
    calib_dir: Path | None = None,
    calib_limit: int = 512,
    force: bool = False,
    verbose: bool = False,
    device: int = 0,
    importer: Importer = importlib.import_module,
    machine: Probe | None = None,
) -> Outcome:
    """Build (or keep) the plan for ``spec`` in ``out``; raises BuildError or ModelNotBuilt.

    ``machine`` is this machine as ``detect_machine`` finds it (tests pass one in); TensorRT
    itself is imported only when something has to be built.
    """
    from engines.model import find_model
    from engines.model import read_manifest as read_model_manifest

    spec.check()
    model = find_model(model_dir)
    digest = str(read_model_manifest(model_dir)["sha256"])
    if machine is None:
        machine = detect_machine(importer, device)
    if isinstance(machine, Unavailable):
        raise NoTensorRT(f"cannot build TensorRT plans here: {machine.reason}")
    out.mkdir(parents=True, exist_ok=True)
    path = plan_manifest_path(out, digest, machine, spec.precision)
    reason = "forced" if force else needs_build(out, spec, machine, digest)
    if not reason:
        return Outcome(
            read_manifest(path), False, "up to date", _remove_stale(out, machine, digest)
        )
    if spec.precision == "int8" and calib_dir is None:
        raise BuildError("--precision int8 needs --calib-dir with sample photos")
    trt = importer("tensorrt")
    _print_err(
        f"{spec.precision}: building ({reason}) for {machine.describe()}: "
        f"{len(spec.buckets)} profiles, batch 1..{spec.max_batch}"
    )
    started = time.perf_counter()
    calibration = ""
    if spec.precision == "int8":
        assert calib_dir is not None
        plan, calibration = _build_int8(
            trt,
            importer("pycuda.driver"),
            model.read_bytes(),
            spec,
            timing_cache_path(out, machine),
            calibration_dir=calib_dir,
            calib_limit=calib_limit,
            cache_dir=out,
            model_sha256=digest,
            device=device,
            verbose=verbose,
        )
    else:
        plan = build_plan(
            trt, model.read_bytes(), spec, timing_cache_path(out, machine), verbose=verbose
        )
    stem = path.name.removesuffix(MANIFEST_SUFFIX)
    plan_file = stem + PLAN_SUFFIX
    write_atomic(out / plan_file, plan)
    manifest = PlanManifest(
        path=path,
        plan_file=plan_file,
        plan_sha256=sha256_hex(plan),
        plan_bytes=len(plan),
        model_file=model.name,
        model_sha256=digest,
        gpu_name=machine.gpu_name,
        compute_capability=machine.compute_capability,
        trt_version=machine.trt_version,
        precision=spec.precision,
        min_batch=1,
        opt_batch=spec.opt,
        max_batch=spec.max_batch,
        buckets=spec.buckets,
        built_at=datetime.now(UTC).isoformat(timespec="seconds"),
        build_seconds=time.perf_counter() - started,
        calibration=calibration,
    )
    write_manifest(manifest)
    return Outcome(manifest, True, reason, _remove_stale(out, machine, digest))


def _build_int8(
    trt: ModuleType,
    cuda: ModuleType,
    onnx_bytes: bytes,
    spec: BuildSpec,
    timing_cache: Path,
    *,
    calibration_dir: Path,
    calib_limit: int,
    cache_dir: Path,
    model_sha256: str,
    device: int,
    verbose: bool,
) -> tuple[bytes, str]:
    photos = calibration_photos(calibration_dir, calib_limit)
    set_digest = photos_digest(photos)
    cache = calibration_cache_path(cache_dir, model_sha256, set_digest)
    batches = calibration_batches(
        photos, CALIB_BUCKET, spec.calib_batch, lambda p, why: _print_err(f"  skip {p}: {why}")
    )
    cuda.init()
    # The primary context: the one TensorRT's own CUDA calls use, so the calibrator's device
    # buffer is valid inside TensorRT.
    context = cuda.Device(device).retain_primary_context()
    context.push()
    try:
        calibrator = make_calibrator(
            trt, cuda, batches, (spec.calib_batch, *CALIB_BUCKET, 3), cache
        )
        try:
            plan = build_plan(
                trt, onnx_bytes, spec, timing_cache, calibrator=calibrator, verbose=verbose
            )
        finally:
            # Both buffers freed while their context is current, not by the garbage collector
            # after it is gone.
            calibrator.device.free()
            free_host = getattr(calibrator.host.base, "free", None)
            if free_host is not None:
                free_host()
    finally:
        cuda.Context.pop()
        context.detach()
    fed = calibrator.batches_fed
    source = "cached scales" if fed == 0 else f"{fed} batches of {spec.calib_batch}"
    return plan, f"{len(photos)} photos from {calibration_dir} (set {set_digest[:12]}, {source})"


def _remove_stale(out: Path, machine: Machine, digest: str) -> tuple[Path, ...]:
    removed = []
    for manifest in stale_plans(out, machine, digest):
        for path in (manifest.plan_path, manifest.path):
            path.unlink(missing_ok=True)
            removed.append(path)
    return tuple(removed)


def parse_buckets(text: str) -> tuple[Shape, ...]:
    """ "224x224,224x320" (height x width) -> ((224, 224), (224, 320)); "all" -> every bucket."""
    if text == "all":
        return buckets.all_buckets()
    out = []
    for part in text.split(","):
        h, sep, w = part.strip().partition("x")
        if not sep or not h.isdigit() or not w.isdigit():
            raise ValueError(f"bucket {part!r} is not HxW")
        out.append((int(h), int(w)))
    return tuple(out)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--model-dir", type=Path, default=Path("build/model"))
    parser.add_argument("--out", type=Path, default=Path("build/engines"), help="plan folder")
    parser.add_argument("--precision", choices=PRECISIONS, default="fp16")
    parser.add_argument("--calib-dir", type=Path, help="sample photos for INT8 calibration")
    parser.add_argument("--calib-limit", type=int, default=512, help="photos used at most")
    parser.add_argument("--calib-batch", type=int, default=16)
    parser.add_argument("--max-batch", type=int, default=64)
    parser.add_argument("--opt-batch", type=int, default=0, help="batch to tune for (max)")
    parser.add_argument("--buckets", type=parse_buckets, default="all", help="HxW,HxW or all")
    parser.add_argument("--workspace-mb", type=int, default=4096)
    parser.add_argument("--force", action="store_true", help="rebuild even if up to date")
    parser.add_argument("--verbose", action="store_true", help="keep TensorRT's verbose log")
    parser.add_argument("--device", type=int, default=0, help="CUDA device index")
    args = parser.parse_args(argv)
    spec = BuildSpec(
        precision=args.precision,
        max_batch=args.max_batch,
        opt_batch=args.opt_batch,
        buckets=args.buckets,
        workspace_mb=args.workspace_mb,
        calib_batch=args.calib_batch,
    )
    try:
        spec.check()
        outcome = build(
            args.model_dir,
            args.out,
            spec,
            calib_dir=args.calib_dir,
            calib_limit=args.calib_limit,
            force=args.force,
            verbose=args.verbose,
            device=args.device,
        )
    except (BuildError, HeatcropError, ValueError) as exc:
        print(f"build_trt: {exc}", file=sys.stderr)
        return 2 if isinstance(exc, NoTensorRT) else 1
    m = outcome.manifest
    state = f"built ({outcome.reason})" if outcome.built else "up to date"
    print(f"{m.precision}: {state}: {m.plan_path} ({m.plan_bytes / 1e6:.1f} MB)")
    for path in outcome.removed:
        print(f"removed stale {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
