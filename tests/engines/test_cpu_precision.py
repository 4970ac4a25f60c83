"""engine.ort_precision = auto: INT8 only where the CPU multiplies int8 without saturating."""

from __future__ import annotations

import pytest

from engines.cpu import cpu_flags, int8_dot_product
from engines.loader import resolved_precision
from sidecar.settings import SettingsError, load

AVX2_ONLY = "processor\t: 0\nvendor_id\t: AuthenticAMD\nflags\t\t: fpu sse2 avx fma avx2 bmi2\n"
VNNI = "processor\t: 0\nflags\t\t: fpu avx2 avx512f avx512bw avx512_vnni\n"
ALDER_LAKE = "processor\t: 0\nflags\t\t: fpu avx2 avx_vnni\n"
ARM_DOT = "processor\t: 0\nFeatures\t: fp asimd crc32 asimddp\n"


def test_the_flags_are_read_from_cpuinfo() -> None:
    assert {"avx2", "fma"} <= cpu_flags(AVX2_ONLY)
    assert "asimddp" in cpu_flags(ARM_DOT)
    assert cpu_flags("no flags here\n") == set()


@pytest.mark.parametrize(
    ("cpuinfo", "precision"),
    [(AVX2_ONLY, "fp32"), (VNNI, "int8"), (ALDER_LAKE, "int8"), (ARM_DOT, "int8"), ("", "fp32")],
)
def test_auto_is_int8_only_with_int8_dot_products(cpuinfo: str, precision: str) -> None:
    chosen, why = resolved_precision("auto", cpuinfo)
    assert chosen == precision
    assert why.startswith("ort_precision=auto: ")
    assert int8_dot_product(cpuinfo)[0] == (precision == "int8")


@pytest.mark.parametrize("asked", ["int8", "fp32"])
def test_an_explicit_precision_is_kept_whatever_the_cpu(asked: str) -> None:
    assert resolved_precision(asked, AVX2_ONLY)[0] == asked
    assert resolved_precision(asked, VNNI)[0] == asked


def test_auto_is_the_default_and_a_wrong_value_names_its_variable() -> None:
    assert load(environ={}).engine.ort_precision == "auto"
    with pytest.raises(SettingsError, match="HEATCROP_ENGINE_ORT_PRECISION"):
        load(environ={"HEATCROP_ENGINE_ORT_PRECISION": "int4"})
