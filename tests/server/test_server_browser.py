"""The web page in real headless Chromium (Debian's /usr/bin/chromium driven by Playwright):
type a query, upload an image and an audio file, click a result; save a screenshot.

Skips, saying why, where Playwright or the browser is missing. ``MODALIGN_SCREENSHOT_DIR=DIR``
also keeps the screenshot as ``DIR/serve.png`` (the README's is made that way).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import httpx
import pytest

from helpers.serve import ThreadedServer, tiny_index_once

CHROMIUM = os.environ.get("MODALIGN_CHROMIUM", "/usr/bin/chromium")
ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]

sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed")
if not Path(CHROMIUM).is_file():
    pytest.skip(f"no Chromium at {CHROMIUM} (apt-get install chromium)", allow_module_level=True)


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory):
    from modalign.server.app import create_app
    from modalign.server.searcher import Searcher

    tiny = tiny_index_once(tmp_path_factory.getbasetemp())
    with ThreadedServer(create_app(Searcher.open(tiny.index))) as srv:
        yield srv, tiny


@pytest.fixture(scope="module")
def page(served):
    with sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=ARGS, headless=True)
        try:
            pg = browser.new_page(viewport={"width": 1100, "height": 900})
            yield pg
        finally:
            browser.close()


def api(url: str, **kwargs) -> list[dict]:
    res = httpx.post(f"{url}/search", timeout=30, **kwargs)
    assert res.status_code == 200, res.text
    return res.json()["results"]


def shown(pg) -> list[tuple[str, str]]:
    cards = pg.locator("#results .card")
    return [
        (cards.nth(i).get_attribute("data-modality"), cards.nth(i).get_attribute("data-id"))
        for i in range(cards.count())
    ]


def wait_status(pg, text: str) -> None:
    pg.wait_for_function(
        "t => document.getElementById('status').textContent.includes(t)", arg=text, timeout=20_000
    )


def test_page_text_upload_click(served, page, tmp_path: Path) -> None:
    srv, tiny = served
    corpus = tiny.corpus.parent
    page.goto(f"{srv.url}/")
    page.wait_for_function("document.querySelectorAll('#targets input').length === 3")
    assert (
        "index \u201cindex\u201d: 32 audio, 32 image, 32 text"
        in page.locator("#about").inner_text()
    )
    page.uncheck("#targets input[value=text]")  # search the images and sounds only
    page.fill("#k", "8")

    # 1. type a query
    page.fill("#text", "the sound two")
    page.press("#text", "Enter")
    wait_status(page, "8 results for")
    expected = api(srv.url, json={"text": "the sound two", "k": 8, "target": ["audio", "image"]})
    assert shown(page) == [(h["modality"], h["id"]) for h in expected]
    first = page.locator("#results .card").first
    assert first.locator(".score").inner_text() == f"{expected[0]['score']:.3f}"
    assert first.locator(".caption").inner_text() == expected[0]["caption"]
    # thumbnails really load (media route + token-free loopback), audio cards get players
    page.wait_for_function(
        "[...document.querySelectorAll('#results img')].every(i => i.complete && i.naturalWidth > 0)"
    )
    n_img = page.locator("#results img").count()
    n_audio = page.locator("#results audio").count()
    assert n_img == sum(h["modality"] == "image" for h in expected)
    assert n_audio == sum(h["modality"] == "audio" for h in expected)
    page.screenshot(path=str(tmp_path / "serve-text.png"), full_page=True)

    # 2. upload an image, then an audio file
    page.check("#targets input[value=text]")
    page.set_input_files("#file", str(corpus / "img" / "6.png"))
    wait_status(page, "results for image 6.png")
    want = api(
        srv.url,
        files={"image": ("6.png", (corpus / "img/6.png").read_bytes())},
        data={"k": "8", "target": ["audio", "image", "text"]},
    )
    assert shown(page) == [(h["modality"], h["id"]) for h in want]
    page.set_input_files("#file", str(corpus / "wav" / "7.wav"))
    wait_status(page, "results for audio 7.wav")
    want = api(
        srv.url,
        files={"audio": ("7.wav", (corpus / "wav/7.wav").read_bytes())},
        data={"k": "8", "target": ["audio", "image", "text"]},
    )
    assert shown(page) == [(h["modality"], h["id"]) for h in want]

    # 3. click a result: search by that item
    modality, item = shown(page)[1]
    page.locator("#results .card").nth(1).locator(".caption").click()
    wait_status(page, f"results for {modality} item {item}")
    everything = ["audio", "image", "text"]  # what the page's checked boxes send
    want = api(srv.url, json={"id": item, "modality": modality, "k": 8, "target": everything})
    assert shown(page) == [(h["modality"], h["id"]) for h in want]

    # 4. a bad file shows the server's error, and the page keeps working
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"not a png at all")
    page.set_input_files("#file", str(bad))
    page.wait_for_selector("#error:not([hidden])")
    assert page.locator("#error").inner_text().startswith("image: cannot be decoded")

    page.uncheck("#targets input[value=text]")
    page.fill("#text", "the sound three")
    page.press("#text", "Enter")
    wait_status(page, "results for \u201cthe sound three\u201d")
    assert page.locator("#error").is_hidden()
    assert page.locator("#results .card").count() == 8
    page.wait_for_function(
        "[...document.querySelectorAll('#results img')].every(i => i.complete && i.naturalWidth > 0)"
    )
    shot = tmp_path / "serve.png"
    page.screenshot(path=str(shot), full_page=True)
    assert shot.stat().st_size > 10_000
    keep = os.environ.get("MODALIGN_SCREENSHOT_DIR")
    if keep:
        Path(keep).mkdir(parents=True, exist_ok=True)
        shutil.copy(shot, Path(keep) / "serve.png")
