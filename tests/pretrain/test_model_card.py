"""The model card of a bundle (issue 23 item 3): written by pretrain with Hugging Face style
front matter, updated by `evaluate`, never clobbered when edited or foreign, outside the bundle's
verified files; a copied or hub-cache (symlinked) bundle stays loadable."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from modalign.cli import main
from modalign.pretrain import load_bundle, read_card, update_card_metrics
from modalign.pretrain.bundle.card import card_is_ours

from helpers.corpus import tiny_overrides, write_tiny_corpus


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """`modalign pretrain` (1 step) from image init weights that carry an MIT model card, then
    `modalign evaluate retrieval` on the same bundle."""
    import timm

    root = tmp_path_factory.mktemp("card")
    manifest = write_tiny_corpus(root / "corpus", n=8)
    init = root / "init"
    init.mkdir()
    torch.manual_seed(0)
    src = timm.create_model("test_resnet", num_classes=0, in_chans=1)
    save_file({k: v.contiguous() for k, v in src.state_dict().items()}, init / "w.safetensors")
    (init / "README.md").write_text("---\nlicense: mit\n---\n# init weights\n")
    out = root / "model"
    sets = [*tiny_overrides(manifest, out, steps=1, batch=8), "model.modalities=[image,audio]",
            f"model.towers.image.weights={init / 'w.safetensors'}", "train.checkpoint_every=0",
            "data.num_workers=0"]  # fmt: skip
    assert main(["-q", "pretrain", "demo", "--set", *sets]) == 0
    fresh = root / "fresh"
    shutil.copytree(out, fresh)  # the card as pretrain wrote it, before evaluate updates it
    return {"root": root, "out": out, "fresh": fresh, "manifest": manifest, "init": init}


def test_pretrain_writes_a_sealed_card_outside_the_verified_files(run) -> None:
    from huggingface_hub import ModelCard

    fresh = run["fresh"]
    text = (fresh / "README.md").read_text()
    assert card_is_ours(text)
    assert "README.md" not in json.loads((fresh / "modalign.json").read_text())["files"]
    card = ModelCard.load(fresh / "README.md")  # the hub client's own parser
    assert card.data.library_name == "modalign" and card.data.license == "mit"
    assert {"modalign", "image", "audio"} <= set(card.data.tags)
    ma = read_card(fresh)["modalign"]
    assert ma["embed_dim"] == 16 and ma["modalities"] == ["image", "audio"]
    image = ma["towers"]["image"]
    assert image["license"] == "mit" and image["source"] == "local"
    assert image["sha256"] == {"w.safetensors": _sha(run["init"] / "w.safetensors")}
    assert ma["towers"]["audio"]["source"] == "scratch"
    assert ma["command"].startswith("modalign -q pretrain demo --set data.train=")
    td = ma["training_data"]
    assert td["sources"] == str(run["manifest"]) and td["rows"] == td["samples_seen"] == 8
    assert td["bad_items"] == 0 and ma["metrics"] is None
    assert "## Towers" in card.text and "| image | timm_image | test_resnet |" in card.text


def test_evaluate_puts_its_metrics_with_intervals_into_the_card(run, capsys) -> None:
    out = run["out"]
    capsys.readouterr()
    argv = ["evaluate", "retrieval", "--model", str(out), "--data", str(run["manifest"]), "--json"]
    assert main(argv) == 0
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert printed["model_card"]["written"] is True
    text = (out / "README.md").read_text()
    assert card_is_ours(text)
    met = read_card(out)["modalign"]["metrics"]
    assert met["source"] == "evaluate retrieval" and met["data"] == str(run["manifest"])
    assert met["command"] == "modalign " + " ".join(argv)
    rows = {r["name"]: r for r in met["results"]}
    r1 = rows["audio->image recall@1"]
    assert r1["value"] == printed["pairs"]["audio->image"]["recall@1"]
    assert r1["ci_low"] <= r1["value"] <= r1["ci_high"] and r1["n"] == 8
    assert r1["method"] == "wilson"
    assert "| audio->image recall@1 |" in text
    # the update ran under the folder's lock and kept the kind the lock records (a bundle)
    assert (out / ".modalign.lock").read_text().split()[1] == "modalign.model-bundle"
    load_bundle(out)  # still loads: the card is not part of the verified files


def test_edited_or_foreign_readme_is_never_replaced(run, tmp_path: Path) -> None:
    edited = tmp_path / "edited"
    shutil.copytree(run["fresh"], edited)  # a plain copy stays loadable
    card = edited / "README.md"
    card.write_text(card.read_text() + "\nMy own notes.\n")  # a user (or hub client) edit
    before = card.read_bytes()
    assert load_bundle(edited).fingerprint  # editing the card never breaks loading
    result = update_card_metrics(edited, [], "evaluate retrieval")
    assert not result.written and "edited since" in result.reason
    assert card.read_bytes() == before
    # a hub client rewriting the front matter (huggingface_hub's own ModelCard API)
    from huggingface_hub import ModelCard

    hub = ModelCard.load(card)
    hub.data.tags = [*hub.data.tags, "audio-retrieval"]
    hub.save(card)
    assert load_bundle(edited).fingerprint
    assert not update_card_metrics(edited, [], "benchmark demo").written
    assert "audio-retrieval" in read_card(edited)["tags"]
    card.write_text("# Notes of my own\n")  # not a modalign card at all
    assert not update_card_metrics(edited, [], "evaluate retrieval").written
    assert card.read_text() == "# Notes of my own\n"
    # saving the bundle again (e.g. a later run into the same folder) leaves it alone too
    from modalign.pretrain import save_bundle

    model = load_bundle(edited)
    save_bundle(edited, model.encoder, model.cfg)
    assert card.read_text() == "# Notes of my own\n"
    card.unlink()  # a bundle without a card (older modalign) gets one on the next update
    assert update_card_metrics(edited, [], "evaluate retrieval").written
    assert card_is_ours(card.read_text())


def test_hub_cache_layout_with_symlinked_files_loads(run, tmp_path: Path) -> None:
    """huggingface_hub's snapshot_download layout: snapshots/<rev>/<file> are relative symlinks
    to blobs/<hash> (built here by hand: no network)."""
    repo = tmp_path / "models--me--bundle"
    (repo / "blobs").mkdir(parents=True)
    snap = repo / "snapshots" / ("0" * 40)
    snap.mkdir(parents=True)
    for f in sorted(run["fresh"].iterdir()):
        if f.is_file() and not f.name.startswith("."):
            blob = repo / "blobs" / _sha(f)
            shutil.copyfile(f, blob)
            os.symlink(os.path.relpath(blob, snap), snap / f.name)
    assert (snap / "model.safetensors").is_symlink()
    import modalign

    model = modalign.load(snap, device="cpu")
    direct = load_bundle(run["fresh"])
    x = torch.randn(2, 1, 16, 16)
    with torch.no_grad():
        assert torch.equal(model.encoder.encode("image", x), direct.encoder.encode("image", x))
    blob = (snap / "README.md").resolve()
    blob_bytes = blob.read_bytes()
    assert update_card_metrics(snap, [], "evaluate retrieval").written
    assert not (snap / "README.md").is_symlink()  # the link was replaced...
    assert blob.read_bytes() == blob_bytes  # ...never written through into the shared blob
    assert load_bundle(snap).fingerprint == direct.fingerprint


def test_benchmark_figures_become_card_rows() -> None:
    from modalign.benchmark.run import card_rows

    fig = {"value": 0.5, "ci_low": 0.3, "ci_high": 0.7, "n": 24, "method": "wilson"}
    entry = {"corpora": {"tiny": {"tasks": {"retrieval": {"kind": "retrieval", "result": {
        "pairs": {"audio->image": {"recall@1": fig}}}}}}}}  # fmt: skip
    assert card_rows(entry) == [
        {"name": "tiny/retrieval/audio->image/recall@1", **fig},
    ]
