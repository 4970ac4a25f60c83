"""Whether this CPU runs ONNX Runtime's INT8 kernels without losing precision.

On x86, ONNX Runtime multiplies uint8 activations by int8 weights with VNNI (``vpdpbusd``,
int32 sums) where the CPU has it, or AMX; without it (AVX2 only: AMD Zen 2/3, Intel before
Cascade Lake) it uses ``vpmaddubsw``, whose int16 pairwise sums saturate unless the weights are
7-bit. heatcrop's INT8 graph has 7-bit weights (``engines.quantize.QUANT_SETTINGS``), so it is
correct everywhere, but on an AVX2-only CPU it lost 1.9 points of a headroom share against FP32
(``bench/results/int8.md``, 2026-12-06, AMD EPYC without VNNI): over the one-point rule. So
``engine.ort_precision = "auto"`` runs INT8 only where the CPU has int8 dot products.
ARM's dot-product instructions (``asimddp``) also sum in int32.
"""

from __future__ import annotations

from pathlib import Path

CPUINFO = Path("/proc/cpuinfo")
INT8_DOT_FLAGS = ("avx512_vnni", "avx_vnni", "amx_int8", "asimddp")


def cpu_flags(cpuinfo: str) -> set[str]:
    """The feature flags of the first processor in ``/proc/cpuinfo``'s text (x86 ``flags``,
    ARM ``Features``)."""
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            return set(value.split())
    return set()


def int8_dot_product(cpuinfo: str | None = None) -> tuple[bool, str]:
    """(whether INT8 keeps FP32's crops on this CPU, why), from ``/proc/cpuinfo``."""
    if cpuinfo is None:
        try:
            cpuinfo = CPUINFO.read_text()
        except OSError:
            return False, "the CPU's features are unknown (no /proc/cpuinfo)"
    found = [f for f in INT8_DOT_FLAGS if f in cpu_flags(cpuinfo)]
    if found:
        return True, f"the CPU has int8 dot products ({found[0]})"
    return False, "the CPU has no int8 dot products (VNNI, AMX): INT8 lost 1.9 points there"
