"""The crop core: original bytes → heatmap (once per original) → best window (per aspect).

The two halves are apart on purpose: the heatmap is the expensive, cacheable part (one CNN
run serves every size of an original), the window search is cheap and runs per aspect.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import time
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt

from engines.base import PROFILES, Engine
from engines.face_engine import in_pixels
from engines.faces import BOX_FIELDS, HeadBox
from kernels.faces import best_window_faces
from kernels.heat import prepare_heatmap
from kernels.window import CropBox, SearchParams, best_window, center_box, window_sizes
from sidecar.decode import Decoded, decode
from sidecar.settings import KernelSettings, Settings, SourceSettings


@dataclass(frozen=True)
class Analysis:
    """Everything the window search needs about one original; cacheable (small)."""

    width: int
    height: int
    heatmaps: npt.NDArray[np.float16]  # [len(PROFILES), h, w], raw CNN maps
    food_mass: float
    model_version: str
    timings_ms: dict[str, float] = field(default_factory=dict)
    # Faces found in the original (engines/faces.py): [N, 5] x0, y0, x1, y1, score in original
    # pixels; empty when the detector is off or found none. Cached with the heatmaps.
    faces: npt.NDArray[np.float32] = field(default_factory=lambda: no_faces())

    def raw(self, profile: str) -> npt.NDArray[np.float32]:
        return self.heatmaps[PROFILES.index(profile)].astype(np.float32)


def no_faces() -> npt.NDArray[np.float32]:
    return np.zeros((0, BOX_FIELDS), dtype=np.float32)


def make_analysis(
    decoded: Decoded,
    heatmaps: npt.NDArray[np.float32],
    food_mass: float,
    model_version: str,
    timings_ms: dict[str, float] | None = None,
    faces: npt.NDArray[np.float32] | None = None,
) -> Analysis:
    """The Analysis of a decoded original from the engine's output for it (one image's
    ``[len(PROFILES), h, w]`` maps, food mass and faces as shares of the image's sides, as
    ``HeatmapBatch.faces`` gives them): the one place that builds it, for the service's
    pipeline, its background heatmaps, ``heatcrop warm``, ``CropCore.analyse`` (command line,
    debug pages)."""
    return Analysis(
        width=decoded.width,
        height=decoded.height,
        heatmaps=heatmaps.astype(np.float16),
        food_mass=float(food_mass),
        model_version=model_version,
        timings_ms={} if timings_ms is None else timings_ms,
        faces=no_faces() if faces is None else in_pixels(faces, decoded.width, decoded.height),
    )


class CropCore:
    """Decode + infer + search, synchronous; the service wraps it in pools and caches."""

    def __init__(
        self, engine: Engine, kernel: KernelSettings, source: SourceSettings, profile: str = "food"
    ) -> None:
        if profile not in SEARCH_PROFILES:
            raise ValueError(f"unknown profile {profile!r}; expected one of {SEARCH_PROFILES}")
        self.engine = engine
        self.kernel = kernel
        self.source = source
        self.profile = profile
        self.params = search_params(kernel)
        # The face rule's search: zoomed in down to kernel.face_min_scale when that keeps a
        # face whole (used only for photos with faces to protect).
        self.face_params = dataclasses.replace(
            self.params, min_scale=min(self.params.min_scale, kernel.face_min_scale)
        )
        # Detector boxes -> head boxes for the face rule (the constants fitted on crowd_train).
        self.head_box = HeadBox()
        # Part of every box key: boxes found with other search settings are not reused.
        what = repr((profile, CAM_SHARE, kernel))
        self.search_version = hashlib.sha1(what.encode()).hexdigest()[:10]

    @classmethod
    def from_settings(cls, settings: Settings, engine: Engine) -> CropCore:
        return cls(engine, settings.kernel, settings.source, settings.engine.profile)

    def warm(self) -> None:
        """Load the numba kernels (from the on-disk cache, or compile them once) up front."""
        flat = np.ones((7, 7), np.float32)
        maps = np.stack([flat] * len(PROFILES)).astype(np.float16)
        analysis = Analysis(64, 48, maps, 0.5, "warm")
        self.box(analysis, 1.0)

    def analyse(self, data: bytes) -> Analysis:
        t0 = time.perf_counter()
        decoded = decode(data, max_bytes=self.source.max_bytes, max_pixels=self.source.max_pixels)
        t1 = time.perf_counter()
        out = self.engine.infer(decoded.pixels[np.newaxis])
        t2 = time.perf_counter()
        timings = {"decode": (t1 - t0) * 1e3, "infer": (t2 - t1) * 1e3}
        faces = out.faces[0] if out.faces else None
        return make_analysis(
            decoded, out.heatmaps[0], out.food_mass[0], self.engine.version, timings, faces
        )

    def prepared(self, analysis: Analysis, profile: str | None = None) -> npt.NDArray[np.float32]:
        return prepare(blend_profiles(analysis, profile or self.profile), self.kernel)

    def protected(
        self, analysis: Analysis, head_box: HeadBox | None = None
    ) -> npt.NDArray[np.float32]:
        """The head boxes the face rule keeps whole for ``analysis`` (none with faces off): the
        detector's faces as head boxes (``head_box``, default ``self.head_box``), those at least
        ``kernel.face_min_height`` of the photo's height tall. A face people notice must not be
        sliced; a small face at the back of a crowd is sliced by any window anyway, and
        protecting it costs what viewers look at (docs/faces.md)."""
        if not self.kernel.faces or not len(analysis.faces):
            return no_faces()
        heads = (head_box or self.head_box).apply(analysis.faces)
        tall = heads[:, 3] - heads[:, 1] >= self.kernel.face_min_height * analysis.height
        return widened(heads[tall], self.kernel.face_margin)

    def box(
        self,
        analysis: Analysis,
        aspect: float,
        profile: str | None = None,
        keep: tuple[int, int, int, int] | None = None,
        head_box: HeadBox | None = None,
    ) -> CropBox:
        """The best window; with faces to protect (``protected``), by the face rule
        (kernels/faces.py) on them, zoomed in down to ``kernel.face_min_scale``."""
        heat = self.prepared(analysis, profile)
        heads = self.protected(analysis, head_box)
        if len(heads):
            box, _ = best_window_faces(
                heat, analysis.width, analysis.height, aspect, self.face_params, heads, keep,
                self.kernel.face_weight,
            )  # fmt: skip
            return box
        return best_window(heat, analysis.width, analysis.height, aspect, self.params, keep=keep)

    def window_sizes(self, width: int, height: int, aspect: float) -> frozenset[tuple[int, int]]:
        """The sizes of every box ``box`` can return for a width x height original at
        ``aspect`` with these settings: what a cached box must have (sidecar/records.py)."""
        sizes = _window_sizes(width, height, aspect, self.params)
        if self.kernel.faces and self.face_params != self.params:
            sizes |= _window_sizes(width, height, aspect, self.face_params)
        return sizes

    def is_confident(self, box: CropBox) -> bool:
        return box.confidence >= self.kernel.min_confidence

    def center(self, analysis: Analysis, aspect: float) -> CropBox:
        return center_box(analysis.width, analysis.height, aspect)


def widened(boxes: npt.NDArray[np.float32], margin: float) -> npt.NDArray[np.float32]:
    """Boxes grown by ``margin`` of their width and height on every side: where a labelled
    head lies around a detected face varies (training/results/faces.md: its width is 0.46 to
    0.82 of the head's, its centre 0.30 to 0.67 across, 5th to 95th percentile)."""
    out = np.array(boxes, dtype=np.float32).reshape(-1, BOX_FIELDS)
    w = out[:, 2] - out[:, 0]
    h = out[:, 3] - out[:, 1]
    out[:, 0] -= margin * w
    out[:, 2] += margin * w
    out[:, 1] -= margin * h
    out[:, 3] += margin * h
    return out


SEARCH_PROFILES: tuple[str, ...] = (*PROFILES, "auto", "learned")
# Share of the `auto` CAM map in the `learned` profile, cross-validated with the search settings
# (training/tune.py, shares 0 / 0.15 / 0.3): held-out headroom shares fcdb / food / fixations
# 23 / 24 / 21 % with the read-out alone, 26 / 30 / 20 % with the share chosen per fold; 0.15
# is the best on all images. The CAM still knows dishes and objects that the read-out's linear
# map, fitted mostly on other kinds of photos, under-weights.
CAM_SHARE = 0.15


# Asked on every box-cache hit; a handful of sizes per original and aspect.
@functools.lru_cache(maxsize=4096)
def _window_sizes(
    width: int, height: int, aspect: float, params: SearchParams
) -> frozenset[tuple[int, int]]:
    return frozenset(window_sizes(width, height, aspect, params))


def _unit(heat: npt.NDArray[np.float32]) -> npt.NDArray[np.float64]:
    positive = np.maximum(heat, 0.0).astype(np.float64)
    return positive / max(float(positive.sum()), 1e-12)


def blend_profiles(
    analysis: Analysis, profile: str, cam_share: float = CAM_SHARE
) -> npt.NDArray[np.float32]:
    """The raw map of one profile; ``auto`` mixes food and generic by the image's food
    probability; ``learned`` is the read-out with ``cam_share`` of ``auto`` mixed in.

    Each map is normalised first: the food CAM is in logit units and the generic map in
    activation units, and the mix should say "how much is this a food photo", not "which map
    happens to be larger".
    """
    if profile == "learned":
        readout = _unit(analysis.raw("readout"))
        cam = _unit(blend_profiles(analysis, "auto"))
        return ((1.0 - cam_share) * readout + cam_share * cam).astype(np.float32)
    if profile != "auto":
        return analysis.raw(profile)
    food = np.maximum(analysis.raw("food"), 0.0)
    generic = np.maximum(analysis.raw("generic"), 0.0)
    w = min(max(analysis.food_mass, 0.0), 1.0)
    return (
        w * food / max(float(food.sum()), 1e-12)
        + (1.0 - w) * generic / max(float(generic.sum()), 1e-12)
    ).astype(np.float32)


def prepare(raw: npt.NDArray[np.float32], kernel: KernelSettings) -> npt.NDArray[np.float32]:
    """A raw profile map prepared for the search as `kernel` says (upsampling, centre prior,
    gamma, blur): the one place that maps the settings onto prepare_heatmap."""
    h, w = raw.shape
    return prepare_heatmap(
        raw,
        (h * kernel.upsample, w * kernel.upsample),
        center_sigma=kernel.center_sigma,
        center_weight=kernel.center_weight,
        gamma=kernel.gamma,
        smooth=kernel.smooth,
    )


def search_params(kernel: KernelSettings) -> SearchParams:
    return SearchParams(
        min_scale=kernel.min_scale,
        scales=kernel.scales,
        steps=kernel.steps,
        cut_weight=kernel.cut_weight,
        cut_band=kernel.cut_band,
        zoom_weight=kernel.zoom_weight,
    )
