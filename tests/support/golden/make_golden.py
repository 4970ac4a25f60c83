"""Regenerate tests/support/golden/lite0_reference.npz from the reference PyTorch model.

Needs the ``reference`` extra (torch 2.13 CPU and efficientnet-lite-pytorch 0.1.0):

    .venv/bin/pip install torch==2.13.0
    .venv/bin/pip install --no-deps efficientnet-lite-pytorch==0.1.0
    .venv/bin/python -m tests.support.golden.make_golden

The heads (food CAM, generic feature RMS, food mass) are written again here in torch,
straight from their definition in engines/graph.py, on the reference model's own feature map,
so the ONNX graph is checked against an independent implementation and not against itself.

Inputs are stored as the exact uint8 arrays fed to the model: the resize here only has to be
deterministic once, not across libvips versions.
"""

from __future__ import annotations

import hashlib
import math
import sys
from pathlib import Path

import numpy as np
import numpy.typing as npt
import pyvips
import skimage.data
import torch
from efficientnet_lite_pytorch import EfficientNet

from engines.classes import FOOD_CLASSES
from engines.graph import GENERIC_HEAD
from engines.weights import shipped_weights_path

OUT = Path(__file__).with_name("lite0_reference.npz")
BUCKETS: tuple[tuple[int, int], ...] = ((224, 224), (224, 320))
PHOTOS: tuple[str, ...] = ("coffee", "chelsea", "astronaut")
NOISE_SEED = 20240601
NOISE_IMAGES = 2


def resize(rgb: npt.NDArray[np.uint8], height: int, width: int) -> npt.NDArray[np.uint8]:
    image = pyvips.Image.new_from_array(rgb, interpretation="srgb")
    image = image.thumbnail_image(width, height=height, size="force")
    out = np.asarray(image.numpy(), dtype=np.uint8)
    assert out.shape == (height, width, 3), out.shape
    return out


def inputs(height: int, width: int) -> tuple[list[str], npt.NDArray[np.uint8]]:
    rng = np.random.default_rng(NOISE_SEED + height * 1000 + width)
    names = [f"noise{i}" for i in range(NOISE_IMAGES)] + list(PHOTOS)
    arrays = [rng.integers(0, 256, (height, width, 3), dtype=np.uint8) for _ in range(2)]
    arrays += [resize(getattr(skimage.data, name)(), height, width) for name in PHOTOS]
    return names, np.stack(arrays)


def reference_heads(
    model: EfficientNet, batch: npt.NDArray[np.uint8]
) -> dict[str, npt.NDArray[np.float32]]:
    x = (torch.from_numpy(batch).permute(0, 3, 1, 2).float() - 127.0) / 128.0
    with torch.no_grad():
        logits = model(x)
        features = model.extract_features(x)  # [N, 1280, h, w], after the head's ReLU6
        weight, bias = model._fc.weight, model._fc.bias
        cam = torch.einsum("kc,nchw->nkhw", weight, features) + bias[None, :, None, None]

        food = cam[:, list(FOOD_CLASSES)]
        food_heat = torch.relu(torch.logsumexp(food, dim=1) - math.log(len(FOOD_CLASSES)))

        generic_heat = torch.sqrt((features**2).mean(dim=1))

        probs = torch.softmax(logits, dim=1)
    return {
        "logits": logits.numpy(),
        "heatmaps": torch.stack([food_heat, generic_heat], dim=1).numpy(),
        "food_mass": probs[:, list(FOOD_CLASSES)].sum(dim=1).numpy(),
    }


def main() -> int:
    weights = shipped_weights_path()
    model = EfficientNet.from_pretrained("efficientnet-lite0", weights_path=str(weights))
    model.eval()
    arrays: dict[str, npt.NDArray[np.generic]] = {
        "food_classes": np.asarray(FOOD_CLASSES, dtype=np.int64),
        "generic_head": np.asarray(GENERIC_HEAD),
        "weights_sha256": np.asarray(hashlib.sha256(weights.read_bytes()).hexdigest()),
        "torch_version": np.asarray(torch.__version__),
    }
    for height, width in BUCKETS:
        names, batch = inputs(height, width)
        key = f"{height}x{width}"
        arrays[f"names_{key}"] = np.asarray(names)
        arrays[f"inputs_{key}"] = batch
        for field, value in reference_heads(model, batch).items():
            arrays[f"{field}_{key}"] = value.astype(np.float32)
    np.savez_compressed(OUT, **arrays)
    print(f"wrote {OUT} ({OUT.stat().st_size / 1e6:.2f} MB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
