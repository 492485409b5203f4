"""Two-stage search: the merge/rerank arithmetic on arrays, then the Retriever and
``vkd search`` on a small index of a tiny CLIP student with a wider CLIP teacher."""

from __future__ import annotations

import json
import shutil
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from conftest import make_images

from vkd.cli import cli
from vkd.indexer import Index, IndexMismatchError
from vkd.retrieval import Retriever
from vkd.retrieval.stages import Candidates, merge_candidates, rerank, top_k_order

QUERIES = ["a dog on a beach", "red car parked in the street", "two cats", "a boat under a bridge", "snow"]

# -- arrays ---------------------------------------------------------------------------------


def test_merge_orders_by_score_then_shard_then_row_and_pads() -> None:
    shard0 = (np.array([[0.9, 0.5, -np.inf]], np.float32), np.array([[4, 2, -1]]))
    shard1 = (np.array([[0.5, 0.7]], np.float32), np.array([[1, 3]]))
    merged = merge_candidates([shard0, shard1], k=6, n_queries=1)  # at most the 5 the shards returned
    assert merged.shard.tolist() == [[0, 1, 0, 1, -1]]
    assert merged.row.tolist() == [[4, 3, 2, 1, -1]]  # the 0.5 tie: shard 0 first
    assert merged.score[0, :4].tolist() == pytest.approx([0.9, 0.7, 0.5, 0.5])
    assert np.isneginf(merged.score[0, 4])
    top2 = merge_candidates([shard0, shard1], k=2, n_queries=1)
    assert top2.row.tolist() == [[4, 3]]


def test_rerank_is_exact_top_k_of_candidates_and_reads_only_their_rows() -> None:
    rng = np.random.default_rng(0)
    shards = [rng.normal(size=(n, 8)).astype(np.float32) for n in (30, 25, 40)]
    queries = rng.normal(size=(3, 8)).astype(np.float32)
    # stage 1 stand-in: each shard's first 12 rows of a random order
    per_shard = []
    for vectors in shards:
        rows = np.stack([rng.permutation(len(vectors))[:12] for _ in queries])
        per_shard.append((rng.normal(size=rows.shape).astype(np.float32), rows))
    candidates = merge_candidates(per_shard, k=20, n_queries=len(queries))
    fetched: list[tuple[int, list[int]]] = []

    def fetch(shard: int, rows: np.ndarray) -> np.ndarray:
        fetched.append((shard, rows.tolist()))
        return shards[shard][rows]

    top, positions = rerank(candidates, queries, fetch, k=5)
    for qi, query in enumerate(queries):
        pairs = list(zip(candidates.shard[qi].tolist(), candidates.row[qi].tolist(), strict=True))
        exact = {pair: float(shards[pair[0]][pair[1]] @ query) for pair in pairs}
        expected = sorted(pairs, key=lambda pair: (-exact[pair], pair))[:5]
        assert list(zip(top.shard[qi].tolist(), top.row[qi].tolist(), strict=True)) == expected
        assert top.score[qi].tolist() == pytest.approx([exact[pair] for pair in expected], abs=1e-5)
        assert [pairs[p] for p in positions[qi]] == expected
    for _, rows in fetched:
        assert rows == sorted(rows)  # memory-map order
    asked = {(shard, row) for shard, rows in fetched for row in rows}
    assert asked == {(s, r) for s, r in zip(candidates.shard.ravel(), candidates.row.ravel(), strict=True)}


def test_top_k_order_puts_padding_last() -> None:
    scores = np.array([[0.1, -np.inf, 0.3]], np.float32)
    order = top_k_order(scores, np.array([[0, -1, 1]]), np.array([[5, -1, 2]]), k=3)
    assert order.tolist() == [[2, 0, 1]]
    picked = Candidates(np.array([[0, 1]]), np.array([[5, 2]]), np.array([[0.1, 0.3]], np.float32))
    taken = picked.take(np.array([[1, -1]]), np.array([[0.3, 0.0]], np.float32))
    assert taken.row.tolist() == [[2, -1]] and np.isneginf(taken.score[0, 1])


# -- a real index -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("corpus")
    for i, image in enumerate(make_images(40, seed=7)):
        image.save(root / f"img-{i:02d}.png")
    return root


@pytest.fixture(scope="module")
def clip_index(corpus: Path, tiny_clip: Path, tiny_clip_teacher: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """40 images in 3 shards, student tiny_clip (32-d), teacher tiny_clip_teacher (48-d)."""
    out = tmp_path_factory.mktemp("clip-index") / "index"
    return Index.build(corpus, out, student=str(tiny_clip), teacher=str(tiny_clip_teacher), shard_size=16).path


@pytest.fixture(scope="module")
def retriever(clip_index: Path) -> Retriever:
    return Retriever(clip_index, prefer="torch")


def _stored(index: Index, which: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(vectors, shard positions, rows) of every row of the index."""
    vectors, shards, rows = [], [], []
    for position, shard in enumerate(index.shards):
        all_rows = np.arange(shard.rows)
        fetch = shard.teacher_vectors if which == "teacher" else shard.student_vectors
        vectors.append(fetch(all_rows))
        shards.append(np.full(shard.rows, position))
        rows.append(all_rows)
    return np.concatenate(vectors), np.concatenate(shards), np.concatenate(rows)


def _exact_top(vectors: np.ndarray, shards: np.ndarray, rows: np.ndarray, query: np.ndarray, k: int) -> list[tuple]:
    scores = vectors @ query
    order = np.lexsort((rows, shards, -scores.astype(np.float64)))[:k]
    return [(int(shards[i]), int(rows[i])) for i in order]


def _pairs(result: list, index: Index) -> list[tuple[int, int]]:
    names = [shard.name for shard in index.shards]
    return [(names.index(hit.shard), hit.row) for hit in result]


def test_index_fixture_has_several_shards(retriever: Retriever) -> None:
    assert len(retriever.index.shards) == 3 and len(retriever.index) == 40


def test_two_stage_equals_teacher_exact_search_when_candidates_cover_the_corpus(retriever: Retriever) -> None:
    index = retriever.index
    results = retriever.search_batch(QUERIES, k=10, candidates=len(index))
    teacher_queries = retriever.teacher.encode_text(QUERIES)
    vectors, shards, rows = _stored(index, "teacher")
    for result, query in zip(results, teacher_queries, strict=True):
        assert result.reranked == "teacher" and result.candidates == 40
        assert _pairs(result, index) == _exact_top(vectors, shards, rows, query, 10)
        assert [hit.teacher_score for hit in result] == [hit.score for hit in result]
        assert [hit.rank for hit in result] == list(range(1, 11))


def test_two_stage_with_fewer_candidates_is_the_exact_rerank_of_the_ann_candidates(retriever: Retriever) -> None:
    index = retriever.index
    results = retriever.search_batch(QUERIES, k=10, candidates=12)
    student_queries = retriever.student.encode_text(QUERIES)
    teacher_queries = retriever.teacher.encode_text(QUERIES)
    s_vectors, shards, rows = _stored(index, "student")
    t_vectors, _, _ = _stored(index, "teacher")
    position = {pair: i for i, pair in enumerate(zip(shards.tolist(), rows.tolist(), strict=True))}
    for result, s_query, t_query in zip(results, student_queries, teacher_queries, strict=True):
        ann = _exact_top(s_vectors, shards, rows, s_query, 12)  # flat shards: the ANN is exact
        picked = np.array([position[pair] for pair in ann])
        expected = _exact_top(t_vectors[picked], shards[picked], rows[picked], t_query, 10)
        assert result.candidates == 12
        assert _pairs(result, index) == expected
        for pair, hit in zip(expected, result, strict=True):  # stage-1 scores are carried along
            assert hit.student_score == pytest.approx(float(s_vectors[position[pair]] @ s_query), abs=1e-5)


def test_image_query_finds_the_image_itself_first(retriever: Retriever, corpus: Path) -> None:
    paths = [corpus / "img-03.png", corpus / "img-27.png", corpus / "img-39.png"]
    from PIL import Image

    with Image.open(paths[1]) as opened:
        pil = opened.convert("RGB")
    results = retriever.search_batch([*paths, pil], k=3)
    for result, path in zip(results, [*paths, paths[1]], strict=True):
        assert Path(result[0].path) == path
        assert result[0].score == pytest.approx(1.0, abs=2e-3)  # float16 teacher vectors


def test_no_rerank_returns_the_student_ranking(retriever: Retriever) -> None:
    index = retriever.index
    result = retriever.search(QUERIES[0], k=10, rerank=False)
    vectors, shards, rows = _stored(index, "student")
    assert result.reranked is None
    assert _pairs(result, index) == _exact_top(vectors, shards, rows, retriever.student.encode_text(QUERIES[0])[0], 10)
    assert all(hit.teacher_score is None and hit.score == hit.student_score for hit in result)
    assert result.timings.teacher_encode_ms == 0.0 and result.timings.rerank_ms == 0.0


def test_timings_cover_every_stage(retriever: Retriever) -> None:
    timings = retriever.search(QUERIES[1], k=5).timings
    stages = [timings.student_encode_ms, timings.ann_ms, timings.teacher_encode_ms, timings.rerank_ms]
    assert all(value > 0 for value in stages)
    assert timings.total_ms >= sum(stages)
    assert set(timings.to_dict()) >= {"student_encode_ms", "ann_ms", "teacher_encode_ms", "rerank_ms", "total_ms"}


def test_batch_equals_single_searches_and_threads_agree(retriever: Retriever, corpus: Path) -> None:
    queries = [*QUERIES, corpus / "img-05.png"]
    single = [[hit.id for hit in retriever.search(query, k=5)] for query in queries]
    assert [[hit.id for hit in result] for result in retriever.search_batch(queries, k=5)] == single
    barrier = threading.Barrier(3)

    def run(i: int) -> list[str]:
        if i < 3:  # the first three start together
            barrier.wait(timeout=30)
        return [hit.id for hit in retriever.search(queries[i], k=5)]

    with ThreadPoolExecutor(max_workers=3) as pool:
        assert list(pool.map(run, range(len(queries)))) == single


def test_index_without_teacher_vectors_reranks_with_exact_student_scores(
    corpus: Path, tiny_clip: Path, tiny_clip_teacher: Path, tmp_path: Path
) -> None:
    index = Index.build(corpus, tmp_path / "student-only", student=str(tiny_clip), shard_size=16)
    retriever = Retriever(index.path, prefer="torch")
    result = retriever.search(QUERIES[0], k=10)
    vectors, shards, rows = _stored(index, "student")
    assert result.reranked == "student" and retriever.teacher is None
    assert _pairs(result, index) == _exact_top(vectors, shards, rows, retriever.student.encode_text(QUERIES[0])[0], 10)
    assert all(hit.teacher_score is None for hit in result)
    with pytest.raises(IndexMismatchError, match="stores no teacher vectors"):
        Retriever(index.path, teacher=str(tiny_clip_teacher), prefer="torch")


def test_models_that_do_not_match_the_index_are_refused(
    clip_index: Path, tiny_siglip: Path, tiny_clip: Path, tmp_path: Path
) -> None:
    with pytest.raises(IndexMismatchError, match="built with student .*fingerprint"):
        Retriever(clip_index, student=str(tiny_siglip), prefer="torch")
    with pytest.raises(IndexMismatchError, match="48-d teacher vectors"):
        Retriever(clip_index, teacher=str(tiny_clip), prefer="torch")
    from vkd.models.tiny import build_tiny

    other = build_tiny("clip", tmp_path / "other-teacher", seed=2, overrides={"hidden": 48, "proj": 48})
    with pytest.warns(UserWarning, match="is not the one whose vectors"):
        retriever = Retriever(clip_index, teacher=str(other), prefer="torch")
    assert len(retriever.search(QUERIES[0], k=3)) == 3


def test_reload_picks_up_a_newer_manifest(tiny_clip: Path, tmp_path: Path) -> None:
    images = tmp_path / "images"
    images.mkdir()
    for i, image in enumerate(make_images(6, seed=3)):
        image.save(images / f"a-{i}.png")
    index = Index.build(images, tmp_path / "index", student=str(tiny_clip))
    retriever = Retriever(index.path, prefer="torch")
    assert len(retriever.index) == 6 and retriever.reload() is False
    new = images / "b-new.png"
    make_images(1, seed=99)[0].save(new)
    Index.build(images, tmp_path / "index", student=str(tiny_clip))
    before = retriever.index
    assert len(before) == 6  # the open snapshot does not move by itself
    assert retriever.reload() is True
    assert len(retriever.index) == 7
    assert Path(retriever.search(new, k=1)[0].path) == new


def test_bad_arguments_are_explained(retriever: Retriever, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="smaller than k"):
        retriever.search("x", k=10, candidates=5)
    with pytest.raises(TypeError, match="pathlib.Path"):
        retriever.search(b"bytes")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="no manifest here"):
        Retriever(tmp_path, prefer="torch")


# -- CLI ----------------------------------------------------------------------------------------


def _run(args: list[str], env: dict[str, str] | None = None):
    return CliRunner().invoke(cli, args, env=env, catch_exceptions=False)


def test_cli_human_output(clip_index: Path) -> None:
    result = _run(["search", "a dog on a beach", "--index", str(clip_index), "-k", "3", "--prefer", "torch"])
    assert result.exit_code == 0, result.output
    lines = result.stdout.strip().splitlines()
    assert lines[0].split() == ["rank", "score", "student", "path"]
    assert len(lines) == 4
    rank, score, student, path = lines[1].split()
    assert rank == "1" and float(score) >= float(lines[2].split()[1]) and Path(path).is_file()
    assert "teacher rerank" in result.stderr and "total" in result.stderr


def test_cli_json_output_and_image_query(clip_index: Path, corpus: Path) -> None:
    image = corpus / "img-11.png"
    result = _run(["search", "--image", str(image), "--index", str(clip_index), "-k", "4", "--json",
                   "--prefer", "torch"])
    assert result.exit_code == 0, result.output
    payload = json.loads(result.stdout)
    assert payload["image"] == str(image) and payload["query"] is None
    assert payload["reranked"] == "teacher" and len(payload["hits"]) == 4
    assert Path(payload["hits"][0]["path"]) == image
    assert set(payload["hits"][0]) >= {"rank", "id", "path", "score", "student_score", "teacher_score"}
    assert set(payload["timings"]) >= {"student_encode_ms", "ann_ms", "teacher_encode_ms", "rerank_ms", "total_ms"}
    assert payload["student"]["dim"] == 32 and payload["teacher"]["dim"] == 48


def test_cli_no_rerank_and_vkd_index_env(clip_index: Path) -> None:
    result = _run(["search", "a red car", "--no-rerank", "--json", "--prefer", "torch"],
                  env={"VKD_INDEX": str(clip_index)})
    assert result.exit_code == 0, result.output
    payload = json.loads(result.stdout)
    assert payload["index"] == str(clip_index) and payload["reranked"] is None
    assert all(hit["teacher_score"] is None for hit in payload["hits"])


def test_cli_missing_default_index_says_run_demo(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("VKD_INDEX", raising=False)
    monkeypatch.setenv("VKD_HOME", str(tmp_path))
    result = CliRunner().invoke(cli, ["search", "a dog"])
    assert result.exit_code == 1
    assert "vkd demo" in result.output and "--index" in result.output and str(tmp_path) in result.output


def test_cli_errors(clip_index: Path, corpus: Path, tiny_siglip: Path, tmp_path: Path) -> None:
    mismatch = CliRunner().invoke(cli, ["search", "x", "--index", str(clip_index), "--student", str(tiny_siglip)])
    assert mismatch.exit_code == 1 and "fingerprint" in mismatch.output and "Traceback" not in mismatch.output
    # text and --image together are one combined query now (issue 16); neither is an error
    neither = CliRunner().invoke(cli, ["search", "--index", str(clip_index)])
    assert neither.exit_code == 2 and "give a text query or --image" in neither.output
    few = CliRunner().invoke(cli, ["search", "x", "-k", "10", "--candidates", "5", "--index", str(clip_index)])
    assert few.exit_code == 2 and "--candidates 5" in few.output
    missing = CliRunner().invoke(cli, ["search", "x", "--index", str(tmp_path / "nowhere")])
    assert missing.exit_code == 1 and "not a vkd index" in missing.output


def test_cli_help_has_an_example() -> None:
    result = _run(["search", "--help"])
    assert 'vkd search "a dog on a beach"' in result.output and "VKD_INDEX" in result.output


def test_moved_student_gets_a_clear_error(corpus: Path, tiny_clip: Path, tmp_path: Path) -> None:
    model = shutil.copytree(tiny_clip, tmp_path / "student")
    index = Index.build(corpus, tmp_path / "index", student=str(model), shard_size=64)
    shutil.rmtree(model)
    with pytest.raises(IndexMismatchError, match="--student MODEL"):
        Retriever(index.path, prefer="torch")
    retriever = Retriever(index.path, student=str(tiny_clip), prefer="torch")  # same weights elsewhere
    assert len(retriever.search("a dog", k=2, rerank=False)) == 2


def test_the_index_records_both_instructions_and_search_encodes_queries_with_them(
    corpus: Path, tiny_qwen3vl: Path, tmp_path: Path
) -> None:
    """`vkd index` records the student's query and document instructions in the manifest; a
    search reopens the student with them (named elsewhere too), so the text query carries the
    recorded query instruction and the stored images the document one."""
    from vkd.models import load_encoder

    images = tmp_path / "images"
    images.mkdir()
    for path in sorted(corpus.iterdir())[:5]:
        shutil.copy(path, images / path.name)
    out = tmp_path / "index"
    result = _run(["index", str(images), "--model", str(tiny_qwen3vl), "--out", str(out), "--device", "cpu",
                   "--no-progress", "--query-instruction", "Find the photo",
                   "--document-instruction", "Represent the photo"])
    assert result.exit_code == 0, result.output
    recorded = json.loads((out / "manifest.json").read_text())["student"]["options"]
    assert (recorded["query_instruction"], recorded["document_instruction"]) == ("Find the photo.", "Represent the photo.")

    encoder = load_encoder(tiny_qwen3vl, device="cpu", query_instruction="Find the photo",
                           document_instruction="Represent the photo")
    index = Index.open(out)
    stored = np.concatenate([shard.student_vectors(np.arange(shard.rows)) for shard in index.shards])
    paths = sorted(images.iterdir())
    np.testing.assert_allclose(np.sort(stored, axis=0), np.sort(encoder.encode_images(paths), axis=0), atol=1e-5)

    expected = encoder.encode_text(["a dog"])[0]
    moved = shutil.copytree(tiny_qwen3vl, tmp_path / "elsewhere")
    for student in (None, str(moved)):  # recorded by name, or named: the recorded options either way
        retriever = Retriever(out, student=student, prefer="torch", device="cpu")
        assert (retriever.student.query_instruction, retriever.student.document_instruction) == (
            "Find the photo.", "Represent the photo.")
        hits = retriever.search("a dog", k=5, rerank=False)
        by_path = {path.name: float(vector @ expected) for path, vector in zip(paths, encoder.encode_images(paths),
                                                                               strict=True)}
        assert [round(hit.score, 4) for hit in hits] == [round(by_path[Path(hit.path).name], 4) for hit in hits]

    printed = _run(["search", "a dog", "--index", str(out), "--json", "--prefer", "torch", "--no-rerank"])
    assert printed.exit_code == 0, printed.output
    assert json.loads(printed.stdout)["student"]["options"]["query_instruction"] == "Find the photo."

    # a later incremental run of the same model keeps encoding as the index was built
    shutil.copy(sorted(corpus.iterdir())[7], images / "new.png")
    again = _run(["index", str(images), "--model", str(tiny_qwen3vl), "--out", str(out), "--device", "cpu",
                  "--no-progress", "--json"])
    assert again.exit_code == 0, again.output
    assert json.loads(again.stdout)["added"] == 1
    assert Index.open(out).student == index.student
