"""The step benchmark's measurement (vkd.bench.step): three modes, same batches, warm cache."""

from __future__ import annotations

from pathlib import Path

from vkd.bench.step import MODES, bench_distill_step


def test_bench_distill_step_times_three_modes(tmp_path: Path, tiny_clip: Path, tiny_clip_teacher: Path) -> None:
    result = bench_distill_step(tiny_clip, tiny_clip_teacher, batch_size=8, steps=2, warmup=1, work_dir=tmp_path)
    for mode in MODES:
        assert len(result["per_step_s"][mode]) == 2 and result[f"{mode}_s"] > 0
    assert result["kd_cached_over_ce"] == result["kd_cached_s"] / result["ce_only_s"]
    # the cached mode's timed steps never ran the teacher; the uncached one ran it on every row
    assert result["teacher_rows"] == {"ce_only": 0, "kd_cached": 0, "kd_uncached": 3 * 8}
    assert list(tmp_path.iterdir()) == []  # its scratch directory is gone
