"""Distillation step benchmark: seconds per training step in three configurations.

CE only (no teacher), KD with a warm teacher cache (the teacher's embeddings are looked
up), KD without the cache (the teacher runs a forward pass every step). ``bench_distill_step``
measures — same student, teacher(s), batches and optimiser settings in all three; only the
loss and where the teacher's embeddings come from differ — and ``run_step_benchmark``
reports it.

Batches are prepared before the clock starts, so the figures are the step itself (student
forward/backward, teacher forward or cache lookup, loss, gradient sync, optimiser), not
image decoding, which DataLoader workers overlap with training. The goal it checks is
``kd_cached_over_ce <= 1.15``.
"""

from __future__ import annotations

import gc
import itertools
import os
import statistics
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from vkd.bench.report import BenchResult, markdown_table
from vkd.bench.timing import format_ratio, format_spread, latency_summary, ratio_spread, spread

if TYPE_CHECKING:
    from vkd.distill.trainer import Trainer

MODES = ("ce_only", "kd_cached", "kd_uncached")
LABELS = {"ce_only": "CE only", "kd_cached": "KD, teacher cache", "kd_uncached": "KD, no teacher cache"}


@dataclass
class StepSettings:
    steps: int = 20
    warmup: int = 3
    batch_size: int = 32
    #: whole runs of the three configurations; ratios are taken within each
    repeats: int = 5

    @classmethod
    def quick(cls) -> StepSettings:
        return cls(steps=5, warmup=1, batch_size=16, repeats=2)


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
    settings = settings or StepSettings()
    progress(f"step: {settings.repeats} repetition(s) of {settings.steps} timed steps (+{settings.warmup} warm-up) "
             f"of batch {settings.batch_size} in each configuration")
    # each repetition runs the three configurations back to back, so the ratio of a
    # repetition compares steps taken minutes apart at most, never across runs
    runs = []
    for repetition in range(settings.repeats):
        progress(f"step: repetition {repetition + 1}/{settings.repeats}")
        runs.append(bench_distill_step(student, teacher, pairs=train_pairs, batch_size=settings.batch_size,
                                       steps=settings.steps, warmup=settings.warmup, work_dir=workdir))
    measured = runs[0]
    pooled = {mode: [t for run in runs for t in run["per_step_s"][mode]] for mode in MODES}
    rep_means = {mode: [run[f"{mode}_s"] for run in runs] for mode in MODES}
    configs = []
    for mode in MODES:
        ratio = ratio_spread(rep_means[mode], rep_means["ce_only"])
        configs.append({
            "config": LABELS[mode],
            "mode": mode,
            "mean_s": statistics.fmean(pooled[mode]),
            "median_s": statistics.median(pooled[mode]),
            "per_step": latency_summary(pooled[mode]),
            "repetition_mean_s": spread(rep_means[mode]),
            "over_ce_only": ratio["median"],
            "over_ce_only_spread": ratio,
            "teacher_rows_embedded": measured["teacher_rows"].get(mode, 0),
        })
    by_mode = {c["mode"]: c for c in configs}
    results = {
        "student": measured["student"],
        "teachers": measured["teachers"],
        "train_pairs": str(train_pairs),
        "device": measured["device"],
        "batch_size": measured["batch_size"],
        "steps": measured["steps"],
        "warmup": measured["warmup"],
        "repeats": settings.repeats,
        "kd_types": measured["kd_types"],
        "use_lora": measured["use_lora"],
        "configs": configs,
        "kd_cached_over_ce": by_mode["kd_cached"]["over_ce_only"],
        "kd_cached_over_ce_spread": by_mode["kd_cached"]["over_ce_only_spread"],
        "kd_uncached_over_ce": by_mode["kd_uncached"]["over_ce_only"],
        "kd_uncached_over_ce_spread": by_mode["kd_uncached"]["over_ce_only_spread"],
        "per_step_s": pooled,
        "per_repetition_step_s": {mode: [run["per_step_s"][mode] for run in runs] for mode in MODES},
    }
    return BenchResult("step", results, markdown(results))


def markdown(results: dict[str, Any]) -> str:
    rows = [[c["config"], format_spread(c.get("repetition_mean_s")) or c["mean_s"], c["median_s"],
             c["per_step"]["p95_ms"] / 1000.0,
             "1" if c["mode"] == "ce_only" else format_ratio(c.get("over_ce_only_spread")) or c["over_ce_only"],
             c["teacher_rows_embedded"]] for c in results["configs"]]
    repeats = results.get("repeats", 1)
    return "\n".join([
        f"Seconds per training step on {results['device']}: batch {results['batch_size']}, "
        f"{results['steps']} timed steps after {results['warmup']} warm-up, KD losses "
        f"{', '.join(results['kd_types'])}, LoRA {'on' if results['use_lora'] else 'off'}. Batches are prepared "
        "before the clock starts; the cached run's cache was filled beforehand (as after a first epoch). "
        f"{repeats} repetitions, each running the three configurations back to back: mean s/step is the median of "
        "the repetitions' means (min–max); × CE only is the ratio of means within each repetition, its median "
        "(min–max; 'within spread' when the range includes 1); median and p95 pool every step.",
        "",
        markdown_table(["configuration", "mean s/step", "median s/step", "p95 s/step", "× CE only",
                        "teacher rows embedded"], rows, align=["l", "r", "r", "r", "r", "r"]),
    ])


# ---------------------------------------------------------------- the measurement


def bench_distill_step(
    student: str | os.PathLike[str],
    teacher: str | os.PathLike[str] | Sequence[str | os.PathLike[str]],
    *,
    pairs: str | os.PathLike[str] | None = None,
    batch_size: int = 32,
    steps: int = 10,
    warmup: int = 2,
    kd_types: Sequence[str] = ("kl_divergence", "feature_mse"),
    use_lora: bool = True,
    work_dir: str | os.PathLike[str] | None = None,
    **config: Any,
) -> dict[str, Any]:
    """Time ``steps`` training steps (after ``warmup`` untimed ones) in each mode of ``MODES``.

    ``pairs``: a pair file; without one, synthetic scenes enough for the steps are generated.
    Extra keyword arguments are ``DistillConfig`` keys (``mixed_precision``, ``lora_r`` ...).
    Returns seconds per step (mean, median and each step) per mode, the two ratios
    ``kd_cached_over_ce`` and ``kd_uncached_over_ce`` (means), and ``teacher_rows``: how many
    rows each mode's teacher embedded while timed.
    """
    import torch

    from vkd.config import DistillConfig
    from vkd.distill.trainer import Trainer

    teachers = [str(teacher)] if isinstance(teacher, (str, os.PathLike)) else [str(t) for t in teacher]
    with tempfile.TemporaryDirectory(prefix="vkd-bench-distill-", dir=work_dir) as scratch:
        root = Path(scratch)
        if pairs is None:
            from vkd.data.synth import generate

            # ~3 captions per scene: enough rows for every batch without repeating an epoch
            generate(root / "scenes", max(8, (warmup + steps) * batch_size // 2), seed=0, size=64,
                     val_frac=0.0, test_frac=0.0)
            pairs = root / "scenes" / "train.jsonl"
        base = {"model_name_or_path": str(student), "data_path": str(pairs), "batch_size": batch_size,
                "use_lora": use_lora, "eval_strategy": "no", "logging_steps": 10**6, **config}
        kd = {"teacher_model_name_or_path": teachers, "distillation_loss_type": list(kd_types)}
        settings = {
            "ce_only": {"use_distillation": False},
            "kd_cached": {**kd, "teacher_cache": True},
            "kd_uncached": {**kd, "teacher_cache": False},
        }
        seconds: dict[str, list[float]] = {}
        teacher_rows: dict[str, int] = {}
        device = "cpu"
        for mode in MODES:
            values = {**base, **settings[mode], "output_dir": str(root / mode)}
            trainer = Trainer(DistillConfig.from_dict(values))
            device = str(trainer.device)
            batches = _batches(trainer, warmup + steps)
            if mode == "kd_cached":
                for batch in batches:  # the first epoch's work: fill the cache
                    trainer.teacher_outputs(batch)
                trainer.flush_teacher_caches()
                batches = _batches(trainer, warmup + steps)  # prepared against the warm cache
            before = sum(t.forward_rows for t in trainer.teachers)
            seconds[mode] = _time_steps(trainer, batches)[warmup:]
            teacher_rows[mode] = sum(t.forward_rows for t in trainer.teachers) - before
            del trainer, batches
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()

    means = {mode: statistics.fmean(values) for mode, values in seconds.items()}
    return {
        "student": str(student),
        "teachers": teachers,
        "device": device,
        "batch_size": batch_size,
        "steps": steps,
        "warmup": warmup,
        "kd_types": list(kd_types),
        "use_lora": use_lora,
        **{f"{mode}_s": means[mode] for mode in MODES},
        **{f"{mode}_median_s": statistics.median(seconds[mode]) for mode in MODES},
        "kd_cached_over_ce": means["kd_cached"] / means["ce_only"],
        "kd_uncached_over_ce": means["kd_uncached"] / means["ce_only"],
        "per_step_s": seconds,
        # rows the teacher embedded during the timed steps: 0 for kd_cached (the cache answered)
        "teacher_rows": teacher_rows,
    }


def _batches(trainer: Trainer, count: int) -> list[dict[str, Any]]:
    loaders = (trainer.epoch_loader(epoch) for epoch in itertools.count())
    return list(itertools.islice(itertools.chain.from_iterable(loaders), count))


def _time_steps(trainer: Trainer, batches: list[dict[str, Any]]) -> list[float]:
    import torch

    cuda = trainer.device.type == "cuda"
    seconds = []
    for batch in batches:
        if cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        trainer.train_step(batch)
        if cuda:
            torch.cuda.synchronize()
        seconds.append(time.perf_counter() - start)
    return seconds
