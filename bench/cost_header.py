"""The original's header parsed once on the cold path: fetch + decode before and after.

    python -m bench.cost_header [--photos 100] [--dir ../shared/eval/fcdb_dev/images]
        [--rounds 3]

The service reads an original's header at the fetch (``sources.checked_header``: the size
limits and the size cached records must match) and decodes it in the decode pool. Before
issue 25's change the decode parsed the header again; now it takes the fetch's (sidecar/decode.py).
Timed here on the service's own functions, photo by photo in a rotating order (bench.cold_path's
``rotating``: best round's median), in one process with ``configure_vips()`` as the sidecar:

- fetch's header + decode parsing it again (before);
- fetch's header + decode given it (now);
- the header alone (what the second parse cost).

Printed, not written: the figure goes into the commit and docs/performance.md.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from bench.cold_path import rotating
from sidecar.decode import configure_vips, decode, read_header
from sidecar.settings import SourceSettings

DEFAULT_PHOTOS = Path("../shared/eval/fcdb_dev/images")


def variants(photos: Sequence[bytes], limits: SourceSettings) -> dict[str, Callable[[int], object]]:
    lim = {"max_bytes": limits.max_bytes, "max_pixels": limits.max_pixels}

    def twice(i: int) -> object:
        read_header(photos[i], **lim)
        return decode(photos[i], **lim)

    def once(i: int) -> object:
        return decode(photos[i], **lim, header=read_header(photos[i], **lim))

    return {
        "fetch's header + decode parsing it again (before)": twice,
        "fetch's header + decode given it (now)": once,
        "the header alone (`read_header`)": lambda i: read_header(photos[i], **lim),
    }


def paired(photos: Sequence[bytes], limits: SourceSettings, rounds: int) -> float:
    """Median over photos and rounds of (before - now) ms, each pair timed back to back."""
    fns = variants(photos, limits)
    before, now = list(fns.values())[:2]
    diffs = []
    for r in range(rounds):
        for i in range(len(photos)):
            pair = (before, now) if (r + i) % 2 else (now, before)
            ms = {}
            for fn in pair:
                t0 = time.perf_counter()
                fn(i)
                ms[fn] = (time.perf_counter() - t0) * 1e3
            diffs.append(ms[before] - ms[now])
    return statistics.median(diffs)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--photos", type=int, default=100)
    parser.add_argument("--dir", type=Path, default=DEFAULT_PHOTOS)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args(argv)
    configure_vips()
    photos = [p.read_bytes() for p in sorted(args.dir.glob("*.jpg"))[: args.photos]]
    if not photos:
        sys.exit(f"no photos in {args.dir}")
    limits = SourceSettings()
    load = os.getloadavg()[0]
    best = rotating(variants(photos, limits), len(photos), args.rounds)
    diff = paired(photos, limits, args.rounds)
    print(f"{len(photos)} photos of {args.dir}, best of {args.rounds} rounds, load {load:.2f}:")
    for name, ms in best.items():
        print(f"  {name}: {ms:.3f} ms/photo (median)")
    print(f"  paired before - now, median over photos x rounds: {diff:+.3f} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
