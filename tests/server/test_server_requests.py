"""Malformed requests get a 4xx naming the field, never a 500 (issue 21 item 11): a ``k`` of
non-ASCII digits (``"²".isdigit()`` is True), a lone surrogate in a string, JSON nested
100,000 deep, a 5,000-digit integer."""

from __future__ import annotations

import httpx
import pytest
from test_server import LIMITS, error_field

from modalign.server import ServeSettings
from modalign.server.app import create_app
from modalign.server.searcher import Searcher

from helpers.serve import ThreadedServer, TinyIndex, tiny_index_once


@pytest.fixture(scope="module")
def client(tmp_path_factory: pytest.TempPathFactory):
    tiny: TinyIndex = tiny_index_once(tmp_path_factory.getbasetemp())
    searcher = Searcher.open(tiny.index)
    app = create_app(searcher, ServeSettings(limits=LIMITS))
    with ThreadedServer(app) as srv, httpx.Client(base_url=srv.url, timeout=60) as c:
        yield c


JSON = {"content-type": "application/json"}
DEEP = b"[" * 100_000 + b"]" * 100_000


@pytest.mark.parametrize(
    ("path", "body", "field"),
    [
        ("/search", '{"text": "x", "k": "\u00b2"}'.encode(), "k"),
        ("/search", b'{"text": "x", "k": "\\u0663"}', "k"),  # Arabic-Indic three
        ("/search", b'{"text": "a \\ud800 b"}', "text"),
        ("/search", b'{"te\\udfffxt": "a"}', "body"),
        ("/search", b'{"text": "x", "k": ' + DEEP + b"}", "body"),
        ("/search", b'{"text": "x", "k": 1' + b"0" * 5000 + b"}", "k"),
        ("/search", b'{"text": "x", "k": "1' + b"0" * 5000 + b'"}', "k"),
        ("/knn-service", b'{"text": "x", "num_images": "\xc2\xb2"}', "num_images"),
        ("/knn-service", b'{"text": "\\udc80", "num_images": 2}', "text"),
        (
            "/knn-service",
            b'{"text": "x", "num_result_ids": 9' + b"9" * 5000 + b"}",
            "num_result_ids",
        ),
        ("/metadata", b'{"ids": [1' + b"0" * 5000 + b"]}", "ids"),
        ("/metadata", b'{"ids": ' + DEEP + b"}", "body"),
    ],
)
def test_malformed_json_gets_a_4xx_naming_the_field(
    client: httpx.Client, path: str, body: bytes, field: str
) -> None:
    res = client.post(path, content=body, headers=JSON)
    assert 400 <= res.status_code < 500, (res.status_code, res.text[:300])
    assert error_field(res) == field, res.text[:300]


def test_multipart_k_of_non_ascii_digits_is_a_400(client: httpx.Client) -> None:
    png = b"\x89PNG\r\n\x1a\n" + b"\0" * 64  # k is checked before the upload is decoded
    res = client.post("/search", files={"image": ("x.png", png)}, data={"k": "\u00b2"})
    assert res.status_code == 400 and error_field(res) == "k", res.text
    assert client.post("/search", json={"text": "the sound one"}).status_code == 200  # still up
