"""Index and classifier files verified (issue 21 items 5 and 8): every file a corpus index reads
is covered by its sha256 list (``items.jsonl`` included), a modality's vectors are bound to that
modality (swapped folders refused), ``classifier.json`` is sealed, and the server serves or
decodes only files under the corpus folders recorded at build time."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from modalign.core.artifact import atomic_files, check_seal
from modalign.core.errors import UserInputError
from modalign.retrieval.embed import Embeddings
from modalign.retrieval.index.corpus import CorpusIndex, build_corpus_index


def _files(root: Path, n: int) -> list[str]:
    root.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        (root / f"{i}.bin").write_bytes(f"item {i}".encode())
        paths.append(str(root / f"{i}.bin"))
    return paths


def _emb(modality: str, values: list[str], seed: int, prefix: str = "it") -> Embeddings:
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((len(values), 8)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    ids = [f"{prefix}{i}" for i in range(len(values))]
    return Embeddings(modality, ids, x, [None] * len(values), values)


@pytest.fixture
def index(tmp_path: Path) -> Path:
    emb = {
        "image": _emb("image", _files(tmp_path / "corpus" / "img", 12), 0),
        "audio": _emb("audio", _files(tmp_path / "corpus" / "wav", 12), 1),
        "text": _emb("text", [f"caption {i}" for i in range(12)], 2),
    }
    out = tmp_path / "index"
    build_corpus_index(emb, out, "fp")
    return out


def test_swapped_modality_folders_are_refused(index: Path) -> None:
    """``cp -r X/audio X/image``: the image folder now holds audio's vectors and ids."""
    shutil.rmtree(index / "image")
    shutil.copytree(index / "audio", index / "image")
    with pytest.raises(UserInputError, match=r"image/index.json: checksum does not match"):
        CorpusIndex.open(index)


def test_an_edited_items_file_is_refused(index: Path) -> None:
    items = (
        (index / "items.jsonl")
        .read_text()
        .replace(str(index.parent / "corpus" / "img" / "3.bin"), "/etc/passwd")
    )
    assert "/etc/passwd" in items
    (index / "items.jsonl").write_text(items)
    with pytest.raises(UserInputError, match=r"items.jsonl: checksum does not match"):
        CorpusIndex.open(index)


@pytest.mark.parametrize("dropped", ["items.jsonl", "audio/index.json"])
def test_a_file_without_a_recorded_checksum_is_refused(index: Path, dropped: str) -> None:
    meta = json.loads((index / "index.json").read_text())
    del meta["files"][dropped]
    (index / "index.json").write_text(json.dumps(meta))
    with pytest.raises(UserInputError, match=f"records no checksum for {dropped}"):
        CorpusIndex.open(index)


def test_an_index_without_checksums_is_refused_naming_the_rebuild(index: Path) -> None:
    meta = json.loads((index / "index.json").read_text())
    del meta["format_version"], meta["files"]  # what modalign 0.2 wrote
    (index / "index.json").write_text(json.dumps(meta))
    with pytest.raises(UserInputError, match="format version None.*modalign index build"):
        CorpusIndex.open(index)


def test_media_only_under_the_recorded_corpus_folders(index: Path, tmp_path: Path) -> None:
    opened = CorpusIndex.open(index)
    roots = opened.meta["media_roots"]
    assert roots == {
        "audio": [str((tmp_path / "corpus" / "wav").resolve())],
        "image": [str((tmp_path / "corpus" / "img").resolve())],
    }  # text values are no files: no root
    assert opened.media_path("image", "it3") == (tmp_path / "corpus" / "img" / "3.bin").resolve()
    assert opened.media_path("text", "it3") is None
    assert opened.allowed_file("image", "/etc/passwd") is None
    # image files are not audio files: each modality has its own folders
    assert opened.allowed_file("audio", str(tmp_path / "corpus" / "img" / "3.bin")) is None
    # a corpus file swapped for a symlink leading out of the corpus is not served
    secret = tmp_path / "secret.txt"
    secret.write_text("secret")
    victim = tmp_path / "corpus" / "img" / "3.bin"
    victim.unlink()
    os.symlink(secret, victim)
    assert opened.media_path("image", "it3") is None


def test_index_add_keeps_the_checksums_and_roots(index: Path, tmp_path: Path) -> None:
    opened = CorpusIndex.open(index)
    more = _files(tmp_path / "more", 3)
    opened.add({"image": _emb("image", more, 5, prefix="new")}, "fp")
    opened.save(index)
    again = CorpusIndex.open(index)
    assert len(again.indexes["image"]) == 15
    assert str((tmp_path / "more").resolve()) in again.meta["media_roots"]["image"]


def test_classifier_json_is_sealed(tmp_path: Path) -> None:
    from modalign.finetune.classifier import FORMAT, FORMAT_VERSION, load_classifier

    out = tmp_path / "clf"
    with atomic_files(out, "classifier.json", seal=True) as (tmp, meta):
        (tmp / "head.safetensors").write_bytes(b"weights")
        meta.update({"format": FORMAT, "format_version": FORMAT_VERSION, "class_names": ["a"]})
    sealed = json.loads((out / "classifier.json").read_text())
    check_seal(out / "classifier.json", sealed, "classifier bundle")  # intact: accepted
    sealed["class_names"] = ["b"]
    (out / "classifier.json").write_text(json.dumps(sealed))
    with pytest.raises(UserInputError, match="does not match its meta_sha256"):
        load_classifier(out)
    del sealed["meta_sha256"]
    (out / "classifier.json").write_text(json.dumps(sealed))
    with pytest.raises(UserInputError, match="no meta_sha256"):
        load_classifier(out)


def test_server_serves_and_decodes_only_files_under_the_corpus_roots(
    tmp_path_factory: pytest.TempPathFactory, tmp_path: Path
) -> None:
    """Issue 21 item 8 through the app: /media and a query by indexed id never open a file
    outside the folders recorded at build time."""
    import httpx

    from modalign.pretrain.bundle import load_bundle
    from modalign.retrieval.embed import embed_source
    from modalign.server.app import create_app
    from modalign.server.searcher import DecodeError, Searcher
    from modalign.server.settings import ServeSettings

    from helpers.serve import ThreadedServer, tiny_index_once

    tiny = tiny_index_once(tmp_path_factory.getbasetemp())
    corpus = tmp_path / "corpus"
    shutil.copytree(tiny.corpus.parent, corpus)
    model = load_bundle(tiny.model)
    emb, _ = embed_source(model, corpus / "train.jsonl", batch_size=32)
    build_corpus_index(emb, tmp_path / "index", model.fingerprint, str(tiny.model))
    searcher = Searcher.open(tmp_path / "index")
    secret = tmp_path / "secret.png"
    shutil.copy(corpus / "img" / "4.png", secret)
    (corpus / "img" / "3.png").unlink()
    os.symlink(secret, corpus / "img" / "3.png")  # a corpus file swapped for a way out
    with pytest.raises(DecodeError, match="not a file under the corpus folders"):
        searcher.decode("image", searcher.item("image", "item3")["value"])
    searcher.decode("image", searcher.item("image", "item4")["value"])  # inside: decoded
    with (
        ThreadedServer(create_app(searcher, ServeSettings())) as srv,
        httpx.Client(base_url=srv.url, timeout=30) as client,
    ):
        assert client.get("/media/image%3Aitem4").status_code == 200
        assert client.get("/media/image%3Aitem3").status_code == 404
        res = client.post("/search", json={"id": "item3", "modality": "image"})
        assert res.status_code in (400, 404, 422), res.text
