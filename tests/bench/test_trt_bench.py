"""bench/gpu.py where there is no GPU, and its arithmetic."""

from __future__ import annotations

import pytest

from bench import gpu
from engines.plans import Machine, Unavailable, detect_machine


def test_without_a_gpu_it_says_not_measured(capsys):
    if isinstance(detect_machine(), Machine):
        pytest.skip("a GPU with TensorRT is present here")
    assert gpu.main([]) == 1
    out = capsys.readouterr().out
    assert out.startswith("GPU figures: not measured (TensorRT not importable")


def test_unavailable_reason_is_printed(capsys):
    assert gpu.main([], probe=lambda: Unavailable("no CUDA GPU #0 (0 visible)")) == 1
    assert capsys.readouterr().out == "GPU figures: not measured (no CUDA GPU #0 (0 visible))\n"


def test_rates():
    rate, p50, p99 = gpu.rates([0.010] * 99 + [0.020], batch=8)
    assert rate == pytest.approx(8 * 100 / 1.01)
    assert p50 == pytest.approx(10.0) and p99 == pytest.approx(10.0)
    _, _, p99 = gpu.rates([0.010] * 98 + [0.020, 0.030], batch=1)
    assert p99 == pytest.approx(20.0)
    with pytest.raises(ValueError, match="no calls"):
        gpu.rates([], batch=1)


def test_time_calls_warms_up_first():
    calls = []
    times = gpu.time_calls(lambda: calls.append(1), seconds=0.0, min_calls=5, warm=2)
    assert len(times) == 5 and len(calls) == 7
