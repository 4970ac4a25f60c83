"""Start nginx on a rendered config after clearing the unix sockets a crashed nginx left behind.

    python -m nginx.launch OUT [nginx options...]

nginx removes its unix listening sockets when it exits, but not when it is killed (SIGKILL,
the OOM killer): the socket file stays, and every later start fails with ``bind() ...
Address already in use`` — a supervisor or systemd restarting it would back off forever. So
this launcher connects to each ``listen unix:`` socket of ``OUT/nginx.conf``: one that refuses
the connection has no listener and is removed; one that accepts belongs to a running nginx,
and the start is refused with a message naming it. It then replaces itself with nginx
(``exec``: same PID, so a supervisor stops and signals nginx itself). Use it wherever nginx is
started on a rendered heatcrop config (``make run``, the tests, ``ExecStart=`` of a systemd
unit: docs/reliability.md).
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import stat
import sys
from collections.abc import Sequence
from pathlib import Path

NGINX = "/usr/sbin/nginx"
_LISTEN_UNIX = re.compile(r"\blisten\s+unix:([^\s;]+)")
_COMMENT = re.compile(r"#[^\n]*")


class SocketInUse(RuntimeError):
    """A unix socket of the config has a live listener: another nginx runs on this folder."""


def unix_sockets(conf: str) -> list[Path]:
    """The paths of the config's ``listen unix:`` sockets."""
    return [Path(m) for m in _LISTEN_UNIX.findall(_COMMENT.sub("", conf))]


def clear_stale(path: Path) -> bool:
    """Remove ``path`` if it is a socket nobody listens on; True if it was removed."""
    try:
        mode = path.lstat().st_mode
    except FileNotFoundError:
        return False
    if not stat.S_ISSOCK(mode):
        return False  # not ours to delete: nginx will say what is wrong with it
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        probe.settimeout(1.0)
        try:
            probe.connect(str(path))
        except (ConnectionRefusedError, FileNotFoundError):
            pass
        except OSError as exc:  # a full backlog still means a live listener
            raise SocketInUse(f"{path} is in use ({exc.strerror})") from exc
        else:
            raise SocketInUse(f"{path} is in use: another nginx serves this folder")
    path.unlink(missing_ok=True)
    return True


def clear_stale_sockets(out: Path) -> list[Path]:
    """Clear the stale unix sockets of ``out/nginx.conf``; the paths removed."""
    conf = (out / "nginx.conf").read_text()
    return [p for p in unix_sockets(conf) if clear_stale(p)]


def nginx_command(out: Path, *extra: str) -> list[str]:
    """The command line that runs (or, with ``-t``, checks) the rendered config."""
    out = out.resolve()
    return [
        nginx_binary(),
        "-p", str(out),
        "-e", str(out / "logs" / "error.log"),
        "-c", str(out / "nginx.conf"),
        *extra,
    ]  # fmt: skip


def nginx_binary() -> str:
    found = shutil.which("nginx") or (NGINX if Path(NGINX).exists() else None)
    if found is None:
        raise FileNotFoundError(
            "nginx is not installed: `apt-get install nginx` (or `make apt-deps`)"
        )
    return found


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help"):
        print(__doc__, file=sys.stderr)
        return 2
    out = Path(args[0]).resolve()
    try:
        for path in clear_stale_sockets(out):
            print(f"heatcrop: removed {path}, left by an nginx that was killed", file=sys.stderr)
    except (SocketInUse, OSError) as exc:
        print(f"heatcrop: nginx not started: {exc}", file=sys.stderr)
        return 1
    cmd = nginx_command(out, *args[1:])
    sys.stderr.flush()
    os.execv(cmd[0], cmd)
    return 0  # not reached


if __name__ == "__main__":
    sys.exit(main())
