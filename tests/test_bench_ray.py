"""`vkd bench ray --quick`: the Ray-vs-local benchmark's code paths on a tiny model, end to end."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
from click.testing import CliRunner

pytest.importorskip("ray", reason='needs vkd[ray] (pip install "ray[data]")')

from vkd.bench.commands import bench  # noqa: E402
from vkd.bench.report import MACHINE_KEYS, read_result  # noqa: E402


@pytest.mark.slow
def test_bench_ray_quick_writes_both_figures(tmp_path: Path) -> None:
    out = tmp_path / "results"
    result = CliRunner().invoke(bench, ["ray", "--quick", "--num-cpus", "2", "--out", str(out)],
                                catch_exceptions=False)
    assert result.exit_code == 0, result.output
    data = read_result(out / "ray.json")
    assert data["benchmark"] == "ray" and data["quick"] is True and set(MACHINE_KEYS) <= set(data["machine"])
    assert data["command"].startswith("vkd bench ray --quick")
    results = data["results"]
    for figure in ("throughput", "scheduling_overhead"):
        for engine in ("local", "ray"):
            speed = results[figure][engine]["images_per_s"]
            assert speed["n"] == 1 and math.isfinite(speed["median"]) and speed["median"] > 0
        assert math.isfinite(results[figure]["ray_minus_local_seconds"]["median"])
    assert results["ray_init_seconds"] > 0 and results["encoder_actors"] >= 1
    assert "ray − local" in (out / "ray.md").read_text()
