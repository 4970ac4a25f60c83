"""Picks and loads the runtime named by settings (``auto`` | ``ort`` | ``trt``).

``auto`` takes TensorRT when the libraries and a GPU are there and a plan in ``plan_dir``
matches this GPU + TensorRT version + model hash + ``trt_precision``; otherwise ONNX Runtime.
Either way one log line says which runtime and why. ``trt`` never falls back: without a match
it raises ``NoMatchingPlan`` saying what is missing. ``ort`` does not even look for TensorRT.
A plan that does not match is never handed to TensorRT (``TrtEngine`` checks again).

The settings are anything shaped like ``EngineConfig``: the service passes its own engine
settings; scripts and tests without the service can pass an ``EngineOptions``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from engines import buckets
from engines.artifacts import HASH_CHARS
from engines.base import Engine
from engines.cpu import int8_dot_product
from engines.errors import EngineError, ModelNotBuilt, first_line
from engines.plans import (
    BUILD_HINT,
    Machine,
    NoMatchingPlan,
    PlanError,
    PlanManifest,
    Probe,
    Unavailable,
    detect_machine,
    find_plan,
)

if TYPE_CHECKING:
    from engines.model import NotBuilt

log = logging.getLogger("heatcrop.engine")


class EngineConfig(Protocol):
    """What ``choose`` and ``load_engine`` read.

    ``kind_var`` is how an operator sets ``kind`` (for the service: its environment variable);
    messages about ``kind`` quote it, since that is what has to be changed.
    """

    @property
    def kind(self) -> str: ...  # auto | ort | trt

    @property
    def model_dir(self) -> str: ...

    @property
    def plan_dir(self) -> str: ...

    @property
    def trt_precision(self) -> str: ...  # fp16 | int8 | fp32

    @property
    def ort_precision(self) -> str: ...  # auto | int8 | fp32

    @property
    def threads(self) -> int: ...

    @property
    def kind_var(self) -> str: ...


@dataclass(frozen=True)
class EngineOptions:
    """An ``EngineConfig`` spelled out, for callers without the service's settings."""

    kind: str
    model_dir: str
    plan_dir: str
    trt_precision: str
    threads: int
    ort_precision: str = "fp32"
    kind_var: str = "kind"


@dataclass(frozen=True)
class Choice:
    """Which runtime to load and the one-line reason; ``plan`` and ``machine`` for TensorRT."""

    kind: str  # "trt" | "ort"
    reason: str
    plan: PlanManifest | None = None
    machine: Machine | None = None


def choose(
    settings: EngineConfig,
    model_sha256: str,
    probe: Probe,
    shapes: Sequence[tuple[int, int]] | None = None,
) -> Choice:
    """The runtime for these settings on a machine described by ``probe``; pure apart from
    reading the plan folder. Raises ``NoMatchingPlan`` when ``kind=trt`` cannot be honoured."""
    kind_var = settings.kind_var
    if settings.kind == "ort":
        return Choice("ort", f"{kind_var}=ort")
    if isinstance(probe, Unavailable):
        if settings.kind == "trt":
            raise NoMatchingPlan(f"{kind_var}=trt, but {probe.describe()}")
        return Choice("ort", f"TensorRT not used: {probe.describe()}")
    wanted = buckets.all_buckets() if shapes is None else tuple(shapes)
    search = find_plan(settings.plan_dir, probe, model_sha256, settings.trt_precision, wanted)
    if search.plan is None:
        why = (
            f"no {settings.trt_precision} plan for {probe.describe()} and model "
            f"{model_sha256[:HASH_CHARS]}: {search.why_none()}; {BUILD_HINT}"
        )
        if settings.kind == "trt":
            raise NoMatchingPlan(f"{kind_var}=trt, but {why}")
        return Choice("ort", f"TensorRT not used: {why}")
    return Choice("trt", f"plan {search.plan.plan_file}", search.plan, probe)


def load_engine(
    settings: EngineConfig,
    *,
    warm: bool = True,
    probe: Callable[[], Probe] = detect_machine,
) -> Engine:
    """The engine ``settings`` ask for, warmed up when ``warm``; ``ModelNotBuilt`` when no
    usable FP32 model is on disk (a defective INT8 graph only costs speed, see ``_ort``)."""
    from engines.model import find_model, read_manifest

    model_dir = Path(settings.model_dir)
    model = find_model(model_dir)
    digest = str(read_manifest(model_dir)["sha256"])
    machine = probe() if settings.kind != "ort" else Unavailable("not probed")
    choice = choose(settings, digest, machine)
    reason = choice.reason
    if choice.kind == "trt":
        assert choice.plan is not None and choice.machine is not None
        try:
            return _load_trt(choice.plan, choice.machine, digest, settings.kind, warm)
        except Exception as exc:
            # kind=auto promises a working engine: whatever the TensorRT bindings raise (their
            # API moves between versions), ONNX Runtime still serves.
            if settings.kind == "trt":
                raise
            expected = (EngineError, PlanError, NoMatchingPlan, ImportError, OSError)
            if not isinstance(exc, expected):
                log.warning("TensorRT failed unexpectedly; using ONNX Runtime", exc_info=True)
            reason = f"TensorRT plan {choice.plan.plan_file} failed to load: {first_line(exc)}"
    precision, why_precision = resolved_precision(settings.ort_precision)
    engine, graph, why_fp32 = _ort(settings, precision, model_dir, model, digest, warm)
    if why_fp32:
        # The operator asked for INT8 and gets FP32: say so once, loudly enough to be seen.
        log.warning(
            "engine: ONNX Runtime FP32 instead of INT8 (%s), model %s: %s",
            why_fp32,
            graph.name,
            reason,
        )
    else:
        log.info(
            "engine: ONNX Runtime %s (%s threads), model %s (kind=%s, %s): %s",
            "FP32" if graph == model else "INT8",
            settings.threads,
            graph.name,
            settings.kind,
            why_precision,
            reason,
        )
    return engine


def _ort(
    settings: EngineConfig,
    precision: str,
    model_dir: Path,
    fp32: Path,
    fp32_sha256: str,
    warm: bool,
) -> tuple[Engine, Path, str]:
    """(engine, its graph, why FP32 although INT8 was asked for, or "") for ONNX Runtime,
    ``precision`` being ``settings.ort_precision`` resolved for this CPU.

    Every INT8 defect is one reason for FP32, not a failure: missing, stale, tampered, or
    bytes that ONNX Runtime cannot load or run (another onnxruntime, a half-written build).
    The FP32 graph gives the same boxes within the measured agreement (bench/int8.py), only
    slower. With ``warm=False`` an INT8 graph that loads but cannot run fails at its first
    inference instead.
    """
    from engines.model import find_int8_model, int8_not_built, not_built

    why_fp32 = ""
    if precision == "int8":
        try:
            int8 = find_int8_model(model_dir, fp32_sha256)
            return _ort_graph(int8, model_dir, int8_not_built, settings.threads, warm), int8, ""
        except ModelNotBuilt as exc:
            why_fp32 = str(exc)
    return _ort_graph(fp32, model_dir, not_built, settings.threads, warm), fp32, why_fp32


def resolved_precision(asked: str, cpuinfo: str | None = None) -> tuple[str, str]:
    """(int8 | fp32, why) for ``engine.ort_precision``: ``auto`` is INT8 where the CPU has
    int8 dot products (engines/cpu.py), FP32 elsewhere."""
    if asked != "auto":
        return asked, f"ort_precision={asked}"
    exact, why = int8_dot_product(cpuinfo)
    return ("int8" if exact else "fp32"), f"ort_precision=auto: {why}"


def _ort_graph(graph: Path, model_dir: Path, fail: NotBuilt, threads: int, warm: bool) -> Engine:
    """ONNX Runtime on ``graph``; ``fail``'s ModelNotBuilt (naming the file, ONNX Runtime's
    reason and the command that rebuilds it) when the graph cannot load or run."""
    from engines.ort import GraphNotLoadable, OrtEngine

    try:
        engine = OrtEngine(graph, threads=threads)
    except GraphNotLoadable as exc:
        raise fail(model_dir, f"ONNX Runtime cannot load {graph.name} ({exc.reason})") from exc
    try:
        return _started(engine, warm)
    except Exception as exc:
        # Whatever the run raised (ORT's error, outputs of the wrong shape): the graph on disk
        # is not one this code can serve.
        why = first_line(exc)
        if not isinstance(exc, EngineError):
            why = f"{type(exc).__name__}: {why}"
        raise fail(model_dir, f"{graph.name} failed its warm-up run ({why})") from exc


def _started(engine: Engine, warm: bool) -> Engine:
    """``engine``, warmed up when ``warm``; closed when its warm-up raises."""
    if warm:
        try:
            engine.warm_up()
        except BaseException:
            engine.close()
            raise
    return engine


def _load_trt(plan: PlanManifest, machine: Machine, digest: str, kind: str, warm: bool) -> Engine:
    from engines.trt import TrtEngine

    engine = _started(TrtEngine(plan, machine, digest), warm)
    log.info(
        "engine: TensorRT %s on %s, plan %s, batch 1..%d (kind=%s)",
        plan.precision,
        machine.describe(),
        plan.plan_file,
        plan.max_batch,
        kind,
    )
    return engine
