"""``heatcrop backfill``: the heatmaps of millions of originals, ahead of traffic, on Ray Data.

Ray Data's batch-inference pattern, with the sidecar's own code in each stage
(sidecar/backfill.py):

    listing (streamed: a file of paths split into byte ranges, or the source root walked),
    one row per batch of paths
      -> Backfill, an actor pool (model loaded once per actor), one row per call:
         fetch, key, batched cache lookup, decode (Prepare), then engine, make_analysis,
         put_analysis (Analyse)
      -> the driver sums each batch's outcome counts: progress, then a summary

Ray does the scheduling, the streaming and the backpressure (a bounded number of blocks in
flight per stage, and of batches queued per actor); nothing here is cluster code of our own.
Each worker, CPU or GPU, decodes and runs its own engine on its core: the decoded pixels
never cross processes. With ``gpus`` the actors take ``num_gpus=1`` (or a share of one) each
and load the TensorRT plan where one is built (``engine.kind`` auto).

A listing row holds a whole batch, and the read makes each row its own block
(``_shape_blocks``): Ray Data's read otherwise merges the rows of a read task into blocks of
up to ``target_max_block_size`` (128 MiB: a walk would yield nothing before the end of its
first million paths), then splits them into 200 small blocks, which the actors then wait for
a few rows at a time (measured: two workers idle a third of the time; bench/results/backfill.md).

Only ``heatcrop backfill`` imports this module: the sidecar never imports Ray
(tests/cluster/test_no_ray_in_sidecar.py).
"""

from __future__ import annotations

import itertools
import json
import logging
import math
import os
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

import pyarrow as pa
import ray
import ray.data
from ray.data.block import BlockMetadata
from ray.data.datasource import Datasource, ReadTask

from sidecar.backfill import (
    DONE,
    Backfill,
    BackfillSummary,
    require_shared_cache,
    service_version,
)
from sidecar.settings import Settings
from sidecar.warm import read_paths

log = logging.getLogger("heatcrop.backfill")

# A listing file is read in ranges of this many bytes (~20,000 paths), one read task each.
CHUNK_BYTES = 1 << 20
# The read's target block size: any row (a batch of paths) is over it, so Ray Data emits each
# row as a block of its own, as soon as it is read (see the module docstring).
ROW_BLOCK_BYTES = 1
# Reading a listing is next to no CPU: it must never wait for a core the workers hold.
READ_CPUS = 0.0
# Batches sent to an actor at once, the one it runs included (Ray's
# max_tasks_in_flight_per_actor): one waits at the actor, which so never waits on the driver
# (measured: a result reaches the driver 1-2 s after the actor made it); bounds its memory.
QUEUED_PER_ACTOR = 2


@dataclass(frozen=True)
class Listing:
    """Which originals: the paths in ``file`` (one a line, ``#`` comments), or every file
    under ``walk`` (the folder source's root)."""

    file: Path | None = None
    walk: Path | None = None

    def __post_init__(self) -> None:
        if (self.file is None) == (self.walk is None):
            raise ValueError("a listing is a file of paths or a folder to walk, not both")


class ListingDatasource(Datasource):
    """The listing as rows of ``rows`` paths each (column ``paths``), read on the driver's node
    (where the file is, or the folder walked)."""

    def __init__(self, listing: Listing, rows: int) -> None:
        super().__init__()
        self.listing = listing
        self.rows = rows

    def estimate_inmemory_data_size(self) -> int | None:
        return None

    @property
    def supports_distributed_reads(self) -> bool:
        return False  # Ray Data then runs the reads on the driver's node

    def read_tasks(self) -> int:
        """How many read tasks the listing makes at most: one per CHUNK_BYTES of the file, one
        walk. Asked for no more blocks than this, Ray Data splits none of them."""
        if self.listing.file is None:
            return 1
        return max(1, math.ceil(self.listing.file.stat().st_size / CHUNK_BYTES))

    def get_read_tasks(
        self, parallelism: int, per_task_row_limit: int | None = None, **kwargs: Any
    ) -> list[ReadTask]:
        meta = BlockMetadata(num_rows=None, size_bytes=None, input_files=None, exec_stats=None)
        rows = self.rows
        if self.listing.walk is not None:
            root = self.listing.walk
            return [ReadTask(lambda: _blocks(_walked(root), rows), meta)]
        path = self.listing.file
        assert path is not None
        size = path.stat().st_size
        parts = max(1, min(max(parallelism, 1), self.read_tasks()))
        edges = [size * k // parts for k in range(parts + 1)]
        return [
            ReadTask(lambda a=a, b=b: _blocks(_lines(path, a, b), rows), meta)
            for a, b in itertools.pairwise(edges)
        ]


def _lines(path: Path, start: int, end: int) -> Iterator[str]:
    """The lines that begin in [start, end) of ``path``, without their line ends."""
    with path.open("rb") as f:
        if start:
            f.seek(start - 1)
            f.readline()  # the end of the line that began in the range before
        while f.tell() < end:
            line = f.readline()
            if not line:
                return
            yield line.decode("utf-8", "replace")


def _walked(root: Path) -> Iterator[str]:
    """Every regular file under ``root`` as a path relative to it, one folder at a time."""
    for folder, dirs, files in os.walk(root):
        dirs.sort()
        rel = Path(folder).relative_to(root)
        for name in sorted(files):
            if os.path.isfile(os.path.join(folder, name)):
                yield (rel / name).as_posix()


def _blocks(lines: Iterator[str], rows: int) -> Iterator[pa.Table]:
    """One table of one row per ``rows`` paths (the last may hold fewer)."""
    chunk: list[str] = []
    for line in lines:
        chunk += read_paths([line])
        if len(chunk) >= rows:
            yield _table(chunk)
            chunk = []
    if chunk:
        yield _table(chunk)


def _table(paths: list[str]) -> pa.Table:
    return pa.table({"paths": pa.array([paths], type=pa.list_(pa.string()))})


def listing_dataset(listing: Listing, batch_size: int) -> ray.data.Dataset:
    """The listing as a dataset of one block per batch of paths, streamed (module docstring)."""
    source = ListingDatasource(listing, batch_size)
    ds = ray.data.read_datasource(
        source, num_cpus=READ_CPUS, override_num_blocks=source.read_tasks()
    )
    _shape_blocks(ds.context)
    return ds


def _shape_blocks(context: ray.data.DataContext) -> None:
    # The dataset's own copy of the context: the driver's other datasets keep Ray's default.
    context.target_max_block_size = ROW_BLOCK_BYTES


@dataclass(frozen=True)
class Plan:
    """How many workers, and of which kind."""

    workers: int = 1  # CPU actors, one core each (engine.threads threads)
    gpus: int = 0  # GPU actors instead, on this many GPUs
    # Actors sharing one GPU, each with a core: each decodes its originals (~10 ms a photo)
    # and, with faces on, runs the face detector (a few ms) on its core, which one actor alone
    # would make the limit of a GPU that runs thousands of heatmaps a second.
    actors_per_gpu: int = 1
    batch_size: int = 32  # originals per batch: one cache lookup, one Ray block

    def __post_init__(self) -> None:
        if min(self.workers, self.actors_per_gpu, self.batch_size) < 1 or self.gpus < 0:
            raise ValueError("workers, actors per GPU and batch size must be >= 1, gpus >= 0")

    @property
    def actors(self) -> int:
        return self.gpus * self.actors_per_gpu if self.gpus else self.workers

    def actor_resources(self) -> dict[str, float]:
        if self.gpus:
            return {"num_cpus": 1, "num_gpus": 1 / self.actors_per_gpu}
        return {"num_cpus": 1}


def run_backfill(
    settings: Settings,
    listing: Listing,
    plan: Plan = Plan(),
    *,
    progress: TextIO | None = sys.stderr,
    every_s: float = 10.0,
) -> BackfillSummary:
    """Compute and store the heatmap of every original of ``listing`` not cached yet, on the
    Ray cluster this process is connected to (``ray.init`` first); see the module docstring."""
    require_shared_cache(settings)
    ray.data.DataContext.get_current().enable_progress_bars = False
    actor = plan.actor_resources()
    version = ray.get(ray.remote(**actor)(service_version).remote(settings))
    log.info("backfill: heatmaps keyed by %s", version)
    ds = listing_dataset(listing, plan.batch_size).map_batches(
        Backfill,
        batch_size=1,  # one row: one batch of paths
        fn_constructor_kwargs={"settings": settings, "version": version},
        batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(
            size=plan.actors, max_tasks_in_flight_per_actor=QUEUED_PER_ACTOR
        ),
        **actor,
    )
    return _counted(ds, progress, every_s)


def _counted(ds: ray.data.Dataset, progress: TextIO | None, every_s: float) -> BackfillSummary:
    summary = BackfillSummary()
    start = last = time.perf_counter()
    for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
        rows = zip(batch["counts"], batch["worker"], batch["start_s"], batch["end_s"], strict=True)
        for counts, worker, start_s, end_s in rows:
            got = {outcome: int(n) for outcome, n in json.loads(str(counts)).items()}
            for outcome, n in got.items():
                summary.count(outcome, n)
            summary.add_span(str(worker), float(start_s), float(end_s), got.get(DONE, 0))
        summary.cpu_s += float(batch["cpu_s"].sum())
        now = time.perf_counter()
        summary.seconds = now - start
        if not summary.first_s:
            summary.first_s, summary.first_done = summary.seconds, summary.done
        if progress is not None and now - last >= every_s:
            print(summary.line(), file=progress, flush=True)
            last = now
    summary.seconds = time.perf_counter() - start
    return summary
