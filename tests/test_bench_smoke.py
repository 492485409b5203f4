"""``vkd bench all --quick`` from nothing: it builds a quick demo and writes every result.

Checks that the files are there and well-formed (schema keys, finite numbers, real PNGs),
not how fast anything was.
"""

from __future__ import annotations

import json
import math

import pytest
from bench_helpers import json_numbers
from click.testing import CliRunner

from vkd.bench.commands import BENCHMARKS, SELF_CONTAINED, bench
from vkd.bench.report import MACHINE_KEYS, REQUIRED_KEYS, read_result
from vkd.bench.source import QUICK_DEMO

# keys each benchmark's "results" must hold
RESULT_KEYS = {
    "distill": ("models", "test_images", "test_texts", "repeats"),
    "search": ("vectors", "synthetic", "sizes", "encode", "real_index", "settings"),
    "export": ("variants", "exports", "test_images", "repeats"),
    "index": ("encoder_images_per_s", "indexer_images_per_s", "peak_rss_bytes", "incremental_rerun_seconds"),
    "step": ("configs", "steps", "batch_size"),
    "real": ("encoding", "end_to_end", "indexing", "random_weights"),
}


@pytest.mark.slow
def test_bench_all_quick_from_nothing(tmp_path, monkeypatch):
    from PIL import Image

    monkeypatch.setenv("VKD_HOME", str(tmp_path / "home"))  # no demo there: the run must build one
    out = tmp_path / "results"
    result = CliRunner().invoke(bench, ["all", "--quick", "--out", str(out)], catch_exceptions=False)
    assert result.exit_code == 0, result.output

    for name in BENCHMARKS:
        data = read_result(out / f"{name}.json")  # checks the common keys
        assert set(REQUIRED_KEYS) <= set(data) and set(MACHINE_KEYS) <= set(data["machine"])
        assert data["benchmark"] == name and data["quick"] is True
        assert data["command"].startswith("vkd bench all --quick")
        if name not in SELF_CONTAINED:  # `real` builds its own random models
            assert data["results"]["source"]["origin"] == QUICK_DEMO
        for key in RESULT_KEYS[name]:
            assert key in data["results"], f"{name}.json lacks results.{key}"
        found = list(json_numbers(data["results"], name))
        assert found, f"{name}.json holds no figures"
        bad = [where for where, value in found if not math.isfinite(value)]
        assert not bad, bad
        json.loads((out / f"{name}.json").read_text(), parse_constant=lambda c, n=name: pytest.fail(f"{n}: {c}"))
        markdown = (out / f"{name}.md").read_text()
        assert markdown.startswith(f"## {name} (quick)") and ("---: |" in markdown or ":--- |" in markdown)
        for figure in data["figures"]:
            with Image.open(out / figure) as image:
                assert image.format == "PNG" and image.width > 100 and image.height > 100

    search = read_result(out / "search.json")["results"]
    assert search["synthetic"] is True and "Synthetic vectors" in search["vectors"]
    assert "Synthetic vectors" in (out / "search.md").read_text()
    assert [size["corpus_size"] for size in search["sizes"]] == [10_000]
    distill = read_result(out / "distill.json")["results"]
    assert [m["model"] for m in distill["models"]] == [
        "teacher", "student raw", "student CE-only", "student distilled", "student distilled INT8"]
    summary = (out / "RESULTS.md").read_text()
    for name in BENCHMARKS:
        assert f"## {name} (quick)" in summary
