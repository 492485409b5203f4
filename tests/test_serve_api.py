"""``vkd serve``: the HTTP API against ``vkd.Retriever`` on the quick demo's index, every bad
input's 4xx, files that must stay unreachable, the API key, thumbnails, reloads while
serving, a torch-free import path, and one real uvicorn server on loopback."""

from __future__ import annotations

import http.client
import io
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from click.testing import CliRunner
from conftest import make_images
from PIL import Image
from reliability.image_files import bomb_png
from serve_helpers import quick_demo, served

from vkd.cli import cli
from vkd.indexer import Index
from vkd.retrieval import Retriever
from vkd.serve.app import COOKIE, cookie_token
from vkd.serve.files import display_path

QUERIES = ["a dog on a beach", "two red cars on a road at night", "a small cat in the snow", "a boat on a lake"]
PASSWD_MARKERS = (b"root:", b"/bin/")


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return quick_demo(tmp_path_factory)


@pytest.fixture(scope="module")
def retriever(demo: Path) -> Retriever:
    """The reference: the library's own search on the same index with the same (ONNX) models."""
    return Retriever(demo / "index", prefer="onnx")


@pytest.fixture(scope="module")
def retriever_fp32(demo: Path) -> Retriever:
    """The reference with the exports' fp32 files. Dynamic INT8 computes activation scales per
    batch, so there a query's scores move by ~1e-3 with the company it is micro-batched in
    (``vkd serve --precision``); in fp32 concurrent answers must equal one-at-a-time ones."""
    from vkd.export import OnnxEncoder

    return Retriever(demo / "index", student=OnnxEncoder(demo / "student-kd" / "model" / "onnx", precision="fp32"),
                     teacher=OnnxEncoder(demo / "teacher" / "model" / "onnx", precision="fp32"))


@pytest.fixture(scope="module")
def client(demo: Path, tmp_path_factory: pytest.TempPathFactory):
    # its own models (not the reference's), its own thumbnail folder
    with served(index=str(demo / "index"), thumb_cache=str(tmp_path_factory.mktemp("thumbs"))) as test_client:
        yield test_client


@pytest.fixture(scope="module")
def shared(demo: Path, retriever: Retriever):
    """Settings for more apps on the demo index that reuse the loaded reference models."""
    return dict(retriever=retriever, index=str(demo / "index"))


def _expected(retriever: Retriever, query, k: int = 10, **options) -> list[dict]:
    root = retriever.index.images_root
    return [{"id": hit.id, "rank": hit.rank, "score": hit.score, "student_score": hit.student_score,
             "teacher_score": hit.teacher_score, "path": Path(hit.path).relative_to(root).as_posix(),
             "width": hit.width, "height": hit.height}
            for hit in retriever.search(query, k=k, **options)]


def _same_hits(got: list[dict], expected: list[dict]) -> None:
    assert [hit["id"] for hit in got] == [hit["id"] for hit in expected]
    for hit, want in zip(got, expected, strict=True):
        assert hit["rank"] == want["rank"] and hit["path"] == want["path"]
        assert (hit["width"], hit["height"]) == (want["width"], want["height"])
        assert hit["score"] == pytest.approx(want["score"], abs=1e-5)
        assert hit["student_score"] == pytest.approx(want["student_score"], abs=1e-5)
        if want["teacher_score"] is None:
            assert hit["teacher_score"] is None
        else:
            assert hit["teacher_score"] == pytest.approx(want["teacher_score"], abs=1e-5)
        assert hit["image_url"] == f"/images/{hit['id']}" and hit["thumb_url"] == f"/thumbs/{hit['id']}"


# -- results ------------------------------------------------------------------------------


def test_text_search_equals_the_retriever(client, retriever: Retriever) -> None:
    for query in QUERIES:
        expected = _expected(retriever, query, k=5)
        got = client.get("/search", params={"q": query, "k": 5})
        assert got.status_code == 200, got.text
        body = got.json()
        assert body["query"] == query and body["k"] == 5 and body["reranked"] == "teacher"
        assert body["candidates"] == len(retriever.index)  # 60 images < 1000 candidates: all of them
        assert set(body["timings"]) >= {"student_encode_ms", "ann_ms", "teacher_encode_ms", "rerank_ms", "total_ms"}
        _same_hits(body["results"], expected)
        posted = client.post("/search", json={"q": query, "k": 5})
        assert posted.status_code == 200
        _same_hits(posted.json()["results"], expected)

    stage1 = client.get("/search", params={"q": QUERIES[0], "k": 7, "rerank": "false"}).json()
    assert stage1["reranked"] is None and all(hit["teacher_score"] is None for hit in stage1["results"])
    _same_hits(stage1["results"], _expected(retriever, QUERIES[0], k=7, rerank=False))
    few = client.post("/search", json={"q": QUERIES[1], "k": 3, "candidates": 5}).json()
    assert few["candidates"] == 5
    _same_hits(few["results"], _expected(retriever, QUERIES[1], k=3, candidates=5))


def test_image_search_equals_the_retriever(client, retriever: Retriever, demo: Path) -> None:
    files = sorted((demo / "data" / "images" / "test").glob("*.png"))[:3]
    for path in files:
        expected = _expected(retriever, path, k=4)
        got = client.post("/search", files={"image": (path.name, path.read_bytes(), "image/png")}, data={"k": "4"})
        assert got.status_code == 200, got.text
        body = got.json()
        assert body["query"] is None and body["reranked"] == "teacher"
        _same_hits(body["results"], expected)
        assert body["results"][0]["path"] == path.name  # an indexed image finds itself first
    no_rerank = client.post("/search", files={"image": ("q.png", files[0].read_bytes())},
                            data={"k": "3", "rerank": "false"})
    _same_hits(no_rerank.json()["results"], _expected(retriever, files[0], k=3, rerank=False))


def test_concurrent_searches_are_batched_and_answer_as_one_at_a_time(demo: Path, retriever_fp32: Retriever) -> None:
    from vkd.serve import SearchEngine, ServeConfig

    retriever = retriever_fp32
    config = ServeConfig(index=str(demo / "index"), batch_window_ms=200.0, max_batch=64)
    engine = SearchEngine(config, retriever=retriever)
    engine.start()
    try:
        assert engine.wait_ready(60)
        requests = [(query, k, rerank) for query in QUERIES for k in (3, 8) for rerank in (True, False)] * 2
        futures: list = [None] * len(requests)

        def submit(i: int) -> None:
            query, k, rerank = requests[i]
            futures[i] = engine.submit(query, k=k, candidates=1000, rerank=rerank)

        threads = [threading.Thread(target=submit, args=(i,)) for i in range(len(requests))]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        answers = [future.result(timeout=60) for future in futures]
    finally:
        engine.close()
    assert engine.batches < len(requests)  # several requests shared a model call
    assert max(answer.batch_size for answer in answers) > 1
    for (query, k, rerank), answer in zip(requests, answers, strict=True):
        expected = retriever.search(query, k=k, rerank=rerank)
        assert [hit.id for hit in answer.result] == [hit.id for hit in expected]
        assert [hit.score for hit in answer.result] == pytest.approx([hit.score for hit in expected], abs=1e-5)


# -- bad input ------------------------------------------------------------------------------


BAD_GETS = [
    ("/search", 400, "no query"),
    ("/search?q=", 400, "empty query"),
    ("/search?q=%20%20", 400, "empty query"),
    ("/search?q=" + "a" * 2001, 400, "limit is 2000"),
    ("/search?q=dog&k=0", 400, "k:"),
    ("/search?q=dog&k=101", 400, "k:"),
    ("/search?q=dog&k=ten", 400, "valid integer"),
    ("/search?q=dog&candidates=0", 400, "candidates:"),
    ("/search?q=dog&candidates=10001", 400, "candidates:"),
    ("/search?q=dog&k=20&candidates=10", 400, "smaller than k"),
    ("/search?q=dog&rerank=maybe", 400, "rerank:"),
    ("/images/" + "0" * 32, 404, "no image with this id"),
    ("/thumbs/" + "f" * 32, 404, "no image with this id"),
    ("/images/not-an-id", 404, "not an image id"),
    ("/nowhere", 404, "Not Found"),
]


@pytest.mark.parametrize(("url", "status", "says"), BAD_GETS)
def test_bad_get_gets_its_4xx_with_one_line_detail(client, url: str, status: int, says: str) -> None:
    response = client.get(url)
    assert response.status_code == status, response.text
    detail = response.json()["detail"]
    assert isinstance(detail, str) and "\n" not in detail and says in detail


BAD_POSTS = [
    (dict(json={"k": 3}), 400, "no query"),
    (dict(json={"q": ""}), 400, "empty query"),
    (dict(json={"q": 42}), 400, "q must be text"),
    (dict(json={"q": "dog", "k": 0}), 400, "k=0 is out of range"),
    (dict(json={"q": "dog", "k": "many"}), 400, "not an integer"),
    (dict(json={"q": "dog", "k": 2.5}), 400, "not a whole number"),
    (dict(json={"q": "dog", "k": True}), 400, "not an integer"),
    (dict(json={"q": "dog", "k": 30, "candidates": 10}), 400, "smaller than k"),
    (dict(json={"q": "dog", "rerank": "perhaps"}), 400, "true or false"),
    (dict(json={"q": "dog", "limit": 3}), 400, "unknown field(s) limit"),
    (dict(json=["dog"]), 400, "JSON object"),
    (dict(content=b"{not json", headers={"content-type": "application/json"}), 400, "not valid JSON"),
    (dict(content=b"q=dog", headers={"content-type": "text/plain"}), 415, "not accepted"),
    (dict(data={"k": "3"}, files={"other": ("x.png", b"x")}), 400, "unknown form field(s) other"),
    (dict(data={"k": "3", "query": "dog"}, files={"image": ("x.png", b"x")}), 400, "unknown form field(s) query"),
    (dict(files={"image": ("x.png", b"")}), 400, "empty (0 bytes)"),
    (dict(files={"image": ("x.png", b"this is not an image at all")}), 400, "not an image"),
    (dict(files={"image": ("x.png", b"\x89PNG\r\n\x1a\n" + b"\0" * 40)}), 400, "the uploaded image"),
    (dict(files={"image": ("x.png", b"x")}, data={"k": "zero"}), 400, "k='zero' is not an integer"),
]


@pytest.mark.parametrize(("request_kwargs", "status", "says"), BAD_POSTS)
def test_bad_post_gets_its_4xx_with_one_line_detail(client, request_kwargs: dict, status: int, says: str) -> None:
    response = client.post("/search", **request_kwargs)
    assert response.status_code == status, response.text
    detail = response.json()["detail"]
    assert isinstance(detail, str) and "\n" not in detail and says in detail


def test_uploads_over_the_limits_get_413(shared, tmp_path: Path) -> None:
    png = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (60, 60, 3), dtype=np.uint8)).save(png, "PNG")
    data = png.getvalue()
    assert len(data) > 5000
    with served(**shared, max_upload_bytes=5000) as small_limit:
        response = small_limit.post("/search", files={"image": ("big.png", data, "image/png")})
        assert response.status_code == 413 and "5000 bytes" in response.json()["detail"]

        def chunks():  # no Content-Length: the body is counted as it arrives
            for _ in range(20):
                yield b"x" * 10_000

        streamed = small_limit.post("/search", content=chunks(), headers={"content-type": "application/json"})
        assert streamed.status_code == 413 and "at most" in streamed.json()["detail"]
        fits = small_limit.post("/search", files={"image": ("ok.png", _png_bytes(20, 20), "image/png")})
        assert fits.status_code == 200

    bomb = bomb_png(tmp_path / "bomb.png", 10_000, 10_000).read_bytes()  # 100 Mpx in a few KB
    with served(**shared, max_image_pixels=1_000_000) as guarded:
        response = guarded.post("/search", files={"image": ("bomb.png", bomb, "image/png")})
        assert response.status_code == 413
        assert "decompression bomb" in response.json()["detail"] and "1000000" in response.json()["detail"]


def _png_bytes(width: int, height: int, color=(10, 120, 200)) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (width, height), color).save(out, "PNG")
    return out.getvalue()


# -- files ------------------------------------------------------------------------------------


TRAVERSALS = [
    "../../etc/passwd", "..%2F..%2Fetc%2Fpasswd", "..%252F..%252Fetc%252Fpasswd", "%252e%252e%252f%252e%252e%252fetc",
    "%2e%2e%2f%2e%2e%2fetc%2fpasswd", "%2Fetc%2Fpasswd", "/etc/passwd", "%00", "....//....//etc/passwd",
    "0123456789ABCDEF0123456789ABCDEF", "0123456789abcdef0123456789abcde", "0123456789abcdef0123456789abcdef0",
]


@pytest.mark.parametrize("route", ["images", "thumbs"])
@pytest.mark.parametrize("raw_id", TRAVERSALS)
def test_ids_cannot_reach_files_outside_the_index(client, route: str, raw_id: str) -> None:
    response = client.get(f"/{route}/{raw_id}")
    assert response.status_code == 404, (raw_id, response.status_code)
    assert not any(marker in response.content for marker in PASSWD_MARKERS)
    assert response.headers["content-type"].startswith("application/json")


def test_images_and_thumbs_of_live_rows(client, retriever: Retriever, demo: Path) -> None:
    hit = retriever.search(QUERIES[0], k=1)[0]
    original = client.get(f"/images/{hit.id}")
    assert original.status_code == 200 and original.content == Path(hit.path).read_bytes()
    assert original.headers["content-type"] == "image/png"
    assert original.headers["x-content-type-options"] == "nosniff"
    again = client.get(f"/images/{hit.id}", headers={"if-none-match": original.headers["etag"]})
    assert again.status_code == 304
    thumb = client.get(f"/thumbs/{hit.id}")
    assert thumb.status_code == 200 and thumb.headers["content-type"] == "image/jpeg"
    with Image.open(io.BytesIO(thumb.content)) as image:
        assert image.format == "JPEG" and max(image.size) <= 256


@pytest.fixture(scope="module")
def small(tmp_path_factory: pytest.TempPathFactory, tiny_clip: Path, tiny_clip_teacher: Path) -> SimpleNamespace:
    """A tiny index of 7 images: an EXIF-rotated JPEG, and a symbolic link to an image outside
    the folder indexed with follow_links=True (so that its row exists)."""
    root = tmp_path_factory.mktemp("small")
    images = root / "photos"
    images.mkdir()
    for i, image in enumerate(make_images(4, seed=3)):
        image.save(images / f"img{i}.png")
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90° clockwise to display
    Image.fromarray(np.random.default_rng(5).integers(0, 255, (300, 600, 3), dtype=np.uint8)).save(
        images / "rotated.jpg", exif=exif)  # stored 600 x 300, shown 300 x 600
    Image.new("RGBA", (40, 40), (255, 0, 0, 0)).save(images / "clear.png")  # transparent: white thumbnail
    outside = root / "outside"
    outside.mkdir()
    make_images(1, seed=9)[0].save(outside / "secret.png")
    os.symlink(outside / "secret.png", images / "leak.png")
    index = Index.build(images, root / "index", student=str(tiny_clip), teacher=str(tiny_clip_teacher),
                        follow_links=True, device="cpu", workers=1, batch_size=8)
    ids = {record["relpath"]: record["id"] for shard in index.shards for record in shard.records(range(shard.rows))}
    assert "leak.png" in ids
    return SimpleNamespace(root=root, images=images, index=index.path, ids=ids, outside=outside)


def test_a_symlink_out_of_the_images_folder_is_never_served(small: SimpleNamespace, tmp_path: Path) -> None:
    with served(index=str(small.index), thumb_cache=str(tmp_path / "thumbs")) as app:
        found = app.get("/search", params={"q": "a photo", "k": 7}).json()["results"]
        assert "leak.png" in {hit["path"] for hit in found}  # the row is searchable ...
        leak = small.ids["leak.png"]
        for route in ("images", "thumbs"):  # ... but its file, outside the folder, is not served
            response = app.get(f"/{route}/{leak}")
            assert response.status_code == 403, response.text
            assert "outside the images folder" in response.json()["detail"]
            assert response.content != (small.outside / "secret.png").read_bytes()
        assert app.get(f"/images/{small.ids['img0.png']}").status_code == 200

        # a file swapped for a link out of the folder after indexing is refused the same way
        target = small.images / "img1.png"
        saved = target.read_bytes()
        target.unlink()
        os.symlink(small.outside / "secret.png", target)
        try:
            for route in ("images", "thumbs"):
                assert app.get(f"/{route}/{small.ids['img1.png']}").status_code == 403
        finally:
            target.unlink()
            target.write_bytes(saved)
        # a file gone since indexing
        (small.images / "img2.png").rename(small.root / "img2.moved")
        try:
            gone = app.get(f"/images/{small.ids['img2.png']}")
            assert gone.status_code == 404 and "no longer in the images folder" in gone.json()["detail"]
        finally:
            (small.root / "img2.moved").rename(small.images / "img2.png")


def test_thumbnails_are_upright_jpegs_made_once_under_the_index(small: SimpleNamespace) -> None:
    thumbs = small.index / "thumbs"
    with served(index=str(small.index)) as app:  # default cache: <index>/thumbs
        rotated = app.get(f"/thumbs/{small.ids['rotated.jpg']}")
        assert rotated.status_code == 200 and rotated.headers["content-type"] == "image/jpeg"
        with Image.open(io.BytesIO(rotated.content)) as image:
            assert image.size == (128, 256)  # EXIF orientation applied, longest side 256
        cached = list(thumbs.rglob("*.jpg"))
        assert [path.name.split("-")[0] for path in cached] == [small.ids["rotated.jpg"]]
        stamp = cached[0].stat().st_mtime_ns
        assert app.get(f"/thumbs/{small.ids['rotated.jpg']}").content == rotated.content
        assert cached[0].stat().st_mtime_ns == stamp  # served from the cache, not made again
        assert not [p for p in thumbs.rglob("*") if ".tmp-" in p.name]  # no temporaries left
        etag = rotated.headers["etag"]
        assert app.get(f"/thumbs/{small.ids['rotated.jpg']}", headers={"if-none-match": etag}).status_code == 304
        clear = app.get(f"/thumbs/{small.ids['clear.png']}")
        with Image.open(io.BytesIO(clear.content)) as image:
            assert np.asarray(image.convert("RGB")).min() > 240  # transparency on white
        # the index's own files are untouched: verify still passes
        assert Index.open(small.index).verify() == []


def test_thumbnails_are_kept_in_memory_when_the_cache_cannot_be_written(small: SimpleNamespace,
                                                                        tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")  # works as root too, unlike a read-only mode
    with served(index=str(small.index), thumb_cache=str(blocker / "thumbs")) as app:
        first = app.get(f"/thumbs/{small.ids['img0.png']}")
        assert first.status_code == 200
        assert app.get(f"/thumbs/{small.ids['img0.png']}").content == first.content
        thumbs = app.get("/stats").json()["thumbs"]
        assert thumbs["on_disk"] is False and thumbs["in_memory"] == 1 and thumbs["disk_error"]


# -- API key --------------------------------------------------------------------------------


def test_api_key_guards_every_api_route(shared, retriever: Retriever) -> None:
    key = "correct horse battery staple"
    hit = retriever.search(QUERIES[0], k=1)[0]
    routes = [("get", "/search?q=dog", {}), ("post", "/search", {"json": {"q": "dog"}}),
              ("post", "/search", {"files": {"image": ("q.png", _png_bytes(8, 8))}}),
              ("get", f"/images/{hit.id}", {}), ("get", f"/thumbs/{hit.id}", {}), ("get", "/stats", {})]
    with served(**shared, api_key=key) as app:
        for method, url, kwargs in routes:
            for headers in ({}, {"Authorization": "Bearer wrong"}, {"X-API-Key": "wrong"},
                            {"Authorization": f"Basic {key}"}):
                response = getattr(app, method)(url, headers=headers, **kwargs)
                assert response.status_code == 401, (url, headers, response.status_code)
                assert "API key" in response.json()["detail"]
            for headers in ({"Authorization": f"Bearer {key}"}, {"X-API-Key": key}):
                assert getattr(app, method)(url, headers=headers, **kwargs).status_code == 200, (url, headers)
        for open_url in ("/health", "/", "/openapi.json"):
            assert app.get(open_url).status_code == 200, open_url

        assert app.post("/login", json={"api_key": "wrong"}).status_code == 401
        assert app.post("/login", json={"key": key}).status_code == 400
        login = app.post("/login", json={"api_key": key})
        assert login.status_code == 204
        cookie = login.headers["set-cookie"]
        assert cookie.startswith(f"{COOKIE}={cookie_token(key)};")
        assert "HttpOnly" in cookie and "SameSite=strict" in cookie.replace("Strict", "strict")
        assert key not in cookie  # the cookie holds a token derived from the key, not the key
        for method, url, kwargs in routes:  # the client now sends the cookie
            assert getattr(app, method)(url, **kwargs).status_code == 200, url
        assert app.post("/logout").status_code == 204
        app.cookies.clear()
        assert app.get("/search?q=dog").status_code == 401
        app.cookies.set(COOKIE, cookie_token("an older key"))
        assert app.get("/search?q=dog").status_code == 401
        app.cookies.clear()


# -- status, page, description ----------------------------------------------------------------


def test_health_says_loading_then_ready_and_stats_describe_the_server(demo: Path) -> None:
    from fastapi.testclient import TestClient

    from vkd.serve import ServeConfig, create_app

    app = create_app(ServeConfig(index=str(demo / "index")))
    before = TestClient(app)  # no lifespan yet: nothing loaded
    response = before.get("/health")
    assert response.status_code == 503 and response.json() == {"status": "loading"}
    assert before.get("/search?q=dog").status_code == 503
    with TestClient(app) as client:
        assert app.state.engine.wait_ready(60)
        health = client.get("/health")
        assert health.status_code == 200 and health.json()["status"] == "ready"
        for _ in range(3):
            client.get("/search", params={"q": "dog"})
        stats = client.get("/stats").json()
    index = Index.open(demo / "index")
    assert stats["rows"] == index.rows and stats["live_rows"] == len(index) and stats["shards"] == len(index.shards)
    assert stats["index"] == str(index.path)
    for role in ("student", "teacher"):
        model = stats["models"][role]
        assert model["backend"] == "onnx" and model["fingerprint"] == index.manifest[role]["fingerprint"]
        assert model["dim"] == index.manifest[role]["dim"] and model["name"]
    assert stats["uptime_s"] > 0 and stats["requests"] >= 4
    assert stats["latency_ms"]["n"] >= 3 and stats["latency_ms"]["p50"] <= stats["latency_ms"]["p99"]
    assert stats["torch_loaded"] is ("torch" in sys.modules)


def test_a_server_that_cannot_load_its_models_says_why(demo: Path, tmp_path: Path) -> None:
    from fastapi.testclient import TestClient

    from vkd.serve import ServeConfig, create_app

    app = create_app(ServeConfig(index=str(demo / "index"), student=str(tmp_path / "no-such-model")))
    with TestClient(app) as client:
        assert not app.state.engine.wait_ready(60)
        health = client.get("/health")
        assert health.status_code == 503 and health.json()["status"] == "failed"
        assert "no-such-model" in health.json()["detail"]
        search = client.get("/search?q=dog")
        assert search.status_code == 503 and "could not load" in search.json()["detail"]


def test_openapi_describes_every_route_and_its_errors(client) -> None:
    spec = client.get("/openapi.json").json()
    paths = spec["paths"]
    for path, methods in {"/search": ("get", "post"), "/images/{image_id}": ("get",), "/thumbs/{image_id}": ("get",),
                          "/health": ("get",), "/stats": ("get",), "/login": ("post",), "/logout": ("post",)}.items():
        for method in methods:
            assert method in paths[path], (path, method)
            assert paths[path][method].get("summary"), (path, method)
    assert {"400", "413", "415", "422", "503"} <= set(paths["/search"]["post"]["responses"])
    assert {"application/json", "multipart/form-data"} <= set(paths["/search"]["post"]["requestBody"]["content"])
    assert {"400", "503"} <= set(paths["/search"]["get"]["responses"])
    assert {"403", "404"} <= set(paths["/images/{image_id}"]["get"]["responses"])
    assert "503" in paths["/health"]["get"]["responses"]
    from vkd.serve.app import QUERY_FIELDS  # combined queries and filters (issue 16)

    assert {"k", "candidates", "rerank", "mode", "q", *QUERY_FIELDS} == {p["name"] for p in paths["/search"]["get"]["parameters"]}


def test_the_page_and_its_files_are_served_without_a_key(shared) -> None:
    with served(**shared, api_key="k" * 20) as app:
        page = app.get("/")
        assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
        assert "script-src 'self'" in page.headers["content-security-policy"]
        assert app.get("/static/no-such-file.js").status_code == 404
        assert app.get("/static/../app.py").status_code == 404


def test_display_path_keeps_bytes_that_are_not_utf8_readable() -> None:
    name = os.fsdecode(b"caf\xe9/x.png")
    assert display_path(name) == "caf\\xe9/x.png"
    json.dumps(display_path(name)).encode("utf-8")  # encodable, unlike the lone surrogate


# -- reload while serving --------------------------------------------------------------------


def test_an_index_updated_while_serving_is_picked_up_without_a_restart(tiny_clip: Path, tiny_clip_teacher: Path,
                                                                      tmp_path: Path) -> None:
    images = tmp_path / "photos"
    images.mkdir()
    for i, image in enumerate(make_images(6, seed=11)):
        image.save(images / f"a{i}.png")
    options = dict(student=str(tiny_clip), teacher=str(tiny_clip_teacher), device="cpu", workers=1, batch_size=8,
                   shard_size=4)
    index_dir = Index.build(images, tmp_path / "index", **options).path
    failures: list[str] = []
    stop = threading.Event()
    with served(index=str(index_dir), reload_interval_s=0.1, thumb_cache=str(tmp_path / "thumbs")) as app:
        assert app.get("/health").json()["live_rows"] == 6

        def hammer() -> None:  # searches during the update: none may fail or see a partial index
            while not stop.is_set():
                response = app.get("/search", params={"q": "a photo", "k": 50})
                count = len(response.json().get("results", [])) if response.status_code == 200 else -1
                if count not in (6, 9):
                    failures.append(f"{response.status_code}: {count} results")
                time.sleep(0.01)

        thread = threading.Thread(target=hammer)
        thread.start()
        try:
            for i, image in enumerate(make_images(3, seed=12)):
                image.save(images / f"b{i}.png")
            Index.build(images, index_dir, **options)
            deadline = time.monotonic() + 20
            while app.get("/health").json()["live_rows"] != 9 and time.monotonic() < deadline:
                time.sleep(0.05)
        finally:
            stop.set()
            thread.join()
        assert app.get("/health").json()["live_rows"] == 9
        new = {hit["path"]: hit["id"] for hit in app.get("/search", params={"q": "a photo", "k": 50}).json()["results"]}
        assert {"b0.png", "b1.png", "b2.png"} <= set(new)
        assert app.get(f"/images/{new['b1.png']}").content == (images / "b1.png").read_bytes()
        stats = app.get("/stats").json()
        assert stats["reloads"] >= 1 and stats["reload_error"] is None
    assert not failures, failures[:5]


# -- torch-free import path -----------------------------------------------------------------------


def test_serving_onnx_models_imports_neither_torch_nor_transformers(demo: Path) -> None:
    script = f"""
import io, sys
from fastapi.testclient import TestClient
from PIL import Image
from vkd.serve import ServeConfig, create_app
app = create_app(ServeConfig(index={str(demo / "index")!r}))
with TestClient(app) as client:
    assert app.state.engine.wait_ready(60), app.state.engine.error
    assert client.get("/search", params={{"q": "a dog on a beach"}}).json()["reranked"] == "teacher"
    buffer = io.BytesIO()
    Image.new("RGB", (32, 32), (200, 30, 30)).save(buffer, "PNG")
    assert client.post("/search", files={{"image": ("q.png", buffer.getvalue())}}).status_code == 200
    hit = client.get("/search", params={{"q": "a cat"}}).json()["results"][0]
    assert client.get(hit["thumb_url"]).status_code == 200
    assert client.get("/stats").json()["torch_loaded"] is False
loaded = sorted(name for name in sys.modules if name.split(".")[0] in ("torch", "transformers", "peft", "accelerate"))
assert not loaded, loaded[:10]
print("torch-free")
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                            env={**os.environ, "VKD_HOME": str(demo.parent / "home")})
    assert result.returncode == 0 and "torch-free" in result.stdout, result.stderr[-3000:]


# -- the command line ----------------------------------------------------------------------------


def test_serve_warns_when_exposed_without_a_key_and_checks_the_index_first(tmp_path: Path) -> None:
    runner = CliRunner()
    exposed = runner.invoke(cli, ["serve", "--host", "0.0.0.0", "--index", str(tmp_path / "none")])
    assert exposed.exit_code == 1
    assert "without an API key" in exposed.output and "no index at" in exposed.output
    keyed = runner.invoke(cli, ["serve", "--host", "0.0.0.0", "--index", str(tmp_path / "none")],
                          env={"VKD_API_KEY": "s3cret-key"})
    assert keyed.exit_code == 1 and "without an API key" not in keyed.output
    loopback = runner.invoke(cli, ["serve", "--index", str(tmp_path / "none")])
    assert "without an API key" not in loopback.output
    bad_size = runner.invoke(cli, ["serve", "--max-upload-bytes", "lots"])
    assert bad_size.exit_code == 2 and "20MB" in bad_size.output


def test_serve_without_torch_names_the_export_to_make(demo: Path, small: SimpleNamespace, monkeypatch) -> None:
    from vkd.serve import commands
    from vkd.serve.config import ServeConfig

    monkeypatch.setattr(commands, "_has_torch", lambda: False)  # as in a `vkd[serve]` install
    commands.preflight(ServeConfig(index=str(demo / "index")))  # both models have ONNX exports: fine
    with pytest.raises(Exception, match=r"vkd export .*tiny-clip") as raised:
        commands.preflight(ServeConfig(index=str(small.index)))
    assert "vkd[full]" in str(raised.value.message)
    with pytest.raises(Exception, match="--prefer torch needs torch"):
        commands.preflight(ServeConfig(index=str(demo / "index"), prefer="torch"))


def test_cli_names_the_extra_a_missing_library_comes_with(monkeypatch) -> None:
    import importlib

    from vkd import cli as cli_module

    real = importlib.import_module

    def without_torch(name: str, *args, **kwargs):
        if name == "vkd.distill.commands":
            raise ModuleNotFoundError("No module named 'torch'", name="torch")
        return real(name, *args, **kwargs)

    monkeypatch.setattr(cli_module.importlib, "import_module", without_torch)
    result = CliRunner().invoke(cli, ["distill", "--help"])
    assert result.exit_code == 1 and 'pip install "vkd[full]"' in result.output


# -- one real server on loopback -------------------------------------------------------------------


def _raw_get(port: int, target: str) -> tuple[int, bytes]:
    """A request line sent as written: no client-side normalisation of ``..`` or escapes."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        connection.putrequest("GET", target, skip_accept_encoding=True)
        connection.putheader("Authorization", "Bearer loopback-key")
        connection.endheaders()
        response = connection.getresponse()
        return response.status, response.read()
    finally:
        connection.close()


@pytest.mark.slow
def test_a_real_uvicorn_server_on_loopback(demo: Path, retriever_fp32: Retriever) -> None:
    from vkd.bench.serve import ServerProcess
    from vkd.serve.client import ServerError
    from vkd.serve.client import search as remote_search

    retriever = retriever_fp32
    with ServerProcess(["--index", str(demo / "index"), "--api-key", "loopback-key", "--precision", "fp32"],
                       timeout_s=180) as server:
        port = server.port
        url = f"http://127.0.0.1:{port}"
        assert server.get("/health")[0] == 200
        assert server.get("/stats")[0] == 401

        # the same answers as the library, from concurrent clients
        expected = {query: [hit.id for hit in retriever.search(query, k=5)] for query in QUERIES}
        failures: list[str] = []

        def client(number: int) -> None:
            for i in range(5):
                query = QUERIES[(number + i) % len(QUERIES)]
                try:
                    answer = remote_search(url, query=query, k=5, api_key="loopback-key")
                except ServerError as error:
                    failures.append(str(error))
                    continue
                if [hit["id"] for hit in answer["results"]] != expected[query]:
                    failures.append(f"{query}: {answer['results']}")

        threads = [threading.Thread(target=client, args=(n,)) for n in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert not failures, failures[:3]

        for target in ("/images/../../etc/passwd", "/thumbs/../../../etc/passwd", "/images/..%2F..%2Fetc%2Fpasswd",
                       "/images/%2e%2e/%2e%2e/etc/passwd", "/images//etc/passwd", "/static/../../../../etc/passwd",
                       "/static/..%2F..%2F..%2F..%2Fetc%2Fpasswd", "//etc/passwd"):
            status, body = _raw_get(port, target)
            assert status in (400, 404), (target, status)
            assert not any(marker in body for marker in PASSWD_MARKERS), target

        # vkd search --server: the same output formats, through the standard library only
        runner = CliRunner()
        table = runner.invoke(cli, ["search", QUERIES[0], "--server", url, "-k", "3"],
                              env={"VKD_API_KEY": "loopback-key"})
        assert table.exit_code == 0, table.output
        lines = table.stdout.splitlines()
        assert lines[0].split() == ["rank", "score", "student", "path"] and len(lines) == 4
        hits = retriever.search(QUERIES[0], k=3)
        for line, hit in zip(lines[1:], hits, strict=True):
            assert line.split()[0] == str(hit.rank) and line.split()[-1] == Path(hit.path).name
        image = sorted((demo / "data" / "images" / "test").glob("*.png"))[0]
        as_json = runner.invoke(cli, ["search", "--image", str(image), "--server", url, "--json", "-k", "2",
                                      "--api-key", "loopback-key"])
        assert as_json.exit_code == 0, as_json.output
        payload = json.loads(as_json.stdout)
        assert payload["hits"][0]["path"] == image.name and payload["reranked"] == "teacher"
        assert set(payload) >= {"query", "reranked", "candidates", "timings", "hits", "image", "k"}
        unkeyed = runner.invoke(cli, ["search", "dog", "--server", url])
        assert unkeyed.exit_code == 1 and "API key" in unkeyed.output
        empty = runner.invoke(cli, ["search", " ", "--server", url, "--api-key", "loopback-key"])
        assert empty.exit_code == 2 and "empty query" in empty.output

        lean = subprocess.run(
            [sys.executable, "-c", "import sys; from vkd.cli import main; sys.argv = ['vkd', 'search', 'dog', "
             f"'--server', {url!r}, '-k', '2']\ntry:\n    main()\nexcept SystemExit as e:\n    assert not e.code, e\n"
             "heavy = [m for m in ('numpy', 'pyarrow', 'faiss', 'PIL', 'fastapi', 'torch') if m in sys.modules]\n"
             "assert not heavy, heavy\nprint('stdlib only')"],
            capture_output=True, text=True, timeout=60, env={**os.environ, "VKD_API_KEY": "loopback-key"})
        assert lean.returncode == 0 and "stdlib only" in lean.stdout, lean.stderr[-2000:]

        process = server.process
        assert process is not None
    # SIGTERM: a graceful shutdown, after which uvicorn re-raises the signal (not a kill -9)
    assert process.returncode in (0, -signal.SIGTERM), server.lines[-10:]


@pytest.mark.slow
def test_bench_serve_quick_writes_its_result(demo: Path, tmp_path: Path) -> None:
    from vkd.bench.commands import bench
    from vkd.bench.report import read_result

    result = CliRunner().invoke(bench, ["serve", "--quick", "--demo-dir", str(demo), "--out", str(tmp_path),
                                        "--clients", "2", "--requests", "3"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    data = read_result(tmp_path / "serve.json")
    runtimes = {runtime["runtime"]: runtime for runtime in data["results"]["runtimes"]}
    assert set(runtimes) == {"torch", "onnx (slim)"}
    for runtime in runtimes.values():
        assert runtime["errors"] == 0 and runtime["requests_ok"] == 6
        assert runtime["startup_s"] > 0 and runtime["idle_rss_mib"] > 0 and runtime["requests_per_s"] > 0
        assert set(runtime["latency"]) >= {"p50_ms", "p95_ms", "p99_ms"}
    assert runtimes["onnx (slim)"]["torch_loaded"] is False and runtimes["torch"]["torch_loaded"] is True
    assert {m["backend"] for m in runtimes["onnx (slim)"]["models"].values()} == {"onnx"}
    assert (tmp_path / "serve.md").read_text().startswith("## serve (quick)")


@pytest.mark.slow
def test_workers_share_one_port_each_with_its_own_models(demo: Path) -> None:
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    process = subprocess.Popen([sys.executable, "-m", "vkd", "serve", "--index", str(demo / "index"), "--workers", "2",
                                "--port", str(port), "--no-access-log", "--log-level", "warning"],
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        pids: set[int] = set()
        deadline = time.monotonic() + 120
        while len(pids) < 2 and time.monotonic() < deadline:
            assert process.poll() is None, process.stderr.read() if process.stderr else ""
            try:
                connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
                connection.request("GET", "/stats")  # a new connection each time: either worker may answer
                response = connection.getresponse()
                body = json.loads(response.read())
                connection.close()
            except (OSError, http.client.HTTPException, ValueError):
                time.sleep(0.2)
                continue
            if response.status == 200 and body.get("status") == "ready":
                assert body["live_rows"] == len(Index.open(demo / "index"))
                pids.add(body["pid"])
            else:
                time.sleep(0.1)
        assert len(pids) == 2, f"only workers {pids} answered"
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(30)
