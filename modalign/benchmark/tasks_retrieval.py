"""Retrieval and zero-shot tasks: per-query figures through ``retrieval.metrics``."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Annotated, Any

import numpy as np
import torch

from modalign.benchmark.figures import bootstrap_mean
from modalign.benchmark.task_registry import TASKS, Task, fmt_figure
from modalign.core.config_io import AT_LEAST_1
from modalign.finetune.embedded import fused_embedding
from modalign.finetune.pseudo.algorithms import class_prompt_embeddings
from modalign.report import table
from modalign.retrieval.evaluate import Level, positive_groups
from modalign.retrieval.metrics import query_ranks

__all__ = ["RetrievalOptions", "ZeroShotOptions", "per_query_metrics"]


@dataclass(frozen=True)
class RetrievalOptions:
    level: str = "auto"  # auto | class | instance (as `evaluate retrieval --level`)
    ks: list[Annotated[int, AT_LEAST_1]] = field(default_factory=lambda: [1, 5, 10])


def per_query_metrics(
    q: np.ndarray, g: np.ndarray, qg: np.ndarray, gg: np.ndarray, ks: list[int]
) -> dict[str, np.ndarray]:
    """``recall@k`` (0/1) and AP per query, in query order, from one ranking of all queries
    (:func:`~modalign.retrieval.metrics.query_ranks`, the ranking ``retrieval_metrics`` averages).

    Queries without a positive in the gallery are left out (as the aggregate skips them).
    """
    r = query_ranks(q, g, qg, gg)
    out = {f"recall@{k}": r.recall_at(k) for k in ks}
    out["map"] = r.ap
    return out


def run_retrieval(ctx: Any, opts: RetrievalOptions) -> dict[str, Any]:
    emb = ctx.retrieval_embeddings()
    level: Level = opts.level  # type: ignore[assignment]
    groups, used = positive_groups(emb, level)
    mods = sorted(emb)
    pairs: dict[str, Any] = {}
    for qm in mods:
        for gm in mods:
            if qm == gm:
                continue
            per = per_query_metrics(
                emb[qm].vectors, emb[gm].vectors, groups[qm], groups[gm], list(opts.ks)
            )
            if not len(per["map"]):
                continue
            pairs[f"{qm}->{gm}"] = {
                k: bootstrap_mean(v, ctx.seed, ctx.resamples).to_dict() for k, v in per.items()
            }
    return {"level": used, "pairs": pairs, "examples": _examples(emb)}


def _examples(emb: dict[str, Any], queries: int = 4, k: int = 5) -> list[dict[str, Any]]:
    """Top-``k`` image hits of the first few queries of every other modality (for the grid)."""
    if "image" not in emb:
        return []
    g = emb["image"]
    out = []
    for qm in sorted(m for m in emb if m != "image"):
        q = emb[qm]
        step = max(1, len(q) // queries)
        for i in list(range(0, len(q), step))[:queries]:
            top = np.argsort(-(g.vectors @ q.vectors[i]), kind="stable")[:k]
            hits = [{"value": g.values[j] if g.values else "", "label": g.labels[j]} for j in top]
            out.append({"modality": qm, "label": q.labels[i], "hits": hits})
    return out


def _retrieval_plot(r: dict[str, Any], png: Any) -> Any:
    from modalign.benchmark.plots import retrieval_grid_png

    return retrieval_grid_png(r.get("examples", []), png)


def _retrieval_md(r: dict[str, Any]) -> str:
    keys = list(dict.fromkeys(k for m in r["pairs"].values() for k in m))
    rows = [
        [pair, *(fmt_figure(m.get(k)) for k in keys), next(iter(m.values()))["n"]]
        for pair, m in sorted(r["pairs"].items())
    ]
    return f"Level: {r['level']}.\n\n" + table(["pair", *keys, "queries"], rows)


def _retrieval_headline(r: dict[str, Any]) -> dict[str, float]:
    vals = [m["recall@1"]["value"] for m in r["pairs"].values() if "recall@1" in m]
    return {"retrieval R@1 (mean)": float(np.mean(vals))} if vals else {}


TASKS.add(
    "retrieval",
    Task(run_retrieval, _retrieval_md, _retrieval_headline, _retrieval_plot),
    RetrievalOptions,
)


@dataclass(frozen=True)
class ZeroShotOptions:
    prompts: list[str] = field(default_factory=lambda: ["{}", "a photo of {}", "the word {}"])
    text_modality: str = "text"


def run_zero_shot(ctx: Any, opts: ZeroShotOptions) -> dict[str, Any]:
    if opts.text_modality not in ctx.model.modalities:
        return {"skipped": f"the model has no {opts.text_modality!r} tower", "accuracy": {}}
    test, names = ctx.labeled("test")
    classes = class_prompt_embeddings(
        lambda p: ctx.model.encode(**{opts.text_modality: p})[opts.text_modality],
        names,
        list(opts.prompts),
    )
    acc: dict[str, Any] = {}
    views = {m: (test.x[m], test.present[m]) for m in test.x}
    views["fused"] = (fused_embedding(test), torch.stack(list(test.present.values())).any(0))
    for name, (x, present) in views.items():
        rows = present & (test.y >= 0)
        correct = ((x[rows] @ classes.T).argmax(1) == test.y[rows]).float().numpy()
        acc[name] = bootstrap_mean(correct, ctx.seed, ctx.resamples).to_dict()
    return {"accuracy": acc, "prompts": list(opts.prompts)}


def _zero_shot_md(r: dict[str, Any]) -> str:
    if r.get("skipped"):
        return f"skipped: {r['skipped']}"
    rows = [[m, fmt_figure(f), f["n"]] for m, f in r["accuracy"].items()]
    return table(["input", "accuracy [95% CI]", "n"], rows)


def _zero_shot_headline(r: dict[str, Any]) -> dict[str, float]:
    f = r.get("accuracy", {}).get("fused")
    return {"zero-shot acc": f["value"]} if f else {}


TASKS.add("zero_shot", Task(run_zero_shot, _zero_shot_md, _zero_shot_headline), ZeroShotOptions)
