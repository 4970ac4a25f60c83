"""Issue 23 item 4's experiment against today's sidecar: ``python -m bench.face_burst``.

80 face-dense originals (600x750, a 30 x 30 grid of 20-px heads cut from scikit-image's
astronaut photo) sent in 1.2 s to the sidecar app (in process, aiohttp's test server, the real
model and face detector from build/model, default settings), then 30 other new originals one
every 0.1 s: what each was answered, the process's RSS before and after, and the detector's
metrics. With the MTCNN detector of issue 14 (its own FIFO thread, no bound, no deadline) the
burst made every other new original fall back for about 2 minutes and the RSS grow from 386 to
815-970 MB.
"""

from __future__ import annotations

import asyncio
import collections
import tempfile
import time
from pathlib import Path

import numpy as np
import pyvips
from aiohttp.test_utils import TestClient, TestServer
from skimage import data as skdata

from sidecar.app import make_app
from sidecar.settings import EngineSettings, Settings, SourceSettings
from tests.support.images import jpeg

DENSE, OTHERS, BURST_S = 80, 30, 1.2


def rss_mb() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS"):
            return int(line.split()[1]) // 1024
    return -1


def photos(root: Path) -> None:
    head = np.ascontiguousarray(skdata.astronaut()[20:240, 130:320])
    tile = pyvips.Image.new_from_array(head).resize(20 / 190).numpy()[:, :, :3]
    dense = jpeg(np.ascontiguousarray(np.tile(tile, (30, 30, 1))[:750, :600]))
    for i in range(DENSE):
        (root / f"dense-{i}.jpg").write_bytes(dense)
    for i in range(OTHERS + 1):
        (root / f"plain-{i}.jpg").write_bytes(jpeg(skdata.chelsea()[:, i:]))


async def run(model_dir: str) -> None:
    root = Path(tempfile.mkdtemp())
    photos(root)
    settings = Settings(
        source=SourceSettings(root=str(root)), engine=EngineSettings(model_dir=model_dir)
    )
    client = TestClient(TestServer(make_app(settings)))
    await client.start_server()
    await client.get(f"/crop/300x300/plain-{OTHERS}.jpg")
    before = rss_mb()

    async def one(i: int) -> str:
        await asyncio.sleep(i * BURST_S / DENSE)
        return (await client.get(f"/crop/300x300/dense-{i}.jpg")).headers["X-Heatcrop-Path"]

    burst = await asyncio.gather(*(one(i) for i in range(DENSE)))
    after_burst = rss_mb()
    t0 = time.perf_counter()
    others = []
    for i in range(OTHERS):
        others.append((await client.get(f"/crop/400x300/plain-{i}.jpg")).headers["X-Heatcrop-Path"])
        await asyncio.sleep(0.1)
    metrics = (await (await client.get("/metrics")).text()).splitlines()
    await client.close()
    load = " ".join(Path("/proc/loadavg").read_text().split()[:3])
    print(f"load {load}; burst of {DENSE} in {BURST_S} s: {dict(collections.Counter(burst))}")
    print(
        f"next {OTHERS} new originals over {time.perf_counter() - t0:.1f} s: "
        f"{dict(collections.Counter(others))}"
    )
    print(f"RSS MB: before {before}, after the burst {after_burst}, after the others {rss_mb()}")
    for line in metrics:
        if (
            line.startswith(("heatcrop_face_seconds_", "heatcrop_faces_per_photo_"))
            and "{" not in line
        ):
            print(line)


if __name__ == "__main__":
    asyncio.run(run("build/model"))
