"""TensorRT plans on disk: file names, manifests, and whether a plan fits this machine.

A serialized TensorRT plan only runs on the GPU model and the TensorRT version that built it,
and only means something for the ONNX model it was built from. So every plan
``<stem>.plan`` has a manifest ``<stem>.json`` beside it naming all three (GPU name and compute
capability, TensorRT version, model sha256), plus the precision, batch range and the shape
buckets in optimisation-profile order, and the plan's own sha256 so a half-copied plan is
refused before TensorRT ever sees it.

Nothing here imports TensorRT or pycuda at module level: "this machine" is a small value
(``Machine``, or ``Unavailable`` with the reason) that ``detect_machine`` finds at run time and
that tests pass in directly.
"""

from __future__ import annotations

import importlib
import json
import re
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from types import ModuleType
from typing import Any

from engines.artifacts import HASH_CHARS, MODEL_STEM, sha256_hex, write_atomic
from engines.errors import ModelNotBuilt

PLAN_FORMAT = 1
PRECISIONS: tuple[str, ...] = ("fp16", "int8", "fp32")
PLAN_SUFFIX = ".plan"
MANIFEST_SUFFIX = ".json"
BUILD_HINT = "run `make engines` on this machine"

Shape = tuple[int, int]
Importer = Callable[[str], ModuleType]


class PlanError(ModelNotBuilt):
    """A plan manifest or plan file that cannot be used as it is (unreadable, corrupt)."""

    public_message = "TensorRT plan unusable"


class NoMatchingPlan(ModelNotBuilt):
    """TensorRT was asked for, but no plan fits this GPU + TensorRT + model (or no TensorRT)."""

    public_message = "no TensorRT plan for this machine"


@dataclass(frozen=True)
class Machine:
    """The GPU and TensorRT found at run time: what a plan must have been built for."""

    gpu_name: str
    compute_capability: tuple[int, int]
    trt_version: str

    @property
    def sm(self) -> str:
        return f"sm{self.compute_capability[0]}{self.compute_capability[1]}"

    def describe(self) -> str:
        return f"{self.gpu_name} ({self.sm}), TensorRT {self.trt_version}"


@dataclass(frozen=True)
class Unavailable:
    """No usable TensorRT here, and why (not installed, no pycuda, no GPU, driver error)."""

    reason: str

    def describe(self) -> str:
        return f"no TensorRT ({self.reason})"


Probe = Machine | Unavailable


def detect_machine(importer: Importer = importlib.import_module, device: int = 0) -> Probe:
    """This machine's GPU + TensorRT, or why there is none usable; never raises.

    ``importer`` is how the libraries are imported (tests pass one that refuses). Wheels that
    are installed but cannot load their CUDA libraries raise OSError or RuntimeError on import,
    not ImportError, so those count as "not usable" too.
    """
    try:
        trt = importer("tensorrt")
    except (ImportError, OSError, RuntimeError) as exc:
        return Unavailable(f"TensorRT not importable: {exc}")
    try:
        cuda = importer("pycuda.driver")
    except (ImportError, OSError, RuntimeError) as exc:
        return Unavailable(f"pycuda not importable: {exc}")
    cuda_error: type[BaseException] = getattr(cuda, "Error", RuntimeError)
    try:
        cuda.init()
        count = int(cuda.Device.count())
        if count <= device:
            return Unavailable(f"no CUDA GPU #{device} ({count} visible)")
        gpu = cuda.Device(device)
        name = str(gpu.name())
        major, minor = (int(v) for v in gpu.compute_capability())
    except (cuda_error, OSError, RuntimeError) as exc:
        return Unavailable(f"CUDA driver: {exc}")
    return Machine(name, (major, minor), str(getattr(trt, "__version__", "unknown")))


def gpu_slug(name: str) -> str:
    """A GPU name as a file-name part: "NVIDIA H100 80GB HBM3" -> "nvidia-h100-80gb-hbm3"."""
    slug = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")
    return slug or "gpu"


def plan_stem(model_sha256: str, machine: Machine, precision: str) -> str:
    """The file stem of the plan for this model, GPU, TensorRT and precision."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    trt = re.sub(r"[^0-9A-Za-z.]+", "-", machine.trt_version)
    return (
        f"{MODEL_STEM}-{model_sha256[:HASH_CHARS]}-{precision}-"
        f"{gpu_slug(machine.gpu_name)}-{machine.sm}-trt{trt}"
    )


def timing_cache_path(plan_dir: Path, machine: Machine) -> Path:
    """Timing caches hold kernel timings, valid for one GPU model and TensorRT version."""
    trt = re.sub(r"[^0-9A-Za-z.]+", "-", machine.trt_version)
    return plan_dir / f"timing-{gpu_slug(machine.gpu_name)}-{machine.sm}-trt{trt}.cache"


def calibration_cache_path(plan_dir: Path, model_sha256: str, photos_digest: str) -> Path:
    """INT8 scales depend on the model and the calibration photos, not on the GPU."""
    return plan_dir / f"calib-{model_sha256[:HASH_CHARS]}-{photos_digest[:HASH_CHARS]}.cache"


def profile_shapes(
    bucket: Shape, min_batch: int, opt_batch: int, max_batch: int
) -> tuple[tuple[int, int, int, int], ...]:
    """(min, opt, max) NHWC input shapes of the optimisation profile of one shape bucket.

    Height and width are fixed per profile: one bucket per profile lets TensorRT pick kernels
    for that exact size, and the batcher only ever sends one bucket per call.
    """
    if not 1 <= min_batch <= opt_batch <= max_batch:
        got = f"{min_batch}/{opt_batch}/{max_batch}"
        raise ValueError(f"need 1 <= min <= opt <= max batch, got {got}")
    h, w = bucket
    if h <= 0 or w <= 0 or h % 32 or w % 32:
        raise ValueError(f"shape bucket {h}x{w} is not a positive multiple of 32")
    return tuple((n, h, w, 3) for n in (min_batch, opt_batch, max_batch))


@dataclass(frozen=True)
class PlanManifest:
    """What ``<stem>.json`` says about ``<stem>.plan``; ``buckets[i]`` is profile ``i``."""

    path: Path
    plan_file: str
    plan_sha256: str
    plan_bytes: int
    model_file: str
    model_sha256: str
    gpu_name: str
    compute_capability: tuple[int, int]
    trt_version: str
    precision: str
    min_batch: int
    opt_batch: int
    max_batch: int
    buckets: tuple[Shape, ...]
    built_at: str = ""
    build_seconds: float = 0.0
    calibration: str = ""

    @property
    def plan_path(self) -> Path:
        return self.path.parent / self.plan_file

    @property
    def machine(self) -> Machine:
        return Machine(self.gpu_name, self.compute_capability, self.trt_version)

    def to_json(self) -> dict[str, Any]:
        return {
            "format": PLAN_FORMAT,
            "plan": self.plan_file,
            "plan_sha256": self.plan_sha256,
            "plan_bytes": self.plan_bytes,
            "model": {"file": self.model_file, "sha256": self.model_sha256},
            "gpu": {"name": self.gpu_name, "compute_capability": list(self.compute_capability)},
            "tensorrt": self.trt_version,
            "precision": self.precision,
            "batch": {"min": self.min_batch, "opt": self.opt_batch, "max": self.max_batch},
            "buckets": [list(b) for b in self.buckets],
            "built_at": self.built_at,
            "build_seconds": round(self.build_seconds, 1),
            "calibration": self.calibration,
        }

    @classmethod
    def from_json(cls, path: Path, data: Any) -> PlanManifest:
        """Parse a manifest; any missing or ill-typed field is a PlanError naming the file."""
        try:
            if data.get("format") != PLAN_FORMAT:
                raise ValueError(f"format {data.get('format')!r}, expected {PLAN_FORMAT}")
            cc = data["gpu"]["compute_capability"]
            batch = data["batch"]
            manifest = cls(
                path=path,
                plan_file=_str(data["plan"]),
                plan_sha256=_str(data["plan_sha256"]),
                plan_bytes=_int(data["plan_bytes"]),
                model_file=_str(data["model"]["file"]),
                model_sha256=_str(data["model"]["sha256"]),
                gpu_name=_str(data["gpu"]["name"]),
                compute_capability=(_int(cc[0]), _int(cc[1])),
                trt_version=_str(data["tensorrt"]),
                precision=_str(data["precision"]),
                min_batch=_int(batch["min"]),
                opt_batch=_int(batch["opt"]),
                max_batch=_int(batch["max"]),
                buckets=tuple((_int(b[0]), _int(b[1])) for b in data["buckets"]),
                built_at=str(data.get("built_at", "")),
                build_seconds=float(data.get("build_seconds", 0.0)),
                calibration=str(data.get("calibration", "")),
            )
        except (KeyError, IndexError, TypeError, ValueError, AttributeError) as exc:
            raise PlanError(f"{path}: not a plan manifest ({type(exc).__name__}: {exc})") from exc
        if manifest.precision not in PRECISIONS:
            raise PlanError(f"{path}: unknown precision {manifest.precision!r}")
        if Path(manifest.plan_file).name != manifest.plan_file:
            raise PlanError(f"{path}: plan file {manifest.plan_file!r} is not a bare file name")
        if not manifest.buckets:
            raise PlanError(f"{path}: no shape buckets")
        try:
            for bucket in manifest.buckets:
                profile_shapes(bucket, manifest.min_batch, manifest.opt_batch, manifest.max_batch)
        except ValueError as exc:
            raise PlanError(f"{path}: {exc}") from exc
        return manifest


def _str(value: Any) -> str:
    if not isinstance(value, str) or not value:
        raise TypeError(f"expected a non-empty string, got {value!r}")
    return value


def _int(value: Any) -> int:
    if not isinstance(value, int) or isinstance(value, bool):
        raise TypeError(f"expected an integer, got {value!r}")
    return value


def read_manifest(path: str | Path) -> PlanManifest:
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise PlanError(f"{path}: unreadable plan manifest ({exc})") from exc
    return PlanManifest.from_json(path, data)


def write_manifest(manifest: PlanManifest) -> None:
    text = json.dumps(manifest.to_json(), indent=2) + "\n"
    write_atomic(manifest.path, text.encode())


def read_plan(manifest: PlanManifest) -> bytes:
    """The plan's bytes, after checking them against the manifest's size and sha256."""
    try:
        data = manifest.plan_path.read_bytes()
    except OSError as exc:
        raise PlanError(f"{manifest.plan_path}: cannot read plan ({exc})") from exc
    if len(data) != manifest.plan_bytes or sha256_hex(data) != manifest.plan_sha256:
        raise PlanError(
            f"{manifest.plan_path} does not match its manifest's size/sha256 (half-copied or "
            f"overwritten): {BUILD_HINT}"
        )
    return data


class Status(StrEnum):
    MATCH = "match"
    BROKEN = "broken"
    STALE = "stale"  # built from another model than the current one
    UNKNOWN = "unknown"  # no TensorRT here: cannot tell
    OTHER_GPU = "other GPU"
    OTHER_TRT = "other TensorRT"
    INCOMPLETE = "missing buckets"
    OTHER_PRECISION = "other precision"


@dataclass(frozen=True)
class Verdict:
    status: Status
    reason: str

    @property
    def ok(self) -> bool:
        return self.status is Status.MATCH


def judge(
    manifest: PlanManifest,
    machine: Probe,
    model_sha256: str | None,
    buckets: Sequence[Shape] = (),
    precision: str | None = None,
) -> Verdict:
    """Whether a plan can run here for this model; if not, the first reason it cannot.

    Cheap (no hashing of the plan): the full check of the plan bytes is ``read_plan``, done
    right before deserializing. ``model_sha256`` None means the model is unknown (not built):
    staleness is then not judged.
    """
    plan = manifest.plan_path
    if not plan.is_file():
        return Verdict(Status.BROKEN, f"plan file {plan.name} is missing")
    if plan.stat().st_size != manifest.plan_bytes:
        return Verdict(Status.BROKEN, f"plan file {plan.name} has the wrong size")
    if model_sha256 is not None and manifest.model_sha256 != model_sha256:
        return Verdict(
            Status.STALE,
            f"built from model {manifest.model_sha256[:HASH_CHARS]}, "
            f"current is {model_sha256[:HASH_CHARS]}",
        )
    if isinstance(machine, Unavailable):
        return Verdict(Status.UNKNOWN, machine.describe())
    built = manifest.machine
    if (built.gpu_name, built.compute_capability) != (machine.gpu_name, machine.compute_capability):
        return Verdict(Status.OTHER_GPU, f"built for {built.gpu_name} ({built.sm})")
    if built.trt_version != machine.trt_version:
        return Verdict(Status.OTHER_TRT, f"built with TensorRT {built.trt_version}")
    missing = [b for b in buckets if b not in manifest.buckets]
    if missing:
        shown = ", ".join(f"{h}x{w}" for h, w in missing[:3])
        return Verdict(Status.INCOMPLETE, f"{len(missing)} shape buckets missing ({shown} ...)")
    if precision is not None and manifest.precision != precision:
        return Verdict(Status.OTHER_PRECISION, f"{manifest.precision}, {precision} wanted")
    return Verdict(Status.MATCH, f"{manifest.precision}, batch 1..{manifest.max_batch}")


@dataclass(frozen=True)
class PlanEntry:
    """One manifest found in a plan folder: parsed, or the error that stopped it."""

    path: Path
    manifest: PlanManifest | None
    error: str = ""


def list_plans(plan_dir: str | Path) -> list[PlanEntry]:
    """Every ``*.json`` plan manifest in ``plan_dir``, sorted by name; none if no folder."""
    plan_dir = Path(plan_dir)
    if not plan_dir.is_dir():
        return []
    entries = []
    for path in sorted(plan_dir.glob(f"*{MANIFEST_SUFFIX}")):
        try:
            entries.append(PlanEntry(path, read_manifest(path)))
        except PlanError as exc:
            entries.append(PlanEntry(path, None, exc.detail))
    return entries


@dataclass(frozen=True)
class Search:
    """The outcome of looking for a usable plan: the plan, or why none was found."""

    plan: PlanManifest | None
    verdicts: tuple[tuple[PlanEntry, Verdict], ...]
    plan_dir: Path

    def why_none(self) -> str:
        """One line: what was in the folder and why none of it fits."""
        if not self.verdicts:
            return f"no TensorRT plans in {self.plan_dir}"
        counts = Counter(v.status.value for _, v in self.verdicts)
        parts = ", ".join(f"{n} {status}" for status, n in sorted(counts.items()))
        return f"{len(self.verdicts)} plan(s) in {self.plan_dir}, none usable ({parts})"


def find_plan(
    plan_dir: str | Path,
    machine: Probe,
    model_sha256: str,
    precision: str,
    buckets: Sequence[Shape],
) -> Search:
    """The newest plan in ``plan_dir`` that matches this machine, model, precision, buckets."""
    plan_dir = Path(plan_dir)
    verdicts: list[tuple[PlanEntry, Verdict]] = []
    matches: list[PlanManifest] = []
    for entry in list_plans(plan_dir):
        if entry.manifest is None:
            verdicts.append((entry, Verdict(Status.BROKEN, entry.error)))
            continue
        verdict = judge(entry.manifest, machine, model_sha256, buckets, precision)
        verdicts.append((entry, verdict))
        if verdict.ok:
            matches.append(entry.manifest)
    best = max(matches, key=lambda m: (m.built_at, m.path.name)) if matches else None
    return Search(best, tuple(verdicts), plan_dir)
