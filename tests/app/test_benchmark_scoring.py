"""Benchmark scores say what they measured (issue 21 items 7 and 20).

* A suite input that is no known modality is an error when the suite loads; a model without a
  tower for one of the suite's inputs gets an explicit "not scored" cell, not a score on other
  inputs; the leaderboard ranks only models scored on the same tasks.
* Proportions get the Wilson interval (355/355 -> [0.990, 1.000], not the bootstrap's
  [1, 1]); other means keep the bootstrap; the leaderboard says whether a model differs from
  the next one by an exact paired (McNemar) test on the same items.
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import yaml

from modalign.benchmark.figures import (
    accuracy_figure,
    bootstrap_mean,
    mcnemar,
    proportion_figure,
    wilson_interval,
)
from modalign.benchmark.render import REPORT_FORMAT, REPORT_VERSION, leaderboard
from modalign.benchmark.run import _run_cell
from modalign.benchmark.suite import load_suite
from modalign.core.artifact import write_meta
from modalign.core.errors import ConfigError


def test_a_proportion_of_all_successes_has_a_wilson_interval() -> None:
    low, high = wilson_interval(355, 355)
    assert low == pytest.approx(0.9893, abs=1e-4) and high == 1.0
    fig = bootstrap_mean(np.ones(355))
    assert fig.method == "wilson" and fig.ci_low == pytest.approx(0.9893, abs=1e-4)
    assert fig.ci_high == 1.0 and fig.value == 1.0
    assert accuracy_figure(1.0, 355).ci_low < 0.991
    low0, high0 = wilson_interval(0, 20)
    assert low0 == 0.0 and high0 == pytest.approx(0.1611, abs=1e-4)
    mid = wilson_interval(50, 100)
    assert mid == pytest.approx((0.4038, 0.5962), abs=1e-4)


def test_other_means_keep_the_bootstrap() -> None:
    fig = bootstrap_mean(np.linspace(0.1, 0.9, 50), seed=0, resamples=200)
    assert fig.method == "bootstrap" and fig.outcomes is None
    assert fig.ci_low < fig.value < fig.ci_high


def test_mcnemar_is_exact_on_the_discordant_items() -> None:
    a = np.r_[np.ones(10), np.zeros(10)].astype(bool)
    b = np.zeros(20, bool)
    assert mcnemar(a, b) == (10, 0, pytest.approx(2 / 2**10))
    assert mcnemar(a, a)[2] == 1.0
    with pytest.raises(ValueError):
        mcnemar(a, b[:5])


def test_a_suite_input_that_is_no_modality_is_an_error(tmp_path: Path) -> None:
    suite = {
        "name": "s",
        "corpora": {"c": {"train": "a.jsonl", "test": "b.jsonl", "inputs": ["image", "smell"]}},
        "tasks": [{"kind": "retrieval"}],
    }
    path = tmp_path / "suite.yaml"
    path.write_text(yaml.safe_dump(suite))
    with pytest.raises(ConfigError, match=r"corpora\.c\.inputs: 'smell' is not a known modality"):
        load_suite(str(path))


def test_a_model_without_a_suite_input_is_not_scored() -> None:
    ctx = SimpleNamespace(
        corpus=SimpleNamespace(inputs=["image", "audio"]),
        model=SimpleNamespace(modalities=["image", "text"]),
        model_name="m",
        corpus_name="c",
        suite=SimpleNamespace(tasks=[SimpleNamespace(kind="retrieval")]),  # never reached
    )
    cell = _run_cell(ctx, Path("unused"), [])
    assert cell["not_scored"].startswith("not scored: the model has no audio tower")
    assert cell["tasks"] == {} and cell["score"] is None  # no score at all


def _cell(score: float, outcomes: dict[str, np.ndarray], not_scored: str | None = None) -> dict:
    tasks = {
        "zero_shot": {
            "kind": "zero_shot",
            "result": {
                "accuracy": {k: proportion_figure(v).to_dict() for k, v in outcomes.items()}
            },
        }
    }
    cell = {"score": score, "headline": {"zero-shot": score}, "tasks": tasks}
    if not_scored:
        cell = {"score": None, "headline": {}, "tasks": {}, "not_scored": not_scored}
    return cell


def test_leaderboard_ranks_only_models_scored_on_the_same_tasks(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    strong = rng.random(200) < 0.9
    weak = strong & (rng.random(200) < 0.6)  # same items, many fewer right
    close = strong.copy()
    close[:3] = ~close[:3]
    models = {
        "three_mod": _cell(0.90, {"image": strong, "audio": strong}),
        "close": _cell(
            float(np.mean([close.mean(), strong.mean()])), {"image": close, "audio": strong}
        ),
        "weak": _cell(0.55, {"image": weak, "audio": weak}),
        "image_text": _cell(0.99, {}, not_scored="not scored: the model has no audio tower"),
        "fewer_tasks": _cell(0.97, {"image": strong}),  # scored on image only
    }
    report = {"suite": "s", "seed": 0, "resamples": 10,
              "models": {n: {"corpora": {"c": c}} for n, c in models.items()}}  # fmt: skip
    write_meta(tmp_path / "r" / "report.json", REPORT_FORMAT, REPORT_VERSION, report)
    rows, text = leaderboard(tmp_path)
    rank = {r["model"]: r["rank"] for r in rows}
    assert rank["image_text"] == "-" and rank["fewer_tasks"] == "-"
    assert [m for m in ("three_mod", "close", "weak") if rank[m] != "-"] == [
        "three_mod",
        "close",
        "weak",
    ]
    assert sorted(rank[m] for m in ("three_mod", "close", "weak")) == [1, 2, 3]
    by = {r["model"]: r for r in rows}
    assert "no audio tower" in by["image_text"]["note"]
    assert "other tasks" in by["fewer_tasks"]["note"]
    first, second = sorted(("three_mod", "close"), key=lambda m: rank[m])
    assert "no significant difference" in by[first]["vs_next"]  # 3 items of 400 differ
    assert "differs" in by[second]["vs_next"] and "no significant" not in by[second]["vs_next"]
    assert "vs next" in text and "not scored" in text
