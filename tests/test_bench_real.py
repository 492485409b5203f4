"""``vkd bench real``: figures with their spread, ratios within repetitions, extrapolation
from truncated copies, the real-dimension corpora, and ``vkd index --prefer``.

What is checked is the shape and the arithmetic, never how fast anything was.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from click.testing import CliRunner
from conftest import make_images

from vkd.bench.timing import (
    format_ratio,
    format_spread,
    paired_ratios,
    ratio_spread,
    ratio_within_spread,
    repeat_rounds,
    round_medians,
    split_rounds,
    spread,
    within_spread,
)

SPREAD = {"median", "min", "max", "q1", "q3", "n"}


# ---------------------------------------------------------------- repetitions and ratios


def test_spread_is_median_min_max_quartiles_and_n() -> None:
    figure = spread([4.0, 1.0, 3.0, 2.0])
    assert set(figure) == SPREAD
    assert figure["median"] == 2.5 and figure["min"] == 1.0 and figure["max"] == 4.0 and figure["n"] == 4
    assert figure["q1"] == pytest.approx(1.75) and figure["q3"] == pytest.approx(3.25)
    assert spread([7.0]) == {"median": 7.0, "min": 7.0, "max": 7.0, "q1": 7.0, "q3": 7.0, "n": 1}
    with pytest.raises(ValueError, match="at least one"):
        spread([])
    with pytest.raises(ValueError, match="finite"):
        spread([1.0, math.nan])


def test_ratio_is_taken_within_each_repetition() -> None:
    # two set-ups measured in the same three rounds; the machine slows down in round 2
    baseline = [10.0, 20.0, 10.0]
    faster = [5.0, 10.0, 5.0]
    ratio = ratio_spread(baseline, faster)
    # within each round B is exactly twice as fast: no spread, although both figures vary 2x
    assert ratio == {"median": 2.0, "min": 2.0, "max": 2.0, "q1": 2.0, "q3": 2.0, "n": 3}
    assert paired_ratios(baseline, faster) == [2.0, 2.0, 2.0]
    # a ratio of medians taken from unpaired figures would be another number
    assert spread(baseline)["median"] / spread([5.0, 5.0, 10.0])["median"] == 2.0
    assert ratio_spread([10.0, 20.0, 10.0], [5.0, 5.0, 10.0])["median"] == 2.0
    assert ratio_spread([10.0, 20.0, 10.0], [5.0, 5.0, 10.0])["max"] == 4.0
    with pytest.raises(ValueError, match="one denominator per numerator"):
        ratio_spread([1.0, 2.0], [1.0])
    with pytest.raises(ValueError, match="positive"):
        ratio_spread([1.0], [0.0])


def test_within_spread_says_when_a_difference_is_noise() -> None:
    a, b, c = spread([1.0, 1.2, 1.1]), spread([1.15, 1.3]), spread([2.0, 2.1])
    assert within_spread(a, b) and within_spread(b, a)
    assert not within_spread(a, c)
    assert ratio_within_spread(ratio_spread([1.0, 1.1], [1.05, 1.0]))
    assert not ratio_within_spread(ratio_spread([2.0, 2.2], [1.0, 1.0]))
    assert format_ratio(ratio_spread([1.0, 1.1], [1.05, 1.0])).endswith("within spread")
    assert format_ratio(ratio_spread([2.0, 2.2], [1.0, 1.0])) == "2.10× (2.00–2.20)"
    assert format_spread(spread([2.0, 2.5, 3.0])) == "2.50 (2.00–3.00)"
    assert format_spread(None) is None


def test_repeat_rounds_interleaves_and_rotates() -> None:
    order: list[str] = []
    calls = {name: (lambda name=name: order.append(name)) for name in ("a", "b", "c")}
    seconds = repeat_rounds(calls, rounds=3, per_round=2, warmup=1)
    assert order[:3] == ["a", "b", "c"]  # warm-up, once each
    timed = order[3:]
    assert timed == ["a", "a", "b", "b", "c", "c", "b", "b", "c", "c", "a", "a", "c", "c", "a", "a", "b", "b"]
    assert {name: [len(r) for r in rounds] for name, rounds in seconds.items()} == {n: [2, 2, 2] for n in "abc"}
    assert round_medians([[1.0, 3.0], [2.0]]) == [2.0, 2.0]
    assert split_rounds(list(range(10)), 3) == [[0, 1, 2], [3, 4, 5, 6], [7, 8, 9]]
    assert split_rounds([1, 2], 5) == [[1], [2]]


# ---------------------------------------------------------------- extrapolation


def test_extrapolation_recovers_a_per_layer_cost_exactly() -> None:
    from vkd.bench.realencode import extrapolate, formula

    full = {"text": 28, "vision": 24}

    def cost(text: int, vision: int) -> float:  # fixed part + per-layer parts of two stacks
        return 5.0 + 3.0 * text + 1.5 * vision

    one, two = {"text": 1, "vision": 1}, {"text": 2, "vision": 2}
    # per-layer times 3.0 and 1.5: the shares hooks would measure
    got = extrapolate(cost(1, 1), cost(2, 2), one, two, full, ["text", "vision"], {"text": 3.0, "vision": 1.5})
    assert got == pytest.approx(cost(28, 24))
    # a call through one stack: the straight line through the two depths
    assert extrapolate(cost(1, 0), cost(2, 0), one, two, full, ["text"], {"text": 1.0}) == pytest.approx(cost(28, 0))
    # a stack already at full depth in both copies adds nothing; copies of one depth give nothing
    assert extrapolate(1.0, 2.0, {"text": 1, "vision": 24}, {"text": 2, "vision": 24}, full, ["text", "vision"],
                       {"text": 1.0, "vision": 1.0}) == pytest.approx(28.0)
    assert extrapolate(1.0, 2.0, one, one, full, ["text"], {"text": 1.0}) is None
    text = formula(one, two, full, ["text"], {"text": 1.0}, "time")
    assert text.startswith("t(28) = t(2) + (t(2) - t(1)) · (28 - 2) / (2 - 1)")
    assert "w = time per layer (vision 0.33, text 0.67)" in formula(
        one, two, full, ["vision", "text"], {"text": 3.0, "vision": 1.5}, "time")


def test_sizes_extrapolate_along_the_parameter_count() -> None:
    from vkd.bench.realencode import Copy, along_parameters

    c1 = Copy(Path("a"), {"text": 1}, False, parameters=100, full_parameters=1000)
    c2 = Copy(Path("b"), {"text": 2}, False, parameters=200, full_parameters=1000)
    # 4 bytes per parameter on top of a fixed 50
    assert along_parameters(450.0, 850.0, c1, c2) == pytest.approx(4050.0)


# ---------------------------------------------------------------- corpora at real dimensions


def test_factor_corpus_is_deterministic_normalised_and_written_in_place() -> None:
    from vkd.bench.realcorpus import FactorModel, make_factor_corpus
    from vkd.bench.search import overlap_at_k, recall_at_k

    model = FactorModel(rank=48, student_rank=40)
    out = np.zeros((3000, 96), dtype=np.float16)
    corpus = make_factor_corpus(3000, 60, student_dim=64, teacher_dim=96, model=model, seed=3, teacher_out=out)
    assert corpus.teacher is out and out.any()
    again = make_factor_corpus(3000, 60, student_dim=64, teacher_dim=96, model=model, seed=3)
    np.testing.assert_array_equal(corpus.student, again.student)
    np.testing.assert_array_equal(corpus.teacher, again.teacher)
    np.testing.assert_array_equal(corpus.ground_truth, again.ground_truth)
    for vectors in (corpus.student, corpus.teacher.astype(np.float32), corpus.query_teacher):
        np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=2e-3)
    teacher_top = np.argsort(-(corpus.query_teacher @ corpus.teacher.astype(np.float32).T), axis=1)[:, :10]
    student_top = np.argsort(-(corpus.query_student @ corpus.student.T), axis=1)[:, :10]
    # the teacher knows more of every item than the student does
    assert recall_at_k(teacher_top, corpus.ground_truth) >= recall_at_k(student_top, corpus.ground_truth)
    assert overlap_at_k(student_top, teacher_top) < 100.0
    assert "not any trained CLIP or Qwen3-VL" in corpus.description["summary"]
    with pytest.raises(ValueError, match="student_rank"):
        make_factor_corpus(10, 2, student_dim=8, teacher_dim=8, model=FactorModel(rank=4, student_rank=6))


# ---------------------------------------------------------------- vkd index --prefer


def _vectors_by_path(index_dir: Path) -> dict[str, np.ndarray]:
    from vkd.indexer import Index

    index = Index.open(index_dir)
    out = {}
    for shard in index.shards:
        rows = np.arange(len(shard))
        for record, vector in zip(shard.records(rows), shard.student_vectors(rows), strict=True):
            out[str(record["path"])] = vector
    return out


def test_vkd_index_prefer_onnx_uses_the_export(tmp_path: Path, tiny_clip: Path) -> None:
    from vkd.cli import cli
    from vkd.export import export_onnx

    model = Path(shutil.copytree(tiny_clip, tmp_path / "student", ignore=shutil.ignore_patterns("onnx")))
    export_onnx(model)
    images = tmp_path / "images"
    images.mkdir()
    for i, image in enumerate(make_images(7, seed=11, size=(48, 40))):
        image.save(images / f"im-{i}.png")
    runner = CliRunner()
    runs = {}
    for prefer in ("onnx", "torch", None):
        out = tmp_path / f"index-{prefer}"
        args = ["index", str(images), "--model", str(model), "--out", str(out), "--json", "--no-progress"]
        result = runner.invoke(cli, [*args, *(["--prefer", prefer] if prefer else [])])
        assert result.exit_code == 0, result.output
        runs[prefer] = json.loads(result.output[result.output.index("{"):])
        assert runs[prefer]["added"] == 7
    assert runs["onnx"]["student_backend"] == "onnx int8"  # the export, at its default precision
    assert runs["torch"]["student_backend"].startswith("torch float32")
    assert runs[None]["student_backend"] == "onnx int8"  # the default on a CPU, with an export there
    onnx_vectors, torch_vectors = _vectors_by_path(tmp_path / "index-onnx"), _vectors_by_path(tmp_path / "index-torch")
    assert set(onnx_vectors) == set(torch_vectors) and len(onnx_vectors) == 7
    cosines = [float(onnx_vectors[p] @ torch_vectors[p]) for p in onnx_vectors]
    assert min(cosines) >= 0.99, cosines
    manifests = [json.loads((tmp_path / f"index-{p}" / "manifest.json").read_text()) for p in ("onnx", "torch")]
    assert manifests[0]["student"]["fingerprint"] == manifests[1]["student"]["fingerprint"]
    # an incremental run with the other backend adds to the same index: same model, same fingerprint
    make_images(1, seed=99, size=(48, 40))[0].save(images / "late.png")
    more = runner.invoke(cli, ["index", str(images), "--model", str(model), "--out", str(tmp_path / "index-onnx"),
                               "--prefer", "torch", "--json", "--no-progress"])
    assert more.exit_code == 0, more.output
    assert json.loads(more.output[more.output.index("{"):])["added"] == 1


def test_prefer_onnx_falls_back_to_torch_without_an_image_tower(tmp_path: Path, tiny_qwen3vl: Path) -> None:
    from vkd.export import export_onnx
    from vkd.indexer.encode import EncodeStage, resolve_prefer

    model = Path(shutil.copytree(tiny_qwen3vl, tmp_path / "qwen", ignore=shutil.ignore_patterns("onnx")))
    export_onnx(model, image_buckets="none")  # the text tower only
    stage = EncodeStage(str(model), prefer="onnx", device="cpu")
    assert getattr(stage.student, "backend", "torch") != "onnx"  # images need the torch model
    assert resolve_prefer(None, "cuda:0") == "torch" and resolve_prefer(None, "cpu") == "onnx"
    with pytest.raises(ValueError, match="prefer='tensorrt'"):
        resolve_prefer("tensorrt")


# ---------------------------------------------------------------- vkd bench real --quick


def _spreads(value: Any, where: str = "results") -> list[tuple[str, dict[str, Any]]]:
    found = []
    if isinstance(value, dict):
        if "median" in value:
            found.append((where, value))
        for key, item in value.items():
            found += _spreads(item, f"{where}.{key}")
    elif isinstance(value, list):
        for index, item in enumerate(value):
            found += _spreads(item, f"{where}[{index}]")
    return found


TIMING_KEYS = ("ms_per_item", "search_ms", "full_query_ms", "images_per_s", "stage_ms", "speedup_vs_torch_fp32",
               "search_speedup_vs_teacher_only", "vs_encoder_alone", "vkd_over_faiss")


def _timing_figures(value: Any, where: str = "results") -> list[tuple[str, Any]]:
    found = []
    if isinstance(value, dict):
        for key, item in value.items():
            if key in TIMING_KEYS:
                found.append((f"{where}.{key}", item))
            found += _timing_figures(item, f"{where}.{key}")
    elif isinstance(value, list):
        for index, item in enumerate(value):
            found += _timing_figures(item, f"{where}[{index}]")
    return found


@pytest.mark.slow
def test_bench_real_quick_writes_every_timing_with_its_spread(tmp_path: Path) -> None:
    from PIL import Image

    from vkd.bench.commands import bench
    from vkd.bench.report import MACHINE_KEYS, read_result

    out = tmp_path / "results"
    args = ["real", "--quick", "--archs", "tiny-clip,tiny-qwen3-vl", "--backends", "torch-fp32,torch-bf16,onnx-int8",
            "--corpus-size", "5k", "--out", str(out)]
    result = CliRunner().invoke(bench, args, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    data = read_result(out / "real.json")
    assert data["benchmark"] == "real" and data["quick"] is True
    assert set(MACHINE_KEYS) <= set(data["machine"]) and data["machine"]["physical_cores"]
    assert data["command"].startswith("vkd bench real --quick")
    results = data["results"]
    assert results["random_weights"] is True and "Random weights" in results["statement"]
    assert "Random weights at the real architectures' shapes" in (out / "real.md").read_text()

    # every timing figure is {median, min, max, q1, q3, n} (or null with a reason nearby)
    timings = _timing_figures(results)
    assert len(timings) > 20
    for where, figure in timings:
        if figure is None:
            continue
        figures = figure.values() if where.endswith("stage_ms") else [figure]
        for one in figures:
            assert set(one) == SPREAD, where
    for where, figure in _spreads(results):
        if {"median", "min", "max", "n"} <= set(figure):
            assert figure["min"] <= figure["median"] <= figure["max"], where
            assert isinstance(figure["n"], int) and figure["n"] >= 1, where

    archs = {a["arch"]: a for a in results["encoding"]["archs"]}
    assert set(archs) == {"tiny-clip", "tiny-qwen3-vl"}
    for arch in archs.values():
        backends = {b["backend"]: b for b in arch["backends"]}
        assert backends["torch-fp32"]["status"] == "measured"
        assert "onnx-fp32" not in backends  # not asked for
        for name in ("torch-fp32", "torch-bf16", "onnx-int8"):
            record = backends[name]
            if record["status"] != "measured":
                assert record.get("reason"), (arch["arch"], name)
                continue
            assert record["extrapolated"] is True  # copies of 1 and 2 layers, "full" depth 4
            for call in ("image_b1", "image_b32", "text_b1", "text_b32"):
                entry = record["calls"][call]
                assert "(4 - 2) / (2 - 1)" in entry["formula"] or "w_vision" in entry["formula"], entry["formula"]
                assert set(entry["measured_ms_per_item"]) == {"1 text layers, 1 vision layers",
                                                              "2 text layers, 2 vision layers"}
            assert record["peak_rss_bytes"]["value"] is None or record["peak_rss_bytes"]["value"] > 0
            assert record["model_bytes"]["value"] > 0
            if name != "torch-fp32":
                assert record["cosine_vs_torch_fp32"]["text"]["min"] > 0.98
    qwen_image = archs["tiny-qwen3-vl"]["backends"][0]["calls"]["image_b1"]["formula"]
    assert "w_vision" in qwen_image and "w_text" in qwen_image  # two stacks, split by the hooks

    (pairing,) = results["end_to_end"]
    assert pairing["corpus_size"] == 5000 and (pairing["student_dim"], pairing["teacher_dim"]) == (512, 768)
    methods = {m["method"]: m for m in pairing["methods"]}
    assert {"teacher only", "student ANN", "two-stage k1=100", "two-stage k1=1000"} <= set(methods)
    assert methods["teacher only"]["quality"]["overlap@10"] == 100.0
    assert methods["two-stage k1=1000"]["quality"]["overlap@10"] >= methods["student ANN"]["quality"]["overlap@10"]
    for name, method in methods.items():
        assert method["search_ms"]["n"] == 2, name
        assert method["memory"]["disk_bytes"] > 0
    assert set(pairing["stage1_overhead"]["ms"]) == {"faiss direct", "vkd stage 1"}

    indexing = results["indexing"]
    assert indexing["student"]["arch"] == "tiny-clip"
    assert indexing["student"]["backends"] == {"onnx": "onnx int8", "torch": "torch float32 cpu"}
    assert indexing["runs"]["vkd index, prefer onnx"]["vs_encoder_alone"]["n"] == 2
    with Image.open(out / "real_costs.png") as image:
        assert image.format == "PNG" and image.width > 300


@pytest.mark.slow
def test_a_model_timed_at_its_real_depth_gets_an_extrapolation_check(tmp_path: Path) -> None:
    """The ViT-B/32 path of a full run, on a tiny arch: the real depth measured whole, and
    two truncated copies (torch fp32) extrapolated to it in the same rounds."""
    from vkd.bench.real import RealSettings, arch_info, measure_encoding

    settings = RealSettings(archs=("tiny-clip",), backends=("torch-fp32", "onnx-int8"), rounds=2, b1_calls=1,
                            batch=4, full_depth_archs=("tiny-clip",), check_extrapolation=True)
    record = measure_encoding(arch_info("tiny-clip"), settings, work=tmp_path, progress=lambda message: None,
                              memory_bytes=16 * 1024**3)
    assert record["measured_at"] == "real depth"
    assert [c["layers"] for c in record["copies"]] == [{"text": 1, "vision": 1}, {"text": 2, "vision": 2},
                                                       {"text": 4, "vision": 4}]
    backends = {b["backend"]: b for b in record["backends"]}
    assert backends["torch-fp32"]["extrapolated"] is False and backends["onnx-int8"]["extrapolated"] is False
    assert set(backends["onnx-int8"]["calls"]["text_b1"]["speedup_vs_torch_fp32"]) == SPREAD
    assert backends["onnx-int8"]["model_bytes"]["value"] > 0
    check = record["extrapolation_check"]
    assert check["copies"] == [{"text": 1, "vision": 1}, {"text": 2, "vision": 2}]
    assert set(check["calls"]) <= {"image_b1", "image_b4", "text_b1", "text_b4"} and check["calls"]
    for call in check["calls"].values():
        assert set(call["error_percent"]) == SPREAD
