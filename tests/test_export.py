"""ONNX export: files, parity with torch (vectors and rankings), the torch-free backend,
and ``vkd export``. Every model is a copy of a tiny fixture, so exports never land in a
model directory other tests use."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from conftest import make_images

from vkd.cli import cli
from vkd.export import ExportError, OnnxEncoder, export_onnx
from vkd.export.preprocess import ImagePreprocessor, TextTokenizer
from vkd.indexer import Index
from vkd.models import load_encoder
from vkd.retrieval import Retriever

TEXTS = ["a puppy in the snow", "three boats on a lake at night", "a", "Bright ORANGE flower, close up!",
         "a woman and a man walking down a long street next to parked cars and trees"]
RANK_QUERIES = ["dog", "a red car", "two cats on a sofa", "a boat", "snow field", "bird in the sky",
                "a child with a ball", "a big house near a tree"]


def _images() -> list:
    odd = make_images(2, seed=5, size=(23, 71)) + make_images(2, seed=6, size=(64, 48))
    return make_images(3, seed=4) + odd + [odd[0].convert("L"), odd[2].convert("RGBA")]


def _copy(model: Path, dest: Path) -> Path:
    return Path(shutil.copytree(model, dest, ignore=shutil.ignore_patterns("onnx")))


@pytest.fixture(scope="module")
def exports(tiny_clip: Path, tiny_siglip: Path, tiny_qwen3vl: Path, tiny_clip_teacher: Path,
            tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Model dirs (copies) with a dynamic-INT8 export in ``<dir>/onnx``."""
    root = tmp_path_factory.mktemp("exports")
    models = {"clip": tiny_clip, "siglip": tiny_siglip, "qwen3-vl": tiny_qwen3vl, "teacher": tiny_clip_teacher}
    out = {}
    for name, source in models.items():
        out[name] = _copy(source, root / name)
        export_onnx(out[name])
    return out


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("export-corpus")
    for i, image in enumerate(make_images(30, seed=21)):
        image.save(root / f"im-{i:02d}.png")
    return root


@pytest.fixture(scope="module")
def indexes(exports: dict[str, Path], corpus: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Indexes built with the torch students (CLIP also with the torch teacher)."""
    root = tmp_path_factory.mktemp("export-indexes")
    out = {}
    for family in ("clip", "siglip", "qwen3-vl"):
        teacher = str(exports["teacher"]) if family == "clip" else None
        # torch, as the docstring says: on a CPU the default would take the fresh export
        out[family] = Index.build(corpus, root / family, student=str(exports[family]), teacher=teacher,
                                  shard_size=12, prefer="torch").path
    return out


def test_export_files_are_single_file_models_with_dynamic_axes(exports: dict[str, Path]) -> None:
    onnx_dir = exports["clip"] / "onnx"
    assert sorted(p.name for p in onnx_dir.iterdir()) == [
        "export.json", "image.int8.onnx", "image.onnx", "preprocessor_config.json", "text.int8.onnx",
        "text.onnx", "tokenizer.json",
    ]
    for name in ("text.onnx", "text.int8.onnx", "image.onnx", "image.int8.onnx"):
        model = onnx.load(str(onnx_dir / name), load_external_data=False)
        assert not any(t.data_location == onnx.TensorProto.EXTERNAL for t in model.graph.initializer)
        dims = {i.name: [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim] for i in model.graph.input}
        if name.startswith("text"):
            assert dims == {"input_ids": ["batch", "sequence"], "attention_mask": ["batch", "sequence"]}
        else:
            assert dims["pixel_values"][0] == "batch" and dims["pixel_values"][1:] == [3, 32, 32]
    manifest = json.loads((onnx_dir / "export.json").read_text())
    torch_encoder = load_encoder(exports["clip"], prefer="torch", device="cpu")
    assert manifest["source"]["fingerprint"] == torch_encoder.fingerprint
    assert manifest["quantization"] == "dynamic" and manifest["image_unsupported"] is None
    towers = manifest["parity"]["towers"]
    assert towers["text"]["fp32"]["min"] >= 0.9999 and towers["image"]["int8"]["min"] >= 0.99
    assert not list(exports["clip"].glob(".onnx.*"))  # no staging leftovers


@pytest.mark.parametrize("family", ["clip", "siglip", "qwen3-vl"])
def test_onnx_vectors_match_torch(exports: dict[str, Path], family: str) -> None:
    torch_encoder = load_encoder(exports[family], prefer="torch", device="cpu")
    reference_text = torch_encoder.encode_text(TEXTS, batch_size=3)
    has_images = family != "qwen3-vl"
    reference_images = torch_encoder.encode_images(_images(), batch_size=3) if has_images else None
    for precision, bound in (("fp32", 0.9999), ("int8", 0.99)):
        encoder = OnnxEncoder(exports[family] / "onnx", precision=precision, batch_size=3)
        assert encoder.fingerprint == torch_encoder.fingerprint and encoder.dim == torch_encoder.dim
        cos = np.sum(encoder.encode_text(TEXTS) * reference_text, axis=1)
        assert cos.min() >= bound, (precision, cos)
        if has_images:
            cos = np.sum(encoder.encode_images(_images()) * reference_images, axis=1)
            assert cos.min() >= bound, (precision, cos)
    if not has_images:
        with pytest.raises(ValueError, match="no image tower.*rotary positions"):
            OnnxEncoder(exports[family] / "onnx").encode_images(_images()[:1])


@pytest.mark.parametrize("family", ["clip", "siglip", "qwen3-vl"])
def test_onnx_rankings_agree_with_torch(exports: dict[str, Path], indexes: dict[str, Path], family: str) -> None:
    def top10(student: object) -> list[list[str]]:
        retriever = Retriever(indexes[family], student=student, rerank=False)
        return [[hit.id for hit in result] for result in retriever.search_batch(RANK_QUERIES, k=10)]

    torch_top = top10(load_encoder(exports[family], prefer="torch", device="cpu"))
    assert top10(OnnxEncoder(exports[family] / "onnx", precision="fp32")) == torch_top
    int8_top = top10(OnnxEncoder(exports[family] / "onnx", precision="int8"))
    overlap = [len(set(a) & set(b)) for a, b in zip(int8_top, torch_top, strict=True)]
    assert np.mean(overlap) >= 9, overlap


def test_preprocessing_reproduces_the_transformers_processors(exports: dict[str, Path]) -> None:
    for family in ("clip", "siglip"):
        encoder = load_encoder(exports[family], prefer="torch", device="cpu")
        ours = ImagePreprocessor.from_file(exports[family] / "onnx" / "preprocessor_config.json")(_images())
        np.testing.assert_allclose(ours, encoder.preprocess(_images())["pixel_values"].numpy(), atol=1e-6)
    for family in ("clip", "siglip", "qwen3-vl"):
        encoder = load_encoder(exports[family], prefer="torch", device="cpu")
        spec = json.loads((exports[family] / "onnx" / "export.json").read_text())["text"]
        ours = TextTokenizer(exports[family] / "onnx" / "tokenizer.json", spec)(TEXTS + [""])
        theirs = encoder.tokenize(TEXTS + [""])
        for name, array in ours.items():
            np.testing.assert_array_equal(array, theirs[name].numpy(), err_msg=f"{family} {name}")


def test_load_encoder_prefers_the_export_and_precision_is_an_option(exports: dict[str, Path]) -> None:
    encoder = load_encoder(exports["clip"], prefer="onnx")
    assert isinstance(encoder, OnnxEncoder) and encoder.precision == "int8"
    assert encoder.name == str(exports["clip"])
    assert encoder.model_path("text").name == "text.int8.onnx"
    assert load_encoder(exports["clip"], prefer="onnx", precision="fp32").model_path("text").name == "text.onnx"


def test_onnx_search_imports_neither_torch_nor_transformers(
    exports: dict[str, Path], indexes: dict[str, Path], corpus: Path
) -> None:
    script = f"""
import json, sys
from pathlib import Path
import vkd.indexer, vkd.export.onnx_encoder, vkd.retrieval
from vkd.retrieval import Retriever
retriever = Retriever({str(indexes["clip"])!r}, prefer="onnx")
text = retriever.search("a dog on a beach", k=5)
image = retriever.search(Path({str(corpus / "im-07.png")!r}), k=1)
print(json.dumps({{
    "student": type(retriever.student).__name__, "teacher": type(retriever.teacher).__name__,
    "reranked": text.reranked, "hits": len(text), "self": image[0].path,
    "heavy": sorted(m for m in ("torch", "transformers") if m in sys.modules),
}}))
"""
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report == {"student": "OnnxEncoder", "teacher": "OnnxEncoder", "reranked": "teacher", "hits": 5,
                      "self": str(corpus / "im-07.png"), "heavy": []}


def test_latency_benchmark_reports_every_stage_per_variant(indexes: dict[str, Path]) -> None:
    from vkd.bench.search import measure_latency

    report = measure_latency(indexes["clip"], RANK_QUERIES[:3], batch_sizes=(1, 4), repeats=2, warmup=1,
                             candidates=20)
    assert set(report["variants"]) == {"torch-fp32", "onnx-fp32", "onnx-int8"}
    for variant in report["variants"].values():
        for size in ("1", "4"):
            stats = variant["batches"][size]
            assert stats["calls"] == 2 and stats["reranked"] == "teacher"
            for stage in ("student_encode_ms", "ann_ms", "teacher_encode_ms", "rerank_ms", "total_ms"):
                assert 0 < stats[stage]["p50_ms"] <= stats[stage]["p95_ms"]
    assert report["variants"]["onnx-int8"]["encoder"]["precision"] == "int8"


def test_cli_export_and_a_failed_parity_check_leaves_the_old_export(
    tiny_clip: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = _copy(tiny_clip, tmp_path / "model")
    out = tmp_path / "exported"
    result = CliRunner().invoke(cli, ["export", str(model), "--out", str(out), "--int8", "none"])
    assert result.exit_code == 0, result.output
    assert "text  fp32" in result.output and "image fp32" in result.output and "cosine vs torch" in result.output
    before = (out / "export.json").read_text()
    assert json.loads(before)["text"]["int8"] is None
    with pytest.raises(ValueError, match="no INT8 models"):
        OnnxEncoder(out, precision="int8")

    import vkd.export.onnx_export as onnx_export

    monkeypatch.setitem(onnx_export.PARITY_MIN_COSINE, "fp32", 1.5)  # unreachable: the check must fail
    failed = CliRunner().invoke(cli, ["export", str(model), "--out", str(out), "--int8", "none"])
    assert failed.exit_code == 1
    assert "text fp32: min cosine 1.000000 < 1.5" in failed.output and "Nothing was written" in failed.output
    assert (out / "export.json").read_text() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["exported", "model"]


def test_export_refuses_bad_requests(tiny_clip: Path, tmp_path: Path) -> None:
    static = CliRunner().invoke(cli, ["export", str(tiny_clip), "--int8", "static"])
    assert static.exit_code == 2 and "--calibration" in static.output
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "notes.txt").write_text("mine")
    with pytest.raises(ExportError, match="not an ONNX export"):
        export_onnx(tiny_clip, tmp_path / "taken")


@pytest.mark.slow
def test_static_int8_export_calibrated_on_pairs(tiny_clip: Path, tmp_path: Path) -> None:
    images = tmp_path / "images"
    images.mkdir()
    lines = []
    for i, image in enumerate(make_images(8, seed=9)):
        image.save(images / f"{i}.png")
        lines.append(json.dumps({"image": f"images/{i}.png", "text": TEXTS[i % len(TEXTS)]}))
    (tmp_path / "pairs.jsonl").write_text("\n".join(lines) + "\n")
    model = _copy(tiny_clip, tmp_path / "model")
    result = export_onnx(model, int8="static", calibration=tmp_path / "pairs.jsonl")
    assert result.manifest["quantization"] == "static"
    for tower in ("text", "image"):
        assert result.parity["towers"][tower]["int8"]["min"] >= 0.99
        assert result.parity["towers"][tower]["int8"]["n"] > 8  # calibration inputs joined the samples
    graph = onnx.load(str(result.out_dir / "text.int8.onnx")).graph
    assert any(node.op_type == "QuantizeLinear" for node in graph.node)


def test_a_qwen3vl_text_limit_and_instructions_survive_the_export(tiny_qwen3vl: Path, tmp_path: Path) -> None:
    """The export cuts texts as the torch path does (the text only, never the template's end;
    its parity samples run far past the limit) and keeps the query instruction; asked for
    other options, load_encoder(prefer="onnx") gives the torch model, which applies them."""
    model = load_encoder(tiny_qwen3vl, device="cpu", max_text_length=4, query_instruction="Find the photo")
    model_dir = model.save(tmp_path / "short")
    export_onnx(model_dir)
    torch_encoder = load_encoder(model_dir, prefer="torch", device="cpu")
    spec = json.loads((model_dir / "onnx" / "export.json").read_text())["text"]
    ours = TextTokenizer(model_dir / "onnx" / "tokenizer.json", spec)(TEXTS + [""])
    theirs = torch_encoder.tokenize(TEXTS + [""])
    np.testing.assert_array_equal(ours["input_ids"], theirs["input_ids"].numpy())
    onnx_encoder = load_encoder(model_dir, prefer="onnx")
    assert isinstance(onnx_encoder, OnnxEncoder) and onnx_encoder.fingerprint == torch_encoder.fingerprint
    assert onnx_encoder.query_instruction == "Find the photo."
    cos = np.sum(onnx_encoder.encode_text(TEXTS) * torch_encoder.encode_text(TEXTS), axis=1)
    assert cos.min() >= 0.99, cos
    assert isinstance(load_encoder(model_dir, prefer="onnx", **onnx_encoder.load_options()), OnnxEncoder)
    other = load_encoder(model_dir, prefer="onnx", device="cpu", query_instruction="Something else")
    assert not isinstance(other, OnnxEncoder) and other.query_instruction == "Something else."


# -- external data: graphs over the protobuf limit, forced here on a tiny model --------------


def _external_locations(path: Path) -> set[str]:
    model = onnx.load(str(path), load_external_data=False)
    return {entry.value for tensor in model.graph.initializer if tensor.data_location == onnx.TensorProto.EXTERNAL
            for entry in tensor.external_data if entry.key == "location"}


@pytest.fixture(scope="module")
def external_clip(tiny_clip: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny CLIP exported as if every graph were over the limit (threshold 0 bytes)."""
    model = _copy(tiny_clip, tmp_path_factory.mktemp("external") / "clip")
    export_onnx(model, max_single_file_bytes=0)
    return model


def test_external_data_export_writes_one_data_file_per_graph(external_clip: Path) -> None:
    onnx_dir = external_clip / "onnx"
    graphs = ["image.int8.onnx", "image.onnx", "text.int8.onnx", "text.onnx"]
    assert sorted(p.name for p in onnx_dir.iterdir()) == sorted(
        ["export.json", "preprocessor_config.json", "tokenizer.json", *graphs, *(f"{g}.data" for g in graphs)])
    manifest = json.loads((onnx_dir / "export.json").read_text())
    for name in graphs:
        # each graph's weights are in its own data file, named relative to the graph
        assert _external_locations(onnx_dir / name) == {f"{name}.data"}
        assert manifest["files"][f"{name}.data"]["bytes"] == (onnx_dir / f"{name}.data").stat().st_size > 0
    for tower in ("text", "image"):
        entry = manifest[tower]
        assert entry["data"] == {"fp32": f"{tower}.onnx.data", "int8": f"{tower}.int8.onnx.data"}
        for precision in ("fp32", "int8"):  # the size on disk counts the data file
            assert entry["bytes"][precision] == sum((onnx_dir / n).stat().st_size
                                                    for n in (entry[precision], entry["data"][precision]))
    parity = manifest["parity"]["towers"]
    assert min(parity[t]["fp32"]["min"] for t in ("text", "image")) >= 0.9999
    assert min(parity[t]["int8"]["min"] for t in ("text", "image")) >= 0.99
    assert not [p for p in external_clip.iterdir() if p.name.startswith(".")]  # no staging or scratch left


def test_external_data_export_matches_torch_and_searches(external_clip: Path, corpus: Path, tmp_path: Path) -> None:
    torch_encoder = load_encoder(external_clip, prefer="torch", device="cpu")
    reference_text = torch_encoder.encode_text(TEXTS, batch_size=3)
    reference_images = torch_encoder.encode_images(_images(), batch_size=3)
    for precision, bound in (("fp32", 0.9999), ("int8", 0.99)):
        encoder = OnnxEncoder(external_clip / "onnx", precision=precision, batch_size=3)
        assert np.sum(encoder.encode_text(TEXTS) * reference_text, axis=1).min() >= bound
        assert np.sum(encoder.encode_images(_images()) * reference_images, axis=1).min() >= bound
        assert {p.name for p in encoder.model_files()} == {
            encoder.model_path(t).name + suffix for t in ("text", "image") for suffix in ("", ".data")}
    student = load_encoder(external_clip, prefer="onnx")
    assert isinstance(student, OnnxEncoder) and student.fingerprint == torch_encoder.fingerprint
    index = Index.build(corpus, tmp_path / "index", student=str(external_clip), shard_size=12, prefer="onnx")
    hits = Retriever(index.path, prefer="onnx", rerank=False).search(corpus / "im-07.png", k=1)
    assert Path(hits[0].path).name == "im-07.png"


def test_the_export_identity_covers_the_data_file(external_clip: Path, tmp_path: Path) -> None:
    copy = Path(shutil.copytree(external_clip / "onnx", tmp_path / "onnx"))
    encoder = OnnxEncoder(copy, precision="fp32")
    before = encoder.files_digest()
    encoder.verify_files()
    data = copy / "text.onnx.data"
    raw = bytearray(data.read_bytes())
    raw[len(raw) // 2] ^= 0xFF  # one weight's byte, same size
    data.write_bytes(bytes(raw))
    changed = OnnxEncoder(copy, precision="fp32")
    assert changed.files_digest() != before
    with pytest.raises(ValueError, match=r"text\.onnx\.data changed since the export"):
        changed.verify_files()
    data.write_bytes(bytes(raw[:-8]))  # truncated: refused when the session opens, naming the file
    with pytest.raises(ValueError, match=r"text\.onnx\.data has \d+ bytes where the export wrote"):
        OnnxEncoder(copy, precision="fp32").encode_text(["a dog"])
    data.unlink()
    with pytest.raises(ValueError, match=r"text\.onnx\.data is missing.*beside their name\.onnx"):
        OnnxEncoder(copy, precision="fp32").encode_text(["a dog"])


def test_relayout_gathers_one_file_per_tensor_into_one_data_file(external_clip: Path, tmp_path: Path) -> None:
    """torch's exporter writes a graph over 2 GiB as one file per tensor; relayout makes it
    vkd's layout (and a single file again when it fits) with the same outputs."""
    import onnxruntime as ort

    from vkd.export.layout import external_files, move_graph, relayout

    scattered = tmp_path / "scattered"
    scattered.mkdir()
    model = onnx.load(str(external_clip / "onnx" / "text.onnx"))
    onnx.save_model(model, str(scattered / "text.onnx"), save_as_external_data=True, all_tensors_to_one_file=False,
                    size_threshold=0)
    assert len(external_files(scattered / "text.onnx")) > 5
    feeds = OnnxEncoder(external_clip / "onnx").text_inputs(TEXTS)

    def run(path: Path) -> np.ndarray:
        return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, feeds)[0]

    expected = run(scattered / "text.onnx")
    out = tmp_path / "out"
    out.mkdir()
    assert relayout(scattered / "text.onnx", out / "a.onnx", max_single_bytes=0) == out / "a.onnx.data"
    assert sorted(p.name for p in scattered.iterdir()) == []  # the scattered files are gone
    move_graph(out / "a.onnx", out / "b.onnx")  # renames the data file and the graph's reference to it
    assert sorted(p.name for p in out.iterdir()) == ["b.onnx", "b.onnx.data"]
    assert _external_locations(out / "b.onnx") == {"b.onnx.data"}
    np.testing.assert_array_equal(run(out / "b.onnx"), expected)
    assert relayout(out / "b.onnx", out / "b.onnx") is None  # under the default limit: one file again
    assert sorted(p.name for p in out.iterdir()) == ["b.onnx"] and not _external_locations(out / "b.onnx")
    np.testing.assert_array_equal(run(out / "b.onnx"), expected)


def test_vkd_serve_runs_an_external_data_export(external_clip: Path, corpus: Path, tmp_path: Path) -> None:
    from serve_helpers import served

    index = Index.build(corpus, tmp_path / "index", student=str(external_clip), shard_size=12, prefer="onnx")
    with served(index=str(index.path), prefer="onnx", precision="fp32") as client:
        health = client.get("/search", params={"q": "a dog on a beach", "k": 3})
        assert health.status_code == 200, health.text
        student = OnnxEncoder(external_clip / "onnx", precision="fp32")
        expected = Retriever(index.path, student=student).search("a dog on a beach", k=3)
        assert [hit["id"] for hit in health.json()["results"]] == [hit.id for hit in expected]
        posted = client.post("/search", files={"image": ("q.png", (corpus / "im-07.png").read_bytes(), "image/png")},
                             data={"k": "1"})
        assert posted.status_code == 200, posted.text
        assert Path(posted.json()["results"][0]["path"]).name == "im-07.png"
