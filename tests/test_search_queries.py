"""Combined queries (issue 16): weighted text and image terms, some negative, through one
query model (``vkd.retrieval.query``) in the library, ``vkd search`` and the HTTP API;
``min_score``; the ``--paths`` / ``--print0`` / ``--html`` outputs.

The reference for every ranking is brute force: the teacher's own encodings of the terms,
combined with the same weights, against every stored teacher vector of the index."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from conftest import make_images
from serve_helpers import served

from vkd.cli import cli
from vkd.indexer import Index
from vkd.retrieval import Retriever
from vkd.retrieval.query import Filters, Query, QueryError, Term, combine, parse_compact

TEXTS = ["a dog on a beach", "red car", "two cats", "snow"]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("queries-corpus")
    for i, image in enumerate(make_images(30, seed=11)):
        image.save(root / f"img-{i:02d}.png")
    return root


@pytest.fixture(scope="module")
def index_dir(corpus: Path, tiny_clip: Path, tiny_clip_teacher: Path,
              tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("queries-index") / "index"
    return Index.build(corpus, out, student=str(tiny_clip), teacher=str(tiny_clip_teacher), shard_size=12).path


@pytest.fixture(scope="module")
def retriever(index_dir: Path) -> Retriever:
    return Retriever(index_dir, prefer="torch")


def _teacher_ranking(retriever: Retriever, terms: list[tuple[object, float]]) -> list[tuple[str, float]]:
    """(path, score) of every live row by the combined teacher query, brute force."""
    teacher = retriever.teacher
    vectors = []
    for query, _ in terms:
        if isinstance(query, str):
            vectors.append(teacher.encode_text([query])[0])
        else:
            vectors.append(teacher.encode_images([query])[0])
    combined = combine(np.stack(vectors), [weight for _, weight in terms])
    scored = []
    for position, shard in enumerate(retriever.index.shards):
        live = np.flatnonzero(shard.live_mask())
        scores = shard.teacher_vectors(live) @ combined
        for record, score in zip(shard.records(live), scores, strict=True):
            scored.append((float(score), position, record["row"], record["path"]))
    scored.sort(key=lambda item: (-item[0], item[1], item[2]))
    return [(path, score) for score, _, _, path in scored]


# -- the compact syntax ---------------------------------------------------------------------


def test_parse_compact_weights_signs_and_literal_hyphens() -> None:
    assert parse_compact("2:cat + dog - grass") == [Term("cat", 2), Term("dog", 1), Term("grass", -1)]
    assert parse_compact("a t-shirt") == [Term("a t-shirt", 1)]  # no spaces around '-': literal
    assert parse_compact("1+1 -2") == [Term("1+1 -2", 1)]
    assert parse_compact("0.5:snow - 1.5:rain") == [Term("snow", 0.5), Term("rain", -1.5)]
    assert parse_compact("time: 10:30") == [Term("time: 10:30", 1)]  # not a number before ':'
    assert parse_compact("cat + dog", raw=True) == [Term("cat + dog", 1)]
    with pytest.raises(QueryError, match="empty"):
        parse_compact("cat + ")
    with pytest.raises(QueryError, match="positive"):
        Query((Term("cat", -1),))
    with pytest.raises(QueryError, match="non-zero"):
        Term("cat", 0)


def test_describe_round_trips_through_the_compact_syntax() -> None:
    query = Query(tuple(parse_compact("2:cat + dog - grass")))
    assert query.describe() == "2:cat + dog - grass"
    assert parse_compact(query.describe()) == list(query.terms)


# -- the library ----------------------------------------------------------------------------


@pytest.mark.parametrize("rerank", [True, False])
def test_combined_query_equals_brute_force_over_combined_scores(retriever: Retriever, corpus: Path,
                                                                rerank: bool) -> None:
    terms = [("a dog on a beach", 1.0), ("snow", 0.5), ("two cats", -1.0), (corpus / "img-03.png", 0.7)]
    n = len(retriever.index)
    result = retriever.search(terms, k=10, candidates=n, rerank=rerank)
    if rerank:
        expected = _teacher_ranking(retriever, terms)[:10]
        assert [hit.path for hit in result] == [path for path, _ in expected]
        assert [hit.score for hit in result] == pytest.approx([score for _, score in expected], abs=1e-4)
        assert result.reranked == "teacher"
    else:  # stage 1 alone: the student's combination, exact on this flat index
        student = retriever.student
        vectors = np.stack([student.encode_text([q])[0] if isinstance(q, str) else student.encode_images([q])[0]
                            for q, _ in terms])
        combined = combine(vectors, [w for _, w in terms])
        scores = {}
        for shard in retriever.index.shards:
            rows = np.arange(shard.rows)
            for record, score in zip(shard.records(rows), shard.student_vectors(rows) @ combined, strict=True):
                scores[record["path"]] = float(score)
        assert [hit.score for hit in result] == pytest.approx(sorted(scores.values(), reverse=True)[:10], abs=1e-4)
    # a Query object and the list of pairs are the same search
    same = retriever.search(Query(tuple(Term(q, w) for q, w in terms)), k=10, candidates=n, rerank=rerank)
    assert [hit.id for hit in same] == [hit.id for hit in result]


def test_plain_text_search_is_unchanged(retriever: Retriever) -> None:
    n = len(retriever.index)
    for text in TEXTS:
        plain = retriever.search(text, k=5, candidates=n)
        assert [hit.path for hit in plain] == [path for path, _ in _teacher_ranking(retriever, [(text, 1.0)])[:5]]
        assert plain.query == text
        # a '+' in library text is literal: the library never parses the compact syntax
        assert retriever.search(f"{text} + x", k=3).query == f"{text} + x"


def test_negative_term_pushes_its_matches_down(retriever: Retriever, corpus: Path) -> None:
    n = len(retriever.index)
    base = retriever.search("a dog on a beach", k=n, candidates=n)
    top = Path(base[0].path)
    pushed = retriever.search([("a dog on a beach", 1.0), (top, -1.0)], k=n, candidates=n)
    rank_before = [hit.path for hit in base].index(str(top))
    rank_after = [hit.path for hit in pushed].index(str(top))
    assert rank_before == 0 and rank_after > rank_before
    # a text negative: the images the negative text likes most move down on average
    cats = [path for path, _ in _teacher_ranking(retriever, [("two cats", 1.0)])[:5]]
    without = retriever.search("snow", k=n, candidates=n)
    with_not = retriever.search([("snow", 1.0), ("two cats", -1.0)], k=n, candidates=n)
    mean_rank = lambda result: np.mean([[hit.path for hit in result].index(p) for p in cats])  # noqa: E731
    assert mean_rank(with_not) > mean_rank(without)


def test_terms_that_cancel_are_a_query_error(retriever: Retriever) -> None:
    with pytest.raises(QueryError, match="cancel"):
        retriever.search([("snow", 1.0), ("snow", -1.0)])


def test_min_score_cuts_the_ranking(retriever: Retriever) -> None:
    n = len(retriever.index)
    full = retriever.search("red car", k=n, candidates=n)
    threshold = full[4].score
    cut = retriever.search("red car", k=n, candidates=n, min_score=threshold)
    assert [hit.id for hit in cut] == [hit.id for hit in full if hit.score >= threshold]
    assert all(hit.score >= threshold for hit in cut) and 5 <= len(cut) < n
    assert retriever.search("red car", k=5, min_score=10.0) == []
    stage1 = retriever.search("red car", k=n, candidates=n, rerank=False)
    cut1 = retriever.search("red car", k=n, candidates=n, rerank=False, min_score=stage1[2].student_score)
    assert all(hit.student_score >= stage1[2].student_score for hit in cut1) and len(cut1) >= 3


# -- vkd search -----------------------------------------------------------------------------


def _run(args: list[str]):
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    return result


def test_cli_compact_and_flags_equal_the_library(retriever: Retriever, index_dir: Path, corpus: Path) -> None:
    n = str(len(retriever.index))
    image = corpus / "img-07.png"
    expected = retriever.search([("a dog on a beach", 2.0), ("snow", 1.0), ("two cats", -1.0), (image, -1.0)],
                                k=8, candidates=int(n))
    compact = _run(["search", "2:a dog on a beach + snow - two cats", "--image-not", str(image), "-k", "8",
                    "--candidates", n, "--index", str(index_dir), "--prefer", "torch", "--json"])
    flags = _run(["search", "2:a dog on a beach", "--and", "snow", "--not", "two cats", "--image-not", str(image),
                  "-k", "8", "--candidates", n, "--index", str(index_dir), "--prefer", "torch", "--json"])
    for output in (compact.stdout, flags.stdout):
        payload = json.loads(output)
        assert [hit["id"] for hit in payload["hits"]] == [hit.id for hit in expected]
        assert [term["weight"] for term in payload["terms"]] == [2.0, 1.0, -1.0, -1.0]
    raw = json.loads(_run(["search", "snow + rain", "--raw", "--index", str(index_dir), "--prefer", "torch",
                           "--json"]).stdout)
    assert raw["terms"] == [{"text": "snow + rain", "weight": 1.0}]


def test_cli_paths_prints_exactly_the_paths(retriever: Retriever, index_dir: Path) -> None:
    expected = [hit.path for hit in retriever.search("two cats", k=6)]
    result = _run(["search", "two cats", "-k", "6", "--paths", "--index", str(index_dir), "--prefer", "torch"])
    assert result.stdout == "".join(f"{path}\n" for path in expected)
    nul = _run(["search", "two cats", "-k", "6", "--paths", "--print0", "--index", str(index_dir),
                "--prefer", "torch"])
    assert nul.stdout_bytes == b"".join(path.encode() + b"\0" for path in expected)
    none = _run(["search", "two cats", "--paths", "--min-score", "10", "--index", str(index_dir), "--prefer", "torch"])
    assert none.stdout == ""
    bad = CliRunner().invoke(cli, ["search", "x", "--print0", "--index", str(index_dir)])
    assert bad.exit_code == 2 and "--paths" in bad.output


def test_cli_min_score_cuts(retriever: Retriever, index_dir: Path) -> None:
    full = retriever.search("snow", k=10)
    threshold = full[3].score
    result = _run(["search", "snow", "-k", "10", "--min-score", repr(threshold), "--json", "--index", str(index_dir),
                   "--prefer", "torch"])
    hits = json.loads(result.stdout)["hits"]
    assert [hit["id"] for hit in hits] == [hit.id for hit in full if hit.score >= threshold]


def test_cli_html_gallery_has_every_hit(retriever: Retriever, index_dir: Path, tmp_path: Path) -> None:
    page = tmp_path / "gallery.html"
    _run(["search", "a dog on a beach - snow", "-k", "7", "--html", str(page), "--index", str(index_dir),
          "--prefer", "torch"])
    text = page.read_text()
    expected = retriever.search([("a dog on a beach", 1.0), ("snow", -1.0)], k=7)
    for hit in expected:
        assert hit.path in text and f"{hit.score:.4f}" in text
    assert text.count("data:image/jpeg;base64,") == 7 and "a dog on a beach - snow" in text
    assert "http://" not in text and "https://" not in text  # opens offline


def test_cli_errors_say_the_fix(index_dir: Path) -> None:
    empty = CliRunner().invoke(cli, ["search", "cat + ", "--index", str(index_dir)])
    assert empty.exit_code == 2 and "--raw" in empty.output
    both = CliRunner().invoke(cli, ["search", "cat", "--paths", "--json", "--index", str(index_dir)])
    assert both.exit_code == 2 and "choose one" in both.output
    negative = CliRunner().invoke(cli, ["search", "--index", str(index_dir), "--", "-1:cat"])
    assert negative.exit_code == 2 and "positive" in negative.output


def test_cli_help_documents_the_syntax() -> None:
    result = _run(["search", "--help"])
    for text in ('"2:cat + dog - grass"', "--and", "--not", "--image-not", "--raw", "--paths", "--print0",
                 "--html", "--min-score", "--path-glob", "--taken-after", "--orientation"):
        assert text in result.output


# -- the HTTP API ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def client(retriever: Retriever, index_dir: Path):
    with served(retriever=retriever, index=str(index_dir)) as test_client:
        yield test_client


def _ids(response) -> list[str]:
    assert response.status_code == 200, response.text
    return [hit["id"] for hit in response.json()["results"]]


def test_api_combined_queries_match_the_library(client, retriever: Retriever, corpus: Path) -> None:
    n = len(retriever.index)
    expected = retriever.search([("a dog on a beach", 2.0), ("two cats", -1.0)], k=6, candidates=n)
    got = client.get("/search", params={"q": "2:a dog on a beach - two cats", "k": 6, "candidates": n})
    assert _ids(got) == [hit.id for hit in expected]
    assert got.json()["query"] == "2:a dog on a beach - two cats"
    body = {"terms": [{"text": "a dog on a beach", "weight": 2}, {"text": "two cats", "weight": -1}], "k": 6,
            "candidates": n}
    assert _ids(client.post("/search", json=body)) == [hit.id for hit in expected]
    # old requests are answered as before
    assert _ids(client.get("/search", params={"q": "snow", "k": 4})) == [hit.id for hit in retriever.search("snow", k=4)]
    assert client.get("/search", params={"q": "snow"}).json()["query"] == "snow"
    # image terms as multipart files with weights, with text terms
    image = corpus / "img-05.png"
    with_image = retriever.search([("snow", 1.0), (image, 0.5), (corpus / "img-09.png", -1.0)], k=5, candidates=n)
    files = [("image", ("a.png", image.read_bytes(), "image/png")),
             ("image", ("b.png", (corpus / "img-09.png").read_bytes(), "image/png"))]
    got = client.post("/search", files=files, data={"q": "snow", "image_weight": ["0.5", "-1"], "k": "5",
                                                    "candidates": str(n)})
    assert _ids(got) == [hit.id for hit in with_image]
    one = client.post("/search", files={"image": ("a.png", image.read_bytes(), "image/png")}, data={"k": "3"})
    assert _ids(one) == [hit.id for hit in retriever.search(image, k=3)] and one.json()["query"] is None


def test_api_filters_and_min_score_match_the_library(client, retriever: Retriever) -> None:
    n = len(retriever.index)
    filters = Filters(path_glob="img-1*", orientation="landscape")
    expected = retriever.search("red car", k=20, candidates=n, filters=filters)
    got = client.get("/search", params={"q": "red car", "k": 20, "candidates": n, "path_glob": "img-1*",
                                        "orientation": "landscape"})
    assert _ids(got) == [hit.id for hit in expected] and len(expected) == 10
    threshold = expected[3].score
    body = {"q": "red car", "k": 20, "candidates": n, "path_glob": "img-1*", "min_score": threshold}
    assert _ids(client.post("/search", json=body)) == [hit.id for hit in expected if hit.score >= threshold]
    nothing = client.get("/search", params={"q": "red car", "path_prefix": "nowhere/"})
    assert _ids(nothing) == []


def test_api_bad_query_input_is_a_400_with_the_fix(client) -> None:
    for params, text in (({"q": "cat + "}, "raw"), ({"q": "-1:cat"}, "positive"),
                         ({"q": "cat", "modified_after": "yesterday"}, "ISO"),
                         ({"q": "cat", "path_glob": "/etc/*"}, "relative")):
        response = client.get("/search", params=params)
        assert response.status_code == 400 and text in response.json()["detail"], response.text
    bad_terms = client.post("/search", json={"terms": [{"text": "cat", "weight": "x"}]})
    assert bad_terms.status_code == 400 and "number" in bad_terms.json()["detail"]
    shape = client.post("/search", json={"terms": "cat"})
    assert shape.status_code in (400, 422)
    weights = client.post("/search", files={"image": ("a.png", _png(), "image/png")},
                          data={"image_weight": ["1", "2"]})
    assert weights.status_code == 400 and "one weight per image" in weights.json()["detail"]


def _png() -> bytes:
    buffer = io.BytesIO()
    make_images(1)[0].save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def server_url(retriever: Retriever, index_dir: Path):
    """A real HTTP server (uvicorn on loopback, in a thread) for ``vkd search --server``."""
    import threading
    import time

    import uvicorn

    from vkd.serve import SearchEngine, ServeConfig, create_app

    config = ServeConfig(index=str(index_dir))
    app = create_app(config, engine=SearchEngine(config, retriever=retriever))
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not (server.started and app.state.engine.wait_ready(0.1)):
        assert time.monotonic() < deadline and thread.is_alive(), "the server did not start"
        time.sleep(0.05)
    port = server.servers[0].sockets[0].getsockname()[1]
    yield f"http://127.0.0.1:{port}"
    server.should_exit = True
    thread.join(30)


def test_cli_server_sends_combined_queries_and_filters(server_url: str, retriever: Retriever, index_dir: Path,
                                                       corpus: Path) -> None:
    n = len(retriever.index)
    image = corpus / "img-04.png"
    filters = Filters(path_glob="img-2*")
    result = _run(["search", "2:a dog on a beach - snow", "--image-not", str(image), "-k", "5", "--candidates",
                   str(n), "--path-glob", "img-2*", "--server", server_url, "--json"])
    hits = json.loads(result.stdout)["hits"]
    # --image-not is weight -1 on the command line
    expected = retriever.search([("a dog on a beach", 2.0), ("snow", -1.0), (image, -1.0)], k=5, candidates=n,
                                filters=filters)
    assert [hit["id"] for hit in hits] == [hit.id for hit in expected]
    raw = _run(["search", "snow + rain", "--raw", "-k", "3", "--server", server_url, "--json"])
    assert [hit["id"] for hit in json.loads(raw.stdout)["hits"]] == [hit.id for hit in
                                                                     retriever.search("snow + rain", k=3)]
    cut = _run(["search", "snow", "--min-score", "10", "--server", server_url, "--json"])
    assert json.loads(cut.stdout)["hits"] == []
    plain = _run(["search", "snow", "-k", "3", "--server", server_url, "--json"])
    assert [hit["id"] for hit in json.loads(plain.stdout)["hits"]] == [hit.id for hit in retriever.search("snow", k=3)]
    refused = CliRunner().invoke(cli, ["search", "snow", "--paths", "--server", server_url])
    assert refused.exit_code == 2 and "--server" in refused.output
