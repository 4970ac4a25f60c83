"""The sidecar's limits for the two servers that answer without it: nginx and the legacy server.

nginx falls back to the legacy server on its own whenever the sidecar is down, hung, slow or
failing; an attacker who makes the sidecar slow must gain nothing by it. So both servers are
rendered from heatcrop's own ``Settings``, the one source of truth: nginx refuses the sizes and
paths the sidecar refuses (``nginx/guard.js.in``), and the legacy server refuses or clamps
what the sidecar would never ask of it (``nginx/thumbor.py``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from kernels.window import MAX_ASPECT, MAX_SIDE, MIN_ASPECT
from sidecar.settings import Settings
from sidecar.sources import DECODINGS, MAX_PATH

_DEFAULT = Settings()
MAX_ANIMATION_PIXELS = 1_000_000


@dataclass(frozen=True)
class EdgeLimits:
    """What nginx checks of a public URL before the cache, the sidecar or the legacy server."""

    max_width: int = _DEFAULT.server.max_width
    max_height: int = _DEFAULT.server.max_height
    allowed_sizes: tuple[str, ...] = _DEFAULT.server.allowed_sizes

    def js(self) -> str:
        """The limits as the guard script reads them."""
        return json.dumps(
            {
                "max_width": self.max_width,
                "max_height": self.max_height,
                "allowed": list(self.allowed_sizes),
                "min_aspect": MIN_ASPECT,
                "max_aspect": MAX_ASPECT,
                "max_path": MAX_PATH,
                "decodings": DECODINGS,
            }
        )


@dataclass(frozen=True)
class LegacyLimits:
    """What the legacy server refuses (originals) or clamps (output sizes) by itself."""

    max_width: int = _DEFAULT.server.max_width
    max_height: int = _DEFAULT.server.max_height
    max_pixels: int = _DEFAULT.source.max_pixels
    max_bytes: int = _DEFAULT.source.max_bytes
    # An animated GIF with more pixels than this in all its frames is rendered as its first
    # frame: Thumbor's Pillow engine renders every frame, ~0.2 s per 480×320 one on the dev
    # box (a 30-frame one took 5-8 s, past nginx's 3 s), and renders nothing else meanwhile.
    max_animation_pixels: int = MAX_ANIMATION_PIXELS
    # The sidecar refuses a longer side (a 1,200,000 x 1 strip passes the pixel limit).
    max_side: int = MAX_SIDE


def edge_limits(settings: Settings) -> EdgeLimits:
    server = settings.server
    return EdgeLimits(server.max_width, server.max_height, server.allowed_sizes)


def legacy_limits(settings: Settings) -> LegacyLimits:
    server, source = settings.server, settings.source
    return LegacyLimits(server.max_width, server.max_height, source.max_pixels, source.max_bytes)
