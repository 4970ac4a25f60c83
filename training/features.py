"""What the fitters share: per-cell features of the eval images, the ground truth as a
distribution over the same cells, and the centre / oracle / window-search scores of a set.

training/fit_readout.py and training/fit_window.py both build on this module (and
training/tune.py on its reference scores); it imports neither of them.

Features are computed once per image by the exported model with extra graph outputs (ONNX
Runtime, no torch) and kept in build/readout/ (per model version).
"""

from __future__ import annotations

import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import numpy.typing as npt
import onnx
import onnxruntime as ort
from tqdm import tqdm

from engines.base import INPUT_NAME
from engines.model import find_model
from engines.readout import TAPS, aspect_bucket
from kernels.window import best_window, center_box
from sidecar.core import prepare, search_params
from sidecar.decode import Decoded, configure_vips, decode
from sidecar.settings import KernelSettings, SourceSettings
from training.data import (
    CACHE,
    Box,
    EvalItem,
    EvalSet,
    centre_box,
    feature_key,
    oracle_box,
)

F32 = npt.NDArray[np.float32]
F64 = npt.NDArray[np.float64]


@dataclass
class SetFeatures:
    """Per-cell features of a set's images, rows of all images stacked."""

    names: list[str]
    shapes: npt.NDArray[np.int64]  # [n, 2] (h, w) of each image's grid
    offsets: npt.NDArray[np.int64]  # [n + 1] row ranges
    features: npt.NDArray[np.float16]  # [rows, C]

    def rows(self, i: int) -> slice:
        return slice(int(self.offsets[i]), int(self.offsets[i + 1]))


def feature_session(model_dir: Path, threads: int = 2) -> tuple[ort.InferenceSession, str]:
    """The exported model with its tapped feature maps as extra outputs, and the cache key
    (training.data.feature_key: the backbone's weights, not the read-out head)."""
    path = find_model(model_dir)
    key = feature_key(model_dir)
    model = onnx.load(str(path))
    for tap in TAPS:
        model.graph.output.append(onnx.helper.make_empty_tensor_value_info(tap.tensor))
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    session = ort.InferenceSession(
        model.SerializeToString(), options, providers=["CPUExecutionProvider"]
    )
    return session, key


def pooled(x: F32, factor: int) -> F32:
    """[C, H, W] average-pooled by `factor` (sides are multiples of it), as AveragePool does."""
    c, h, w = x.shape
    return x.reshape(c, h // factor, factor, w // factor, factor).mean(axis=(2, 4))


def image_features(session: ort.InferenceSession, pixels: npt.NDArray[np.uint8]) -> F32:
    """[h * w, C] tapped features on the stride-32 grid, row-major over cells."""
    outs = session.run([t.tensor for t in TAPS], {INPUT_NAME: pixels[np.newaxis]})
    maps = [pooled(o[0], t.pool) if t.pool > 1 else o[0] for o, t in zip(outs, TAPS, strict=True)]
    stacked = np.concatenate(maps, axis=0)
    return stacked.reshape(stacked.shape[0], -1).T.astype(np.float32)


def decoded_items(eval_set: EvalSet, desc: str) -> Iterator[tuple[EvalItem, Decoded]]:
    """Every image of the set with its pixels decoded as the service decodes them (its source
    limits, shrink-on-load to its input bucket), behind a progress bar."""
    configure_vips()
    src = SourceSettings()
    for item in tqdm(eval_set.items, desc=desc, file=sys.stderr, mininterval=10.0):
        data = item.path.read_bytes()
        yield item, decode(data, max_bytes=src.max_bytes, max_pixels=src.max_pixels)


def mirrored_item(item: EvalItem) -> EvalItem:
    """The item's ground truth for its left-right mirror image (pixel x -> width - x)."""
    boxes = tuple(Box(item.width - b.x1, b.y0, item.width - b.x0, b.y1) for b in item.boxes)
    fix = item.fixations.copy()
    fix[:, 0] = item.width - fix[:, 0]
    return replace(item, boxes=boxes, fixations=fix)


def mirrored_set(eval_set: EvalSet) -> EvalSet:
    return replace(
        eval_set, name=eval_set.name + "-mirrored",
        items=tuple(mirrored_item(i) for i in eval_set.items),
    )  # fmt: skip


def extract(eval_set: EvalSet, model_dir: Path, mirror: bool = False) -> SetFeatures:
    """Per-cell features of every image (of its mirror image with `mirror`), cached."""
    session, stem = feature_session(model_dir)
    tag = "-mirrored" if mirror else ""
    cache = CACHE / f"features-{stem}-{eval_set.name}{tag}.npz"
    if cache.exists():
        with np.load(cache) as z:
            return SetFeatures(list(z["names"]), z["shapes"], z["offsets"], z["features"])
    names, shapes, chunks = [], [], []
    for item, decoded in decoded_items(eval_set, eval_set.name):
        if (decoded.width, decoded.height) != (item.width, item.height):
            raise ValueError(f"{item.name}: decoded {decoded.width}x{decoded.height}")
        pixels = np.ascontiguousarray(decoded.pixels[:, ::-1]) if mirror else decoded.pixels
        feats = image_features(session, pixels)
        h, w = decoded.pixels.shape[0] // 32, decoded.pixels.shape[1] // 32
        names.append(item.name)
        shapes.append((h, w))
        chunks.append(feats.astype(np.float16))
    offsets = np.concatenate([[0], np.cumsum([len(c) for c in chunks])]).astype(np.int64)
    out = SetFeatures(names, np.array(shapes, dtype=np.int64), offsets, np.concatenate(chunks))
    CACHE.mkdir(parents=True, exist_ok=True)
    np.savez(cache, names=np.array(names), shapes=out.shapes, offsets=offsets,
             features=out.features)  # fmt: skip
    return out


# --- targets ---------------------------------------------------------------------------------

RASTER = 16  # sub-cells per grid cell when rasterising boxes


def box_mass(item: EvalItem, h: int, w: int) -> F64:
    """[h * w] share of each cell covered by the union of the item's boxes."""
    mask = np.zeros((h * RASTER, w * RASTER), dtype=bool)
    sx, sy = w * RASTER / item.width, h * RASTER / item.height
    for b in item.boxes:
        x0, x1 = round(b.x0 * sx), max(round(b.x0 * sx) + 1, round(b.x1 * sx))
        y0, y1 = round(b.y0 * sy), max(round(b.y0 * sy) + 1, round(b.y1 * sy))
        mask[y0:y1, x0:x1] = True
    return mask.reshape(h, RASTER, w, RASTER).mean(axis=(1, 3)).ravel()


def fixation_mass(item: EvalItem, h: int, w: int) -> F64:
    """[h * w] fixation counts per cell."""
    fx = np.clip(item.fixations[:, 0] / item.width * w, 0, w - 1e-9).astype(int)
    fy = np.clip(item.fixations[:, 1] / item.height * h, 0, h - 1e-9).astype(int)
    counts = np.zeros((h, w))
    np.add.at(counts, (fy, fx), 1.0)
    return counts.ravel()


def targets(eval_set: EvalSet, feats: SetFeatures) -> F64:
    """[rows] ground truth as a distribution over each image's cells."""
    out = np.zeros(len(feats.features))
    for i, item in enumerate(eval_set.items):
        h, w = (int(v) for v in feats.shapes[i])
        mass = (
            fixation_mass(item, h, w)
            if eval_set.protocol.kind == "saliency"
            else box_mass(item, h, w)
        )
        total = mass.sum()
        out[feats.rows(i)] = mass / total if total > 0 else 1.0 / (h * w)
    return out


# --- scores -------------------------------------------------------------------------------------


def fold_of(n: int, folds: int) -> npt.NDArray[np.int64]:
    return np.random.default_rng(0).permutation(n) % folds


@dataclass
class Data:
    sets: dict[str, EvalSet]
    feats: dict[str, SetFeatures]
    targets: dict[str, F64]
    # Mirror images of the fit sets (training-time augmentation), when asked for.
    mirrored: dict[str, tuple[SetFeatures, F64]] = field(default_factory=dict)
    _refs: dict[str, tuple[F64, F64]] = field(default_factory=dict)

    def reference(self, name: str) -> tuple[F64, F64]:
        """Per image, the centre crop's and the oracle's primary metric (computed once:
        the oracle tries 256 positions per image and aspect)."""
        if name not in self._refs:
            self._refs[name] = reference_scores(self.sets[name])
        return self._refs[name]


def share(scores: F64, refs: tuple[F64, F64]) -> float:
    """Share of the centre → oracle headroom that mean `scores` capture."""
    centre, oracle = refs
    return float((scores.mean() - centre.mean()) / (oracle.mean() - centre.mean()))


def primary_scores(
    eval_set: EvalSet,
    heats: Sequence[F32],
    kernel: KernelSettings,
    comps: Sequence[F32 | None] | None = None,
) -> F64:
    """Per image, the primary metric of the window search on each heat map (mean of aspects);
    with `comps`, each image's composition maps [buckets, COMP_MAPS, h, w] (or None), the
    requested aspect's bucket passed to the search as the service does."""
    params = search_params(kernel)
    key = eval_set.protocol.metrics[0].key
    out = np.zeros(len(eval_set.items))
    for i, (item, raw) in enumerate(zip(eval_set.items, heats, strict=True)):
        heat = prepare(raw, kernel)
        comp = None if comps is None else comps[i]
        vals = []
        for aspect in eval_set.protocol.aspects(item).values():
            if comp is None:
                box = best_window(heat, item.width, item.height, aspect, params)
            else:
                maps = comp[aspect_bucket(aspect, len(comp))]
                box = best_window(heat, item.width, item.height, aspect, params, comp=maps)
            if box.confidence < kernel.min_confidence:
                box = center_box(item.width, item.height, aspect)
            vals.append(eval_set.protocol.score(item, Box.of(box))[key])
        out[i] = np.mean(vals)
    return out


def reference_scores(eval_set: EvalSet) -> tuple[F64, F64]:
    """Per image, the primary metric of the centre crop and of the oracle (mean of aspects)."""
    key = eval_set.protocol.metrics[0].key
    centre = np.zeros(len(eval_set.items))
    oracle = np.zeros(len(eval_set.items))
    for i, item in enumerate(eval_set.items):
        aspects = list(eval_set.protocol.aspects(item).values())

        def score(box: Box, item: EvalItem = item) -> float:
            return eval_set.protocol.score(item, box)[key]

        centre[i] = np.mean([score(centre_box(item.width, item.height, a)) for a in aspects])
        oracle[i] = np.mean([score(oracle_box(item, a, score, 256)) for a in aspects])
    return centre, oracle
