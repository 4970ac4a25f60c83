"""Fine-tune the backbone's last block together with the read-out, cross-validated.

    python -m training.finetune cv [--config gate=1,window=0.2,dims=1536] [--epochs 3]
        [--lr 1e-4] [--head-lr 1e-3] [--batch 16] [--sets ...] [--folds 5]
    python -m training.finetune check [--set food_dev]

Issue 14's last Build lever: the read-out on features the frozen backbone computes against
the same read-out on features its last MBConv block (``_blocks.15``, 192 -> 320 channels at
stride 32) has been fitted for. Everything before that block stays frozen, so its input (the
output of ``_blocks.14``) is computed once per photo by the ONNX graph and cached
(build/heads/block14-*.npz, 192 values per stride-32 cell); torch recomputes the block and
the backbone's 1x1 head from it (batch norm folded, as engines/graph.py folds it) and the two
taps that depend on them (``_blocks.15._project_conv``, ``_conv_head.relu6``). The other two
taps (stride 8 and 16) are read from the frozen cells. `check` says how close the torch
recomputation is to the graph's own taps.

Per fold: the read-out is first fitted on frozen features (training.heads.fit, exactly the
`fit_head cv` row of the same config), then the block's weights and the read-out are
trained together by Adam on mini-batches of photos, with the same loss (likelihood of the
ground truth plus the window-choice term, L2 on the read-out). The classifier path (food
CAM, food probability) keeps the frozen block: a shipped fine-tuned block would run as a
branch beside it. Scores are kept like `fit_head cv`'s records, so `fit_head select`
tables and nests them with the other rows.

Linear read-outs over principal components only (the shipped family): the projection is
folded into the read-out's weight vector at every step instead of applied to every cell.
"""

from __future__ import annotations

import argparse
import hashlib
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import numpy.typing as npt
import onnx
import onnxruntime as ort
import torch
from torch import nn

from engines.base import INPUT_NAME
from engines.graph import fold_batch_norm
from engines.readout import TAPS
from engines.weights import load_state_dict
from training.backbones import BACKBONES, CACHE, Cells, feature_model
from training.data import EvalSet, load_set
from training.features import decoded_items
from training.fit_head import (
    DEFAULT_SETS,
    FitFold,
    MapsOf,
    SetRun,
    config_id,
    cross_validate,
    load_runs,
    parse_config,
    parse_sets,
    save_record,
    share,
)
from training.heads import FitSet, Group, Head, HeadConfig, fit, group_loss, groups, maps_of

F32 = npt.NDArray[np.float32]
F64 = npt.NDArray[np.float64]
BLOCK = 15  # Lite0's last MBConv block
INPUT_TENSOR = f"_blocks.{BLOCK - 1}.residual"
INPUT_CHANNELS = 192
# The taps before the last block (stride 8 and 16, pooled): columns of the frozen cells.
FIXED = sum(t.channels for t in TAPS[:2])


@dataclass(frozen=True)
class TuneConfig:
    epochs: int = 3
    lr: float = 1e-4  # the block's weights
    head_lr: float = 1e-3  # the read-out's
    batch: int = 16  # photos per step (of one grid shape)
    seed: int = 0

    def label(self) -> str:
        return f"last block fine-tuned: {self.epochs} epochs, lr {self.lr:g} / {self.head_lr:g}"


# --- the cached input of the last block -----------------------------------------------------


def block_input_path(set_name: str) -> Path:
    return CACHE / f"block{BLOCK - 1}-{BACKBONES['lite0'].key}-{set_name}.npz"


def block_session() -> ort.InferenceSession:
    """Lite0's feature graph (training.backbones.feature_model) with the last block's input as
    one more output."""
    model = onnx.load_from_string(feature_model(BACKBONES["lite0"]))
    model.graph.output.append(onnx.helper.make_empty_tensor_value_info(INPUT_TENSOR))
    options = ort.SessionOptions()
    options.intra_op_num_threads = 2
    return ort.InferenceSession(model.SerializeToString(), options,
                                providers=["CPUExecutionProvider"])  # fmt: skip


def block_inputs(eval_set: EvalSet, cells: Cells) -> npt.NDArray[np.float16]:
    """[rows, 192] the output of block 14 per stride-32 cell, rows as `cells`' (cached)."""
    path = block_input_path(eval_set.name)
    if path.exists():
        with np.load(path) as z:
            if list(z["names"]) != cells.names:
                raise ValueError(f"{path}: cached for other images than {eval_set.name}'s")
            return z["x"]
    sess = block_session()
    out = np.zeros((len(cells.features), INPUT_CHANNELS), np.float16)
    items = decoded_items(eval_set, f"block {BLOCK - 1} {eval_set.name}")
    for i, (item, decoded) in enumerate(items):
        (x,) = sess.run([INPUT_TENSOR], {INPUT_NAME: decoded.pixels[np.newaxis]})
        h, w = (int(v) for v in cells.shapes[i])
        if x.shape[2:] != (h, w):
            raise ValueError(f"{item.name}: block input {x.shape[2:]} vs grid {(h, w)}")
        out[cells.rows(i)] = x[0].reshape(INPUT_CHANNELS, -1).T
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, names=np.array(cells.names), x=out)
    return out


def tuning_cells(cells: Cells, x14: npt.NDArray[np.float16]) -> Cells:
    """The frozen stride-8/16 taps beside the last block's input: what the fine-tuner reads."""
    feats = np.concatenate([cells.features[:, :FIXED], x14], axis=1)
    return Cells(cells.names, cells.shapes, cells.offsets, feats, cells.cams, cells.food_mass)


# --- the last block in torch ------------------------------------------------------------------


def _conv(weights: dict[str, F32], conv: str, bn: str, groups: int = 1) -> nn.Conv2d:
    w, b = fold_batch_norm(weights[f"{conv}.weight"], weights, bn)
    out, inp, k, _ = w.shape
    layer = nn.Conv2d(inp * groups, out, k, padding=k // 2, groups=groups)
    with torch.no_grad():
        layer.weight.copy_(torch.from_numpy(w))
        layer.bias.copy_(torch.from_numpy(b))
    return layer


class LastBlock(nn.Module):
    """Block 15 (expand, depthwise 3x3, project; no residual: 192 -> 320) and the backbone's
    1x1 head, batch norm folded: [n, 192, h, w] -> the two taps, [n, 320 + 1280, h, w]."""

    def __init__(self, weights: dict[str, F32]) -> None:
        super().__init__()
        p = f"_blocks.{BLOCK}"
        self.expand = _conv(weights, f"{p}._expand_conv", f"{p}._bn0")
        self.depthwise = _conv(weights, f"{p}._depthwise_conv", f"{p}._bn1",
                               groups=self.expand.out_channels)  # fmt: skip
        self.project = _conv(weights, f"{p}._project_conv", f"{p}._bn2")
        self.head = _conv(weights, "_conv_head", "_bn1")
        self.head.requires_grad_(False)  # the backbone's head stays as it is

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.clamp(self.expand(x), 0.0, 6.0)
        y = torch.clamp(self.depthwise(y), 0.0, 6.0)
        p = self.project(y)
        return torch.cat([p, torch.clamp(self.head(p), 0.0, 6.0)], dim=1)

    def export(self) -> dict[str, F32]:
        """The tuned block's folded weights, keyed as engines/graph.py's initializers."""
        p = f"_blocks.{BLOCK}"
        out = {}
        for name, layer in (("_expand_conv", self.expand), ("_depthwise_conv", self.depthwise),
                            ("_project_conv", self.project)):  # fmt: skip
            out[f"{p}.{name}.w"] = layer.weight.detach().numpy().astype(np.float32)
            out[f"{p}.{name}.b"] = layer.bias.detach().numpy().astype(np.float32)
        return out


def features(block: LastBlock, x: torch.Tensor, hw: tuple[int, int]) -> torch.Tensor:
    """[n, cells, FIXED + 192] (frozen taps, block input) -> [n, cells, 1752] the read-out's
    features, in engines/readout.TAPS order."""
    n, cells, _ = x.shape
    grid = x[..., FIXED:].transpose(1, 2).reshape(n, INPUT_CHANNELS, *hw)
    tuned = block(grid).reshape(n, -1, cells).transpose(1, 2)
    return torch.cat([x[..., :FIXED], tuned], dim=-1)


def linear_logits(head: Head, f: torch.Tensor, mass: torch.Tensor,
                  coords: torch.Tensor) -> torch.Tensor:  # fmt: skip
    """Head.logits for a linear (optionally food-gated) head over principal components, with
    the projection folded into each weight vector: f [n, cells, 1752] raw features."""
    xs = (f - head.inp.mean) / head.inp.scale
    basis = head.inp.basis

    def one(layer: nn.Module) -> torch.Tensor:
        lin = layer[0]  # type: ignore[index]
        return xs @ (basis @ lin.weight[0]) + lin.bias[0]

    z = one(head.main)
    if head.food is not None:
        z = z + mass[:, None] * one(head.food)
    return z + coords @ head.a


def check_family(cfg: HeadConfig) -> None:
    if cfg.hidden or cfg.blur or cfg.faces or not cfg.dims:
        raise ValueError("fine-tuning takes a linear head over principal components "
                         "(no hidden layers, blur or face channel; dims > 0)")  # fmt: skip


# --- training ------------------------------------------------------------------------------------


def subgroup(g: Group, idx: torch.Tensor) -> Group:
    """The group's images `idx` and their episodes."""
    keep = torch.isin(g.ep_img, idx)
    remap = torch.full((len(g.w),), -1, dtype=torch.long)
    remap[idx] = torch.arange(len(idx))
    return replace(g, x=g.x[idx], t=g.t[idx], w=g.w[idx], mass=g.mass[idx],
                   ep_img=remap[g.ep_img[keep]], a=g.a[keep], u=g.u[keep], m=g.m[keep],
                   valid=g.valid[keep], ep_w=g.ep_w[keep])  # fmt: skip


def batches(
    gs: Sequence[Group], size: int, rng: np.random.Generator
) -> list[tuple[int, torch.Tensor]]:
    out = []
    for k, g in enumerate(gs):
        order = rng.permutation(len(g.w))
        out += [(k, torch.from_numpy(order[i : i + size])) for i in range(0, len(order), size)]
    return [out[i] for i in rng.permutation(len(out))]


def tune(block: LastBlock, head: Head, gs: Sequence[Group], cfg: HeadConfig,
         tc: TuneConfig) -> list[float]:  # fmt: skip
    """Adam on the block and the read-out together; the loss per epoch (summed over steps)."""
    rng = np.random.default_rng(tc.seed)
    opt = torch.optim.Adam([
        {"params": [p for p in block.parameters() if p.requires_grad], "lr": tc.lr},
        {"params": [p for p in head.parameters() if p.requires_grad], "lr": tc.head_lr},
    ])  # fmt: skip
    history = []
    for _ in range(tc.epochs):
        total = 0.0
        for k, idx in batches(gs, tc.batch, rng):
            sub = subgroup(gs[k], idx)
            z = linear_logits(head, features(block, sub.x, sub.hw), sub.mass, sub.coords)
            # The L2 term's share of this step: its photos' share of the likelihood weight.
            value = group_loss(z, sub, cfg.window) + 0.5 * cfg.l2 * head.penalty() * sub.w.sum()
            opt.zero_grad()
            value.backward()  # type: ignore[no-untyped-call]
            opt.step()
            total += float(value.detach())
        history.append(total)
    return history


def tuned_maps(block: LastBlock, head: Head, cells: Cells, images: Sequence[int]) -> dict[int, F32]:
    """The tuned block and read-out's maps of `cells`' images (heads.maps_of)."""
    return maps_of(lambda x, mass, coords, hw: linear_logits(head, features(block, x, hw), mass,
                                                             coords), cells, images)  # fmt: skip


def tuning_runs(eval_dir: str, sets: dict[str, float], folds: int, window: bool
                ) -> tuple[dict[str, SetRun], dict[str, Cells]]:  # fmt: skip
    """fit_head's runs (frozen cells) and, per set, the cells the fine-tuner reads."""
    runs = load_runs(eval_dir, sets, "lite0", folds, window)
    tuning = {n: tuning_cells(r.cells, block_inputs(r.eval_set, r.cells)) for n, r in runs.items()}
    return runs, tuning


def tuned_fold(runs: dict[str, SetRun], tuning: dict[str, Cells], cfg: HeadConfig,
               tc: TuneConfig) -> FitFold:  # fmt: skip
    """fit_fold for fit_head.cross_validate: the read-out on frozen features, then the last
    block and the read-out tuned together."""
    weights = load_state_dict(BACKBONES["lite0"].weights_path())

    def fit_fold(parts: list[FitSet], fold: int) -> MapsOf:
        head = fit(parts, cfg)
        torch.manual_seed(tc.seed + fold)
        block = LastBlock(weights)
        history = tune(block, head, groups([replace(p, cells=tuning[p.name]) for p in parts],
                                           cfg.window > 0), cfg, tc)  # fmt: skip
        print(f"  fold {fold + 1}: loss per epoch " + ", ".join(f"{v:.4f}" for v in history),
              file=sys.stderr)  # fmt: skip
        return lambda name, images: tuned_maps(block, head, tuning[name], images)

    return fit_fold


def run_cv(args: argparse.Namespace) -> int:
    sets = parse_sets(args.sets)
    cfg = parse_config(args.config)
    check_family(cfg)
    tc = TuneConfig(args.epochs, args.lr, args.head_lr, args.batch, args.seed)
    torch.set_num_threads(args.threads)
    cid = (
        "ft-"
        + hashlib.sha1((config_id(cfg, sets, "lite0", args.folds) + repr(tc)).encode()).hexdigest()[
            :10
        ]
    )
    t0 = time.perf_counter()
    runs, tuning = tuning_runs(args.eval_dir, sets, args.folds, cfg.window > 0)
    print(f"{cid} {cfg.label()}; {tc.label()} on {sets}", file=sys.stderr)
    scores = cross_validate(runs, args.folds, tuned_fold(runs, tuning, cfg, tc))
    command = (f"python -m training.finetune cv --sets {args.sets} --config {args.config} "
               f"--epochs {tc.epochs} --lr {tc.lr:g} --head-lr {tc.head_lr:g} "
               f"--batch {tc.batch}")  # fmt: skip
    seconds = round(time.perf_counter() - t0)
    save_record({"id": cid, "name": args.name or f"{cfg.label()}; {tc.label()}",
                 "config": args.config, "command": command, "label": cfg.label(),
                 "backbone": "lite0", "sets": sets, "folds": args.folds, "seconds": seconds},
                runs, scores)  # fmt: skip
    print(f"{cid} " + " ".join(f"{n} {share(scores[n], runs[n].refs):+.1%}" for n in runs)
          + f" ({seconds} s)")  # fmt: skip
    return 0


def run_check(args: argparse.Namespace) -> int:
    """Largest difference between the torch recomputation and the graph's taps on a set."""
    s = load_set(args.eval_dir, args.set)
    runs = load_runs(args.eval_dir, {}, "lite0", 1, False)
    cells = runs[args.set].cells
    x = tuning_cells(cells, block_inputs(s, cells))
    block = LastBlock(load_state_dict(BACKBONES["lite0"].weights_path()))
    worst = 0.0
    with torch.no_grad():
        for i in range(len(cells)):
            hw = (int(cells.shapes[i][0]), int(cells.shapes[i][1]))
            got = features(
                block, torch.from_numpy(x.features[x.rows(i)].astype(np.float32))[None], hw
            )
            want = cells.features[cells.rows(i)].astype(np.float32)
            scale = np.abs(want[:, FIXED:]).max() + 1e-6
            worst = max(
                worst, float(np.abs(got[0, :, FIXED:].numpy() - want[:, FIXED:]).max() / scale)
            )
    print(f"{args.set}: {len(cells)} photos, largest |torch - graph| / max |graph| = {worst:.2e}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("command", choices=("cv", "check"))
    ap.add_argument("--eval-dir", default="../shared/eval")
    ap.add_argument("--sets", default=DEFAULT_SETS)
    ap.add_argument("--config", default="gate=1,window=0.2,dims=1536")
    ap.add_argument("--epochs", type=int, default=TuneConfig.epochs)
    ap.add_argument("--lr", type=float, default=TuneConfig.lr)
    ap.add_argument("--head-lr", type=float, default=TuneConfig.head_lr)
    ap.add_argument("--batch", type=int, default=TuneConfig.batch)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--folds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--name", default="")
    ap.add_argument("--set", default="food_dev", help="check: the set")
    args = ap.parse_args(argv)
    return run_check(args) if args.command == "check" else run_cv(args)


if __name__ == "__main__":
    raise SystemExit(main())
