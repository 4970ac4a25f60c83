"""The learned read-out head: which feature maps it reads and how its centre bias is laid out.

Shared by the graph builder (engines/graph.py), which bakes the fitted weights into the ONNX
model, and the fitting script (training/fit_readout.py), which computes the same features from
the exported model's tapped outputs. Weights live in engines/readout_weights.npz.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt

WEIGHTS_PATH = Path(__file__).with_name("readout_weights.npz")


@dataclass(frozen=True)
class Tap:
    tensor: str  # graph tensor name (engines/graph.py naming)
    channels: int
    pool: int  # average-pool factor down to the stride-32 grid


# Multi-scale: the end of the stride-8 and stride-16 stages pooled to the stride-32 grid, the
# last block's output and the head's 1280 features.
TAPS: tuple[Tap, ...] = (
    Tap("_blocks.4.residual", 40, 4),
    Tap("_blocks.10.residual", 112, 2),
    Tap("_blocks.15._project_conv", 320, 1),
    Tap("_conv_head.relu6", 1280, 1),
)
FEATURES = sum(t.channels for t in TAPS)
# Centre bias terms, in relative cell coordinates u, v in (-1, 1): u, v, u², v².
COORD_TERMS = 4


def coord_axis(n: int) -> npt.NDArray[np.float64]:
    """Relative coordinates of the n cell centres of one axis, in (-1, 1)."""
    return (np.arange(n, dtype=np.float64) + 0.5) / n * 2.0 - 1.0


def coord_features(h: int, w: int) -> npt.NDArray[np.float64]:
    """[h * w, COORD_TERMS] centre-bias terms (u, v, u², v²) per cell, row-major."""
    v, u = np.meshgrid(coord_axis(h), coord_axis(w), indexing="ij")
    u, v = u.ravel(), v.ravel()
    return np.column_stack([u, v, u * u, v * v])


def load_weights(path: Path = WEIGHTS_PATH) -> dict[str, npt.NDArray[np.float32]]:
    """The shipped read-out: w1 [H, FEATURES], b1 [H], optionally w2 [1, H], b2 [1]; a [4]."""
    with np.load(path, allow_pickle=False) as z:
        return {k: z[k] for k in z.files}
