"""Cache records as a hostile writer with Redis access would store them: well formed, wrong.

Built field by field here (not with sidecar.codec), in the formats every sidecar reads (analysis
version 2, box version 1: neither carries the key it was stored under), so the same bytes reach
the checks of the current code and of the code before them.
"""

from __future__ import annotations

import struct
import zlib

import numpy as np

from engines.base import PROFILES
from engines.buckets import bucket_for, heatmap_shape


def _with_crc(body: bytes) -> bytes:
    return body + struct.pack("<I", zlib.crc32(body))


def analysis_blob(
    width: int,
    height: int,
    *,
    channels: int = len(PROFILES),
    grid: tuple[int, int] | None = None,
    model_version: bytes = b"hostile",
) -> bytes:
    """An analysis (version 2, no faces) claiming a width x height original; its heatmap
    on the grid of that size's bucket unless ``grid`` is given, flat heat."""
    h, w = heatmap_shape(bucket_for(width, height)) if grid is None else grid
    maps = np.ones(channels * h * w, dtype="<f2").tobytes()
    body = (
        b"HCAN\x02"
        + struct.pack("<IId", width, height, 0.5)
        + bytes([len(model_version)])
        + model_version
        + bytes([channels, h, w])
        + maps
        + struct.pack("<H", 0)
    )
    return _with_crc(body)


def box_blob(box: tuple[int, int, int, int], path: str, confidence: float = 0.9) -> bytes:
    """A box record (version 1) of ``path``."""
    raw = path.encode()
    body = b"HCBX\x01" + struct.pack("<IIIId", *box, confidence) + struct.pack("<H", len(raw))
    return _with_crc(body + raw)
