"""Variants of the default recipe on tuning draws: which change would close the gap to the seed recipe?

Tuning draws are the regimes of heads_regimes.py drawn with other seeds (100, 101 by default), never
the seeds 0-2 that the regime table reports. Each variant is the default recipe with members added or
replaced, or its ensemble configured like the seed's. A member is trained once per data set and
shared by every variant that has it (a pool keyed by the member's config), so adding a variant only
costs its new members and an ensemble fit. Scores are on each draw's test split; the table gives each
variant's margin over the default, per size, mean ± std over the draws.
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

import heads_regimes as hr
import numpy as np

from geoscout.heads.configio import config_to_dict
from geoscout.heads.fusion import FusionConfig
from geoscout.heads.members import MemberSpec
from geoscout.heads.presets import Recipe, default_classifier, recipe, seed_clip_classifier, seed_convnext_classifier
from geoscout.stages import HeadPaths, StoreData, evaluate_stage, fit_ensemble_stage, train_members_stage

B = hr.BACKBONES


def _concat_classifier():
    # The default classifier with the four views side by side instead of attention pooling.
    return dataclasses.replace(default_classifier(), fusion=FusionConfig(kind="concat", width=None, input_norm=False))


def variant(name: str) -> Recipe:
    """The recipe of one variant (the tiny backbones in heads_regimes.py's order)."""
    base, seed = recipe("default", B), recipe("seed", B)
    d = base.members
    members = {
        "default": d,
        "plus-seed-tf": d + [MemberSpec("classifier", (B[0],), seed_clip_classifier(), "tf")],
        "plus-seed-concat": d + [MemberSpec("classifier", (B[1],), seed_convnext_classifier(), "cat")],
        "plus-seed-both": d + [MemberSpec("classifier", (B[0],), seed_clip_classifier(), "tf"),
                               MemberSpec("classifier", (B[1],), seed_convnext_classifier(), "cat")],
        "concat-2nd": [d[0], MemberSpec("classifier", (B[1],), _concat_classifier(), "cat512"), d[2]],
        "concat-both": [MemberSpec("classifier", (b,), _concat_classifier(), "cat512") for b in B] + [d[2]],
        "plus-concat": d + [MemberSpec("classifier", (b,), _concat_classifier(), "cat512") for b in B],
        # One classifier over both backbones' views side by side (about the two classifiers' cost together).
        "joint": [MemberSpec("classifier", tuple(B), default_classifier()), d[2]],
        "plus-joint": d + [MemberSpec("classifier", tuple(B), default_classifier())],
    }
    if name == "seed":
        return seed
    if name in members:
        return Recipe(name, members[name], base.ensemble, base.regressor, base.folds)
    # The default's members under the seed's ensemble: fixed 0.6 / 0.4 (the probe 0), no temperatures,
    # the regressor always on, anchored on the predicted cell, no retrieval.
    if name == "seed-ensemble":
        ens = dataclasses.replace(seed.ensemble, fixed_weights=(0.6, 0.4, 0.0))
        return Recipe(name, d, ens, seed.regressor, base.folds)
    if name == "no-temperature":  # fitted weights, every temperature 1
        return Recipe(name, d, dataclasses.replace(base.ensemble, temperature=False), base.regressor, base.folds)
    if name == "seed-decoding":  # the seed's regressor and decoding, the default's fitted weights and temperatures
        ens = dataclasses.replace(base.ensemble, regressor="on", decode=seed.ensemble.decode)
        return Recipe(name, d, ens, seed.regressor, base.folds)
    raise SystemExit(f"unknown variant {name!r}; available: seed, {', '.join(members)}, seed-ensemble, "
                     "no-temperature, seed-decoding")


VARIANTS = ("seed", "plus-seed-tf", "plus-seed-concat", "plus-seed-both", "concat-2nd", "concat-both", "plus-concat",
            "joint", "plus-joint", "seed-ensemble", "no-temperature", "seed-decoding")


def _member_key(m: MemberSpec) -> str:
    return hr.digest({"k": m.kind, "b": m.backbones, "l": m.label, "c": config_to_dict(m.config)})[:8]


def run_variant(root: Path, data: StoreData, plan: Recipe, seed: int) -> dict:
    """Train the variant's members into the data set's pool (once), link them, fit and score its ensemble."""
    for m in plan.members:
        pool = HeadPaths(root / "pool", _member_key(m))
        if m.name not in pool.trained_members():
            one = Recipe(m.name, [m], plan.ensemble, plan.regressor, plan.folds)
            train_members_stage(data, pool, one, device="cpu", seed=seed, progress=False)
    heads = HeadPaths(root / "variants", hr.digest(plan.key()))
    heads.folder.mkdir(parents=True, exist_ok=True)
    for m in plan.members:
        link = heads.member(m.name)
        if not link.exists():
            link.symlink_to(HeadPaths(root / "pool", _member_key(m)).member(m.name))
    fit_ensemble_stage(data, heads, plan, device="cpu", seed=seed, progress=False)
    return evaluate_stage(data, heads, plan, device="cpu", seed=seed, split="test").metrics


def run(cache: Path, *, regimes: list[str], sizes: list[str], seeds: list[int], variants: list[str], log=print) -> list[dict]:
    results_path = cache / "variants.jsonl"
    done = {}
    if results_path.exists():
        for line in results_path.read_text().splitlines():
            row = json.loads(line)
            done[(row["data"], row["variant"], row["digest"])] = row
    rows = []
    for size in sizes:
        for seed in seeds:
            for name in regimes:
                store = hr.dataset(cache, hr.REGIMES[name], size, seed, log)
                data = StoreData(store, B)
                for v in ["default", *[v for v in variants if v != "default"]]:
                    plan = variant(v)
                    key = (store.parent.name, v, hr.digest(plan.key()))
                    if key not in done:
                        started = time.perf_counter()
                        metrics = run_variant(store.parent, data, plan, seed)
                        done[key] = dict(data=key[0], variant=v, digest=key[2], regime=name, size=size, seed=seed,
                                         test=metrics["ensemble"], seconds=time.perf_counter() - started)
                        with results_path.open("a") as f:
                            f.write(json.dumps(done[key], default=float) + "\n")
                        t = metrics["ensemble"]
                        log(f"  {name:<10} {size:<5} seed {seed}  {v:<16} score {t['score']:.4f}  top-1 "
                            f"{t['top1_accuracy']:.4f}  mean {t['mean_km']:5.0f} km  ({done[key]['seconds']:.0f} s)")
                    rows.append(done[key])
    return rows


def table(rows: list[dict], variants: list[str]) -> str:
    """Markdown: each variant's test score and mean km minus the default's, per size, over every draw."""
    by = {(r["regime"], r["size"], r["seed"], r["variant"]): r["test"] for r in rows}
    lines = ["| variant | size | draws | score − default: mean ± std | min / max | mean km − default |",
             "| --- | --- | ---: | --- | --- | ---: |"]
    for v in variants:
        for size in dict.fromkeys(r["size"] for r in rows):
            pairs = [(t, by[k[:3] + ("default",)]) for k, t in by.items() if k[3] == v and k[1] == size]
            if not pairs:
                continue
            ds = np.array([t["score"] - d["score"] for t, d in pairs])
            dk = np.array([t["mean_km"] - d["mean_km"] for t, d in pairs])
            lines.append(f"| {v} | {size} | {len(ds)} | {ds.mean():+.4f} ± {ds.std():.4f} | {ds.min():+.4f} / {ds.max():+.4f} "
                         f"| {dk.mean():+.1f} |")
    return "\n".join(lines)
