"""Requested output sizes: ``WxH`` from the public URL, validated before any work."""

from __future__ import annotations

import re
from dataclasses import dataclass

from kernels.window import MAX_ASPECT, MIN_ASPECT
from sidecar.errors import BadSize

# ASCII digits only: `\d` also matches Arabic-Indic, fullwidth and Devanagari digits, which
# int() reads as 400 but no other part of the chain (nginx, the legacy server) does.
_SIZE = re.compile(r"^([0-9]{1,6})x([0-9]{1,6})$")


@dataclass(frozen=True)
class Size:
    width: int
    height: int

    @property
    def crops(self) -> bool:
        """W or H of 0 means "keep the original's aspect": nothing to decide."""
        return self.width > 0 and self.height > 0

    @property
    def aspect(self) -> float:
        return self.width / self.height

    def __str__(self) -> str:
        return f"{self.width}x{self.height}"


def parse_size(
    text: str, *, max_width: int = 4000, max_height: int = 4000, allowed: tuple[str, ...] = ()
) -> Size:
    """Parse ``400x300``; 0 on one side keeps the aspect; raises BadSize otherwise."""
    match = _SIZE.match(text)
    if not match:
        raise BadSize(f"size {text[:32]!r} is not WxH", public_message="size must be WxH")
    width, height = int(match.group(1)), int(match.group(2))
    if width == 0 and height == 0:
        raise BadSize("size 0x0", public_message="size 0x0 has no area")
    if width > max_width or height > max_height:
        raise BadSize(
            f"size {width}x{height} over {max_width}x{max_height}",
            public_message=f"size over the limit {max_width}x{max_height}",
        )
    if width and height and not MIN_ASPECT <= width / height <= MAX_ASPECT:
        # The window search refuses such aspects: say so before any fetch, decode or CNN.
        raise BadSize(
            f"size {width}x{height}: aspect outside [{MIN_ASPECT}, {MAX_ASPECT}]",
            public_message="aspect ratio out of range",
        )
    size = Size(width, height)
    if allowed and str(size) not in allowed:
        raise BadSize(f"size {size} not allowed", public_message="size not allowed")
    return size
