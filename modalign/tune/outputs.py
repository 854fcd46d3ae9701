"""What a study leaves in its folder: best.yaml, trials.csv / trials.md, history and importances."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from modalign.core.artifact import atomic_path, atomic_write_text
from modalign.core.config_io import dump_yaml
from modalign.report import table

__all__ = ["best_config_text", "comparison_text", "write_outputs"]


def best_config_text(
    config: str,
    overrides: list[str],
    params: dict[str, Any],
    comparison: dict[str, Any] | None = None,
) -> str:
    """The whole root config with the best trial's keys applied (loadable as is); its header
    says how it compares with the base config on validation when the study scored both."""
    from modalign.tune.finetune_stage import config_with, default_tree

    cfg = config_with(default_tree(config, overrides), params)
    head = f"# modalign tune: best trial of {config} (keys changed: {', '.join(sorted(params))})\n"
    if comparison is not None:
        head += f"# {comparison_text(comparison)}\n"
    return head + dump_yaml(cfg)


def comparison_text(c: dict[str, Any]) -> str:
    """One line: the best trial against the base config's trial on validation."""
    if c["best_trial"] == c["baseline_trial"]:
        return f"the base config (trial {c['baseline_trial']}) is the best trial"
    lo, hi = c["interval"]
    verdict = (
        "beyond the interval"
        if c["distinguishable"]
        else "within the interval: not told apart from the base config on these rows"
    )
    return (
        f"best trial {c['best_trial']} vs the base config (trial {c['baseline_trial']}): "
        f"validation {c['measure']} {c['best_score']:.3f} vs {c['baseline_score']:.3f}, "
        f"{c['difference']:+.3f} [{lo:+.3f}, {hi:+.3f}] (95% bootstrap, n = {c['rows']} {c['unit']}; "
        f"McNemar p = {c['mcnemar_p']:.3g}), "
        f"{verdict}"
    )


def _ran_states() -> tuple[Any, ...]:
    """Every trial state but WAITING: queued trials (the baseline's neighbours a budget did not
    reach) stay in the storage for a resumed study, out of trials.csv / trials.md."""
    from optuna.trial import TrialState

    return tuple(s for s in TrialState if s != TrialState.WAITING)


def _trial_rows(study: Any) -> tuple[list[str], list[list[Any]]]:
    ran = study.get_trials(deepcopy=False, states=_ran_states())
    names = sorted({k for t in ran for k in t.params})
    rows = [[t.number, t.state.name, t.value, *(t.params.get(n) for n in names)] for t in ran]
    return ["trial", "state", "value", *names], rows


def _history_png(study: Any, png: Path) -> Path:
    from modalign.benchmark.plots import new_figure, save_png

    done = [t for t in study.trials if t.value is not None]
    fig = new_figure()
    ax = fig.add_subplot(1, 1, 1)
    xs, ys = [t.number for t in done], [t.value for t in done]
    best = [max(ys[: i + 1]) for i in range(len(ys))]
    ax.plot(xs, ys, "o", alpha=0.6, label="trial")
    ax.plot(xs, best, "-", color="C3", label="best so far")
    ax.set_xlabel("trial")
    ax.set_ylabel("objective (validation)")
    ax.grid(alpha=0.3)
    ax.legend()
    return save_png(fig, png)


def _importances_png(study: Any, png: Path) -> Path | None:
    import optuna

    from modalign.benchmark.plots import new_figure, save_png

    complete = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    if len(complete) < 2:
        return None
    import warnings

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "few trials per regime" on small studies
            imp = optuna.importance.get_param_importances(study)
    except (RuntimeError, ValueError):
        return None
    if not imp:
        return None
    fig = new_figure()
    ax = fig.add_subplot(1, 1, 1)
    names = list(imp)[::-1]
    ax.barh(names, [imp[n] for n in names])
    ax.set_xlabel("parameter importance (optuna default evaluator)")
    return save_png(fig, png)


def write_outputs(
    study: Any,
    config: str,
    overrides: list[str],
    study_dir: Path,
    comparison: dict[str, Any] | None = None,
) -> dict[str, str]:
    """best.yaml, trials.csv, trials.md, history.png, importances.png (when computable)."""
    files: dict[str, str] = {}
    best = study.best_trial
    atomic_write_text(
        study_dir / "best.yaml",
        best_config_text(config, overrides, best.user_attrs["config"], comparison),
    )
    files["best"] = str(study_dir / "best.yaml")
    headers, rows = _trial_rows(study)
    with atomic_path(study_dir / "trials.csv") as tmp:
        frame = study.trials_dataframe()
        frame[frame["state"].isin([s.name for s in _ran_states()])].to_csv(tmp, index=False)
    files["trials_csv"] = str(study_dir / "trials.csv")
    atomic_write_text(study_dir / "trials.md", "# Trials\n\n" + table(headers, rows) + "\n")
    files["trials_md"] = str(study_dir / "trials.md")
    files["history"] = str(_history_png(study, study_dir / "history.png"))
    made = _importances_png(study, study_dir / "importances.png")
    if made is not None:
        files["importances"] = str(made)
    return files
