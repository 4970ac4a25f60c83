"""Two sidecar settings side by side on cold photos: before/after figures for one change.

    python -m bench.cost_ab HEATCROP_SERVER_MAX_WAIT_MS=2 HEATCROP_SERVER_MAX_WAIT_MS=0 \
        [--photos 100] [--rounds 2] [--in-flight 2 4]

A and B are comma-separated HEATCROP_* assignments (empty: the defaults) on top of bench.cost's
sidecar (faces as the settings say, 60 s deadline). Each round starts fresh sidecars: one cold
request at a time to A and B in turn (order alternating per photo), paired per photo, with the
sidecars' own stage means; then each in-flight level on fresh sidecars, A and B in rotating
order, on other photos. Printed, not written: the figures go into the commit that makes the
change.
"""

from __future__ import annotations

import argparse
import os
import statistics
from collections.abc import Mapping, Sequence
from pathlib import Path

from bench.cost import DEFAULT_PHOTOS, Client, http_saturation, stage_means, why
from bench.cost_stats import rotated
from bench.service import scrape, sidecar


def parse(assignments: str) -> dict[str, str]:
    pairs = (kv.split("=", 1) for kv in assignments.split(",") if kv)
    return {k: v for k, v in pairs}


def env(root: Path, extra: Mapping[str, str]) -> dict[str, str]:
    return {
        "HEATCROP_SOURCE_KIND": "folder",
        "HEATCROP_SOURCE_ROOT": str(root.resolve()),
        "HEATCROP_SERVER_DEADLINE_MS": "60000",
        **extra,
    }


def one_at_a_time(r: int, root: Path, sides: Mapping[str, dict[str, str]], names: Sequence[str],
                  warm: Sequence[str]) -> str:  # fmt: skip
    with sidecar(env(root, sides["A"]), None) as a, sidecar(env(root, sides["B"]), None) as b:
        services = {"A": a, "B": b}
        clients = {k: Client(s.base) for k, s in services.items()}
        for name in warm:
            for c in clients.values():
                c.crop(name)
        before = {k: scrape(s) for k, s in services.items()}
        ms: dict[str, list[float]] = {"A": [], "B": []}
        for i, name in enumerate(names):
            for side in rotated(["A", "B"], r + i):
                kind, t = clients[side].crop(name)
                if kind != "cold":
                    raise RuntimeError(f"{side} answered {name} {kind}, not cold")
                ms[side].append(t)
        stages = {k: stage_means(before[k], scrape(s)) for k, s in services.items()}
    paired = statistics.median(b - a for a, b in zip(ms["A"], ms["B"], strict=True))
    detail = "; ".join(
        f"{k}: median {statistics.median(ms[k]):.2f} ms, stages "
        + ", ".join(f"{s} {v:.2f}" for s, v in stages[k].items())
        for k in ("A", "B")
    )
    return f"one at a time, B - A paired median {paired:+.2f} ms; {detail}"


def saturated(r: int, root: Path, sides: Mapping[str, dict[str, str]], names: Sequence[str],
              warm: Sequence[str], in_flight: Sequence[int]) -> list[str]:  # fmt: skip
    lines = []
    for k, n in enumerate(in_flight):
        for side in rotated(["A", "B"], r + k):
            with sidecar(env(root, sides[side]), None) as svc:
                client = Client(svc.base)
                for name in warm:
                    client.crop(name)
                client.close()
                s = http_saturation(svc, names, n)
            lines.append(
                f"{n} in flight {side}: {s.rate:.1f} img/s, CPU {s.cpu_ms:.1f} ms/photo, "
                f"{s.kinds}{why(s)}"
            )
    return lines


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("a", help="A's HEATCROP_* assignments, comma-separated")
    parser.add_argument("b", help="B's")
    parser.add_argument("--dir", type=Path, default=DEFAULT_PHOTOS)
    parser.add_argument("--photos", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--in-flight", type=int, nargs="+", default=[2, 4])
    args = parser.parse_args(argv)
    names = sorted(p.name for p in args.dir.glob("*.jpg"))
    warm, first, second = names[:2], names[2 : 2 + args.photos], names[2 + args.photos :]
    second = second[: args.photos] or first
    sides = {"A": parse(args.a), "B": parse(args.b)}
    for r in range(args.rounds):
        print(f"round {r + 1}, load {os.getloadavg()[0]:.2f}, A={sides['A']}, B={sides['B']}")
        print("  " + one_at_a_time(r, args.dir, sides, first, warm))
        for line in saturated(r, args.dir, sides, second, warm, args.in_flight):
            print("  " + line)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
