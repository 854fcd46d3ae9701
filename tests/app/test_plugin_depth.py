"""The installable depth plugin (tests/plugins/modalign-depth) end to end through every command.

The plugin adds a ``depth`` modality and a ``depth_cnn`` tower through entry points only;
modalign finds both through its registries (no builders passed anywhere). Install it with
``pip install -q -e tests/plugins/modalign-depth --no-deps``.
"""

from __future__ import annotations

import json
from importlib.metadata import PackageNotFoundError, distribution
from pathlib import Path

import numpy as np
import pytest

from modalign.cli import main

from helpers.corpus import WORDS, tiny_overrides, write_tiny_corpus

try:
    distribution("modalign-depth")
except PackageNotFoundError:
    pytest.skip(
        "the modalign-depth plugin is not installed; run "
        "`pip install -q -e tests/plugins/modalign-depth --no-deps`",
        allow_module_level=True,
    )

SIDE = 16


def run_json(capsys: pytest.CaptureFixture[str], argv: list[str]) -> dict:
    code = main([*argv, "--json"])
    captured = capsys.readouterr()
    assert code == 0, captured.err[-3000:]
    lines = [line for line in captured.out.splitlines() if line.strip()]
    assert len(lines) == 1, captured.out
    return json.loads(lines[0])


def depth_corpus(root: Path, n: int = 24, seed: int = 0) -> Path:
    """image + text + a class-dependent depth map per row (every 5th row has none)."""
    manifest = write_tiny_corpus(root, n=n, seed=seed)
    rows = [json.loads(line) for line in manifest.read_text().splitlines()]
    (root / "depth").mkdir()
    rng = np.random.default_rng(seed)
    for i, row in enumerate(rows):
        del row["audio"]
        if i % 5 == 4:
            continue
        label = WORDS.index(row["label"])
        depth = np.abs(rng.normal(size=(SIDE, SIDE))).astype(np.float32)
        depth[:, label * 4 : label * 4 + 4] += 6.0
        np.save(root / "depth" / f"{i}.npy", depth)
        row["depth"] = f"depth/{i}.npy"
    out = root / "depth.jsonl"
    out.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return out


def model_sets(data: Path, out: Path, steps: int = 3) -> list[str]:
    """``--set`` words for an image + depth + text model, several pairs after one flag."""
    pairs = [
        *[o for o in tiny_overrides(data, out, steps=steps, batch=8) if "audio" not in o],
        "model.modalities=[image,depth,text]",
        "model.towers.depth.kind=depth_cnn",
        "data.modalities.depth.side=16",
        "train.checkpoint_every=0",
    ]
    return ["--set", *pairs]


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("depth")
    return {"root": root, "train": depth_corpus(root / "train"),
            "test": depth_corpus(root / "test", n=16, seed=1)}  # fmt: skip


def test_every_command_on_a_depth_corpus(
    world: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    root, train, test = world["root"], world["train"], world["test"]
    info = run_json(capsys, ["data", "inspect", str(train)])
    assert "depth" in json.dumps(info)
    packed = run_json(capsys, ["data", "pack", str(train), "--out", str(root / "shards"),
                               "--shard-size", "8"])  # fmt: skip
    shards = packed["pattern"]

    model = root / "model"
    res = run_json(capsys, ["pretrain", "demo", *model_sets(train, model)])
    assert res["steps"] == 3
    meta = json.loads((model / "modalign.json").read_text())
    assert meta["plugins"]["towers"]["depth"]["provider"] == "modalign-depth"
    assert meta["plugins"]["modalities"]["depth"]["provider"] == "modalign-depth"
    res = run_json(capsys, ["pretrain", "demo", *model_sets(Path(shards), root / "m2", 2)])
    assert res["steps"] == 2 and (root / "m2" / "model.safetensors").is_file()

    emb = run_json(capsys, ["embed", "--model", str(model), "--data", shards, "--out",
                            str(root / "emb"), "--shard-rows", "10"])  # fmt: skip
    assert emb["shards"] == 3 and emb["written"] == 3
    idx = root / "idx"
    built = run_json(capsys, ["index", "build", "--embeddings", str(root / "emb"), "--out",
                              str(idx), "--target-recall", "0.9"])  # fmt: skip
    assert built["modalities"]["depth"]["items"] == 20  # 24 rows, every 5th without depth
    query = train.parent / "depth" / "2.npy"
    hits = run_json(capsys, ["search", "--index", str(idx), "--query", f"depth={query}",
                             "--target", "image", "-k", "3"])  # fmt: skip
    assert hits["query"] == {"depth": str(query)} and len(hits["results"]) == 3
    assert all(h["modality"] == "image" for h in hits["results"])

    ev = run_json(capsys, ["evaluate", "retrieval", "--model", str(model), "--data", shards])
    assert any(p.startswith("depth->") for p in ev["pairs"])

    clf = root / "clf"
    ft = [f"finetune.model={model}", f"finetune.train={train}", f"finetune.test={test}",
          f"finetune.out={clf}", f"finetune.class_names=[{','.join(WORDS)}]",
          "finetune.inputs=[image,depth]", "finetune.labels_per_class=2", "finetune.epochs=5",
          "finetune.min_steps=0", "finetune.threshold=0.0"]  # fmt: skip
    res = run_json(capsys, ["finetune", "demo", "--set", *ft])
    assert "depth" in json.dumps(res["fused"]["by_subset"])
    cl = run_json(capsys, ["evaluate", "classify", "--model", str(clf), "--data", str(test),
                           "--drop", "depth"])  # fmt: skip
    assert set(cl["by_subset"]) == {"image"}
    pred = run_json(capsys, ["predict", "--model", str(clf), "--data", str(test)])
    assert len(pred["predictions"]) == 16


def test_bundle_naming_a_missing_plugin_is_refused(
    world: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    root, train = world["root"], world["train"]
    model = root / "missing"
    run_json(capsys, ["pretrain", "demo", *model_sets(train, model, steps=1)])
    meta_path = model / "modalign.json"
    meta = json.loads(meta_path.read_text())
    meta["plugins"]["towers"]["depth"] = {"name": "depth_cnn_v9", "provider": "modalign-depth9",
                                          "version": "9"}  # fmt: skip
    meta_path.write_text(json.dumps(meta))
    code = main(["evaluate", "retrieval", "--model", str(model), "--data", str(train)])
    assert code == 2
    err = capsys.readouterr().err
    assert "modalign-depth9" in err and "pip install modalign-depth9" in err
