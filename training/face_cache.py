"""Face boxes of every photo of a set, detected once and cached: ``python -m training.face_cache``.

    python -m training.face_cache [--sets fcdb_train,...] [--eval-dir ../shared/eval]
        [--model-dir build/model] [--cache build/heads]

The detector is engines/faces.py's YuNet as the service runs it (default FaceParams, one
thread, on the photo's shape bucket as the service decodes it); boxes are stored in the
original photo's pixels in
``<cache>/faces-<detector version>-<set>.npz`` (``names``, ``offsets``, ``boxes`` [N, 5]:
x0, y0, x1, y1, score), so that the read-out head can take them as an input channel
(training/heads.py, ``faces=1``) without running the detector again.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import numpy.typing as npt

from engines.faces import FaceDetector, FaceParams
from training.data import FIT_SETS, EvalSet, load_set
from training.faces import detect_original

F32 = npt.NDArray[np.float32]
DEFAULT_CACHE = Path("build/heads")


def cache_path(cache: Path, version: str, set_name: str) -> Path:
    return Path(cache) / f"faces-{version}-{set_name}.npz"


def save_boxes(path: Path, boxes: dict[str, F32]) -> None:
    names = list(boxes)
    counts = [len(boxes[n]) for n in names]
    offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    flat = (
        np.concatenate([boxes[n].reshape(-1, 5) for n in names]).astype(np.float32)
        if names
        else np.zeros((0, 5), np.float32)
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.npz")
    np.savez(tmp, names=np.array(names), offsets=offsets, boxes=flat.reshape(-1, 5))
    tmp.replace(path)


def load_boxes(path: Path) -> dict[str, F32]:
    with np.load(path) as z:
        names, offsets, flat = z["names"], z["offsets"], z["boxes"]
    return {str(n): flat[offsets[i] : offsets[i + 1]] for i, n in enumerate(names)}


def detect_cached(
    detector: FaceDetector, eval_set: EvalSet, cache: Path = DEFAULT_CACHE
) -> dict[str, F32]:
    """The set's face boxes by image name, from the cache or detected (and cached) now."""
    path = cache_path(cache, detector.version, eval_set.name)
    if path.exists():
        found = load_boxes(path)
        if all(it.name in found for it in eval_set.items):
            return found
    boxes = {}
    t0 = time.perf_counter()
    for i, item in enumerate(eval_set.items):
        boxes[item.name] = detect_original(detector, item)[0]
        if (i + 1) % 100 == 0:
            print(
                f"{eval_set.name}: {i + 1}/{len(eval_set.items)} "
                f"({time.perf_counter() - t0:.0f} s)",
                flush=True,
            )
    save_boxes(path, boxes)
    return boxes


def load_cached(
    set_name: str, cache: Path = DEFAULT_CACHE, model_dir: str | Path = "build/model"
) -> dict[str, F32]:
    """The cached boxes of a set for the default detector (raises when not cached)."""
    version = FaceDetector(model_dir, FaceParams()).version
    path = cache_path(cache, version, set_name)
    if not path.exists():
        raise FileNotFoundError(f"{path}: run python -m training.face_cache --sets {set_name}")
    return load_boxes(path)


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sets", default=",".join((*FIT_SETS, "fcdb_dev")))
    ap.add_argument("--eval-dir", type=Path, default=Path("../shared/eval"))
    ap.add_argument("--model-dir", default="build/model")
    ap.add_argument("--cache", type=Path, default=DEFAULT_CACHE)
    args = ap.parse_args(argv)
    detector = FaceDetector(args.model_dir, FaceParams())
    detector.warm_up()
    for name in args.sets.split(","):
        eval_set = load_set(args.eval_dir, name)
        t0 = time.perf_counter()
        boxes = detect_cached(detector, eval_set, args.cache)
        n = sum(len(b) for b in boxes.values())
        with_faces = sum(len(b) > 0 for b in boxes.values())
        print(
            f"{name}: {len(boxes)} photos, {with_faces} with faces, {n} boxes "
            f"({time.perf_counter() - t0:.0f} s)",
            flush=True,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
