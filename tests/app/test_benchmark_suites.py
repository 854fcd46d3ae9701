"""The issue-20 suites (``icons``, ``cifar10-fewlabel``) and the few-label task's ``default``."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest

from modalign.benchmark.suite import builtin_suites, load_suite
from modalign.benchmark.tasks_classify import FewLabelOptions, _pseudo_labelers
from modalign.cli import main
from modalign.core.errors import DataError, UserInputError
from modalign.data.corpora.icons import build_icons
from modalign.finetune.config import FinetuneConfig

from helpers.corpus import tiny_overrides
from helpers.icons import fake_package


@pytest.mark.parametrize("name", ["icons", "cifar10-fewlabel"])
def test_new_builtin_suites_load(name: str) -> None:
    assert name in builtin_suites()
    suite = load_suite(name)
    few = next(t for t in suite.tasks if t.kind == "few_label").typed_options()
    assert few.shots == [1, 4, 10]
    assert {"none", "default", "zero_shot", "knn", "self_training"} <= set(few.pseudo_labels)
    assert "pseudo_label" not in suite.finetune  # the suite follows modalign's default


def test_icons_suite_judges_retrieval_per_item() -> None:
    suite = load_suite("icons")
    retrieval = next(t for t in suite.tasks if t.kind == "retrieval").typed_options()
    assert retrieval.level == "instance"
    assert suite.corpora["icons"].train == "runs/icons/corpus/train.jsonl"


def test_few_label_rejects_unknown_pseudo_labeler_at_load() -> None:
    with pytest.raises(UserInputError, match="nope"):
        FewLabelOptions(pseudo_labels=["none", "nope"])
    with pytest.raises(UserInputError):
        load_suite("icons", ["tasks=[{kind: few_label, options: {pseudo_labels: [nope]}}]"])


def test_default_pseudo_labeler_resolved_and_not_run_twice() -> None:
    ctx = SimpleNamespace(finetune_cfg=lambda: SimpleNamespace(pseudo_label="knn"))
    got = _pseudo_labelers(ctx, ["none", "default", "zero_shot", "knn"])
    assert got == [("none", "none"), ("knn", "knn (default)"), ("zero_shot", "zero_shot")]
    assert _pseudo_labelers(ctx, ["none", "zero_shot"]) == [
        ("none", "none"),
        ("zero_shot", "zero_shot"),
    ]
    default = FinetuneConfig().pseudo_label
    ctx = SimpleNamespace(finetune_cfg=lambda: SimpleNamespace(pseudo_label=default))
    assert _pseudo_labelers(ctx, ["default"]) == [(default, f"{default} (default)")]


@pytest.mark.slow
def test_icons_suite_runs_on_a_built_icon_corpus(tmp_path: Path) -> None:
    """`modalign data icons` -> tiny image+text model -> `modalign benchmark icons`: retrieval
    judged per item (n = test icons), few-label rows with the resolved default, all with CIs."""
    pytest.importorskip("cairosvg")
    pkg = fake_package(tmp_path / "src")
    corpus = tmp_path / "corpus"
    built = build_icons(pkg, corpus, min_category_items=3, test_fraction=0.34, audio=False, size=32)
    sets = tiny_overrides(corpus / "train.jsonl", tmp_path / "model", steps=3, batch=4)
    sets += ["model.modalities=[image,text]", "train.checkpoint_every=0"]
    assert main(["-q", "pretrain", "demo", "--set", *sets]) == 0
    tasks = (
        "tasks=[{kind: retrieval, options: {level: instance, ks: [1, 5]}}, {kind: few_label, "
        "options: {shots: [1], heads: [late], pseudo_labels: [none, default], seeds: 1}}]"
    )
    out = tmp_path / "bench"
    code = main([
        "-q", "benchmark", "icons", "--model", str(tmp_path / "model"), "--out", str(out),
        "--set", f"corpora.icons.train={corpus / 'train.jsonl'}",
        f"corpora.icons.test={corpus / 'test.jsonl'}", "corpora.icons.inputs=[image]",
        "finetune.epochs=2", "finetune.min_steps=0", "resamples=50", tasks,
    ])  # fmt: skip
    assert code == 0
    report = json.loads((out / "report.json").read_text())
    cell = report["models"]["model"]["corpora"]["icons"]["tasks"]
    retrieval = cell["retrieval"]["result"]
    assert retrieval["level"] == "instance"
    fig = retrieval["pairs"]["text->image"]["recall@1"]
    assert fig["n"] == built["items"]["test"] and fig["ci_low"] <= fig["value"] <= fig["ci_high"]
    rows = cell["few_label"]["result"]["rows"]
    default = FinetuneConfig().pseudo_label
    assert [r["pseudo_label"] for r in rows] == ["none", f"{default} (default)"]


def test_suite_corpora_are_checked_and_parsed_up_front(tmp_path: Path) -> None:
    """A suite's sources get the check every run makes (``check_source``): a manifest that
    exists but is malformed is refused naming the key and the line, before any model is read."""
    good = tmp_path / "good.jsonl"
    good.write_text(json.dumps({"id": "a", "text": "x", "label": "one"}) + "\n")
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"id": "a", "text": "x"}\n{"id": \n')
    sets = [f"corpora.demo.train={good}", f"corpora.demo.test={broken}"]
    with pytest.raises(DataError, match=rf"corpora.demo.test: {broken}:2: malformed JSON"):
        load_suite("demo", sets).check_inputs()
    missing = tmp_path / "missing.jsonl"
    with pytest.raises(DataError, match="corpora.demo.test: .*build the corpus first"):
        load_suite("demo", [sets[0], f"corpora.demo.test={missing}"]).check_inputs()
    load_suite("demo", [sets[0], f"corpora.demo.test={good}"]).check_inputs()
