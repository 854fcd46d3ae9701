"""Issue 10 (7, 10): through the CLI, user errors exit 2 before any work, naming what to fix:
a missing ``data.val`` / ``finetune.test`` (before model building, no output folder made),
``predict --drop`` of a modality the classifier never had, an undecodable query file, and
duplicate ids for ``index build`` (named with their lines, before anything is embedded)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from modalign.cli import main

from helpers.corpus import WORDS, tiny_overrides, write_tiny_corpus
from helpers.trained import TinyBundle, copy_tree


def _sets(overrides: list[str]) -> list[str]:
    return [a for o in overrides for a in ("--set", o)]


@pytest.fixture(scope="module")
def trained(
    tmp_path_factory: pytest.TempPathFactory, tiny_bundle_no_text: TinyBundle
) -> tuple[Path, Path, Path]:
    """The shared corpus and image+audio bundle (read-only), and a classifier fine-tuned on it."""
    manifest, model = tiny_bundle_no_text
    clf = tmp_path_factory.mktemp("reliability-cli") / "clf"
    ft = [
        f"finetune.model={model}",
        f"finetune.train={manifest}",
        f"finetune.out={clf}",
        f"finetune.class_names=[{', '.join(WORDS)}]",
        "finetune.labels_per_class=2",
        "finetune.epochs=2",
        "finetune.pseudo_label=none",
        "finetune.pseudo_label_options={}",
    ]
    assert main(["-q", "finetune", "demo", *_sets(ft)]) == 0
    return manifest, model, clf


def test_missing_paths_fail_before_any_work(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    manifest = write_tiny_corpus(tmp_path / "c", n=8)
    out = tmp_path / "never"
    sets = [*tiny_overrides(manifest, out), f"data.val={tmp_path / 'test.jsonl'}"]
    assert main(["-q", "pretrain", "demo", *_sets(sets)]) == 2
    err = capsys.readouterr().err
    assert "data.val" in err and "test.jsonl" in err and "not found" in err
    assert not out.exists()  # before output.dir is created (and before the towers are built)
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"id": "a", "text": "x"}\n{"id": \n')
    assert main(["-q", "pretrain", "demo", *_sets([*sets[:-1], f"data.train={broken}"])]) == 2
    assert f"data.train: {broken}:2" in capsys.readouterr().err and not out.exists()
    ft = [f"finetune.model={tmp_path}", f"finetune.train={manifest}", "finetune.test=nope.csv"]
    assert main(["-q", "finetune", "demo", *_sets(ft)]) == 2
    assert "finetune.test" in capsys.readouterr().err


def test_predict_drop_of_an_unknown_modality_exits_2(
    trained: tuple[Path, Path, Path], capsys: pytest.CaptureFixture
) -> None:
    manifest, _, clf = trained
    assert main(["predict", "--model", str(clf), "--data", str(manifest), "--drop", "depht"]) == 2
    assert "depht" in capsys.readouterr().err
    argv = ["predict", "--model", str(clf), "--data", str(manifest), "--drop", "audio", "--json"]
    assert main(argv) == 0
    assert len(json.loads(capsys.readouterr().out)["predictions"]) == 16


def test_undecodable_query_file_and_duplicate_ids_exit_2(
    trained: tuple[Path, Path, Path], capsys: pytest.CaptureFixture, tmp_path: Path
) -> None:
    manifest, model, _ = trained
    rows = [json.loads(x) for x in manifest.read_text().splitlines()]
    rows[5]["id"] = rows[2]["id"]
    rows[9]["id"] = rows[2]["id"]
    dup = copy_tree(manifest.parent, tmp_path / "corpus") / "dup.jsonl"  # the corpus is shared
    dup.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "idx"
    argv = ["index", "build", "--model", str(model), "--data", str(dup), "--out", str(out)]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert f"{rows[2]['id']!r} (lines 3, 6, 10)" in err and not out.exists()
    argv = ["index", "build", "--model", str(model), "--data", str(manifest), "--out", str(out)]
    assert main([*argv, "--target-recall", "0.9"]) == 0
    capsys.readouterr()
    junk = tmp_path / "query.png"
    junk.write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    assert main(["search", "--index", str(out), "--image", str(junk)]) == 2
    assert "query.png" in capsys.readouterr().err
