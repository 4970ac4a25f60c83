"""Legacy image-server URL dialects: where nginx fetches the final image from.

Each dialect answers two questions: the URL of a crop box resized to WxH (the smart path),
and the URL of the server's own default crop, marked to be cached only briefly (the
fallback). Paths are relative to the legacy server's root; nginx prefixes its internal
``/@legacy`` location.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
from dataclasses import dataclass
from typing import Protocol
from urllib.parse import quote

from sidecar.settings import LegacySettings
from sidecar.sizes import Size

Box = tuple[int, int, int, int]  # x0, y0, x1, y1; original pixels, x1/y1 exclusive


class Dialect(Protocol):
    name: str

    def crop_url(self, source: str, box: Box, size: Size) -> str: ...

    def plain_url(self, source: str, size: Size) -> str: ...


def _quote(source: str) -> str:
    # Keep "/" so legacy servers see the same path layout as the original.
    return quote(source.lstrip("/"), safe="/")


@dataclass(frozen=True)
class Thumbor:
    """``/<sig|unsafe>/L x T:R x B/W x H/[filters:...]/path``.

    The signature is urlsafe base64 (with padding) of HMAC-SHA1(key, everything after it,
    no leading slash), as thumbor's ``libthumbor.CryptoURL`` computes it.
    """

    key: str = ""
    max_age_s: int = 30
    name: str = "thumbor"

    def crop_url(self, source: str, box: Box, size: Size) -> str:
        x0, y0, x1, y1 = box
        return self._sign(f"{x0}x{y0}:{x1}x{y1}/{size.width}x{size.height}/{_quote(source)}")

    def plain_url(self, source: str, size: Size) -> str:
        filters = f"filters:max_age({self.max_age_s})"
        return self._sign(f"{size.width}x{size.height}/{filters}/{_quote(source)}")

    def _sign(self, path: str) -> str:
        if not self.key:
            return f"/unsafe/{path}"
        digest = hmac.new(self.key.encode(), path.encode(), hashlib.sha1).digest()
        return f"/{base64.urlsafe_b64encode(digest).decode()}/{path}"


@dataclass(frozen=True)
class Imgproxy:
    """``/<sig|insecure>/c:W:H:nowe:X:Y/rs:fill:W:H/plain/local:///path``.

    imgproxy reads crop sizes and offsets below 1 as fractions of the image; our values are
    whole pixels, and a 0 offset means 0 either way, so sizes are kept ≥ 1. The signature is
    HMAC-SHA256(hex key, hex salt + path) in unpadded urlsafe base64.
    """

    key: str = ""
    salt: str = ""
    source_prefix: str = "local:///"
    max_age_s: int = 30
    name: str = "imgproxy"

    def crop_url(self, source: str, box: Box, size: Size) -> str:
        x0, y0, x1, y1 = box
        crop = f"c:{max(1, x1 - x0)}:{max(1, y1 - y0)}:nowe:{x0}:{y0}"
        return self._sign(f"/{crop}/rs:fill:{size.width}:{size.height}/plain/{self._src(source)}")

    def plain_url(self, source: str, size: Size) -> str:
        opts = f"rs:fill:{size.width}:{size.height}/g:ce/exp:0/cc:max-age={self.max_age_s}"
        return self._sign(f"/{opts}/plain/{self._src(source)}")

    def _src(self, source: str) -> str:
        return self.source_prefix + _quote(source)

    def _sign(self, path: str) -> str:
        if not self.key:
            return f"/insecure{path}"
        mac = hmac.new(
            bytes.fromhex(self.key), bytes.fromhex(self.salt) + path.encode(), hashlib.sha256
        )
        return f"/{base64.urlsafe_b64encode(mac.digest()).rstrip(b'=').decode()}{path}"


@dataclass(frozen=True)
class Template:
    """Any other server: ``str.format`` templates with {x0} {y0} {x1} {y1} {cw} {ch} {w} {h}
    {path}; the plain template has no box fields. Separated by ``|`` in settings."""

    crop: str
    plain: str
    name: str = "template"

    def crop_url(self, source: str, box: Box, size: Size) -> str:
        x0, y0, x1, y1 = box
        return self.crop.format(
            x0=x0,
            y0=y0,
            x1=x1,
            y1=y1,
            cw=x1 - x0,
            ch=y1 - y0,
            w=size.width,
            h=size.height,
            path=_quote(source),
        )

    def plain_url(self, source: str, size: Size) -> str:
        return self.plain.format(w=size.width, h=size.height, path=_quote(source))


def make_dialect(settings: LegacySettings) -> Dialect:
    if settings.dialect == "thumbor":
        return Thumbor(key=settings.key, max_age_s=settings.fallback_max_age_s)
    if settings.dialect == "imgproxy":
        return Imgproxy(key=settings.key, salt=settings.salt, max_age_s=settings.fallback_max_age_s)
    crop, _, plain = settings.template.partition("|")
    return Template(crop=crop, plain=plain)
