"""The read-out head as a small torch network on frozen backbone features (fitting only).

A DeepGaze II-style read-out: per cell of the stride-32 grid, the tapped multi-scale
features (training/backbones.py) go through 1x1 layers (none hidden: linear; one or two
hidden ReLU layers of 8-64 units), optionally plus a food head whose output is multiplied by
the image's own food probability (per-kind structure: the backbone says how much of a food
photo this is), optionally blurred (a Gaussian of `blur` cells), plus a learned quadratic
centre bias; softmax over the image's cells. Fitted by the weighted likelihood of the ground
truth as a distribution over the cells (every set it is given, each with a total weight),
plus a window-choice term (training/fit_window.py's: minus the expected metric, in headroom
units, of a softmax choice among the largest windows' positions) and an L2 penalty, with
full-batch L-BFGS on the CPU.

Only training/ imports this module (and torch): the fitted head is exported as plain arrays
(`export_weights`, engines/readout.py's layout) that engines/graph.py compiles into the ONNX
graph; engines.readout.head_logits is the numpy reference both agree with.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import cached_property

import numpy as np
import numpy.typing as npt
import torch
from torch import nn

from engines.readout import (
    COMP_MAPS,
    COORD_TERMS,
    GATE_PREFIX,
    XGATE_PREFIX,
    aspect_bucket,
    blur_kernel,
    coord_features,
)
from training.backbones import Cells
from training.comp_terms import pooled
from training.fit_window import Episode

F32 = npt.NDArray[np.float32]
F64 = npt.NDArray[np.float64]
TAU = 0.02  # temperature of the window choice (training/fit_window.Config.tau)
XGATE_DIMS = 32  # leading inputs the expert-crop gate reads (their image means)


@dataclass(frozen=True)
class HeadConfig:
    """What one fit is: the head's structure and the fit's hyper-parameters."""

    hidden: tuple[int, ...] = ()  # hidden layer widths; () is the linear head
    skip: bool = False  # with hidden layers: plus a linear map of the inputs (starts linear)
    gate: bool = False  # a food head times the image's food probability
    blur: float = 0.0  # Gaussian blur of the logits, sigma in cells (0: none)
    l2: float = 1.0  # on every weight matrix (standardised inputs)
    window: float = 0.2  # weight of the window-choice term beside the likelihood
    dims: int = 256  # principal components of the standardised features (0: all features)
    iters: int = 200  # L-BFGS iterations
    seed: int = 0
    faces: bool = False  # the face map (engines.faces.face_map) as one more input channel
    # Composition maps (training/comp_terms.py) linear in the first `comp` inputs (0: none),
    # one read-out per aspect bucket (engines.readout.aspect_bucket: 1 or 3).
    comp: int = 0
    buckets: int = 1
    rank: float = 0.0  # weight of the expert-crop ranking term (sets of kind "crop")
    xgate: bool = False  # a second head times a logistic "expert-crop photo" gate

    @property
    def extra(self) -> int:
        """Input channels after the backbone's features that skip the projection."""
        return int(self.faces)

    def label(self) -> str:
        head = "linear" if not self.hidden else "hidden " + "-".join(map(str, self.hidden))
        bits = [head + (" + linear skip" if self.skip and self.hidden else "")]
        if self.gate:
            bits.append("food gate")
        if self.blur:
            bits.append(f"blur {self.blur}")
        bits += [f"L2 {self.l2}", f"window {self.window}"]
        if self.dims:
            bits.append(f"{self.dims} PCs")
        if self.faces:
            bits.append("face channel")
        if self.comp:
            per = f", {self.buckets} aspect buckets" if self.buckets > 1 else ""
            bits.append(f"composition on {self.comp} PCs{per}")
        if self.rank:
            bits.append(f"ranking {self.rank}")
        if self.xgate:
            bits.append("expert-crop gate")
        return ", ".join(bits)


@dataclass
class FitSet:
    """One set's share of a fit: its cells, per-cell targets, candidate windows and weight."""

    name: str
    cells: Cells
    targets: F64  # [rows] a distribution over each image's cells
    episodes: list[Episode]
    headroom: F64  # [n] oracle - centre per image: the window term's unit
    weight: float = 1.0
    images: npt.NDArray[np.int64] = field(default_factory=lambda: np.zeros(0, np.int64))
    # Expert box and rivals per photo (training.comp_terms.rank_episodes); kind: the protocol's
    # (the expert-crop gate's label is kind == "crop").
    ranks: list[Episode] = field(default_factory=list)
    kind: str = ""

    @cached_property
    def by_image(self) -> dict[int, list[Episode]]:
        index: dict[int, list[Episode]] = {}
        for e in self.episodes:
            index.setdefault(e.image, []).append(e)
        return index

    @cached_property
    def ranks_by_image(self) -> dict[int, Episode]:
        return {e.image: e for e in self.ranks}


class Input(nn.Module):
    """Standardisation (and an optional projection) fitted on the fit rows, then frozen. The
    last `extra` columns (the face channel) are standardised but never projected, so that the
    head sees them as they are, beside the principal components."""

    def __init__(self, mean: F32, scale: F32, basis: F32 | None, extra: int = 0) -> None:
        super().__init__()
        self.register_buffer("mean", torch.from_numpy(mean))
        self.register_buffer("scale", torch.from_numpy(scale))
        self.register_buffer("basis", None if basis is None else torch.from_numpy(basis))
        self.extra = extra

    @property
    def dims(self) -> int:
        return int(self.mean.shape[0] if self.basis is None else self.basis.shape[1] + self.extra)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = (x - self.mean) / self.scale
        if self.basis is None:
            return x
        cut = x.shape[-1] - self.extra
        return torch.cat([x[..., :cut] @ self.basis, x[..., cut:]], dim=-1)


def mlp(d: int, hidden: Sequence[int], gen: torch.Generator) -> nn.Sequential:
    layers: list[nn.Module] = []
    widths = [d, *hidden, 1]
    for k, (a, b) in enumerate(itertools.pairwise(widths)):
        lin = nn.Linear(a, b)
        with torch.no_grad():
            if k == len(widths) - 2 and not hidden:
                lin.weight.zero_()
            else:
                lin.weight.normal_(0.0, 1.0 / math.sqrt(a), generator=gen)
            lin.bias.fill_(0.1 if k < len(widths) - 2 else 0.0)
        layers.append(lin)
        if k < len(widths) - 2:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


class Head(nn.Module):
    def __init__(self, inp: Input, cfg: HeadConfig) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(cfg.seed)
        self.inp = inp
        self.cfg = cfg
        self.main = mlp(inp.dims, cfg.hidden, gen)
        self.skip = mlp(inp.dims, (), gen) if cfg.skip and cfg.hidden else None
        if self.skip is not None:  # the network starts as the linear head; its output at 0
            with torch.no_grad():
                self.main[-1].weight.zero_()
        self.food = mlp(inp.dims, (), gen) if cfg.gate else None
        self.xhead = mlp(inp.dims, (), gen) if cfg.xgate else None
        # The expert-crop gate: a logistic on the image's mean of the first XGATE_DIMS inputs,
        # fitted before the head (fit_xgate) and frozen.
        self.register_buffer("xgate_v", torch.zeros(min(XGATE_DIMS, inp.dims)))
        self.register_buffer("xgate_c", torch.zeros(()))
        self.comp = nn.Linear(cfg.comp, cfg.buckets * COMP_MAPS) if cfg.comp else None
        if self.comp is not None:  # no composition preference until the data gives one
            with torch.no_grad():
                self.comp.weight.zero_()
                self.comp.bias.zero_()
        self.a = nn.Parameter(torch.zeros(COORD_TERMS, dtype=torch.float32))
        k = blur_kernel(cfg.blur) if cfg.blur > 0 else np.ones(1)
        self.register_buffer("blur_k", torch.from_numpy(np.outer(k, k)[None, None]).float())

    def logits(
        self, xi: torch.Tensor, mass: torch.Tensor, coords: torch.Tensor, hw: tuple[int, int]
    ) -> torch.Tensor:
        """[n, h * w] logits of n images of one grid shape: xi [n, h * w, dims] the inputs
        after `self.inp` (computed once per fit), mass [n]."""
        z = self.main(xi)[..., 0]
        if self.skip is not None:
            z = z + self.skip(xi)[..., 0]
        if self.food is not None:
            z = z + mass[:, None] * self.food(xi)[..., 0]
        if self.xhead is not None:
            z = z + self.xgate(xi)[:, None] * self.xhead(xi)[..., 0]
        if self.cfg.blur > 0:
            n = z.shape[0]
            r = self.blur_k.shape[-1] // 2
            grid = z.reshape(n, 1, *hw)
            num = nn.functional.conv2d(grid, self.blur_k, padding=r)
            den = nn.functional.conv2d(torch.ones_like(grid[:1]), self.blur_k, padding=r)
            z = (num / den).reshape(n, -1)
        return z + coords @ self.a

    def xgate(self, xi: torch.Tensor) -> torch.Tensor:
        """[n] each image's expert-crop gate from its inputs xi [n, cells, dims]."""
        v = self.xgate_v
        return torch.sigmoid(xi.mean(1)[:, : len(v)] @ v + self.xgate_c)

    def comp_weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The composition read-out as W [buckets, COMP_MAPS, comp] and b [buckets, COMP_MAPS]."""
        assert self.comp is not None
        b = self.cfg.buckets
        return (self.comp.weight.reshape(b, COMP_MAPS, -1),
                self.comp.bias.reshape(b, COMP_MAPS))  # fmt: skip

    def penalty(self) -> torch.Tensor:
        mats = [m.weight for m in self.modules() if isinstance(m, nn.Linear)]
        return sum((w * w).sum() for w in mats)  # type: ignore[return-value]


@dataclass
class Pool:
    """Windows' composition inputs (training/comp_terms.pooled), pooled once the fold's
    projection is known (`fill`): per row, one image's windows in its pixels."""

    img: list[int]  # image (index in the group) of each row
    boxes: list[npt.NDArray[np.int64]]  # [K_r, 4] per row
    frames: list[tuple[int, int]]  # image width, height per row
    bucket: torch.Tensor  # [R] aspect bucket of each row
    p: torch.Tensor | None = None  # [R, K, COMP_MAPS, comp]; padded windows zero
    area: torch.Tensor | None = None  # [R, K, COMP_MAPS]

    @classmethod
    def of(cls, rows: Sequence[tuple[int, Episode]], buckets: int) -> Pool:
        return cls([j for j, _ in rows], [e.boxes for _, e in rows], [e.frame for _, e in rows],
                   torch.tensor([aspect_bucket(e.aspect, buckets) for _, e in rows],
                                dtype=torch.long))  # fmt: skip

    def fill(self, x: torch.Tensor, hw: tuple[int, int], comp: int) -> None:
        """Pool the first `comp` columns of the group's inputs x [n, cells, dims]."""
        k = max((len(b) for b in self.boxes), default=1)
        p = np.zeros((len(self.img), k, COMP_MAPS, comp), np.float32)
        area = np.zeros((len(self.img), k, COMP_MAPS), np.float32)
        xs = x[..., :comp].numpy().reshape(len(x), *hw, comp)
        for r, (j, boxes, (width, height)) in enumerate(zip(self.img, self.boxes, self.frames,
                                                            strict=True)):  # fmt: skip
            p[r, : len(boxes)], area[r, : len(boxes)] = pooled(xs[j], width, height, boxes)
        self.p, self.area = torch.from_numpy(p), torch.from_numpy(area)

    def terms(self, w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """[R, K] sum_k T_k of every window for read-outs W [buckets, COMP_MAPS, comp], b."""
        assert self.p is not None and self.area is not None
        wr, br = w[self.bucket], b[self.bucket]
        return (torch.einsum("rkmd,rmd->rk", self.p, wr)
                + torch.einsum("rkm,rm->rk", self.area, br))  # fmt: skip


@dataclass
class Ranks:
    """The expert boxes (window 0) and their rivals of a group's expert-crop photos."""

    img: torch.Tensor  # [R] image (index in the group)
    a: torch.Tensor  # [R, J, cells] heat inside each window
    u: torch.Tensor  # [R, cells]
    valid: torch.Tensor  # [R, J] bool
    w: torch.Tensor  # [R]
    pool: Pool


@dataclass
class Group:
    """Every fitted image of one grid shape, as dense tensors; and their candidate windows."""

    hw: tuple[int, int]
    x: torch.Tensor  # [n, cells, C] float32
    t: torch.Tensor  # [n, cells]
    w: torch.Tensor  # [n] likelihood weight of each image
    mass: torch.Tensor  # [n]
    coords: torch.Tensor  # [cells, COORD_TERMS]
    ep_img: torch.Tensor  # [E] image (index in the group) of each episode
    a: torch.Tensor  # [E, K, cells] heat inside each candidate window
    u: torch.Tensor  # [E, cells] the whole image's heat
    m: torch.Tensor  # [E, K] the metric, headroom units; padded candidates -inf in `valid`
    valid: torch.Tensor  # [E, K] bool
    ep_w: torch.Tensor  # [E]
    ep_pool: Pool | None = None  # the episodes' composition inputs
    ranks: Ranks | None = None
    crop: torch.Tensor | None = None  # [n] bool: an expert-crop photo (FitSet.kind "crop")


def dense(rows: Sequence[F64], k: int, cells: int) -> tuple[F32, npt.NDArray[np.bool_]]:
    """[R, k, cells] rows padded with zeros, and which are real."""
    a = np.zeros((len(rows), k, cells), np.float32)
    valid = np.zeros((len(rows), k), bool)
    for q, aa in enumerate(rows):
        a[q, : len(aa)] = aa
        valid[q, : len(aa)] = True
    return a, valid


def rank_batch(rows: Sequence[tuple[int, Episode, float]], cells: int, buckets: int) -> Ranks:
    """Ranks of (image in the group, rank episode, weight) rows."""
    k = max((len(e.a) for _, e, _ in rows), default=1)
    a, valid = dense([e.a for _, e, _ in rows], k, cells)
    u = np.array([e.u for _, e, _ in rows], np.float32).reshape(len(rows), cells)
    return Ranks(torch.tensor([j for j, _, _ in rows], dtype=torch.long), torch.from_numpy(a),
                 torch.from_numpy(u), torch.from_numpy(valid),
                 torch.tensor([w for _, _, w in rows], dtype=torch.float32),
                 Pool.of([(j, e) for j, e, _ in rows], buckets))  # fmt: skip


def groups(
    parts: Sequence[FitSet], with_window: bool, rank: bool = False, buckets: int = 1
) -> list[Group]:
    """The fit's images grouped by grid shape; weights: each set's total `weight` spread over
    its fitted images (likelihood), over its fitted episodes (window term) and, with `rank`,
    over its fitted photos with an expert box (ranking term)."""
    total = sum(p.weight for p in parts)
    by_shape: dict[tuple[int, int], list[tuple[FitSet, int]]] = {}
    for p in parts:
        for i in p.images:
            hw = (int(p.cells.shapes[i][0]), int(p.cells.shapes[i][1]))
            by_shape.setdefault(hw, []).append((p, int(i)))
    n_eps = {p.name: sum(len(p.by_image.get(int(i), [])) for i in p.images) for p in parts}
    n_rank = {p.name: sum(int(i) in p.ranks_by_image for i in p.images) for p in parts}
    out = []
    for hw, members in sorted(by_shape.items()):
        cells = hw[0] * hw[1]
        xs, ts, ws, ms = [], [], [], []
        ep_img, a_rows, u_rows, m_rows, ep_w = [], [], [], [], []
        ep_rows: list[tuple[int, Episode]] = []
        rank_rows: list[tuple[int, Episode, float]] = []
        for j, (p, i) in enumerate(members):
            r = p.cells.rows(i)
            xs.append(p.cells.features[r].astype(np.float32))
            ts.append(p.targets[r])
            ws.append(p.weight / total / len(p.images))
            ms.append(float(p.cells.food_mass[i]))
            if rank and i in p.ranks_by_image:
                rank_rows.append((j, p.ranks_by_image[i], p.weight / total / n_rank[p.name]))
            if not with_window:
                continue
            for e in p.by_image.get(i, []):
                ep_img.append(j)
                ep_rows.append((j, e))
                a_rows.append(e.a)
                u_rows.append(e.u)
                m_rows.append(e.m / max(float(p.headroom[p.images].mean()), 1e-9))
                ep_w.append(p.weight / total / max(n_eps[p.name], 1))
        k = max((len(m) for m in m_rows), default=1)
        e_n = len(m_rows)
        a = np.zeros((e_n, k, cells), np.float32)
        m = np.zeros((e_n, k), np.float32)
        valid = np.zeros((e_n, k), bool)
        for q, (aa, mm) in enumerate(zip(a_rows, m_rows, strict=True)):
            a[q, : len(mm)] = aa
            m[q, : len(mm)] = mm
            valid[q, : len(mm)] = True
        out.append(
            Group(
                hw=hw,
                x=torch.from_numpy(np.stack(xs)),
                t=torch.from_numpy(np.stack(ts).astype(np.float32)),
                w=torch.tensor(ws, dtype=torch.float32),
                mass=torch.tensor(ms, dtype=torch.float32),
                coords=torch.from_numpy(coord_features(*hw).astype(np.float32)),
                ep_img=torch.tensor(ep_img, dtype=torch.long),
                a=torch.from_numpy(a),
                u=torch.from_numpy(np.array(u_rows, np.float32).reshape(e_n, cells)),
                m=torch.from_numpy(m),
                valid=torch.from_numpy(valid),
                ep_w=torch.tensor(ep_w, dtype=torch.float32),
                ep_pool=Pool.of(ep_rows, buckets),
                ranks=rank_batch(rank_rows, cells, buckets) if rank_rows else None,
                crop=torch.tensor([p.kind == "crop" for p, _ in members]),
            )
        )
    return out


CompWeights = tuple[torch.Tensor, torch.Tensor] | None


def window_scores(p: torch.Tensor, a: torch.Tensor, u: torch.Tensor, pool: Pool | None,
                  comp: CompWeights) -> torch.Tensor:  # fmt: skip
    """[R, K] the search's score of each window: the heat's share inside (heats p [R, cells],
    windows a [R, K, cells], whole u [R, cells]) plus its composition terms."""
    inside = torch.bmm(a, p[:, :, None])[..., 0]
    score = inside / (u * p).sum(1, keepdim=True)
    if comp is not None and pool is not None:
        score = score + pool.terms(*comp)
    return score


def rank_loss(probs: torch.Tensor, r: Ranks, comp: CompWeights) -> torch.Tensor:
    """Weighted mean logistic loss of every rival window scoring above the expert's."""
    s = window_scores(probs[r.img], r.a, r.u, r.pool, comp)
    lose = nn.functional.softplus((s[:, 1:] - s[:, :1]) / TAU) * r.valid[:, 1:]
    return (r.w * lose.sum(1) / r.valid[:, 1:].sum(1).clamp(min=1)).sum()


def group_loss(z: torch.Tensor, g: Group, window: float, comp: CompWeights = None,
               rank: float = 0.0) -> torch.Tensor:  # fmt: skip
    """The group's weighted negative log-likelihood plus the window-choice term (and with
    `rank`, the ranking term), for logits z [n, cells] of its images; with `comp`, windows
    score their composition terms too."""
    logp = torch.log_softmax(z, dim=1)
    total = -(g.w * (g.t * logp).sum(1)).sum()
    if window > 0 and len(g.ep_img):
        q = window_scores(logp.exp()[g.ep_img], g.a, g.u, g.ep_pool, comp)
        prob = torch.softmax((q / TAU).masked_fill(~g.valid, -1e9), dim=1)
        total = total - window * (g.ep_w * (prob * g.m).sum(1)).sum()
    if rank > 0 and g.ranks is not None:
        total = total + rank * rank_loss(logp.exp(), g.ranks, comp)
    return total


def loss(head: Head, gs: Sequence[Group], cfg: HeadConfig) -> torch.Tensor:
    total = 0.5 * cfg.l2 * head.penalty()
    comp = head.comp_weights() if head.comp is not None else None
    for g in gs:
        z = head.logits(g.x, g.mass, g.coords, g.hw)
        total = total + group_loss(z, g, cfg.window, comp, cfg.rank)
    return total


def fit_input(parts: Sequence[FitSet], dims: int, seed: int = 0, extra: int = 0) -> Input:
    """Standardisation over the fit rows; with `dims`, the leading principal components of
    the standardised features (on a sample of at most 40,000 fit rows) but the last `extra`
    columns, which are passed on beside them."""
    rows = np.concatenate([
        np.concatenate([p.cells.features[p.cells.rows(int(i))] for i in p.images])
        for p in parts
    ]).astype(np.float32)  # fmt: skip
    mean = rows.mean(0)
    scale = rows.std(0) + 1e-3
    if not dims:
        return Input(mean, scale.astype(np.float32), None, extra)
    rng = np.random.default_rng(seed)
    cut = rows.shape[1] - extra
    sample = rows[rng.permutation(len(rows))[:40_000], :cut]
    xs = (sample - mean[:cut]) / scale[:cut]
    vals, vecs = np.linalg.eigh((xs.T @ xs).astype(np.float64) / len(xs))
    order = np.argsort(vals)[::-1][:dims]
    return Input(mean, scale.astype(np.float32), vecs[:, order].astype(np.float32), extra)


def fit_xgate(head: Head, gs: Sequence[Group], l2: float = 1.0) -> None:
    """The expert-crop gate: a logistic regression of "an expert-crop photo" on the images'
    mean inputs (the first XGATE_DIMS), the two classes weighted equally; then frozen."""
    means = torch.cat([g.x.mean(1)[:, : len(head.xgate_v)] for g in gs])
    label = torch.cat([g.crop for g in gs if g.crop is not None]).float()
    n_pos = max(float(label.sum()), 1.0)
    n_neg = max(float(len(label) - label.sum()), 1.0)
    w = label / n_pos / 2 + (1 - label) / n_neg / 2
    v = torch.zeros(means.shape[1], requires_grad=True)
    c = torch.zeros((), requires_grad=True)
    opt = torch.optim.LBFGS([v, c], max_iter=200, line_search_fn="strong_wolfe")
    scale = means.std(0) + 1e-6  # L2 on the standardised means, whatever the PCs' variance

    def closure() -> torch.Tensor:
        opt.zero_grad()
        logit = (means / scale) @ v + c
        value = (
            w * nn.functional.binary_cross_entropy_with_logits(logit, label, reduction="none")
        ).sum() + 0.5 * l2 * (v * v).sum() / len(label)
        value.backward()  # type: ignore[no-untyped-call]
        return value

    opt.step(closure)  # type: ignore[no-untyped-call]
    with torch.no_grad():
        head.xgate_v.copy_(v / scale)
        head.xgate_c.copy_(c)


def fit(parts: Sequence[FitSet], cfg: HeadConfig) -> Head:
    """The head fitted on `parts` (each with its `images` and `weight`)."""
    torch.manual_seed(cfg.seed)
    head = Head(fit_input(parts, cfg.dims, cfg.seed, cfg.extra), cfg)
    gs = groups(parts, cfg.window > 0, cfg.rank > 0, cfg.buckets)
    with torch.no_grad():
        for g in gs:
            g.x = head.inp(g.x)
            if cfg.comp:  # pooled once; the frac matrices are not kept
                for pool in (g.ep_pool, g.ranks.pool if g.ranks is not None else None):
                    if pool is not None and pool.img:
                        pool.fill(g.x, g.hw, cfg.comp)
    if cfg.xgate:
        fit_xgate(head, gs)
    params = [p for p in head.parameters() if p.requires_grad]
    opt = torch.optim.LBFGS(params, lr=1.0, max_iter=cfg.iters, history_size=20,
                            line_search_fn="strong_wolfe", tolerance_grad=1e-6,
                            tolerance_change=1e-9)  # fmt: skip

    def closure() -> torch.Tensor:
        opt.zero_grad()
        value = loss(head, gs, cfg)
        value.backward()  # type: ignore[no-untyped-call]
        return value

    opt.step(closure)  # type: ignore[no-untyped-call]
    return head


# (x [1, cells, C] an image's cell features, mass [1], coords [cells, 4], (h, w)) -> z [1, cells]
Logits = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, tuple[int, int]], torch.Tensor]


@torch.no_grad()
def maps_of(logits: Logits, cells: Cells, images: Sequence[int] | None = None) -> dict[int, F32]:
    """exp(z - max) per image (the graph's readout channel), keyed by image index."""
    out = {}
    for i in range(len(cells)) if images is None else images:
        h, w = (int(v) for v in cells.shapes[i])
        x = torch.from_numpy(cells.features[cells.rows(i)].astype(np.float32))[None]
        mass = torch.tensor([float(cells.food_mass[i])])
        coords = torch.from_numpy(coord_features(h, w).astype(np.float32))
        z = logits(x, mass, coords, (h, w))[0].numpy().astype(np.float64)
        out[i] = np.exp(z - z.max()).reshape(h, w).astype(np.float32)
    return out


def heat_maps(head: Head, cells: Cells, images: Sequence[int] | None = None) -> dict[int, F32]:
    """The fitted head's maps of `cells`' images (maps_of)."""
    return maps_of(lambda x, mass, coords, hw: head.logits(head.inp(x), mass, coords, hw),
                   cells, images)  # fmt: skip


@torch.no_grad()
def comp_maps_of(head: Head, cells: Cells, images: Sequence[int]) -> dict[int, F32]:
    """[buckets, COMP_MAPS, h, w] composition maps per image (engines.readout.comp_maps per
    bucket), keyed by image index; none without composition maps."""
    if head.comp is None:
        return {}
    out = {}
    for i in images:
        h, w = (int(v) for v in cells.shapes[i])
        x = head.inp(torch.from_numpy(cells.features[cells.rows(i)].astype(np.float32)))
        m = head.comp(x[:, : head.cfg.comp]).numpy()  # [cells, buckets * COMP_MAPS]
        out[i] = m.T.reshape(head.cfg.buckets, COMP_MAPS, h, w).astype(np.float32)
    return out


def _folded(w: F64, b: F64, inp: Input) -> tuple[F64, F64]:
    """A linear map w [o, d] (d <= inp.dims: the first d inputs), b [o] on the inputs as one
    on the raw tapped features: the standardisation and projection folded in."""
    w = np.concatenate([w, np.zeros((len(w), inp.dims - w.shape[1]))], 1)
    if inp.basis is not None:
        cut = w.shape[1] - inp.extra
        w = np.concatenate([w[:, :cut] @ inp.basis.double().numpy().T, w[:, cut:]], 1)
    w = w / inp.scale.double().numpy()[None]
    return w, b - w @ inp.mean.double().numpy()


def _chain_weights(seq: nn.Sequential, inp: Input, prefix: str) -> dict[str, F32]:
    """The layers as engines/readout.py's w1, b1, w2, ... on the raw tapped features: the
    standardisation and projection are folded into the first layer."""
    lins = [m for m in seq if isinstance(m, nn.Linear)]
    out: dict[str, F32] = {}
    for k, lin in enumerate(lins, start=1):
        w = lin.weight.detach().double().numpy()
        b = lin.bias.detach().double().numpy()
        if k == 1:
            w, b = _folded(w, b, inp)
        out[f"{prefix}w{k}"] = w.astype(np.float32)
        out[f"{prefix}b{k}"] = b.astype(np.float32)
    return out


def _with_skip(main: dict[str, F32], skip: dict[str, F32]) -> dict[str, F32]:
    """The ReLU chain plus a linear skip as one ReLU chain: s = relu(s) - relu(-s), so two
    more units per hidden layer carry +s and -s (copied through later hidden layers, whose
    inputs are already non-negative) to the output, which adds them with weights 1 and -1."""
    layers = len([k for k in main if k.startswith("w")])
    out = dict(main)
    w, b = skip["w1"], skip["b1"]
    out["w1"] = np.concatenate([main["w1"], w, -w])
    out["b1"] = np.concatenate([main["b1"], b, -b])
    for k in range(2, layers + 1):
        wk, bk = main[f"w{k}"], main[f"b{k}"]
        n_out, n_in = wk.shape
        last = k == layers
        extra_out = 0 if last else 2
        grown = np.zeros((n_out + extra_out, n_in + 2), np.float32)
        grown[:n_out, :n_in] = wk
        if last:
            grown[:, n_in], grown[:, n_in + 1] = 1.0, -1.0
        else:
            grown[n_out, n_in], grown[n_out + 1, n_in + 1] = 1.0, 1.0
        out[f"w{k}"] = grown
        out[f"b{k}"] = np.concatenate([bk, np.zeros(extra_out, np.float32)])
    return out


def export_weights(head: Head) -> dict[str, F32]:
    """The fitted head in engines/readout_weights.npz's layout (engines.readout.load_weights)."""
    out = _chain_weights(head.main, head.inp, "")
    if head.skip is not None:
        out = _with_skip(out, _chain_weights(head.skip, head.inp, ""))
    if head.food is not None:
        out.update(_chain_weights(head.food, head.inp, GATE_PREFIX))
    if head.xhead is not None:
        out.update(_chain_weights(head.xhead, head.inp, XGATE_PREFIX))
        # The gate reads the image's mean features: the mean of the folded map is the folded
        # map of the mean, the same affine map.
        v, c = _folded(head.xgate_v.double().numpy()[None], head.xgate_c.double().numpy()[None],
                       head.inp)  # fmt: skip
        out[XGATE_PREFIX + "v"] = v[0].astype(np.float32)
        out[XGATE_PREFIX + "c"] = c.astype(np.float32)
    if head.comp is not None:
        w, b = _folded(head.comp.weight.detach().double().numpy(),
                       head.comp.bias.detach().double().numpy(), head.inp)  # fmt: skip
        out["comp_w"], out["comp_b"] = w.astype(np.float32), b.astype(np.float32)
    if head.cfg.blur > 0:
        out["blur"] = np.array(head.cfg.blur, dtype=np.float32)
    out["a"] = head.a.detach().numpy().astype(np.float32)
    return out
