"""training/finetune.py: the last block fine-tuned with the read-out.

- torch's last block (batch norm folded) computes the graph's own two late taps from the
  graph's block-14 output;
- the folded linear read-out gives Head.logits' values;
- a mini-batch of a group carries exactly its photos' share of the loss;
- a few steps of tuning lower the loss, and the frozen backbone head stays frozen.

Needs torch (the `fit` extra); skipped without it.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from engines.base import INPUT_NAME  # noqa: E402
from engines.readout import FEATURES, TAPS, coord_features  # noqa: E402
from engines.weights import load_state_dict, shipped_weights_path  # noqa: E402
from tests.training.test_heads import fit_set, synthetic_set  # noqa: E402
from training.backbones import Cells  # noqa: E402
from training.finetune import (  # noqa: E402
    FIXED,
    INPUT_CHANNELS,
    INPUT_TENSOR,
    LastBlock,
    TuneConfig,
    block_session,
    check_family,
    features,
    linear_logits,
    subgroup,
    tune,
)
from training.fit_head import parse_config  # noqa: E402
from training.heads import HeadConfig, fit, group_loss, groups  # noqa: E402


@pytest.fixture(scope="module")
def block_weights():
    return load_state_dict(shipped_weights_path())


def test_torch_block_reproduces_the_graphs_taps(block_weights):
    rng = np.random.default_rng(3)
    pixels = rng.integers(0, 256, (1, 160, 224, 3), dtype=np.uint8)
    late = [t.tensor for t in TAPS[2:]]
    x14, *want = block_session().run([INPUT_TENSOR, *late], {INPUT_NAME: pixels})
    h, w = x14.shape[2:]
    assert (h, w) == (5, 7) and x14.shape[1] == INPUT_CHANNELS
    cells = np.concatenate(
        [np.zeros((h * w, FIXED), np.float32), x14[0].reshape(INPUT_CHANNELS, -1).T], axis=1
    )
    with torch.no_grad():
        got = features(LastBlock(block_weights), torch.from_numpy(cells)[None], (h, w))[0]
    assert got.shape == (h * w, FEATURES)
    expected = np.concatenate([m[0].reshape(m.shape[1], -1).T for m in want], axis=1)
    scale = np.abs(expected).max()
    np.testing.assert_allclose(got[:, FIXED:].numpy(), expected, atol=1e-4 * scale)


def _synthetic(channels: int, n: int = 12):
    fixations, cells_a = synthetic_set("fix", "saliency", n, channels, seed=1)
    food, cells_b = synthetic_set("food", "object", n, channels, seed=2)
    return [fit_set(fixations, cells_a, 1.0), fit_set(food, cells_b, 1.0)]


def test_linear_logits_are_head_logits():
    parts = _synthetic(channels=6)
    cfg = parse_config("gate=1,window=0.2,dims=4,iters=20")
    head = fit(parts, cfg)
    cells = parts[1].cells
    for i in range(3):
        h, w = (int(v) for v in cells.shapes[i])
        x = torch.from_numpy(cells.features[cells.rows(i)].astype(np.float32))[None]
        mass = torch.tensor([float(cells.food_mass[i])])
        coords = torch.from_numpy(coord_features(h, w).astype(np.float32))
        with torch.no_grad():
            want = head.logits(head.inp(x), mass, coords, (h, w))
            got = linear_logits(head, x, mass, coords)
        np.testing.assert_allclose(got.numpy(), want.numpy(), rtol=1e-4, atol=1e-4)


def test_family_check_names_what_it_cannot_take():
    check_family(HeadConfig(gate=True, dims=1536))
    for bad in ("hidden=8,dims=64", "blur=0.5,dims=64", "faces=1,dims=64", "dims=0"):
        with pytest.raises(ValueError, match="linear head over principal components"):
            check_family(parse_config(bad))


def test_minibatches_partition_the_loss():
    parts = _synthetic(channels=5)
    torch.manual_seed(0)
    for g in groups(parts, with_window=True):
        z = torch.randn(len(g.w), g.hw[0] * g.hw[1])
        whole = float(group_loss(z, g, window=0.2))
        idx = torch.randperm(len(g.w))
        halves = [idx[: len(idx) // 2], idx[len(idx) // 2 :]]
        pieces = sum(float(group_loss(z[h], subgroup(g, h), window=0.2)) for h in halves)
        assert pieces == pytest.approx(whole, rel=1e-5)
        sub = subgroup(g, halves[0])
        assert len(sub.ep_img) == int(torch.isin(g.ep_img, halves[0]).sum())
        assert int(sub.ep_img.max()) < len(halves[0])


def test_tuning_lowers_the_loss_and_leaves_the_backbone_head(block_weights):
    """Photos whose ground truth sits where block 14's channel 0 is high: the tuned block
    and read-out fit it better than the read-out on frozen features."""
    rng = np.random.default_rng(0)
    block = LastBlock(block_weights)
    parts = _synthetic(channels=FIXED + INPUT_CHANNELS, n=8)
    frozen_parts = []
    for p in parts:
        x = p.cells.features.astype(np.float32)
        x[:, FIXED:] = np.abs(rng.normal(0, 1, (len(x), INPUT_CHANNELS)))
        x[:, FIXED] += 4.0 * p.cells.features[:, 0].astype(np.float32)
        tuning = Cells(p.cells.names, p.cells.shapes, p.cells.offsets, x.astype(np.float16),
                       p.cells.cams, p.cells.food_mass)  # fmt: skip
        with torch.no_grad():
            full = np.concatenate([
                features(block, torch.from_numpy(x[tuning.rows(i)])[None],
                         tuple(int(v) for v in tuning.shapes[i]))[0].numpy()
                for i in range(len(tuning))
            ])  # fmt: skip
        frozen = Cells(tuning.names, tuning.shapes, tuning.offsets, full.astype(np.float16),
                       tuning.cams, tuning.food_mass)  # fmt: skip
        frozen_parts.append((replace(p, cells=frozen), tuning))
    cfg = parse_config("gate=1,window=0.2,dims=8,iters=30")
    head = fit([fp for fp, _ in frozen_parts], cfg)
    gs = groups([replace(fp, cells=t) for fp, t in frozen_parts], with_window=True)
    head_before = block.head.weight.detach().clone()
    history = tune(block, head, gs, cfg, TuneConfig(epochs=4, lr=1e-3, head_lr=1e-3, batch=4))
    assert len(history) == 4
    assert history[-1] < history[0]
    assert torch.equal(block.head.weight, head_before)
    exported = block.export()
    assert exported["_blocks.15._project_conv.w"].shape == (320, 1152, 1, 1)
