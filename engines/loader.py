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
from typing import Protocol

from engines import buckets
from engines.artifacts import HASH_CHARS
from engines.base import Engine
from engines.errors import EngineError, ModelNotBuilt
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
    def ort_precision(self) -> str: ...  # int8 | fp32

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
    from engines.model import find_model, read_manifest
    from engines.ort import OrtEngine

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
            first_line = (str(exc).splitlines() or ["?"])[0]
            reason = f"TensorRT plan {choice.plan.plan_file} failed to load: {first_line}"
    graph, precision, why_fp32 = ort_graph(settings, model_dir, model, digest)
    engine: Engine = OrtEngine(graph, threads=settings.threads)
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
            "engine: ONNX Runtime %s (%s threads), model %s (kind=%s): %s",
            precision.upper(),
            settings.threads,
            graph.name,
            settings.kind,
            reason,
        )
    if warm:
        engine.warm_up()
    return engine


def ort_graph(
    settings: EngineConfig, model_dir: Path, fp32: Path, fp32_sha256: str
) -> tuple[Path, str, str]:
    """(graph, precision, why FP32 although INT8 was asked for, or "") for ONNX Runtime.

    A missing or stale INT8 graph is not fatal: the FP32 graph gives the same boxes within
    the measured agreement (bench/int8.py), only slower.
    """
    from engines.model import find_int8_model

    if settings.ort_precision != "int8":
        return fp32, "fp32", ""
    try:
        return find_int8_model(model_dir, fp32_sha256), "int8", ""
    except ModelNotBuilt as exc:
        return fp32, "fp32", str(exc)


def _load_trt(plan: PlanManifest, machine: Machine, digest: str, kind: str, warm: bool) -> Engine:
    from engines.trt import TrtEngine

    engine = TrtEngine(plan, machine, digest)
    if warm:
        try:
            engine.warm_up()
        except BaseException:
            engine.close()
            raise
    log.info(
        "engine: TensorRT %s on %s, plan %s, batch 1..%d (kind=%s)",
        plan.precision,
        machine.describe(),
        plan.plan_file,
        plan.max_batch,
        kind,
    )
    return engine
