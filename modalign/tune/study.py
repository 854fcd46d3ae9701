"""``run_tune``: open or resume the Optuna study in a folder, run trials, write the outputs."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from modalign.core.artifact import OutputKind, output_dir
from modalign.core.errors import UserInputError
from modalign.tune.budget import Budget

log = logging.getLogger(__name__)

__all__ = [
    "BASELINE",
    "NEIGHBOUR",
    "STAGES",
    "TuneResult",
    "compare_with_baseline",
    "make_sampler",
    "run_tune",
]

STAGES = ("finetune", "pretrain")
# what a trial's packed hits measure per stage, and what one of them is: the baseline comparison
MEASURES = {"finetune": ("accuracy", "rows"), "pretrain": ("recall@1", "queries")}
BASELINE = "baseline"  # user attribute of the trial that replays the base config
NEIGHBOUR = "neighbour"  # user attribute: the labeler a queued one-change trial swapped in
STUDY_KIND = OutputKind("modalign.tune-study", "tuning study", (("study.db", None),))
"""A study folder: ``study.db`` (SQLite, Optuna) plus best.yaml, trials.csv, trial runs."""


@dataclass
class TuneResult:
    study_dir: Path
    stage: str
    best_value: float
    best_params: dict[str, Any]  # the config keys of the best trial
    trials: int  # finished trials in the study (this run and earlier ones)
    new_trials: int
    files: dict[str, str]
    # the best trial against the base config's trial on the same validation rows / queries
    baseline: dict[str, Any] | None = None


def make_sampler(kind: str, seed: int) -> Any:
    import optuna

    samplers = {
        "tpe": lambda: optuna.samplers.TPESampler(seed=seed, multivariate=True),
        "random": lambda: optuna.samplers.RandomSampler(seed=seed),
    }
    if kind not in samplers:
        raise UserInputError(f"--sampler {kind!r}: valid samplers are {', '.join(samplers)}")
    return samplers[kind]()


def _pruner(kind: str) -> Any:
    import optuna

    pruners = {
        "median": lambda: optuna.pruners.MedianPruner(n_startup_trials=3),
        "sha": lambda: optuna.pruners.SuccessiveHalvingPruner(),
        "none": lambda: optuna.pruners.NopPruner(),
    }
    if kind not in pruners:
        raise UserInputError(f"--pruner {kind!r}: valid pruners are {', '.join(pruners)}")
    return pruners[kind]()


def _objective(stage: str, config: str, overrides: list[str], study_dir: Path,
               val_per_class: int, metric: str, label_splits: int = 1) -> Any:  # fmt: skip
    from modalign.tune.finetune_stage import (
        FinetuneObjective,
        default_tree,
        load_finetune_data,
        usable_labelers,
    )
    from modalign.tune.pretrain_stage import PretrainObjective
    from modalign.tune.space import FinetuneSpace, PretrainSpace

    tree = default_tree(config, overrides)
    if stage == "pretrain":
        space = PretrainSpace.around(tree)  # the config's own sizes, adapter rank and targets
        obj = PretrainObjective(tree, space, study_dir)
        obj.check()
        return obj
    from modalign.config import load_config

    cfg = load_config(config, overrides).finetune
    data = load_finetune_data(cfg, val_per_class, label_splits)
    # the space's labelers and the config's own (trial 0 replays it), those this model can run
    names = list(dict.fromkeys([*FinetuneSpace().pseudo_labels, cfg.pseudo_label]))
    labelers = usable_labelers(names, cfg, data.model)
    finetune_space = FinetuneSpace(
        pseudo_labels=labelers,
        labeler_options={cfg.pseudo_label: dict(cfg.pseudo_label_options)},
        head_options={cfg.head.kind: dict(tree["finetune"]["head"].get("options") or {})},
    )
    return FinetuneObjective(tree, data, finetune_space, metric)


def _check_metric(stage: str, metric: str | None) -> str:
    """The stage's metric: ``subsets`` by default for finetune; pretrain has its own (recall)."""
    from modalign.tune.finetune_stage import check_metric

    if stage == "pretrain":
        if metric is not None:
            raise UserInputError("--metric applies to --stage finetune (pretrain scores recall@1)")
        return "recall@1"
    return check_metric(metric or "subsets")


def _open_study(
    stage: str,
    study_dir: Path,
    sampler: str,
    pruner: str,
    seed: int,
    metric: str,
    label_splits: int = 1,
) -> Any:
    """Create or load the study in ``study_dir/study.db``; checked before any long work.

    A ``study.db`` that is not an SQLite file is refused naming it (exit 2). Trials still
    RUNNING in a study nobody runs (the folder lock is ours: their process was killed) are
    marked FAIL, so the study and ``trials.csv`` say what happened to them."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    db = study_dir / "study.db"
    check_study_db(db)
    try:
        storage = optuna.storages.RDBStorage(f"sqlite:///{db.resolve()}")
        study = optuna.create_study(
            study_name=stage,
            storage=storage,
            load_if_exists=True,
            direction="maximize",
            sampler=make_sampler(sampler, seed),
            pruner=_pruner(pruner),
        )
    except UserInputError:
        raise
    except Exception as exc:  # SQLAlchemy / sqlite3 errors of a damaged database
        raise _unreadable_db(db, f"{type(exc).__name__}: {str(exc).splitlines()[0]}") from None
    fail_interrupted_trials(study, storage)
    _same_setting(study, "--metric", metric, _check_metric(stage, None), study_dir)
    _same_setting(study, "--label-splits", label_splits, 1, study_dir)
    return study


SQLITE_HEADER = b"SQLite format 3\x00"


def check_study_db(db: Path) -> None:
    """Refuse (exit 2, naming the file) a ``study.db`` that is not a regular SQLite file."""
    if not db.exists() and not db.is_symlink():
        return
    if not db.is_file():
        raise UserInputError(
            f"{db} is not a file (a folder or a broken link?); move it out of the study folder "
            "to start a new study, or pass another --study folder"
        )
    with open(db, "rb") as f:
        head = f.read(len(SQLITE_HEADER))
    if head and head != SQLITE_HEADER:
        raise _unreadable_db(db, "it is not an SQLite database")


def _unreadable_db(db: Path, why: str) -> UserInputError:
    return UserInputError(
        f"{db}: the study database cannot be read ({why}); restore it from a backup, or move "
        "it away (the trials in it are then lost) to start a new study in this folder, or "
        "pass another --study folder"
    )


INTERRUPTED = "interrupted: its process ended while it ran; marked FAIL when the study resumed"


def fail_interrupted_trials(study: Any, storage: Any) -> list[int]:
    """Mark FAIL (with ``user_attrs['fail_reason']``) every trial left RUNNING; returns their
    numbers. Only safe while the study folder's lock is held, as :func:`run_tune` does."""
    from optuna.trial import TrialState

    study_id = storage.get_study_id_from_name(study.study_name)
    failed = []
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        trial_id = storage.get_trial_id_from_study_id_trial_number(study_id, t.number)
        storage.set_trial_user_attr(trial_id, "fail_reason", INTERRUPTED)
        storage.set_trial_state_values(trial_id, TrialState.FAIL)
        failed.append(t.number)
    if failed:
        log.warning("trials %s of %s were %s", failed, study.study_name, INTERRUPTED)
    return failed


def _same_setting(study: Any, flag: str, value: Any, default: Any, study_dir: Path) -> None:
    """A resumed study keeps the setting (``--metric``, ``--label-splits``) its trials were scored
    with; a study made before the setting was recorded used ``default``. Recorded on first use."""
    key = flag.removeprefix("--").replace("-", "_")
    before = study.user_attrs.get(key, default if study.trials else None)
    if before is None:
        study.set_user_attr(key, value)
    elif before != value:
        raise UserInputError(
            f"{study_dir}: this study's trials were scored with {flag} {before}, not {value}; "
            f"pass {flag} {before} to resume it, or use a new --study folder"
        )


def run_tune(
    config: str,
    budget: Budget,
    study_dir: str | Path,
    stage: str = "finetune",
    overrides: list[str] | tuple[str, ...] = (),
    sampler: str = "tpe",
    pruner: str = "median",
    seed: int = 0,
    val_per_class: int = 5,
    metric: str | None = None,
    label_splits: int = 1,
) -> TuneResult:
    """Run (or resume) the study in ``study_dir`` until ``budget``; write best.yaml and friends.

    Trial counts in ``budget`` are the study's total: a resumed study runs only the rest.
    ``metric`` (finetune stage, a key of :data:`~modalign.tune.finetune_stage.METRICS`; default
    ``subsets``) is what a trial maximises on the validation rows; a study keeps its metric.
    ``label_splits`` (finetune stage): each trial is scored on this many seeded splits of the
    training labels and the scores averaged; a study keeps it too.
    Every trial runs inside ``process_state_guard`` (the process is left as found).
    """
    from modalign.pretrain.process_state import process_state_guard
    from modalign.tune.outputs import write_outputs

    if stage not in STAGES:
        raise UserInputError(f"--stage {stage!r}: valid stages are {', '.join(STAGES)}")
    metric = _check_metric(stage, metric)
    study_dir = Path(study_dir)
    # the whole study (loading the model draws weight init from the default RNG) and each trial
    with output_dir(study_dir, STUDY_KIND, "--study"), process_state_guard():
        if stage == "pretrain" and label_splits != 1:
            raise UserInputError("--label-splits applies to --stage finetune")
        study = _open_study(stage, study_dir, sampler, pruner, seed, metric, label_splits)
        objective = _objective(
            stage, config, list(overrides), study_dir, val_per_class, metric, label_splits
        )
        done = len([t for t in study.trials if t.state.is_finished()])
        todo = None if budget.trials is None else max(0, budget.trials - done)
        if not study.trials and todo != 0:
            # trial 0 replays the base config: the reference the best trial is compared with
            study.enqueue_trial(objective.baseline_params(), user_attrs={BASELINE: True})
            # then one change at a time (finetune: the base config with each other labeler),
            # queued in the storage, so a study resumed with a larger budget runs the rest first
            for params in objective.neighbour_params():
                study.enqueue_trial(params, user_attrs={NEIGHBOUR: params["pseudo_label"]})

        def guarded(trial: Any) -> float:
            with process_state_guard():
                # suggesting twice under one name returns the same value: the objective's
                # own suggestions match the config recorded here
                trial.set_user_attr("config", objective.params(trial))
                return objective(trial)

        if todo != 0:
            study.optimize(guarded, n_trials=todo, timeout=budget.seconds, catch=())
        comparison = compare_with_baseline(study, *MEASURES[stage])
        files = write_outputs(study, config, list(overrides), study_dir, comparison)
        best = study.best_trial
        finished = len([t for t in study.trials if t.state.is_finished()])
    return TuneResult(
        study_dir,
        stage,
        float(best.value),
        best.user_attrs["config"],
        finished,
        finished - done,
        files,
        comparison,
    )


def compare_with_baseline(
    study: Any, measure: str = "accuracy", unit: str = "rows", seed: int = 0
) -> dict[str, Any] | None:
    """The best trial against the study's baseline trial (the base config replayed), paired on
    the same validation rows: ``measure`` of each (what the trials' packed hits are: finetune,
    the accuracy with all inputs present; pretrain, recall@1 over every ordered pair's
    queries; ``unit`` names one hit), their difference with its 95% bootstrap interval over
    them, the exact McNemar p-value, and ``distinguishable`` (the interval excludes 0). None
    when either trial has no hits (no finished baseline trial, or a study made before they
    were recorded)."""
    from modalign.benchmark.figures import bootstrap, mcnemar, unpack_outcomes

    done = [t for t in study.trials if t.state.is_finished() and t.value is not None]
    base = next((t for t in done if t.user_attrs.get(BASELINE)), None)
    if base is None or "hits" not in base.user_attrs:
        return None
    best = study.best_trial
    if "hits" not in best.user_attrs:
        return None
    a, b = (unpack_outcomes(t.user_attrs["hits"], t.user_attrs["rows"]) for t in (best, base))
    diff = a.astype(float) - b.astype(float)
    fig = bootstrap(lambda idx: float(diff[idx].mean()), len(diff), seed=seed)
    _, _, p_value = mcnemar(a, b)
    return {
        "measure": measure,
        "baseline_trial": base.number,
        "baseline_value": float(base.value),
        "best_trial": best.number,
        "best_score": float(a.mean()),
        "baseline_score": float(b.mean()),
        "difference": fig.value,
        "interval": [fig.ci_low, fig.ci_high],
        "mcnemar_p": p_value,
        "rows": len(diff),
        "unit": unit,
        "distinguishable": bool(fig.ci_low > 0 or fig.ci_high < 0),
    }
