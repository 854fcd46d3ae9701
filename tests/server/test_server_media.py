"""Uploads are bounded by decoded memory (issue 21 item 9) and media are served as what their
bytes are (item 10).

* A 16-bit PNG of 7990x7990 pixels is 128 KB on the wire and gigabytes decoded: refused with
  413 from its header alone (the decode never starts); while other decodes hold the server's
  total, a new upload gets 429; the reservation is released when a decode ends.
* ``/media`` sniffs the bytes: a PNG with HTML appended, named ``evil.html``, is served as
  ``image/png`` with ``nosniff`` and a sandboxing CSP; a listed file whose bytes are no type the
  modality declares is not served at all.
"""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from modalign.core.errors import UserInputError
from modalign.data.media import image_decode_bytes, sniff_audio, sniff_image
from modalign.server import ServeLimits, ServeSettings
from modalign.server.app import create_app
from modalign.server.searcher import Searcher

from helpers.serve import ThreadedServer, tiny_index_once

MIB = 1048576


def _png16(side: int) -> bytes:
    plane = np.zeros((side, side), np.uint16)
    plane[::97, ::89] = 60000
    buf = io.BytesIO()
    Image.fromarray(plane).save(buf, format="PNG", compress_level=9)
    return buf.getvalue()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory):
    return tiny_index_once(tmp_path_factory.getbasetemp())


def _inner(app):  # create_app wraps FastAPI in its guards; the state lives on FastAPI
    while not hasattr(app, "state"):
        app = app.app
    return app.state.modalign


def test_decode_cost_is_read_from_the_header() -> None:
    bomb = _png16(7990)
    assert len(bomb) < 200_000
    assert image_decode_bytes(bomb) > 1024 * MIB  # decoded bytes, not file bytes or pixels
    small = _png16(64)
    assert image_decode_bytes(small) < MIB
    with pytest.raises(ValueError):
        image_decode_bytes(b"not an image at all")


def test_a_decode_bomb_is_refused_before_decoding_and_the_total_is_bounded(tiny) -> None:
    searcher = Searcher.open(tiny.index)
    app = create_app(searcher, ServeSettings())  # default limits
    state = _inner(app)
    ok_png = (tiny.corpus.parent / "img" / "1.png").read_bytes()
    with ThreadedServer(app) as srv, httpx.Client(base_url=srv.url, timeout=60) as c:
        res = c.post("/search", files={"image": ("bomb.png", _png16(7990))})
        assert res.status_code == 413, res.text
        error = res.json()["error"]
        assert error["field"] == "image" and "--max-decode-mb" in error["message"]
        assert state.decoding == 0
        # other decodes hold all but one byte of the total: a new upload waits its turn (429)
        state.decoding = state.limits.max_decode_total_bytes - 1
        busy = c.post("/search", files={"image": ("a.png", ok_png)})
        assert busy.status_code == 429 and busy.json()["error"]["field"] == "image", busy.text
        state.decoding = 0
        fine = c.post("/search", files={"image": ("a.png", ok_png)})
        assert fine.status_code == 200, fine.text
        assert state.decoding == 0  # released once the decode ended


def test_serve_flags_set_the_decode_limits() -> None:
    import argparse

    from modalign.server import add_serve_command
    from modalign.server.command import settings_from_args

    parser = argparse.ArgumentParser()
    add_serve_command(parser.add_subparsers())
    args = parser.parse_args(
        ["serve", "--index", "x", "--max-decode-mb", "64", "--max-decode-total-mb", "128"]
    )
    limits = settings_from_args(args).limits
    assert (limits.max_decode_bytes, limits.max_decode_total_bytes) == (64 * MIB, 128 * MIB)
    with pytest.raises(UserInputError, match="max_decode_total_bytes"):
        ServeLimits(max_decode_bytes=2 * MIB, max_decode_total_bytes=MIB)


def test_media_types_come_from_the_bytes() -> None:
    png = _png16(8)
    assert sniff_image(png) == "image/png"
    assert sniff_image(png + b"<html><script>alert(1)</script></html>") == "image/png"
    assert sniff_image(b"<html><body>hi</body></html>") is None
    assert sniff_image(b"RIFF\x00\x00\x00\x00WAVEfmt ") is None
    assert sniff_audio(b"RIFF\x00\x00\x00\x00WAVEfmt ") == "audio/wav"
    assert sniff_audio(png) is None


@pytest.fixture(scope="module")
def evil_index(tiny, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """The tiny corpus with item0's image stored as ``evil.html`` (a PNG with HTML appended)."""
    from modalign.pretrain.bundle import load_bundle
    from modalign.retrieval.embed import embed_source
    from modalign.retrieval.index.corpus import build_corpus_index

    root = tmp_path_factory.mktemp("evil")
    shutil.copytree(tiny.corpus.parent / "img", root / "img")
    shutil.copytree(tiny.corpus.parent / "wav", root / "wav")
    evil = root / "img" / "evil.html"
    evil.write_bytes((root / "img" / "0.png").read_bytes() + b"<html><script>alert(1)</script>")
    rows = [json.loads(x) for x in tiny.corpus.read_text().splitlines()]
    rows[0]["image"] = "img/evil.html"
    manifest = root / "train.jsonl"
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))
    model = load_bundle(tiny.model)
    emb, _ = embed_source(model, manifest, batch_size=32)
    build_corpus_index(emb, root / "index", model.fingerprint, str(tiny.model.resolve()))
    return root / "index", root


def test_media_is_served_as_its_bytes_with_nosniff_and_csp(evil_index) -> None:
    index, root = evil_index
    searcher = Searcher.open(index)
    item = searcher.index.item("image", "item0")
    assert item is not None and str(item["value"]).endswith("evil.html")
    with ThreadedServer(create_app(searcher)) as srv, httpx.Client(base_url=srv.url) as c:
        res = c.get("/media/image:item0")
        assert res.status_code == 200
        assert res.headers["content-type"] == "image/png"
        assert res.headers["x-content-type-options"] == "nosniff"
        csp = res.headers["content-security-policy"]
        assert "default-src 'none'" in csp and "sandbox" in csp
        every = {
            "text": "the sound zero",
            "target": "image",
            "k": len(searcher.index.indexes["image"]),
        }
        records = {r["id"]: r for r in c.post("/search", json=every).json()["results"]}
        assert records["item0"]["media_type"] == "image/png"
        assert records["item3"]["media_url"] == "/media/image%3Aitem3"
        assert c.get("/healthz").headers["x-content-type-options"] == "nosniff"
        # a listed file whose bytes became HTML is no declared image type: not served, and
        # search answers stop linking it (the type kept from an earlier answer is not reused)
        (root / "img" / "3.png").write_bytes(b"<html><script>alert(1)</script></html>")
        gone = c.get("/media/image:item3")
        assert gone.status_code == 404 and b"script" not in gone.content
        records = {r["id"]: r for r in c.post("/search", json=every).json()["results"]}
        assert records["item3"]["media_url"] is None and records["item3"]["media_type"] is None
        assert records["item0"]["media_type"] == "image/png"
