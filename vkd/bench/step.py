"""Distillation step benchmark: seconds per training step in three configurations.

CE only (no teacher), KD with a warm teacher cache (the teacher's embeddings are looked
up), KD without the cache (the teacher runs a forward pass every step). The measuring is
``vkd.distill.benchmark.bench_distill_step`` — same student, teacher, batches and optimiser
in all three, batches prepared before the clock starts — and this module reports it.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from vkd.bench.report import BenchResult, markdown_table
from vkd.bench.timing import latency_summary

LABELS = {"ce_only": "CE only", "kd_cached": "KD, teacher cache", "kd_uncached": "KD, no teacher cache"}


@dataclass
class StepSettings:
    steps: int = 20
    warmup: int = 3
    batch_size: int = 32

    @classmethod
    def quick(cls) -> StepSettings:
        return cls(steps=5, warmup=1, batch_size=16)


def run_step_benchmark(
    student: str | os.PathLike[str],
    teacher: str | os.PathLike[str],
    train_pairs: str | os.PathLike[str],
    *,
    workdir: str | os.PathLike[str],
    settings: StepSettings | None = None,
    progress: Callable[[str], None] = lambda message: None,
) -> BenchResult:
    """Time distillation steps of ``student`` (LoRA, as ``vkd distill`` trains) from ``teacher``."""
    from vkd.distill.benchmark import MODES, bench_distill_step

    settings = settings or StepSettings()
    progress(f"step: {settings.steps} timed steps (+{settings.warmup} warm-up) of batch {settings.batch_size} "
             "in each configuration")
    measured = bench_distill_step(student, teacher, pairs=train_pairs, batch_size=settings.batch_size,
                                  steps=settings.steps, warmup=settings.warmup, work_dir=workdir)
    ce_mean = measured["ce_only_s"]
    configs = []
    for mode in MODES:
        per_step = measured["per_step_s"][mode]
        configs.append({
            "config": LABELS[mode],
            "mode": mode,
            "mean_s": measured[f"{mode}_s"],
            "median_s": measured[f"{mode}_median_s"],
            "per_step": latency_summary(per_step),
            "over_ce_only": measured[f"{mode}_s"] / ce_mean,
            "teacher_rows_embedded": measured["teacher_rows"].get(mode, 0),
        })
    results = {
        "student": measured["student"],
        "teachers": measured["teachers"],
        "train_pairs": str(train_pairs),
        "device": measured["device"],
        "batch_size": measured["batch_size"],
        "steps": measured["steps"],
        "warmup": measured["warmup"],
        "kd_types": measured["kd_types"],
        "use_lora": measured["use_lora"],
        "configs": configs,
        "kd_cached_over_ce": measured["kd_cached_over_ce"],
        "kd_uncached_over_ce": measured["kd_uncached_over_ce"],
        "per_step_s": measured["per_step_s"],
    }
    return BenchResult("step", results, markdown(results))


def markdown(results: dict[str, Any]) -> str:
    rows = [[c["config"], c["mean_s"], c["median_s"], c["per_step"]["p95_ms"] / 1000.0, c["over_ce_only"],
             c["teacher_rows_embedded"]] for c in results["configs"]]
    return "\n".join([
        f"Seconds per training step on {results['device']}: batch {results['batch_size']}, "
        f"{results['steps']} timed steps after {results['warmup']} warm-up, KD losses "
        f"{', '.join(results['kd_types'])}, LoRA {'on' if results['use_lora'] else 'off'}. Batches are prepared "
        "before the clock starts; the cached run's cache was filled beforehand (as after a first epoch).",
        "",
        markdown_table(["configuration", "mean s/step", "median s/step", "p95 s/step", "× CE only",
                        "teacher rows embedded"], rows),
    ])
