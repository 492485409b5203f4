"""The web page of ``vkd serve`` in a real browser.

Headless Chromium (Debian's ``chromium`` package: ``.ci/run`` installs it) driven by
Playwright through ``executable_path``, so no browser download (``playwright install``) is
needed. The server is the real ``vkd serve`` on a free port, over a small index of
synthetic scenes built with the tiny CLIP student and teacher of ``conftest.py``.

Screenshots (desktop 1280×800, phone 360×740) go to each test's tmp dir and are copied to
``/tmp/vkd-page-screenshots/`` for people to look at.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

pytestmark = pytest.mark.slow

SCREENSHOTS = Path("/tmp/vkd-page-screenshots")
QUERY = "a dog on a beach"
API_KEY = "page-test-key-123"
STARTUP_TIMEOUT_S = 180


def find_chromium() -> str | None:
    """The system Chromium: $VKD_CHROMIUM, else the first of the usual names on PATH."""
    for name in (os.environ.get("VKD_CHROMIUM"), "chromium", "chromium-browser", "google-chrome",
                 "google-chrome-stable"):
        if name and (path := shutil.which(name)):
            return path
    return None


CHROMIUM = find_chromium()
if CHROMIUM is None:
    pytest.skip("no chromium executable on PATH (Debian: apt-get install -y chromium; or set VKD_CHROMIUM)",
                allow_module_level=True)


# -- the index and the server ------------------------------------------------------------


@pytest.fixture(scope="module")
def page_index(tmp_path_factory: pytest.TempPathFactory, tiny_clip: Path, tiny_clip_teacher: Path) -> Path:
    """24 synthetic scenes (160 px), student tiny_clip, teacher tiny_clip_teacher."""
    from vkd.data.synth import generate
    from vkd.indexer import build_index

    root = tmp_path_factory.mktemp("page-data")
    generate(root / "synth", 24, seed=3, size=160, val_frac=0.0, test_frac=0.0)
    return build_index(root / "synth" / "images", root / "index", student=str(tiny_clip),
                       teacher=str(tiny_clip_teacher), workers=1).index_dir


@pytest.fixture(scope="module")
def query_png(page_index: Path) -> bytes:
    """A query image: one of the indexed scenes, so image search has an exact match."""
    images = sorted((page_index.parent / "synth" / "images").rglob("*.png"))
    return images[5].read_bytes()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def get_json(url: str) -> tuple[int, Any]:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.status, json.loads(response.read() or b"null")
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read() or b"null")


@contextlib.contextmanager
def running_server(index: Path, log: Path, api_key: str | None = None) -> Iterator[str]:
    """``vkd serve --index INDEX --port PORT`` on 127.0.0.1; yields its base URL once /health is ready."""
    port = free_port()
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    env.pop("VKD_API_KEY", None)
    command = [sys.executable, "-m", "vkd", "serve", "--index", str(index), "--host", "127.0.0.1",
               "--port", str(port)]
    if api_key is not None:
        env["VKD_API_KEY"] = api_key
    base = f"http://127.0.0.1:{port}"
    with open(log, "wb") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env)
    try:
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while True:
            if process.poll() is not None:
                pytest.fail(f"vkd serve exited with status {process.returncode}:\n{log.read_text()[-4000:]}")
            with contextlib.suppress(OSError, ValueError):
                status, body = get_json(base + "/health")
                if status == 200 and body.get("status") == "ready":
                    break
            if time.monotonic() > deadline:
                pytest.fail(f"vkd serve not ready after {STARTUP_TIMEOUT_S} s:\n{log.read_text()[-4000:]}")
            time.sleep(0.2)
        yield base
    finally:
        process.terminate()
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@pytest.fixture(scope="module")
def server(page_index: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    with running_server(page_index, tmp_path_factory.mktemp("serve-log") / "serve.log") as base:
        yield base


# -- the browser -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=CHROMIUM, headless=True)
        try:
            yield launched
        finally:
            launched.close()


class PageErrors(list):
    """Uncaught JavaScript errors and console errors of a page (failed requests excluded:
    the tests provoke 4xx answers on purpose)."""

    def watch(self, page: Any) -> Any:
        page.on("pageerror", lambda error: self.append(f"pageerror: {error}"))
        page.on("console", lambda message: message.type == "error"
                and not message.text.startswith("Failed to load resource")
                and self.append(f"console: {message.text}"))
        return page


@pytest.fixture
def open_page(browser: Any) -> Iterator[Any]:
    contexts, errors = [], PageErrors()

    def make(width: int, height: int) -> Any:
        context = browser.new_context(viewport={"width": width, "height": height}, device_scale_factor=1)
        context.set_default_timeout(30_000)
        contexts.append(context)
        return errors.watch(context.new_page())

    yield make
    for context in contexts:
        context.close()
    assert not errors, errors


def screenshot(page: Any, tmp_path: Path, name: str, full_page: bool = False) -> Path:
    path = tmp_path / name
    page.screenshot(path=str(path), full_page=full_page)
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    shutil.copy(path, SCREENSHOTS / name)
    return path


# -- what the tests wait for and check ---------------------------------------------------

ALL_THUMBS_LOADED = """() => {
  const images = [...document.querySelectorAll('#results img')];
  return images.length > 0 && images.every(img => img.complete && img.naturalWidth > 0);
}"""
IDLE = "() => !document.body.classList.contains('busy')"


def wait_for_results(page: Any, count: int | None = None) -> list[dict[str, Any]]:
    """Wait until the search settles with every thumbnail loaded; the tiles' data."""
    page.wait_for_function(IDLE)
    error = page.locator("#error")
    assert error.is_hidden(), f"error line: {error.inner_text()}"
    page.wait_for_function(ALL_THUMBS_LOADED)
    tiles = page.eval_on_selector_all("#results li", """items => items.map(li => ({
        rank: li.querySelector('.rank').textContent,
        name: li.querySelector('.name').textContent,
        href: li.querySelector('a').getAttribute('href'),
        thumb: li.querySelector('img').getAttribute('src'),
        natural: li.querySelector('img').naturalWidth,
        scores: li.querySelector('.scores').textContent}))""")
    if count is not None:
        assert len(tiles) == count
    for position, tile in enumerate(tiles, start=1):
        assert tile["rank"] == f"#{position}"
        assert tile["natural"] > 0
        assert tile["thumb"].startswith("/thumbs/") and tile["href"].startswith("/images/")
        assert "teacher" in tile["scores"] and "student" in tile["scores"]
    return tiles


def drop_file(page: Any, data: bytes, name: str) -> None:
    """Drop a file on the page the way a browser does: dragenter, dragover, drop with a DataTransfer."""
    transfer = page.evaluate_handle(
        """([b64, name]) => {
            const bytes = Uint8Array.from(atob(b64), c => c.charCodeAt(0));
            const transfer = new DataTransfer();
            transfer.items.add(new File([bytes], name, {type: 'image/png'}));
            return transfer;
        }""",
        [base64.b64encode(data).decode(), name],
    )
    for event in ("dragenter", "dragover"):
        page.dispatch_event("main", event, {"dataTransfer": transfer})
    assert page.locator("#dropzone").is_visible()
    page.dispatch_event("main", "drop", {"dataTransfer": transfer})


def assert_no_horizontal_scroll(page: Any) -> None:
    widths = page.evaluate("() => [document.documentElement.scrollWidth, window.innerWidth]")
    assert widths[0] <= widths[1], f"page is {widths[0]} px wide in a {widths[1]} px viewport"


# -- tests -------------------------------------------------------------------------------


def test_page_desktop_text_search_viewer_and_image_drop(server: str, open_page: Any, query_png: bytes,
                                                          tmp_path: Path) -> None:
    page = open_page(1280, 800)
    requested: list[str] = []
    page.on("request", lambda request: requested.append(request.url))
    page.goto(server + "/")
    assert page.title()
    page.wait_for_function("() => document.activeElement.id === 'q'")  # autofocus
    assert page.locator("#empty").is_visible()
    page.wait_for_function("() => /24 images indexed/.test(document.getElementById('corpus').textContent)")
    screenshot(page, tmp_path, "desktop-empty.png")

    # the loading indicator is shown while a search is in flight
    page.evaluate("""() => {
        window.sawBusy = false;
        const spinner = document.getElementById('spinner');
        new MutationObserver(() => {
            if (!spinner.hidden && document.getElementById('results').getAttribute('aria-busy') === 'true') {
                window.sawBusy = true;
            }
        }).observe(spinner, {attributes: true});
    }""")
    page.keyboard.type(QUERY)
    page.keyboard.press("Enter")
    tiles = wait_for_results(page, count=10)
    assert page.evaluate("() => window.sawBusy") and page.locator("#spinner").is_hidden()
    assert "q=a+dog+on+a+beach" in page.url  # linkable
    assert QUERY in page.locator("#status").inner_text()
    timings = page.locator("#timings")
    assert timings.is_visible()
    for stage in ("student encode", "ANN", "teacher encode", "rerank", "total", "reranked by teacher"):
        assert stage in timings.inner_text()
    # the page shows what the API answered, in its order
    status, body = get_json(server + "/search?" + urllib.parse.urlencode({"q": QUERY, "k": 10}))
    assert status == 200
    assert [tile["href"] for tile in tiles] == [hit["image_url"] for hit in body["results"]]
    assert [tile["name"] for tile in tiles] == [hit["path"] for hit in body["results"]]
    screenshot(page, tmp_path, "desktop-text-search.png")

    # keyboard: Tab from the search box reaches the controls, then the first result
    page.focus("#q")
    order = []
    for _ in range(6):
        page.keyboard.press("Tab")
        order.append(page.evaluate("document.activeElement.id || document.activeElement.className"))
    assert order[:6] == ["go", "pick", "k", "mode", "rerank", "tile"], order
    # "/" brings focus back to the search box
    page.keyboard.press("/")
    assert page.evaluate("document.activeElement.id") == "q"

    # the viewer: Enter on a result opens it, arrows move, Esc closes and focus returns to the grid
    page.focus("#results li:nth-child(2) a")
    page.keyboard.press("Enter")
    viewer = page.locator("#viewer")
    assert viewer.is_visible()
    page.wait_for_function("() => document.getElementById('viewer-img').naturalWidth > 0")
    assert page.locator("#viewer-img").get_attribute("src") == tiles[1]["href"]
    assert page.locator("#viewer-title").inner_text().startswith("#2")
    screenshot(page, tmp_path, "desktop-viewer.png")
    page.keyboard.press("ArrowRight")
    assert page.locator("#viewer-title").inner_text().startswith("#3")
    page.keyboard.press("ArrowLeft")
    page.keyboard.press("ArrowLeft")
    assert page.locator("#viewer-title").inner_text().startswith("#1")
    page.keyboard.press("Escape")
    assert not viewer.is_visible()
    # the dialog's close event (queued) moves focus to the tile of the image last shown
    page.wait_for_function("href => document.activeElement.getAttribute('href') === href", arg=tiles[0]["href"])

    # drop an image anywhere: its preview shows, and the exact image comes first
    drop_file(page, query_png, "query.png")
    page.wait_for_function("() => document.getElementById('query-preview').naturalWidth > 0")
    assert page.locator("#query-image").is_visible()
    assert "query.png" in page.locator("#query-name").inner_text()
    image_tiles = wait_for_results(page, count=10)
    assert "image" in page.locator("#status").inner_text()
    assert float(page.locator("#results li:first-child .score:last-child dd").inner_text()) > 0.99
    assert image_tiles != tiles
    screenshot(page, tmp_path, "desktop-image-search.png")

    # back returns to the text search (from the URL), forward to the image search
    page.go_back()
    page.wait_for_function("() => document.getElementById('q').value === " + json.dumps(QUERY))
    assert [tile["href"] for tile in wait_for_results(page, count=10)] == [tile["href"] for tile in tiles]
    assert page.locator("#query-image").is_hidden()
    page.go_forward()
    page.wait_for_function("() => !document.getElementById('query-image').hidden")
    wait_for_results(page, count=10)

    # k and rerank: 5 results, student order, both reflected in the URL
    page.fill("#q", QUERY)
    page.keyboard.press("Enter")
    wait_for_results(page, count=10)
    page.select_option("#k", "5")
    wait_for_results(page, count=5)
    page.uncheck("#rerank")
    wait_for_results(page)
    assert "k=5" in page.url and "rerank=false" in page.url
    assert "reranked by teacher" not in page.locator("#timings").inner_text()
    page.check("#rerank")
    wait_for_results(page, count=5)

    # a 4xx answer: its detail on the error line
    status, body = get_json(server + "/search?" + urllib.parse.urlencode({"q": "x" * 5000}))
    assert 400 <= status < 500 and isinstance(body["detail"], str)
    page.fill("#q", "x" * 5000)
    page.keyboard.press("Enter")
    page.wait_for_function(IDLE)
    error = page.locator("#error")
    assert error.is_visible() and body["detail"] in error.inner_text()
    screenshot(page, tmp_path, "desktop-error.png")
    # the next good search clears it
    page.fill("#q", QUERY)
    page.keyboard.press("Enter")
    wait_for_results(page, count=5)
    assert error.is_hidden()

    # everything came from the server itself: no CDN, no external fonts or scripts
    outside = [url for url in requested if not url.startswith((server + "/", "data:", "blob:"))]
    assert not outside, outside


def test_page_phone_layout_and_file_button(server: str, open_page: Any, query_png: bytes, tmp_path: Path) -> None:
    page = open_page(360, 740)
    page.goto(server + "/?" + urllib.parse.urlencode({"q": QUERY}))  # a shared link runs its search
    assert page.locator("#q").input_value() == QUERY
    wait_for_results(page, count=10)
    assert_no_horizontal_scroll(page)
    columns = page.evaluate("getComputedStyle(document.getElementById('results')).gridTemplateColumns.split(' ').length")
    assert columns in (1, 2)
    for selector in ("#q", "#go", "#pick", "#k", "#rerank"):
        box = page.locator(selector).bounding_box()
        assert box is not None and box["x"] >= 0 and box["x"] + box["width"] <= 360, selector
    screenshot(page, tmp_path, "phone-text-search.png")
    screenshot(page, tmp_path, "phone-text-search-full.png", full_page=True)

    # the file button path of image search
    with page.expect_file_chooser() as chooser:
        page.click("#pick")
    chooser.value.set_files([{"name": "picked.png", "mimeType": "image/png", "buffer": query_png}])
    page.wait_for_function("() => document.getElementById('query-preview').naturalWidth > 0")
    wait_for_results(page, count=10)
    assert "picked.png" in page.locator("#query-name").inner_text()
    assert_no_horizontal_scroll(page)
    screenshot(page, tmp_path, "phone-image-search.png")

    page.click("#results li:first-child a")
    page.wait_for_function("() => document.getElementById('viewer-img').naturalWidth > 0")
    assert_no_horizontal_scroll(page)
    screenshot(page, tmp_path, "phone-viewer.png")
    page.click("#viewer-close")
    assert page.locator("#viewer").is_hidden()


def test_page_login_with_api_key(page_index: Path, open_page: Any, tmp_path: Path) -> None:
    with running_server(page_index, tmp_path / "serve.log", api_key=API_KEY) as base:
        assert get_json(base + "/search?q=dog")[0] == 401
        page = open_page(1280, 800)
        page.goto(base + "/")
        # Chromium applies autofocus at its first rendering update, which can come after the load
        # event that goto() waits for: keys typed before it are lost (CI once lost the leading "a ")
        page.wait_for_function("() => document.activeElement.id === 'q'")
        page.keyboard.type(QUERY)
        page.keyboard.press("Enter")
        login = page.locator("#login")
        login.wait_for(state="visible")
        assert page.evaluate("document.activeElement.id") == "api-key"
        assert page.locator("#results li").count() == 0

        page.keyboard.type("not-the-key")
        page.keyboard.press("Enter")
        page.locator("#login-error").wait_for(state="visible")
        assert "Wrong API key" in page.locator("#login-error").inner_text()
        screenshot(page, tmp_path, "desktop-login.png")

        page.fill("#api-key", API_KEY)
        page.keyboard.press("Enter")
        wait_for_results(page, count=10)  # retried after login; thumbnails load with the cookie
        assert login.is_hidden()
        assert QUERY in page.locator("#status").inner_text()
        cookies = page.context.cookies()
        assert cookies and all(cookie["httpOnly"] for cookie in cookies)
        screenshot(page, tmp_path, "desktop-after-login.png")
