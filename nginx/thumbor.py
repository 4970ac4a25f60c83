"""Thumbor 7.8 configuration for the local stack: its file loader on an image folder.

Thumbor runs from its own virtual environment (``make thumbor``: ``.venv-thumbor``, pins in
pyproject.toml's ``legacy`` extra), because it needs Pillow < 13 and heatcrop's own
environment has a newer one. Nothing is stored: no original storage, no result storage (nginx
caches the results). With a security key, ``allow_unsafe=False`` makes Thumbor refuse every
URL that is not signed with it.
"""

from __future__ import annotations

from pathlib import Path

THUMBOR_VENV = Path(".venv-thumbor")


def render_thumbor_conf(
    path: Path, root: Path, *, key: str = "", allow_unsafe: bool = True, max_age_s: int = 86400
) -> Path:
    """Write a Thumbor config file (Python syntax, as Thumbor reads it); returns ``path``."""
    lines = [
        "# Rendered by nginx/thumbor.py for the heatcrop local stack.",
        "LOADER = 'thumbor.loaders.file_loader'",
        f"FILE_LOADER_ROOT_PATH = {str(root.resolve())!r}",
        "STORAGE = 'thumbor.storages.no_storage'",
        "RESULT_STORAGE = None",
        f"MAX_AGE = {int(max_age_s)}",
        "RESPECT_ORIENTATION = True",
        "QUALITY = 85",
        f"ALLOW_UNSAFE_URL = {bool(allow_unsafe or not key)!r}",
        # Thumbor's default key is public knowledge; without ours, signing is simply off.
        f"SECURITY_KEY = {key or 'heatcrop-unsigned'!r}",
    ]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")
    return path


def thumbor_binary(venv: Path = THUMBOR_VENV) -> Path:
    binary = venv / "bin" / "thumbor"
    if not binary.exists():
        raise FileNotFoundError(
            f"{binary} is missing: `make thumbor` creates the Thumbor environment"
        )
    return binary
