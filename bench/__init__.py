"""Benchmarks: crop quality on ../shared/eval (bench.quality), speed (bench.speed). They report;
tests assert."""
