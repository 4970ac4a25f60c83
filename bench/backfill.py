"""``heatcrop backfill`` throughput with 1 and 2 workers on this machine (issue 26, item 4).

    python -m bench.backfill [--out bench/results/backfill.md] [--originals 600] [--rounds 3]

One local Ray session (``ray.init(num_cpus=2)``) and one throwaway redis-server; ``--originals``
distinct originals (the photos of ``--photos`` copied under new names until there are enough:
each copy has its own identity, so its own decode and CNN run). Each round empties Redis and
backfills the whole folder with each worker count in turn, the order alternating round by round
(1 2, 2 1, 1 2 ...) so that a drift of the shared machine's load weighs on both. Per run: the
originals computed per second while every worker is busy (``busy``: each worker's originals
over its own span from its first batch's start to its last batch's end, by its clock, summed:
what a long run keeps up), the same as the driver sees it from the first result to the last
(``steady``, the measure of the reports before 2026-12-06 16:30: the driver gets results 1-2 s
after the workers made them, late at the start and in a burst at the end, which shortens its
window), the same over the whole run (``wall``, start-up included), the 1-minute load average
before the run (``os.getloadavg``, as ``uptime`` prints it), and where the machine's CPU went
during the run (bench/proc_cpu.py: the workers, the driver, Ray's other processes,
redis-server, the machine's other jobs, processes that began and ended within the run, idle).
The report gives every run and the medians per worker count, and the ratio of the medians
against the goal (2 workers ≥ 1.7 × one); the previous report's table and medians are kept
below it as "before".
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import socket
import statistics
import subprocess
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import ray

from bench import proc_cpu
from bench.service import cpu_model
from sidecar.backfill_ray import Listing, Plan, run_backfill
from sidecar.settings import CacheSettings, EngineSettings, Settings, SourceSettings
from training.data import publish

DEFAULT_PHOTOS = Path("../shared/eval/fcdb_dev/images")
GOAL = 1.7  # two single-thread workers against one, on two cores
# heatcrop backfill's own batch size (--batch): the bench runs the backfill as users run it.
BATCH = Plan().batch_size
WORKER_NICENESS = 0
# "short-lived": CPU no process seen at both ends of the run spent (the cores' busy time from
# /proc/stat less what the long-lived processes spent): other jobs' short commands.
GROUPS = ("workers", "driver", "ray", "redis", "other jobs", "short-lived", "idle")


@dataclass(frozen=True)
class Run:
    workers: int
    busy_per_s: float
    steady_per_s: float
    wall_per_s: float
    seconds: float
    done: int
    failed: int
    load: float
    cpu_ms: float  # the actors' CPU per original (Prepare and Analyse; not Ray's own processes)
    cores: float  # the actors' CPU seconds over the run's seconds: the cores they got
    spent: dict[str, float]  # CPU seconds per group of GROUPS over the whole run (proc_cpu)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, default=Path("bench/results/backfill.md"))
    parser.add_argument("--photos", type=Path, default=DEFAULT_PHOTOS)
    parser.add_argument("--originals", type=int, default=600)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--model-dir", default="build/model")
    args = parser.parse_args()
    before = previous(args.out)
    photos = sorted(p for p in args.photos.iterdir() if p.suffix.lower() in (".jpg", ".jpeg"))
    with tempfile.TemporaryDirectory(prefix="heatcrop-backfill-") as tmp:
        root = Path(tmp) / "originals"
        copy_originals(photos, root, args.originals)
        runs, per_record = measure(root, Path(tmp), args.model_dir, args.rounds)
        decodes, faces = decode_and_faces(root, args.model_dir)
    publish(report(runs, per_record, (decodes, faces), args, len(photos)) + before, args.out)


def previous(out: Path) -> str:
    """The last report's header, table and medians, with its commit: the "before" of this one."""
    if not out.exists():
        return ""
    text = out.read_text().split("\n## Before", 1)[0]
    lines = text.splitlines()
    head = [ln for ln in lines if ln.startswith("`python -m")][:1]
    table = [ln for ln in lines if ln.startswith("|")]
    table = table[: next((i for i, ln in enumerate(table[2:], 2) if ln.startswith("| run")), None)]
    medians = [ln for ln in lines if ln.startswith("Medians")]
    keep = [*head, "", *table, "", *medians]
    commit = subprocess.run(
        ["git", "log", "-1", "--format=%h %cd", "--date=format:%H:%M UTC", "--", str(out)],
        capture_output=True, text=True, check=False,
    ).stdout.strip()  # fmt: skip
    return "\n".join(["", f"## Before (the report of commit {commit or '?'})", "", *keep, ""])


def copy_originals(photos: list[Path], root: Path, count: int) -> None:
    for i in range(count):
        src = photos[i % len(photos)]
        dst = root / f"set{i // len(photos)}" / src.name
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src, dst)


def measure(root: Path, work: Path, model_dir: str, rounds: int) -> tuple[list[Run], float]:
    """Every run, and Redis' bytes per heatmap after the last one."""
    port = free_port()
    redis_proc = subprocess.Popen(
        ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "",
         "--appendonly", "no", "--dir", str(work), "--loglevel", "warning"],
        stdout=subprocess.DEVNULL,
    )  # fmt: skip
    settings = Settings(
        source=SourceSettings(root=str(root)),
        engine=EngineSettings(model_dir=model_dir, threads=1),
        cache=CacheSettings(backend="redis", redis_url=f"redis://127.0.0.1:{port}/0"),
    ).validate()
    # Ray starts its workers at nice 15 (its worker_niceness): on this shared machine they would
    # get only what the other jobs leave, and the runs would measure those jobs. A Ray node of
    # its own has nothing to yield to; here the workers compete on equal terms.
    os.environ["RAY_worker_niceness"] = str(WORKER_NICENESS)  # noqa: SIM112 - as Ray spells it
    ray.init(num_cpus=2, include_dashboard=False, logging_level=logging.WARNING)
    runs, per_record = [], 0.0
    try:
        wait_for(port)
        for r in range(rounds):
            for workers in (1, 2) if r % 2 == 0 else (2, 1):
                flush(port)
                runs.append(one_run(settings, root, workers, redis_proc.pid))
                print(runs[-1], flush=True)
        per_record = record_bytes(port)
    finally:
        ray.shutdown()
        redis_proc.terminate()
        redis_proc.wait(timeout=10)
    return runs, per_record


def one_run(settings: Settings, root: Path, workers: int, redis_pid: int) -> Run:
    load = os.getloadavg()[0]
    plan = Plan(workers, batch_size=BATCH)
    start = proc_cpu.snapshot()
    summary = run_backfill(settings, Listing(walk=root), plan, progress=None)
    spent = proc_cpu.where_it_went(start, proc_cpu.snapshot(), _grouper(redis_pid))
    cpu, wall = summary.cpu_s, summary.seconds
    spent["short-lived"] = max(0.0, wall * (os.cpu_count() or 1) - sum(spent.values()))
    return Run(
        workers,
        summary.busy_per_s(),
        summary.steady_per_s(),
        round(summary.done / summary.seconds, 2),
        round(summary.seconds, 2),
        summary.done,
        summary.failures,
        round(load, 2),
        round(cpu / max(summary.done, 1) * 1e3, 1),
        round(cpu / wall, 2),
        spent,
    )


def _grouper(redis_pid: int) -> Callable[[int, str], str]:
    driver = os.getpid()

    def group(pid: int, cmd: str) -> str:
        if cmd.startswith("ray::MapWorker"):
            return "workers"
        if pid == driver:
            return "driver"
        if cmd.startswith("ray::") or "/site-packages/ray/" in cmd:
            return "ray"
        return "redis" if pid == redis_pid else "other jobs"

    return group


def decode_and_faces(root: Path, model_dir: str, count: int = 200) -> tuple[float, float]:
    """(originals decoded to their model bucket per second, face detections per second), each
    on one thread, as a backfill's actor runs them on its core (sidecar/decode.py before the
    engine call, the detector inside it): what a GPU's actors need from the CPUs."""
    from engines.faces import FaceDetector
    from sidecar.decode import configure_vips, decode
    from sidecar.faces import face_params

    configure_vips()
    datas = [f.read_bytes() for f in sorted(root.rglob("*.jpg"))[:count]]
    limits = SourceSettings()
    start = time.perf_counter()
    pixels = [decode(d, max_bytes=limits.max_bytes, max_pixels=limits.max_pixels) for d in datas]
    decodes = len(datas) / (time.perf_counter() - start)
    detector = FaceDetector(model_dir, face_params(Settings()))
    detector.warm_up()
    start = time.perf_counter()
    for decoded in pixels:
        detector.detect_batch(decoded.pixels[None])
    return decodes, len(pixels) / (time.perf_counter() - start)


def report(
    runs: list[Run],
    per_record: float,
    rates: tuple[float, float],
    args: argparse.Namespace,
    photos: int,
) -> str:
    by = {w: [r for r in runs if r.workers == w] for w in (1, 2)}
    med = {w: statistics.median(r.busy_per_s for r in rs) for w, rs in by.items()}
    steady = {w: statistics.median(r.steady_per_s for r in rs) for w, rs in by.items()}
    wall = {w: statistics.median(r.wall_per_s for r in rs) for w, rs in by.items()}
    ratio = med[2] / med[1] if med[1] else 0.0
    steady_ratio = steady[2] / steady[1] if steady[1] else 0.0
    lines = [
        "# Backfill throughput: 1 and 2 workers",
        "",
        f"`python -m bench.backfill --originals {args.originals} --rounds {args.rounds}` "
        f"({datetime.now(UTC):%Y-%m-%d %H:%M} UTC), {cpu_model()}, {os.cpu_count()} cores "
        "shared with other jobs; Ray local (`ray.init(num_cpus=2)`), a local redis-server, "
        f"{args.originals} originals ({photos} photos of `{args.photos}` under new names), "
        f"batches of {BATCH} (`heatcrop backfill`'s default), engine threads 1 (one "
        "single-thread worker per core), Ray's "
        f"workers at nice {WORKER_NICENESS} (`RAY_worker_niceness`; Ray's default, 15, leaves "
        "them only what the machine's other jobs do not take).",
        "",
        "| run | workers | load (1 min) before | originals computed | failed | s | busy img/s | "
        "steady img/s (driver) | wall img/s | CPU ms per original | cores it got |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for i, r in enumerate(runs, 1):
        lines.append(
            f"| {i} | {r.workers} | {r.load} | {r.done} | {r.failed} | {r.seconds} | "
            f"{r.busy_per_s} | {r.steady_per_s} | {r.wall_per_s} | {r.cpu_ms} | {r.cores} |"
        )
    lines += [
        "",
        "Where the 2 cores went during each run (CPU s from /proc over the whole run, start-up "
        "included, as cores: CPU s over the run's s; `ray` is Ray's other processes: raylet, "
        "GCS, the dashboard agent, the stats and autoscaling actors, idle workers; "
        "`short-lived`: processes that began and ended within the run, seen only in the cores' "
        "busy time):",
        "",
        "| run | workers | " + " | ".join(GROUPS) + " | workers' CPU ms per original | "
        "Ray's + driver's CPU ms per original |",
        "|---|---|" + "---|" * (len(GROUPS) + 2),
    ]
    for i, r in enumerate(runs, 1):
        cores = " | ".join(f"{r.spent.get(g, 0.0) / r.seconds:.2f}" for g in GROUPS)
        per = 1e3 / max(r.done, 1)
        ours = r.spent.get("workers", 0.0) * per
        ray_s = (r.spent.get("ray", 0.0) + r.spent.get("driver", 0.0)) * per
        lines.append(f"| {i} | {r.workers} | {cores} | {ours:.1f} | {ray_s:.1f} |")
    cpu_ms = {w: statistics.median(r.cpu_ms for r in rs) for w, rs in by.items()}
    cores = {w: statistics.median(r.cores for r in rs) for w, rs in by.items()}
    verdict = "met" if ratio >= GOAL else "not met"
    lines += [
        "",
        f"Medians: 1 worker {med[1]:.1f} img/s busy ({steady[1]:.1f} steady as the driver sees "
        f"it, {wall[1]:.1f} wall), 2 workers {med[2]:.1f} img/s busy ({steady[2]:.1f} steady, "
        f"{wall[2]:.1f} wall): **{ratio:.2f}×** busy (goal ≥ {GOAL}×: {verdict}); "
        f"{steady_ratio:.2f}× steady.",
        "",
        f"The workers' CPU per original (fetch, lookup, decode, CNN, faces, write; Ray's own "
        f"processes not counted): 1 worker {cpu_ms[1]:.0f} ms, 2 workers {cpu_ms[2]:.0f} ms; the "
        f"cores they got (their CPU s over the run's s): {cores[1]:.2f} and {cores[2]:.2f}. Where "
        "the CPU per original stays the same, the workers do not slow each other down, and two "
        "make what the cores they get allow.",
        "",
        f"Alone, one thread, 200 of the originals, after the runs: decode to the model bucket "
        f"(sidecar/decode.py) {rates[0]:.0f} originals/s; the face detector on those buckets "
        f"(engines/faces.py, as FaceEngine runs it) {rates[1]:.0f} photos/s.",
        "",
        f"Redis memory per heatmap (`MEMORY USAGE`, key and Redis' overhead included, mean of "
        f"200): {per_record:.0f} bytes.",
        "",
        "busy: each worker's originals over its own span, from the start of its first batch to "
        "the end of its last (its clock), summed over the workers: the rate with every worker "
        "busy, what a long run keeps up (the actors' start, which loads the engine and the face "
        "detector, and the last batches' tail, where one worker may have finished, left out); "
        "steady: originals computed from the first result the driver gets to the last, over "
        "that time (the measure of the reports before this one: the driver gets each result "
        "1-2 s after a worker made it, late at the start and in a burst at the end, so its "
        "window is short by up to a second or two); wall: over the whole run, Ray's dataset "
        "start-up included.",
        "",
    ]
    return "\n".join(lines)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for(port: int) -> None:
    import redis

    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            if redis.Redis(port=port).ping():
                return
        except redis.exceptions.ConnectionError:
            time.sleep(0.05)
    raise RuntimeError("redis-server did not start")


def record_bytes(port: int, sample: int = 200) -> float:
    """Mean bytes Redis spends per heatmap (MEMORY USAGE: value, key and Redis' own overhead)."""
    import redis

    client = redis.Redis(port=port)
    keys = list(client.scan_iter("heatcrop:v1:heatmaps:*", count=1000))[:sample]
    return statistics.mean(client.memory_usage(k) or 0 for k in keys) if keys else 0.0


def flush(port: int) -> None:
    import redis

    redis.Redis(port=port).flushall()


if __name__ == "__main__":
    main()
