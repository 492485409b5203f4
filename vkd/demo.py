"""``vkd demo``: the whole story on a CPU, in minutes, with nothing downloaded.

It mirrors how vkd is used for real: a student already pre-trained close to its teacher
(Qwen3-VL-Embedding-2B against 8B), distilled on a target domain (Flickr30k) that the
teacher was fine-tuned on.

1. generate two synthetic data sets with one seed: a **general** pre-training set (alt-text
   wording, never a target-only object–scene pair) and a **target** domain (descriptive
   wording, target-only words and pairs; train / val / test, test-only pairs);
2. the teacher (the larger CLIP): pre-trained on general, then fine-tuned on the target train
   split; and the student (a smaller CLIP): pre-trained on general with the same schedule, the
   raw student, then its CE-only LoRA fine-tune on the target train split;
3. from the same raw student, the CE + KD LoRA fine-tune with the CE-only arm's steps and seed;
   both merged;
4. export the distilled student to ONNX INT8;
5. index the target test images with the student, teacher vectors stored;
6. run example searches;
7. measure every model on the target test split and write the table.

Trainings that do not depend on each other run side by side in two processes of one thread each
when there are two CPUs (``DemoPlan.workers``), each with its output in ``logs/``: in step 2 the
teacher's chain and the student's (the CE-only arm needs no teacher, so it trains while the
teacher, the longer chain, still does), and in ``--sweep`` the runs of each round. Step 3 is
alone: it trains here, with a data-loader process on the second core.

Every training step is ``vkd distill``'s own (``vkd.distill.distill`` with a DistillConfig).
The fine-tuning hyper-parameters were chosen on the target val split by ``vkd demo --sweep``
(``benchmarks/demo_sweep.{json,md}``); ``vkd demo --seeds 0,1,2`` writes the final table over
seeds (``benchmarks/demo_seeds.{json,md}``). The test split is touched once, in step 7.

Layout of ``--out`` (default ``$VKD_HOME/demo``, which ``vkd search`` opens by default)::

    data-general/         general pre-training set: images/{train,val}, *.jsonl, synth.json
    data/                 target domain: images/{train,val,test}, *.jsonl, synth.json
    teacher-general/model/  the teacher after pre-training (distill output dirs hold report.json)
    teacher/model/        the teacher, fine-tuned on the target
    student-raw/model/    the raw student (pre-trained on general only)
    student-ce/model/     raw student + LoRA fine-tuning on target, CE only
    student-kd/model/     raw student + LoRA fine-tuning on target, CE + KD   (+ onnx/ export)
    index/                the target test images, indexed by student-kd with teacher vectors
    logs/                 each side-by-side training's own output (its progress bars, warnings)
    results.md            the table;  results.json: the same figures and the run's details
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import shutil
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import click

EXAMPLE_QUERIES = ("a dog on a beach", "two red cars on a road at night", "a small cat in the snow",
                   "a boat on a lake")


@dataclass(frozen=True)
class DemoPlan:
    """Sizes and schedules. FULL aims at ~5 minutes on 2 quiet CPU cores; QUICK at under a minute."""

    n_general: int
    n_target: int
    teacher: dict[str, int]
    student: dict[str, int]
    general_epochs: int  # teacher and student alike: both pre-trained on the same data
    general_lr: float
    teacher_target_epochs: int
    teacher_target_lr: float
    finetune_epochs: int
    finetune_lr: float
    batch_size: int = 64
    # KD settings: chosen on the target val split by `vkd demo --sweep` (benchmarks/demo_sweep.md)
    temperature: float = 2.0
    distillation_weight: float = 0.5
    loss: tuple[str, ...] = ("kl_divergence",)
    lora_r: int = 16
    seed: int = 0
    # Trainings that do not depend on each other (the teacher's chain and the student's, whose
    # CE-only arm needs no teacher; each round of the sweep) run side by side in this many
    # processes of one torch thread each: the demo's models are too small for a second thread to
    # speed up a step, so on 2 cores two processes do twice the work of one. 1 runs them in turn,
    # in this process.
    workers: int = 1
    extra: dict[str, Any] = field(default_factory=dict)


# Sizes: the student is narrower than the teacher (80 vs 128 wide) and both see the same general
# data with the same schedule, so the student starts a little below the teacher, as
# Qwen3-VL-Embedding-2B does below 8B. The epochs are what the 5-minute budget allows with two
# trainings side by side. The earlier plan (4 general, 3 teacher-target and 6 fine-tuning epochs,
# one training at a time) left every model so undertrained that fine-tuning with or without the
# teacher only bought steps: distilled − CE-only was +0.0 ± 0.5 R@1 over 3 seeds.
FULL = DemoPlan(
    n_general=3000, n_target=2000,
    teacher={"hidden": 128, "layers": 2, "heads": 4, "image": 64, "patch": 16, "proj": 128},
    student={"hidden": 80, "layers": 2, "heads": 2, "image": 64, "patch": 16, "proj": 80},
    general_epochs=8, general_lr=2e-3,
    teacher_target_epochs=6, teacher_target_lr=5e-4,
    finetune_epochs=12, finetune_lr=1e-3,  # 12: chosen by the sweep with w and T (benchmarks/demo_sweep.md)
    temperature=4.0,  # chosen by the sweep (the default plan's 2.0 is the QUICK one's)
    workers=2,
)
QUICK = DemoPlan(
    n_general=600, n_target=400,
    teacher={"hidden": 64, "layers": 2, "heads": 2, "image": 64, "patch": 16, "proj": 64},
    student={"hidden": 32, "layers": 2, "heads": 2, "image": 64, "patch": 16, "proj": 32},
    general_epochs=2, general_lr=2e-3,
    teacher_target_epochs=1, teacher_target_lr=1e-3,
    finetune_epochs=1, finetune_lr=1e-3,
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
    click.secho(f"\n[{number}/7] {title}", bold=True)


@dataclass(frozen=True)
class Prepared:
    """What every fine-tune starts from: the data sets, the fine-tuned teacher, the raw student
    (and the CE-only arm, when ``prepare`` was asked to train it alongside)."""

    general: Path
    target: Path
    teacher_general: Path
    teacher: Path
    raw: Path
    heldout: list[tuple[str, str]]
    target_only: list[tuple[str, str]]
    ce: Path | None = None


def _train(out_dir: Path, *, plan: DemoPlan, model: str, data: Path, val: Path, epochs: int, lr: float,
           teacher: str | None = None, use_lora: bool, seed: int,
           temperature: float | None = None, weight: float | None = None,
           loss: Sequence[str] | None = None, num_workers: int = 0) -> Path:
    from vkd.config import DistillConfig
    from vkd.distill import distill

    # The demo owns its output folder: a re-run starts each model afresh rather than resuming.
    shutil.rmtree(out_dir, ignore_errors=True)
    loss = list(loss or plan.loss)
    config = DistillConfig(
        model_name_or_path=model,
        teacher_model_name_or_path=teacher,
        use_distillation=teacher is not None,
        distillation_loss_type=loss[0] if len(loss) == 1 else loss,
        temperature=plan.temperature if temperature is None else temperature,
        distillation_weight=plan.distillation_weight if weight is None else weight,
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
        num_workers=num_workers,
    ).validated()
    return distill(config).model_dir


# A chain's step whose model is the previous step's output (the teacher: general, then target).
PREVIOUS = "<previous step's model>"


def _run_chain(steps: Sequence[dict[str, Any]]) -> Path:
    """``_train`` for each step in turn, each starting from the model the one before wrote."""
    model: Path | None = None
    for step in steps:
        kwargs = dict(step)
        if kwargs["model"] == PREVIOUS:
            kwargs["model"] = str(model)
        model = _train(**kwargs)
    assert model is not None
    return model


def _worker_chain(steps: Sequence[dict[str, Any]], log: str) -> str:
    """``_run_chain`` in a worker process: one torch thread, its output (progress bars included)
    in ``log`` rather than interleaved with the other worker's on the terminal."""
    import torch

    torch.set_num_threads(1)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    with open(log, "w", buffering=1) as out, contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
        return str(_run_chain(steps))


def _chain_steps(steps: Sequence[dict[str, Any]]) -> int:
    """Optimizer steps a chain will take, for the progress bar over side-by-side trainings."""
    from vkd.data.pairs import read_pairs
    from vkd.distill.data import steps_per_epoch

    return sum(step["epochs"] * max(1, steps_per_epoch(len(read_pairs(step["data"])), step["plan"].batch_size, 1))
               for step in steps)


def _steps_done(steps: Sequence[dict[str, Any]]) -> int:
    """Steps finished so far by a chain running elsewhere, read from its runs' metrics.jsonl."""
    done = 0
    for step in steps:
        metrics = Path(step["out_dir"]) / "metrics.jsonl"
        if not metrics.is_file():
            break
        last = 0
        for line in metrics.read_text().splitlines():
            with contextlib.suppress(ValueError, KeyError, TypeError):  # a line being written
                row = json.loads(line)
                if row.get("type") == "train":
                    last = int(row["step"])
        done += last
    return done


def run_trainings(chains: dict[str, Sequence[dict[str, Any]]], workers: int, logs: Path) -> dict[str, Path]:
    """Run independent training chains (name -> ``_train`` keyword sets, see ``PREVIOUS``) and return
    each chain's final model directory.

    With ``workers`` > 1 (and as many CPUs), the chains run side by side in spawned processes of one
    torch thread each, with one progress bar over all of them here and each chain's own output in
    ``logs/<name>.log``; otherwise they run in turn in this process, with their own progress bars.
    """
    from concurrent.futures import FIRST_EXCEPTION, ProcessPoolExecutor, wait
    from multiprocessing import get_context

    from tqdm.auto import tqdm

    workers = min(workers, len(chains), os.cpu_count() or 1)
    if workers <= 1:
        return {name: _run_chain(steps) for name, steps in chains.items()}
    logs.mkdir(parents=True, exist_ok=True)
    totals = {name: _chain_steps(steps) for name, steps in chains.items()}
    total = sum(totals.values())
    click.echo(f"  {len(chains)} trainings side by side in {workers} processes; their logs: {logs}/")
    # spawn, not fork: a forked child of a process whose torch already ran OpenMP threads can hang
    pool = ProcessPoolExecutor(max_workers=workers, mp_context=get_context("spawn"))
    try:
        futures = {name: pool.submit(_worker_chain, list(steps), str(logs / f"{name}.log"))
                   for name, steps in chains.items()}
        with tqdm(total=total, desc="train " + (" + ".join(chains) if len(chains) <= 2 else f"{len(chains)} runs"),
                  unit="step", dynamic_ncols=True) as bar:
            pending = set(futures.values())
            while pending:
                _, pending = wait(pending, timeout=1.0, return_when=FIRST_EXCEPTION)
                done = sum(totals[name] if future.done() else _steps_done(chains[name])
                           for name, future in futures.items())
                bar.update(max(0, min(total, done) - bar.n))
                failed = [(name, future) for name, future in futures.items()
                          if future.done() and future.exception() is not None]
                if failed:
                    name, future = failed[0]
                    raise RuntimeError(f"demo training {name!r} failed: {future.exception()}; its log: "
                                       f"{logs / (name + '.log')}") from future.exception()
        return {name: Path(future.result()) for name, future in futures.items()}
    except BaseException:
        # a failed (or interrupted) run stops the other trainings now rather than after they finish;
        # the executor has no public way to stop a running task, so its worker processes are ended
        for process in list((getattr(pool, "_processes", None) or {}).values()):
            process.terminate()
        raise
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def prepare(out: Path, plan: DemoPlan, *, lap: Callable[[str, float], None] | None = None,
            ce_out: Path | None = None) -> Prepared:
    """Steps 1–2: data; the teacher (general, then target) and the raw student (general). With
    ``ce_out``, the CE-only fine-tune too: it needs only the raw student, so it trains while the
    teacher (the longer chain) is still training."""
    from vkd.data.pairs import read_pairs
    from vkd.data.synth import generate
    from vkd.models.tiny import build_tiny

    seed = plan.seed
    lap = lap or (lambda name, since: None)
    _step(1, f"Generating {plan.n_general} general and {plan.n_target} target-domain scenes")
    t = time.perf_counter()
    # the target domain keeps the demo's documented data/ layout (vkd bench reads it)
    general = generate(out / "data-general", plan.n_general, seed=seed, val_frac=0.05, test_frac=0.0,
                       domain="general", show_progress=True, overwrite=True)
    target = generate(out / "data", plan.n_target, seed=seed, val_frac=0.15, test_frac=0.2,
                      domain="target", show_progress=True, overwrite=True)
    g, tg = out / "data-general", out / "data"
    # The tokenizers are trained on both sets' training captions, as a real model's vocabulary
    # covers the target's words before it has learnt what they mean.
    corpus = read_pairs(g / "train.jsonl").texts() + read_pairs(tg / "train.jsonl").texts()
    click.echo(f"  general: {general.images['train']} train images; target: {target.images}; "
               f"{len(target.target_only)} object-scene pairs only in the target domain")
    lap("data", t)

    _step(2, "Teacher: pre-training on the general set, then fine-tuning on the target train split; "
             "student: pre-training on the general set (the raw student)"
             + (", then its CE-only LoRA fine-tune on the target train split" if ce_out else ""))
    t = time.perf_counter()
    teacher_init = build_tiny("clip", out / "init" / "teacher", seed=seed, corpus=corpus, overrides=plan.teacher)
    student_init = build_tiny("clip", out / "init" / "student", seed=seed + 1, corpus=corpus,
                              overrides=plan.student)
    general_run = {"plan": plan, "data": g / "train.jsonl", "val": g / "val.jsonl", "epochs": plan.general_epochs,
                   "lr": plan.general_lr, "use_lora": False, "seed": seed}
    # No data-loader processes here: with both cores training, one made the teacher's chain slower
    # (pre-training 194 s against 157 s), not the student's.
    chains: dict[str, list[dict[str, Any]]] = {
        "teacher": [{**general_run, "out_dir": out / "teacher-general", "model": str(teacher_init)},
                    {**general_run, "out_dir": out / "teacher", "model": PREVIOUS, "data": tg / "train.jsonl",
                     "val": tg / "val.jsonl", "epochs": plan.teacher_target_epochs, "lr": plan.teacher_target_lr}],
        "student-raw": [{**general_run, "out_dir": out / "student-raw", "model": str(student_init)}],
    }
    # where each chain will leave its models (a distill run writes OUT_DIR/model)
    prepared = Prepared(g, tg, out / "teacher-general" / "model", out / "teacher" / "model",
                        out / "student-raw" / "model", list(target.heldout), list(target.target_only))
    if ce_out is not None:
        chains["student-raw"].append(finetune_run(ce_out, prepared, plan, kd=False))
    models = run_trainings(chains, plan.workers, out / "logs")
    lap("pretrain" if ce_out is None else "pretrain_and_ce", t)
    if ce_out is not None:
        return replace(prepared, ce=models["student-raw"])
    return prepared


def finetune_run(out_dir: Path, prepared: Prepared, plan: DemoPlan, *, kd: bool, epochs: int | None = None,
                 lr: float | None = None, temperature: float | None = None, weight: float | None = None,
                 loss: Sequence[str] | None = None) -> dict[str, Any]:
    """Step 3, one arm, as ``_train`` keywords: LoRA on the target train split from the raw
    student, CE only or CE + KD."""
    return {"out_dir": out_dir, "plan": plan, "model": str(prepared.raw), "data": prepared.target / "train.jsonl",
            "val": prepared.target / "val.jsonl", "epochs": epochs or plan.finetune_epochs,
            "lr": lr or plan.finetune_lr, "use_lora": True, "seed": plan.seed,
            "teacher": str(prepared.teacher) if kd else None, "temperature": temperature, "weight": weight,
            "loss": loss}


def recall(model_dir: Path, pairs: Path) -> dict[str, float]:
    """Text → image Recall@K of a model on a pair file."""
    from vkd.data.pairs import read_pairs
    from vkd.evaluate import recall_at_k
    from vkd.models import load_encoder

    data = read_pairs(pairs)
    encoder = load_encoder(model_dir, device="cpu")
    return recall_at_k(encoder.encode_text(data.texts()), encoder.encode_images([Path(p) for p in data.images()]),
                       data.text_to_image)


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


def run_demo(out_dir: str | os.PathLike[str] | None = None, *, quick: bool = False, seed: int = 0,
             plan: DemoPlan | None = None, searches: Sequence[str] = EXAMPLE_QUERIES) -> dict[str, Any]:
    """Run every step; returns what ``results.json`` holds."""
    import torch

    from vkd.data.pairs import read_pairs
    from vkd.export import export_onnx
    from vkd.indexer import Index
    from vkd.models import load_encoder
    from vkd.paths import default_demo_dir
    from vkd.retrieval import Retriever

    plan = replace(plan or (QUICK if quick else FULL), seed=seed)
    out = Path(out_dir) if out_dir is not None else default_demo_dir()
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(plan.seed)
    timings: dict[str, float] = {}
    started = time.perf_counter()

    def lap(name: str, since: float) -> None:
        timings[name] = round(time.perf_counter() - since, 1)

    prepared = prepare(out, plan, lap=lap, ce_out=out / "student-ce")
    teacher_dir, raw_dir, ce_dir = prepared.teacher, prepared.raw, prepared.ce
    assert ce_dir is not None
    test_pairs = prepared.target / "test.jsonl"

    _step(3, "Fine-tuning the raw student with LoRA on the target train split with CE + KD (the CE-only "
             "arm's steps and seed)")
    t = time.perf_counter()
    kd_run = finetune_run(out / "student-kd", prepared, plan, kd=True)
    threads = torch.get_num_threads()
    if plan.workers > 1:
        # Alone now: one torch thread for the steps (a second one does not speed up models this
        # small) and the other core for a data-loader process decoding the next batches: 62 s
        # against 90 s with two torch threads, the same weights (the batches are fixed lists)
        kd_run["num_workers"] = 1
        torch.set_num_threads(1)
    try:
        kd_dir = _run_chain([kd_run])
    finally:
        torch.set_num_threads(threads)
    lap("finetune_kd", t)

    _step(4, "Exporting the distilled student to ONNX INT8")
    t = time.perf_counter()
    export = export_onnx(kd_dir, int8="dynamic")
    click.echo(f"  parity (cosine vs torch): {json.dumps(export.manifest.get('parity', {}))[:300]}")
    lap("export", t)

    _step(5, "Indexing the target test images with the student (teacher vectors stored)")
    t = time.perf_counter()
    index = Index.build(prepared.target / "images" / "test", out / "index", student=str(kd_dir),
                        teacher=str(teacher_dir), rebuild=True, show_progress=True)
    click.echo(f"  {len(index)} images in {len(index.shards)} shard(s) at {index.path}")
    lap("index", t)

    _step(6, "Searching")
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

    _step(7, "Measuring every model on the target test split (text → image)")
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
    # Where the teacher stood before its target fine-tuning: how much the target domain asks for.
    metrics["teacher_general"] = recall(prepared.teacher_general, test_pairs)
    lap("measure", t)
    timings["total"] = round(time.perf_counter() - started, 1)

    table = format_table(list(rows.values()), rows["teacher"].t2i_r1)
    conclusion = verdict(rows)
    note = (f"Target test split: {len(test.images())} images, {len(test)} captions, text → image; "
            f"seed {plan.seed}; {'quick' if quick else 'full'} demo, {timings['total']:.0f} s on "
            f"{os.cpu_count()} CPU core(s). The teacher before its target fine-tuning: Recall@1 "
            f"{metrics['teacher_general']['t2i_R@1']:.1f}.")
    click.echo("\n" + table + "\n\n" + conclusion + "\n" + note)
    results = {
        "table": [asdict(row) for row in rows.values()],
        "metrics": metrics,
        "verdict": conclusion,
        "examples": examples,
        "timings_s": timings,
        "plan": asdict(plan),
        "quick": quick,
        "machine": _machine(),
        "heldout_combinations": [list(pair) for pair in prepared.heldout],
        "target_only_combinations": [list(pair) for pair in prepared.target_only],
        "export_parity": export.manifest.get("parity"),
        "paths": {"teacher": str(teacher_dir), "student": str(kd_dir), "index": str(out / "index")},
    }
    (out / "results.json").write_text(json.dumps(results, indent=2, default=str) + "\n")
    (out / "results.md").write_text(f"# vkd demo results\n\n{table}\n\n{conclusion}\n\n{note}\n")
    click.echo(f"\nWrote {out / 'results.md'} and {out / 'results.json'}.")
    return results


def _machine() -> dict[str, Any]:
    import torch

    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    return {"cpus": os.cpu_count(), "python": platform.python_version(), "torch": torch.__version__,
            "load_average_1min_at_end": load}


def _captions(pairs_path: Path) -> dict[str, str]:
    """Resolved image path -> its first caption, for showing what a hit is."""
    captions = {}
    for line in pairs_path.read_text().splitlines():
        record = json.loads(line)
        texts = record["text"] if isinstance(record["text"], list) else [record["text"]]
        captions[str((pairs_path.parent / record["image"]).resolve())] = texts[0]
    return captions


# ---------------------------------------------------------------- choosing the KD settings: --sweep

# A coordinate search, so that it fits minutes rather than hours: (weight, temperature) on a
# grid at the plan's steps with KL alone; then the loss mix at the best pair; then the steps.
SWEEP_GRID: dict[str, list[Any]] = {
    "distillation_weight": [0.5, 0.8, 0.95],
    "temperature": [1.0, 2.0, 4.0],
    "loss": [["kl_divergence"], ["kl_divergence", "feature_mse"]],
    "epochs_factor": [0.5, 1],
}
# The test suite's budget: two KD runs and the CE baseline on the quick plan.
TINY_GRID: dict[str, list[Any]] = {
    "distillation_weight": [0.5, 0.8],
    "temperature": [2.0],
    "loss": [["kl_divergence"]],
    "epochs_factor": [1],
}


def _val_score(metrics: dict[str, float]) -> tuple[float, float]:
    # R@1 first (the figure the demo reports), rsum to break ties
    return metrics["t2i_R@1"], sum(v for k, v in metrics.items() if "_R@" in k)


def run_sweep(out_dir: str | os.PathLike[str] | None = None, *, quick: bool = False, seed: int = 0,
              grid: dict[str, list[Any]] | None = None, results_dir: str | os.PathLike[str] = "benchmarks",
              name: str = "demo_sweep", workers: int | None = None) -> dict[str, Any]:
    """Choose the fine-tuning settings on the target val split; write ``{name}.json`` and ``.md``.

    A coordinate search: (weight, temperature) with the grid's first loss at the plan's epochs, then
    the loss mix at the best pair, then the epochs; CE-only at each epoch count for comparison.
    Runs that do not depend on an earlier choice train side by side (``workers``, default the plan's).
    """
    from vkd.paths import default_demo_dir

    plan = replace(QUICK if quick else FULL, seed=seed)
    if workers is not None:
        plan = replace(plan, workers=workers)
    grid = grid or SWEEP_GRID
    out = Path(out_dir) if out_dir is not None else default_demo_dir().with_name("demo-sweep")
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    prepared = prepare(out, plan)
    val = prepared.target / "val.jsonl"
    trained: dict[tuple, dict[str, Any]] = {}  # a point's key -> its run, in training order

    def key(kd: bool, epochs: int, weight: float, temperature: float, loss: list[str]) -> tuple:
        return (kd, epochs, weight, temperature, tuple(loss)) if kd else (kd, epochs)

    def train(points: Sequence[tuple[bool, int, float, float, list[str]]]) -> list[dict[str, Any]]:
        """Each point's run (trained once: the coordinate search revisits points), side by side."""
        todo = {key(*point): point for point in points if key(*point) not in trained}
        if todo:
            labels = {k: f"kd-w{weight}-T{temperature}-{'+'.join(loss)}-e{epochs}" if kd else f"ce-e{epochs}"
                      for k, (kd, epochs, weight, temperature, loss) in todo.items()}
            click.secho(f"\n[sweep] {', '.join(labels.values())}", bold=True)
            t = time.perf_counter()
            models = run_trainings({labels[k]: [finetune_run(out / "sweep" / labels[k], prepared, plan, kd=kd,
                                                             epochs=epochs, temperature=temperature, weight=weight,
                                                             loss=loss)]
                                    for k, (kd, epochs, weight, temperature, loss) in todo.items()},
                                   plan.workers, out / "logs")
            seconds = round(time.perf_counter() - t, 1)
            for k, (kd, epochs, weight, temperature, loss) in todo.items():
                label = labels[k]
                trained[k] = {"label": label, "kd": kd, "epochs": epochs,
                              "distillation_weight": weight if kd else None,
                              "temperature": temperature if kd else None, "loss": loss if kd else None,
                              "val": recall(models[label], val), "batch_seconds": seconds, "runs_in_batch": len(todo),
                              "point": [kd, epochs, weight, temperature, loss]}
                shutil.rmtree(out / "sweep" / label, ignore_errors=True)  # only the figures are kept
        return [trained[key(*point)] for point in points]

    def best_of(entries: list[dict[str, Any]]) -> dict[str, Any]:
        return max(entries, key=lambda e: _val_score(e["val"]))

    base = plan.finetune_epochs
    loss0 = list(grid["loss"][0])
    epoch_counts = sorted({max(1, round(base * f)) for f in grid["epochs_factor"]})
    # the (weight, temperature) grid and the CE-only baselines depend on no choice: one batch
    first = train([(True, base, w, temp, loss0) for w in grid["distillation_weight"] for temp in grid["temperature"]]
                  + [(False, epochs, 0.0, 1.0, loss0) for epochs in epoch_counts])
    best = best_of([entry for entry in first if entry["kd"]])
    best = best_of(train([(True, base, best["distillation_weight"], best["temperature"], list(mix))
                          for mix in grid["loss"]]))
    best = best_of(train([(True, epochs, best["distillation_weight"], best["temperature"], best["loss"])
                          for epochs in epoch_counts]))
    runs = list(trained.values())
    ce = {entry["epochs"]: entry for entry in runs if not entry["kd"]}
    references = {"teacher": recall(prepared.teacher, val), "raw": recall(prepared.raw, val)}
    chosen = {"distillation_weight": best["distillation_weight"], "temperature": best["temperature"],
              "loss": best["loss"], "finetune_epochs": best["epochs"]}
    in_plan = {"distillation_weight": plan.distillation_weight, "temperature": plan.temperature,
               "loss": list(plan.loss), "finetune_epochs": plan.finetune_epochs}
    result = {
        "command": f"vkd demo --sweep{' --quick' if quick else ''} --seed {seed}",
        "split": "target val", "plan": "quick" if quick else "full", "seed": seed, "grid": grid,
        "workers": plan.workers, "runs": runs, "reference": references, "chosen": chosen, "plan_uses": in_plan,
        "plan_matches_choice": chosen == in_plan,
        "ce_at_chosen_steps": ce[best["epochs"]]["val"],
        "seconds": round(time.perf_counter() - started, 1), "machine": _machine(),
    }
    target = Path(results_dir)
    target.mkdir(parents=True, exist_ok=True)
    (target / f"{name}.json").write_text(json.dumps(result, indent=2) + "\n")
    (target / f"{name}.md").write_text(_sweep_markdown(result))
    click.echo(f"\nchosen on val: {chosen}; the {result['plan']} plan uses {in_plan}"
               f"{'' if result['plan_matches_choice'] else ' (DIFFERENT: update DemoPlan)'}")
    click.echo(f"Wrote {target / (name + '.md')} and {target / (name + '.json')}.")
    return result


def _sweep_markdown(result: dict[str, Any]) -> str:
    ref = result["reference"]
    lines = [f"# vkd demo: fine-tuning settings chosen on the {result['split']} split", "",
             f"Command: `{result['command']}` ({result['plan']} plan, seed {result['seed']}; "
             f"{result['seconds']:.0f} s on {result['machine']['cpus']} CPU core(s), "
             f"1-min load {result['machine']['load_average_1min_at_end']:.1f} at the end).", "",
             "A coordinate search: (weight, temperature) with KL at the plan's steps, then the loss mix "
             "at the best pair, then the steps; CE-only at each step count for comparison. Text → image "
             "Recall on the target val split; the test split is not used.", "",
             f"Teacher (fine-tuned on target): R@1 {ref['teacher']['t2i_R@1']:.1f}; raw student: "
             f"R@1 {ref['raw']['t2i_R@1']:.1f}.", "",
             "Runs listed together trained side by side; s is their batch's wall time.", "",
             "| run | w | T | loss | epochs | val R@1 | val R@5 | val R@10 | batch s |",
             "|---|---|---|---|---|---|---|---|---|"]
    for run in result["runs"]:
        v = run["val"]
        lines.append(f"| {'CE + KD' if run['kd'] else 'CE only'} | {run['distillation_weight'] or '—'} | "
                     f"{run['temperature'] or '—'} | {' + '.join(run['loss']) if run['loss'] else '—'} | "
                     f"{run['epochs']} | {v['t2i_R@1']:.1f} | {v['t2i_R@5']:.1f} | {v['t2i_R@10']:.1f} | "
                     f"{run['batch_seconds']:.0f} |")
    c = result["chosen"]
    lines += ["", f"Chosen (best val R@1, rsum breaking ties): w = {c['distillation_weight']}, "
                  f"T = {c['temperature']}, loss = {' + '.join(c['loss'])}, {c['finetune_epochs']} epoch(s). "
                  + ("The demo's plan already used these when the sweep ran." if result["plan_matches_choice"]
                     else f"When the sweep ran, the plan used {_settings(result['plan_uses'])}; the full plan "
                          "(`FULL` in vkd/demo.py) takes this choice, and tests/test_demo.py checks that it does."),
              ""]
    return "\n".join(lines)


def _settings(s: dict[str, Any]) -> str:
    return (f"w = {s['distillation_weight']}, T = {s['temperature']}, loss = {' + '.join(s['loss'])}, "
            f"{s['finetune_epochs']} epoch(s)")


# ---------------------------------------------------------------- the final table: --seeds

ROW_KEYS = ("teacher", "raw", "ce", "kd", "kd_int8", "two_stage")


def _spread(values: Sequence[float]) -> dict[str, float]:
    return {"mean": statistics.fmean(values), "sd": statistics.stdev(values) if len(values) > 1 else 0.0,
            "min": min(values), "max": max(values), "n": len(values)}


def run_seeds(seeds: Sequence[int], out_dir: str | os.PathLike[str] | None = None, *, quick: bool = False,
              results_dir: str | os.PathLike[str] = "benchmarks", name: str = "demo_seeds") -> dict[str, Any]:
    """The demo once per seed (data, models, everything); the table as mean ± sd over seeds."""
    from vkd.paths import default_demo_dir

    out = Path(out_dir) if out_dir is not None else default_demo_dir().with_name("demo-seeds")
    per_seed = {}
    started = time.perf_counter()
    for seed in seeds:
        click.secho(f"\n======== seed {seed} ========", bold=True)
        per_seed[seed] = run_demo(out / f"seed-{seed}", quick=quick, seed=seed)
    table = {}
    for i, key in enumerate(ROW_KEYS):
        rows = [per_seed[s]["table"][i] for s in seeds]
        teacher = [per_seed[s]["table"][0]["t2i_r1"] for s in seeds]
        table[key] = {"model": rows[0]["model"], "params": rows[0]["params"],
                      "t2i_r1": _spread([r["t2i_r1"] for r in rows]),
                      "t2i_r5": _spread([r["t2i_r5"] for r in rows]),
                      "retention": _spread([100 * r["t2i_r1"] / t for r, t in zip(rows, teacher, strict=True)])}
    r1 = {key: [per_seed[s]["table"][i]["t2i_r1"] for s in seeds] for i, key in enumerate(ROW_KEYS)}
    kd_minus_ce = [k - c for k, c in zip(r1["kd"], r1["ce"], strict=True)]
    raw_to_teacher = [r - t for r, t in zip(r1["raw"], r1["teacher"], strict=True)]
    result = {
        "command": f"vkd demo --seeds {','.join(map(str, seeds))}{' --quick' if quick else ''}",
        "seeds": list(seeds), "quick": quick, "table": table,
        "kd_minus_ce": _spread(kd_minus_ce), "kd_minus_ce_per_seed": kd_minus_ce,
        "raw_minus_teacher": _spread(raw_to_teacher),
        "per_seed": {str(s): {"table": per_seed[s]["table"], "timings_s": per_seed[s]["timings_s"],
                              "teacher_general": per_seed[s]["metrics"]["teacher_general"]} for s in seeds},
        "plan": per_seed[seeds[0]]["plan"], "seconds": round(time.perf_counter() - started, 1),
        "machine": _machine(),
    }
    target = Path(results_dir)
    target.mkdir(parents=True, exist_ok=True)
    (target / f"{name}.json").write_text(json.dumps(result, indent=2, default=str) + "\n")
    (target / f"{name}.md").write_text(seeds_markdown(result))
    click.echo("\n" + seeds_markdown(result))
    click.echo(f"Wrote {target / (name + '.md')} and {target / (name + '.json')}.")
    return result


def _pm(s: dict[str, float], digits: int = 1) -> str:
    return f"{s['mean']:.{digits}f} ± {s['sd']:.{digits}f}"


def difference_statement(diffs: Sequence[float], what: str) -> str:
    """Says whether a paired difference over seeds stands out of its spread."""
    s = _spread(diffs)
    each = ", ".join(f"{d:+.1f}" for d in diffs)
    if len(diffs) > 1 and (s["min"] > 0 or s["max"] < 0) and abs(s["mean"]) > s["sd"]:
        return f"{what}: {s['mean']:+.1f} ± {s['sd']:.1f} (per seed {each}): the same sign on every seed."
    return (f"{what}: {s['mean']:+.1f} ± {s['sd']:.1f} (per seed {each}): within the spread over seeds, "
            "not a difference this run can claim.")


def seeds_markdown(result: dict[str, Any]) -> str:
    n = len(result["seeds"])
    lines = [f"# vkd demo over {n} seeds", "",
             f"Command: `{result['command']}`; {result['seconds']:.0f} s on {result['machine']['cpus']} CPU "
             f"core(s) (1-min load {result['machine']['load_average_1min_at_end']:.1f} at the end). "
             "Each seed makes its own data, teacher and students. Text → image on the target test split; "
             f"mean ± sample sd over {n} seeds.", "",
             "| model | Recall@1 | Recall@5 | params | vs teacher R@1 |", "|---|---|---|---|---|"]
    for row in result["table"].values():
        lines.append(f"| {row['model']} | {_pm(row['t2i_r1'])} | {_pm(row['t2i_r5'])} | {row['params']:,} | "
                     f"{_pm(row['retention'], 0)}% |")
    lines += ["", difference_statement(result["kd_minus_ce_per_seed"], "Distilled − CE-only, Recall@1"),
              f"Raw student − teacher, Recall@1: {_pm(result['raw_minus_teacher'])}.", ""]
    return "\n".join(lines)


@click.command()
@click.option("--out", type=click.Path(file_okay=False), default=None,
              help="Output directory [default: $VKD_HOME/demo, i.e. ~/.cache/vkd/demo].")
@click.option("--quick", is_flag=True, help="Smaller data and fewer steps (about a minute).")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the data and of every model.")
@click.option("--sweep", is_flag=True,
              help="Instead of the demo: choose the fine-tuning settings on the target val split and write "
                   "demo_sweep.{json,md} into --results.")
@click.option("--seeds", default=None, metavar="0,1,2",
              help="Instead of one demo: one per seed, and the table as mean ± sd, written as "
                   "demo_seeds.{json,md} into --results.")
@click.option("--results", type=click.Path(file_okay=False), default="benchmarks", show_default=True,
              help="Where --sweep and --seeds write their JSON and Markdown.")
def demo(out: str | None, quick: bool, seed: int, sweep: bool, seeds: str | None, results: str) -> None:
    """Run the whole pipeline on synthetic scenes, on a CPU, with nothing downloaded:
    general and target-domain data, a teacher and a student pre-trained on general, the
    teacher fine-tuned on target, CE-only and distilled students, ONNX INT8, index, search,
    and a Recall table measured on the target test split.

    \b
    Examples:
      vkd demo                       # ~5 minutes on 2 cores
      vkd demo --quick --out /tmp/d  # ~1 minute
      vkd search "a dog on a beach"  # afterwards: searches the demo index
      vkd demo --sweep               # how the fine-tuning settings were chosen (val split)
      vkd demo --seeds 0,1,2         # the final table over three seeds
    """
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if sweep and seeds:
        raise click.UsageError("--sweep and --seeds: choose one")
    if sweep:
        run_sweep(out, quick=quick, seed=seed, results_dir=results)
        return
    if seeds:
        try:
            chosen = [int(part) for part in seeds.split(",") if part.strip()]
        except ValueError:
            raise click.BadParameter(f"{seeds!r}: give seeds as integers separated by commas, e.g. 0,1,2",
                                     param_hint="--seeds") from None
        if len(chosen) < 2 or len(set(chosen)) != len(chosen) or min(chosen) < 0:
            raise click.BadParameter(f"{seeds!r}: give at least two different non-negative seeds",
                                     param_hint="--seeds")
        run_seeds(chosen, out, quick=quick, results_dir=results)
        return
    run_demo(out, quick=quick, seed=seed)
    if out is not None:
        from vkd.paths import default_index_dir

        if Path(out).resolve() / "index" != default_index_dir().resolve():
            click.echo(f"To search this index: vkd search \"a dog on a beach\" --index {Path(out) / 'index'}")
