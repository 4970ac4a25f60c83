"""Where a machine's CPU went between two moments: each process's CPU seconds from /proc, in
groups, and the idle time of all cores from /proc/stat (Linux only).

    before = snapshot()
    ...
    spent = where_it_went(before, snapshot(), groups)   # {"workers": 12.3, ..., "idle": 4.5}

A process that started and ended between the two snapshots is not seen: sample the long-lived
processes (Ray's workers and daemons, the driver, redis-server) rather than short tasks.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

TICK = os.sysconf("SC_CLK_TCK")


@dataclass(frozen=True)
class Snapshot:
    procs: dict[int, tuple[str, float]]  # pid: (command line, CPU seconds user + system)
    idle_s: float  # all cores' idle and iowait seconds since boot
    steal_s: float  # seconds the hypervisor ran something else on our cores


def snapshot() -> Snapshot:
    procs = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            got = _proc(entry)
            if got is not None:
                procs[int(entry.name)] = got
    fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]
    jiffies = [int(f) for f in fields]
    return Snapshot(procs, (jiffies[3] + jiffies[4]) / TICK, jiffies[7] / TICK)


def _proc(entry: Path) -> tuple[str, float] | None:
    try:
        stat = (entry / "stat").read_text()
        cmd = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:  # gone since the listing
        return None
    rest = stat[stat.rfind(")") + 2 :].split()
    return cmd.strip(), (int(rest[11]) + int(rest[12])) / TICK


def where_it_went(
    before: Snapshot, after: Snapshot, group: Callable[[int, str], str]
) -> dict[str, float]:
    """CPU seconds per group (``group(pid, command line)``) between the snapshots, plus
    ``idle`` and ``steal``: the seconds no process of this machine, or of ours, ran."""
    out: dict[str, float] = {}
    for pid, (cmd, cpu) in after.procs.items():
        spent = cpu - before.procs.get(pid, (cmd, 0.0))[1]
        if spent > 0:
            name = group(pid, cmd)
            out[name] = out.get(name, 0.0) + spent
    out["idle"] = after.idle_s - before.idle_s
    out["steal"] = after.steal_s - before.steal_s
    return out
