"""Search-mode benchmark: two-stage vs student-query vs student-index, and which to use.

Two parts, one table each, then ``recommend_mode`` at 10k, 1M and 100M images:

* **demo** (trained weights): the demo's student is distilled further for both asymmetric modes
  (``train_modes``, LoRA) against the demo teacher on the demo's training pairs, with the mode
  loss settings (weights, temperature, the projection's learning rate) chosen on the
  validation split by a small kept sweep (``sweep_modes``: one knob at a time from the defaults,
  every trial in ``sweep.json``); the held-out test images are indexed with teacher and
  projected vectors; every test caption is searched in each mode through ``Retriever``. Quality: overlap@10 with the teacher-only ranking (teacher text vs
  teacher image vectors, exact) and R@1 (the caption's own image first). Costs: a query's median
  wall time per mode (batch 1), and per image the image towers each mode's index needs.
* **real shapes** (random weights, ``vkd model random``): costs only, at the real architectures
  (default ViT-B/32 student → ViT-L/14 teacher): image ms per image (batch ``batch``), query ms
  (batch 1), the projection's matrix product, a FAISS HNSW search at the student's dimension (the
  student ANN) and at the teacher ANN's (its Matryoshka prefix where the teacher has one), and
  student-query's exact scan per row at the teacher's dimension (float16, as stored; ``--scan``).

Every timing is a median over ``repeats`` calls after a warm-up, on whatever threads the
libraries use (``vkd bench --threads``).
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from vkd.bench.report import BenchResult, markdown_table
from vkd.indexer.faiss_index import teacher_ann_dim

SCALES = (10_000, 1_000_000, 100_000_000)
#: the mode loss settings the sweep tries, one knob at a time from the config's defaults, in this order
#: (temperature and the KL to the teacher's ranking first: they change what the modes are trained for)
SWEEP: dict[str, tuple[float, ...]] = {
    "mode_temperature": (0.5, 2.0),
    "mode_kd_weight": (1.0, 4.0),
    "mode_alignment_weight": (2.0,),
    "mode_contrastive_weight": (0.0,),
    "projection_lr_scale": (5.0,),
    "distillation_weight": (0.8,),  # the KD terms (the modes' among them) against the student's own InfoNCE
}


@dataclass
class ModesSettings:
    #: distillation for the modes (on top of the demo's distilled student)
    epochs: int = 5
    batch_size: int = 32
    learning_rate: float = 1e-3
    #: captions searched per mode (quality) and timed (cost)
    max_queries: int = 500
    timed_queries: int = 50
    repeats: int = 5
    #: real shapes: archs of `vkd model random`; None skips the part
    real_student: str | None = "clip-vit-b32"
    real_teacher: str | None = "clip-vit-l14"
    real_images: int = 32
    batch: int = 32
    scan_rows: int = 1_000_000
    ann_rows: int = 100_000
    #: the recommendation's inputs besides the measured ones
    queries_per_s: float = 10.0
    cores: float = 2.0
    horizon_days: float = 30.0
    min_quality: float = 0.9
    scales: tuple[int, ...] = SCALES
    #: the mode loss settings tried on the validation split (empty: the config's defaults), each trial
    #: distilled for ``sweep_epochs`` (a ranking of settings, not the final model, which gets ``epochs``)
    sweep: dict[str, tuple[float, ...]] = field(default_factory=lambda: dict(SWEEP))
    sweep_epochs: int = 1
    notes: list[str] = field(default_factory=list)

    @classmethod
    def quick(cls) -> ModesSettings:
        return cls(epochs=1, max_queries=40, timed_queries=8, repeats=2, real_student="tiny-clip",
                   real_teacher="tiny-clip", real_images=8, batch=8, scan_rows=20_000, ann_rows=5_000,
                   sweep={"mode_kd_weight": (1.0,)}, sweep_epochs=1)


def _median_s(fn: Callable[[], Any], repeats: int) -> float:
    from vkd.bench.timing import time_calls

    timing = time_calls(fn, repeats=repeats, warmup=1)
    return float(np.median(timing.seconds))


# ---------------------------------------------------------------- demo: quality and costs


def distill_for_modes(student: str, teacher: str, train_pairs: Path, val_pairs: Path | None, out: Path,
                      settings: ModesSettings, overrides: Mapping[str, float] | None = None) -> dict[str, Any]:
    """A student distilled for both asymmetric modes with the mode loss settings ``overrides``
    (reused when ``out`` holds a finished run of the same settings)."""
    import json

    from vkd.config import DistillConfig
    from vkd.distill.trainer import distill

    values = {
        "model_name_or_path": student, "teacher_model_name_or_path": teacher, "data_path": str(train_pairs),
        "val_data_path": str(val_pairs) if val_pairs is not None else None, "output_dir": str(out),
        "epochs": settings.epochs, "batch_size": settings.batch_size, "learning_rate": settings.learning_rate,
        "eval_strategy": "no", "distillation_loss_type": ["kl_divergence", "feature_mse"],
        "train_modes": ["student-query", "student-index"], "mixed_precision": "no", **(overrides or {}),
    }
    marker = out / "vkd-modes-run.json"
    report_path = out / "report.json"
    if (report_path.is_file() and (out / "model" / "vkd_projection.json").is_file() and marker.is_file()
            and json.loads(marker.read_text()) == values):
        return json.loads(report_path.read_text())
    shutil.rmtree(out, ignore_errors=True)
    report = distill(DistillConfig.from_dict(values)).report
    marker.write_text(json.dumps(values, indent=1) + "\n")  # last: a run cut short is not reused
    return report


def validation_quality(model: str, teacher_vectors: tuple[np.ndarray, np.ndarray], pairs: Any,
                       k: int = 10) -> dict[str, dict[str, float]]:
    """Each asymmetric mode's ranking of the validation images for every validation caption, by the
    brute force of its definition (what its search returns with exact indexes), against the
    teacher-only ranking: overlap@k and R@1 (``ranking_agreement``)."""
    from vkd.models import load_encoder
    from vkd.retrieval.modes import ranking_agreement

    projected = load_encoder(model, device="cpu", prefer="torch", space="teacher")
    t_text, t_image = teacher_vectors
    s_text = projected.encode_text(pairs.texts())
    s_image = projected.encode_images([str(p) for p in pairs.images()])
    reference = t_text @ t_image.T
    truth = np.asarray(pairs.text_to_image)
    k = min(k, t_image.shape[0])
    return {"student-query": ranking_agreement(s_text @ t_image.T, reference, truth, k=k),
            "student-index": ranking_agreement(t_text @ s_image.T, reference, truth, k=k)}


def sweep_modes(student: str, teacher: str, train_pairs: Path, val_pairs: Path, out: Path, settings: ModesSettings,
                progress: Callable[[str], None] = lambda message: None) -> dict[str, Any]:
    """Choose the mode loss settings on the validation split: from the config's defaults, try each
    value of ``settings.sweep`` one knob at a time (in order, keeping a change when it raises the
    score), where the score is the mean overlap@10 of student-query and student-index with the
    teacher-only ranking. Every trial's settings and validation figures are kept in
    ``out/sweep.json``; returns that record, whose ``chosen`` names the best trial's settings and
    ``model`` its model directory."""
    import json

    from vkd.config import DistillConfig
    from vkd.data.pairs import read_pairs
    from vkd.models import load_encoder

    pairs = read_pairs(val_pairs)
    encoder = load_encoder(teacher, device="cpu", prefer="torch")
    teacher_vectors = (encoder.encode_text(pairs.texts()), encoder.encode_images([str(p) for p in pairs.images()]))
    defaults = {key: getattr(DistillConfig, key) for key in settings.sweep}
    trials: list[dict[str, Any]] = []

    short = replace(settings, epochs=settings.sweep_epochs)

    def trial(values: dict[str, float]) -> dict[str, Any]:
        run = out / f"trial-{len(trials):02d}"
        report = distill_for_modes(student, teacher, train_pairs, val_pairs, run, short, values)
        val = validation_quality(str(run / "model"), teacher_vectors, pairs)
        score = float(np.mean([_overlap(val[mode]) for mode in val]))
        record = {"settings": dict(values), "val": val, "score": score, "model": str(run / "model"),
                  "cross_space_distance": (report.get("projection") or {}).get("val_cross_space_distance")}
        trials.append(record)
        progress(f"modes sweep: {values}: val overlap student-query {_overlap(val['student-query']):.3f}, "
                 f"student-index {_overlap(val['student-index']):.3f}")
        return record

    best = trial(dict(defaults))
    for key, choices in settings.sweep.items():
        for value in choices:
            if value == best["settings"][key]:
                continue
            candidate = trial({**best["settings"], key: value})
            if candidate["score"] > best["score"]:
                best = candidate
    record = {"metric": "mean val overlap@10 of student-query and student-index with the teacher-only ranking",
              "split": str(val_pairs), "epochs": settings.sweep_epochs, "learning_rate": settings.learning_rate,
              "defaults": defaults, "chosen": best["settings"], "model": best["model"], "score": best["score"],
              "trials": trials}
    out.mkdir(parents=True, exist_ok=True)
    (out / "sweep.json").write_text(json.dumps(record, indent=1) + "\n")
    return record


def measure_demo(student: str, teacher: str, test_pairs: Path, train_pairs: Path, *, workdir: Path,
                 settings: ModesSettings, progress: Callable[[str], None],
                 val_pairs: Path | None = None) -> dict[str, Any]:
    from vkd.data.pairs import read_pairs
    from vkd.indexer.build import build_index
    from vkd.models import load_encoder
    from vkd.retrieval import Retriever
    from vkd.retrieval.modes import MODES, ranking_agreement

    sweep = None
    if settings.sweep and val_pairs is not None:
        progress(f"modes: choosing the mode loss settings on {val_pairs} ({sum(map(len, settings.sweep.values()))} "
                 "values, one knob at a time)")
        sweep = sweep_modes(student, teacher, train_pairs, val_pairs, workdir / "sweep", settings, progress)
    progress(f"modes: distilling {student} for student-query and student-index against {teacher}")
    report = distill_for_modes(student, teacher, train_pairs, val_pairs, workdir / "student-modes", settings,
                               sweep["chosen"] if sweep else None)
    model = str(workdir / "student-modes" / "model")
    pairs = read_pairs(test_pairs)
    images = [Path(p).resolve() for p in pairs.images()]
    folder = workdir / "test-images"
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    for i, image in enumerate(images):  # one folder of the held-out images, named by their position
        os.symlink(image, folder / f"{i:06d}{image.suffix}")
    index_dir = workdir / "modes.vkd"
    progress(f"modes: indexing {len(images)} held-out images with teacher and projected vectors")
    build = build_index(folder, index_dir, student=model, teacher=teacher, projected=True, rebuild=True,
                        prefer="torch", device="cpu", follow_links=True)
    position = {str((folder / f"{i:06d}{image.suffix}").resolve()): i for i, image in enumerate(images)}
    position.update({str(image): i for i, image in enumerate(images)})

    teacher_encoder = load_encoder(teacher, device="cpu", prefer="torch")
    student_encoder = load_encoder(model, device="cpu", prefer="torch")
    projected = load_encoder(model, device="cpu", prefer="torch", space="teacher")
    texts = pairs.texts()[: settings.max_queries]
    truth = np.asarray(pairs.text_to_image[: len(texts)])
    teacher_images = teacher_encoder.encode_images([str(p) for p in images])
    reference = teacher_encoder.encode_text(texts) @ teacher_images.T  # teacher-only, exact

    rows: dict[str, Any] = {}
    for mode in MODES:
        retriever = Retriever(index_dir, prefer="torch", device="cpu", mode=mode)
        results = retriever.search_batch(texts, k=min(10, len(images)))
        # the mode's ranking as a score matrix over the images (unranked: -inf), for the shared metrics
        scores = np.full((len(texts), len(images)), -np.inf, dtype=np.float32)
        for qi, result in enumerate(results):
            for hit in result:
                scores[qi, position[str(Path(hit.path).resolve())]] = len(result) - hit.rank
        agreement = ranking_agreement(scores, reference, truth, k=min(10, len(images)))
        timed = texts[: settings.timed_queries]
        query_s = [_median_s(lambda text=text, r=retriever: r.search(text, k=10), settings.repeats) for text in timed]
        rows[mode] = {**agreement, "query_ms": 1000 * float(np.median(query_s))}
        progress(f"modes: {mode}: overlap@10 {agreement['overlap@10']:.3f}, R@1 {agreement['R@1']:.3f}, "
                 f"{rows[mode]['query_ms']:.2f} ms a query")
    sample = [str(p) for p in images[: settings.batch_size]]
    costs = {
        "student_image_s": _median_s(lambda: student_encoder.encode_images(sample), settings.repeats) / len(sample),
        "teacher_image_s": _median_s(lambda: teacher_encoder.encode_images(sample), settings.repeats) / len(sample),
        "student_query_s": _median_s(lambda: projected.encode_text([texts[0]]), settings.repeats),
        "teacher_query_s": _median_s(lambda: teacher_encoder.encode_text([texts[0]]), settings.repeats),
        "scan_s_per_row": scan_cost(teacher_encoder.dim, settings.scan_rows, settings.repeats),
        "ann_s": ann_cost(student_encoder.dim, settings.ann_rows, settings.repeats),
        "teacher_ann_s": ann_cost(teacher_ann_dim(teacher_encoder.family, teacher_encoder.dim), settings.ann_rows,
                                  settings.repeats),
    }
    teacher_reference = ranking_agreement(reference, reference, truth, k=min(10, len(images)))
    return {"student": model, "teacher": teacher, "images": len(images), "queries": len(texts),
            "distill": {"projection": report.get("projection"), "wall_time_s": report.get("wall_time_s"),
                        "mode_settings": sweep["chosen"] if sweep else "the config's defaults"},
            "sweep": sweep,
            "index_seconds": build.seconds, "teacher_only": teacher_reference, "modes": rows, "costs": costs}


# ---------------------------------------------------------------- real shapes: costs


def measure_real(settings: ModesSettings, *, workdir: Path, progress: Callable[[str], None]) -> dict[str, Any]:
    from vkd.bench.real import arch_info, build_copy
    from vkd.models import load_encoder

    student_arch, teacher_arch = arch_info(settings.real_student), arch_info(settings.real_teacher)
    models = workdir / "models"
    student_dir = build_copy(student_arch, None, models, progress)
    teacher_dir = build_copy(teacher_arch, None, models, progress)
    student = load_encoder(student_dir, device="cpu", dtype="float32", prefer="torch")
    teacher = load_encoder(teacher_dir, device="cpu", dtype="float32", prefer="torch")
    rng = np.random.default_rng(0)
    from PIL import Image

    pictures = [Image.fromarray(rng.integers(0, 255, (384, 512, 3), dtype=np.uint8)) for _ in range(settings.real_images)]
    text = ["a photo of a dog running on a sandy beach at sunset"]
    costs: dict[str, float] = {}
    for role, encoder in (("student", student), ("teacher", teacher)):
        progress(f"modes: real shapes: timing {role} {encoder.name}")
        costs[f"{role}_image_s"] = _median_s(lambda e=encoder: e.encode_images(pictures, batch_size=settings.batch),
                                             settings.repeats) / len(pictures)
        costs[f"{role}_query_s"] = _median_s(lambda e=encoder: e.encode_text(text), settings.repeats)
    weight = rng.standard_normal((teacher.dim, student.dim)).astype(np.float32)
    vector = rng.standard_normal((1, student.dim)).astype(np.float32)
    projection_s = _median_s(lambda: vector @ weight.T, max(settings.repeats, 20))
    costs["student_query_s"] += projection_s  # student-query projects its query vector
    costs["scan_s_per_row"] = scan_cost(teacher.dim, settings.scan_rows, settings.repeats)
    costs["ann_s"] = ann_cost(student.dim, settings.ann_rows, settings.repeats)
    # student-query's stage 1: the teacher ANN (its Matryoshka prefix for a teacher trained with one)
    costs["teacher_ann_s"] = ann_cost(teacher_ann_dim(teacher.family, teacher.dim), settings.ann_rows,
                                      settings.repeats)
    return {"student": {"arch": student_arch.name, "dim": student.dim}, "teacher": {"arch": teacher_arch.name,
                                                                                     "dim": teacher.dim},
            "random_weights": True, "images": len(pictures), "batch": settings.batch, "costs": costs,
            "projection_ms": projection_s * 1000, "ann_rows": settings.ann_rows}


def scan_cost(dim: int, rows: int, repeats: int) -> float:
    """Seconds per row of student-query's exact scan (``scan_candidates``: a float16 block of the
    memory map to float32, one product with the query), at the teacher's full dimension."""
    rng = np.random.default_rng(1)
    block = rng.standard_normal((max(1, min(rows, 65_536)), dim)).astype(np.float16)
    query = rng.standard_normal((1, dim)).astype(np.float32)
    return _median_s(lambda: query @ np.asarray(block, dtype=np.float32).T, repeats) / block.shape[0]


def ann_cost(dim: int, rows: int, repeats: int) -> float:
    """Seconds of one FAISS HNSW32 search (efSearch 128, 1000 neighbours) over ``rows`` random
    vectors of ``dim``: the student ANN of two-stage and student-index (HNSW's cost grows slowly
    with the corpus; this is its figure at ``rows``)."""
    import faiss

    rng = np.random.default_rng(2)
    base = rng.standard_normal((max(rows, 1000), dim)).astype(np.float32)
    faiss.normalize_L2(base)
    hnsw = faiss.IndexHNSWFlat(dim, 32, faiss.METRIC_INNER_PRODUCT)
    hnsw.hnsw.efSearch = 128
    hnsw.add(base)
    probe = base[:1].copy()
    return _median_s(lambda: hnsw.search(probe, 1000), repeats)


# ---------------------------------------------------------------- recommendation


def recommendations(costs: Mapping[str, float], quality: Mapping[str, float | None],
                    settings: ModesSettings) -> list[dict[str, Any]]:
    from vkd.retrieval.modes import ModelCosts, recommend_mode

    model_costs = ModelCosts(**{k: float(v) for k, v in costs.items() if k in ModelCosts.__dataclass_fields__})
    out = []
    for size in settings.scales:
        choice = recommend_mode(size, settings.queries_per_s, model_costs, quality, min_quality=settings.min_quality,
                                cores=settings.cores, horizon_days=settings.horizon_days)
        out.append({"images": size, **choice.to_dict()})
    return out


def run_modes_benchmark(settings: ModesSettings, *, workdir: str | os.PathLike[str],
                        demo: Mapping[str, Any] | None = None,
                        progress: Callable[[str], None] = lambda message: None) -> BenchResult:
    """``demo``: {"student", "teacher", "test_pairs", "train_pairs", "val_pairs"} (None skips the demo
    part; without val_pairs the mode loss settings are the config's defaults, never chosen on test)."""
    work = Path(workdir)
    work.mkdir(parents=True, exist_ok=True)
    results: dict[str, Any] = {"settings": {k: v for k, v in asdict(settings).items() if k != "notes"}}
    quality: dict[str, float | None] = {}
    if demo is not None:
        val = demo.get("val_pairs")
        results["demo"] = measure_demo(demo["student"], demo["teacher"], Path(demo["test_pairs"]),
                                       Path(demo["train_pairs"]), workdir=work / "demo", settings=settings,
                                       progress=progress, val_pairs=Path(val) if val else None)
        quality = {mode: row["overlap@10"] for mode, row in results["demo"]["modes"].items()}
        results["demo"]["recommendations"] = recommendations(results["demo"]["costs"], quality, settings)
    if settings.real_student and settings.real_teacher:
        results["real"] = measure_real(settings, workdir=work / "real", progress=progress)
        # quality does not depend on the shapes: the demo's, or two-stage alone without it
        results["real"]["recommendations"] = recommendations(results["real"]["costs"], quality or {"two-stage": 1.0},
                                                             settings)
    return BenchResult("modes", results, markdown(results), notes=list(settings.notes))


def markdown(results: Mapping[str, Any]) -> str:
    parts = []
    demo = results.get("demo")
    if demo:
        rows = [[mode, row["overlap@10"], row["R@1"], row["query_ms"]] for mode, row in demo["modes"].items()]
        rows.append(["teacher only (reference)", demo["teacher_only"]["overlap@10"], demo["teacher_only"]["R@1"], None])
        parts.append(f"## Demo: {demo['queries']} captions over {demo['images']} held-out images\n\n"
                     + markdown_table(["mode", "overlap@10 vs teacher-only", "R@1", "query ms (batch 1)"], rows))
        if demo.get("sweep"):
            parts.append(_sweep_table(demo["sweep"]))
        parts.append(_costs_table(demo["costs"]))
        parts.append(_recommendation_table(demo["recommendations"]))
    real = results.get("real")
    if real:
        parts.append(f"## Real shapes (random weights): {real['student']['arch']} → {real['teacher']['arch']}\n\n"
                     + _costs_table(real["costs"]))
        parts.append(_recommendation_table(real["recommendations"]))
    return "\n\n".join(parts) + "\n"


def _costs_table(costs: Mapping[str, float]) -> str:
    from vkd.retrieval.modes import MODES, ModelCosts, mode_costs

    model_costs = ModelCosts(**{k: float(v) for k, v in costs.items() if k in ModelCosts.__dataclass_fields__})
    rows = []
    for mode in MODES:
        index_s, query_s = mode_costs(mode, 1, model_costs)
        rows.append([mode, index_s * 1000, query_s * 1000])
    return ("Per-mode compute (ms; student-query searches the teacher ANN index, "
            f"{costs.get('teacher_ann_s', 0.0) * 1000:.2f} ms a query; its exact scan (`--scan`) would cost "
            f"{costs.get('scan_s_per_row', 0.0) * 1e9:.2f} ns per row)\n\n"
            + markdown_table(["mode", "index ms / image", "query ms"], rows))


def _overlap(figures: Mapping[str, float]) -> float:
    """The overlap@k of ``ranking_agreement``'s figures (k is 10, or the image count when fewer)."""
    return next(value for key, value in figures.items() if key.startswith("overlap@"))


def _sweep_table(sweep: Mapping[str, Any]) -> str:
    keys = list(sweep["defaults"])
    rows = [[*(t["settings"][k] for k in keys), _overlap(t["val"]["student-query"]),
             _overlap(t["val"]["student-index"]), t["score"], "chosen" if t["model"] == sweep["model"] else ""]
            for t in sweep["trials"]]
    return (f"Mode loss settings chosen on the validation split ({sweep['split']}; one knob at a time)\n\n"
            + markdown_table([*keys, "val overlap@10 student-query", "val overlap@10 student-index", "mean", ""],
                             rows))


def _recommendation_table(recs: Sequence[Mapping[str, Any]]) -> str:
    rows = [[f"{r['images']:,}", r["mode"], r["reason"]] for r in recs]
    return "Recommendation\n\n" + markdown_table(["images", "mode", "why"], rows)


def print_recommendations(results: Mapping[str, Any], echo: Callable[[str], None]) -> None:
    """What ``vkd bench modes`` prints: the recommended mode per corpus size."""
    for part in ("demo", "real"):
        for rec in (results.get(part) or {}).get("recommendations", []):
            echo(f"recommended ({part} costs) at {rec['images']:,} images: {rec['mode']} — {rec['reason']}")
