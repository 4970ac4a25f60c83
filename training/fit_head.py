"""Cross-validate read-out heads on every set given, choose one by nested CV, fit and ship it.

    python -m training.fit_head cv --config hidden=32,window=0.2 [--config ...]
        [--sets fcdb_train=2,saliency_dev=1,food_dev=1,osie_train=1,crowd_train=1]
        [--backbone lite0|lite2|both] [--folds 5] [--name LABEL]
    python -m training.fit_head select [--report training/results/heads.md]
    python -m training.fit_head ship --config ... [--out engines/readout_weights.npz]
    python -m training.fit_head compare --ids A,B

`cv` fits one head per fold on every set it is given (folds by photo, each set split into
the same number of folds, so every set is in every fold; a set's weight is its total weight
in the loss), scores each held-out image with the window search as the service runs it (the
`learned` profile: the read-out with sidecar.core.CAM_SHARE of the CAM map, default search
settings; fcdb_dev, never fitted on, is scored with every fold's head and averaged over
folds), and keeps every image's score in build/heads/scores/. `select` reads them and makes
the lever table: per set, the share of the centre -> oracle headroom (cross-validated; for
fixations also as a share of the other viewers' gain) and the nested estimate of choosing
among the candidates by the objective below. `ship` fits the chosen configuration on every
image of every set and writes the weights the ONNX graph is built from.

Objective (the same as training/tune.py's): the mean over the fit sets of the headroom
share of their primary metric (fcdb IoU, food area kept, fixations kept), plus twice the
sum of the negative shares (a set below the centre crop weighs seven times as much).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields, replace
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import numpy.typing as npt
import torch

from engines.faces import face_map
from engines.readout import WEIGHTS_PATH, head_logits, load_weights
from sidecar.core import Analysis, blend_profiles
from sidecar.settings import KernelSettings
from training.backbones import ALL_FIT_SETS, BACKBONES, Cells, extract
from training.comp_terms import rank_episodes
from training.data import (
    EvalSet,
    centre_box,
    feature_key,
    fixations_kept,
    heldout_key,
    heldout_path,
    load_set,
    oracle_box,
    publish,
)
from training.face_cache import load_cached
from training.features import fold_of, primary_scores, reference_scores, targets
from training.fit_window import episodes
from training.heads import FitSet, HeadConfig, comp_maps_of, export_weights, fit, heat_maps

F32 = npt.NDArray[np.float32]
F64 = npt.NDArray[np.float64]
SCORES = Path("build/heads/scores")
REFS = Path("build/heads/refs")
DEFAULT_SETS = "fcdb_train=2,saliency_dev=1,food_dev=1,osie_train=1,crowd_train=1"
PENALTY = 2.0


def parse_sets(spec: str) -> dict[str, float]:
    out = {}
    for part in spec.split(","):
        name, _, weight = part.partition("=")
        out[name] = float(weight or 1.0)
    return out


def parse_config(spec: str) -> HeadConfig:
    """ "hidden=32-16,gate=1,blur=0.5,l2=1,window=0.2,dims=256,faces=1" -> HeadConfig."""
    kinds = {f.name: f.type for f in fields(HeadConfig)}
    values: dict[str, object] = {}
    for part in filter(None, spec.split(",")):
        key, _, value = part.partition("=")
        if key not in kinds:
            raise ValueError(f"unknown head setting {key!r} (one of {', '.join(kinds)})")
        if key == "hidden":
            values[key] = tuple(int(v) for v in value.split("-") if v)
        elif key in ("gate", "skip", "faces", "xgate"):
            values[key] = value not in ("0", "false", "")
        elif key in ("dims", "iters", "seed", "comp", "buckets"):
            values[key] = int(value)
        else:
            values[key] = float(value)
    return HeadConfig(**values)  # type: ignore[arg-type]


# --- the data of a run ------------------------------------------------------------------------


def join_cells(parts: Sequence[Cells]) -> Cells:
    """Features of several backbones side by side (same images, same grids); the CAM heads
    and food probability of the first."""
    first = parts[0]
    for p in parts[1:]:
        if p.names != first.names or not np.array_equal(p.shapes, first.shapes):
            raise ValueError("backbones disagree on images or grids")
    feats = np.concatenate([p.features for p in parts], axis=1)
    return Cells(first.names, first.shapes, first.offsets, feats, first.cams, first.food_mass)


def load_cells(eval_set: EvalSet, backbone: str) -> Cells:
    names = ["lite0", "lite2"] if backbone == "both" else [backbone]
    return join_cells([extract(eval_set, BACKBONES[n]) for n in names])


def with_face_channel(eval_set: EvalSet, cells: Cells, boxes: dict[str, F32]) -> Cells:
    """The cells plus one last feature: the share of each cell that detected faces cover
    (engines.faces.face_map of the photo's boxes, in its original pixels, on its grid)."""
    column = np.zeros((len(cells.features), 1), np.float16)
    for i, item in enumerate(eval_set.items):
        h, w = (int(v) for v in cells.shapes[i])
        found = boxes.get(item.name, np.zeros((0, 5), np.float32))
        column[cells.rows(i), 0] = face_map(found, item.width, item.height, h, w).reshape(-1)
    feats = np.concatenate([cells.features, column], axis=1)
    return Cells(cells.names, cells.shapes, cells.offsets, feats, cells.cams, cells.food_mass)


def references(eval_set: EvalSet) -> tuple[F64, F64, F64]:
    """Per image: the centre crop's and the oracle's primary metric, and (fixation sets) the
    other viewers' choice (each viewer scored on the window all the others' fixations choose,
    bench/observers.py's ALL_BUT_ONE; NaN elsewhere). Cached in build/heads/refs/."""
    path = REFS / f"{eval_set.name}-{len(eval_set.items)}.npz"
    if path.exists():
        with np.load(path) as z:
            return z["centre"], z["oracle"], z["viewers"]
    centre, oracle = reference_scores(eval_set)
    viewers = np.full(len(eval_set.items), np.nan)
    if eval_set.protocol.kind == "saliency":
        viewers = np.array([viewers_choice(item, eval_set) for item in eval_set.items])
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, centre=centre, oracle=oracle, viewers=viewers)
    return centre, oracle, viewers


def viewers_choice(item: object, eval_set: EvalSet) -> float:
    """Fixations kept when each viewer in turn is scored on the largest window the other
    viewers' fixations choose (64 offsets), weighted by the viewer's fixations, mean over the
    aspects: bench/observers.py's ALL_BUT_ONE plus the centre crop's score."""
    fix = item.fixations  # type: ignore[attr-defined]
    aspects = list(eval_set.protocol.aspects(item).values())  # type: ignore[arg-type]
    viewers = np.unique(fix[:, 2])
    if len(viewers) < 2:
        return float(np.mean([fixations_kept(centre_box(item.width, item.height, a), fix)  # type: ignore[attr-defined]
                              for a in aspects]))  # fmt: skip
    total = 0.0
    for aspect in aspects:
        for v in viewers:
            mine = fix[:, 2] == v
            others = fix[~mine]
            box = oracle_box(item, aspect, lambda b, o=others: fixations_kept(b, o), 64)  # type: ignore[arg-type,misc]
            total += mine.mean() * fixations_kept(box, fix[mine])
    return total / len(aspects)


@dataclass
class SetRun:
    eval_set: EvalSet
    cells: Cells
    weight: float
    fold: npt.NDArray[np.int64]
    refs: tuple[F64, F64, F64]
    fit: FitSet | None  # None for the check set


def load_runs(eval_dir: str, sets: dict[str, float], backbone: str, folds: int, window: bool,
              faces: bool = False, rank: bool = False) -> dict[str, SetRun]:  # fmt: skip
    """Every set's data; with `faces`, the cells carry the face channel (boxes cached by
    training/face_cache.py); with `rank`, the expert-crop sets' ranking windows."""
    runs = {}
    # Every known set is scored: the fit sets by cross-validation, the others (fcdb_dev always)
    # by every fold's head, since none of them saw it.
    for name in (*sets, *(n for n in ALL_FIT_SETS if n not in sets)):
        s = load_set(eval_dir, name)
        cells = load_cells(s, backbone)
        if faces:
            cells = with_face_channel(s, cells, load_cached(name))
        refs = references(s)
        fs = None
        if name in sets:
            eps = episodes(s, cells) if window else []  # type: ignore[arg-type]
            ranks = rank_episodes(s, cells) if rank and s.protocol.kind == "crop" else []
            fs = FitSet(name, cells, targets(s, cells), eps, refs[1] - refs[0], sets[name],  # type: ignore[arg-type]
                        ranks=ranks, kind=s.protocol.kind)  # fmt: skip
        runs[name] = SetRun(s, cells, sets.get(name, 0.0), fold_of(len(s.items), folds), refs, fs)
    return runs


def score_maps(run: SetRun, maps: dict[int, F32], kernel: KernelSettings,
               comps: dict[int, F32] | None = None) -> F64:  # fmt: skip
    """Per image (in `maps`' order of keys), the primary metric of the `learned` profile; with
    `comps`, each image's composition maps in the search too (heads.comp_maps_of)."""
    raw = []
    for i, heat in maps.items():
        item = run.eval_set.items[i]
        r = run.cells.rows(i)
        h, w = heat.shape
        cams = run.cells.cams[r].astype(np.float32).T.reshape(2, h, w)
        stack = np.stack([cams[0], cams[1], heat]).astype(np.float16)
        analysis = Analysis(item.width, item.height, stack, float(run.cells.food_mass[i]), "cv")
        raw.append(blend_profiles(analysis, "learned"))
    subset = replace(run.eval_set, items=tuple(run.eval_set.items[i] for i in maps))
    per = None if not comps else [comps[i] for i in maps]
    return primary_scores(subset, raw, kernel, per)


# --- cross-validation -------------------------------------------------------------------------


# Settings that joined HeadConfig after the first records: left out of the id's text at their
# defaults, so that those records keep their ids.
LATE_FIELDS = ("faces", "comp", "buckets", "rank", "xgate")


def config_id(cfg: HeadConfig, sets: dict[str, float], backbone: str, folds: int) -> str:
    text = repr(cfg)
    for f in fields(HeadConfig):
        value = getattr(cfg, f.name)
        if f.name in LATE_FIELDS and value == f.default:
            text = text.replace(f", {f.name}={value!r}", "")
    text = json.dumps([text, sorted(sets.items()), backbone, folds])
    return hashlib.sha1(text.encode()).hexdigest()[:10]


# A fold's fitted model as what scoring needs: (set name, image indices) -> each image's map.
MapsOf = Callable[[str, list[int]], dict[int, F32]]


@dataclass
class FoldModel:
    """A fold's heat maps and, for a head with composition maps, those ([buckets, COMP_MAPS,
    h, w] per image)."""

    maps: MapsOf
    comps: MapsOf | None = None


FitFold = Callable[[list[FitSet], int], MapsOf | FoldModel]


def cross_validate(
    runs: dict[str, SetRun], folds: int, fit_fold: FitFold, maps_out: dict[str, F32] | None = None
) -> dict[str, F64]:
    """Per set, every image's score from a model `fit_fold` fitted without it (the sets not
    fitted on: the mean over the folds' models). With `maps_out`, every fit-set image's
    held-out map is put there under training.data.heldout_key (what bench/quality.py and
    training/tune.py read)."""
    kernel = KernelSettings()
    out = {n: np.zeros(len(r.eval_set.items)) for n, r in runs.items()}
    for f in range(folds):
        t0 = time.perf_counter()
        parts = [replace(r.fit, images=np.flatnonzero(r.fold != f))
                 for r in runs.values() if r.fit is not None]  # fmt: skip
        model = fit_fold(parts, f)
        if not isinstance(model, FoldModel):
            model = FoldModel(model)
        for n, r in runs.items():
            held = (np.flatnonzero(r.fold == f) if r.fit is not None
                    else np.arange(len(r.eval_set.items)))  # fmt: skip
            maps = model.maps(n, held.tolist())
            comps = model.comps(n, held.tolist()) if model.comps is not None else None
            scores = score_maps(r, maps, kernel, comps)
            if r.fit is not None:
                out[n][held] = scores
                if maps_out is not None:
                    for i, heat in maps.items():
                        maps_out[heldout_key(r.eval_set.items[i].path)] = heat
            else:
                out[n] += scores / folds
        print(f"  fold {f + 1}/{folds}: {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    return out


def head_fold(runs: dict[str, SetRun], cfg: HeadConfig) -> FitFold:
    """fit_fold for cross_validate: the read-out head on frozen features."""

    def fit_fold(parts: list[FitSet], fold: int) -> FoldModel:
        head = fit(parts, cfg)
        return FoldModel(
            lambda name, images: heat_maps(head, runs[name].cells, images),
            (lambda name, images: comp_maps_of(head, runs[name].cells, images))
            if cfg.comp else None,
        )  # fmt: skip

    return fit_fold


def save_record(record: dict[str, object], runs: dict[str, SetRun],
                scores: dict[str, F64]) -> Path:  # fmt: skip
    """A run's record (`record` + when, every image's score, the folds) in SCORES."""
    record = {
        **record,
        "when": f"{datetime.now(UTC):%Y-%m-%d %H:%M}",
        "scores": {n: s.tolist() for n, s in scores.items()},
        "fold": {n: r.fold.tolist() for n, r in runs.items()},
    }
    path = SCORES / f"{record['id']}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record))
    return path


def share(scores: F64, refs: tuple[F64, F64, F64], idx: npt.NDArray[np.int64] | None = None,
          viewers: bool = False) -> float:  # fmt: skip
    centre, oracle, view = refs
    sel = slice(None) if idx is None else idx
    top = view if viewers else oracle
    return float((scores[sel].mean() - centre[sel].mean()) / (top[sel].mean() - centre[sel].mean()))


# The bootstrap over photos: draws and seed fixed, so a report says the same on every run.
DRAWS = 2000
SEED = 0


def resamples(n: int, draws: int = DRAWS, seed: int = SEED) -> npt.NDArray[np.int64]:
    """[draws, n] photo indices drawn with replacement (a photo's aspects stay together: its
    score is already their mean)."""
    return np.random.default_rng(seed).integers(0, n, (draws, n))


def share_interval(scores: F64, refs: tuple[F64, F64, F64],
                   viewers: bool = False) -> tuple[float, float]:  # fmt: skip
    """95 % bootstrap interval of `share` over the photos."""
    centre, oracle, view = refs
    top = view if viewers else oracle
    idx = resamples(len(scores))
    c = centre[idx].mean(1)
    boot = (scores[idx].mean(1) - c) / (top[idx].mean(1) - c)
    lo, hi = np.percentile(boot, [2.5, 97.5])
    return float(lo), float(hi)


def objective(shares: Sequence[float]) -> float:
    s = np.array(shares)
    return float(s.mean() + PENALTY * np.minimum(s, 0.0).sum())


def run_cv(args: argparse.Namespace) -> int:
    sets = parse_sets(args.sets)
    torch.set_num_threads(args.threads)
    for spec in args.config:
        cfg = parse_config(spec)
        cid = config_id(cfg, sets, args.backbone, args.folds)
        path = SCORES / f"{cid}.json"
        if path.exists() and not args.force and not args.save_heldout:
            print(f"{cid} cached: {path}", file=sys.stderr)
            continue
        t0 = time.perf_counter()
        runs = load_runs(args.eval_dir, sets, args.backbone, args.folds, cfg.window > 0,
                         cfg.faces, cfg.rank > 0)  # fmt: skip
        print(f"{cid} {args.backbone} {cfg.label()} on {sets}", file=sys.stderr)
        maps: dict[str, F32] | None = {} if args.save_heldout else None
        scores = cross_validate(runs, args.folds, head_fold(runs, cfg), maps)
        if maps is not None:
            target = heldout_path(feature_key(args.model_dir))
            target.parent.mkdir(parents=True, exist_ok=True)
            np.savez_compressed(target, **maps)  # type: ignore[arg-type]
            print(f"held-out maps of {len(maps)} images: {target}", file=sys.stderr)
        shares = {n: share(scores[n], runs[n].refs) for n in runs}
        seconds = round(time.perf_counter() - t0)
        save_record({"id": cid, "name": args.name or cfg.label(), "config": spec,
                     "label": cfg.label(), "backbone": args.backbone, "sets": sets,
                     "folds": args.folds, "seconds": seconds}, runs, scores)  # fmt: skip
        print(f"{cid} " + " ".join(f"{n} {v:+.1%}" for n, v in shares.items())
              + f" ({seconds} s)")  # fmt: skip
    return 0


# --- selection and report ---------------------------------------------------------------------

FIT_KINDS = ("fcdb_train", "food_dev", "saliency_dev", "osie_train", "crowd_train")
SALIENCY = ("saliency_dev", "osie_train", "crowd_train")


def load_records(ids: Sequence[str] | None = None) -> list[dict[str, object]]:
    recs = [json.loads(p.read_text()) for p in sorted(SCORES.glob("*.json"))]
    if ids:
        recs = [r for r in recs if r["id"] in ids]
    return sorted(recs, key=lambda r: str(r["when"]))


def nested(recs: Sequence[dict], refs: dict[str, tuple[F64, F64, F64]],
           sets: Sequence[str]) -> tuple[dict[str, float], list[str]]:  # fmt: skip
    """Per outer fold: the candidate with the best objective on the other folds' held-out
    scores; its scores on this fold. Returns the pooled shares and the choice per fold."""
    folds = int(recs[0]["folds"])
    fold = {n: np.array(recs[0]["fold"][n]) for n in sets}
    chosen_scores = {n: np.zeros(len(fold[n])) for n in sets}
    choices = []
    for f in range(folds):
        best, best_value = None, -np.inf
        for r in recs:
            rest = {n: np.flatnonzero(fold[n] != f) for n in sets}
            value = objective([share(np.array(r["scores"][n]), refs[n], rest[n]) for n in sets])
            if value > best_value:
                best, best_value = r, value
        assert best is not None
        choices.append(str(best["name"]))
        for n in sets:
            held = np.flatnonzero(fold[n] == f)
            chosen_scores[n][held] = np.array(best["scores"][n])[held]
    return {n: share(chosen_scores[n], refs[n]) for n in sets}, choices


def run_select(args: argparse.Namespace) -> int:
    recs = load_records(args.ids.split(",") if args.ids else None)
    names = sorted({n for r in recs for n in r["scores"]}, key=lambda n: (
        FIT_KINDS.index(n) if n in FIT_KINDS else 99, n))  # fmt: skip
    refs = {n: references(load_set(args.eval_dir, n)) for n in names}
    lines = [
        "| candidate | backbone | fit sets (weights) | "
        + " | ".join(f"{n} ({len(refs[n][0])})" for n in names)
        + " | objective | time |",
        "|---|---|---|" + "---:|" * (len(names) + 2),
    ]  # fmt: skip
    for r in recs:
        cells = []
        for n in names:
            if n not in r["scores"]:
                cells.append("")
                continue
            s = np.array(r["scores"][n])
            lo, hi = share_interval(s, refs[n])
            text = f"{share(s, refs[n]):+.0%} [{lo:+.0%}..{hi:+.0%}]"
            if n in r.get("fitted_on", []):
                text += " (in-sample)"
            if n in SALIENCY:
                text += f" ({share(s, refs[n], viewers=True):+.0%} v)"
            cells.append(text)
        [n for n in FIT_KINDS if n in r["sets"]]
        obj = objective([share(np.array(r["scores"][n]), refs[n]) for n in FIT_KINDS
                         if n in r["scores"]])  # fmt: skip
        weights = ", ".join(f"{n} {w:g}" for n, w in r["sets"].items())
        lines.append(f"| {r['name']} | {r['backbone']} | {weights} | " + " | ".join(cells)
                     + f" | {obj:+.1%} | {r['seconds']} s |")  # fmt: skip
    commands = ["", "Commands of the rows:", ""]
    for r in recs:
        if r.get("command"):
            cmd = str(r["command"])
        elif r["config"]:
            sets = ",".join(f"{n}={w:g}" for n, w in r["sets"].items())
            cmd = (f"python -m training.fit_head cv --backbone {r['backbone']} --sets {sets} "
                   f"--config {r['config']}")  # fmt: skip
        else:
            cmd = "python -m training.fit_head shipped --weights <file> --fitted-on " + ",".join(
                r.get("fitted_on", [])
            )
        commands.append(f"- {r['name']}: `{cmd}`")
    text = "\n".join(lines)
    pool = [r for r in recs if all(n in r["sets"] for n in FIT_KINDS)]
    if args.nested:
        pool = [r for r in pool if r["id"] in args.nested.split(",")]
    nested_text = ""
    if pool:
        shares, choices = nested(pool, refs, [n for n in FIT_KINDS])
        nested_text = (
            f"\n\nNested estimate, choosing among {len(pool)} candidates fitted on all five sets "
            "by the objective on the other folds' held-out scores, scored on each fold: "
            + ", ".join(f"{n} {v:+.0%}" for n, v in shares.items())
            + f"; objective {objective(list(shares.values())):+.1%}; chosen per fold: "
            + "; ".join(choices)
            + "."
        )
    centre_oracle = ", ".join(
        f"{n} {refs[n][0].mean():.3f} → {refs[n][1].mean():.3f}"
        + (f" (viewers {np.nanmean(refs[n][2]):.3f})" if n in SALIENCY else "")
        for n in names
    )
    doc = "\n".join([
        f"# read-out heads, cross-validated ({datetime.now(UTC):%Y-%m-%d %H:%M} UTC)",
        "",
        "`python -m training.fit_head cv ...` per row, then `python -m training.fit_head select`. "
        "Share of the centre → oracle headroom of each set's primary metric (fcdb IoU, food "
        "area kept, fixations kept), every image scored by a head fitted without it (5-fold, "
        "folds by photo, every set in every fold; fcdb_dev is never fitted on and is scored "
        "by every fold's head, averaged), through the service's `learned` profile and default "
        "search settings. For fixations, \"v\": the share of the other viewers' gain (each "
        "viewer scored on the window all the others choose). Objective: mean share over the "
        f"five fit sets + {PENALTY:g} × the sum of the negative ones. In brackets: the 95 % "
        f"bootstrap interval of the share over photos ({DRAWS} draws, seed {SEED}); beside each "
        "set's name, its number of photos.",
        "",
        f"Centre → oracle: {centre_oracle}.",
        "",
        text + nested_text,
        *commands,
        "",
    ])  # fmt: skip
    publish(doc, args.report)
    return 0


@dataclass(frozen=True)
class Paired:
    """A paired per-photo difference in points of a set's headroom: its mean, 1.96 standard
    errors, the 95 % bootstrap interval over photos and the number of photos."""

    mean: float
    half: float
    lo: float
    hi: float
    n: int

    def clear(self) -> bool:
        """Whether the interval leaves out zero."""
        return self.lo > 0 or self.hi < 0


def paired(a: dict, b: dict, refs: dict[str, tuple[F64, F64, F64]]) -> dict[str, Paired]:
    """Per set both records scored: the mean per-photo difference of record `a` minus `b`, in
    points of the set's centre -> oracle headroom, with 1.96 standard errors and the 95 %
    bootstrap interval of its mean (photos resampled)."""
    out = {}
    for n in a["scores"]:
        if n not in b["scores"]:
            continue
        centre, oracle, _ = refs[n]
        d = 100 * (np.array(a["scores"][n]) - np.array(b["scores"][n])) / (oracle - centre).mean()
        lo, hi = np.percentile(d[resamples(len(d))].mean(1), [2.5, 97.5])
        out[n] = Paired(float(d.mean()), float(1.96 * d.std(ddof=1) / np.sqrt(len(d))),
                        float(lo), float(hi), len(d))  # fmt: skip
    return out


def run_compare(args: argparse.Namespace) -> int:
    ids = args.ids.split(",")
    by_id = {r["id"]: r for r in load_records(ids)}
    if len(ids) != 2 or any(i not in by_id for i in ids):
        raise SystemExit(f"compare needs --ids A,B of two score records in {SCORES}")
    a, b = by_id[ids[0]], by_id[ids[1]]
    refs = {n: references(load_set(args.eval_dir, n)) for n in a["scores"] if n in b["scores"]}
    print(f"{a['name']} minus {b['name']}, per photo, points of the headroom (± 1.96 SE; 95 % "
          f"bootstrap interval over photos, {DRAWS} draws, seed {SEED}; *: not 0):")  # fmt: skip
    for n, p in paired(a, b, refs).items():
        mark = " *" if p.clear() else ""
        print(f"  {n}: {p.mean:+.1f} ± {p.half:.1f} [{p.lo:+.1f} .. {p.hi:+.1f}], "
              f"{p.n} photos{mark}")  # fmt: skip
    return 0


def run_ship(args: argparse.Namespace) -> int:
    sets = parse_sets(args.sets)
    cfg = parse_config(args.config[0])
    torch.set_num_threads(args.threads)
    runs = load_runs(args.eval_dir, sets, args.backbone, 1, cfg.window > 0, cfg.faces,
                     cfg.rank > 0)  # fmt: skip
    parts = [replace(r.fit, images=np.arange(len(r.eval_set.items)))
             for r in runs.values() if r.fit is not None]  # fmt: skip
    head = fit(parts, cfg)
    weights = export_weights(head)
    grid = BACKBONES[args.backbone].grid if args.backbone in BACKBONES else 32
    if grid != 32:  # engines/readout.grid_of: the graph builds the read-out on this grid
        weights["grid"] = np.array(grid, dtype=np.int64)  # type: ignore[assignment]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    np.savez(args.out, **weights)  # type: ignore[arg-type]
    print(f"{args.out}: {cfg.label()} on {sets} ({args.backbone}); "
          + ", ".join(f"{k} {v.shape}" for k, v in weights.items()))  # fmt: skip
    return 0


def run_shipped(args: argparse.Namespace) -> int:
    """Score a weights file as it is (no fitting): held-out only on sets it was not fitted
    on. A record like cv's, with `fitted_on` naming the sets where it is in-sample."""
    weights = load_weights(args.weights)
    fitted_on = [n for n in args.fitted_on.split(",") if n]
    runs = load_runs(args.eval_dir, {}, args.backbone, args.folds, False)
    kernel = KernelSettings()
    scores = {}
    for n, r in runs.items():
        maps = {}
        for i in range(len(r.eval_set.items)):
            h, w = (int(v) for v in r.cells.shapes[i])
            z = head_logits(weights, r.cells.features[r.cells.rows(i)], (h, w),
                            float(r.cells.food_mass[i]))  # fmt: skip
            maps[i] = np.exp(z - z.max()).astype(np.float32)
        scores[n] = score_maps(r, maps, kernel)
    digest = hashlib.sha1(args.weights.read_bytes()).hexdigest()[:10]
    save_record({"id": f"file-{digest}", "name": args.name or f"{args.weights} as shipped",
                 "config": "", "label": "", "backbone": args.backbone, "sets": {},
                 "fitted_on": fitted_on, "folds": args.folds, "seconds": 0},
                runs, scores)  # fmt: skip
    print(" ".join(f"{n} {share(scores[n], runs[n].refs):+.1%}" for n in runs))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("command", choices=("cv", "select", "ship", "shipped", "compare"))
    ap.add_argument("--eval-dir", default="../shared/eval")
    ap.add_argument("--sets", default=DEFAULT_SETS, help="SET=WEIGHT,... (fit sets)")
    ap.add_argument("--backbone", default="lite0", choices=(*BACKBONES, "both"))
    ap.add_argument("--config", action="append", default=[], help="head settings (HeadConfig)")
    ap.add_argument("--name", default="", help="the row's name in the report")
    ap.add_argument("--folds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--force", action="store_true")
    ap.add_argument(
        "--save-heldout", action="store_true",
        help="cv: write the fit sets' held-out maps where bench.quality and training.tune "
        "read them (build/readout/heldout-<backbone key>.npz); for the shipped configuration",
    )  # fmt: skip
    ap.add_argument("--model-dir", type=Path, default=Path("build/model"))
    ap.add_argument("--ids", default="", help="select: only these score records; compare: A,B")
    ap.add_argument("--nested", default="", help="select: the candidates of the nested choice")
    ap.add_argument("--report", type=Path, default=None)
    ap.add_argument("--out", type=Path, default=WEIGHTS_PATH)
    ap.add_argument("--weights", type=Path, default=WEIGHTS_PATH, help="shipped: the file")
    ap.add_argument("--fitted-on", default="", help="shipped: sets the file was fitted on")
    args = ap.parse_args(argv)
    if args.command == "shipped":
        return run_shipped(args)
    if args.command == "cv":
        return run_cv(args)
    if args.command == "select":
        return run_select(args)
    if args.command == "compare":
        return run_compare(args)
    if not args.config:
        ap.error("ship needs --config")
    return run_ship(args)


if __name__ == "__main__":
    raise SystemExit(main())
