"""End to end through the CLI on a tiny corpus: pretrain -> evaluate -> index -> search ->
finetune -> evaluate classify / predict, checking the JSON and exit-status contract."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from modalign.cli import main

from helpers.corpus import WORDS, tiny_overrides, write_tiny_corpus


def run_json(capsys: pytest.CaptureFixture[str], argv: list[str]) -> dict:
    code = main([*argv, "--json"])
    captured = capsys.readouterr()
    out = captured.out
    assert code == 0, captured.err[-2000:]
    lines = [line for line in out.splitlines() if line.strip()]
    assert len(lines) == 1, f"--json must print exactly one line of JSON, got: {out!r}"
    return json.loads(lines[0])


def build_index(
    capsys: pytest.CaptureFixture[str], model: Path, data: Path, out: Path, *extra: str
) -> dict:
    return run_json(
        capsys,
        ["index", "build", "--model", str(model), "--data", str(data), "--out", str(out), *extra],
    )


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("pipeline")
    manifest = write_tiny_corpus(root / "corpus", n=32)
    out = root / "model"
    sets = [x for o in tiny_overrides(manifest, out, steps=6, batch=16) for x in ("--set", o)]
    assert main(["-q", "pretrain", "demo", *sets, "--set", "train.checkpoint_every=3"]) == 0
    return manifest, out


def test_pretrain_writes_bundle_and_checkpoints(trained: tuple[Path, Path]) -> None:
    _, out = trained
    for name in ("config.yaml", "model.safetensors", "modalign.json", "metrics.jsonl"):
        assert (out / name).is_file(), name
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-3", "step-6"]
    meta = json.loads((out / "modalign.json").read_text())
    assert meta["modalities"] == ["image", "audio", "text"] and meta["embed_dim"] == 16


def test_evaluate_retrieval_json(
    trained: tuple[Path, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    manifest, out = trained
    res = run_json(capsys, ["evaluate", "retrieval", "--model", str(out), "--data", str(manifest)])
    assert set(res["pairs"]) == {
        f"{a}->{b}"
        for a in ("audio", "image", "text")
        for b in ("audio", "image", "text")
        if a != b
    }
    for metrics in res["pairs"].values():
        assert {"recall@1", "recall@5", "recall@10", "map", "median_rank"} <= set(metrics)
        assert 0.0 <= metrics["recall@1"] <= metrics["recall@5"] <= metrics["recall@10"] <= 1.0
    assert res["queries"] == 32 and res["level"] == "class"


def test_index_and_search(
    trained: tuple[Path, Path], capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    manifest, out = trained
    build_index(capsys, out, manifest, tmp_path / "idx")
    res = run_json(
        capsys,
        [
            "search",
            "--index",
            str(tmp_path / "idx"),
            "--text",
            "the sound two",
            "-k",
            "4",
            "--target",
            "image",
        ],
    )
    assert len(res["results"]) == 4
    assert all(r["modality"] == "image" and Path(r["path"]).is_file() for r in res["results"])
    scores = [r["score"] for r in res["results"]]
    assert scores == sorted(scores, reverse=True)
    img = manifest.parent / "img" / "3.png"
    res = run_json(
        capsys, ["search", "--index", str(tmp_path / "idx"), "--image", str(img), "-k", "3"]
    )
    assert {r["modality"] for r in res["results"]} <= {"audio", "text"}


def test_embed_shards_then_index(
    trained: tuple[Path, Path], capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    manifest, out = trained
    embed = [
        "embed",
        "--model",
        str(out),
        "--data",
        str(manifest),
        "--out",
        str(tmp_path / "emb"),
        "--shard-rows",
        "10",
    ]
    res = run_json(capsys, embed)
    assert res["shards"] == 4 and res["written"] == 4
    again = run_json(capsys, embed)  # the same command again: nothing left to do
    assert again["written"] == 0 and again["already_done"] == 4  # resumable: finished shards kept
    res = run_json(
        capsys,
        ["index", "build", "--embeddings", str(tmp_path / "emb"), "--out", str(tmp_path / "idx2")],
    )
    assert res["modalities"]["image"]["items"] == 32


@pytest.mark.slow
def test_finetune_and_classify(
    trained: tuple[Path, Path], capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    manifest, out = trained
    test_manifest = write_tiny_corpus(tmp_path / "test", n=16, seed=1)
    clf = tmp_path / "clf"
    sets = [
        f"finetune.model={out}",
        f"finetune.train={manifest}",
        f"finetune.test={test_manifest}",
        f"finetune.out={clf}",
        f"finetune.class_names=[{', '.join(WORDS)}]",
        "finetune.labels_per_class=2",
        "finetune.epochs=5",
        "finetune.min_steps=0",
        "finetune.threshold=0.0",
    ]
    res = run_json(capsys, ["finetune", "demo", *[x for s in sets for x in ("--set", s)]])
    assert set(res["fused"]["by_subset"]) == {"audio+image", "audio", "image"}
    assert res["pseudo_labels"][0]["method"] == "zero_shot"
    assert 0 < res["pseudo_labels"][0]["num_selected"] <= 24
    ev = run_json(
        capsys,
        [
            "evaluate",
            "classify",
            "--model",
            str(clf),
            "--data",
            str(test_manifest),
            "--drop",
            "audio",
        ],
    )
    assert set(ev["by_subset"]) == {"image"}
    assert {"accuracy", "macro_f1", "confusion"} <= set(ev)
    pred = run_json(capsys, ["predict", "--model", str(clf), "--data", str(test_manifest)])
    assert len(pred["predictions"]) == 16 and all(p["label"] in WORDS for p in pred["predictions"])
    pattern = run_json(
        capsys, ["data", "pack", str(test_manifest), "--out", str(tmp_path / "sh"),
                 "--shard-size", "8"],
    )["pattern"]  # fmt: skip
    on_shards = run_json(capsys, ["predict", "--model", str(clf), "--data", pattern])
    assert on_shards["predictions"] == pred["predictions"]  # same items and labels from shards
    ev_shards = run_json(capsys, ["evaluate", "classify", "--model", str(clf), "--data", pattern,
                                  "--drop", "audio"])  # fmt: skip
    assert ev_shards["accuracy"] == ev["accuracy"]
    assert (
        main(
            [
                "evaluate",
                "classify",
                "--model",
                str(clf),
                "--data",
                str(test_manifest),
                "--drop",
                "depth",
            ]
        )
        == 2
    )
    assert "never had that modality" in capsys.readouterr().err


def test_usage_and_input_errors_exit_2(
    tiny_corpus: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["pretrain", "demo", "--set", "train.stepz=1"]) == 2
    assert "train.stepz" in capsys.readouterr().err
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"id": "a", "image": "x.png"}\n{not json\n')
    sets = [x for o in tiny_overrides(bad, tmp_path / "o") for x in ("--set", o)]
    assert main(["pretrain", "demo", *sets]) == 2
    assert f"{bad}:2" in capsys.readouterr().err
    assert main(["search", "--index", str(tmp_path / "none"), "--text", "x"]) == 2
    assert (
        main(["evaluate", "retrieval", "--model", str(tmp_path), "--data", str(tiny_corpus)]) == 2
    )
    assert "not a model bundle" in capsys.readouterr().err
    assert main(["search", "--index", "x"]) == 2  # a query (--query or --text/...) is required
    assert "give a query" in capsys.readouterr().err
    assert main(["search", "--index", "x", "--query", "no-equals-sign"]) == 2
    assert "MODALITY=VALUE" in capsys.readouterr().err
    assert main(["pretrain", "demo", "--set", "train.steps=1", "stray"]) == 2
    assert "'stray': expected KEY=VALUE" in capsys.readouterr().err


def test_robustness_curves(
    trained: tuple[Path, Path], capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    manifest, out = trained
    clf = tmp_path / "clf"
    sets = [
        f"finetune.model={out}",
        f"finetune.train={manifest}",
        f"finetune.out={clf}",
        "finetune.class_names=[]",
        f"finetune.test={manifest}",
        "finetune.labels_per_class=3",
        "finetune.epochs=3",
        "finetune.min_steps=0",
        "finetune.pseudo_label=none",
    ]
    run_json(capsys, ["finetune", "demo", *[x for s in sets for x in ("--set", s)]])
    res = run_json(
        capsys,
        [
            "evaluate",
            "classify",
            "--model",
            str(clf),
            "--data",
            str(manifest),
            "--noise",
            "audio",
            "--noise-levels",
            "0,1,4",
            "--attack",
            "fgsm",
            "--attack-modality",
            "image",
            "--eps",
            "0,0.5",
            "--confusion-png",
            str(tmp_path / "cm.png"),
        ],
    )
    curve = res["noise"]["audio"]
    assert curve["levels"] == [0.0, 1.0, 4.0] and len(curve["accuracy"]) == 3
    assert curve["accuracy"][0] == pytest.approx(res["accuracy"])  # level 0 = clean
    assert 0.0 <= curve["auc"] <= 1.0
    adv = res["adversarial"]["image"]
    assert adv["accuracy"][0] == pytest.approx(res["accuracy"])
    assert adv["accuracy"][1] <= adv["accuracy"][0]  # an attack never helps
    assert (tmp_path / "cm.png").stat().st_size > 1000
    _attacked_images_stay_in_pixel_range(clf, manifest)


def _attacked_images_stay_in_pixel_range(clf_dir: Path, manifest: Path) -> None:
    """FGSM/PGD with a huge budget: the images the encoder sees stay in the pixel range [0, 1]
    (in the tower's normalised units), i.e. the attacks are clamped to the valid input range."""
    from modalign.finetune.classifier import load_classifier
    from modalign.finetune.robustness import adversarial

    clf = load_classifier(clf_dir)
    spec = clf.model.modality_specs()["image"]
    encode, seen = clf.model.encoder.encode, []

    def spy(modality, x):
        if modality == "image":
            seen.append(x.detach().clone())
        return encode(modality, x)

    clf.model.encoder.encode = spy
    for attack in ("fgsm", "pgd"):
        seen.clear()
        adversarial(
            clf, str(manifest), "image", eps=(0.0, 100.0), attack=attack, steps=2, max_items=8
        )
        adv = torch.cat(seen)
        assert torch.equal(spec.clamp(adv), adv)  # every attacked input is inside the range
        assert float(adv.abs().max()) < 10  # an unclamped eps=100 step would reach ~100


@pytest.mark.parametrize("method", ["self_training", "knn"])
def test_finetune_other_pseudo_labelers(
    trained: tuple[Path, Path], tmp_path: Path, method: str
) -> None:
    from modalign.config import load_config
    from modalign.finetune.pipeline import run_finetune

    manifest, out = trained
    cfg = load_config(
        "demo",
        [
            f"finetune.model={out}",
            f"finetune.train={manifest}",
            f"finetune.test={manifest}",
            "finetune.class_names=[]",
            "finetune.labels_per_class=2",
            "finetune.epochs=2",
            "finetune.min_steps=0",
            f"finetune.pseudo_label={method}",
            "finetune.threshold_policy=flexmatch",
            "finetune.tau=0.0",
            "finetune.threshold=0.0",
            "finetune.rounds=2",
        ],
    ).finetune
    res = run_finetune(cfg, tmp_path / "clf")
    assert res.pseudo[0]["method"].startswith(method)
    assert res.pseudo[0]["num_rows"] == 32 - 2 * 4
    assert res.pseudo[0]["accuracy"] is not None  # true labels exist, so accuracy is reported
    assert set(res.fused["by_subset"]) == {"audio+image", "audio", "image"}


def test_data_inspect_and_pack(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    manifest = write_tiny_corpus(tmp_path / "c", n=12)
    (tmp_path / "c" / "img" / "3.png").write_bytes(b"")  # one zero-byte image
    res = run_json(capsys, ["data", "inspect", str(manifest)])
    assert res["items"] == 12 and res["bad"] == 1 and res["ok"] == 11
    assert res["bad_by_reason"] == {"empty_file": 1}
    assert {"image", "audio", "text"} <= set(res["modalities"])
    packed = run_json(
        capsys,
        ["data", "pack", str(manifest), "--out", str(tmp_path / "shards"), "--shard-size", "5"],
    )
    assert packed["shards"] == 3
    again = run_json(capsys, ["data", "inspect", packed["pattern"]])
    assert again["items"] == 12 and again["ok"] == 12  # the bad image was left out of the shard


@pytest.mark.slow
def test_index_add_and_wrong_model(
    trained: tuple[Path, Path], capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    manifest, out = trained
    extra = write_tiny_corpus(tmp_path / "more", n=8, seed=5)
    extra.write_text(extra.read_text().replace('"item', '"more'))  # new ids
    build_index(capsys, out, manifest, tmp_path / "idx")
    res = run_json(
        capsys,
        [
            "index",
            "add",
            "--index",
            str(tmp_path / "idx"),
            "--model",
            str(out),
            "--data",
            str(extra),
        ],
    )
    assert res["added"]["image"] == 8 and res["total"]["image"] == 40
    hits = run_json(
        capsys,
        [
            "search",
            "--index",
            str(tmp_path / "idx"),
            "--text",
            "the sound one",
            "-k",
            "40",
            "--target",
            "image",
        ],
    )
    assert any(h["id"].startswith("more") for h in hits["results"])
    # an index queried with a different model is refused
    other = tmp_path / "other"
    sets = [x for o in tiny_overrides(manifest, other, steps=1, batch=16) for x in ("--set", o)]
    assert main(["-q", "pretrain", "demo", *sets, "--set", "train.seed=9"]) == 0
    capsys.readouterr()
    assert (
        main(["search", "--index", str(tmp_path / "idx"), "--text", "x", "--model", str(other)])
        == 2
    )
    assert "rebuild the index" in capsys.readouterr().err


@pytest.mark.slow
def test_pretrain_from_webdataset_shards(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    manifest = write_tiny_corpus(tmp_path / "c", n=16)
    packed = run_json(
        capsys,
        ["data", "pack", str(manifest), "--out", str(tmp_path / "shards"), "--shard-size", "8"],
    )
    sets = [
        x
        for o in tiny_overrides(Path(packed["pattern"]), tmp_path / "m", steps=2, batch=8)
        for x in ("--set", o)
    ]
    res = run_json(capsys, ["pretrain", "demo", *sets])
    assert res["steps"] == 2 and (tmp_path / "m" / "model.safetensors").is_file()


def test_search_bad_input(
    trained: tuple[Path, Path], capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    manifest, out = trained
    idx = tmp_path / "idx"
    run_json(
        capsys,
        [
            "index",
            "build",
            "--model",
            str(out),
            "--data",
            str(manifest),
            "--out",
            str(idx),
            "--target-recall",
            "0.9",
        ],
    )
    cases = [
        (["--text", "   "], "query is empty"),
        (["--text", "x", "--target", "depth"], "has no ['depth'] vectors"),
        (["--image", str(tmp_path / "missing.png")], "file not found"),
    ]
    for extra, needle in cases:
        assert main(["search", "--index", str(idx), *extra]) == 2
        assert needle in capsys.readouterr().err
    (idx / "image" / "index.faiss").write_bytes(b"garbage")
    assert main(["search", "--index", str(idx), "--text", "x"]) == 2
    assert "index.faiss" in capsys.readouterr().err
    (idx / "index.json").write_text("{not json")
    assert main(["search", "--index", str(idx), "--text", "x"]) == 2
    assert "corrupt modalign index metadata" in capsys.readouterr().err


def test_embed_out_of_another_corpus_is_refused(
    trained: tuple[Path, Path], capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    manifest, out = trained
    other = write_tiny_corpus(tmp_path / "other", n=12, seed=3)
    emb = tmp_path / "emb"
    base = ["embed", "--model", str(out), "--out", str(emb), "--shard-rows", "10"]
    assert run_json(capsys, [*base, "--data", str(manifest)])["written"] == 4
    assert main([*base, "--data", str(other)]) == 2
    err = capsys.readouterr().err
    assert "another model, corpus or settings" in err and "source" in err
    assert main([*base[:-1], "16", "--data", str(manifest)]) == 2  # other shard size
    assert "shard_rows" in capsys.readouterr().err


@pytest.mark.parametrize("item_id", ["a\nb", "c\rd", "e\u2028f", "g\u2029h", "i\u0085j"])
def test_embed_refuses_ids_with_line_separators_naming_the_line(
    trained: tuple[Path, Path], capsys: pytest.CaptureFixture[str], tmp_path: Path, item_id: str
) -> None:
    """Issue 21 item 16: such an id is refused where the row is read (before any embedding)."""
    _, out = trained
    manifest = write_tiny_corpus(tmp_path / "c", n=6)
    rows = [json.loads(line) for line in manifest.read_text().splitlines()]
    rows[2]["id"] = item_id
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))
    emb = tmp_path / "emb"
    argv = ["embed", "--model", str(out), "--data", str(manifest), "--out", str(emb)]
    assert main(argv) == 2
    assert f"{manifest}:3: id" in capsys.readouterr().err
    assert not list(emb.glob("**/*.npy"))  # nothing embedded


@pytest.mark.slow
def test_shard_patterns_for_every_corpus_command(
    trained: tuple[Path, Path], capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    manifest, out = trained
    pattern = run_json(
        capsys, ["data", "pack", str(manifest), "--out", str(tmp_path / "sh"), "--shard-size", "8"]
    )["pattern"]
    emb = run_json(capsys, ["embed", "--model", str(out), "--data", pattern, "--out",
                            str(tmp_path / "emb"), "--shard-rows", "10"])  # fmt: skip
    assert emb["shards"] == 4 and emb["written"] == 4
    ev = run_json(capsys, ["evaluate", "retrieval", "--model", str(out), "--data", pattern])
    ev_manifest = run_json(
        capsys, ["evaluate", "retrieval", "--model", str(out), "--data", str(manifest)]
    )
    assert ev["pairs"] == ev_manifest["pairs"]  # same items, same order, same metrics
    res = build_index(capsys, out, Path(pattern), tmp_path / "idx", "--target-recall", "0.9")
    assert res["modalities"]["image"]["items"] == 32
    hits = run_json(capsys, ["search", "--index", str(tmp_path / "idx"), "--query",
                             "text=the sound two", "--query", f"image={manifest.parent}/img/2.png",
                             "-k", "2"])  # fmt: skip
    assert [q["query"] for q in hits["queries"]] == [
        {"text": "the sound two"},
        {"image": f"{manifest.parent}/img/2.png"},
    ]
    assert all(len(q["results"]) == 2 for q in hits["queries"])
    assert main(["search", "--index", str(tmp_path / "idx"), "--query", "depth=x.npy"]) == 2
    assert "no 'depth' modality" in capsys.readouterr().err


@pytest.mark.slow
def test_img2dataset_shards_embed_index_search_evaluate(
    trained: tuple[Path, Path], capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    """jpg/txt/json shards as img2dataset writes them, through every corpus command."""
    from helpers.data import jpeg_bytes, write_shard

    _, out = trained
    samples = [
        {"__key__": f"{i:09d}", "jpg": jpeg_bytes(32, seed=i), "txt": f"a photo number {i}",
         "json": json.dumps({"key": f"{i:09d}", "caption": f"a photo number {i}",
                             "status": "success"})}
        for i in range(6)
    ]  # fmt: skip
    folder = tmp_path / "i2d"
    write_shard(folder / "00000.tar", samples[:4])
    write_shard(folder / "00001.tar", samples[4:])
    pattern = str(folder / "{00000..00001}.tar")
    for src in (pattern, str(folder)):
        emb = run_json(capsys, ["embed", "--model", str(out), "--data", src, "--out",
                                str(tmp_path / f"emb-{len(src)}"), "--shard-rows", "4"])  # fmt: skip
        assert (emb["shards"], emb["written"]) == (2, 2)
    ev = run_json(capsys, ["evaluate", "retrieval", "--model", str(out), "--data", pattern])
    assert set(ev["pairs"]) == {"image->text", "text->image"} and ev["bad_items"] == 0
    build_index(capsys, out, Path(pattern), tmp_path / "idx", "--target-recall", "0.9")
    hits = run_json(capsys, ["search", "--index", str(tmp_path / "idx"), "--query",
                             "text=a photo number 3", "-k", "6"])  # fmt: skip
    assert {h["modality"] for h in hits["results"]} == {"image"} and len(hits["results"]) == 6
