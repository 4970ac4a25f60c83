"""Benchmarks: crop quality on ../shared/eval (bench.quality), speed (bench.speed), load
(bench.load). They report; tests assert. Fitting and tuning live in training/."""
