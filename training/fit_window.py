"""Fit the read-out on the window choice itself: the term training/fit_readout.py adds.

    python -m training.fit_window [--dims 128] [--hidden 0] [--tau 0.02] [--l2 3] [--aux 3]
        [--win 1] [--scene 16] [--weights 2,1,1] [--folds 5]
        [--report training/results/fit_window.md]

training/fit_readout.py fits the read-out by a per-cell likelihood of the ground truth; this
module fits it on what the benchmark scores. For every fitting image and aspect, the
largest windows along the free axis are candidates; a candidate's share of the heat is linear
in the cell heats (the kernel's bilinear upsampling and its box sums are linear), so the
model's choice is a softmax over those shares at temperature `tau`, and the loss is minus the
expected ground-truth metric of that choice (IoU, food kept, fixations kept) in units of the
set's headroom, plus `aux` times the per-cell likelihood and an L2 penalty. Features are the
tapped Lite0 features (cached by training/features.py), standardised and whitened to `dims`
principal components fitted on fcdb_train (`dims` 0: the standardised features themselves, as
fit_readout uses them); `scene` > 0 adds the centre-bias terms times the image's first
`scene` mean components (a centre bias that depends on the kind of photo); `hidden` > 0
puts a ReLU layer in between. Cross-validation as in fit_readout: fcdb_train always fitted,
saliency_dev and food_dev in folds, fcdb_dev never. Each run appends its held-out shares of
the headroom to the report.

The command line explores the variants (docs/quality.md, training/results/fit_window.md); the
shipped head comes from training/fit_readout.py, which calls `WindowData`, `heldout_maps` and
`readout_weights` here with the per-cell likelihood at full weight and this term at 0.05 (the
only weight better than the likelihood alone on every set); principal components, scene terms
and a hidden layer did not pay.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import numpy.typing as npt
import scipy.sparse as sp
from scipy.optimize import minimize

from engines.readout import COORD_TERMS, coord_features
from kernels.heat import source_coord
from kernels.window import largest_window
from sidecar.settings import KernelSettings
from training.data import ALL_SETS, Box, EvalSet, load_set
from training.features import (
    Data,
    SetFeatures,
    extract,
    fold_of,
    primary_scores,
    share,
    targets,
)

F32 = npt.NDArray[np.float32]
F64 = npt.NDArray[np.float64]
I64 = npt.NDArray[np.int64]
UPSAMPLE = KernelSettings().upsample
CANDIDATES = 33  # window positions per free axis (plus the centre)
FIT_ORDER = ("fcdb_train", "saliency_dev", "food_dev")


# --- candidate windows as linear maps of the cell heats --------------------------------------


def axis_matrix(n: int, g: int) -> F64:
    """[g, n]: the kernel's bilinear upsampling of n cells to g along one axis."""
    r = np.zeros((g, n))
    for i in range(g):
        lo, hi, f = source_coord(i, n / g, n)
        r[i, lo] += 1.0 - f
        r[i, hi] += f
    return r


def coverage(g: int, length: int, a0: float, a1: float) -> F64:
    """[g]: share of each of g fine cells over [0, length) inside [a0, a1)."""
    edges = np.arange(g + 1) * (length / g)
    inside = np.minimum(edges[1:], a1) - np.maximum(edges[:-1], a0)
    return np.clip(inside, 0.0, None) / (length / g)


@dataclass
class Episode:
    """One image at one aspect: candidate windows as weights over its cells, and their scores."""

    image: int
    a: F64  # [K, cells]: heat inside each candidate = a @ cell heats
    u: F64  # [cells]: the whole image's heat = u @ cell heats
    m: F64  # [K]: the ground-truth metric of each candidate
    # [K, 4] the candidates (x0, y0, x1, y1 in image pixels) and the aspect asked for: what the
    # composition terms pool over (training/comp_terms.py).
    boxes: I64 = field(default_factory=lambda: np.zeros((0, 4), np.int64))
    aspect: float = 1.0
    frame: tuple[int, int] = (0, 0)  # the image's width and height


def window_weights(ry: F64, rx: F64, width: int, height: int, box: Box) -> F64:
    """[cells]: heat inside `box` (image pixels) = weights @ cell heats, on the upsampled grid
    of the row and column maps ry [gh, h] and rx [gw, w]."""
    wy = ry.T @ coverage(ry.shape[0], height, box.y0, box.y1)
    wx = rx.T @ coverage(rx.shape[0], width, box.x0, box.x1)
    return np.outer(wy, wx).ravel()


def offsets(free: int) -> list[int]:
    grid = np.round(np.linspace(0, free, CANDIDATES)).astype(int).tolist()
    return sorted({*grid, free // 2})


def episodes(eval_set: EvalSet, feats: SetFeatures) -> list[Episode]:
    key = eval_set.protocol.metrics[0].key
    out = []
    for i, item in enumerate(eval_set.items):
        h, w = (int(v) for v in feats.shapes[i])
        ry, rx = axis_matrix(h, h * UPSAMPLE), axis_matrix(w, w * UPSAMPLE)
        u = np.outer(ry.sum(0), rx.sum(0)).ravel()
        for aspect in eval_set.protocol.aspects(item).values():
            cw, ch = largest_window(item.width, item.height, aspect)
            free_x, free_y = item.width - cw, item.height - ch
            if max(free_x, free_y) < 2:
                continue
            rows, ms, boxes = [], [], []
            for off in offsets(max(free_x, free_y)):
                x0, y0 = (off, 0) if free_x > 0 else (0, off)
                box = Box(x0, y0, x0 + cw, y0 + ch)
                rows.append(window_weights(ry, rx, item.width, item.height, box))
                ms.append(eval_set.protocol.score(item, box)[key])
                boxes.append(box.as_list())
            out.append(Episode(i, np.array(rows), u, np.array(ms), np.array(boxes), aspect,
                               (item.width, item.height)))  # fmt: skip
    return out


# --- inputs -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Inputs:
    """Standardised, whitened principal components, plus optional scene × centre-bias terms."""

    mean: F32
    scale: F32
    basis: F32  # [FEATURES, dims]
    scene: int

    @classmethod
    def fit(cls, feats: SetFeatures, dims: int, scene: int) -> Inputs:
        x = feats.features.astype(np.float32)
        mean, scale = x.mean(0), x.std(0) + 1e-3
        if dims == 0:  # the standardised features themselves, as fit_readout fits them
            if scene:
                raise ValueError("scene terms need principal components (dims > 0)")
            basis = np.eye(x.shape[1], dtype=np.float32)
            return cls(mean, scale.astype(np.float32), basis, 0)
        xs = (x - mean) / scale
        vals, vecs = np.linalg.eigh((xs.T @ xs).astype(np.float64) / len(xs))
        order = np.argsort(vals)[::-1][:dims]
        basis = vecs[:, order] / np.sqrt(vals[order] + 1e-6)
        return cls(mean, scale.astype(np.float32), basis.astype(np.float32), scene)

    def cells(self, feats: SetFeatures, i: int) -> F32:
        h, w = (int(v) for v in feats.shapes[i])
        x = (
            (feats.features[feats.rows(i)].astype(np.float32) - self.mean) / self.scale
        ) @ self.basis
        if self.scene == 0:
            return x.astype(np.float32)
        g = x.mean(0)[: self.scene]
        c = coord_features(h, w)
        inter = (c[:, :, None] * g[None, None, :]).reshape(len(x), -1)
        return np.concatenate([x, inter], axis=1).astype(np.float32)


@dataclass
class Part:
    """One fit set's share of a problem."""

    feats: SetFeatures
    episodes: list[Episode]
    images: Sequence[int]
    weight: float  # total weight of the set
    headroom: float  # mean oracle - centre: the metric's unit
    targets: F64  # [rows of the set] per-cell ground truth (features.targets)
    win_mult: float = 1.0  # the window term's weight on this set, relative to `Config.win`


@dataclass
class Problem:
    x: npt.NDArray[np.floating]  # [R, D], float32 (float64 in the gradient test)
    coords: F64  # [R, COORD_TERMS]
    img_starts: I64  # [n images]
    img_w: F64  # [n images] weight of each image's cell likelihood
    t: F64  # [R] cell targets, a distribution per image
    a: sp.csr_matrix  # [Nc, R]
    u: sp.csr_matrix  # [Ne, R]
    cand_ep: I64  # [Nc] episode of each candidate
    ep_starts: I64  # [Ne] first candidate of each episode
    m: F64  # [Nc] metric in headroom units
    ep_w: F64  # [Ne]


def problem(parts: Sequence[Part], inputs: Inputs) -> Problem:
    xs, cs, ts, img_starts, img_w = [], [], [], [], []
    a_parts: list[sp.coo_matrix] = []
    u_rows: list[int] = []
    u_cols: list[int] = []
    u_vals: list[float] = []
    cand_ep: list[int] = []
    ep_starts: list[int] = []
    ms: list[F64] = []
    ep_w: list[float] = []
    rows = cands = eps = 0
    for part in parts:
        first_row: dict[int, int] = {}
        for i in part.images:
            h, w = (int(v) for v in part.feats.shapes[i])
            xs.append(inputs.cells(part.feats, i))
            cs.append(coord_features(h, w))
            ts.append(part.targets[part.feats.rows(i)])
            img_starts.append(rows)
            img_w.append(part.weight / len(part.images))
            first_row[i] = rows
            rows += h * w
        mine = [e for e in part.episodes if e.image in first_row]
        for e in mine:
            base = first_row[e.image]
            coo = sp.coo_matrix(e.a)
            a_parts.append(sp.coo_matrix((coo.data, (coo.row + cands, coo.col + base))))
            u_rows += [eps] * len(e.u)
            u_cols += range(base, base + len(e.u))
            u_vals += e.u.tolist()
            ep_starts.append(cands)
            cand_ep += [eps] * len(e.m)
            ms.append(e.m / part.headroom)
            ep_w.append(part.weight * part.win_mult / len(mine))
            cands += len(e.m)
            eps += 1
    a = sp.csr_matrix(
        (
            np.concatenate([b.data for b in a_parts]),
            (np.concatenate([b.row for b in a_parts]), np.concatenate([b.col for b in a_parts])),
        ),
        shape=(cands, rows),
    )
    return Problem(
        x=np.concatenate(xs),
        coords=np.concatenate(cs),
        img_starts=np.array(img_starts, dtype=np.int64),
        img_w=np.array(img_w),
        t=np.concatenate(ts),
        a=a,
        u=sp.csr_matrix((u_vals, (u_rows, u_cols)), shape=(eps, rows)),
        cand_ep=np.array(cand_ep, dtype=np.int64),
        ep_starts=np.array(ep_starts, dtype=np.int64),
        m=np.concatenate(ms),
        ep_w=np.array(ep_w),
    )


# --- model and loss ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Config:
    dims: int = 128
    hidden: int = 0
    tau: float = 0.02
    l2: float = 3.0
    aux: float = 3.0
    win: float = 1.0
    scene: int = 16
    iters: int = 150
    # Multiplier of `win` per fit set (FIT_ORDER): where the window term applies.
    win_sets: tuple[float, float, float] = (1.0, 1.0, 1.0)


@dataclass
class Params:
    w1: F64  # [D, H]; linear: [D, 1]
    b1: F64  # [H]
    w2: F64  # [H]; linear: [1.0]
    a: F64  # [COORD_TERMS]


def n_params(d: int, hidden: int) -> int:
    return (d if hidden == 0 else d * hidden + 2 * hidden) + COORD_TERMS


def unpack(theta: F64, d: int, hidden: int) -> Params:
    if hidden == 0:
        return Params(theta[:d, None], np.zeros(1), np.ones(1), theta[d:])
    w1 = theta[: d * hidden].reshape(d, hidden)
    o = d * hidden
    return Params(
        w1, theta[o : o + hidden], theta[o + hidden : o + 2 * hidden], theta[-COORD_TERMS:]
    )


def forward(p: Params, x: npt.NDArray[np.floating], coords: F64, hidden: int) -> tuple[F64, F64]:
    """Logits per cell, and the hidden layer's pre-activations."""
    z1 = (x @ p.w1.astype(x.dtype)).astype(np.float64) + p.b1
    hid = np.maximum(z1, 0.0) if hidden else z1
    return hid @ p.w2 + coords @ p.a, z1


def segment_sizes(starts: I64, n: int) -> I64:
    return np.diff(np.append(starts, n))


def loss_grad(theta: F64, pr: Problem, cfg: Config) -> tuple[float, F64]:
    """Penalised loss and its gradient (checked against finite differences in the tests)."""
    p = unpack(theta, pr.x.shape[1], cfg.hidden)
    z, z1 = forward(p, pr.x, pr.coords, cfg.hidden)
    sizes = segment_sizes(pr.img_starts, len(z))
    zmax = np.maximum.reduceat(z, pr.img_starts)
    e = np.exp(z - np.repeat(zmax, sizes))
    inside = pr.a @ e
    whole = (pr.u @ e)[pr.cand_ep]
    q = inside / whole / cfg.tau
    csz = segment_sizes(pr.ep_starts, len(q))
    eq = np.exp(q - np.repeat(np.maximum.reduceat(q, pr.ep_starts), csz))
    prob = eq / np.repeat(np.add.reduceat(eq, pr.ep_starts), csz)
    expected = np.add.reduceat(prob * pr.m, pr.ep_starts)
    loss = -cfg.win * float(pr.ep_w @ expected)
    dq = -cfg.win * np.repeat(pr.ep_w, csz) * prob * (pr.m - np.repeat(expected, csz))
    ds = dq / cfg.tau
    d_whole = -np.bincount(pr.cand_ep, weights=ds * inside / whole**2, minlength=pr.u.shape[0])
    dz = (pr.a.T @ (ds / whole) + pr.u.T @ d_whole) * e
    if cfg.aux > 0.0:
        seg = np.add.reduceat(e, pr.img_starts)
        lse = np.log(seg) + zmax
        row_w = np.repeat(pr.img_w, sizes)
        loss += cfg.aux * float(pr.img_w @ lse - (row_w * pr.t * z).sum())
        dz += cfg.aux * row_w * (e / np.repeat(seg, sizes) - pr.t)
    loss += 0.5 * cfg.l2 * (float((p.w1**2).sum()) + (float(p.w2 @ p.w2) if cfg.hidden else 0.0))
    ga = pr.coords.T @ dz
    if cfg.hidden == 0:
        gw = (dz.astype(pr.x.dtype) @ pr.x).astype(np.float64) + cfg.l2 * p.w1[:, 0]
        return loss, np.concatenate([gw, ga])
    gw2 = np.maximum(z1, 0.0).T @ dz + cfg.l2 * p.w2
    dz1 = np.outer(dz, p.w2) * (z1 > 0)
    gw1 = (pr.x.T @ dz1.astype(pr.x.dtype)).astype(np.float64) + cfg.l2 * p.w1
    return loss, np.concatenate([gw1.ravel(), dz1.sum(0), gw2, ga])


def initial(d: int, hidden: int, seed: int = 0) -> F64:
    if hidden == 0:
        return np.zeros(n_params(d, 0))
    rng = np.random.default_rng(seed)
    return np.concatenate(
        [
            rng.normal(0.0, 1.0 / np.sqrt(d), d * hidden),
            np.full(hidden, 0.1),
            rng.normal(0.0, 1.0 / np.sqrt(hidden), hidden),
            np.zeros(COORD_TERMS),
        ]
    )


def fit(pr: Problem, cfg: Config) -> Params:
    d = pr.x.shape[1]
    res = minimize(
        loss_grad,
        initial(d, cfg.hidden),
        args=(pr, cfg),
        jac=True,
        method="L-BFGS-B",
        options={"maxiter": cfg.iters},
    )
    return unpack(res.x, d, cfg.hidden)


def heat_maps(p: Params, feats: SetFeatures, inputs: Inputs, hidden: int) -> list[F32]:
    out = []
    for i in range(len(feats.names)):
        h, w = (int(v) for v in feats.shapes[i])
        z, _ = forward(p, inputs.cells(feats, i), coord_features(h, w), hidden)
        out.append(np.exp(z - z.max()).reshape(h, w).astype(np.float32))
    return out


# --- cross-validation -------------------------------------------------------------------------


@dataclass
class WindowData:
    """The fitters' Data (training/features.py) plus what a fold's fit needs, computed once:
    the fit sets' candidate windows and the inputs' projection."""

    data: Data
    episodes: dict[str, list[Episode]]
    inputs: Inputs

    @classmethod
    def load(cls, data: Data, cfg: Config) -> WindowData:
        eps = {n: episodes(data.sets[n], data.feats[n]) for n in FIT_ORDER}
        return cls(data, eps, Inputs.fit(data.feats["fcdb_train"], cfg.dims, cfg.scene))

    @property
    def sets(self) -> dict[str, EvalSet]:
        return self.data.sets

    def headroom(self, name: str, keep: npt.NDArray[np.int64]) -> float:
        """Mean oracle - centre over the fitted images only: the held-out ones must not set
        even the unit of the loss."""
        centre, oracle = self.data.reference(name)
        return float((oracle - centre)[keep].mean())

    def fit(
        self, held: dict[str, npt.NDArray[np.bool_]], weights: dict[str, float], cfg: Config
    ) -> Params:
        parts = []
        for n, mult in zip(FIT_ORDER, cfg.win_sets, strict=True):
            keep = np.flatnonzero(~held[n]) if n in held else np.arange(len(self.sets[n].items))
            parts.append(Part(self.data.feats[n], self.episodes[n], keep.tolist(), weights[n],
                              self.headroom(n, keep), self.data.targets[n], mult))  # fmt: skip
        return fit(problem(parts, self.inputs), cfg)

    def maps(self, params: Params, name: str, cfg: Config) -> list[F32]:
        return heat_maps(params, self.data.feats[name], self.inputs, cfg.hidden)


CV_SETS = ("saliency_dev", "food_dev")


def heldout_maps(
    wd: WindowData, cfg: Config, weights: dict[str, float], folds: int
) -> dict[str, list[F32]]:
    """Each dev image's map from a head that never saw it (fcdb_dev: the first fold's head)."""
    fold = {n: fold_of(len(wd.sets[n].items), folds) for n in CV_SETS}
    out: dict[str, list[F32]] = {
        n: [np.zeros(0, np.float32)] * len(wd.sets[n].items) for n in CV_SETS
    }
    for f in range(folds):
        params = wd.fit({n: fold[n] == f for n in CV_SETS}, weights, cfg)
        for n in CV_SETS:
            maps = wd.maps(params, n, cfg)
            for i in np.flatnonzero(fold[n] == f):
                out[n][i] = maps[i]
        if f == 0:
            out["fcdb_dev"] = wd.maps(params, "fcdb_dev", cfg)
        print(f"fold {f + 1}/{folds} fitted", file=sys.stderr)
    return out


def readout_weights(params: Params, inputs: Inputs) -> dict[str, F32]:
    """The head as engines/readout_weights.npz holds it: on the raw tapped features."""
    if inputs.scene or params.w1.shape[1] != 1 or not np.array_equal(params.w2, np.ones(1)):
        raise ValueError("only a linear head without scene terms maps onto the ONNX read-out")
    w = (inputs.basis.astype(np.float64) @ params.w1[:, 0]) / inputs.scale
    bias = -float(inputs.mean.astype(np.float64) @ w)
    return {
        "w1": w[np.newaxis].astype(np.float32),
        "b1": np.array([bias], dtype=np.float32),
        "a": params.a.astype(np.float32),
    }


def cross_validate(
    eval_dir: str, cfg: Config, weights: dict[str, float], folds: int
) -> dict[str, float]:
    """Held-out share of the headroom per dev set (fcdb_dev from the first fold's head)."""
    sets = {n: load_set(eval_dir, n) for n in ALL_SETS}
    feats = {n: extract(s, Path("build/model")) for n, s in sets.items()}
    data = Data(sets, feats, {n: targets(sets[n], feats[n]) for n in sets})
    maps = heldout_maps(WindowData.load(data, cfg), cfg, weights, folds)
    kernel = replace(KernelSettings(), center_weight=0.0, cut_weight=0.0, min_confidence=0.0)
    return {n: share(primary_scores(sets[n], maps[n], kernel), data.reference(n)) for n in maps}


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    defaults = Config()
    ap.add_argument("--eval-dir", default="../shared/eval")
    for name, kind in (("dims", int), ("hidden", int), ("tau", float), ("l2", float),
                       ("aux", float), ("win", float), ("scene", int), ("iters", int)):  # fmt: skip
        ap.add_argument(f"--{name}", type=kind, default=getattr(defaults, name))
    ap.add_argument("--weights", default="2,1,1", help="fcdb_train,saliency_dev,food_dev")
    ap.add_argument(
        "--win-sets", default="1,1,1", help="the window term's multiplier per fit set (same order)"
    )
    ap.add_argument("--folds", type=int, default=5)
    ap.add_argument("--report", type=Path, default=Path("training/results/fit_window.md"))
    args = ap.parse_args(argv)
    fields = {k: getattr(args, k) for k in Config.__dataclass_fields__ if k != "win_sets"}
    win_sets = tuple(float(v) for v in args.win_sets.split(","))
    if len(win_sets) != len(FIT_ORDER):
        ap.error(f"--win-sets needs {len(FIT_ORDER)} numbers")
    cfg = Config(**fields, win_sets=win_sets)  # type: ignore[arg-type]
    weights = dict(zip(FIT_ORDER, (float(v) for v in args.weights.split(",")), strict=True))
    t0 = time.perf_counter()
    shares = cross_validate(args.eval_dir, cfg, weights, args.folds)
    line = (
        f"| {datetime.now(UTC):%Y-%m-%d %H:%M} | {cfg} weights {args.weights} | "
        + " | ".join(f"{shares[n]:+.1%}" for n in ("fcdb_dev", "food_dev", "saliency_dev"))
        + f" | {time.perf_counter() - t0:.0f} s |"
    )
    print(line)
    if not args.report.exists():
        args.report.parent.mkdir(parents=True, exist_ok=True)
        args.report.write_text(
            "# read-out fitted on the window choice (`python -m training.fit_window`)\n\n"
            "Held-out share of the centre → oracle headroom of the window search on the "
            "read-out map alone (no CAM share, no prior, no cut): fcdb IoU, food kept, "
            "fixations kept.\n\n"
            "| when (UTC) | configuration | fcdb_dev | food_dev | saliency_dev | time |\n"
            "|---|---|---:|---:|---:|---:|\n"
        )
    with args.report.open("a") as fh:
        fh.write(line + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
