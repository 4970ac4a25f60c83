"""Thumbor 7.8 configuration for the local stack: heatcrop's loader on an image folder.

Thumbor runs from its own virtual environment (``make thumbor``: ``.venv-thumbor``, pins in
pyproject.toml's ``legacy`` extra), because it needs Pillow < 13 and heatcrop's own
environment has a newer one. Nothing is stored: no original storage, no result storage (nginx
caches the results).

The legacy server serves alone whenever the sidecar is down, slow or failing, so it enforces
the sidecar's limits itself (``nginx.limits.LegacyLimits``, from heatcrop's settings): paths
inside the root, symlinks included (``nginx/thumbor_loader.py``), the sidecar's byte and
pixel limits, output sizes clamped to the largest the sidecar accepts, and with a security key
only signed URLs (``ALLOW_UNSAFE_URL = False``: ``/unsafe/...`` is refused).
"""

from __future__ import annotations

from pathlib import Path

from nginx.limits import LegacyLimits

THUMBOR_VENV = Path(".venv-thumbor")
LOADER = "nginx.thumbor_loader"


def render_thumbor_conf(
    path: Path,
    root: Path,
    *,
    key: str = "",
    limits: LegacyLimits | None = None,
    max_age_s: int = 86400,
    engine_threads: int = 2,
) -> Path:
    """Write a Thumbor config file (Python syntax, as Thumbor reads it); returns ``path``."""
    limits = limits or LegacyLimits()
    lines = [
        "# Rendered by nginx/thumbor.py for the heatcrop local stack.",
        f"LOADER = {LOADER!r}",
        f"FILE_LOADER_ROOT_PATH = {str(root.resolve())!r}",
        f"HEATCROP_MAX_BYTES = {int(limits.max_bytes)}",
        f"MAX_PIXELS = {int(limits.max_pixels)}",
        f"HEATCROP_MAX_SIDE = {int(limits.max_side)}",
        f"HEATCROP_MAX_ANIMATION_PIXELS = {int(limits.max_animation_pixels)}",
        # Encoding runs on a thread of its own, so one large render does not hold the event
        # loop (and with it every other request) for its whole length.
        f"ENGINE_THREADPOOL_SIZE = {int(engine_threads)}",
        # Larger requests are clamped: the edge refuses them first, this is the second wall.
        f"MAX_WIDTH = {int(limits.max_width)}",
        f"MAX_HEIGHT = {int(limits.max_height)}",
        "STORAGE = 'thumbor.storages.no_storage'",
        "RESULT_STORAGE = None",
        f"MAX_AGE = {int(max_age_s)}",
        "RESPECT_ORIENTATION = True",
        "QUALITY = 85",
        # With a key, only signed URLs; without one, signing is off.
        f"ALLOW_UNSAFE_URL = {not key!r}",
        # Thumbor's default key is public knowledge; without ours, signing is simply off.
        f"SECURITY_KEY = {key or 'heatcrop-unsigned'!r}",
    ]
    path.parent.mkdir(parents=True, exist_ok=True)
    # The signing key is in it: the owner's alone, as nginx's copy (thumbor_sign.js).
    path.touch(mode=0o600)
    path.chmod(0o600)
    path.write_text("\n".join(lines) + "\n")
    return path


def thumbor_binary(venv: Path = THUMBOR_VENV) -> Path:
    binary = venv / "bin" / "thumbor"
    if not binary.exists():
        raise FileNotFoundError(
            f"{binary} is missing: `make thumbor` creates the Thumbor environment"
        )
    return binary
