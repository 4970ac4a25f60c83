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

from engines.readout import COORD_TERMS, GATE_PREFIX, blur_kernel, coord_features
from training.backbones import Cells
from training.fit_window import Episode

F32 = npt.NDArray[np.float32]
F64 = npt.NDArray[np.float64]
TAU = 0.02  # temperature of the window choice (training/fit_window.Config.tau)


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

    @cached_property
    def by_image(self) -> dict[int, list[Episode]]:
        index: dict[int, list[Episode]] = {}
        for e in self.episodes:
            index.setdefault(e.image, []).append(e)
        return index


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
        if self.cfg.blur > 0:
            n = z.shape[0]
            r = self.blur_k.shape[-1] // 2
            grid = z.reshape(n, 1, *hw)
            num = nn.functional.conv2d(grid, self.blur_k, padding=r)
            den = nn.functional.conv2d(torch.ones_like(grid[:1]), self.blur_k, padding=r)
            z = (num / den).reshape(n, -1)
        return z + coords @ self.a

    def penalty(self) -> torch.Tensor:
        mats = [m.weight for m in self.modules() if isinstance(m, nn.Linear)]
        return sum((w * w).sum() for w in mats)  # type: ignore[return-value]


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


def groups(parts: Sequence[FitSet], with_window: bool) -> list[Group]:
    """The fit's images grouped by grid shape; weights: each set's total `weight` spread over
    its fitted images (likelihood) and over its fitted episodes (window term)."""
    total = sum(p.weight for p in parts)
    by_shape: dict[tuple[int, int], list[tuple[FitSet, int]]] = {}
    for p in parts:
        for i in p.images:
            hw = (int(p.cells.shapes[i][0]), int(p.cells.shapes[i][1]))
            by_shape.setdefault(hw, []).append((p, int(i)))
    n_eps = {p.name: sum(len(p.by_image.get(int(i), [])) for i in p.images) for p in parts}
    out = []
    for hw, members in sorted(by_shape.items()):
        cells = hw[0] * hw[1]
        xs, ts, ws, ms = [], [], [], []
        ep_img, a_rows, u_rows, m_rows, ep_w = [], [], [], [], []
        for j, (p, i) in enumerate(members):
            r = p.cells.rows(i)
            xs.append(p.cells.features[r].astype(np.float32))
            ts.append(p.targets[r])
            ws.append(p.weight / total / len(p.images))
            ms.append(float(p.cells.food_mass[i]))
            if not with_window:
                continue
            for e in p.by_image.get(i, []):
                ep_img.append(j)
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
            )
        )
    return out


def group_loss(z: torch.Tensor, g: Group, window: float) -> torch.Tensor:
    """The group's weighted negative log-likelihood plus the window-choice term, for logits
    z [n, cells] of its images."""
    logp = torch.log_softmax(z, dim=1)
    total = -(g.w * (g.t * logp).sum(1)).sum()
    if window > 0 and len(g.ep_img):
        p = logp.exp()[g.ep_img]  # [E, cells]
        inside = torch.bmm(g.a, p[:, :, None])[..., 0]  # [E, K]
        whole = (g.u * p).sum(1, keepdim=True)
        q = (inside / whole / TAU).masked_fill(~g.valid, -1e9)
        prob = torch.softmax(q, dim=1)
        total = total - window * (g.ep_w * (prob * g.m).sum(1)).sum()
    return total


def loss(head: Head, gs: Sequence[Group], cfg: HeadConfig) -> torch.Tensor:
    total = 0.5 * cfg.l2 * head.penalty()
    for g in gs:
        total = total + group_loss(head.logits(g.x, g.mass, g.coords, g.hw), g, cfg.window)
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


def fit(parts: Sequence[FitSet], cfg: HeadConfig) -> Head:
    """The head fitted on `parts` (each with its `images` and `weight`)."""
    torch.manual_seed(cfg.seed)
    head = Head(fit_input(parts, cfg.dims, cfg.seed, cfg.extra), cfg)
    gs = groups(parts, cfg.window > 0)
    with torch.no_grad():
        for g in gs:
            g.x = head.inp(g.x)
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


def _chain_weights(seq: nn.Sequential, inp: Input, prefix: str) -> dict[str, F32]:
    """The layers as engines/readout.py's w1, b1, w2, ... on the raw tapped features: the
    standardisation and projection are folded into the first layer."""
    lins = [m for m in seq if isinstance(m, nn.Linear)]
    out: dict[str, F32] = {}
    for k, lin in enumerate(lins, start=1):
        w = lin.weight.detach().double().numpy()
        b = lin.bias.detach().double().numpy()
        if k == 1:
            if inp.basis is not None:
                cut = w.shape[1] - inp.extra
                w = np.concatenate([w[:, :cut] @ inp.basis.double().numpy().T, w[:, cut:]], 1)
            w = w / inp.scale.double().numpy()[None]
            b = b - w @ inp.mean.double().numpy()
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
    if head.cfg.blur > 0:
        out["blur"] = np.array(head.cfg.blur, dtype=np.float32)
    out["a"] = head.a.detach().numpy().astype(np.float32)
    return out
