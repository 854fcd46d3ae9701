"""clip-front against this server (issue 21 item 6), with clip-front's own request shapes:
``num_result_ids: 3000`` (its default), ``text: ""`` beside a base64 ``image``, the download
button's ``num_images = num_result_ids = 10000``, then ``/metadata`` with only
``{ids, indice_name}``. Ids mean the same item in ``/metadata`` whatever modality was searched,
also when some items have no image (rows of the text and image indexes then differ)."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import httpx
import pytest

from modalign.server import ServeLimits, ServeSettings
from modalign.server.app import create_app
from modalign.server.searcher import Searcher

from helpers.serve import ThreadedServer, tiny_index_once


@pytest.fixture(scope="module")
def partial_index(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny model's corpus with every third item's image removed, indexed."""
    from modalign.pretrain.bundle import load_bundle
    from modalign.retrieval.embed import embed_source
    from modalign.retrieval.index.corpus import build_corpus_index

    tiny = tiny_index_once(tmp_path_factory.getbasetemp())
    rows = [json.loads(x) for x in tiny.corpus.read_text().splitlines()]
    for i, row in enumerate(rows):
        if i % 3 == 0:
            row.pop("image")
    manifest = tiny.corpus.parent / "partial.jsonl"
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path_factory.mktemp("partial") / "index"
    model = load_bundle(tiny.model)
    emb, _ = embed_source(model, manifest, batch_size=32)
    build_corpus_index(emb, out, model.fingerprint, str(tiny.model.resolve()))
    return out


def _client(index: Path, limits: ServeLimits | None = None):
    settings = ServeSettings() if limits is None else ServeSettings(limits=limits)
    return ThreadedServer(create_app(Searcher.open(index), settings))


def front(**query) -> dict:
    """clip-front's callClip body (clip-service.js), with its defaults."""
    body = {"text": None, "image": None, "image_url": None, "embedding_input": None,
            "modality": "image", "num_images": 40, "indice_name": "index",
            "num_result_ids": 3000, "use_mclip": False, "deduplicate": True,
            "use_safety_model": True, "use_violence_detector": True,
            "aesthetic_score": "9", "aesthetic_weight": "0.5"}  # fmt: skip
    return {**body, **query}


def test_ids_mean_the_same_item_in_metadata_whatever_was_searched(partial_index: Path) -> None:
    with _client(partial_index) as srv, httpx.Client(base_url=srv.url, timeout=60) as c:
        for modality in ("text", "image", "audio"):
            res = c.post(
                "/knn-service", json=front(text="the sound one", modality=modality, num_images=4)
            )
            assert res.status_code == 200, res.text
            results = res.json()
            full, rest = results[:4], results[4:]
            assert rest and all(set(r) == {"id", "similarity"} for r in rest)
            # what clip-front does next: metadata for the ids past the first page
            asked = [r["id"] for r in rest[:40]]
            meta = c.post("/metadata", json={"ids": asked, "indice_name": "index"})
            assert meta.status_code == 200, meta.text
            again = c.post(
                "/knn-service",
                json=front(text="the sound one", modality=modality, num_images=4 + len(asked)),
            )
            expected = {r["id"]: r["item_id"] for r in again.json()}
            assert [m["metadata"]["item_id"] for m in meta.json()] == [expected[i] for i in asked]
            by_id = c.post("/metadata", json={"ids": [r["id"] for r in full]}).json()
            assert [m["metadata"]["item_id"] for m in by_id] == [r["item_id"] for r in full]


def test_clip_front_request_shapes_work_with_default_settings(partial_index: Path) -> None:
    tiny_png = next((partial_index.parent.parent).rglob("*.png"), None)
    with _client(partial_index) as srv, httpx.Client(base_url=srv.url, timeout=60) as c:
        ok = c.post("/knn-service", json=front(text="the sound two"))  # num_result_ids 3000
        assert ok.status_code == 200, ok.text
        image = base64.b64encode(
            tiny_png.read_bytes() if tiny_png else _any_png(c, ok.json())
        ).decode()
        by_image = c.post("/knn-service", json=front(text="", image=image, modality="text"))
        assert by_image.status_code == 200, by_image.text  # text "" beside the image
        download = c.post(
            "/knn-service", json=front(text="the sound two", num_images=10000, num_result_ids=10000)
        )
        assert download.status_code == 400, download.text
        error = download.json()["error"]
        assert error["field"] == "num_images" and "--max-k" in error["message"]
        too_many = c.post("/knn-service", json=front(text="x", num_result_ids=20000))
        assert too_many.status_code == 400 and "--max-result-ids" in too_many.text
    raised = ServeLimits(max_k=10000)
    with _client(partial_index, raised) as srv, httpx.Client(base_url=srv.url, timeout=60) as c:
        download = c.post(
            "/knn-service", json=front(text="the sound two", num_images=10000, num_result_ids=10000)
        )
        assert download.status_code == 200, download.text


def _any_png(c: httpx.Client, results: list[dict]) -> bytes:
    return c.get(next(r["url"] for r in results if "url" in r)).content
