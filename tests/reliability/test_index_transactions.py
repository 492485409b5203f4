"""What a writer may do to an index that readers hold open: rebuilds that fail, compactions,
unfinished runs, damaged FAISS files, and manifests that lie (issue 10, defects 2, 3, 8, 9)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from reliability.conftest import plain_folder
from vkd.cli import cli
from vkd.indexer import Index, ManifestError, build_index, compact_index, verify_index
from vkd.indexer.faiss_index import BudgetTooSmallError
from vkd.indexer.index import ShardDamagedError
from vkd.models import load_encoder
from vkd.retrieval.retriever import Retriever


@pytest.fixture
def student(tiny_clip: Path):
    return load_encoder(tiny_clip, device="cpu")


def _index(tmp_path: Path, student, n: int = 12, shard_size: int = 4) -> tuple[Path, Path]:
    images = plain_folder(tmp_path / "imgs", n)
    out = tmp_path / "idx"
    build_index(images, out, student=student, shard_size=shard_size, workers=1)
    return images, out


def _ids(index: Index) -> set[str]:
    return {r["id"] for s in index.shards for r in s.records(np.flatnonzero(s.live_mask()))}


class _BreaksAfter:
    """Wraps an encoder's image batches: runs the real forward pass, then fails from batch ``n``
    on, and calls ``on_batch`` before each batch (to look at the index while the run is under way)."""

    def __init__(self, encoder, n: int, on_batch=None) -> None:
        self.encoder, self.n, self.calls, self.on_batch = encoder, n, 0, on_batch
        self.original = encoder._encode_image_batch

    def __call__(self, images):
        self.calls += 1
        if self.on_batch is not None:
            self.on_batch()
        if self.calls > self.n:
            raise RuntimeError("CUDA error: an illegal memory access was encountered")
        return self.original(images)


def test_failed_rebuild_leaves_the_old_index_and_readers_see_it_whole_meanwhile(tmp_path, student) -> None:
    images, out = _index(tmp_path, student)
    before = _ids(Index.open(out))
    seen_during: list[int] = []
    breaker = _BreaksAfter(student, 2, on_batch=lambda: seen_during.append(len(Index.open(out))))
    student._encode_image_batch = breaker
    with pytest.raises(RuntimeError, match="illegal memory access"):
        build_index(images, out, student=student, shard_size=4, batch_size=2, workers=1, rebuild=True)
    assert seen_during and set(seen_during) == {12}, "readers saw a partial index during the rebuild"
    after = Index.open(out)
    assert _ids(after) == before and verify_index(out) == []
    assert after.manifest["unfinished_run"]["rebuild"] is True
    from vkd.indexer.manifest import listed_files

    listed = listed_files(after.manifest)  # arrow, faiss and teacher ANN files
    on_disk = {p.name for p in out.iterdir() if p.name.startswith("shard-")}
    assert on_disk == listed, "the failed rebuild left files behind"

    student._encode_image_batch = breaker.original
    build_index(images, out, student=student, shard_size=4, workers=1, rebuild=True)
    rebuilt = Index.open(out)
    assert _ids(rebuilt) == before and "unfinished_run" not in rebuilt.manifest
    assert {s.name for s in rebuilt.shards}.isdisjoint({s["name"] for s in after.manifest["shards"]})


def test_a_rebuild_refused_by_the_memory_budget_changes_nothing(tmp_path, student) -> None:
    images, out = _index(tmp_path, student)
    manifest = (out / "manifest.json").read_bytes()
    with pytest.raises(BudgetTooSmallError):
        build_index(images, out, student=student, rebuild=True, memory_budget=10, workers=1)
    assert (out / "manifest.json").read_bytes() == manifest and len(Index.open(out)) == 12


def test_open_snapshots_survive_compaction_and_rebuild(tmp_path, student) -> None:
    images, out = _index(tmp_path, student)
    index = Index.open(out)  # opened before; no search has read a FAISS file yet
    retriever = Retriever(out, student=student, rerank=False)
    (images / "img000.png").unlink()
    build_index(images, out, student=student, shard_size=4, workers=1)
    compact_index(out)
    assert not (out / "shard-00000.faiss").exists()
    query = student.encode_text(["a photo"])
    for shard in index.shards:
        shard.search(query, 3)  # reads its FAISS file from the handle it opened with
    assert len(retriever.search("a photo", k=5)) == 5
    build_index(images, out, student=student, shard_size=4, workers=1, rebuild=True)
    assert len(retriever.search("a photo", k=5)) == 5
    assert retriever.reload() and len(retriever.index) == 11


def test_unfinished_run_is_recorded_reported_and_cleared(tmp_path, student) -> None:
    images, out = _index(tmp_path, student, n=4)
    plain_folder(images, 12, seed=1)  # 8 more files (img004..img011), 4 rewritten with new content
    student._encode_image_batch = breaker = _BreaksAfter(student, 1)
    with pytest.raises(RuntimeError):
        build_index(images, out, student=student, shard_size=2, batch_size=2, workers=1)
    run = Index.open(out).manifest["unfinished_run"]
    assert run["pid"] == os.getpid() and run["to_encode"] == 12 and run["rebuild"] is False
    assert verify_index(out) == []  # sound, only incomplete
    report = CliRunner().invoke(cli, ["index", "verify", str(out)])
    assert report.exit_code == 0 and "incomplete" in report.output and "did not finish" in report.output
    as_json = json.loads(CliRunner().invoke(cli, ["index", "verify", str(out), "--json"]).output)
    assert as_json["ok"] is True and as_json["complete"] is False
    student._encode_image_batch = breaker.original
    build_index(images, out, student=student, shard_size=2, workers=1)
    assert "unfinished_run" not in Index.open(out).manifest and len(Index.open(out)) == 12
    assert CliRunner().invoke(cli, ["index", "verify", str(out)]).output.strip().endswith(": ok")


@pytest.mark.parametrize("damage", ["delete", "truncate", "garbage"])
def test_damaged_faiss_is_refused_by_name_then_rebuilt_from_arrow(tmp_path, student, damage: str) -> None:
    images, out = _index(tmp_path, student)
    want = Retriever(out, student=student, rerank=False).search("a photo", k=12)
    target = out / "shard-00001.faiss"
    if damage == "delete":
        target.unlink()
    elif damage == "truncate":
        target.write_bytes(target.read_bytes()[:40])
    else:
        target.write_bytes(os.urandom(target.stat().st_size))  # same size: only the checksum tells
    index = Index.open(out)  # opening still works: info and verify need no FAISS file
    assert any("shard-00001.faiss" in problem for problem in verify_index(out))
    with pytest.raises(ShardDamagedError, match="shard-00001.*verify --repair"):
        Retriever(out, student=student, rerank=False).search("a photo", k=3)
    assert index.info()["rows"] == 12
    search = CliRunner().invoke(cli, ["search", "a photo", "--index", str(out), "--no-rerank", "--prefer", "torch"])
    assert search.exit_code == 1 and "shard-00001" in search.output and "Traceback" not in search.output

    if damage == "garbage":  # an update run checks sizes only; the deep repair reads checksums
        repaired = CliRunner().invoke(cli, ["index", "verify", str(out), "--repair"])
        assert repaired.exit_code == 0, repaired.output
        assert "rebuilt FAISS for 1 shard(s) (shard-00001)" in repaired.output
    else:
        result = build_index(images, out, student=student, shard_size=4, workers=1)
        assert result.repaired == ["shard-00001"] and result.to_encode == 0
    assert verify_index(out) == []
    got = Retriever(out, student=student, rerank=False).search("a photo", k=12)
    assert [h.id for h in got] == [h.id for h in want]


def test_damaged_arrow_shard_is_dropped_by_repair_and_re_encoded(tmp_path, student) -> None:
    images, out = _index(tmp_path, student)
    before = _ids(Index.open(out))
    arrow = out / "shard-00002.arrow"
    arrow.write_bytes(arrow.read_bytes()[:100])
    with pytest.raises(ManifestError):
        Index.open(out)
    repaired = CliRunner().invoke(cli, ["index", "verify", str(out), "--repair"])
    assert repaired.exit_code == 0 and "dropped 1 shard(s)" in repaired.output
    assert len(Index.open(out)) == 8
    result = build_index(images, out, student=student, shard_size=4, workers=1)
    assert result.to_encode == 4 and _ids(Index.open(out)) == before and verify_index(out) == []


def test_missing_arrow_shard_is_named(tmp_path, student) -> None:
    _, out = _index(tmp_path, student)
    (out / "shard-00001.arrow").unlink()
    with pytest.raises(ManifestError) as error:
        Index.open(out)
    assert "shard-00001.arrow" in str(error.value) and "None" not in str(error.value)


def _edit_manifest(out: Path, edit) -> None:
    manifest = json.loads((out / "manifest.json").read_text())
    edit(manifest)
    (out / "manifest.json").write_text(json.dumps(manifest))


@pytest.mark.parametrize("edit, words", [
    (lambda m: m["shards"][0]["index"].update(kind="lsh"), "shards[0].index"),
    (lambda m: m["shards"][0]["index"].pop("factory"), "shards[0].index"),
    (lambda m: m["shards"][1].update(rows="4"), "shards[1].rows"),
    (lambda m: m["shards"][1].update(rows=4.0), "shards[1].rows"),
    (lambda m: m["shards"][1].update(rows=-1), "shards[1].rows"),
    (lambda m: m["shards"][0].update(arrow="../../../../etc/passwd"), "shards[0].arrow"),
    (lambda m: m["shards"][0].update(faiss="/etc/passwd"), "shards[0].faiss"),
    (lambda m: m["shards"][0].update(name="../shard-00000"), "shards[0].name"),
    (lambda m: m["shards"][0].update(retired="abc"), "shards[0].retired"),
    (lambda m: m.update(next_shard=0), "next_shard"),
    (lambda m: m["student"].update(dim="32"), "student.dim"),
    (lambda m: m.update(shards={}), "shards"),
    (lambda m: m.update(version=True), "version"),
])
def test_malformed_manifests_are_refused_on_open_verify_and_search(tmp_path, student, edit, words) -> None:
    _, out = _index(tmp_path, student)
    _edit_manifest(out, edit)
    with pytest.raises(ManifestError, match=words.replace("[", r"\[").replace("]", r"\]")):
        Index.open(out)
    problems = verify_index(out)
    assert len(problems) == 1 and "manifest.json" in problems[0]
    for args in (["index", "verify", str(out)], ["index", "info", str(out)],
                 ["search", "a photo", "--index", str(out), "--no-rerank"]):
        result = CliRunner().invoke(cli, args)
        assert result.exit_code == 1 and "manifest.json" in result.output, (args, result.output)
        assert "Traceback" not in result.output
