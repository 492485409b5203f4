"""INT8: the export's default recipe per family, the recipe tooling, and ``int8_variants``."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from click.testing import CliRunner

from vkd.bench.int8 import Int8Settings, best_recipe, int8_variants, markdown
from vkd.cli import cli
from vkd.export import ExportError, OnnxEncoder, export_onnx
from vkd.export.int8 import (
    DEFAULT_CANDIDATES,
    INT8_TARGET_COSINE,
    RECIPES,
    op_counts,
    patch_conv_as_matmul,
    quantize_int8,
)
from vkd.export.onnx_export import sample_images


def _copy(model: Path, dest: Path) -> Path:
    return Path(shutil.copytree(model, dest, ignore=shutil.ignore_patterns("onnx")))


@pytest.fixture(scope="module")
def default_exports(tiny_clip: Path, tiny_siglip: Path, tiny_qwen3vl: Path,
                    tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("int8-exports")
    out = {}
    for name, source in (("clip", tiny_clip), ("siglip", tiny_siglip), ("qwen3-vl", tiny_qwen3vl)):
        out[name] = _copy(source, root / name)
        export_onnx(out[name], image_buckets="64x64,96x64" if name == "qwen3-vl" else None)
    return out


@pytest.mark.parametrize("family", ["clip", "siglip", "qwen3-vl"])
def test_default_int8_stays_within_0999_of_torch(default_exports: dict[str, Path], family: str) -> None:
    manifest = json.loads((default_exports[family] / "onnx" / "export.json").read_text())
    parity = manifest["parity"]
    assert parity["int8_target_cosine"] == INT8_TARGET_COSINE == 0.999
    checked = dict(parity["towers"])
    checked.update({f"image {size}": numbers for size, numbers in parity.get("image_buckets", {}).items()})
    assert set(checked) >= ({"text", "image", "image 64x64", "image 96x64"} if family == "qwen3-vl"
                            else {"text", "image"})
    for graph, numbers in checked.items():
        assert numbers["int8"]["min"] >= 0.999, (graph, numbers)
    entries = [(manifest["text"], "text")]
    entries += [(entry, "image") for entry in
                (manifest["image"]["buckets"] if family == "qwen3-vl" else [manifest["image"]])]
    for entry, tower in entries:
        # candidates are tried fastest first; the first that met the target is kept, and the
        # export records it and what was tried before it. A text graph has no patch Conv: the
        # "patch-" recipes are their plain twins there, tried once and named as such.
        expected = list(dict.fromkeys(name.removeprefix("patch-") if tower == "text" else name
                                      for name in DEFAULT_CANDIDATES))
        tried = entry["int8_tried"]
        assert [trial["recipe"] for trial in tried] == expected[: len(tried)]
        assert tried[-1]["recipe"] == entry["int8_recipe"] and tried[-1]["min_cosine"] >= INT8_TARGET_COSINE
        assert all(trial["min_cosine"] < INT8_TARGET_COSINE for trial in tried[:-1])


def test_default_int8_quantises_the_patch_embedding_as_a_matmul(default_exports: dict[str, Path]) -> None:
    for family, image in (("clip", "image.int8.onnx"), ("siglip", "image.int8.onnx"),
                          ("qwen3-vl", "image-64x64.int8.onnx")):
        ops = op_counts(default_exports[family] / "onnx" / image)
        # ConvInteger is what made INT8 image towers slow; the Conv is now a quantised MatMul
        assert "ConvInteger" not in ops and "Conv" not in ops, (family, ops)
        assert ops["MatMulInteger"] > 0
    # SigLIP's attention-pooling head projects every patch: exported through explicit q/k/v
    # Linears its weights are constants and get quantised (packed, they stayed fp32 Gemm/MatMul);
    # what stays fp32 is the attention itself, 2 products per encoder layer (2) and in the head
    ops = op_counts(default_exports["siglip"] / "onnx" / "image.int8.onnx", interesting=("Gemm", "MatMul"))
    assert ops == {"MatMul": 2 * (2 + 1)}, ops
    # and the vectors through the encoder still match torch (not only the per-graph figures)
    from vkd.models import load_encoder

    torch_encoder = load_encoder(default_exports["clip"], prefer="torch", device="cpu")
    images = sample_images(6, seed=3)
    cos = np.sum(OnnxEncoder(default_exports["clip"] / "onnx", precision="int8").encode_images(images)
                 * torch_encoder.encode_images(images), axis=1)
    assert cos.min() >= 0.999


def test_patch_conv_as_matmul_computes_the_same_numbers(default_exports: dict[str, Path], tmp_path: Path) -> None:
    source = default_exports["clip"] / "onnx" / "image.onnx"
    model = onnx.load(str(source))
    assert patch_conv_as_matmul(model) == 1
    assert not any(node.op_type == "Conv" for node in model.graph.node)
    onnx.save(model, str(tmp_path / "rewritten.onnx"))
    pixels = OnnxEncoder(default_exports["clip"] / "onnx", precision="fp32").image_inputs(sample_images(4))
    before = ort.InferenceSession(str(source), providers=["CPUExecutionProvider"]).run(None, pixels)[0]
    after = ort.InferenceSession(str(tmp_path / "rewritten.onnx"), providers=["CPUExecutionProvider"]).run(None, pixels)[0]
    np.testing.assert_allclose(after, before, atol=1e-5)
    assert patch_conv_as_matmul(onnx.load(str(default_exports["clip"] / "onnx" / "text.onnx"))) == 0


def test_a_named_recipe_is_used_and_recorded(tiny_clip: Path, tmp_path: Path) -> None:
    result = export_onnx(_copy(tiny_clip, tmp_path / "model"), int8_recipe="legacy")
    assert result.manifest["image"]["int8_recipe"] == "legacy"
    assert [tried["recipe"] for tried in result.manifest["image"]["int8_tried"]] == ["legacy"]
    assert "ConvInteger" in op_counts(result.out_dir / "image.int8.onnx")  # what "legacy" did
    with pytest.raises(ExportError, match="choose one of"):
        export_onnx(tiny_clip, tmp_path / "x", int8_recipe="nonsense")
    with pytest.raises(ExportError, match="needs int8='dynamic'"):
        export_onnx(tiny_clip, tmp_path / "y", int8="none", int8_recipe="matmul")


def _check_rows(rows: list[dict], graphs: set[str], recipes: list[str], torch: bool) -> None:
    assert {row["graph"] for row in rows} == graphs
    for graph in graphs:
        variants = [row["variant"] for row in rows if row["graph"] == graph]
        assert variants == (["torch fp32"] if torch else []) + ["onnx fp32"] + recipes
    for row in rows:
        assert row["error"] is None, row
        assert row["ms_batch1"] > 0 and row["ms_per_item"] > 0 and row["batch"] == 4
        assert 0.99 <= row["cosine_vs_fp32"]["min"] <= row["cosine_vs_fp32"]["mean"] <= 1.0 + 1e-6
        assert row["speedup_vs_onnx_fp32"]["batch"] > 0 and row["speedup_vs_onnx_fp32"]["batch1"] > 0
        assert (row["speedup_vs_torch_fp32"] is not None) == torch
        if row["recipe"] is not None:
            assert row["recipe"]["name"] == row["variant"] and row["bytes"] > 0 and row["ops"]["MatMulInteger"] > 0
    assert json.loads(json.dumps(rows)) == rows  # plain JSON, as --variants-out writes it


def test_int8_variants_returns_well_formed_records(tiny_clip: Path, tiny_qwen3vl: Path, tmp_path: Path) -> None:
    settings = Int8Settings(batch=4, repeats=1, warmup=0, min_seconds=0.0, max_repeats=1)
    recipes = ["legacy", "patch-matmul-gather-pc"]
    rows = int8_variants(tiny_clip, recipes=recipes, settings=settings, workdir=tmp_path / "clip")
    _check_rows(rows, {"text", "text@max_length", "image"}, recipes, torch=True)
    best = best_recipe(rows, "image", min_cosine=0.99)
    assert best is not None and best["variant"] in recipes
    assert "| image | patch-matmul-gather-pc |" in markdown(rows)

    settings.torch_baseline = False
    rows = int8_variants(tiny_qwen3vl, recipes=["matmul-pc"], settings=settings, image_buckets="64x64,96x64")
    # Qwen's 8192 is never padded to; the buckets' graphs end where the language model they share begins
    _check_rows(rows, {"text", "image 64x64", "image language model"}, ["matmul-pc"], torch=False)


def test_cli_int8_variants(tiny_clip: Path, tmp_path: Path) -> None:
    out = tmp_path / "rows.json"
    result = CliRunner().invoke(cli, ["export", str(tiny_clip), "--int8-variants", "--quick", "--threads", "1",
                                      "--clock", "cpu", "--variants-out", str(out)])
    assert result.exit_code == 0, result.output
    rows = json.loads(out.read_text())
    assert {row["variant"] for row in rows} == {"torch fp32", "onnx fp32", *RECIPES}
    assert all(row["clock"] == "cpu" and row["threads"] == 1 for row in rows)
    assert "| text | onnx fp32 |" in result.output
    assert not (tiny_clip / "onnx").exists()  # a measurement, not an export


def test_int8_of_an_external_data_graph_follows_the_size_limit(default_exports: dict[str, Path],
                                                               tmp_path: Path) -> None:
    """quantize_int8 reads an fp32 graph kept in external data (patch rewrite included) and
    writes its copy as one file when it fits under the limit, else with its own data file."""
    from vkd.export.layout import external_files, relayout

    source = default_exports["clip"] / "onnx"
    fp32 = tmp_path / "image.onnx"
    shutil.copy(source / "image.onnx", fp32)
    assert relayout(fp32, fp32, max_single_bytes=0) == tmp_path / "image.onnx.data"
    feeds = OnnxEncoder(source).image_inputs(sample_images(4))
    reference = ort.InferenceSession(str(fp32), providers=["CPUExecutionProvider"]).run(None, feeds)[0]
    for limit, files in ((0, ["image.int8.onnx", "image.int8.onnx.data"]), (2**31, ["image.int8.onnx"])):
        out = tmp_path / f"limit-{limit}"
        out.mkdir()
        notes = quantize_int8(fp32, out / "image.int8.onnx", "patch-matmul-gather-pc", max_single_bytes=limit)
        assert notes["patch_convs_as_matmul"] == 1 and notes["ops"].get("MatMulInteger", 0) > 0
        assert sorted(p.name for p in out.iterdir()) == files
        assert [p.name for p in external_files(out / "image.int8.onnx")] == files[1:]
        got = ort.InferenceSession(str(out / "image.int8.onnx"), providers=["CPUExecutionProvider"]).run(None, feeds)[0]
        assert np.sum(got * reference, axis=1).min() >= 0.99
    assert sorted(p.name for p in tmp_path.iterdir()) == ["image.onnx", "image.onnx.data", "limit-0",
                                                          f"limit-{2**31}"]  # no prepared copy left behind
