"""Render a plain nginx.conf for a local, non-root nginx: the heatcrop edge and its two foils.

    python -m nginx.render --out build/edge --listen 127.0.0.1:8080 \\
        --admin-listen 127.0.0.1:8090 --sidecar 127.0.0.1:8081[,127.0.0.1:8082] \\
        --legacy 127.0.0.1:8888 [--pattern '/img/{W}x{H}/{path}'] [--check]

Modes: ``edge`` (public server with proxy_cache → sidecar → legacy, see edge.conf.in),
``legacy`` (today's edge: straight to the legacy default crop, same cache) and ``standin``
(a static image for any URL: the fast legacy of the load benchmark). The output folder gets
``nginx.conf`` and the folders nginx writes to (logs, temp, cache); run it with
``nginx -p OUT -e OUT/logs/error.log -c OUT/nginx.conf``. Templates are ``{{name}}``-filled,
never a template language: what comes out is what nginx reads.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from nginx.launch import nginx_command
from nginx.limits import EdgeLimits, edge_limits
from sidecar import settings as settings_mod

TEMPLATES = Path(__file__).parent
DEFAULT_PATTERN = "/img/{W}x{H}/{path}"
MODES = ("edge", "legacy", "standin")
# Thumbor's own default crop; the fallback keeps it ≤ 30 s in nginx and in browsers
# (Thumbor's Cache-Control wins over proxy_cache_valid, so the filter is what limits it).
THUMBOR_PLAIN = "/unsafe/$crop_size/filters:max_age({max_age})/$crop_source"
THUMBOR_LEGACY = "/unsafe/$crop_size/$crop_source"
# The edge checks public URLs in njs (guard.js.in), and with a Thumbor key signs its own
# fallback URL there too (Debian: libnginx-mod-http-js).
NJS_MODULE = "/usr/lib/nginx/modules/ngx_http_js_module.so"
SIGN_JS = """// Rendered by nginx/render.py: Thumbor's signature of nginx's own fallback URL, as
// libthumbor computes it (urlsafe base64 of HMAC-SHA1(key, path), padding kept).
var crypto = require('crypto');
var KEY = %s;

function plain(r) {
    var path = r.variables.crop_size + '/filters:max_age(%d)/' + r.variables.crop_source;
    var sig = crypto.createHmac('sha1', KEY).update(path).digest('base64');
    return '/' + sig.replace(/\\+/g, '-').replace(/\\//g, '_') + '/' + path;
}

export default {plain};
"""
# The sidecar answers a public request with a redirect (200 + X-Accel-Redirect) or one of its
# public refusals (400, 404, 413, 415, 422: sidecar/errors.py); nginx sends every other 3xx,
# 4xx and 5xx to the legacy crop.
SIDECAR_PUBLIC = (400, 404, 413, 415, 422)
SIDECAR_ODD = tuple(
    c
    for c in (*range(300, 309), *range(400, 432), 451, *range(500, 512))
    if c not in SIDECAR_PUBLIC and c not in (304, 306, 309)
)
# With ``access_log``: the public server's lines go to logs/access.log, the inner server's
# (one per miss, every hop's address, status and time) to this file beside it.
HOPS_LOG = "hops.log"
_PLACEHOLDER = re.compile(r"\{\{(\w+)\}\}")


@dataclass(frozen=True)
class NginxConfig:
    out: Path
    listen: str
    mode: str = "edge"
    admin_listen: str = ""
    sidecars: tuple[str, ...] = ()
    legacy: str = ""
    pattern: str = DEFAULT_PATTERN
    # Whole budget for the sidecar's answer; the sidecar's own deadline is this minus a margin.
    sidecar_timeout_ms: int = 150
    sidecar_connect_timeout_ms: int = 50
    # Each hop to the legacy server. A timed-out or refused hop is answered at once (504/502),
    # never retried as the plain crop: the worst wait is the sidecar's budget plus this.
    legacy_timeout_ms: int = 3000
    # Misses of one client ($remote_addr) in flight at once; more are answered 429 at once
    # instead of queueing renders on the legacy server ahead of everyone else. Six is what a
    # browser opens per host over HTTP/1.1, so a page never meets it. 0: no limit.
    legacy_per_client: int = 6
    # How long a legacy render that timed out (504) is answered from the cache.
    slow_cache_s: int = 5
    # How long the cache keeps a smart crop before it revalidates it with the sidecar: the
    # longest an editor's override takes to reach it; each hot URL costs the sidecar one box
    # lookup per period.
    revalidate_s: int = 60
    fallback_max_age_s: int = 30
    plain_path: str = ""  # legacy default-crop path in nginx variables; Thumbor's by default
    cache_lock: bool = True
    cache_zone: str = "16m"
    cache_max_size: str = "1g"
    cache_inactive: str = "7d"
    workers: int = 1
    worker_connections: int = 4096
    access_log: bool = False
    error_log_level: str = "warn"
    admin_allow: tuple[str, ...] = ("127.0.0.1",)
    standin_image: Path | None = None
    # Only when nginx starts as root: the workers' user. The stack passes root's own name so
    # workers can use its private folders (pytest's tmp, build/); None keeps nginx's default.
    user: str | None = None
    # Thumbor's security key: nginx then signs its own fallback URLs (njs module); the key
    # goes to a file readable by the owner only, next to nginx.conf.
    legacy_key: str = ""
    # The sidecar's size and path limits, enforced by nginx itself (nginx.limits).
    limits: EdgeLimits = field(default_factory=EdgeLimits)
    extra: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}")
        if self.mode == "edge" and not (self.sidecars and self.legacy and self.admin_listen):
            raise ValueError("edge mode needs --sidecar, --legacy and --admin-listen")
        if self.mode == "legacy" and not self.legacy:
            raise ValueError("legacy mode needs --legacy")
        if self.mode == "standin" and self.standin_image is None:
            raise ValueError("standin mode needs --standin-image")
        if self.revalidate_s < 1:
            raise ValueError("the revalidation period must be >= 1 s")
        if self.legacy_per_client < 0 or self.slow_cache_s < 0:
            raise ValueError("the per-client limit and the slow-answer cache must be >= 0")
        if not 0 < self.fallback_max_age_s <= 30:
            raise ValueError("the fallback max-age must be in (0, 30] s")


def pattern_regexes(pattern: str) -> tuple[str, str]:
    """(regex on nginx's normalised $uri, regex on the raw $request_uri) of a URL pattern.

    ``pattern`` holds ``{W}``, ``{H}`` and ``{path}`` once each, ``{path}`` last. The first
    regex only routes (no captures, so it sets no variables); the second splits the raw
    request line into $crop_w, $crop_h and $crop_path.
    """
    parts = re.split(r"(\{W\}|\{H\}|\{path\})", pattern)
    fields = [p for p in parts if p in ("{W}", "{H}", "{path}")]
    if sorted(fields) != ["{H}", "{W}", "{path}"] or not pattern.endswith("{path}"):
        raise ValueError(f"pattern {pattern!r} needs {{W}}, {{H}} and {{path}} once, {{path}} last")
    if not pattern.startswith("/"):
        raise ValueError(f"pattern {pattern!r} must start with /")
    # Five digits at most: anything larger is not a size, and nginx answers 404 itself.
    # $uri is decoded and has no query: a `?` in it is a name's own (sent as %3F).
    routed = {"{W}": "[0-9]{1,5}", "{H}": "[0-9]{1,5}", "{path}": ".+"}
    raw = {
        "{W}": "(?<crop_w>[0-9]{1,5})",
        "{H}": "(?<crop_h>[0-9]{1,5})",
        "{path}": "(?<crop_path>[^?]+)",
    }
    uri = "".join(routed.get(p, re.escape(p)) for p in parts)
    req = "".join(raw.get(p, re.escape(p)) for p in parts)
    for regex in (uri, req):
        if '"' in regex:
            raise ValueError(f"pattern {pattern!r} must not contain quotes")
    return f"^{uri}$", f"^{req}(?:\\?|$)"


def render(cfg: NginxConfig) -> Path:
    """Write ``cfg.out/nginx.conf`` and the folders nginx needs; returns the config's path."""
    out = cfg.out.resolve()
    for sub in ("logs", "tmp", "cache", "static"):
        (out / sub).mkdir(parents=True, exist_ok=True)
    uri_regex, raw_regex = pattern_regexes(cfg.pattern)
    values = {
        "rendered_by": "`python -m nginx.render`",
        "user": f"user {cfg.user};\n" if cfg.user else "",
        "load_modules": f"load_module {NJS_MODULE};\n" if cfg.mode == "edge" else "",
        "js": _js_lines(out, cfg),
        "dir": str(out),
        "listen": cfg.listen,
        "admin_listen": cfg.admin_listen,
        "pattern": cfg.pattern,
        "uri_regex": uri_regex,
        "raw_regex": raw_regex,
        "legacy": cfg.legacy,
        "sidecar_servers": "\n".join(
            # max_fails=0: a timeout (one slow answer under load) must not evict a sidecar
            # and move its originals to one without their heatmaps; a refused connection
            # still moves on (proxy_next_upstream error), a dead host costs one connect timeout.
            f"        server {s} max_fails=0;"
            for s in cfg.sidecars
        ),
        "sidecar_timeout": f"{cfg.sidecar_timeout_ms}ms",
        "sidecar_connect_timeout": f"{cfg.sidecar_connect_timeout_ms}ms",
        "legacy_timeout": f"{cfg.legacy_timeout_ms}ms",
        "fallback_max_age": str(cfg.fallback_max_age_s),
        "plain_path": cfg.plain_path
        or (
            "$legacy_plain_path"
            if cfg.legacy_key
            else THUMBOR_PLAIN.format(max_age=cfg.fallback_max_age_s)
        ),
        "legacy_path": THUMBOR_LEGACY,
        "sidecar_odd": " ".join(str(c) for c in SIDECAR_ODD),
        "slow_cache": f"{cfg.slow_cache_s}s",
        "revalidate_s": str(cfg.revalidate_s),
        "lock_timeout": f"{lock_timeout_ms(cfg)}ms",
        "client_zone": (
            "    limit_conn_zone $http_x_heatcrop_client zone=heatcrop_client:4m;\n\n"
            if cfg.legacy_per_client
            else ""
        ),
        "per_client": (
            f"            limit_conn heatcrop_client {cfg.legacy_per_client};\n"
            "            limit_conn_status 429;\n"
            if cfg.legacy_per_client
            else ""
        ),
        "cache_lock": "on" if cfg.cache_lock else "off",
        "cache_zone": cfg.cache_zone,
        "cache_max_size": cfg.cache_max_size,
        "cache_inactive": cfg.cache_inactive,
        "workers": str(cfg.workers),
        "worker_connections": str(cfg.worker_connections),
        "access_log": f"{out}/logs/access.log heatcrop" if cfg.access_log else "off",
        "hops_log": f"{out}/logs/{HOPS_LOG} heatcrop_hops" if cfg.access_log else "off",
        "error_log_level": cfg.error_log_level,
        "admin_allow": "".join(f"        allow {a};\n" for a in cfg.admin_allow)
        + "        deny all;\n",
        **cfg.extra,
    }
    template = (TEMPLATES / f"{cfg.mode}.conf.in").read_text()
    if cfg.mode == "legacy":
        values["access_log"] = f"{out}/logs/access.log heatcrop_legacy" if cfg.access_log else "off"
    elif cfg.mode != "edge":
        values["access_log"] = f"{out}/logs/access.log" if cfg.access_log else "off"
    text = _fill(template, values)
    if cfg.mode == "edge":
        guard = _fill(
            (TEMPLATES / "guard.js.in").read_text(),
            {"limits": cfg.limits.js(), "legacy_timeout_ms": str(cfg.legacy_timeout_ms)},
        )
        (out / "guard.js").write_text(guard)
    if cfg.legacy_key:
        sign = out / "thumbor_sign.js"
        sign.touch(mode=0o600)
        sign.chmod(0o600)
        sign.write_text(SIGN_JS % (json.dumps(cfg.legacy_key), cfg.fallback_max_age_s))
    if cfg.standin_image is not None:
        shutil.copyfile(cfg.standin_image, out / "static" / "standin.jpg")
    path = out / "nginx.conf"
    path.write_text(text)
    return path


def lock_timeout_ms(cfg: NginxConfig) -> int:
    """The longest a miss can take (sidecar, smart hop, then the plain hop), and a second."""
    return cfg.sidecar_timeout_ms + 2 * cfg.legacy_timeout_ms + 1000


def _js_lines(out: Path, cfg: NginxConfig) -> str:
    lines = [
        f"    js_import guard from {out}/guard.js;",
        "    js_set $heatcrop_refused guard.refused;",
        "    js_set $heatcrop_legacy_deadline guard.legacyDeadline;",
    ]
    if cfg.legacy_key:
        lines += [
            f"    js_import thumbor from {out}/thumbor_sign.js;",
            "    js_set $legacy_plain_path thumbor.plain;",
        ]
    return "\n".join(lines) + "\n\n"


def _fill(template: str, values: dict[str, str]) -> str:
    def one(match: re.Match[str]) -> str:
        name = match.group(1)
        if name not in values:
            raise KeyError(f"template placeholder {{{{{name}}}}} has no value")
        return values[name]

    return _PLACEHOLDER.sub(one, template)


def check(out: Path) -> str:
    """``nginx -t`` on the rendered config; its output, or CalledProcessError."""
    result = subprocess.run(
        nginx_command(out, "-t"), capture_output=True, text=True, timeout=30, check=False
    )
    if result.returncode != 0:
        raise subprocess.CalledProcessError(
            result.returncode, result.args, result.stdout, result.stderr
        )
    return result.stderr


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m nginx.render",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--out", type=Path, required=True, help="folder for nginx.conf")
    parser.add_argument("--mode", choices=MODES, default="edge")
    parser.add_argument("--listen", default="127.0.0.1:8080", help="public address")
    parser.add_argument("--admin-listen", default="127.0.0.1:8090", help="operators only")
    parser.add_argument("--sidecar", default="127.0.0.1:8081", help="host:port[,host:port...]")
    parser.add_argument("--legacy", default="127.0.0.1:8888", help="legacy server host:port")
    parser.add_argument("--pattern", default=DEFAULT_PATTERN)
    parser.add_argument("--sidecar-timeout-ms", type=int, default=150)
    parser.add_argument(
        "--plain-path",
        default="",
        help="legacy default crop (nginx variables "
        "$crop_size, $crop_source); default: Thumbor's with max_age(30)",
    )
    parser.add_argument(
        "--legacy-key-file",
        type=Path,
        help="Thumbor's security key, to sign nginx's own fallback URLs (needs nginx's njs module)",
    )
    parser.add_argument("--no-cache-lock", action="store_true")
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--access-log", action="store_true")
    parser.add_argument("--standin-image", type=Path)
    parser.add_argument("--legacy-timeout-ms", type=int, default=3000)
    parser.add_argument(
        "--per-client",
        type=int,
        default=NginxConfig.legacy_per_client,
        help="misses of one client in flight at once (0: no limit; behind a CDN, set "
        "real_ip so $remote_addr is the client's)",
    )
    parser.add_argument(
        "--revalidate-s",
        type=int,
        default=NginxConfig.revalidate_s,
        help="seconds a smart crop is served from the cache before it is revalidated",
    )
    parser.add_argument(
        "--config",
        help="heatcrop settings TOML (default: $HEATCROP_CONFIG): the size limits nginx "
        "enforces are the sidecar's, from the same settings",
    )
    parser.add_argument("--check", action="store_true", help="run nginx -t on the result")
    args = parser.parse_args(argv)
    try:
        settings = settings_mod.load(args.config)
        cfg = NginxConfig(
            out=args.out,
            mode=args.mode,
            listen=args.listen,
            admin_listen=args.admin_listen,
            sidecars=tuple(s.strip() for s in args.sidecar.split(",") if s.strip()),
            legacy=args.legacy,
            pattern=args.pattern,
            sidecar_timeout_ms=args.sidecar_timeout_ms,
            plain_path=args.plain_path,
            cache_lock=not args.no_cache_lock,
            workers=args.workers,
            access_log=args.access_log,
            standin_image=args.standin_image,
            legacy_key=args.legacy_key_file.read_text().strip() if args.legacy_key_file else "",
            legacy_timeout_ms=args.legacy_timeout_ms,
            legacy_per_client=args.per_client,
            revalidate_s=args.revalidate_s,
            limits=edge_limits(settings),
        )
        path = render(cfg)
    except ValueError as exc:
        print(f"nginx.render: {exc}", file=sys.stderr)
        return 2
    print(path)
    if args.check:
        try:
            print(check(args.out), end="", file=sys.stderr)
        except subprocess.CalledProcessError as exc:
            print(exc.stderr, end="", file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
