"""The pretraining objective: short runs scored (and pruned) on validation recall.

Each trial pretrains into ``STUDY/trials/N`` with the suggested keys; the trainer's
``evaluate`` callback (every ``train.val_every`` steps) scores ``data.val`` with the same
metrics as ``modalign evaluate retrieval``, reports the mean Recall@1 over modality pairs to
Optuna and stops the run when the pruner says so. A finished trial keeps its last validation's
per-query hits at rank 1 (every ordered pair's queries, packed), so a study can pair its best
trial with the base config's trial on the same queries.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from modalign.benchmark.figures import pack_outcomes
from modalign.core.errors import UserInputError
from modalign.tune.finetune_stage import config_with

__all__ = ["PretrainObjective", "mean_recall"]


def mean_recall(metrics: dict[str, Any], k: int = 1) -> float:
    vals = [m[f"recall@{k}"] for m in metrics.values() if f"recall@{k}" in m]
    return float(np.mean(vals)) if vals else 0.0


@dataclass
class PretrainObjective:
    base_tree: dict[str, Any]
    space: Any
    study_dir: Path

    def check(self) -> None:
        cfg = config_with(self.base_tree, {})
        if not cfg.data.val or cfg.train.val_every < 1:
            raise UserInputError(
                "tune --stage pretrain needs data.val (a validation split, not the test set) "
                "and train.val_every >= 1 (pruning reads validation recall)"
            )

    def params(self, trial: Any) -> dict[str, Any]:
        return self.space.suggest(trial)

    def baseline_params(self) -> dict[str, Any]:
        """Trial parameters that replay the base config (see ``PretrainSpace.baseline``)."""
        return self.space.baseline(self.base_tree)

    def neighbour_params(self) -> list[dict[str, Any]]:
        """None: a pretraining study has no one-change trials queued after its baseline."""
        return []

    def __call__(self, trial: Any) -> float:
        import optuna

        import modalign
        from modalign.retrieval.evaluate import make_validator

        params = self.params(trial)
        out = self.study_dir / "trials" / f"{trial.number:04d}"
        cfg = config_with(self.base_tree, {**params, "output.dir": str(out)})
        ranks: dict[str, Any] = {}  # each pair's per-query ranks at the latest validation
        validate = make_validator(cfg.data.val, on_ranks=ranks.__setitem__)
        last = {"value": 0.0}

        def evaluate(view: Any, step: int) -> dict[str, Any]:
            metrics = validate(view, step)
            last["value"] = mean_recall(metrics)
            trial.report(last["value"], step)
            if trial.should_prune():
                raise optuna.TrialPruned(f"pruned at step {step}")
            return metrics

        modalign.run_pretrain(cfg, resume=None, evaluate=evaluate)
        if ranks:
            hits = np.concatenate([ranks[p].first_rank <= 1 for p in sorted(ranks)])
            trial.set_user_attr("hits", pack_outcomes(hits))
            trial.set_user_attr("rows", len(hits))
        return last["value"]
