"""training/tune.py: the candidate grid."""

from __future__ import annotations

from sidecar.settings import KernelSettings
from training.tune import candidates, unzoomed


def test_every_zoom_candidate_is_compared_with_its_unzoomed_twin() -> None:
    base = KernelSettings()
    cands = candidates(base)
    zoom = [c for c in cands if c.kernel.min_scale < 1.0]
    assert zoom, "the grid measures scale freedom"
    assert any(c.kernel.zoom_weight < 0 for c in zoom)
    assert any(c.kernel.cut_weight > 0 for c in zoom)
    for c in zoom:
        twin = type(c)(c.profile, unzoomed(c.kernel, base), c.cam_share)
        assert twin in cands
        assert "zoom≥" in c.label() and "zoom≥" not in twin.label()


def test_the_shipped_defaults_are_a_candidate_and_every_blur_has_its_unblurred_twin() -> None:
    from dataclasses import replace

    from sidecar.core import CAM_SHARE
    from training.tune import Candidate

    base = KernelSettings()
    cands = candidates(base)
    assert Candidate("learned", base, CAM_SHARE) in cands
    blurred = [c for c in cands if c.kernel.smooth]
    assert blurred
    for c in blurred:
        assert replace(c, kernel=replace(c.kernel, smooth=0.0)) in cands


def test_the_grid_has_no_duplicates() -> None:
    cands = candidates(KernelSettings())
    assert len(set(cands)) == len(cands)


def test_heldout_maps_replace_the_readout_except_on_sets_never_fitted(tmp_path, monkeypatch):
    import numpy as np
    import pytest

    from engines.base import PROFILES
    from sidecar.core import Analysis
    from training import tune

    held = tmp_path / "heldout.npz"
    np.savez(held, **{"/x/fitted.jpg": np.full((2, 2), 0.25, np.float32)})
    monkeypatch.setattr(tune, "feature_key", lambda model_dir: "key")
    monkeypatch.setattr(tune, "heldout_path", lambda key: held)
    heat = np.ones((len(PROFILES), 2, 2), np.float16)
    stored = {p: Analysis(64, 64, heat, 0.0, "v") for p in ("/x/fitted.jpg", "/x/unseen.jpg")}
    out = tune.with_heldout_readout(stored, tmp_path, unseen={"/x/unseen.jpg"})
    channel = PROFILES.index("readout")
    assert (out["/x/fitted.jpg"].heatmaps[channel] == np.float16(0.25)).all()
    assert (out["/x/unseen.jpg"].heatmaps == heat).all()  # the shipped map, never fitted on
    with pytest.raises(SystemExit, match="no held-out map"):
        tune.with_heldout_readout(stored, tmp_path)  # a fitted set's photo without one
