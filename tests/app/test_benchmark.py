"""`modalign benchmark`: report schema, intervals, ranking of a trained vs an untrained model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from modalign.cli import main
from modalign.pretrain import read_card

from helpers.corpus import SHARED_DATA, WORDS, tiny_overrides, write_tiny_corpus

TASKS = [
    {"kind": "retrieval", "options": {"level": "class"}},
    {"kind": "zero_shot", "options": {"prompts": ["the sound {}", "{}"]}},
    {
        "kind": "few_label",
        "options": {
            "shots": [1, 3],
            "heads": ["late"],
            "pseudo_labels": ["none", "zero_shot"],
            "seeds": 2,
        },
    },
    {"kind": "scratch", "options": {"shots": [3], "epochs": 2}},
    {"kind": "missing_modality"},
    {"kind": "noise", "options": {"levels": [0.0, 1.0], "max_items": 16}},
    {"kind": "adversarial", "options": {"attacks": ["fgsm"], "eps": [0.0, 0.1], "max_items": 8}},
    {"kind": "calibration", "options": {"bins": 5}},
]


def _pretrain(manifest: Path, out: Path, steps: int, lr: float) -> Path:
    sets = tiny_overrides(manifest, out, steps=steps, batch=16)
    sets += [f"optim.lr={lr}", "train.checkpoint_every=0", "train.val_every=0", "data.val="]
    assert main(["-q", "pretrain", "demo", "--set", *sets]) == 0
    return out


@pytest.fixture(scope="module")
def bench_setup(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("bench")
    train = write_tiny_corpus(root / "train", n=48, seed=0)
    test = write_tiny_corpus(root / "test", n=24, seed=1)
    trained = _pretrain(train, root / "trained", steps=40, lr=0.003)
    untrained = _pretrain(train, root / "untrained", steps=1, lr=1e-12)
    suite = {
        "name": "tiny",
        "seed": 0,
        "resamples": 200,
        "corpora": {
            "tiny": {
                "train": str(train),
                "test": str(test),
                "class_names": WORDS,
                "inputs": ["image", "audio"],
            }
        },
        "finetune": {"epochs": 10, "min_steps": 0, "labels_per_class": 3, "head": "late"},
        "tasks": TASKS,
    }
    path = root / "suite.yaml"
    path.write_text(yaml.safe_dump(suite))
    return {"root": root, "suite": path, "trained": trained, "untrained": untrained}


def _figures(node: object) -> list[dict]:
    """Every {"value", "ci_low", "ci_high", "n"} object in a report tree."""
    if isinstance(node, dict):
        if {"value", "ci_low", "ci_high", "n"} <= set(node):
            return [node]
        return [f for v in node.values() for f in _figures(v)]
    if isinstance(node, list):
        return [f for v in node for f in _figures(v)]
    return []


@pytest.mark.heavy
@pytest.mark.slow
def test_benchmark_report_and_leaderboard(
    bench_setup: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    out = bench_setup["root"] / "reports" / "run1"
    argv = [
        "benchmark",
        str(bench_setup["suite"]),
        "--model",
        str(bench_setup["trained"]),
        "--model",
        str(bench_setup["untrained"]),
        "--out",
        str(out),
        "--json",
    ]
    capsys.readouterr()
    assert main(argv) == 0
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    report = json.loads((out / "report.json").read_text())
    assert report["format"] == "modalign.benchmark_report" and report["format_version"] == 1
    assert printed["models"].keys() == report["models"].keys() == {"trained", "untrained"}
    # each bundle's model card now holds its figures (issue 23): value, 95% interval, n
    assert printed["model_cards"]["trained"]["written"] is True
    met = read_card(bench_setup["trained"])["modalign"]["metrics"]
    assert met["source"] == "benchmark tiny" and met["data"] == str(out)
    rows = {r["name"]: r for r in met["results"]}
    fig = report["models"]["trained"]["corpora"]["tiny"]["tasks"]["retrieval"]["result"]
    want = fig["pairs"]["audio->image"]["recall@1"]
    assert rows["tiny/retrieval/audio->image/recall@1"]["ci_low"] == want["ci_low"]
    cell = report["models"]["trained"]["corpora"]["tiny"]
    assert set(cell["tasks"]) == {t["kind"] for t in TASKS}
    pairs = cell["tasks"]["retrieval"]["result"]["pairs"]
    assert {"audio->image", "image->audio", "text->image", "image->text"} <= set(pairs)
    assert set(pairs["audio->image"]) == {"recall@1", "recall@5", "recall@10", "map"}
    assert pairs["audio->image"]["recall@1"]["n"] == 24
    figs = _figures(report)
    assert len(figs) > 30
    for f in figs:
        assert f["ci_low"] <= f["value"] <= f["ci_high"], f
        assert f["n"] > 0
    subsets = cell["tasks"]["missing_modality"]["result"]["by_subset"]
    assert set(subsets) == {"audio+image", "audio", "image"}
    # the untrained model ranks below the trained one
    bad = report["models"]["untrained"]["corpora"]["tiny"]
    assert bad["score"] < cell["score"]
    assert bad["headline"]["retrieval R@1 (mean)"] < cell["headline"]["retrieval R@1 (mean)"]
    md = (out / "report.md").read_text()
    assert md.startswith("# Benchmark `tiny`") and "audio->image" in md
    for png in report["plots"]:
        assert (out / png).stat().st_size > 2000, png
    assert any("calibration" in p for p in report["plots"])
    # a second report in the same tree, then the leaderboard merges both
    out2 = bench_setup["root"] / "reports" / "run2"
    # the built-in `demo` suite, pointed at the tiny corpus with small settings
    tiny = yaml.safe_load(bench_setup["suite"].read_text())["corpora"]["tiny"]
    sets = [
        f"corpora.demo.train={tiny['train']}",
        f"corpora.demo.test={tiny['test']}",
        f"corpora.demo.class_names={json.dumps(WORDS)}",
        "resamples=100",
        "tasks=[{kind: retrieval}, {kind: zero_shot, options: {prompts: ['the sound {}']}}]",
    ]
    assert (
        main(
            [
                "-q",
                "benchmark",
                "demo",
                "--model",
                str(bench_setup["trained"]),
                "--out",
                str(out2),
                "--set",
                *sets,
                "--json",
            ]
        )
        == 0
    )
    assert json.loads((out2 / "report.json").read_text())["suite"] == "demo"
    capsys.readouterr()
    assert main(["benchmark", "leaderboard", str(bench_setup["root"] / "reports"), "--json"]) == 0
    board = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert len(board["rows"]) == 3
    text = (bench_setup["root"] / "reports" / "leaderboard.md").read_text()
    lines = [ln for ln in text.splitlines() if ln.startswith("| ") and "rank" not in ln]
    tiny = [ln for ln in lines if "run1" in ln]
    assert "trained" in tiny[0] and "untrained" in tiny[1]


def test_retrieval_figures_equal_evaluate_retrieval(bench_setup: dict[str, Path]) -> None:
    from modalign.benchmark.context import TaskContext
    from modalign.benchmark.suite import load_suite
    from modalign.benchmark.tasks_retrieval import RetrievalOptions, run_retrieval
    from modalign.pretrain.bundle import load_bundle
    from modalign.retrieval.embed import embed_source
    from modalign.retrieval.evaluate import evaluate_pairs

    suite = load_suite(str(bench_setup["suite"]))
    model = load_bundle(bench_setup["trained"])
    corpus = suite.corpora["tiny"]
    ctx = TaskContext(model, "m", "tiny", corpus, suite, bench_setup["root"] / "p")
    ours = run_retrieval(ctx, RetrievalOptions(level="class"))
    theirs = evaluate_pairs(embed_source(model, corpus.test)[0], level="class")
    for pair, m in theirs["pairs"].items():
        for key in ("recall@1", "recall@5", "map"):
            assert ours["pairs"][pair][key]["value"] == pytest.approx(m[key], abs=1e-9)


def test_suite_errors_exit_2(bench_setup: dict[str, Path], tmp_path: Path) -> None:
    suite, model = str(bench_setup["suite"]), str(bench_setup["trained"])
    base = ["benchmark", suite, "--model", model, "--out", str(tmp_path / "o")]
    assert main([*base, "--set", "tasks=[{kind: nope}]"]) == 2
    assert main([*base, "--set", "tasks=[{kind: few_label, options: {shotz: [1]}}]"]) == 2
    assert main([*base, "--set", "corpora.tiny.test=/nonexistent.jsonl"]) == 2
    assert main(["benchmark", suite, "--model", str(tmp_path), "--out", str(tmp_path / "o")]) == 2
    assert main(["benchmark", "cifar10", "--model", model]) == 2  # shards path not given
    assert not (tmp_path / "o" / "report.json").exists()


def test_bootstrap_interval_contains_estimate_and_is_seeded() -> None:
    import numpy as np

    from modalign.benchmark.figures import bootstrap, bootstrap_mean

    v = np.random.default_rng(3).random(50) > 0.3
    a, b = bootstrap_mean(v, seed=1), bootstrap_mean(v, seed=1)
    assert a == b and a.ci_low < a.value < a.ci_high and a.n == 50
    assert a.value == pytest.approx(v.mean())
    c = bootstrap(lambda idx: float(v[idx].mean()), 50, seed=1, resamples=400)
    assert c.ci_low == pytest.approx(a.ci_low, abs=0.05)
    const = bootstrap_mean(np.ones(10))  # a proportion at the edge: Wilson, not [1, 1]
    assert const.value == const.ci_high == 1.0 and const.ci_low == pytest.approx(0.7225, abs=1e-4)
    spread = bootstrap_mean(np.linspace(0, 2, 40), seed=1)  # not 0/1: the bootstrap
    assert spread.method == "bootstrap" and spread == bootstrap_mean(np.linspace(0, 2, 40), seed=1)


def test_expected_calibration_error() -> None:
    from modalign.finetune.calibration import expected_calibration_error, reliability_bins

    assert expected_calibration_error([0.9, 0.9], [1, 1], bins=10) == pytest.approx(0.1)
    assert expected_calibration_error([0.55, 0.95], [1, 0], bins=10) == pytest.approx(
        (0.45 + 0.95) / 2
    )
    bins = reliability_bins([0.55, 0.95], [1, 0], bins=10)
    assert [b["count"] for b in bins] == [1, 1]


def _subsample(src: Path, dst: Path, per_class: int) -> Path:
    counts: dict[str, int] = {}
    keep = []
    for line in src.read_text().splitlines():
        label = json.loads(line)["label"]
        if counts.get(label, 0) < per_class:
            counts[label] = counts.get(label, 0) + 1
            keep.append(line)
    dst.write_text("\n".join(keep) + "\n")
    return dst


@pytest.mark.slow
@pytest.mark.skipif(not (SHARED_DATA / "mnist").is_dir(), reason="needs ../shared/datasets")
def test_benchmark_avmnist_builtin(tmp_path: Path) -> None:
    """The built-in avmnist suite on a small AV-MNIST corpus (small settings)."""
    from modalign.data.corpora.avmnist import build_avmnist

    root = tmp_path / "corpus"
    build_avmnist(SHARED_DATA / "mnist", SHARED_DATA / "fsdd", root, copy_audio=False)
    train = _subsample(root / "train.jsonl", root / "train-small.jsonl", 10)
    test = _subsample(root / "test.jsonl", root / "test-small.jsonl", 5)
    model = tmp_path / "model"
    sets = [
        f"data.train={train}",
        "data.val=",
        f"output.dir={model}",
        "train.steps=15",
        "train.batch_size=32",
        "train.val_every=0",
        "train.checkpoint_every=0",
        "train.progress=false",
        "data.num_workers=0",
    ]
    assert main(["-q", "pretrain", "avmnist", "--set", *sets]) == 0
    small = [
        "resamples=100",
        f"corpora.avmnist.train={train}",
        f"corpora.avmnist.test={test}",
        "finetune.epochs=5",
        "finetune.min_steps=0",
        "tasks=[{kind: retrieval}, {kind: few_label, options: {shots: [1], seeds: 1,"
        " heads: [late]}}, {kind: missing_modality}, {kind: calibration}]",
    ]
    out = tmp_path / "bench"
    assert (
        main(
            [
                "-q",
                "benchmark",
                "avmnist",
                "--model",
                str(model),
                "--out",
                str(out),
                "--set",
                *small,
            ]
        )
        == 0
    )
    report = json.loads((out / "report.json").read_text())
    cell = report["models"]["model"]["corpora"]["avmnist"]
    pairs = cell["tasks"]["retrieval"]["result"]["pairs"]
    assert pairs["audio->image"]["map"]["n"] == 50
    for f in _figures(report):
        assert f["ci_low"] <= f["value"] <= f["ci_high"]
