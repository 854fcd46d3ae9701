"""``modalign data icons`` on a tiny fake ``@tabler/icons`` package written by the test (no npm)."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest

from modalign.cli import main
from modalign.core.errors import UserInputError
from modalign.data.corpora.icons import build_icons, caption, family_of, read_package
from modalign.data.manifest import read_manifest

from helpers.icons import ICONS, fake_package, needs_cairo, tarball


def test_family_and_caption() -> None:
    assert family_of("bell-2-off") == family_of("bell-off") == family_of("bell") == "bell"
    assert family_of("a-b-2") == "a-b"
    assert family_of("off") == "off"  # never strips a name to nothing
    text = caption(
        "arrow-up", ["up", "direction", "arrow-up", "north", "direction"], "{name}: {tags}"
    )
    assert text == "arrow up: direction, north"  # the name's words and repeats left out
    assert caption("egg", ["egg"], "{name}: {tags}") == "the egg icon"


@needs_cairo
def test_build_icons_rules_split_and_metadata(tmp_path: Path) -> None:
    """Rare and missing categories dropped, families kept on one side, every category tested."""
    pkg = fake_package(tmp_path / "src")
    out = tmp_path / "corpus"
    result = build_icons(pkg, out, min_category_items=3, test_fraction=0.34, audio=False)
    meta = json.loads((out / "corpus.json").read_text())
    assert meta["package"] == {"name": "@tabler/icons", "version": "9.9.9", "license": "MIT"}
    assert meta["categories"] == {"Arrows": 6, "Food": 4, "Shapes": 5}
    assert meta["dropped_categories"] == {"": 1, "Rare": 1}
    assert meta["rules"]["min_category_items"] == 3
    assert result["items"] == meta["items"]
    rows = {s: read_manifest(out / f"{s}.jsonl", ["image", "text"]).rows for s in ("train", "test")}
    assert len(rows["train"]) + len(rows["test"]) == 15 == sum(meta["items"].values())
    ids = {s: {r.id for r in rs} for s, rs in rows.items()}
    assert not ids["train"] & ids["test"]  # split by item
    fams = {s: {family_of(i) for i in v} for s, v in ids.items()}
    assert not fams["train"] & fams["test"]  # a family never straddles the split
    raw = [json.loads(line) for line in (out / "test.jsonl").read_text().splitlines()]
    assert {r["label"] for r in raw} == {"Arrows", "Food", "Shapes"}  # every category tested
    assert all("audio" not in r for r in raw)
    from PIL import Image

    for r in raw:
        img = Image.open(out / r["image"])
        assert img.size == (128, 128) and img.mode == "L"
        px = sorted(img.getdata())
        assert px[-1] == 255 and px[0] < 64  # dark strokes on a white background
        assert r["text"].count(",") >= 1 or "(" in r["text"] or ":" in r["text"]
    assert not (out / "val.jsonl").exists()
    # a validation split comes out of train only: the test split does not move
    with_val = build_icons(
        pkg, tmp_path / "v", min_category_items=3, test_fraction=0.34, val_fraction=0.2, audio=False
    )
    assert (tmp_path / "v" / "test.jsonl").read_text() == (out / "test.jsonl").read_text()
    val_ids = {json.loads(x)["id"] for x in (tmp_path / "v" / "val.jsonl").read_text().splitlines()}
    train_v = {
        json.loads(x)["id"] for x in (tmp_path / "v" / "train.jsonl").read_text().splitlines()
    }
    assert val_ids and val_ids | train_v == ids["train"] and not val_ids & train_v
    assert {family_of(i) for i in val_ids}.isdisjoint(family_of(i) for i in train_v)
    assert with_val["items"]["val"] == len(val_ids)
    # same seed -> same corpus
    again = build_icons(pkg, out, min_category_items=3, test_fraction=0.34, audio=False)
    assert again["items"] == result["items"]
    assert (out / "test.jsonl").read_text() == "".join(json.dumps(r) + "\n" for r in raw)


@needs_cairo
def test_build_icons_from_tarball_with_audio(tmp_path: Path) -> None:
    """The npm pack tarball works as the folder does, and speech is written per item."""
    pytest.importorskip("espeakng_loader")
    pkg = fake_package(tmp_path / "src", {k: v for k, v in ICONS.items() if v == "Food"})
    tgz = tarball(pkg, tmp_path / "tabler-icons-9.9.9.tgz")
    assert read_package(tgz).svgs.keys() == read_package(pkg.parent).svgs.keys()
    out = tmp_path / "corpus"
    build_icons(tgz, out, min_category_items=2, test_fraction=0.25, audio=True, workers=1)
    rows = [r for s in ("train", "test") for r in read_manifest(out / f"{s}.jsonl", ["audio"]).rows]
    assert len(rows) == 4
    import soundfile as sf

    for r in rows:
        wave, sr = sf.read(r.values["audio"])
        assert sr == 16000 and len(wave) > 1600


def test_split_keeps_every_category_on_the_training_side() -> None:
    """A category of one family (or one dominant family) is never moved wholly to test."""
    import numpy as np

    from modalign.data.corpora.icons import _split

    names = ["bell", "bell-2", "bell-off", "cup", "cup-off", "egg"]
    category = {"bell": "A", "bell-2": "A", "bell-off": "A", "cup": "B", "cup-off": "B", "egg": "B"}
    for seed in range(20):
        test = _split(names, category, 0.5, np.random.default_rng(seed))
        assert not test & {"bell", "bell-2", "bell-off"}  # A is one family: all in train
        assert test & {"cup", "egg"} and not {"cup", "cup-off", "egg"} <= test


def test_build_icons_bad_inputs(tmp_path: Path) -> None:
    """Absent package, foreign files in --out, a broken icons.json: clear errors, nothing written."""
    with pytest.raises(UserInputError, match="npm pack @tabler/icons"):
        build_icons(tmp_path / "nope", tmp_path / "out", audio=False)
    pkg = fake_package(tmp_path / "src")
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "notes.txt").write_text("mine")
    with pytest.raises(
        UserInputError, match="holds files that are not a modalign icons corpus.*notes.txt"
    ):
        build_icons(pkg, busy, audio=False)
    assert sorted(p.name for p in busy.iterdir()) == ["notes.txt"]
    (pkg / "icons.json").write_text(json.dumps({"apple": {"category": "Food", "tags": "x"}}))
    with pytest.raises(UserInputError, match="'apple' has tags that are not a list"):
        build_icons(pkg, tmp_path / "out2", audio=False)
    (pkg / "icons.json").write_text(
        json.dumps({n: {"category": "Food", "tags": []} for n in ("apple", "ghost")})
    )
    with pytest.raises(UserInputError, match="without icons/outline/NAME.svg.*ghost"):
        build_icons(pkg, tmp_path / "out3", min_category_items=2, audio=False)
    with pytest.raises(UserInputError, match="--val-fraction"):
        build_icons(pkg, tmp_path / "out5", test_fraction=0.5, val_fraction=0.5, audio=False)
    with pytest.raises(UserInputError, match="--test-fraction"):
        build_icons(pkg, tmp_path / "out4", test_fraction=1.5, audio=False)
    assert not (tmp_path / "out2" / "train.jsonl").exists()


def test_cli_icons_needs_package(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["data", "icons", "--out", str(tmp_path / "o")]) == 2
    assert "npm pack @tabler/icons" in capsys.readouterr().err


@needs_cairo
def test_cli_icons_builds(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    pkg = fake_package(tmp_path / "src")
    out = tmp_path / "o"
    code = main(["data", "icons", "--package", str(pkg.parent), "--out", str(out), "--json",
                 "--no-audio", "--min-category-items", "5", "--size", "32"])  # fmt: skip
    assert code == 0
    result = json.loads(capsys.readouterr().out)
    assert result["categories"] == {"Arrows": 6, "Shapes": 5}
    assert result["package"]["version"] == "9.9.9"
    with Path(out / "images" / "circle.png").open("rb") as fh:
        from PIL import Image

        assert Image.open(io.BytesIO(fh.read())).size == (32, 32)
