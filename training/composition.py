"""Composition priors on the learned map: does a rule of thirds pay for itself?

    python -m training.composition [--folds 5] [--out training/results/composition.md]

The window search places the largest window of the aspect where it holds the most heat. A
composition prior adds a reward for where that heat sits inside the window:

    score = inside + weight * sum over the window of heat * t(u)

u in [0, 1] is the position along the window's free axis (the largest window spans the whole
image on the other axis, so a prior along that one cannot move it), and t is a template with
zero mean over [0, 1], so a flat map gains nothing anywhere: `thirds` peaks at u = 1/3 and 2/3
(a subject on a thirds line), `centre` at 1/2 (a subject centred in the crop, not just in it).

Same maps (the shipped `learned` blend with the read-out's held-out maps, training/tune.py,
prepared with the shipped settings, blur included), same offsets and tie-break as the kernel
(without its cut term), same objective and k-fold selection as training.tune: a prior
and its weight are chosen on k-1 folds and the figures reported are the held-out fold's; weight
0 is among the candidates, so "no prior" is what a prior has to beat.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import numpy.typing as npt
from tqdm import tqdm

from kernels.window import TIE_EPS, largest_window
from sidecar.core import CAM_SHARE, Analysis, blend_profiles, prepare
from sidecar.settings import KernelSettings
from training import tune
from training.data import Box, EvalSet, publish

# Midpoint samples of the template term per window: the map has at most a few dozen cells
# along an axis, so 512 samples put the term within ~1/500 of its exact integral.
SAMPLES = 512


@dataclass(frozen=True)
class Prior:
    kind: str  # "thirds" | "centre"
    sigma: float  # width of each peak, in units of the window's free side
    weight: float

    def label(self) -> str:
        return "no prior" if self.weight == 0.0 else f"{self.kind} σ={self.sigma} w={self.weight}"


def template(kind: str, sigma: float, u: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
    """The prior's template at positions u in [0, 1], minus its mean over [0, 1]."""
    centres = {"thirds": (1 / 3, 2 / 3), "centre": (0.5,)}[kind]
    grid = (np.arange(SAMPLES) + 0.5) / SAMPLES

    def bumps(x: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
        return sum((np.exp(-((x - c) ** 2) / (2 * sigma**2)) for c in centres), np.zeros_like(x))

    return bumps(u) - float(bumps(grid).mean())


def offsets(m: int, steps: int) -> npt.NDArray[np.int64]:
    """The kernel's candidate offsets on an axis with offsets 0..m: `steps` evenly spaced
    ones (all of them when there are no more) and the centre one."""
    if m + 1 <= steps:
        return np.arange(m + 1, dtype=np.int64)
    even = [(2 * i * m + steps - 1) // (2 * (steps - 1)) for i in range(steps)]
    return np.unique(np.array([*even, m // 2], dtype=np.int64))


def choose_box(
    heat: npt.NDArray[np.float64],
    width: int,
    height: int,
    aspect: float,
    prior: Prior,
    steps: int = 64,
) -> Box:
    """The largest window of `aspect` with the best inside + prior score on `heat` (sum 1)."""
    cw, ch = largest_window(width, height, aspect)
    free_x = cw < width
    density = heat.sum(axis=0 if free_x else 1)  # heat per cell along the free axis
    length, side = (width, cw) if free_x else (height, ch)
    cells = density.size
    cumulative = np.concatenate([[0.0], np.cumsum(density)])
    best, best_o, best_d = -np.inf, 0, 0
    u = (np.arange(SAMPLES) + 0.5) / SAMPLES
    t = template(prior.kind, prior.sigma, u) if prior.weight else np.zeros(SAMPLES)
    for o in offsets(length - side, steps):
        lo, hi = o * cells / length, (o + side) * cells / length
        inside = np.interp(hi, np.arange(cells + 1), cumulative) - np.interp(
            lo, np.arange(cells + 1), cumulative
        )
        # Heat per cell at each sample, times the sample's share of the window: sums to
        # `inside` (to within the midpoint rule) when t is 1.
        at = density[np.minimum((lo + u * (hi - lo)).astype(np.int64), cells - 1)]
        score = inside + prior.weight * float((at * t).sum()) * (hi - lo) / SAMPLES
        d = abs(2 * int(o) + side - length)
        if score > best + TIE_EPS or (score >= best - TIE_EPS and d < best_d):
            best, best_o, best_d = score, int(o), d
    if free_x:
        return Box(best_o, 0, best_o + cw, ch)
    return Box(0, best_o, cw, best_o + ch)


def learned_heat(analysis: Analysis, kernel: KernelSettings) -> npt.NDArray[np.float64]:
    """The shipped default's prepared map (learned blend, upsampled, sum 1)."""
    heat = prepare(blend_profiles(analysis, "learned", CAM_SHARE), kernel).astype(np.float64)
    return heat / heat.sum()


def priors() -> list[Prior]:
    grid = [Prior("thirds", 0.0, 0.0)]
    for kind, sigma in (("thirds", 0.05), ("thirds", 0.1), ("centre", 0.15)):
        grid += [Prior(kind, sigma, w) for w in (0.25, 0.5, 1.0, 2.0)]
    return grid


def gains(
    prior: Prior,
    sets: Sequence[EvalSet],
    heats: dict[str, tuple[npt.NDArray[np.float64], int, int]],
    centre: dict[str, npt.NDArray[np.float64]],
    room: dict[str, npt.NDArray[np.float64]],
    steps: int,
) -> dict[str, npt.NDArray[np.float64]]:
    """Per set, the per-image gain over the centre crop in units of the set's headroom."""
    out = {}
    for s in sets:
        key = tune.PRIMARY[s.protocol.kind]
        vals = np.zeros(len(s.items))
        for i, item in enumerate(s.items):
            heat, w, h = heats[str(item.path)]
            boxes = [
                choose_box(heat, w, h, a, prior, steps) for a in s.protocol.aspects(item).values()
            ]
            vals[i] = np.mean([s.protocol.score(item, b)[key] for b in boxes])
        out[s.name] = (vals - centre[s.name]) / room[s.name].mean()
    return out


def report(
    grid: Sequence[Prior],
    table: dict[int, dict[str, npt.NDArray[np.float64]]],
    sets: Sequence[EvalSet],
    folds: int,
    room: dict[str, npt.NDArray[np.float64]],
    seconds: float,
) -> str:
    held, chosen = tune.cross_validate(table, sets, folds, room)
    names = [s.name for s in sets]
    lines = [
        f"# composition priors ({datetime.now(UTC):%Y-%m-%d %H:%M} UTC)",
        "",
        f"{len(grid)} candidates on the shipped `learned` map (read-out held-out), "
        f"{folds}-fold cross-validation as in training.tune; {seconds:.0f} s.",
        "",
        "Share of the centre → oracle headroom of the primary metric (fcdb IoU, food kept, "
        "fixations):",
        "",
        "| | " + " | ".join(names) + " |",
        "|---|" + "---:|" * len(names),
        "| held-out folds (prior chosen per fold) | "
        + " | ".join(f"{held[n]:+.1%}" for n in names)
        + " |",
        "",
        "Chosen per fold: " + "; ".join(f"`{grid[i].label()}`" for i in chosen),
        "",
        "In-sample, every candidate:",
        "",
    ]
    lines += tune.score_rows([(p.label(), table[i]) for i, p in enumerate(grid)], names)
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--eval-dir", default="../shared/eval")
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument("--out", type=Path, default=Path("training/results/composition.md"))
    args = parser.parse_args(argv)
    t0 = time.perf_counter()
    inputs = tune.load_inputs(args.eval_dir)
    kernel = inputs.settings.kernel
    heats = {path: (learned_heat(a, kernel), a.width, a.height) for path, a in inputs.store.items()}
    grid = priors()
    table = {
        i: gains(p, inputs.sets, heats, inputs.centre, inputs.room, kernel.steps)
        for i, p in enumerate(tqdm(grid, desc="priors", file=sys.stderr))
    }
    text = report(grid, table, inputs.sets, args.folds, inputs.room, time.perf_counter() - t0)
    publish(text, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
