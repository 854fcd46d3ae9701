"""Pretraining configs compared on a test split: e.g. a `modalign tune --stage pretrain` study's
base config against its best.yaml, each pretrained with several seeds.

For every seed (``train.seed``) each config is pretrained into ``OUT/NAME/seedS`` (a finished
run is reused: rerunning the script only evaluates), then the test manifest is embedded and
scored per query with modalign's own ranking (:func:`modalign.retrieval.metrics.query_ranks`,
pessimistic ties):

* instance-level text->image and image->text R@1 / R@10 (the one matching item among all test
  items; the icon suite's retrieval figure);
* class-level R@1 averaged over both directions when every test item has a label (what a
  pretrain study maximises on ``data.val``).

Each figure is printed with n (queries x seeds) and, against ``--baseline``, the paired
difference with two 95% intervals: a bootstrap over test queries (each query's hit averaged
over the seeds) and a t interval over the seeds' mean differences. The test split is read
only here, never by the study.

    modalign tune icons-lit.yaml --stage pretrain --budget 50m --study study
    python scripts/bench_tune_pretrain.py --config base=icons-lit.yaml \\
        --config tuned=study/best.yaml --baseline base --test icons/test.jsonl \\
        --seeds 3 --out runs/tuned-vs-base
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import numpy as np


def train(config: str, out: Path, seed: int, sets: list[str]) -> Path:
    """Pretrain ``config`` with ``train.seed=seed`` into ``out`` (kept when already finished)."""
    from modalign.cli import main

    if not (out / "model.safetensors").is_file():
        argv = ["-q", "pretrain", config, "--set", f"train.seed={seed}", f"output.dir={out}",
                "train.val_every=0", "train.keep_best=", "train.early_stop=0", *sets]  # fmt: skip
        if main(argv) != 0:
            raise SystemExit(f"pretraining {config} (seed {seed}) failed; see the log above")
    return out


def query_hits(model_dir: Path, test: Path) -> dict[str, np.ndarray]:
    """Per-query 0/1 hits on ``test``: instance-level R@1/R@10 both ways, class-level R@1."""
    from modalign.pretrain.bundle import load_bundle
    from modalign.retrieval.embed import embed_source
    from modalign.retrieval.evaluate import positive_groups
    from modalign.retrieval.metrics import query_ranks

    emb, bad = embed_source(load_bundle(model_dir), test)
    if bad.total:  # a skipped test item would change n and unpair the configs
        raise SystemExit(f"{test}: {bad.summary()}")
    out: dict[str, np.ndarray] = {}
    groups, _ = positive_groups(emb, "instance")
    for q, g in (("text", "image"), ("image", "text")):
        r = query_ranks(emb[q].vectors, emb[g].vectors, groups[q], groups[g])
        out[f"{q}->{g} R@1"], out[f"{q}->{g} R@10"] = r.recall_at(1), r.recall_at(10)
    if all(lab is not None for lab in emb["image"].labels):  # categories: class level too
        groups, _ = positive_groups(emb, "class")
        out["class R@1 (both ways)"] = np.concatenate([
            query_ranks(emb[q].vectors, emb[g].vectors, groups[q], groups[g]).recall_at(1)
            for q, g in (("text", "image"), ("image", "text"))
        ])  # fmt: skip
    return out


def paired(a: np.ndarray, b: np.ndarray, n_boot: int = 2000) -> tuple[float, list, list]:
    """(seeds, queries) hits of two configs: mean difference, bootstrap over queries of the
    seed-averaged difference (the benchmark's percentile bootstrap), t interval over the
    per-seed differences."""
    from scipy import stats

    from modalign.benchmark.figures import bootstrap

    diff = a - b
    per_query = diff.mean(axis=0)
    fig = bootstrap(lambda idx: float(per_query[idx].mean()), len(per_query), resamples=n_boot)
    seeds = diff.mean(axis=1)
    if len(seeds) > 1:
        half = float(stats.t.ppf(0.975, len(seeds) - 1) * seeds.std(ddof=1) / math.sqrt(len(seeds)))
        seed_ci = [float(seeds.mean() - half), float(seeds.mean() + half)]
    else:
        seed_ci = [float("nan"), float("nan")]
    return float(diff.mean()), [fig.ci_low, fig.ci_high], seed_ci


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", action="append", required=True, help="NAME=CONFIG (repeat)")
    p.add_argument("--baseline", required=True, help="the NAME the others are paired with")
    p.add_argument("--test", type=Path, required=True, help="test manifest (never tuned on)")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--set", nargs="*", default=[], help="overrides for every config")
    p.add_argument("--json", type=Path, default=None, help="write the figures here too")
    args = p.parse_args()
    configs = dict(spec.split("=", 1) for spec in args.config)
    if args.baseline not in configs:
        raise SystemExit(f"--baseline {args.baseline!r} is not one of {sorted(configs)}")
    hits: dict[str, dict[str, list[np.ndarray]]] = {name: {} for name in configs}
    for seed in range(args.seeds):
        for name, config in configs.items():
            run = train(config, args.out / name / f"seed{seed}", seed, list(args.set))
            for key, h in query_hits(run, args.test).items():
                hits[name].setdefault(key, []).append(h)
            print(f"seed {seed} {name}: " + ", ".join(
                f"{k} {np.mean(v[-1]):.3f}" for k, v in hits[name].items()), flush=True)  # fmt: skip
    rows = []
    base = hits[args.baseline]
    for name, by_key in hits.items():
        for key, per_seed in by_key.items():
            a, b = np.stack(per_seed), np.stack(base[key])
            d, items, seed_ci = paired(a, b)
            rows.append({
                "config": name, "figure": key, "value": float(a.mean()),
                "per_seed": [float(v) for v in a.mean(axis=1)], "vs": args.baseline,
                "difference": d, "ci_queries": items, "ci_seeds": seed_ci,
                "n": f"{a.shape[1]} queries x {a.shape[0]} seeds",
            })  # fmt: skip
    print(f"| config | figure | value | vs {args.baseline} [95% CI queries] | [CI seeds] | n |")
    print("|---|---|---:|---|---|---|")
    for r in rows:
        lo, hi = r["ci_queries"]
        slo, shi = r["ci_seeds"]
        print(f"| {r['config']} | {r['figure']} | {r['value']:.3f} | {r['difference']:+.3f} "
              f"[{lo:+.3f}, {hi:+.3f}] | [{slo:+.3f}, {shi:+.3f}] | {r['n']} |")  # fmt: skip
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
