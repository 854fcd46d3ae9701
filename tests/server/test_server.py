"""``modalign serve``: every route on a real uvicorn server (loopback, free port), bad input,
auth, and concurrency (16 clients get exactly what sequential queries get)."""

from __future__ import annotations

import argparse
import base64
import json
import threading
from pathlib import Path

import httpx
import numpy as np
import pytest

from modalign.core.errors import UserInputError
from modalign.server import ServeLimits, ServeSettings, add_serve_command, cmd_serve
from modalign.server.app import create_app
from modalign.server.searcher import Searcher
from modalign.server.settings import check_bind, is_loopback, read_token

from helpers.serve import ThreadedServer, TinyIndex, tiny_index_once

LIMITS = ServeLimits(max_body_bytes=256 * 1024, max_k=20, max_query_chars=200)
TOKEN = "s3cret-token-for-tests-0123456789"


@pytest.fixture(scope="session")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> TinyIndex:
    return tiny_index_once(tmp_path_factory.getbasetemp())


@pytest.fixture(scope="module")
def searcher(tiny: TinyIndex) -> Searcher:
    return Searcher.open(tiny.index)


@pytest.fixture(scope="module")
def server(searcher: Searcher):
    with ThreadedServer(create_app(searcher, ServeSettings(limits=LIMITS))) as srv:
        yield srv


@pytest.fixture
def client(server: ThreadedServer):
    with httpx.Client(base_url=server.url, timeout=30) as c:
        yield c


def corpus_file(tiny: TinyIndex, rel: str) -> bytes:
    return (tiny.corpus.parent / rel).read_bytes()


def library_search(searcher: Searcher, modality: str, value, k: int, targets=None) -> list[dict]:
    """What ``modalign search --json`` computes: encode one query, search, Hit.to_dict()."""
    vec = searcher.model.encode(**{modality: [value]})[modality].numpy()
    targets = targets or list(searcher.default_targets(modality))
    return [h.to_dict() for h in searcher.index.search(vec, k=k, targets=targets)[0]]


def cli_shape(results: list[dict]) -> list[dict]:
    extra = {"caption", "media_url", "media_type"}
    return [{k: v for k, v in r.items() if k not in extra} for r in results]


def error_field(res: httpx.Response) -> str:
    return res.json()["error"]["field"]


# ------------------------------------------------------------------------------ routes


def test_healthz_info_and_page(client: httpx.Client, searcher: Searcher) -> None:
    assert client.get("/healthz").json() == {"status": "ok"}
    info = client.get("/info").json()
    assert info["model"]["fingerprint"] == searcher.model.fingerprint
    assert {m: s["items"] for m, s in info["index"]["modalities"].items()} == {
        "audio": 32,
        "image": 32,
        "text": 32,
    }
    assert info["query_modalities"]["text"]["inline"] is True
    assert ".png" in info["query_modalities"]["image"]["suffixes"]
    assert info["limits"]["max_k"] == LIMITS.max_k
    page = client.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    html = page.text
    assert 'id="results"' in html and "function searchText" in html and "<style>" in html
    assert "http://" not in html and "https://" not in html  # no CDN, nothing fetched elsewhere
    assert client.get("/indices-list").json() == ["index"]


def test_text_search_matches_cli_search(client: httpx.Client, searcher: Searcher) -> None:
    res = client.post("/search", json={"text": "the sound two", "k": 5})
    assert res.status_code == 200, res.text
    body = res.json()
    assert body["query"] == {"text": "the sound two"}
    assert cli_shape(body["results"]) == library_search(searcher, "text", "the sound two", 5)
    first = body["results"][0]
    assert first["modality"] in ("image", "audio") and first["media_url"].startswith("/media/")
    assert first["caption"].startswith("the sound ")  # the item's caption, from its text
    targeted = client.post("/search", json={"text": "the sound two", "k": 4, "target": ["text"]})
    hits = targeted.json()["results"]
    assert len(hits) == 4 and {h["modality"] for h in hits} == {"text"}
    assert all(h["text"] == h["caption"] and h["media_url"] is None for h in hits)


@pytest.mark.parametrize(("modality", "rel"), [("image", "img/5.png"), ("audio", "wav/6.wav")])
def test_upload_search(
    client: httpx.Client, searcher: Searcher, tiny: TinyIndex, modality: str, rel: str
) -> None:
    data = corpus_file(tiny, rel)
    res = client.post(
        "/search", files={modality: (Path(rel).name, data)}, data={"k": "6", "target": "text"}
    )
    assert res.status_code == 200, res.text
    assert cli_shape(res.json()["results"]) == library_search(searcher, modality, data, 6, ["text"])


def test_search_by_id_equals_uploading_its_file(client: httpx.Client, tiny: TinyIndex) -> None:
    by_id = client.post("/search", json={"id": "item9", "modality": "image", "k": 5})
    assert by_id.status_code == 200, by_id.text
    assert by_id.json()["query"] == {"id": "item9", "modality": "image"}
    upload = client.post(
        "/search", files={"image": ("9.png", corpus_file(tiny, "img/9.png"))}, data={"k": "5"}
    )
    assert by_id.json()["results"] == upload.json()["results"]
    ambiguous = client.post("/search", json={"id": "item9"})
    assert ambiguous.status_code == 400 and error_field(ambiguous) == "modality"


def test_knn_service_is_clip_retrieval_compatible(
    client: httpx.Client, searcher: Searcher, tiny: TinyIndex
) -> None:
    req = {"text": "the sound one", "modality": "image", "num_images": 3, "indice_name": "index"}
    res = client.post("/knn-service", json={**req, "deduplicate": True, "use_safety_model": False})
    assert res.status_code == 200, res.text
    results = res.json()
    assert isinstance(results, list) and len(results) == 3
    expected = library_search(searcher, "text", "the sound one", 3, ["image"])
    assert [r["item_id"] for r in results] == [e["id"] for e in expected]
    assert [r["similarity"] for r in results] == [e["score"] for e in expected]
    assert len({r["id"] for r in results}) == 3  # ids number items (see test_server_clip_front)
    assert all(r["url"].startswith("http://127.0.0.1:") for r in results)
    assert client.get(results[0]["url"]).content == Path(expected[0]["path"]).read_bytes()
    assert all(r["caption"].startswith("the sound ") for r in results)
    image = base64.b64encode(corpus_file(tiny, "img/2.png")).decode()
    by_image = client.post(
        "/knn-service", json={"image": image, "modality": "text", "num_images": 2}
    )
    assert [r["text"] for r in by_image.json()] == [
        e["text"]
        for e in library_search(searcher, "image", corpus_file(tiny, "img/2.png"), 2, ["text"])
    ]
    vec = searcher.model.encode(text=["the sound one"])["text"].numpy()[0]
    by_vec = client.post(
        "/knn-service", json={"embedding_input": vec.tolist(), "modality": "image", "num_images": 3}
    )
    assert [r["item_id"] for r in by_vec.json()] == [e["id"] for e in expected]
    # clip-front's exact request: null keys, num_result_ids beyond num_images, then /metadata
    front = {"text": "the sound one", "image": None, "image_url": None, "modality": "image",
             "num_images": 2, "indice_name": "index", "num_result_ids": 5, "use_mclip": False,
             "deduplicate": True, "use_safety_model": False}  # fmt: skip
    paged = client.post("/knn-service", content=json.dumps(front).encode()).json()  # no ctype
    more = client.post("/knn-service", json={**front, "num_images": 5}).json()
    assert [r["id"] for r in paged] == [r["id"] for r in more] and len(paged) == 5
    assert "caption" in paged[1] and set(paged[2]) == {"id", "similarity"}
    rows = [r["id"] for r in paged[2:]]
    meta = client.post("/metadata", json={"ids": rows, "indice_name": "index"})
    assert meta.status_code == 200, meta.text
    assert [m["id"] for m in meta.json()] == rows
    assert [m["metadata"]["item_id"] for m in meta.json()] == [r["item_id"] for r in more[2:]]
    assert [m["metadata"]["url"] for m in meta.json()] == [r["url"] for r in more[2:]]
    for body, field in (({"ids": [10_000]}, "ids"), ({"ids": "x"}, "ids"),
                        ({"ids": [1], "modality": "depth"}, "modality")):  # fmt: skip
        bad = client.post("/metadata", json=body)
        assert bad.status_code == 400 and error_field(bad) == field, bad.text
    for body, field in (
        (
            {"text": "x", "modality": "image", "num_images": 4, "num_result_ids": 2},
            "num_result_ids",
        ),
        (
            {"image_url": "http://example.com/a.jpg", "modality": "image", "num_images": 2},
            "image_url",
        ),
        ({"image": "***not base64***", "modality": "text", "num_images": 2}, "image"),
        ({"embedding_input": [0.1, 0.2], "modality": "image", "num_images": 2}, "embedding_input"),
        ({"text": "x", "modality": "depth", "num_images": 2}, "target"),
        ({"text": "x", "modality": "image", "num_images": 0}, "num_images"),
        ({"text": "x", "image": image, "modality": "image", "num_images": 2}, "body"),
    ):
        bad = client.post("/knn-service", json=body)
        assert bad.status_code == 400 and error_field(bad) == field, (body, bad.text)


def test_media_serves_only_listed_files(client: httpx.Client, tiny: TinyIndex) -> None:
    res = client.get("/media/image%3Aitem3")
    assert res.status_code == 200 and res.headers["content-type"] == "image/png"
    assert res.content == corpus_file(tiny, "img/3.png")
    audio = client.get("/media/audio:item3")
    assert audio.status_code == 200 and audio.content == corpus_file(tiny, "wav/3.wav")
    secret = tiny.corpus.parent / "train.jsonl"
    for path in (
        "/media/..%2F..%2F..%2Fetc%2Fpasswd",
        "/media/%2Fetc%2Fpasswd",
        "/media//etc/passwd",
        f"/media/{secret}",
        "/media/image%3A..%2F..%2Ftrain.jsonl",
        "/media/image:../../train.jsonl",
        "/media/image%3Anot-an-item",
        "/media/text%3Aitem3",  # text items have no file
        "/media/item3",
    ):
        bad = client.get(path)
        assert bad.status_code == 404, (path, bad.status_code)
        assert b"zero" not in bad.content  # nothing of the corpus files leaks
    raw = httpx.get(client.base_url.join("/media/../../etc/passwd"))  # client normalises ..
    assert raw.status_code == 404


# ------------------------------------------------------------------------------ bad input


def test_bad_input_gets_4xx_naming_the_field(client: httpx.Client, tiny: TinyIndex) -> None:
    png = corpus_file(tiny, "img/1.png")
    cases = [
        (dict(json={"text": "x", "k": 0}), 400, "k"),
        (dict(json={"text": "x", "k": 10_000}), 400, "k"),
        (dict(json={"text": "x", "k": "ten"}), 400, "k"),
        (dict(json={"text": "   "}), 400, "text"),
        (dict(json={"text": "word " * 100}), 400, "text"),
        (dict(json={"text": 5}), 400, "text"),
        (dict(json={"text": "x", "target": ["depth"]}), 400, "target"),
        (dict(json={"depth": "x"}), 400, "depth"),
        (dict(json={"text": "x", "modality": "image"}), 400, "modality"),
        (dict(json={"image": "a.png"}), 400, "image"),
        (dict(json={}), 400, "body"),
        (dict(json=["text"]), 400, "body"),
        (dict(content=b"{not json", headers={"content-type": "application/json"}), 400, "body"),
        (dict(content=b"text=x", headers={"content-type": "text/plain"}), 415, "content-type"),
        (dict(json={"id": "nope", "modality": "image"}), 404, "id"),
        (dict(files={"image": ("x.png", b"this is not a png")}), 400, "image"),
        (dict(files={"audio": ("x.wav", b"RIFF....WAVEjunk")}), 400, "audio"),
        (dict(files={"image": ("x.png", b"")}), 400, "image"),
        (dict(files={"depth": ("x.npy", b"\x93NUMPY")}), 400, "depth"),
        (dict(files={"image": ("x.png", png), "audio": ("x.wav", png)}), 400, "body"),
        (dict(files={"image": ("x.png", png)}, data={"k": "0"}), 400, "k"),
        (dict(files={"image": ("big.png", b"\0" * (LIMITS.max_body_bytes + 1))}), 413, "body"),
    ]
    for kwargs, status, field in cases:
        res = client.post("/search", **kwargs)
        assert (res.status_code, error_field(res)) == (status, field), (kwargs.keys(), res.text)
        assert res.json()["error"]["message"]
    assert client.get("/nowhere").status_code == 404
    assert error_field(client.get("/search")) == "path"  # 405 as JSON too
    # the server is still up and answering after all of that
    assert client.get("/healthz").status_code == 200
    assert client.post("/search", json={"text": "the sound one"}).status_code == 200


def test_clients_that_vanish_do_not_hurt_the_server(server: ThreadedServer, client) -> None:
    import socket

    body = json.dumps({"text": "the sound two", "k": 5}).encode()
    head = (
        f"POST /search HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    ).encode()
    for cut in (len(head) // 2, len(head) + 3, len(head) + len(body)):  # mid-head/body, whole
        for _ in range(4):
            with socket.create_connection(("127.0.0.1", server.port)) as sock:
                sock.sendall((head + body)[:cut])
            # closed before (or without waiting for) the answer
    assert client.get("/healthz").status_code == 200
    res = client.post("/search", json={"text": "the sound two", "k": 5})
    assert res.status_code == 200 and len(res.json()["results"]) == 5


def test_chunked_oversized_upload_is_refused(client: httpx.Client) -> None:
    def body():
        for _ in range(40):
            yield b"x" * 8192  # 320 KiB, no Content-Length

    res = client.post("/search", content=body(), headers={"content-type": "application/json"})
    assert res.status_code == 413 and error_field(res) == "body"


def test_decode_goes_through_bundle_prepare(
    searcher: Searcher, tiny: TinyIndex, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One code path prepares inputs: the server's decode is ``BundleModel.prepare`` (plus the
    allowed-file check and the DecodeError mapping), for uploads and for indexed paths."""
    seen: list[tuple[str, object]] = []
    real = searcher.model.prepare

    def spy(modality: str, value: object) -> object:
        seen.append((modality, value))
        return real(modality, value)

    monkeypatch.setattr(searcher.model, "prepare", spy)
    data = corpus_file(tiny, "img/1.png")
    prepared = searcher.decode("image", data)
    assert seen == [("image", data)]
    assert np.array_equal(prepared.numpy(), real("image", data).numpy())
    listed = searcher.item("image", "item1")
    assert listed is not None
    searcher.decode("image", listed["value"])
    assert seen[-1][0] == "image" and Path(str(seen[-1][1])).name == "1.png"
    assert searcher.decode("text", "a digit") is not None and seen[-1] == ("text", "a digit")


def test_decode_timeout_is_a_4xx(searcher: Searcher, tiny: TinyIndex) -> None:
    import time

    slow = Searcher(searcher.model, searcher.index)
    real = slow.decode

    def slow_decode(modality, value):  # a decoder that takes 1 s (e.g. a pathological file)
        time.sleep(1.0)
        return real(modality, value)

    slow.decode = slow_decode
    settings = ServeSettings(limits=ServeLimits(decode_timeout_s=0.2))
    with ThreadedServer(create_app(slow, settings)) as srv:
        res = httpx.post(
            f"{srv.url}/search", files={"image": ("a.png", corpus_file(tiny, "img/1.png"))}
        )
        assert res.status_code == 422 and error_field(res) == "image"
        assert "decoding took longer" in res.json()["error"]["message"]
        assert httpx.get(f"{srv.url}/healthz").status_code == 200


# ------------------------------------------------------------------------------ auth


def test_token_guards_every_route_but_healthz(searcher: Searcher) -> None:
    with ThreadedServer(create_app(searcher, ServeSettings(token=TOKEN))) as srv:
        url = srv.url
        good = {"authorization": f"Bearer {TOKEN}"}
        assert httpx.get(f"{url}/healthz").status_code == 200
        for method, path in (("GET", "/info"), ("GET", "/"), ("POST", "/search"),
                             ("POST", "/knn-service"), ("GET", "/media/image%3Aitem1"),
                             ("GET", "/indices-list")):  # fmt: skip
            missing = httpx.request(method, f"{url}{path}", json={"text": "x"})
            assert missing.status_code == 401 and error_field(missing) == "authorization"
            assert missing.headers["x-content-type-options"] == "nosniff"  # the guards' too
            wrong = httpx.request(method, f"{url}{path}", headers={"authorization": "Bearer no"})
            assert wrong.status_code == 401
        assert httpx.get(f"{url}/info", headers=good).status_code == 200
        ok = httpx.post(f"{url}/search", json={"text": "the sound one"}, headers=good)
        assert ok.status_code == 200 and ok.json()["results"]
        assert httpx.get(f"{url}/?access_token={TOKEN}").status_code == 200
        assert httpx.get(f"{url}/media/image%3Aitem1?access_token={TOKEN}").status_code == 200
        # the query-string form is for GET only (page and media tags)
        post = httpx.post(f"{url}/search?access_token={TOKEN}", json={"text": "the sound one"})
        assert post.status_code == 401


def test_cors_for_clip_front(searcher: Searcher) -> None:
    origin = "https://rom1504.github.io"
    settings = ServeSettings(token=TOKEN, cors_origins=(origin,))
    with ThreadedServer(create_app(searcher, settings)) as srv:
        pre = httpx.options(
            f"{srv.url}/knn-service",
            headers={"origin": origin, "access-control-request-method": "POST",
                     "access-control-request-headers": "authorization,content-type"},
        )  # fmt: skip
        assert pre.status_code == 200
        assert pre.headers["access-control-allow-origin"] == origin
        res = httpx.post(
            f"{srv.url}/knn-service",
            json={"text": "the sound one", "modality": "image", "num_images": 2},
            headers={"origin": origin, "authorization": f"Bearer {TOKEN}"},
        )
        assert res.status_code == 200 and res.headers["access-control-allow-origin"] == origin
        other = httpx.options(
            f"{srv.url}/knn-service",
            headers={"origin": "https://evil.example", "access-control-request-method": "POST"},
        )
        assert "access-control-allow-origin" not in other.headers


@pytest.mark.distributed  # the server command in a subprocess
def test_non_loopback_host_needs_a_token(tmp_path: Path, tiny: TinyIndex) -> None:
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost")
    assert not is_loopback("0.0.0.0") and not is_loopback("192.168.1.4")
    with pytest.raises(UserInputError, match="needs a token"):
        check_bind(ServeSettings(host="0.0.0.0"))
    check_bind(ServeSettings(host="0.0.0.0", token=TOKEN))
    parser = argparse.ArgumentParser()
    add_serve_command(parser.add_subparsers())
    args = parser.parse_args(["serve", "--index", str(tiny.index), "--host", "0.0.0.0"])
    with pytest.raises(UserInputError, match="--token-file") as err:
        cmd_serve(args)  # refused before the model loads or a port opens
    assert err.value.exit_code == 2
    import subprocess
    import sys

    proc = subprocess.run(
        [sys.executable, "-m", "modalign.server", "--index", str(tiny.index), "--host", "0.0.0.0"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2 and "--token-file" in proc.stderr, proc.stderr
    short = tmp_path / "token.txt"
    short.write_text("abc\n")
    with pytest.raises(UserInputError, match="at least 16"):
        read_token(short)
    short.write_text(TOKEN + "\n")
    assert read_token(short) == TOKEN


# ------------------------------------------------------------------------------ concurrency


def test_concurrent_clients_get_sequential_results(
    client: httpx.Client, server: ThreadedServer, tiny: TinyIndex
) -> None:
    words = ["zero", "one", "two", "three"]
    requests = []
    for i in range(16):
        if i % 3 == 0:
            requests.append(dict(json={"text": f"the sound {words[i % 4]}", "k": 3 + i % 5}))
        elif i % 3 == 1:
            data = corpus_file(tiny, f"img/{i}.png")
            requests.append(dict(files={"image": ("a.png", data)}, data={"k": "7"}))
        else:
            data = corpus_file(tiny, f"wav/{i}.wav")
            requests.append(
                dict(files={"audio": ("a.wav", data)}, data={"k": "5", "target": "image"})
            )
    sequential = [client.post("/search", **r).json()["results"] for r in requests]
    before = client.get("/info").json()["batching"]
    results: list = [None] * len(requests)
    barrier = threading.Barrier(len(requests))

    def worker(i: int) -> None:
        with httpx.Client(base_url=server.url, timeout=60) as c:
            barrier.wait()
            results[i] = c.post("/search", **requests[i]).json()["results"]

    for _round in range(3):
        threads = [threading.Thread(target=worker, args=(i,)) for i in range(len(requests))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        for got, want in zip(results, sequential):
            assert [(h["id"], h["modality"]) for h in got] == [
                (h["id"], h["modality"]) for h in want
            ]
            np.testing.assert_allclose(
                [h["score"] for h in got], [h["score"] for h in want], rtol=0, atol=1e-6
            )
    after = client.get("/info").json()["batching"]
    assert after["queries"] - before["queries"] == 3 * len(requests)
    assert after["batches"] - before["batches"] < 3 * len(requests)  # some were batched
    assert after["largest"] > 1
