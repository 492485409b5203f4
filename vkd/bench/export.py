"""Export benchmark: the student as torch fp32, ONNX fp32, ONNX INT8 dynamic and static.

The student is exported twice into a scratch folder with ``vkd.export.export_onnx``
(dynamic INT8; static INT8 calibrated on the training split, never on the test split),
then every variant encodes the same held-out images and captions: latency at batch 1 and
32, cosine of each vector to the torch vector of the same input, and Recall@1 with its
change from torch.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vkd.bench.encoders import (
    encode_latency_rounds,
    encode_split,
    load_split,
    onnx_bytes,
    parameter_count,
    recall,
    row_cosines,
    speedups,
)
from vkd.bench.report import BenchResult, markdown_table, ort_threads
from vkd.bench.timing import MIB, format_ratio, format_spread


@dataclass
class ExportSettings:
    batch: int = 32
    repeats: int = 50
    batch_repeats: int = 10
    warmup: int = 3
    max_images: int | None = None
    calibration_size: int = 64
    rounds: int = 5

    @classmethod
    def quick(cls) -> ExportSettings:
        return cls(repeats=15, batch_repeats=4, warmup=2, max_images=200, calibration_size=32, rounds=3)


def _export(student: str, out: Path, mode: str, calibration: str | None, size: int) -> tuple[Any, float]:
    from vkd.export import export_onnx

    start = time.perf_counter()
    result = export_onnx(student, out, int8=mode, calibration=calibration, calibration_size=size)
    return result, time.perf_counter() - start


def run_export_benchmark(
    student: str | os.PathLike[str],
    test_pairs: str | os.PathLike[str],
    *,
    workdir: str | os.PathLike[str],
    calibration_pairs: str | os.PathLike[str] | None = None,
    settings: ExportSettings | None = None,
    progress: Callable[[str], None] = lambda message: None,
) -> BenchResult:
    """Measure every variant of ``student`` on ``test_pairs``; exports go under ``workdir``."""
    from vkd.export import ExportError, OnnxEncoder
    from vkd.models import load_encoder

    settings = settings or ExportSettings()
    student = str(student)
    work = Path(workdir)
    work.mkdir(parents=True, exist_ok=True)
    notes: list[str] = []
    progress("export: decoding the test split")
    split = load_split(test_pairs, max_images=settings.max_images)

    exports: dict[str, dict[str, Any]] = {}
    progress("export: ONNX fp32 + dynamic INT8")
    dynamic, seconds = _export(student, work / "onnx-dynamic", "dynamic", None, settings.calibration_size)
    exports["dynamic"] = {"dir": str(dynamic.out_dir), "export_s": seconds, "parity": dynamic.parity}
    static_dir = None
    if calibration_pairs is None:
        notes.append("No calibration pairs were given, so static INT8 was not measured.")
    else:
        progress("export: static INT8 (calibrated on the training split)")
        try:
            static, seconds = _export(student, work / "onnx-static", "static", str(calibration_pairs),
                                      settings.calibration_size)
            exports["static"] = {"dir": str(static.out_dir), "export_s": seconds, "parity": static.parity,
                                 "calibration": str(calibration_pairs)}
            static_dir = static.out_dir
        except ExportError as error:
            # a failed parity check is a finding, not a crash: report it
            exports["static"] = {"error": str(error), "calibration": str(calibration_pairs)}
            notes.append(f"Static INT8 failed its parity check and was not timed: {error}")

    threads = ort_threads()
    variants: list[tuple[str, Callable[[], Any]]] = [
        ("torch fp32", lambda: load_encoder(student, device="cpu", dtype="float32", prefer="torch")),
        ("onnx fp32", lambda: OnnxEncoder(dynamic.out_dir, precision="fp32", threads=threads)),
        ("onnx int8 dynamic", lambda: OnnxEncoder(dynamic.out_dir, precision="int8", threads=threads)),
    ]
    if static_dir is not None:
        variants.append(("onnx int8 static", lambda: OnnxEncoder(static_dir, precision="int8", threads=threads)))

    rows: list[dict[str, Any]] = []
    reference: tuple[Any, Any] | None = None
    encoders: dict[str, Any] = {}
    for name, make in variants:
        progress(f"export: encoding the split with {name}")
        encoder = encoders[name] = make()
        image_vectors, text_vectors = encode_split(encoder, split, batch_size=settings.batch)
        if reference is None:
            reference = (image_vectors, text_vectors)
        rows.append({
            "variant": name,
            "params": parameter_count(encoder),
            "model_bytes": onnx_bytes(encoder),
            "cosine_vs_torch": {"image": row_cosines(reference[0], image_vectors),
                                "text": row_cosines(reference[1], text_vectors)},
            "recall": recall(image_vectors, text_vectors, split),
        })
    # every variant in the same interleaved rounds: speed-ups are ratios within a round
    progress(f"export: latency of {len(encoders)} variants in {settings.rounds} interleaved rounds")
    latency = encode_latency_rounds(encoders, split, batch=settings.batch, repeats=settings.repeats,
                                    batch_repeats=settings.batch_repeats, warmup=settings.warmup,
                                    rounds=settings.rounds)
    for row in rows:
        row["latency"] = latency[row["variant"]]
        row["speedup_vs_torch"] = speedups(latency[rows[0]["variant"]], row["latency"])
    base = rows[0]["recall"]
    for row in rows:
        row["recall_delta_vs_torch"] = {key: row["recall"][key] - base[key]
                                        for key in ("t2i_R@1", "i2t_R@1", "rsum")}
    results = {
        "student": student,
        "test_pairs": str(test_pairs),
        "test_images": split.n_images,
        "test_texts": len(split.texts),
        "batch": settings.batch,
        "repeats": {"batch1": settings.repeats, f"batch{settings.batch}": settings.batch_repeats,
                    "warmup": settings.warmup, "rounds": settings.rounds},
        "onnxruntime_threads": threads,
        "exports": exports,
        "variants": rows,
    }
    return BenchResult("export", results, markdown(results), notes=notes)


def markdown(results: dict[str, Any]) -> str:
    b = results["batch"]
    table_rows = []
    for row in results["variants"]:
        lat, cos, rec, delta = row["latency"], row["cosine_vs_torch"], row["recall"], row["recall_delta_vs_torch"]
        speed = row.get("speedup_vs_torch") or {}
        first = row is results["variants"][0]
        table_rows.append([
            row["variant"], row["model_bytes"] / MIB if row["model_bytes"] is not None else None,
            *(format_spread(lat[kind]["rounds"][key], digits=3) for kind in ("image", "text")
              for key in ("batch1_ms", f"batch{b}_ms_per_item")),
            "1" if first else format_ratio(speed.get("text_b1")),
            "1" if first else format_ratio(speed.get(f"image_b{b}")),
            *(f"{cos[kind][stat]:.6f}" for kind in ("image", "text") for stat in ("mean", "min")),
            rec["t2i_R@1"], delta["t2i_R@1"], rec["i2t_R@1"], delta["i2t_R@1"],
        ])
    rounds = results["repeats"].get("rounds", 1)
    return "\n".join([
        f"Student `{results['student']}` on {results['test_images']} held-out images / "
        f"{results['test_texts']} captions. Latency: per item at batch 1, and per batch of {b} divided by its "
        f"size; every variant is timed in the same {rounds} interleaved rounds, and each cell is the median of the "
        "rounds' p50 (min–max over rounds). × torch: speed-up over torch fp32 within each round (median, "
        "min–max; 'within spread' when the range includes 1). Cosine: each vector against the torch fp32 vector of "
        "the same input. ΔR@1: change from torch fp32 in percentage points.",
        "",
        markdown_table(
            ["variant", "ONNX MiB", "image ms b1", f"image ms/img b{b}", "query ms b1", f"query ms/q b{b}",
             "× torch query b1", f"× torch image b{b}",
             "cos image mean", "cos image min", "cos text mean", "cos text min",
             "t2i R@1", "Δ t2i R@1", "i2t R@1", "Δ i2t R@1"],
            table_rows, digits=4, align=["l"] + ["r"] * 15,
        ),
    ])
