"""Input-level robustness of the fused classifier: noise curves and FGSM/PGD per modality.

Both go through :mod:`modalign.finetune.robustness` (noise from each ``ModalitySpec.perturb``);
accuracy intervals are bootstrapped over test items (a 0/1 vector's bootstrap depends only on
its count of correct items, so the figure is rebuilt exactly from accuracy and n).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Annotated, Any

from modalign.benchmark.figures import accuracy_figure
from modalign.benchmark.task_registry import TASKS, Task, fmt_figure
from modalign.core.config_io import AT_LEAST_1, NON_NEGATIVE
from modalign.report import table

__all__ = ["AdversarialOptions", "NoiseOptions"]


@dataclass(frozen=True)
class NoiseOptions:
    levels: list[Annotated[float, NON_NEGATIVE]] = field(
        default_factory=lambda: [0.0, 0.5, 1.0, 2.0]
    )
    max_items: Annotated[int, AT_LEAST_1] = 500


def run_noise(ctx: Any, opts: NoiseOptions) -> dict[str, Any]:
    from modalign.finetune.robustness import noise_curve

    clf = ctx.reference_classifier()
    curves = {}
    for m in clf.inputs:
        c = noise_curve(
            clf,
            ctx.corpus.test,
            m,
            list(opts.levels),
            seed=ctx.seed,
            max_items=opts.max_items or None,
        )
        curves[m] = {
            "levels": c["levels"],
            "accuracy": [accuracy_figure(a, c["items"], ctx.seed).to_dict() for a in c["accuracy"]],
            "auc": c["auc"],
        }
    return {"curves": curves}


def _curve_md(r: dict[str, Any], key: str, xname: str) -> str:
    rows = [
        [m, x, fmt_figure(f), f["n"]]
        for m, c in r["curves"].items()
        for x, f in zip(c[key], c["accuracy"])
    ]
    return table(["modality", xname, "accuracy [95% CI]", "n"], rows)


def _noise_headline(r: dict[str, Any]) -> dict[str, float]:
    return {f"noise AUC {m}": c["auc"] for m, c in r["curves"].items()}


def _curves_plot(key: str, xlabel: str) -> Any:
    def plot(r: dict[str, Any], png: Any) -> Any:
        from modalign.benchmark.plots import curves_png

        return curves_png(r["curves"], key, xlabel, png)

    return plot


TASKS.add(
    "noise",
    Task(
        run_noise,
        lambda r: _curve_md(r, "levels", "noise level"),
        _noise_headline,
        _curves_plot("levels", "noise level (modality units)"),
    ),
    NoiseOptions,
)


@dataclass(frozen=True)
class AdversarialOptions:
    attacks: list[str] = field(default_factory=lambda: ["fgsm", "pgd"])
    eps: list[Annotated[float, NON_NEGATIVE]] = field(
        default_factory=lambda: [0.0, 0.01, 0.03, 0.1]
    )
    max_items: Annotated[int, AT_LEAST_1] = 128
    steps: Annotated[int, AT_LEAST_1] = 10


def run_adversarial(ctx: Any, opts: AdversarialOptions) -> dict[str, Any]:
    from modalign.finetune.robustness import adversarial

    clf = ctx.reference_classifier()
    curves = {}
    for attack in opts.attacks:
        for m in clf.inputs:
            c = adversarial(
                clf,
                ctx.corpus.test,
                m,
                list(opts.eps),
                attack=attack,
                steps=opts.steps,
                max_items=opts.max_items,
                seed=ctx.seed,
            )
            curves[f"{attack}:{m}"] = {
                "eps": c["eps"],
                "accuracy": [
                    accuracy_figure(a, c["items"], ctx.seed).to_dict() for a in c["accuracy"]
                ],
            }
    return {"curves": curves}


def _adv_headline(r: dict[str, Any]) -> dict[str, float]:
    return {f"{k} acc@max eps": c["accuracy"][-1]["value"] for k, c in r["curves"].items()}


TASKS.add(
    "adversarial",
    Task(
        run_adversarial,
        lambda r: _curve_md(r, "eps", "eps"),
        _adv_headline,
        _curves_plot("eps", "L-inf eps (input units)"),
    ),
    AdversarialOptions,
)
