"""One sample of the sidecar's /metrics through an aiohttp test client."""

from __future__ import annotations

from typing import Any


async def scraped(client: Any, name: str, **labels: str) -> float:
    """The value of the series ``name`` with exactly ``labels`` (in that order); a series that
    is not there fails the test."""
    resp = await client.get("/metrics")
    assert resp.status == 200, await resp.text()
    text = await resp.text()
    inner = ",".join(f'{k}="{v}"' for k, v in labels.items())
    series = f"{name}{{{inner}}}" if labels else name
    for line in text.splitlines():
        if line.startswith(series + " "):
            return float(line.split()[-1])
    raise AssertionError(f"{series} not in /metrics")
