"""``vkd demo``: the whole story on a CPU, in minutes, with nothing downloaded.

1. generate captioned synthetic scenes (train / val / test, test-only object–scene combinations);
2. train a teacher from scratch (a CLIP of the real transformers class, contrastive only);
3. pre-train a much smaller CLIP student briefly on part of the training data: the raw student;
4. fine-tune the raw student with LoRA on the rest, twice, same steps and seed:
   CE only, and CE + KD from the teacher; merge;
5. export the distilled student to ONNX INT8;
6. index the test images with the student, teacher vectors stored;
7. run example searches;
8. measure every model on the test split and write the table.

Hyper-parameters were chosen on the val split (best checkpoints are picked on val too); the
test split is touched once, in step 8. Every figure in the table is measured in this run.

Layout of ``--out`` (default ``$VKD_HOME/demo``, which ``vkd search`` opens by default)::

    data/                 synthetic scenes: images/{train,val,test}, *.jsonl, synth.json
    teacher/model/        the teacher (distill output dirs hold report.json, metrics.jsonl)
    student-raw/model/    the raw student
    student-ce/model/     raw student + LoRA fine-tuning, CE only
    student-kd/model/     raw student + LoRA fine-tuning, CE + KD   (+ onnx/ export)
    index/                the test images, indexed by student-kd with teacher vectors
    results.md            the table;  results.json: the same figures and the run's details
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import click

EXAMPLE_QUERIES = ("a dog on a beach", "two red cars on a road at night", "a small cat in the snow",
                   "a boat on a lake")


@dataclass(frozen=True)
class DemoPlan:
    """Sizes and schedules. FULL fits ~5 minutes on 2 CPU cores; QUICK ~1 minute."""

    n_images: int
    teacher: dict[str, int]
    student: dict[str, int]
    teacher_epochs: int
    teacher_lr: float
    raw_epochs: int
    raw_lr: float
    finetune_epochs: int
    finetune_lr: float
    batch_size: int = 64
    pretrain_fraction: float = 0.4  # share of training images the raw student sees
    # chosen on the val split from (w, T) = (0.7, 2), (0.9, 1), (0.9, 4): best val R@1 and rsum
    temperature: float = 4.0
    distillation_weight: float = 0.9
    lora_r: int = 16
    seed: int = 0
    extra: dict[str, Any] = field(default_factory=dict)


FULL = DemoPlan(
    n_images=3000,
    teacher={"hidden": 128, "layers": 4, "heads": 4, "image": 64, "patch": 16, "proj": 128},
    student={"hidden": 96, "layers": 3, "heads": 3, "image": 64, "patch": 16, "proj": 96},
    teacher_epochs=6, teacher_lr=2e-3,
    raw_epochs=3, raw_lr=2e-3,
    finetune_epochs=4, finetune_lr=2e-3,
)
QUICK = DemoPlan(
    n_images=600,
    teacher={"hidden": 64, "layers": 2, "heads": 2, "image": 64, "patch": 16, "proj": 64},
    student={"hidden": 32, "layers": 2, "heads": 2, "image": 64, "patch": 16, "proj": 32},
    teacher_epochs=3, teacher_lr=2e-3,
    raw_epochs=1, raw_lr=2e-3,
    finetune_epochs=2, finetune_lr=2e-3,
    batch_size=32,
)


@dataclass
class Row:
    model: str
    t2i_r1: float
    t2i_r5: float
    t2i_r10: float
    params: int
    encode_ms_per_image: float | None
    path: str


def _step(number: int, title: str) -> None:
    click.secho(f"\n[{number}/8] {title}", bold=True)


def split_training_pairs(data_dir: Path, fraction: float, seed: int) -> tuple[Path, Path]:
    """Split train.jsonl by image into the raw student's share and the fine-tuning share."""
    import random

    lines = (data_dir / "train.jsonl").read_text().splitlines()
    order = list(range(len(lines)))
    random.Random(seed).shuffle(order)
    cut = int(len(lines) * fraction)
    pretrain, finetune = data_dir / "train_pretrain.jsonl", data_dir / "train_finetune.jsonl"
    pretrain.write_text("".join(lines[i] + "\n" for i in sorted(order[:cut])))
    finetune.write_text("".join(lines[i] + "\n" for i in sorted(order[cut:])))
    return pretrain, finetune


def _train(out_dir: Path, *, plan: DemoPlan, model: str, data: Path, val: Path, epochs: int, lr: float,
           teacher: str | None = None, use_lora: bool, seed: int) -> Path:
    from vkd.config import DistillConfig
    from vkd.distill import distill

    # The demo owns its output folder: a re-run starts each model afresh rather than resuming.
    shutil.rmtree(out_dir, ignore_errors=True)
    config = DistillConfig(
        model_name_or_path=model,
        teacher_model_name_or_path=teacher,
        use_distillation=teacher is not None,
        distillation_loss_type="kl_divergence",
        temperature=plan.temperature,
        distillation_weight=plan.distillation_weight,
        data_path=str(data),
        val_data_path=str(val),
        output_dir=str(out_dir),
        epochs=epochs,
        batch_size=plan.batch_size,
        learning_rate=lr,
        weight_decay=0.1,
        warmup_ratio=0.1,
        use_lora=use_lora,
        lora_r=plan.lora_r,
        lora_alpha=plan.lora_r * 2,
        lora_dropout=0.0,
        logging_steps=20,
        eval_strategy="epoch",
        seed=seed,
        mixed_precision="no",
    ).validated()
    return distill(config).model_dir


def _measure(name: str, encoder: Any, test: Any, params: int, path: Path) -> tuple[Row, dict[str, float]]:
    from vkd.evaluate import recall_at_k

    images = [Path(p) for p in test.images()]
    encoder.encode_images(images[:8])  # warm-up: first calls pay for lazy initialisation
    started = time.perf_counter()
    image_vectors = encoder.encode_images(images)
    ms_per_image = (time.perf_counter() - started) * 1000 / len(images)
    text_vectors = encoder.encode_text(test.texts())
    metrics = recall_at_k(text_vectors, image_vectors, test.text_to_image)
    row = Row(name, metrics["t2i_R@1"], metrics["t2i_R@5"], metrics["t2i_R@10"], params, ms_per_image, str(path))
    return row, metrics


def _two_stage_row(retriever: Any, test: Any, teacher_params: int, student_params: int) -> tuple[Row, dict]:
    """Text → image recall of the search pipeline itself: student ANN top-1000 → teacher rerank."""
    by_path = {str(Path(p).resolve()): i for i, p in enumerate(test.images())}
    ranks = []
    texts = test.texts()
    started = time.perf_counter()
    for start in range(0, len(texts), 64):
        for text_index, result in enumerate(retriever.search_batch(texts[start:start + 64], k=10),
                                            start=start):
            truth = int(test.text_to_image[text_index])
            found = [by_path.get(str(Path(hit.path).resolve())) for hit in result]
            ranks.append(found.index(truth) + 1 if truth in found else None)
    ms_per_query = (time.perf_counter() - started) * 1000 / len(texts)

    def recall(k: int) -> float:
        return 100.0 * sum(1 for r in ranks if r is not None and r <= k) / len(ranks)

    row = Row("Two-stage (student top-1000 → teacher)", recall(1), recall(5), recall(10),
              teacher_params + student_params, None, str(retriever.index.path))
    return row, {"ms_per_query": ms_per_query, "candidates": retriever.candidates, "corpus": len(test.images())}


def format_table(rows: Sequence[Row], teacher_r1: float) -> str:
    lines = ["| model | Recall@1 | Recall@5 | params | encode ms/img | vs teacher R@1 |",
             "|---|---|---|---|---|---|"]
    for row in rows:
        ms = f"{row.encode_ms_per_image:.2f}" if row.encode_ms_per_image is not None else "—"
        retention = f"{100 * row.t2i_r1 / teacher_r1:.0f}%" if teacher_r1 > 0 else "—"
        lines.append(f"| {row.model} | {row.t2i_r1:.1f} | {row.t2i_r5:.1f} | {row.params:,} | {ms} | {retention} |")
    return "\n".join(lines)


def verdict(rows: dict[str, Row]) -> str:
    ce, kd = rows["ce"].t2i_r1, rows["kd"].t2i_r1
    if kd > ce:
        return f"Distillation beat CE-only fine-tuning: Recall@1 {kd:.1f} vs {ce:.1f} (+{kd - ce:.1f})."
    if kd == ce:
        return f"Distillation tied CE-only fine-tuning: Recall@1 {kd:.1f} for both."
    return (f"Distillation did NOT beat CE-only fine-tuning in this run: Recall@1 {kd:.1f} vs {ce:.1f} "
            f"({kd - ce:.1f}).")


def run_demo(out_dir: str | os.PathLike[str] | None = None, *, quick: bool = False,
             searches: Sequence[str] = EXAMPLE_QUERIES) -> dict[str, Any]:
    """Run every step; returns what ``results.json`` holds."""
    import torch

    from vkd.data.pairs import read_pairs
    from vkd.data.synth import generate
    from vkd.export import export_onnx
    from vkd.indexer import Index
    from vkd.models import load_encoder
    from vkd.models.tiny import build_tiny
    from vkd.paths import default_demo_dir
    from vkd.retrieval import Retriever

    plan = QUICK if quick else FULL
    out = Path(out_dir) if out_dir is not None else default_demo_dir()
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(plan.seed)
    timings: dict[str, float] = {}
    started = time.perf_counter()

    def lap(name: str, since: float) -> None:
        timings[name] = round(time.perf_counter() - since, 1)

    _step(1, f"Generating {plan.n_images} captioned scenes")
    t = time.perf_counter()
    data = out / "data"
    summary = generate(data, plan.n_images, seed=plan.seed, show_progress=True, overwrite=True)
    pretrain_pairs, finetune_pairs = split_training_pairs(data, plan.pretrain_fraction, plan.seed)
    val_pairs, test_pairs = data / "val.jsonl", data / "test.jsonl"
    corpus = read_pairs(data / "train.jsonl").texts()
    click.echo(f"  {summary.images} images; held out of training: "
               f"{', '.join('/'.join(pair) for pair in summary.heldout)}")
    lap("data", t)

    _step(2, "Training the teacher from scratch (contrastive only)")
    t = time.perf_counter()
    teacher_init = build_tiny("clip", out / "init" / "teacher", seed=plan.seed, corpus=corpus,
                              overrides=plan.teacher)
    teacher_dir = _train(out / "teacher", plan=plan, model=str(teacher_init), data=data / "train.jsonl",
                         val=val_pairs, epochs=plan.teacher_epochs, lr=plan.teacher_lr, use_lora=False,
                         seed=plan.seed)
    lap("teacher", t)

    _step(3, f"Pre-training the raw student on {plan.pretrain_fraction:.0%} of the training images")
    t = time.perf_counter()
    student_init = build_tiny("clip", out / "init" / "student", seed=plan.seed + 1, corpus=corpus,
                              overrides=plan.student)
    raw_dir = _train(out / "student-raw", plan=plan, model=str(student_init), data=pretrain_pairs,
                     val=val_pairs, epochs=plan.raw_epochs, lr=plan.raw_lr, use_lora=False, seed=plan.seed)
    lap("raw_student", t)

    _step(4, "Fine-tuning the raw student with LoRA on the rest: CE only, then CE + KD (same steps, seed)")
    t = time.perf_counter()
    ce_dir = _train(out / "student-ce", plan=plan, model=str(raw_dir), data=finetune_pairs, val=val_pairs,
                    epochs=plan.finetune_epochs, lr=plan.finetune_lr, use_lora=True, seed=plan.seed)
    kd_dir = _train(out / "student-kd", plan=plan, model=str(raw_dir), data=finetune_pairs, val=val_pairs,
                    epochs=plan.finetune_epochs, lr=plan.finetune_lr, use_lora=True, seed=plan.seed,
                    teacher=str(teacher_dir))
    lap("finetune", t)

    _step(5, "Exporting the distilled student to ONNX INT8")
    t = time.perf_counter()
    export = export_onnx(kd_dir, int8="dynamic")
    click.echo(f"  parity (cosine vs torch): {json.dumps(export.manifest.get('parity', {}))[:300]}")
    lap("export", t)

    _step(6, "Indexing the test images with the student (teacher vectors stored)")
    t = time.perf_counter()
    index = Index.build(data / "images" / "test", out / "index", student=str(kd_dir), teacher=str(teacher_dir),
                        rebuild=True, show_progress=True)
    click.echo(f"  {len(index)} images in {len(index.shards)} shard(s) at {index.path}")
    lap("index", t)

    _step(7, "Searching")
    t = time.perf_counter()
    retriever = Retriever(out / "index", candidates=1000, prefer="onnx")
    captions = _captions(test_pairs)
    examples = {}
    for query in searches:
        hits = retriever.search(query, k=3)
        examples[query] = [hit.to_dict() for hit in hits]
        click.echo(f'  "{query}"')
        for hit in hits:
            caption = captions.get(str(Path(hit.path).resolve()), "?")
            click.echo(f"    {hit.rank}. {hit.score:.3f}  {Path(hit.path).name}  ({caption})")
    lap("search", t)

    _step(8, "Measuring every model on the test split (text → image)")
    t = time.perf_counter()
    test = read_pairs(test_pairs)
    teacher = load_encoder(teacher_dir, device="cpu")
    rows: dict[str, Row] = {}
    metrics: dict[str, Any] = {}
    models = [("teacher", "Teacher", teacher_dir, teacher),
              ("raw", "Student (raw)", raw_dir, None),
              ("ce", "Student (CE only)", ce_dir, None),
              ("kd", "Student (distilled)", kd_dir, None)]
    for key, name, path, encoder in models:
        encoder = encoder or load_encoder(path, device="cpu")
        rows[key], metrics[key] = _measure(name, encoder, test, encoder.num_parameters(), path)
    onnx_student = load_encoder(kd_dir, prefer="onnx")
    rows["kd_int8"], metrics["kd_int8"] = _measure("Student (distilled, ONNX INT8)", onnx_student, test,
                                                   rows["kd"].params, kd_dir / "onnx")
    rows["two_stage"], metrics["two_stage"] = _two_stage_row(retriever, test, rows["teacher"].params,
                                                             rows["kd"].params)
    lap("measure", t)
    timings["total"] = round(time.perf_counter() - started, 1)

    table = format_table(list(rows.values()), rows["teacher"].t2i_r1)
    conclusion = verdict(rows)
    note = (f"Test split: {len(test.images())} images, {len(test)} captions, text → image; "
            f"{'quick' if quick else 'full'} demo, {timings['total']:.0f} s on {os.cpu_count()} CPU core(s).")
    click.echo("\n" + table + "\n\n" + conclusion + "\n" + note)
    results = {
        "table": [asdict(row) for row in rows.values()],
        "metrics": metrics,
        "verdict": conclusion,
        "examples": examples,
        "timings_s": timings,
        "plan": asdict(plan),
        "quick": quick,
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "torch": torch.__version__},
        "heldout_combinations": [list(pair) for pair in summary.heldout],
        "export_parity": export.manifest.get("parity"),
        "paths": {"teacher": str(teacher_dir), "student": str(kd_dir), "index": str(out / "index")},
    }
    (out / "results.json").write_text(json.dumps(results, indent=2, default=str) + "\n")
    (out / "results.md").write_text(f"# vkd demo results\n\n{table}\n\n{conclusion}\n\n{note}\n")
    click.echo(f"\nWrote {out / 'results.md'} and {out / 'results.json'}.")
    return results


def _captions(pairs_path: Path) -> dict[str, str]:
    """Resolved image path -> its first caption, for showing what a hit is."""
    captions = {}
    for line in pairs_path.read_text().splitlines():
        record = json.loads(line)
        texts = record["text"] if isinstance(record["text"], list) else [record["text"]]
        captions[str((pairs_path.parent / record["image"]).resolve())] = texts[0]
    return captions


@click.command()
@click.option("--out", type=click.Path(file_okay=False), default=None,
              help="Output directory [default: $VKD_HOME/demo, i.e. ~/.cache/vkd/demo].")
@click.option("--quick", is_flag=True, help="Smaller data and fewer steps (about a minute).")
def demo(out: str | None, quick: bool) -> None:
    """Run the whole pipeline on synthetic scenes, on a CPU, with nothing downloaded:
    data, teacher, raw/CE-only/distilled students, ONNX INT8, index, search, and a
    Recall table measured on the test split.

    \b
    Examples:
      vkd demo                       # ~5 minutes on 2 cores
      vkd demo --quick --out /tmp/d  # ~1 minute
      vkd search "a dog on a beach"  # afterwards: searches the demo index
    """
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    run_demo(out, quick=quick)
    if out is not None:
        from vkd.paths import default_index_dir

        if Path(out).resolve() / "index" != default_index_dir().resolve():
            click.echo(f"To search this index: vkd search \"a dog on a beach\" --index {Path(out) / 'index'}")
