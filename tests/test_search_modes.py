"""The asymmetric search modes on tiny models (real forward passes, no mocks): distillation
that trains the projection, the projected index column, each mode against a brute-force
computation of its definition, refusals, the manifest record and the mode recommender."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from click.testing import CliRunner
from conftest import make_images

from vkd.config import ConfigError, DistillConfig

CAPTIONS = ["a red square", "a blue circle", "green stripes", "a yellow dot", "dark noise", "bright sky",
            "a small boat", "two cats", "an old car", "a tall tree", "the sea", "a city street"]


def _pairs(root: Path, name: str, seed: int, n: int) -> Path:
    from vkd.data.pairs import write_pairs

    folder = root / f"{name}-images"
    folder.mkdir(parents=True)
    records = []
    for i, image in enumerate(make_images(n, seed=seed)):
        path = folder / f"{i:02d}.png"
        image.save(path)
        records += [{"image": path, "text": CAPTIONS[i % len(CAPTIONS)], "image_id": f"{name}{i}"},
                    {"image": path, "text": f"{CAPTIONS[(i + 3) % len(CAPTIONS)]} again", "image_id": f"{name}{i}"}]
    out = root / f"{name}.jsonl"
    write_pairs(out, records)
    return out


def _config(out: Path, train: Path, val: Path | None, student: Path, teacher: Path, **extra: Any) -> DistillConfig:
    values: dict[str, Any] = {
        "model_name_or_path": str(student), "teacher_model_name_or_path": str(teacher),
        "data_path": str(train), "output_dir": str(out), "epochs": 4, "batch_size": 8,
        "learning_rate": 5e-3, "warmup_ratio": 0.0, "logging_steps": 1, "eval_strategy": "no",
        "lora_dropout": 0.0, "distillation_loss_type": ["kl_divergence"], "distillation_weight": 0.9,
        "train_modes": ["student-query", "student-index"],
    }
    if val is not None:
        values["val_data_path"] = str(val)
    values.update(extra)
    return DistillConfig.from_dict(values)


@pytest.fixture(scope="module")
def distilled(tmp_path_factory: pytest.TempPathFactory, tiny_clip: Path, tiny_clip_teacher: Path) -> dict[str, Any]:
    from vkd.distill.trainer import distill

    root = tmp_path_factory.mktemp("modes")
    train = _pairs(root, "train", 0, 16)
    val = _pairs(root, "val", 1, 8)
    result = distill(_config(root / "run", train, val, tiny_clip, tiny_clip_teacher))
    return {"root": root, "model": result.model_dir, "report": result.report, "teacher": tiny_clip_teacher}


@pytest.fixture(scope="module")
def mode_index(distilled: dict[str, Any]) -> Path:
    from vkd.indexer.build import build_index

    images = distilled["root"] / "corpus"
    images.mkdir()
    for i, image in enumerate(make_images(14, seed=7)):
        image.save(images / f"img{i:02d}.png")
    out = distilled["root"] / "corpus.vkd"
    build_index(images, out, student=str(distilled["model"]), teacher=str(distilled["teacher"]), projected=True,
                device="cpu", prefer="torch", workers=1)
    return out


# -- distillation ------------------------------------------------------------------------------


def test_training_for_the_modes_lowers_the_cross_space_distance_on_validation(distilled: dict[str, Any]) -> None:
    projection = distilled["report"]["projection"]
    assert projection["modes"] == ["student-query", "student-index"]
    distance = projection["val_cross_space_distance"]
    # "text": projected student text vs teacher text (what student-query replaces); "image" likewise
    for side in ("text", "image"):
        assert distance["end"][side] < distance["start"][side] * 0.8, distance


def test_the_merged_model_carries_the_projection(distilled: dict[str, Any]) -> None:
    from vkd.models import load_encoder
    from vkd.models.projection import ProjectionError

    student = load_encoder(distilled["model"], device="cpu")
    teacher = load_encoder(distilled["teacher"], device="cpu")
    projected = load_encoder(distilled["model"], device="cpu", space=f"teacher:{teacher.fingerprint}")
    assert projected.dim == teacher.dim != student.dim
    same = load_encoder(distilled["model"], device="cpu", space="teacher")
    text = ["a red square"]
    np.testing.assert_allclose(projected.encode_text(text), same.encode_text(text), atol=1e-6)
    expected = projected.projection.apply(student.encode_text(text))
    np.testing.assert_allclose(projected.encode_text(text), expected, atol=1e-6)
    assert projected.fingerprint != student.fingerprint
    with pytest.raises(ProjectionError, match="not of teacher fingerprint 0000"):
        load_encoder(distilled["model"], device="cpu", space="teacher:0000")
    with pytest.raises(ProjectionError, match="train_modes"):
        load_encoder(distilled["teacher"], device="cpu", space="teacher")
    with pytest.raises(ValueError, match="space="):
        load_encoder(distilled["model"], device="cpu", space="teachers")


def test_config_names_the_modes_and_checks_them(tmp_path: Path, tiny_clip: Path, tiny_clip_teacher: Path) -> None:
    with pytest.raises(ConfigError, match="train_modes"):
        _config(tmp_path, tmp_path / "x.jsonl", None, tiny_clip, tiny_clip_teacher, train_modes=["student-querys"])
    with pytest.raises(ConfigError, match="teacher_mode: frozen"):
        _config(tmp_path, tmp_path / "x.jsonl", None, tiny_clip, tiny_clip_teacher, teacher_mode="ema")
    with pytest.raises(ConfigError, match="needs a teacher"):
        _config(tmp_path, tmp_path / "x.jsonl", None, tiny_clip, tiny_clip_teacher, use_distillation=False)


# -- each mode against the brute force of its definition ---------------------------------------


def _brute_force(index: Any, column: str, query: np.ndarray) -> tuple[list[str], np.ndarray]:
    """Every live row scored by ``query`` · its stored ``column`` vector, ordered by (score, row)."""
    shard = index.shards[0]
    rows = np.arange(shard.rows)
    fetch = {"teacher_vec": shard.teacher_vectors, "projected_vec": shard.projected_vectors,
             "student_vec": shard.student_vectors}[column]
    scores = fetch(rows) @ query
    order = np.lexsort((rows, -scores.astype(np.float64)))
    return [r["id"] for r in shard.records(rows[order])], scores[order]


@pytest.mark.parametrize("mode", ["two-stage", "student-query", "student-index"])
def test_each_mode_ranks_like_the_brute_force_of_its_definition(distilled: dict[str, Any], mode_index: Path,
                                                                 mode: str) -> None:
    from vkd.models import load_encoder
    from vkd.retrieval import Retriever

    teacher = load_encoder(distilled["teacher"], device="cpu")
    retriever = Retriever(mode_index, prefer="torch", device="cpu", candidates=50, mode=mode)
    assert len(retriever.index.shards) == 1
    for text in ("a red square", "two cats"):
        result = retriever.search(text, k=14)
        assert result.mode == mode
        if mode == "two-stage":  # student ANN over all rows, then the teacher's query vs stored teacher vectors
            ids, scores = _brute_force(retriever.index, "teacher_vec", teacher.encode_text([text])[0])
        elif mode == "student-query":  # the projected student's query vs stored teacher vectors
            query = load_encoder(distilled["model"], device="cpu", space="teacher").encode_text([text])[0]
            ids, scores = _brute_force(retriever.index, "teacher_vec", query)
        else:  # the teacher's query vs the stored projected student image vectors
            ids, scores = _brute_force(retriever.index, "projected_vec", teacher.encode_text([text])[0])
        assert [hit.id for hit in result] == ids
        np.testing.assert_allclose([hit.score for hit in result], scores, atol=1e-5)


def test_projected_vectors_are_the_student_image_vectors_through_the_projection(distilled: dict[str, Any],
                                                                                 mode_index: Path) -> None:
    from vkd.indexer import Index
    from vkd.models import load_encoder

    index = Index.open(mode_index)
    projected = load_encoder(distilled["model"], device="cpu", space="teacher")
    shard = index.shards[0]
    rows = np.arange(shard.rows)
    paths = [r["path"] for r in shard.records(rows)]
    np.testing.assert_allclose(shard.projected_vectors(rows), projected.encode_images(paths), atol=2e-3)
    record = index.vectors["projected_vec"]
    assert record["space"] == projected.space and record["dim"] == projected.dim
    assert record["teacher"]["fingerprint"] == load_encoder(distilled["teacher"], device="cpu").fingerprint
    assert index.vectors["teacher_vec"]["space"] == record["space"]  # both in the one teacher's space
    assert index.vectors["student_vec"]["space"].startswith("student:")


def _corpus(distilled: dict[str, Any], name: str, n: int = 14, seed: int = 7) -> Path:
    """A folder of ``n`` images under the module's root (made once per name)."""
    images = distilled["root"] / name
    if not images.exists():
        images.mkdir()
        for i, image in enumerate(make_images(n, seed=seed)):
            image.save(images / f"img{i:02d}.png")
    return images


def _index(distilled: dict[str, Any], images: Path, out: Path, **options: Any) -> Path:
    from vkd.indexer.build import build_index

    build_index(images, out, student=options.pop("student", str(distilled["model"])),
                teacher=options.pop("teacher", str(distilled["teacher"])), device="cpu", prefer="torch", workers=1,
                **options)
    return out


def _prefix_brute_force(index: Any, query: np.ndarray, prefix: int, candidates: int) -> tuple[list[str], np.ndarray]:
    """student-query's definition with a prefix ANN: the ``candidates`` best rows by cosine of the
    first ``prefix`` dimensions (ties by row), re-scored and ordered by the full stored vectors."""
    shard = index.shards[0]
    rows = np.arange(shard.rows)
    full = shard.teacher_vectors(rows)
    heads = full[:, :prefix] / np.linalg.norm(full[:, :prefix], axis=1, keepdims=True)
    head = query[:prefix] / np.linalg.norm(query[:prefix])
    first = heads @ head
    picked = rows[np.lexsort((rows, -first.astype(np.float64)))[:candidates]]
    scores = full[picked] @ query
    order = np.lexsort((picked, -scores.astype(np.float64)))
    return [r["id"] for r in shard.records(picked[order])], scores[order]


@pytest.mark.parametrize("index_type", ["flat", "hnsw"])
def test_student_query_searches_the_teacher_ann_index_like_brute_force(distilled: dict[str, Any], tmp_path: Path,
                                                                      index_type: str) -> None:
    """Exact index kinds on a small index: the teacher ANN's ranking is the brute force of the mode."""
    import faiss

    from vkd.indexer import Index
    from vkd.models import load_encoder
    from vkd.retrieval import Retriever

    out = _index(distilled, _corpus(distilled, "ann-corpus"), tmp_path / "i.vkd", index_type=index_type)
    index = Index.open(out)
    shard = index.shards[0]
    teacher_dim = int(index.teacher["dim"])
    assert index.vectors["teacher_vec"]["ann"] == {"dim": teacher_dim}  # a CLIP teacher: the whole vector
    assert shard.teacher_ann is not None and shard.teacher_ann.spec.kind == index_type
    held = faiss.read_index(str(out / "shard-00000.teacher.faiss"))
    assert (held.ntotal, held.d) == (shard.rows, teacher_dim)
    projected = load_encoder(distilled["model"], device="cpu", space="teacher")
    retriever = Retriever(out, prefer="torch", device="cpu", candidates=5, mode="student-query")
    for text in ("a red square", "two cats", "the sea"):
        ids, scores = _brute_force(index, "teacher_vec", projected.encode_text([text])[0])
        result = retriever.search(text, k=5)
        assert [hit.id for hit in result] == ids[:5]
        np.testing.assert_allclose([hit.score for hit in result], scores[:5], atol=1e-5)
        assert result.candidates == 5  # stage 1 kept 5 of 14 rows: the ANN found them, not a scan


def test_student_query_ann_on_a_prefix_rescores_on_the_full_vectors(distilled: dict[str, Any], tmp_path: Path) -> None:
    """A prefix ANN (as for a Matryoshka teacher): the candidates are the best rows by the prefix, and
    their order and scores come from the full stored vectors."""
    from vkd.indexer import Index
    from vkd.models import load_encoder
    from vkd.retrieval import Retriever

    out = _index(distilled, _corpus(distilled, "ann-corpus"), tmp_path / "p.vkd", teacher_ann_dim=8)
    index = Index.open(out)
    assert index.vectors["teacher_vec"]["ann"] == {"dim": 8} and index.shards[0].teacher_ann.dim == 8
    assert Index.open(out).verify() == []
    projected = load_encoder(distilled["model"], device="cpu", space="teacher")
    retriever = Retriever(out, prefer="torch", device="cpu", candidates=6, mode="student-query")
    for text in ("a red square", "two cats", "an old car"):
        ids, scores = _prefix_brute_force(index, projected.encode_text([text])[0], 8, 6)
        result = retriever.search(text, k=6)
        assert [hit.id for hit in result] == ids
        np.testing.assert_allclose([hit.score for hit in result], scores, atol=1e-5)
    with pytest.raises(ValueError, match="first 8 dimensions"):
        Retriever(out, prefer="torch", device="cpu", mode="student-query", prefix_dim=4).search("a cat")
    # the scan (exact, every row) with the same prefix and as many candidates agrees
    scan = Retriever(out, prefer="torch", device="cpu", candidates=6, mode="student-query", scan=True, prefix_dim=8)
    assert [h.id for h in scan.search("two cats", k=6)] == [h.id for h in retriever.search("two cats", k=6)]


def test_an_index_without_the_teacher_ann_is_refused_or_scanned_on_request(distilled: dict[str, Any],
                                                                           tmp_path: Path) -> None:
    from vkd.cli import cli
    from vkd.retrieval import Retriever
    from vkd.retrieval.modes import ModeUnavailableError

    out = _index(distilled, _corpus(distilled, "ann-corpus"), tmp_path / "old.vkd", teacher_ann=False)
    manifest = json.loads((out / "manifest.json").read_text())
    assert "ann" not in manifest["vectors"]["teacher_vec"] and not list(out.glob("*.teacher.faiss"))
    with pytest.raises(ModeUnavailableError, match="--teacher-ann") as refused:
        Retriever(out, prefer="torch", device="cpu", mode="student-query")
    assert "--scan" in str(refused.value) and "--rebuild" not in str(refused.value)
    scanned = Retriever(out, prefer="torch", device="cpu", mode="student-query", scan=True).search("two cats", k=4)
    reference = Retriever(_index(distilled, _corpus(distilled, "ann-corpus"), tmp_path / "new.vkd"), prefer="torch",
                          device="cpu", mode="student-query").search("two cats", k=4)
    assert [h.id for h in scanned] == [h.id for h in reference]
    run = CliRunner().invoke(cli, ["search", "two cats", "--index", str(out), "--mode", "student-query",
                                    "--prefer", "torch", "--json"])
    assert run.exit_code != 0 and "--teacher-ann" in run.output and "Traceback" not in run.output
    run = CliRunner().invoke(cli, ["search", "two cats", "--index", str(out), "--mode", "student-query",
                                    "--prefer", "torch", "--scan", "--json", "-k", "4"])
    assert run.exit_code == 0, run.output
    info = CliRunner().invoke(cli, ["index", "info", str(out)])
    assert info.exit_code == 0 and "teacher ANN  none" in info.output, info.output
    # the command the refusal names adds it from the stored vectors, and the mode then serves
    images = Path(json.loads((out / "manifest.json").read_text())["images_root"])
    run = CliRunner().invoke(cli, ["index", str(images), "--model", str(distilled["model"]), "--teacher",
                                    str(distilled["teacher"]), "--out", str(out), "--teacher-ann", "--prefer", "torch",
                                    "--device", "cpu", "--no-progress"])
    assert run.exit_code == 0 and "the teacher ANN index" in run.output, run.output
    served = Retriever(out, prefer="torch", device="cpu", mode="student-query").search("two cats", k=4)
    assert [h.id for h in served] == [h.id for h in reference]


class _Counting:
    """A real encoder (a loaded tiny model) that counts the forward passes asked of each tower."""

    @staticmethod
    def wrap(model: Path) -> Any:
        from vkd.models import load_encoder
        from vkd.models.base import Encoder

        class Counting(Encoder):
            def __init__(self, inner: Encoder) -> None:
                self.inner = inner
                self.name, self.family, self.dim = inner.name, inner.family, inner.dim
                self.batch_size, self.logit_scale = inner.batch_size, inner.logit_scale
                self.calls = {"text": 0, "images": 0}

            @property
            def fingerprint(self) -> str:
                return self.inner.fingerprint

            def _encode_text_batch(self, texts: Any) -> np.ndarray:
                self.calls["text"] += 1
                return self.inner.encode_text(list(texts))

            def _encode_image_batch(self, images: Any) -> np.ndarray:
                self.calls["images"] += 1
                return self.inner.encode_images(list(images))

            def load_options(self) -> dict[str, Any]:
                return self.inner.load_options()

            def describe(self) -> dict[str, Any]:
                return self.inner.describe()

            def __getattr__(self, name: str) -> Any:
                if name == "inner":
                    raise AttributeError(name)
                return getattr(self.inner, name)

        return Counting(load_encoder(model, device="cpu", prefer="torch"))


def test_projected_vectors_and_the_teacher_ann_are_added_to_an_existing_index_without_encoding(
        distilled: dict[str, Any], tmp_path: Path) -> None:
    from vkd.indexer import Index
    from vkd.indexer.build import build_index
    from vkd.models.projection import read_projection
    from vkd.retrieval import Retriever

    images = _corpus(distilled, "ann-corpus")
    out = _index(distilled, images, tmp_path / "up.vkd", teacher_ann=False, shard_size=5)  # 3 shards
    before = Index.open(out)
    old_names = [s.name for s in before.shards]
    assert "projected_vec" not in before.vectors and len(old_names) == 3
    student, teacher = _Counting.wrap(distilled["model"]), _Counting.wrap(distilled["teacher"])
    result = build_index(images, out, student=student, teacher=teacher, projected=True, teacher_ann=True, workers=1)
    # nothing encoded: the projected vectors come from the stored student vectors, the ANN from the teacher's
    assert student.calls == {"text": 0, "images": 0} and teacher.calls == {"text": 0, "images": 0}
    assert result.added == 0 and len(result.upgraded) == 3
    after = Index.open(out)
    assert after.verify() == [] and set(after.vectors) == {"student_vec", "teacher_vec", "projected_vec"}
    assert after.vectors["teacher_vec"]["ann"] == {"dim": int(after.teacher["dim"])}
    assert not {s.name for s in after.shards} & set(old_names)  # new files; the old ones are gone
    assert not [p for p in out.iterdir() if p.name.startswith(tuple(old_names))]
    projection = read_projection(distilled["model"])
    for old, new in zip(before.shards, after.shards, strict=True):
        rows = np.arange(new.rows)
        assert [r["id"] for r in old.records(rows)] == [r["id"] for r in new.records(rows)]
        np.testing.assert_allclose(new.projected_vectors(rows), projection.apply(old.student_vectors(rows)),
                                   atol=2e-3)
    # a reader that opened before keeps its snapshot whole
    assert len(Retriever(out, prefer="torch", device="cpu").search("two cats", k=3)) == 3
    assert before.shards[0].student_vectors([0]).shape == (1, int(before.student["dim"]))
    # both modes now serve, and rank as an index built with them from the start
    fresh = _index(distilled, images, tmp_path / "fresh.vkd", projected=True, shard_size=5)
    for mode in ("student-query", "student-index"):
        got = Retriever(out, prefer="torch", device="cpu", mode=mode).search("a red square", k=6)
        want = Retriever(fresh, prefer="torch", device="cpu", mode=mode).search("a red square", k=6)
        assert [h.id for h in got] == [h.id for h in want]
        np.testing.assert_allclose([h.score for h in got], [h.score for h in want], atol=1e-5)
    # a second run has nothing to add
    again = build_index(images, out, student=student, teacher=teacher, workers=1)
    assert again.upgraded == [] and again.added == 0 and student.calls["images"] == 0


def test_an_upgrade_that_fails_midway_leaves_the_committed_index_as_it_was(distilled: dict[str, Any],
                                                                           tmp_path: Path,
                                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    import vkd.indexer.build as build
    from vkd.indexer import Index

    images = _corpus(distilled, "ann-corpus")
    out = _index(distilled, images, tmp_path / "crash.vkd", teacher_ann=False, shard_size=5)
    manifest = (out / "manifest.json").read_bytes()
    calls = {"n": 0}
    real = build.write_ann

    def failing(*args: Any, **kwargs: Any) -> None:
        calls["n"] += 1
        if calls["n"] == 2:  # the second shard's teacher ANN: the first one's files are written already
            raise OSError(28, "No space left on device")
        real(*args, **kwargs)

    monkeypatch.setattr(build, "write_ann", failing)
    with pytest.raises(OSError):
        _index(distilled, images, out, projected=True, teacher_ann=True)
    monkeypatch.undo()
    assert (out / "manifest.json").read_bytes() == manifest  # no swap: readers see the old index
    assert Index.open(out).verify() == []
    _index(distilled, images, out, projected=True, teacher_ann=True)  # the next run cleans up and upgrades
    index = Index.open(out)
    assert index.verify() == [] and "projected_vec" in index.vectors
    listed = {f for s in index.manifest["shards"] for f in (s["arrow"], s["faiss"], s["teacher_faiss"])}
    assert {p.name for p in out.glob("shard-*")} == listed


def test_verify_repair_and_compaction_cover_the_teacher_ann(distilled: dict[str, Any], tmp_path: Path) -> None:
    import shutil

    from vkd.cli import cli
    from vkd.indexer import Index
    from vkd.indexer.index import ShardDamagedError
    from vkd.indexer.verify import repair_index
    from vkd.retrieval import Retriever

    images = tmp_path / "imgs"
    shutil.copytree(_corpus(distilled, "ann-corpus"), images)
    out = _index(distilled, images, tmp_path / "r.vkd", teacher_ann_dim=8, shard_size=7)
    target = out / "shard-00000.teacher.faiss"
    assert target.is_file()
    data = target.read_bytes()
    target.write_bytes(data[:16] + bytes(len(data) - 16))  # same size, other bytes
    problems = Index.open(out).verify()
    assert any("shard-00000.teacher.faiss" in p and "sha256" in p for p in problems), problems
    with pytest.raises(ShardDamagedError, match="teacher.faiss"):
        Retriever(out, prefer="torch", device="cpu", mode="student-query").search("two cats")
    run = CliRunner().invoke(cli, ["index", "verify", str(out), "--repair"])
    assert run.exit_code == 0, run.output
    assert Index.open(out).verify() == []
    target.unlink()  # missing: the next `vkd index` run rebuilds it (the cheap checks)
    assert Index.open(out).shards[0].teacher_damage == "missing"
    _index(distilled, images, out)
    assert Index.open(out).verify() == [] and repair_index(out).rebuilt_faiss == []
    reference = Retriever(out, prefer="torch", device="cpu", mode="student-query", candidates=14).search("a cat", k=5)
    # retire a row, compact: the rewritten shard gets its teacher ANN again
    (images / "img03.png").unlink()
    _index(distilled, images, out)
    compacted = Index.open(out).compact()
    assert compacted.rows_dropped == 1
    index = Index.open(out)
    assert index.verify() == [] and all(s.teacher_ann is not None and s.teacher_ann.dim == 8 for s in index.shards)
    after = Retriever(out, prefer="torch", device="cpu", mode="student-query", candidates=14).search("a cat", k=5)
    assert [h.id for h in after] == [h.id for h in reference if not h.path.endswith("img03.png")][:len(after)]


def test_the_manifest_checks_the_teacher_ann_entries(mode_index: Path, tmp_path: Path) -> None:
    from vkd.indexer.manifest import ManifestError, validate

    manifest = json.loads((mode_index / "manifest.json").read_text())
    assert manifest["shards"][0]["teacher_faiss"] == "shard-00000.teacher.faiss"
    for change, message in (
            (lambda m: m["shards"][0].update(teacher_faiss="../elsewhere.faiss"), "teacher_faiss"),
            (lambda m: m["shards"][0].pop("teacher_index"), "lacks teacher_index"),
            (lambda m: m["vectors"]["teacher_vec"].pop("ann"), "every shard has a teacher ANN index, or none"),
            (lambda m: m["vectors"]["teacher_vec"].update(ann={"dim": 10_000}), "vectors.teacher_vec.ann")):
        bad = json.loads(json.dumps(manifest))
        change(bad)
        with pytest.raises(ManifestError, match=message):
            validate(bad, tmp_path / "manifest.json")


def test_a_filter_restricts_the_asymmetric_modes_too(mode_index: Path) -> None:
    from vkd.retrieval import Filters, Query, Retriever, Term

    for mode in ("student-query", "student-index"):
        retriever = Retriever(mode_index, prefer="torch", device="cpu", mode=mode)
        result = retriever.search(Query((Term("a red square", 1.0),), Filters(path_glob="img0*")), k=20)
        assert result and all(Path(hit.path).name.startswith("img0") for hit in result)
        assert len(result) == 10


# -- refusals ----------------------------------------------------------------------------------


def test_a_mode_without_its_vectors_is_refused_with_what_to_run(distilled: dict[str, Any]) -> None:
    from vkd.cli import cli
    from vkd.indexer.build import build_index
    from vkd.retrieval import Retriever
    from vkd.retrieval.modes import ModeUnavailableError

    images = distilled["root"] / "plain"
    images.mkdir()
    for i, image in enumerate(make_images(3, seed=9)):
        image.save(images / f"p{i}.png")
    plain = distilled["root"] / "plain.vkd"
    build_index(images, plain, student=str(distilled["model"]), device="cpu", prefer="torch", workers=1)
    with pytest.raises(ModeUnavailableError, match="--teacher TEACHER"):
        Retriever(plain, prefer="torch", device="cpu", mode="student-query")
    retriever = Retriever(plain, prefer="torch", device="cpu")
    with pytest.raises(ModeUnavailableError, match="--projected"):
        retriever.search("a cat", mode="student-index")
    assert retriever.search("a cat", k=2).mode == "two-stage"  # the index itself still serves
    run = CliRunner().invoke(cli, ["search", "a cat", "--index", str(plain), "--mode", "student-index",
                                    "--prefer", "torch"])
    assert run.exit_code != 0 and "--projected" in run.output and "Traceback" not in run.output
    from serve_helpers import served

    with served(retriever=retriever, index=str(plain)) as client:
        answer = client.get("/search", params={"q": "a cat", "mode": "student-query"})
        assert answer.status_code == 422 and "--teacher" in answer.json()["detail"]


def test_a_student_without_a_projection_cannot_serve_student_query(tiny_clip: Path, tiny_clip_teacher: Path,
                                                                  tmp_path: Path) -> None:
    from vkd.indexer.build import build_index
    from vkd.retrieval import Retriever
    from vkd.retrieval.modes import ModeUnavailableError

    images = tmp_path / "imgs"
    images.mkdir()
    for i, image in enumerate(make_images(2, seed=3)):
        image.save(images / f"q{i}.png")
    build_index(images, tmp_path / "i.vkd", student=str(tiny_clip), teacher=str(tiny_clip_teacher), device="cpu",
                prefer="torch", workers=1)
    retriever = Retriever(tmp_path / "i.vkd", prefer="torch", device="cpu", rerank=False)
    with pytest.raises(ModeUnavailableError, match="train_modes"):
        retriever.search("a dog", mode="student-query")
    with pytest.raises(ValueError, match="--projected"):
        build_index(images, tmp_path / "j.vkd", student=str(tiny_clip), projected=True, device="cpu",
                    prefer="torch", workers=1)


# -- manifest ----------------------------------------------------------------------------------


def test_the_manifest_records_the_vectors_and_old_manifests_still_open(mode_index: Path, tmp_path: Path) -> None:
    import shutil

    from vkd.indexer import Index
    from vkd.indexer.manifest import ManifestError, validate

    manifest = json.loads((mode_index / "manifest.json").read_text())
    assert set(manifest["vectors"]) == {"student_vec", "teacher_vec", "projected_vec"}
    old = tmp_path / "old.vkd"
    shutil.copytree(mode_index, old)
    legacy = {key: value for key, value in manifest.items() if key != "vectors"}
    (old / "manifest.json").write_text(json.dumps(legacy))
    index = Index.open(old)  # from before the key: derived from student/teacher
    assert set(index.vectors) == {"student_vec", "teacher_vec"}
    bad = json.loads(json.dumps(manifest))
    bad["vectors"]["projected_vec"]["space"] = "teacher:somebody-else"
    with pytest.raises(ManifestError, match="projected_vec.space"):
        validate(bad, tmp_path / "manifest.json")
    bad = json.loads(json.dumps(manifest))
    bad["vectors"]["surprise_vec"] = {"space": "student:x", "dim": 3}
    with pytest.raises(ManifestError, match="key 'vectors'"):
        validate(bad, tmp_path / "manifest.json")


# -- the recommender -----------------------------------------------------------------------------


def _costs() -> Any:
    from vkd.retrieval.modes import ModelCosts

    # ViT-B/32 student vs ViT-L/14 teacher, 2 CPU cores (seconds)
    return ModelCosts(student_image_s=0.054, teacher_image_s=1.046, student_query_s=0.004, teacher_query_s=0.03,
                      scan_s_per_row=2e-9, ann_s=0.001)


def test_recommender_clear_cases() -> None:
    from vkd.retrieval.modes import recommend_mode

    quality = {"two-stage": 1.0, "student-query": 0.95, "student-index": 0.93}
    # a small corpus with heavy traffic: the teacher per query is what costs; student-query drops it
    assert recommend_mode(10_000, 200, _costs(), quality, cores=16).mode == "student-query"
    # a huge corpus with light traffic: the teacher per image is what costs; student-index drops it
    assert recommend_mode(100_000_000, 1, _costs(), quality, cores=16).mode == "student-index"
    # the asymmetric modes too poor on validation: two-stage whatever it costs
    poor = {"two-stage": 1.0, "student-query": 0.5, "student-index": 0.6}
    choice = recommend_mode(100_000_000, 1, _costs(), poor)
    assert choice.mode == "two-stage" and "student-query, student-index" in choice.reason
    # unmeasured modes are not considered
    assert recommend_mode(10_000, 200, _costs(), {"two-stage": 1.0}, cores=16).mode == "two-stage"
    # nothing keeps up: the cheapest queries, and the reason says to add cores
    slow = recommend_mode(10_000, 10_000, _costs(), quality, cores=1)
    assert slow.mode == "student-query" and "keeps up" in slow.reason
    assert {e.mode for e in slow.estimates} == {"two-stage", "student-query", "student-index"}
    with pytest.raises(ValueError):
        recommend_mode(-1, 1, _costs(), quality)


def test_the_server_takes_the_mode_per_request(mode_index: Path) -> None:
    from serve_helpers import served

    from vkd.retrieval import Retriever

    reference = Retriever(mode_index, prefer="torch", device="cpu")
    with served(retriever=reference, index=str(mode_index)) as client:
        for mode in ("two-stage", "student-query", "student-index"):
            answer = client.get("/search", params={"q": "a red square", "k": 5, "mode": mode})
            assert answer.status_code == 200, answer.text
            body = answer.json()
            assert body["mode"] == mode
            expected = reference.search("a red square", k=5, mode=mode)
            assert [hit["id"] for hit in body["results"]] == [hit.id for hit in expected]
        posted = client.post("/search", json={"q": "two cats", "k": 3, "mode": "student-index"})
        assert posted.status_code == 200 and posted.json()["mode"] == "student-index"
        wrong = client.get("/search", params={"q": "a cat", "mode": "teacher-only"})
        assert wrong.status_code in (400, 422)


def test_the_onnx_export_serves_the_teacher_space_too(distilled: dict[str, Any], tmp_path: Path) -> None:
    """The export lives in the model directory, next to the projection: load_encoder(prefer="onnx",
    space=...) projects the ONNX student's vectors exactly as the torch one's."""
    import shutil

    from vkd.export import OnnxEncoder, export_onnx
    from vkd.models import load_encoder
    from vkd.models.projection import ProjectedEncoder

    model = tmp_path / "model"
    shutil.copytree(distilled["model"], model)
    export_onnx(model, int8="none")
    onnx = load_encoder(model, prefer="onnx", space="teacher", precision="fp32")
    assert isinstance(onnx, ProjectedEncoder) and isinstance(onnx.base, OnnxEncoder)
    torch_side = load_encoder(model, prefer="torch", device="cpu", space="teacher")
    np.testing.assert_allclose(onnx.encode_text(["a red square"]), torch_side.encode_text(["a red square"]),
                               atol=1e-4)


def test_the_bench_stage_runs_at_tiny_shapes(tmp_path: Path) -> None:
    from vkd.bench.modes import ModesSettings, run_modes_benchmark

    settings = ModesSettings.quick()
    result = run_modes_benchmark(settings, workdir=tmp_path, demo=None)
    real = result.results["real"]
    assert set(real["costs"]) >= {"student_image_s", "teacher_image_s", "student_query_s", "teacher_query_s",
                                  "scan_s_per_row", "ann_s"}
    assert [r["images"] for r in real["recommendations"]] == [10_000, 1_000_000, 100_000_000]
    assert "Recommendation" in result.markdown


def test_an_incremental_run_keeps_the_projected_vectors(distilled: dict[str, Any], mode_index: Path,
                                                        tmp_path: Path) -> None:
    import shutil

    from vkd.indexer import Index, IndexMismatchError
    from vkd.indexer.build import build_index

    index_dir = tmp_path / "copy.vkd"
    shutil.copytree(mode_index, index_dir)
    images = Path(Index.open(mode_index).images_root)
    assert Index.open(index_dir).verify() == []
    options = {"student": str(distilled["model"]), "teacher": str(distilled["teacher"]), "device": "cpu",
               "prefer": "torch", "workers": 1}
    with pytest.raises(IndexMismatchError, match="--projected"):
        build_index(images, index_dir, projected=False, **options)
    extra = tmp_path / "extra.png"
    make_images(1, seed=11)[0].save(extra)
    shutil.copy(extra, images / "zz-new.png")
    try:
        result = build_index(images, index_dir, **options)  # projected=None: as the index has
    finally:
        (images / "zz-new.png").unlink()
    assert result.added == 1
    index = Index.open(index_dir)
    assert all(shard.projected_dim for shard in index.shards) and index.verify() == []


def test_mode_training_with_gradient_caching_and_resume(distilled: dict[str, Any], tiny_clip: Path,
                                                        tiny_clip_teacher: Path, tmp_path: Path) -> None:
    """The mode terms go through the gradient cache like every KD term; a run cut and resumed
    writes the same projection as one run through."""
    from safetensors.numpy import load_file

    from vkd.distill.trainer import distill

    train = distilled["root"] / "train.jsonl"
    common = {"use_gradient_cache": True, "gradient_cache_chunk_size": 4, "epochs": 2,
              "train_modes": ["student-index"], "save_steps": 2}
    whole = distill(_config(tmp_path / "whole", train, None, tiny_clip, tiny_clip_teacher, **common))
    distill(_config(tmp_path / "cut", train, None, tiny_clip, tiny_clip_teacher, max_steps=3, **common))
    resumed = distill(_config(tmp_path / "cut", train, None, tiny_clip, tiny_clip_teacher,
                              resume_from_checkpoint=True, **common))
    assert resumed.report["projection"]["modes"] == ["student-index"]
    a = load_file(str(whole.model_dir / "vkd_projection.safetensors"))["weight"]
    b = load_file(str(resumed.model_dir / "vkd_projection.safetensors"))["weight"]
    np.testing.assert_allclose(a, b, atol=1e-5)


def test_student_query_scans_a_matryoshka_prefix_only_for_teachers_trained_with_one() -> None:
    from vkd.retrieval.modes import scan_prefix

    assert scan_prefix("qwen3_vl", 4096) == 256  # Qwen3-VL-Embedding (model_type qwen3_vl)
    assert scan_prefix("qwen3_vl", 128) == 128
    assert scan_prefix("clip", 768) == 768  # no Matryoshka training: the whole vector
    assert scan_prefix("clip", 768, prefix=64) == 64
    with pytest.raises(ValueError):
        scan_prefix("clip", 768, prefix=1000)


def test_the_mode_terms_weights_and_temperature() -> None:
    """Defaults: the mean of alignment and InfoNCE; ``kd``: T²·KL of the teacher's own text → image
    ranking of the batch against the mode's, at the teacher's scale / T."""
    import torch
    import torch.nn.functional as F

    from vkd.distill.losses import AsymmetricModeLoss, TeacherOutput, TeacherProjections

    torch.manual_seed(0)
    n, ds, dt = 6, 8, 12
    s_text, s_image = F.normalize(torch.randn(n, ds), dim=-1), F.normalize(torch.randn(n, ds), dim=-1)
    t_text, t_image = F.normalize(torch.randn(n, dt), dim=-1), F.normalize(torch.randn(n, dt), dim=-1)
    teacher = TeacherOutput(text=t_text, image=t_image, logit_scale=20.0)
    projections = TeacherProjections(ds, [dt], learned=True)
    p_text = projections(s_text, 0)
    default = AsymmetricModeLoss(["student-query"], projections)(s_text, s_image, [teacher])["student-query"]
    expected = ((p_text - t_text).pow(2).sum(-1).mean() + F.cross_entropy(20.0 * p_text @ t_image.T,
                                                                           torch.arange(n))) / 2
    torch.testing.assert_close(default, expected)
    kd_only = AsymmetricModeLoss(["student-query"], projections, alignment=0.0, contrastive=0.0, kd=1.0,
                                 temperature=2.0)(s_text, s_image, [teacher])["student-query"]
    p = (10.0 * t_text @ t_image.T).softmax(dim=1)
    log_q = (10.0 * p_text @ t_image.T).log_softmax(dim=1)
    torch.testing.assert_close(kd_only, 4.0 * (p * (p.log() - log_q)).sum(1).mean())


def test_the_sweep_chooses_on_validation_and_keeps_every_trial(distilled: dict[str, Any], tiny_clip: Path,
                                                               tmp_path: Path) -> None:
    from vkd.bench.modes import ModesSettings, sweep_modes

    root = distilled["root"]
    settings = ModesSettings(epochs=1, batch_size=8, learning_rate=5e-3, sweep={"mode_kd_weight": (1.0,)},
                             sweep_epochs=1)
    record = sweep_modes(str(tiny_clip), str(distilled["teacher"]), root / "train.jsonl", root / "val.jsonl",
                         tmp_path / "sweep", settings)
    saved = json.loads((tmp_path / "sweep" / "sweep.json").read_text())
    assert saved == json.loads(json.dumps(record)) and saved["split"].endswith("val.jsonl")
    assert [t["settings"]["mode_kd_weight"] for t in saved["trials"]] == [0.0, 1.0]
    best = max(saved["trials"], key=lambda t: t["score"])
    assert saved["chosen"] == best["settings"] and saved["model"] == best["model"]
    for trial in saved["trials"]:
        assert set(trial["val"]) == {"student-query", "student-index"}
        assert trial["score"] == pytest.approx(np.mean([v["overlap@8"] for v in trial["val"].values()]))
