"""Cross-validated choice of the window-search settings on the dev sets.

    python -m training.tune [--folds 5] [--out training/results/tune.md]

The CNN part is computed once per image and kept in ``build/tune/`` (keyed by the model
version); every candidate setting then only re-runs the cheap heatmap preparation and search.
Selection is k-fold over images within each set: a setting is chosen on k-1 folds and the
figures reported are those of the held-out fold, so they estimate what the chosen defaults
do on other photos of the same kinds (the hold-out sets), not how well we fit these.

The objective is the share of the centre → oracle headroom captured, per set (fcdb IoU, food
area kept, fixations kept), averaged, plus twice the sum of the negative ones: a negative
share weighs seven times what it does in the plain mean, since "never worse than the centre
crop" matters more than a larger win elsewhere.

The learned read-out channel is replaced by its held-out maps from training/fit_readout.py
(build/readout/heldout-*.npz: each image's map from a head fitted without it), so the search
settings are tuned on read-out maps of photos the head never saw, as in service.
"""

from __future__ import annotations

import argparse
import itertools
import sys
import time
from collections.abc import Collection, Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import numpy.typing as npt
from tqdm import tqdm

from engines.base import PROFILES
from engines.loader import load_engine
from kernels.window import best_window, center_box
from sidecar import settings as settings_mod
from sidecar.core import CAM_SHARE, Analysis, CropCore, blend_profiles, prepare, search_params
from sidecar.settings import KernelSettings
from training.data import (
    DEFAULT_SETS,
    FIT_SETS,
    Box,
    EvalSet,
    feature_key,
    heldout_key,
    heldout_path,
    load_set,
    publish,
)
from training.features import reference_scores

PRIMARY = {"crop": "iou", "object": "kept", "saliency": "fix"}


@dataclass(frozen=True)
class Candidate:
    profile: str
    kernel: KernelSettings
    cam_share: float = CAM_SHARE

    def label(self) -> str:
        k = self.kernel
        mix = f" cam={self.cam_share}" if self.profile == "learned" else ""
        zoom = f" zoom≥{k.min_scale} zw={k.zoom_weight}" if k.min_scale < 1.0 else ""
        smooth = f" smooth={k.smooth}" if k.smooth else ""
        return (
            f"{self.profile}{mix} w={k.center_weight} σ={k.center_sigma} cut={k.cut_weight} "
            f"γ={k.gamma} conf≥{k.min_confidence}{zoom}{smooth}"
        )


def analyses(sets: Sequence[EvalSet], settings: settings_mod.Settings) -> dict[str, Analysis]:
    """One Analysis per image path, cached on disk per model version."""
    engine = load_engine(settings.engine)
    core = CropCore.from_settings(settings, engine)
    cache = Path("build/tune") / f"analyses-{engine.version}.npz"
    stored: dict[str, Analysis] = {}
    if cache.exists():
        with np.load(cache, allow_pickle=False) as npz:
            for key in npz.files:
                if key.endswith(":heat"):
                    path = key[: -len(":heat")]
                    meta = npz[path + ":meta"]
                    stored[path] = Analysis(
                        int(meta[0]), int(meta[1]), npz[key], float(meta[2]), engine.version
                    )
    items = [it for s in sets for it in s.items if str(it.path) not in stored]
    for item in tqdm(
        items, desc="CNN", unit="img", file=sys.stderr, disable=not items, mininterval=5.0
    ):
        stored[str(item.path)] = core.analyse(item.path.read_bytes())
    if items:
        cache.parent.mkdir(parents=True, exist_ok=True)
        arrays: dict[str, npt.NDArray[np.float64] | npt.NDArray[np.float16]] = {}
        for path, a in stored.items():
            arrays[path + ":heat"] = a.heatmaps
            arrays[path + ":meta"] = np.array([a.width, a.height, a.food_mass])
        np.savez_compressed(cache, **arrays)  # type: ignore[arg-type]
    engine.close()
    wanted = {str(it.path): stored[str(it.path)] for s in sets for it in s.items}
    # Sets the shipped read-out is never fitted on: their shipped maps are held-out already.
    unseen = {str(it.path) for s in sets if s.name not in FIT_SETS for it in s.items}
    return with_heldout_readout(wanted, Path(settings.engine.model_dir), unseen)


def with_heldout_readout(
    stored: dict[str, Analysis], model_dir: Path, unseen: Collection[str] = ()
) -> dict[str, Analysis]:
    """The analyses with the read-out channel swapped for its held-out map. Every image but
    the `unseen` ones (of sets never fitted on) must have one: one without would be tuned on
    in-sample."""
    path = heldout_path(feature_key(model_dir))
    if not path.exists():
        raise SystemExit(f"{path} missing: run `python -m training.fit_readout` first")
    channel = PROFILES.index("readout")
    out = dict(stored)
    with np.load(path) as held:
        for name, a in stored.items():
            k = heldout_key(Path(name))
            if k not in held.files and name in unseen:
                continue
            if k not in held.files:
                raise SystemExit(f"no held-out map for {name} in {path}: run training.fit_readout")
            maps = a.heatmaps.copy()
            maps[channel] = held[k].astype(np.float16)
            out[name] = Analysis(a.width, a.height, maps, a.food_mass, a.model_version)
    return out


def boxes_for(cand: Candidate, analysis: Analysis, aspects: Sequence[float]) -> list[Box]:
    k = cand.kernel
    heat = prepare(blend_profiles(analysis, cand.profile, cand.cam_share), k)
    params = search_params(k)
    out = []
    for aspect in aspects:
        box = best_window(heat, analysis.width, analysis.height, aspect, params)
        if box.confidence < k.min_confidence:
            box = center_box(analysis.width, analysis.height, aspect)
        out.append(Box.of(box))
    return out


def gains(
    cand: Candidate,
    sets: Sequence[EvalSet],
    store: dict[str, Analysis],
    centre: dict[str, npt.NDArray[np.float64]],
    room: dict[str, npt.NDArray[np.float64]],
) -> dict[str, npt.NDArray[np.float64]]:
    """Per set, the per-image gain over the centre crop in units of the set's mean headroom.

    The mean of these is the share of the centre → oracle headroom captured.
    """
    out = {}
    for s in sets:
        key = PRIMARY[s.protocol.kind]
        vals = np.zeros(len(s.items))
        for i, item in enumerate(s.items):
            aspects = s.protocol.aspects(item)
            boxes = boxes_for(cand, store[str(item.path)], list(aspects.values()))
            vals[i] = np.mean([s.protocol.score(item, b)[key] for b in boxes])
        out[s.name] = (vals - centre[s.name]) / room[s.name].mean()
    return out


def centre_and_room(
    sets: Sequence[EvalSet],
) -> tuple[dict[str, npt.NDArray[np.float64]], dict[str, npt.NDArray[np.float64]]]:
    """Per set: per-image primary metric of the centre crop, and per-image oracle − centre
    (its mean is the set's headroom, the unit of every share)."""
    centre, room = {}, {}
    for s in sets:
        c, o = reference_scores(s)
        centre[s.name], room[s.name] = c, o - c
    return centre, room


def objective(per_set: dict[str, float]) -> float:
    values = np.array(list(per_set.values()))
    return float(values.mean() + 2.0 * np.minimum(values, 0.0).sum())


def candidates(base: KernelSettings) -> list[Candidate]:
    # The CAM profiles' best region was measured before (centre weight 0.4-0.8, σ 0.25-0.4,
    # cut 1-3); the read-out has its own centre bias, so its grid starts at no prior at all
    # (an earlier grid with weights up to 0.4 and cut 3 ranked those lower). `learned` with
    # cam share 0 is the read-out alone.
    learned = itertools.product(
        ("learned",),
        (0.0, 0.1),  # center_weight
        (0.3,),  # center_sigma
        (0.0, 1.0),  # cut_weight
        (1.0, 1.5, 2.0),  # gamma
        (0.0, 0.01),  # min_confidence
        (0.0, 0.15, 0.3),  # cam_share
    )
    auto = itertools.product(
        ("auto",), (0.4, 0.6), (0.25, 0.4), (1.0, 3.0), (1.0,), (0.0, 0.01), (CAM_SHARE,)
    )
    flat = replace(base, smooth=0.0)  # the blur is its own dimension, below
    plain = [
        Candidate(
            p,
            replace(flat, center_weight=w, center_sigma=s, cut_weight=c, gamma=g, min_confidence=m),
            x,
        )
        for p, w, s, c, g, m, x in itertools.chain(learned, auto)
    ]
    return plain + zoom_candidates(flat) + smooth_candidates(base)


def smooth_candidates(base: KernelSettings) -> list[Candidate]:
    """The learned map blurred before the search: sigma 1-8 cells of the upsampled grid (at
    the default 4x upsampling, 1/4 to 2 cells of the CNN's own map), with and without the
    edge-cut term."""
    learned = replace(base, center_weight=0.0, center_sigma=0.3, gamma=1.0, min_confidence=0.0)
    return [
        Candidate("learned", replace(learned, cut_weight=c, smooth=s), CAM_SHARE)
        for c in (0.0, 1.0)
        for s in (1.0, 2.0, 4.0, 8.0)
    ]


def zoom_candidates(base: KernelSettings) -> list[Candidate]:
    """Scale freedom on the learned map, which must pay for itself in the same numbers.

    A smaller window never holds more heat than some largest one, so the search zooms in only
    to avoid an edge cut (cut > 0) or for a reward: a negative zoom weight, which the service's
    settings do not allow and only this grid tries.
    """
    learned = replace(base, center_weight=0.0, center_sigma=0.3, gamma=1.0, min_confidence=0.0)
    cut = [replace(learned, min_scale=0.6, cut_weight=1.0, zoom_weight=z) for z in (0.0, 0.05)]
    reward = [
        replace(learned, min_scale=m, cut_weight=0.0, zoom_weight=z)
        for m in (0.8, 0.6)
        for z in (-0.3, -0.6, -1.0)
    ]
    return [Candidate("learned", k, CAM_SHARE) for k in cut + reward]


def unzoomed(kernel: KernelSettings, base: KernelSettings) -> KernelSettings:
    """The same search without scale freedom: what a zoom candidate is compared with."""
    return replace(kernel, min_scale=1.0, zoom_weight=base.zoom_weight)


def cross_validate(
    table: dict[int, dict[str, npt.NDArray[np.float64]]],
    sets: Sequence[EvalSet],
    folds: int,
    room: dict[str, npt.NDArray[np.float64]],
) -> tuple[dict[str, float], list[int]]:
    """Held-out mean gain per set, and the candidate chosen in each fold.

    Gains in `table` are in units of the whole set's headroom; a fold's choice rescales them
    to the headroom of its training images, so the held-out images set nothing of it.
    """
    rng = np.random.default_rng(0)
    fold_of = {s.name: rng.permutation(len(s.items)) % folds for s in sets}
    held: dict[str, list[float]] = {s.name: [] for s in sets}
    chosen = []
    for f in range(folds):
        unit = {n: float(r.mean() / r[fold_of[n] != f].mean()) for n, r in room.items()}

        def train_score(idx: int, f: int = f, unit: dict[str, float] = unit) -> float:
            return objective(
                {n: float(g[fold_of[n] != f].mean()) * unit[n] for n, g in table[idx].items()}
            )

        best = max(table, key=lambda idx: (train_score(idx), -idx))
        chosen.append(best)
        for name, g in table[best].items():
            held[name].extend(g[fold_of[name] == f].tolist())
    return {n: float(np.mean(v)) for n, v in held.items()}, chosen


@dataclass(frozen=True)
class Inputs:
    """What a search-settings study works on: the dev sets, their stored analyses (held-out
    read-out maps), and per set the centre crop's scores and the oracle's headroom."""

    settings: settings_mod.Settings
    sets: list[EvalSet]
    store: dict[str, Analysis]
    centre: dict[str, npt.NDArray[np.float64]]
    room: dict[str, npt.NDArray[np.float64]]  # per image, oracle − centre


def load_inputs(eval_dir: str) -> Inputs:
    settings = settings_mod.load()
    sets = [load_set(eval_dir, name) for name in DEFAULT_SETS]
    store = analyses(sets, settings)
    centre, room = centre_and_room(sets)
    return Inputs(settings, sets, store, centre, room)


def score_rows(
    rows: Sequence[tuple[str, dict[str, npt.NDArray[np.float64]]]], names: Sequence[str]
) -> list[str]:
    """Markdown lines: a candidate a row, its mean headroom share per set."""
    out = ["| candidate | " + " | ".join(names) + " |", "|---|" + "---:|" * len(names)]
    out += [
        f"| `{label}` | " + " | ".join(f"{g[n].mean():+.1%}" for n in names) + " |"
        for label, g in rows
    ]
    return out


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--eval-dir", default="../shared/eval")
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument("--out", type=Path, default=Path("training/results/tune.md"))
    args = parser.parse_args(argv)
    t0 = time.perf_counter()
    inputs = load_inputs(args.eval_dir)
    settings, sets, store, centre, room = (
        inputs.settings, inputs.sets, inputs.store, inputs.centre, inputs.room
    )  # fmt: skip
    cands = candidates(settings.kernel)
    table = {
        i: gains(c, sets, store, centre, room)
        for i, c in enumerate(tqdm(cands, desc="grid", file=sys.stderr))
    }
    held, chosen = cross_validate(table, sets, args.folds, room)
    full = max(
        table, key=lambda i: (objective({n: float(g.mean()) for n, g in table[i].items()}), -i)
    )
    lines = [
        f"# window-search tuning ({datetime.now(UTC):%Y-%m-%d %H:%M} UTC)",
        "",
        f"{len(cands)} candidates, {args.folds}-fold cross-validation over the images of "
        f"{', '.join(s.name for s in sets)}; {time.perf_counter() - t0:.0f} s.",
        "",
        "Share of the centre → oracle headroom of the primary metric captured (fcdb IoU, "
        "food kept, fixations):",
        "",
        "| | " + " | ".join(s.name for s in sets) + " |",
        "|---|" + "---:|" * len(sets),
        "| held-out folds (chosen per fold) | "
        + " | ".join(f"{held[s.name]:+.1%}" for s in sets)
        + " |",
        f"| in-sample, best on all images: `{cands[full].label()}` | "
        + " | ".join(f"{table[full][s.name].mean():+.1%}" for s in sets)
        + " |",
        "",
        "Chosen per fold: " + "; ".join(f"`{cands[i].label()}`" for i in chosen),
        "",
    ]
    ranked = sorted(
        table, key=lambda i: -objective({n: float(g.mean()) for n, g in table[i].items()})
    )
    shipped = Candidate("learned", settings.kernel, CAM_SHARE)
    if settings.engine.profile == "learned" and shipped in cands:
        i = cands.index(shipped)
        lines += [
            f"Shipped defaults `{shipped.label()}`: in-sample "
            + " / ".join(f"{table[i][s.name].mean():+.1%}" for s in sets)
            + f", rank {ranked.index(i) + 1} of {len(cands)}.",
            "",
        ]
    names = [s.name for s in sets]
    lines += ["Top 10 in-sample:", ""]
    lines += score_rows([(cands[i].label(), table[i]) for i in ranked[:10]], names)
    zoom = [i for i, c in enumerate(cands) if c.kernel.min_scale < 1.0]
    twins = {replace(cands[i], kernel=unzoomed(cands[i].kernel, settings.kernel)) for i in zoom}
    plain = [i for i, c in enumerate(cands) if c in twins]
    lines += [
        "",
        "Scale freedom (zoom) on the learned map, in-sample, against the same settings without "
        "zoom; a negative zoom weight rewards tighter windows:",
        "",
    ]
    lines += score_rows([(cands[i].label(), table[i]) for i in plain + zoom], names)
    smoothed = [i for i, c in enumerate(cands) if c.kernel.smooth]
    flat = {replace(cands[i], kernel=replace(cands[i].kernel, smooth=0.0)) for i in smoothed}
    unsmoothed = [i for i, c in enumerate(cands) if c in flat]
    lines += [
        "",
        "Smoothing the map before the search (Gaussian, sigma in cells of the upsampled map), "
        "in-sample, against the same settings without it:",
        "",
    ]
    lines += score_rows([(cands[i].label(), table[i]) for i in unsmoothed + smoothed], names)
    publish("\n".join(lines) + "\n", args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
