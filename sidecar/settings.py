"""One frozen, typed Settings: defaults, then a TOML file, then HEATCROP_* environment.

This is the only module that reads ``os.environ``. Every field is reachable from the
environment as ``HEATCROP_<SECTION>_<FIELD>`` (e.g. ``HEATCROP_ENGINE_THREADS=2``), and
``validate()`` names that variable when a value is wrong, because the variable is what an
operator has to go and fix.
"""

from __future__ import annotations

import dataclasses
import math
import os
import string
import tomllib
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

from kernels.window import KNOB_BOUNDS, SearchParams

ENV_PREFIX = "HEATCROP_"
CONFIG_ENV = "HEATCROP_CONFIG"


class SettingsError(ValueError):
    """A setting is wrong; the message names the environment variable that sets it."""


@dataclass(frozen=True)
class ServerSettings:
    """The sidecar's HTTP service: its address, its time budget, the sizes it accepts, and
    how it batches and gives up under load."""

    # Address the sidecar listens on; nginx's --sidecar points at host:port.
    host: str = "127.0.0.1"
    # Port the sidecar listens on.
    port: int = 8081
    # Whole budget for one /crop answer; nginx's proxy timeout minus a margin.
    deadline_ms: int = 120
    # Of that budget, kept for answering once the work gives up: the event loop's own delays
    # under load and writing the answer. Work that runs into its deadline must still be answered
    # within deadline_ms, or the overload p99 is the budget plus that delay.
    answer_margin_ms: int = 20
    # Threads that decode originals (pyvips), beside the event loop and the engine's thread.
    decode_threads: int = 2
    # Largest W a URL may ask for; nginx's guard and the legacy server get the same limit.
    max_width: int = 4000
    # Largest H a URL may ask for; nginx's guard and the legacy server get the same limit.
    max_height: int = 4000
    # When not empty, the only sizes served (e.g. "400x300"); others are a 400.
    allowed_sizes: tuple[str, ...] = ()
    # Bearer token of PUT/DELETE /override/{path}; empty: overrides are refused.
    override_token: str = ""
    # Most images in one engine call; also the size of the background queue of cold heatmaps.
    max_batch: int = 16
    # How long the first image of a batch waits for others before the engine runs it. 0: a batch
    # is what queued while the engine ran. A wait held every lone cold request with the engine
    # idle (the sidecar's queue stage 3.0-3.2 ms at 2, 0.05-0.08 at 0) and gained no measurable
    # throughput on the 2-core CPU box, where two photos share a bucket 1 time in 5.
    max_wait_ms: float = 0.0
    # Most images waiting for the engine; beyond it a request gets the fallback at once.
    max_queue: int = 256
    # Nice value added to decode and engine threads so that the event loop keeps its CPU under
    # overload (sidecar/priority.py); 0 leaves them equal to it.
    worker_nice: int = 0
    # What a request for an original with no cached heatmap waits for. wait: its decode and CNN
    # run within the deadline (a smart crop on first sight when there is capacity). legacy: the
    # legacy crop at once, the heatmap made in the background for the next request
    # (sidecar/step_cold.py): the sidecar's part of a miss is then a few ms, for a smaller smart
    # share (docs/performance.md, the edge under load, and why wait stays the default).
    cold_policy: str = "wait"
    # CPU the background work (read, decode and CNN of heatmaps no request waits for) may use,
    # in cores, charged with its measured CPU time (sidecar/cpu_budget.py); while the machine
    # has fewer than this plus one core idle, a twentieth of it, so that the legacy server's
    # renders keep a free core. A nice value cannot do this: autogroups share the CPU between
    # processes first. 0.25: ~7-10 heatmaps/s here (25-35 ms of CPU each) when the box is idle.
    background_cpu_share: float = 0.25


@dataclass(frozen=True)
class SourceSettings:
    """Where the originals come from, and the limits checked before any full decode."""

    # folder: originals read under root; http: fetched from the origin at base_url.
    kind: str = "folder"
    # The folder of originals (kind folder); URL paths are read under it, never outside it.
    root: str = "demo/images"
    # The origin's URL prefix (kind http), e.g. https://origin.example/images/.
    base_url: str = ""
    # Largest original in bytes; over it: 413 (the legacy server has the same limit).
    max_bytes: int = 30 * 1024 * 1024
    # Thumbor's own default MAX_PIXELS: one limit for both servers (the stack renders Thumbor's
    # from this one); an original over it is a 413, never a smart box the legacy server refuses.
    max_pixels: int = 75_000_000
    # Time to connect to the origin (kind http).
    connect_timeout_ms: int = 200
    # Longest wait for the origin's next bytes (kind http).
    read_timeout_ms: int = 1000


@dataclass(frozen=True)
class EngineSettings:
    """The CNN that makes the heatmaps: which runtime, which model files, which profile."""

    # auto: TensorRT when a plan matches this GPU (docs/gpu.md), else ONNX Runtime; ort: ONNX
    # Runtime only; trt: TensorRT, or no start without a matching plan.
    kind: str = "auto"
    # Folder of the ONNX graphs `make model` writes.
    model_dir: str = "build/model"
    # Folder of the TensorRT plans `make engines` writes.
    plan_dir: str = "build/engines"
    # Which TensorRT plan to load: the precision it was built with.
    trt_precision: str = "fp16"
    # Which ONNX Runtime graph to load. int8 is the statically quantized graph
    # (engines/quantize.py): a 1.3-1.7x faster CNN, within one point of FP32's headroom
    # shares on a CPU with int8 dot products (VNNI, AMX), 1.9 points below on one without
    # (bench/results/int8.md); auto takes int8 only where the CPU has them (engines/cpu.py).
    # When the INT8 graph is missing or was built from another FP32 model, the FP32 graph
    # serves and one log line says why.
    ort_precision: str = "auto"
    # ONNX Runtime's threads per engine call.
    threads: int = 2
    # While the engine is busy (a call running, or several requests ready), run up to `threads`
    # calls side by side, each on its own single-thread ONNX Runtime session (one per core); a
    # lone request on an idle engine still gets all `threads` (sidecar/batcher.py). false: one
    # call at a time (the behaviour before, for a baseline). Measured in bench/results/cost.md.
    session_per_core: bool = True
    # food | generic | auto (blend of both by the image's food probability) | readout (the
    # learned head) | learned (read-out + 15 % auto); the kernel defaults below were chosen
    # with it by 5-fold cross-validation (training/tune.py, training/results/tune.md).
    profile: str = "learned"

    @property
    def kind_var(self) -> str:
        """The variable that sets ``kind``; engines.loader quotes it in its messages."""
        return env_name("engine", "kind")


# The window search's own defaults (kernels.window.SearchParams): written there only.
_SEARCH = SearchParams()


@dataclass(frozen=True)
class KernelSettings:
    """The window search (kernels/): which windows it tries and how it scores them. The learned
    profile carries its own centre bias and does not gain from a prior or a confidence cut-off;
    a light blur and the edge-cut term are the cross-validated best (training/results/tune.md)."""

    # Smallest window tried, as a share of the largest window of the aspect; 1: no zoom.
    min_scale: float = _SEARCH.min_scale
    # Window sizes tried between min_scale and 1.
    scales: int = _SEARCH.scales
    # Offsets tried along the free axis at each size (the centre offset is always tried too).
    steps: int = _SEARCH.steps
    # Factor by which the heatmap is upsampled before the search.
    upsample: int = 4
    # Weight of the heat a window edge slices through.
    cut_weight: float = _SEARCH.cut_weight
    # Width of the band straddling each window edge where heat counts as sliced, as a share of
    # the window's short side.
    cut_band: float = _SEARCH.cut_band
    # Penalty per unit of zoom (1 - scale): a smaller window must hold that much more heat.
    zoom_weight: float = _SEARCH.zoom_weight
    # Sigma of the centre prior, as a share of the map's size on each axis.
    center_sigma: float = 0.3
    # Share of the centre prior blended into the map; 0: none.
    center_weight: float = 0.0
    # Exponent applied to the map before upsampling; above 1 sharpens it.
    gamma: float = 1.0
    smooth: float = 1.0  # Gaussian blur of the prepared map, sigma in its cells (0: none)
    # Least gain over the centre crop for a smart answer; below it, the legacy crop.
    min_confidence: float = 0.0
    # Faces: the detector (YuNet, engines/faces.py, built by `make model` into engine.model_dir)
    # runs on the CNN's input in the same engine call, its boxes are cached with the heatmap,
    # and the face rule (kernels/faces.py) keeps the faces whole. A missing or tampered detector
    # file: the service runs without faces and logs one warning saying why.
    faces: bool = True
    # Least detector score (sqrt(cls x obj)) of a face; 0.6 is precision 0.975 on crowd_train.
    face_score: float = 0.6
    # Faces kept per photo at most, the best scores first: bounds the face rule's work.
    max_faces: int = 64
    # Faces the rule keeps whole: head boxes at least this share of the photo's height; smaller
    # ones are left to the heat. 1/16, with no margin, zoom or weight: cross-validated on
    # crowd_train and osie_train (training/face_rule.py, training/results/face_rule.md).
    face_min_height: float = 1 / 16
    # With faces to keep whole, windows down to this share of the largest are tried (1: none).
    face_min_scale: float = 1.0
    # The box kept whole around each face: its head box grown by this share of its size on
    # every side (where the head lies around a detected face varies).
    face_margin: float = 0.0
    # Score bonus for keeping every face (per face: face_weight / faces), among the windows
    # that slice the fewest; 0: the heat kept decides alone.
    face_weight: float = 0.0


@dataclass(frozen=True)
class CacheSettings:
    """Heatmaps (per original and model) and boxes (per heatmap, aspect and search settings):
    a bounded in-process LRU, and Redis shared by several sidecars when asked."""

    # memory: this process only; redis: also in Redis at redis_url (down: memory only).
    backend: str = "memory"
    # One Redis: redis://[:password@]host[:port][/db]. A Redis Cluster: its seed nodes,
    # redis-cluster://[:password@]host:port[,host:port...] (any reachable one finds the others).
    # rediss:// and rediss-cluster:// for TLS.
    redis_url: str = ""
    # Heatmaps kept in process memory (least recently used go first).
    heatmap_entries: int = 20_000
    # Boxes kept in process memory.
    box_entries: int = 100_000
    # How long a cached heatmap or box lives.
    ttl_s: int = 7 * 24 * 3600


@dataclass(frozen=True)
class LegacySettings:
    """The existing image server that resizes and encodes: the URLs the sidecar hands nginx."""

    # How crop and fallback URLs are written; template: any other server, through template.
    dialect: str = "thumbor"
    # Not read by the sidecar, which writes paths only: nginx's --legacy decides where they go.
    base_url: str = "http://127.0.0.1:8888"
    # Signing key: Thumbor's SECURITY_KEY, or imgproxy's IMGPROXY_KEY in hex; empty: unsigned.
    key: str = ""
    # imgproxy's IMGPROXY_SALT, in hex.
    salt: str = ""
    # URLs of the template dialect: CROP|PLAIN, two str.format paths, e.g.
    # /crop/{x0},{y0},{x1},{y1}/{w}x{h}/{path}|/fit/{w}x{h}/{path}.
    template: str = ""
    # Browser and nginx lifetime of a fallback answer (the legacy crop).
    fallback_max_age_s: int = 30


@dataclass(frozen=True)
class Settings:
    server: ServerSettings = field(default_factory=ServerSettings)
    source: SourceSettings = field(default_factory=SourceSettings)
    engine: EngineSettings = field(default_factory=EngineSettings)
    kernel: KernelSettings = field(default_factory=KernelSettings)
    cache: CacheSettings = field(default_factory=CacheSettings)
    legacy: LegacySettings = field(default_factory=LegacySettings)

    def validate(self) -> Settings:
        """Raise SettingsError naming the variable of the first wrong value; return self."""
        for section, name, ok, why in _RULES:
            value = getattr(getattr(self, section), name)
            if not ok(value):
                raise SettingsError(f"{env_name(section, name)}={value!r}: {why}")
        for section, name, limit in _BELOW:
            value, bound = (getattr(getattr(self, section), n) for n in (name, limit))
            if value >= bound:
                raise SettingsError(
                    f"{env_name(section, name)}={value}: "
                    f"must be below {env_name(section, limit)}={bound}"
                )
        _check_legacy(self.legacy)
        if self.cache.backend == "redis":
            redis_target(self.cache.redis_url)  # says what is wrong with the URL
        return self


# Fields each legacy URL template may use (sidecar/legacy.py fills them).
CROP_FIELDS = frozenset({"x0", "y0", "x1", "y1", "cw", "ch", "w", "h", "path"})
PLAIN_FIELDS = frozenset({"w", "h", "path"})


def _check_legacy(legacy: LegacySettings) -> None:
    """Dialect-specific values, so that a wrong one stops start-up instead of every answer."""
    if legacy.dialect == "imgproxy":
        for name in ("key", "salt"):
            try:
                bytes.fromhex(getattr(legacy, name))
            except ValueError as exc:
                raise SettingsError(f"{env_name('legacy', name)}: must be hex ({exc})") from exc
    if legacy.dialect == "template":
        var = env_name("legacy", "template")
        crop, bar, plain = legacy.template.partition("|")
        if not bar or "|" in plain:
            raise SettingsError(f"{var}={legacy.template!r}: must be CROP|PLAIN, one '|'")
        for what, text, allowed in (("crop", crop, CROP_FIELDS), ("plain", plain, PLAIN_FIELDS)):
            _check_template(var, what, text, allowed)


def _check_template(var: str, what: str, text: str, allowed: frozenset[str]) -> None:
    if not text.startswith("/"):
        raise SettingsError(f"{var}: the {what} template must start with '/', got {text!r}")
    try:
        fields = {f for _, f, _, _ in string.Formatter().parse(text) if f is not None}
    except ValueError as exc:
        raise SettingsError(f"{var}: the {what} template {text!r} does not parse ({exc})") from exc
    unknown = fields - allowed
    if unknown:
        raise SettingsError(
            f"{var}: the {what} template uses {sorted(unknown)}; allowed: {sorted(allowed)}"
        )
    try:
        text.format(**dict.fromkeys(allowed, 1))
    except (ValueError, KeyError, IndexError, AttributeError, TypeError) as exc:
        raise SettingsError(f"{var}: the {what} template {text!r} does not format ({exc})") from exc


def env_name(section: str, name: str) -> str:
    return f"{ENV_PREFIX}{section}_{name}".upper()


@dataclass(frozen=True)
class RedisTarget:
    """The shared tier ``cache.redis_url`` names: one Redis, or the seed nodes of a cluster."""

    nodes: tuple[tuple[str, int], ...]  # (host, port): one, or a cluster's seed nodes
    cluster: bool
    db: int = 0  # a cluster has db 0 only
    password: str | None = None
    ssl: bool = False


REDIS_PORT = 6379
_SINGLE = {"redis": False, "rediss": True}
_CLUSTER = {"redis-cluster": False, "rediss-cluster": True}
REDIS_URL_FORMS = (
    "redis://[:password@]host[:port][/db] or redis-cluster://[:password@]host:port[,host:port...]"
    " (rediss for TLS)"
)


def redis_target(url: str) -> RedisTarget:
    """What ``url`` names; SettingsError naming the variable when it is not one of the forms."""
    scheme, sep, rest = url.partition("://")
    scheme = scheme.lower()
    userinfo, at, hosts = rest.rpartition("@")
    # The message names the URL without its password: it goes to logs.
    var = env_name("cache", "redis_url") + "=" + repr(f"{scheme}://***@{hosts}" if at else url)
    if not sep or scheme not in _SINGLE | _CLUSTER:
        raise SettingsError(f"{var}: expected {REDIS_URL_FORMS}")
    password = (unquote(userinfo.partition(":")[2]) or None) if at else None
    hosts, slash, path = hosts.partition("/")
    try:
        nodes = tuple(_host_port(part) for part in hosts.split(","))
        db = int(path or "0") if slash else 0
    except ValueError as exc:
        raise SettingsError(f"{var}: expected {REDIS_URL_FORMS} ({exc})") from exc
    cluster = scheme in _CLUSTER
    if db < 0 or (cluster and db != 0):
        raise SettingsError(f"{var}: db must be >= 0, and 0 in a cluster")
    if not cluster and len(nodes) != 1:
        raise SettingsError(f"{var}: one host for redis://; redis-cluster:// for several")
    return RedisTarget(nodes, cluster, db, password, (_SINGLE | _CLUSTER)[scheme])


def _host_port(text: str) -> tuple[str, int]:
    parts = urlsplit(f"//{text.strip()}")
    if not parts.hostname or parts.username is not None:
        raise ValueError(f"no host in {text!r}")
    return parts.hostname, parts.port or REDIS_PORT


COLD_POLICIES = ("wait", "legacy")
# Finite too: an `inf` deadline or weight passes a plain comparison and breaks at run time.
_POS = (lambda v: math.isfinite(v) and v > 0, "must be a finite number > 0")
_NONNEG = (lambda v: math.isfinite(v) and v >= 0, "must be a finite number >= 0")
_RULES: tuple[tuple[str, str, typing.Callable[[Any], bool], str], ...] = (
    ("server", "port", lambda v: 0 <= v < 65536, "must be a TCP port"),
    ("server", "deadline_ms", *_POS),
    ("server", "decode_threads", *_POS),
    ("server", "max_width", *_POS),
    ("server", "max_height", *_POS),
    ("server", "max_batch", *_POS),
    ("server", "max_wait_ms", *_NONNEG),
    ("server", "max_queue", *_POS),
    ("server", "worker_nice", lambda v: 0 <= v <= 19, "must be in [0, 19]"),
    ("server", "answer_margin_ms", *_NONNEG),
    ("server", "cold_policy", lambda v: v in COLD_POLICIES, "must be wait or legacy"),
    (
        "server",
        "background_cpu_share",
        lambda v: math.isfinite(v) and 0 < v <= 64,
        "must be a number of cores in (0, 64]",
    ),
    ("source", "kind", lambda v: v in ("folder", "http"), "must be folder or http"),
    ("source", "max_bytes", *_POS),
    ("source", "max_pixels", *_POS),
    ("source", "connect_timeout_ms", *_POS),
    ("source", "read_timeout_ms", *_POS),
    ("engine", "kind", lambda v: v in ("auto", "ort", "trt"), "must be auto, ort or trt"),
    (
        "engine",
        "trt_precision",
        lambda v: v in ("fp16", "int8", "fp32"),
        "must be fp16, int8 or fp32",
    ),
    (
        "engine",
        "ort_precision",
        lambda v: v in ("auto", "int8", "fp32"),
        "must be auto, int8 or fp32",
    ),
    ("engine", "threads", *_POS),
    ("engine", "session_per_core", lambda v: isinstance(v, bool), "must be true or false"),
    (
        "engine",
        "profile",
        lambda v: v in ("food", "generic", "readout", "auto", "learned"),
        "must be food, generic, readout, auto or learned",
    ),
    # The window search's knobs within the bounds the search defines (kernels.window).
    *(("kernel", name, bounds.admits, f"must be {bounds}") for name, bounds in KNOB_BOUNDS.items()),
    # The service's own policy on top: no reward for zooming in (training/tune.py measures it).
    ("kernel", "zoom_weight", *_NONNEG),
    ("kernel", "upsample", lambda v: 1 <= v <= 16, "must be in [1, 16]"),
    ("kernel", "center_sigma", lambda v: 0 < v <= 10, "must be in (0, 10]"),
    ("kernel", "center_weight", lambda v: 0 <= v <= 1, "must be in [0, 1]"),
    ("kernel", "gamma", lambda v: 0.1 <= v <= 8, "must be in [0.1, 8]"),
    ("kernel", "smooth", lambda v: 0 <= v <= 16, "must be in [0, 16]"),
    ("kernel", "min_confidence", *_NONNEG),
    ("kernel", "faces", lambda v: isinstance(v, bool), "must be true or false"),
    ("kernel", "face_weight", *_NONNEG),
    ("kernel", "face_score", lambda v: 0 < v < 1, "must be in (0, 1)"),
    ("kernel", "max_faces", lambda v: 1 <= v <= 128, "must be in [1, 128]"),
    ("kernel", "face_min_height", lambda v: 0 <= v < 1, "must be in [0, 1)"),
    ("kernel", "face_min_scale", lambda v: 0.5 <= v <= 1, "must be in [0.5, 1]"),
    ("kernel", "face_margin", lambda v: 0 <= v <= 1, "must be in [0, 1]"),
    ("cache", "backend", lambda v: v in ("memory", "redis"), "must be memory or redis"),
    ("cache", "heatmap_entries", *_POS),
    ("cache", "box_entries", *_POS),
    ("cache", "ttl_s", *_POS),
    (
        "legacy",
        "dialect",
        lambda v: v in ("thumbor", "imgproxy", "template"),
        "must be thumbor, imgproxy or template",
    ),
    ("legacy", "fallback_max_age_s", lambda v: 0 < v <= 30, "must be in (0, 30]"),
)
# (section, field, other field of that section): the field must stay below the other one.
_BELOW: tuple[tuple[str, str, str], ...] = (
    # Time must be left for the work itself.
    ("server", "answer_margin_ms", "deadline_ms"),
    ("server", "max_wait_ms", "deadline_ms"),
)


def load(path: str | Path | None = None, environ: Mapping[str, str] | None = None) -> Settings:
    """Defaults, overlaid by the TOML file (``path`` or $HEATCROP_CONFIG), then the env."""
    env = os.environ if environ is None else environ
    path = path or env.get(CONFIG_ENV) or None
    data: dict[str, Any] = {}
    if path:
        try:
            data = tomllib.loads(Path(path).read_text())
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise SettingsError(f"{CONFIG_ENV}={path}: cannot read settings: {exc}") from exc
    sections = {}
    for sec in dataclasses.fields(Settings):
        sections[sec.name] = _section(sec.name, _section_type(sec), data.get(sec.name, {}), env)
    unknown = set(data) - set(sections)
    if unknown:
        raise SettingsError(f"{path}: unknown section(s) {sorted(unknown)}")
    return Settings(**sections).validate()


def _section_type(f: dataclasses.Field[Any]) -> type:
    hints = typing.get_type_hints(Settings)
    return typing.cast(type, hints[f.name])


def _section(name: str, cls: type, table: Any, env: Mapping[str, str]) -> Any:
    if not isinstance(table, dict):
        raise SettingsError(f"[{name}] must be a table")
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    for key in table:
        if key not in known:
            raise SettingsError(f"{env_name(name, key)}: unknown setting [{name}].{key}")
    values: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        var = env_name(name, f.name)
        if var in env:
            values[f.name] = _parse(var, env[var], hints[f.name])
        elif f.name in table:
            values[f.name] = _coerce(var, table[f.name], hints[f.name])
    return cls(**values)


def _parse(var: str, text: str, typ: Any) -> Any:
    if typ is bool:
        low = text.strip().lower()
        if low in ("1", "true", "yes", "on"):
            return True
        if low in ("0", "false", "no", "off"):
            return False
        raise SettingsError(f"{var}={text!r}: must be a boolean")
    if _is_tuple(typ):
        return tuple(p.strip() for p in text.split(",") if p.strip())
    try:
        return typ(text)
    except ValueError as exc:
        raise SettingsError(f"{var}={text!r}: must be {typ.__name__}") from exc


def _coerce(var: str, value: Any, typ: Any) -> Any:
    if _is_tuple(typ):
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise SettingsError(f"{var}={value!r}: must be a list of strings")
        return tuple(value)
    if typ is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if not isinstance(value, typ) or (typ is int and isinstance(value, bool)):
        raise SettingsError(f"{var}={value!r}: must be {typ.__name__}")
    return value


def _is_tuple(typ: Any) -> bool:
    return typing.get_origin(typ) is tuple
