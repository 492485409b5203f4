"""``vkd bench``: options, the source rule, the search benchmark on small corpora, summaries."""

from __future__ import annotations

import json
import math
from pathlib import Path

import click
import pytest
from bench_helpers import json_numbers
from click.testing import CliRunner

from vkd.bench.commands import bench, parse_sizes
from vkd.bench.distill import retention
from vkd.bench.report import read_result, write_result
from vkd.bench.search import SearchSettings, run_search_benchmark
from vkd.bench.source import SourceError, demo_complete, demo_layout, resolve_source
from vkd.bench.summary import publish, write_summary


def test_parse_sizes():
    assert parse_sizes("10k,100k,1M") == (10_000, 100_000, 1_000_000)
    assert parse_sizes("2500, 1.5k") == (2500, 1500)
    with pytest.raises(ValueError, match="e.g. 10k"):
        parse_sizes("ten")
    with pytest.raises(ValueError, match="whole number"):
        parse_sizes("0.5")


def test_help_lists_every_benchmark_with_an_example():
    runner = CliRunner()
    result = runner.invoke(bench, ["--help"])
    assert result.exit_code == 0
    for name in ("distill", "search", "export", "index", "step", "all"):
        assert name in result.output
    assert "vkd bench all --quick" in result.output
    for name in ("distill", "search", "export", "index", "step", "all"):
        sub = runner.invoke(bench, [name, "--help"])
        assert sub.exit_code == 0, sub.output
        assert f"vkd bench {name}" in sub.output and "--quick" in sub.output
    assert "--sizes" in runner.invoke(bench, ["search", "--help"]).output


def test_bad_sizes_are_a_usage_error(tmp_path):
    result = CliRunner().invoke(bench, ["search", "--sizes", "lots", "--out", str(tmp_path)])
    assert result.exit_code == 2 and "10k,100k,1M" in result.output


def test_full_run_without_a_demo_says_what_to_do(tmp_path, monkeypatch):
    monkeypatch.setenv("VKD_HOME", str(tmp_path / "home"))
    result = CliRunner().invoke(bench, ["distill", "--out", str(tmp_path / "out")])
    assert result.exit_code == 2
    assert "vkd demo" in result.output and "--quick" in result.output


def test_an_unfinished_demo_dir_is_an_error_even_when_quick(tmp_path):
    with pytest.raises(SourceError, match="vkd demo --out"):
        resolve_source(quick=True, out_dir=tmp_path / "out", demo_dir=tmp_path / "empty")


def test_source_needs_data_teacher_and_student_together(tmp_path):
    with pytest.raises(SourceError, match="missing --teacher, --student"):
        resolve_source(quick=False, out_dir=tmp_path, data=tmp_path / "test.jsonl")
    with pytest.raises(SourceError, match="no such pair file"):
        resolve_source(quick=False, out_dir=tmp_path, data=tmp_path / "missing.jsonl", teacher="t", student="s")


def test_given_source_links_the_test_images(tmp_path):
    from PIL import Image

    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")  # the source checks paths only; nothing is loaded
    (tmp_path / "img").mkdir()
    for name in ("a", "b"):
        Image.new("RGB", (8, 8)).save(tmp_path / "img" / f"{name}.png")
    pairs = tmp_path / "test.jsonl"
    pairs.write_text('{"image": "img/a.png", "text": ["x", "y"]}\n{"image": "img/b.png", "text": "z"}\n')
    source = resolve_source(quick=False, out_dir=tmp_path / "out", data=pairs, teacher=str(model),
                            student=str(model))
    assert source.origin == "given" and source.int8_dir is None
    linked = sorted(p.name for p in source.images_dir.iterdir())
    assert linked == ["000000.png", "000001.png"]
    assert (source.images_dir / "000000.png").resolve() == (tmp_path / "img" / "a.png").resolve()


def test_demo_layout_follows_results_json(tmp_path):
    assert not demo_complete(tmp_path)
    layout = demo_layout(tmp_path)
    assert layout["student"] == tmp_path / "student-kd" / "model"
    (tmp_path / "results.json").write_text(json.dumps({"paths": {"student": str(tmp_path / "elsewhere")}}))
    assert demo_layout(tmp_path)["student"] == tmp_path / "elsewhere"
    assert demo_layout(tmp_path)["int8"] == tmp_path / "elsewhere" / "onnx"


def test_retention_is_relative_to_the_teacher():
    teacher = {"t2i_R@1": 50.0, "i2t_R@1": 40.0}
    assert retention({"t2i_R@1": 25.0, "i2t_R@1": 20.0}, teacher) == {
        "t2i_R@1": 50.0, "i2t_R@1": 50.0, "mean_R@1": 50.0}
    assert retention({"t2i_R@1": 1.0, "i2t_R@1": 0.0}, {"t2i_R@1": 0.0, "i2t_R@1": 0.0})["mean_R@1"] is None


def test_search_benchmark_on_small_corpora(tmp_path):
    settings = SearchSettings(sizes=(1000, 2000), quality_queries=60, latency_queries=12, curve_latency_queries=6,
                              batch=8, batches=2, warmup=1, index_type="hnsw")
    result = run_search_benchmark(settings, workdir=tmp_path)
    paths = write_result(tmp_path / "out", result, command="vkd bench search", quick=True,
                         started_at="2026-01-01T00:00:00+00:00", duration_s=1.0)
    data = read_result(paths[0])
    assert data["results"]["synthetic"] is True and data["results"]["real_vectors"] is False
    assert "Synthetic vectors, not encoded images" in data["results"]["vectors"]
    assert any(note.startswith("Synthetic vectors, not encoded images") for note in data["notes"])
    markdown = (tmp_path / "out" / "search.md").read_text()
    assert "Synthetic vectors, not encoded images" in markdown
    assert [s["corpus_size"] for s in data["results"]["sizes"]] == [1000, 2000]
    for size in data["results"]["sizes"]:
        methods = {m["method"]: m for m in size["methods"]}
        for name in ("teacher exact", "student exact", "student ANN", "two-stage k1=100", "two-stage k1=1000"):
            assert name in methods
            assert "batch8" in methods[name] and methods[name]["batch8"]["qps"] > 0
        assert methods["teacher exact"]["quality"]["overlap@10"] == 100.0
        two = methods["two-stage k1=1000"]
        assert set(two["batch1"]["stages"]) == {"ann", "rerank"}
        assert two["batch1"]["end_to_end"]["n"] == 12
        assert methods["student ANN"]["index"]["kind"] == "hnsw"
        assert methods["student ANN"]["index"]["bytes_on_disk"] > 0
        # the rerank with teacher vectors recovers what the student loses
        assert two["quality"]["overlap@10"] >= methods["student exact"]["quality"]["overlap@10"]
        assert any(m["params"].get("efSearch") == 16 for m in size["methods"])  # a curve point
    found = list(json_numbers(data["results"]))
    assert len(found) > 100
    assert all(math.isfinite(value) for _, value in found), [w for w, v in found if not math.isfinite(v)]
    assert (tmp_path / "out" / "search_recall_latency.png").read_bytes()[:4] == b"\x89PNG"


def test_summary_and_publish(tmp_path):
    out = tmp_path / "results"
    out.mkdir()
    (out / "a.md").write_text("## a\n\n![plot](a.png)\n")
    (out / "a.png").write_bytes(b"\x89PNG\r\n\x1a\nfake")
    summary = write_summary(out, ["a", "missing"], command="vkd bench all", failures={"b": "ValueError: x"},
                            source="demo (/d)")
    text = summary.read_text()
    assert "Models and data: demo (/d)." in text
    assert "`vkd bench all`" in text and "## a" in text and "FAILED: ValueError: x" in text
    published = publish(out, tmp_path / "benchmarks")
    assert "![plot](figures/a.png)" in published.read_text()
    assert (tmp_path / "benchmarks" / "figures" / "a.png").is_file()
    with pytest.raises(FileNotFoundError, match="vkd bench all"):
        publish(tmp_path / "nothing", tmp_path / "x")


def test_command_line_records_non_default_options(tmp_path):
    seen = {}

    @click.command()
    @click.option("--quick", is_flag=True)
    @click.option("--out", type=click.Path(path_type=Path), default=Path("results"))
    @click.option("--sizes", default=None)
    def probe(**options):
        from vkd.bench.commands import command_line

        seen["line"] = command_line(click.get_current_context())

    CliRunner().invoke(probe, ["--quick", "--out", str(tmp_path)], prog_name="vkd bench search")
    assert seen["line"] == f"vkd bench search --quick --out {tmp_path}"
    CliRunner().invoke(probe, [], prog_name="vkd bench search")
    assert seen["line"] == "vkd bench search"  # defaults are not repeated, a flag left off is not shown
    CliRunner().invoke(probe, ["--out", "results"], prog_name="bench all")
    assert seen["line"] == "vkd bench all --out results"


def test_run_all_publishes_from_the_out_given_either_way():
    import importlib.util

    from vkd.bench.commands import DEFAULT_OUT

    script = Path(__file__).resolve().parents[1] / "benchmarks" / "run_all.py"
    spec = importlib.util.spec_from_file_location("run_all", script)
    run_all = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(run_all)
    assert run_all.out_dir(["--sizes", "10000"]) == Path(DEFAULT_OUT)
    assert run_all.out_dir(["--out", "r1"]) == Path("r1")
    # `--out=DIR` is what click also accepts; publishing from DEFAULT_OUT then would copy a stale run
    assert run_all.out_dir(["--out=r2", "--threads", "2"]) == Path("r2")
