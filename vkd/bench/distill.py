"""Distillation benchmark: what the teacher knows, and how much of it each student keeps.

Teacher, student before training (raw), student trained on the contrastive loss alone
(CE-only), distilled student, and the distilled student's ONNX INT8 copy all encode the
same held-out split. Reported per model: Recall@1/5/10 in both directions and rsum,
parameters, encode latency (ms per image, ms per query), and retention: the model's R@1 as
a percentage of the teacher's R@1 measured in the same run.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from vkd.bench.encoders import encode_latency, encode_split, load_split, onnx_bytes, parameter_count, recall
from vkd.bench.report import BenchResult, Figure, markdown_table, ort_threads
from vkd.bench.timing import format_spread

ROLES = ("teacher", "student raw", "student CE-only", "student distilled", "student distilled INT8")


@dataclass
class DistillSettings:
    batch: int = 32
    repeats: int = 30
    batch_repeats: int = 8
    warmup: int = 2
    max_images: int | None = None
    rounds: int = 5

    @classmethod
    def quick(cls) -> DistillSettings:
        return cls(repeats=10, batch_repeats=3, warmup=1, max_images=200, rounds=3)


def retention(model: Mapping[str, float], teacher: Mapping[str, float]) -> dict[str, float | None]:
    """R@1 of ``model`` as a percentage of the teacher's, per direction and averaged.

    None where the teacher's R@1 is 0 (a ratio to nothing is not a retention).
    """
    out: dict[str, float | None] = {}
    for key in ("t2i_R@1", "i2t_R@1"):
        out[key] = 100.0 * model[key] / teacher[key] if teacher[key] > 0 else None
    both = teacher["t2i_R@1"] + teacher["i2t_R@1"]
    out["mean_R@1"] = 100.0 * (model["t2i_R@1"] + model["i2t_R@1"]) / both if both > 0 else None
    return out


def open_model(path: str, *, int8: bool = False) -> Any:
    """A torch fp32 encoder on the CPU, or the INT8 ONNX encoder of an export directory."""
    if int8:
        from vkd.export import OnnxEncoder

        return OnnxEncoder(path, precision="int8", threads=ort_threads())
    from vkd.models import load_encoder

    return load_encoder(path, device="cpu", dtype="float32", prefer="torch")


def run_distill_benchmark(
    models: Mapping[str, str | os.PathLike[str] | None],
    test_pairs: str | os.PathLike[str],
    *,
    settings: DistillSettings | None = None,
    progress: Callable[[str], None] = lambda message: None,
) -> BenchResult:
    """``models`` maps each of ``ROLES`` to a model directory (the INT8 role: an ONNX export
    directory); a role that is missing or None is left out, with a note. The teacher is required."""
    settings = settings or DistillSettings()
    unknown = sorted(set(models) - set(ROLES))
    if unknown:
        raise ValueError(f"unknown model roles {unknown}; expected some of {list(ROLES)}")
    if not models.get("teacher"):
        raise ValueError("the distill benchmark needs the teacher: retention is measured against it")
    progress("distill: decoding the test split")
    split = load_split(test_pairs, max_images=settings.max_images)
    notes = [f"Left out: {role} (no model given)." for role in ROLES if not models.get(role)]
    rows: list[dict[str, Any]] = []
    for role in ROLES:
        path = models.get(role)
        if not path:
            continue
        progress(f"distill: measuring {role}")
        encoder = open_model(str(path), int8=role.endswith("INT8"))
        image_vectors, text_vectors = encode_split(encoder, split, batch_size=settings.batch)
        rows.append({
            "model": role,
            "path": str(path),
            "dim": int(encoder.dim),
            "params": parameter_count(encoder),
            "onnx_bytes": onnx_bytes(encoder),
            "recall": recall(image_vectors, text_vectors, split),
            "latency": encode_latency(encoder, split, batch=settings.batch, repeats=settings.repeats,
                                      batch_repeats=settings.batch_repeats, warmup=settings.warmup,
                                      rounds=settings.rounds),
        })
    teacher = rows[0]["recall"]
    for row in rows:
        row["retention_vs_teacher"] = retention(row["recall"], teacher)
    int8 = next((r for r in rows if r["model"] == "student distilled INT8"), None)
    distilled = next((r for r in rows if r["model"] == "student distilled"), None)
    if int8 is not None and distilled is not None and int8["params"] is None:
        # the INT8 file holds the distilled weights, quantised: the same parameters
        int8["params"] = distilled["params"]
        int8["params_from"] = "student distilled (INT8 is its quantised copy)"
    results = {
        "test_pairs": str(test_pairs),
        "test_images": split.n_images,
        "test_texts": len(split.texts),
        "batch": settings.batch,
        "repeats": {"batch1": settings.repeats, f"batch{settings.batch}": settings.batch_repeats,
                    "warmup": settings.warmup, "rounds": settings.rounds},
        "models": rows,
    }
    return BenchResult("distill", results, markdown(results), notes=notes, figures=[recall_figure(results)])


def markdown(results: dict[str, Any]) -> str:
    b = results["batch"]
    rows = []
    for row in results["models"]:
        r, lat, keep = row["recall"], row["latency"], row["retention_vs_teacher"]
        rows.append([
            row["model"], r["t2i_R@1"], r["t2i_R@5"], r["t2i_R@10"], r["i2t_R@1"], r["i2t_R@5"], r["i2t_R@10"],
            r["rsum"], keep["mean_R@1"], row["params"], row["dim"],
            format_spread(lat["image"]["rounds"]["batch1_ms"]),
            format_spread(lat["image"]["rounds"][f"batch{b}_ms_per_item"]),
            format_spread(lat["text"]["rounds"]["batch1_ms"]),
        ])
    return "\n".join([
        f"Held-out split: {results['test_images']} images, {results['test_texts']} captions "
        f"({results['test_pairs']}). Recall in percent; retention = R@1 (mean of both directions) as a "
        f"percentage of the teacher's. Encode latency: p50 at batch 1, and per image at batch {b}, each the "
        f"median over {results['repeats'].get('rounds', 1)} rounds (min–max).",
        "",
        markdown_table(
            ["model", "t2i R@1", "t2i R@5", "t2i R@10", "i2t R@1", "i2t R@5", "i2t R@10", "rsum",
             "retention %", "params", "dim", "ms/img b1", f"ms/img b{b}", "ms/query b1"],
            rows, align=["l"] + ["r"] * 13,
        ),
    ])


def recall_figure(results: dict[str, Any]) -> Figure:
    def draw(fig: Any) -> None:
        ax = fig.subplots()
        models = results["models"]
        names = [m["model"].replace("student ", "") for m in models]
        width = 0.38
        positions = range(len(models))
        for offset, key, label in ((-width / 2, "t2i_R@1", "text→image R@1"),
                                   (width / 2, "i2t_R@1", "image→text R@1")):
            ax.bar([p + offset for p in positions], [m["recall"][key] for m in models], width, label=label)
        ax.set_xticks(list(positions))
        ax.set_xticklabels(names, rotation=15, fontsize=8)
        ax.set_ylabel("Recall@1 (%)")
        ax.set_title("Recall@1 on the held-out split")
        ax.legend(fontsize=8)
        ax.grid(True, axis="y", alpha=0.3)

    return Figure("distill_recall.png", draw)
