"""Classification tasks: few-label heads (+/- pseudo-labels), from-scratch baseline,
missing-modality robustness and calibration of the fused classifier."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Annotated, Any

import numpy as np
import torch

from modalign.benchmark.figures import bootstrap, mean_of_seeds
from modalign.benchmark.task_registry import TASKS, Task, fmt_figure
from modalign.core.config_io import AT_LEAST_1, POSITIVE
from modalign.core.errors import UserInputError
from modalign.finetune.calibration import expected_calibration_error, reliability_bins
from modalign.finetune.evaluate import predict, subsets
from modalign.finetune.heads import HEADS
from modalign.report import table

__all__ = ["CalibrationOptions", "FewLabelOptions", "MissingOptions", "ScratchOptions"]


def _test_correct(ctx: Any, head: Any, drop: tuple[str, ...] = ()) -> np.ndarray:
    test, _ = ctx.labeled("test")
    rows = (test.y >= 0).nonzero().flatten()
    part = test.subset(rows)
    return (predict(head, part, drop).argmax(1) == part.y).float().numpy()


@dataclass(frozen=True)
class FewLabelOptions:
    shots: list[Annotated[int, AT_LEAST_1]] = field(default_factory=lambda: [1, 5, 10])
    heads: list[str] = field(default_factory=list)  # [] = every registered head
    # registered pseudo-labelers; "default" = the suite's finetune.pseudo_label (or
    # FinetuneConfig's default), reported as "NAME (default)"; a repeated labeler runs once
    pseudo_labels: list[str] = field(default_factory=lambda: ["none", "zero_shot"])
    seeds: Annotated[int, AT_LEAST_1] = (
        3  # training seeds (label draw + init); figures average over them
    )

    def __post_init__(self) -> None:
        from modalign.finetune.pseudo.labelers import PSEUDO_LABELERS

        for name in self.pseudo_labels:
            if name != "default":
                PSEUDO_LABELERS.get(name, "few_label.pseudo_labels")


def _pseudo_labelers(ctx: Any, names: list[str]) -> list[tuple[str, str]]:
    """``(labeler, row label)`` in order: ``default`` resolved, repeats dropped."""
    default = ctx.finetune_cfg().pseudo_label
    out: dict[str, str] = {}
    for name in names:
        used = default if name == "default" else name
        if name == "default" or (used == default and "default" in names):
            out[used] = f"{used} (default)"
        else:
            out.setdefault(used, used)
    return list(out.items())


def run_few_label(ctx: Any, opts: FewLabelOptions) -> dict[str, Any]:
    heads = list(opts.heads) or HEADS.names()
    rows = []
    for head in heads:
        for pl, shown in _pseudo_labelers(ctx, list(opts.pseudo_labels)):
            for k in opts.shots:
                per_seed = []
                for s in range(opts.seeds):
                    seed = ctx.seed + s
                    cfg = ctx.finetune_cfg(
                        head=head, pseudo_label=pl, labels_per_class=k, label_seed=seed, seed=seed
                    )
                    per_seed.append(_test_correct(ctx, ctx.train_few_label(cfg)))
                fig = mean_of_seeds(per_seed, ctx.seed).to_dict()
                fig["seeds"] = [float(p.mean()) for p in per_seed]
                rows.append({"head": head, "pseudo_label": shown, "shots": k, "accuracy": fig})
    return {"rows": rows}


def _few_label_md(r: dict[str, Any]) -> str:
    body = [
        [
            x["head"],
            x["pseudo_label"],
            x["shots"],
            fmt_figure(x["accuracy"]),
            " ".join(f"{v:.3f}" for v in x["accuracy"]["seeds"]),
            x["accuracy"]["n"],
        ]
        for x in r["rows"]
    ]
    return table(
        ["head", "pseudo-labels", "labels/class", "accuracy [95% CI]", "per seed", "n"], body
    )


def _few_label_headline(r: dict[str, Any]) -> dict[str, float]:
    out = {}
    for x in r["rows"]:
        if x["head"] == r["rows"][0]["head"]:
            out[f"{x['shots']}-shot {x['pseudo_label']}"] = x["accuracy"]["value"]
    return out


def _few_label_plot(r: dict[str, Any], png: Any) -> Any:
    from modalign.benchmark.plots import few_label_png

    return few_label_png(r["rows"], png)


TASKS.add(
    "few_label",
    Task(run_few_label, _few_label_md, _few_label_headline, _few_label_plot),
    FewLabelOptions,
)


@dataclass(frozen=True)
class ScratchOptions:
    shots: list[Annotated[int, AT_LEAST_1]] = field(default_factory=lambda: [5])
    epochs: Annotated[int, AT_LEAST_1] = 20
    lr: Annotated[float, POSITIVE] = 1e-3
    seeds: Annotated[int, AT_LEAST_1] = 1


def _manifest_rows(src: str, specs: Any) -> dict[str, Any]:
    from modalign.data.manifest import is_manifest, read_manifest

    if not is_manifest(src):
        raise UserInputError(f"{src}: the scratch baseline needs a manifest (not shards)")
    return {r.id: r for r in read_manifest(src, specs).rows}


def _scratch_one(ctx: Any, k: int, seed: int, opts: ScratchOptions) -> np.ndarray:
    from modalign.finetune.embedded import few_label_split
    from modalign.finetune.end_to_end import embed_with, train_end_to_end
    from modalign.finetune.fit import local_rng
    from modalign.pretrain.model import build_encoder

    specs = {m: s for m, s in ctx.model.modality_specs().items() if m in ctx.inputs}
    data, names = ctx.labeled("train")
    cfg = ctx.finetune_cfg(labels_per_class=k, label_seed=seed, seed=seed, pseudo_label="none")
    split = few_label_split(data.y, names, k, 0, seed)
    train_rows = _manifest_rows(ctx.corpus.train, specs)
    rows = [train_rows[data.ids[i]] for i in split.labeled.tolist()]
    with local_rng(seed):  # random init from a forked default generator, restored after
        model_cfg = ctx.model.cfg.model
        model_cfg = type(model_cfg)(**{**model_cfg.__dict__, "modalities": list(ctx.inputs)})
        encoder = build_encoder(model_cfg, ctx.model.cfg.data).encoder
    index = {c: i for i, c in enumerate(names)}
    head = train_end_to_end(encoder, rows, specs, index, cfg, opts.epochs, lr=opts.lr)
    test_rows = list(_manifest_rows(ctx.corpus.test, specs).values())
    test = embed_with(encoder, test_rows, specs, index, ctx.inputs)
    keep = (test.y >= 0).nonzero().flatten()
    part = test.subset(keep)
    return (predict(head, part).argmax(1) == part.y).float().numpy()


def run_scratch(ctx: Any, opts: ScratchOptions) -> dict[str, Any]:
    rows = []
    for k in opts.shots:
        per_seed = [_scratch_one(ctx, k, ctx.seed + s, opts) for s in range(opts.seeds)]
        fig = mean_of_seeds(per_seed, ctx.seed).to_dict()
        fig["seeds"] = [float(p.mean()) for p in per_seed]
        rows.append({"shots": k, "accuracy": fig})
    return {"rows": rows, "epochs": opts.epochs}


def _scratch_md(r: dict[str, Any]) -> str:
    body = [[x["shots"], fmt_figure(x["accuracy"]), x["accuracy"]["n"]] for x in r["rows"]]
    return "Labels only, towers trained from random init.\n\n" + table(
        ["labels/class", "accuracy [95% CI]", "n"], body
    )


def _scratch_headline(r: dict[str, Any]) -> dict[str, float]:
    return {f"{x['shots']}-shot scratch": x["accuracy"]["value"] for x in r["rows"]}


TASKS.add("scratch", Task(run_scratch, _scratch_md, _scratch_headline), ScratchOptions)


@dataclass(frozen=True)
class MissingOptions:
    pass


def run_missing(ctx: Any, opts: MissingOptions) -> dict[str, Any]:
    clf = ctx.reference_classifier()
    test, _ = ctx.labeled("test")
    out = {}
    for subset in subsets(clf.inputs):
        rows = torch.stack([test.present[m] for m in subset]).all(0) & (test.y >= 0)
        if not bool(rows.any()):
            continue
        part = test.subset(rows.nonzero().flatten())
        hidden = [m for m in test.x if m not in subset]
        correct = (predict(clf.head, part, hidden).argmax(1) == part.y).float().numpy()
        from modalign.benchmark.figures import bootstrap_mean

        out["+".join(subset)] = bootstrap_mean(correct, ctx.seed, ctx.resamples).to_dict()
    return {"by_subset": out, "classifier": _describe(clf.cfg)}


def _describe(cfg: Any) -> dict[str, Any]:
    return {
        "head": cfg.head.kind,
        "labels_per_class": cfg.labels_per_class,
        "pseudo_label": cfg.pseudo_label,
    }


def _missing_md(r: dict[str, Any]) -> str:
    c = r["classifier"]
    rows = [[s, fmt_figure(f), f["n"]] for s, f in r["by_subset"].items()]
    return (
        f"Classifier: head {c['head']}, {c['labels_per_class']} labels/class, pseudo-labels "
        f"{c['pseudo_label']}; other inputs hidden.\n\n"
        + table(["inputs present", "accuracy [95% CI]", "n"], rows)
    )


def _missing_headline(r: dict[str, Any]) -> dict[str, float]:
    vals = [f["value"] for f in r["by_subset"].values()]
    return {"acc (worst subset)": min(vals)} if vals else {}


TASKS.add("missing_modality", Task(run_missing, _missing_md, _missing_headline), MissingOptions)


@dataclass(frozen=True)
class CalibrationOptions:
    bins: Annotated[int, AT_LEAST_1] = 15


def run_calibration(ctx: Any, opts: CalibrationOptions) -> dict[str, Any]:
    clf = ctx.reference_classifier()
    test, _ = ctx.labeled("test")
    part = test.subset((test.y >= 0).nonzero().flatten())
    probs = predict(clf.head, part).softmax(1)
    conf, pred = probs.max(1)
    correct = (pred == part.y).float()
    c, k = conf.numpy(), correct.numpy()

    def stat(idx: np.ndarray) -> float:
        return expected_calibration_error(c[idx], k[idx], opts.bins)

    ece = bootstrap(stat, len(c), ctx.seed, ctx.resamples).to_dict()
    return {"ece": ece, "bins": reliability_bins(c, k, opts.bins)}


def _calibration_md(r: dict[str, Any]) -> str:
    return f"Expected calibration error (fused): {fmt_figure(r['ece'])} (n = {r['ece']['n']})"


def _calibration_headline(r: dict[str, Any]) -> dict[str, float]:
    return {"ECE": r["ece"]["value"]}


def _calibration_plot(r: dict[str, Any], png: Any) -> Any:
    from modalign.benchmark.plots import reliability_png

    return reliability_png(r["bins"], png)


TASKS.add(
    "calibration",
    Task(run_calibration, _calibration_md, _calibration_headline, _calibration_plot, False),
    CalibrationOptions,
)
