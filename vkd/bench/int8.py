"""INT8 recipes measured: each recipe's copy of every exported graph against fp32.

``int8_variants(model_dir)`` exports the model's fp32 graphs once (``vkd.export``, its parity
check included), makes the INT8 copy of each graph with every recipe of
``vkd.export.int8.RECIPES`` and measures, per graph and variant, the model's own time at
batch 1 and at ``batch`` (feeds tokenised / preprocessed beforehand, so the figures are the
graph's, not the tokenizer's), the cosine of its vectors to the fp32 graph's on the same
inputs, the file size and the quantised ops. Baselines: ONNX fp32 and the torch model in
fp32 on the same inputs. CLIP-style text towers are also timed padded to ``max_length``, the
fixed length SigLIP needs, to show what padding costs.

``vkd export MODEL --int8-variants`` prints the table; ``vkd bench real`` calls the function.
The timing loop is short by design (a probe, not the published benchmark): on a busy
machine use ``clock="cpu"`` with ``threads=1``, which counts the CPU time of the one thread
ONNX Runtime then computes on and so ignores waiting for a core.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from vkd.bench.report import markdown_table
from vkd.bench.timing import latency_summary

#: Caption-like queries (the parity samples minus the empty and the over-long one).
QUERIES = [
    "a dog on a beach", "A RED CAR parked near the lake at night",
    "two small cats sitting on a blue sofa next to a window", "café crème, s'il vous plaît 🐶", "sky",
    "a child playing with a yellow ball in a green field on a sunny day, photo", "white boat under a bridge",
    "bird flying over the sea", "man and woman walking in the snow", "close up of a flower",
]
CLOCKS = ("wall", "cpu")
#: Text towers with a max_length at most this are also timed padded to it (SigLIP's fixed
#: 64, CLIP's 77); Qwen3-VL's 8192 is a bound, not a length anyone pads to.
PAD_TIMING_MAX_LENGTH = 512


@dataclass
class Int8Settings:
    batch: int = 32
    repeats: int = 5  # timed calls per (graph, batch size) at least
    warmup: int = 1
    min_seconds: float = 1.0  # go on timing fast calls until this much time was spent ...
    max_repeats: int = 50  # ... up to this many calls
    threads: int | None = None  # ONNX Runtime intra-op and torch threads (None: the libraries' defaults)
    clock: str = "wall"  # "wall" (perf_counter) or "cpu" (process CPU time; use with threads=1)
    torch_baseline: bool = True
    all_buckets: bool = False  # time every image bucket of a bucketed export (default: the first)

    @classmethod
    def quick(cls) -> Int8Settings:
        return cls(batch=8, repeats=2, warmup=1, min_seconds=0.2, max_repeats=5)


def _clock(name: str) -> Callable[[], float]:
    if name not in CLOCKS:
        raise ValueError(f"clock={name!r}: choose one of {', '.join(CLOCKS)}")
    return time.perf_counter if name == "wall" else time.process_time


def _time(fn: Callable[[], Any], settings: Int8Settings) -> float:
    """p50 milliseconds per call of ``fn``."""
    clock = _clock(settings.clock)
    for _ in range(settings.warmup):
        fn()
    seconds: list[float] = []
    spent = 0.0
    while len(seconds) < settings.repeats or (spent < settings.min_seconds and len(seconds) < settings.max_repeats):
        start = clock()
        fn()
        elapsed = clock() - start
        seconds.append(elapsed)
        spent += elapsed
    return float(latency_summary(seconds)["p50_ms"])


def _session(path: Path, threads: int | None) -> Any:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    if threads:
        options.intra_op_num_threads = int(threads)
    return ort.InferenceSession(str(path), sess_options=options, providers=["CPUExecutionProvider"])


@dataclass
class _Graph:
    """One exported graph and the feeds it is timed on."""

    key: str  # "text", "text@max_length", "image", "image 448x448"
    tower: str
    fp32: Path
    batch_feed: dict[str, np.ndarray]
    one_feed: dict[str, np.ndarray]
    torch_batch: Callable[[], Any] | None = None
    torch_one: Callable[[], Any] | None = None


def _graphs(export_dir: Path, settings: Int8Settings, torch_encoder: Any | None) -> list[_Graph]:
    from PIL import Image

    from vkd.export import OnnxEncoder
    from vkd.export.onnx_export import sample_images
    from vkd.export.preprocess import TextTokenizer

    encoder = OnnxEncoder(export_dir, precision="fp32")
    texts = [QUERIES[index % len(QUERIES)] for index in range(settings.batch)]
    images = sample_images(settings.batch)
    spec = encoder.manifest["text"]
    graphs = [_Graph("text", "text", encoder.model_path("text"), encoder.text_inputs(texts),
                     encoder.text_inputs(texts[:1]))]
    if spec.get("padding") == "longest" and int(spec["max_length"]) <= PAD_TIMING_MAX_LENGTH:
        padded = TextTokenizer(export_dir / spec["tokenizer"], {**spec, "padding": "max_length"})
        graphs.append(_Graph("text@max_length", "text", encoder.model_path("text"), padded(texts), padded(texts[:1])))
    buckets = encoder.image_buckets
    if encoder.has_image_tower and buckets:
        for bucket in buckets if settings.all_buckets else buckets[:1]:
            resized = [image.convert("RGB").resize(bucket, resample=Image.Resampling.BICUBIC) for image in images]
            graphs.append(_Graph(f"image {bucket[0]}x{bucket[1]}", "image", encoder.model_path("image", bucket),
                                 encoder.image_inputs(resized, bucket=bucket),
                                 encoder.image_inputs(resized[:1], bucket=bucket)))
            if not encoder.shares_language_model:  # the whole image path: comparable with torch's
                graphs[-1].torch_batch, graphs[-1].torch_one = _torch_calls(torch_encoder, "image", resized)
        if encoder.shares_language_model:
            # the language model the buckets share, on the first bucket's fp32 outputs (the vision
            # rows above time the bucket graph alone; the two add up to an image)
            from vkd.export.onnx_encoder import LANGUAGE_MODEL

            first = next(graph for graph in graphs if graph.tower == "image")
            vision = encoder._session("image", buckets[0])

            def language_feed(feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
                outputs = vision.run(None, feed)
                return {output.name: value for output, value in zip(vision.get_outputs(), outputs, strict=True)}

            graphs.append(_Graph("image language model", "image", encoder.model_path("image", LANGUAGE_MODEL),
                                 language_feed(first.batch_feed), language_feed(first.one_feed)))
    elif encoder.has_image_tower:
        graphs.append(_Graph("image", "image", encoder.model_path("image"), encoder.image_inputs(images),
                             encoder.image_inputs(images[:1])))
        graphs[-1].torch_batch, graphs[-1].torch_one = _torch_calls(torch_encoder, "image", images)
    for graph in graphs:
        if graph.tower == "text":
            if graph.key == "text":
                graph.torch_batch, graph.torch_one = _torch_calls(torch_encoder, "text", texts)
            else:  # the torch model on the same max_length-padded ids
                graph.torch_batch, graph.torch_one = _torch_calls(torch_encoder, "text", texts, graph)
    return graphs


def _torch_calls(encoder: Any | None, tower: str, items: Sequence[Any],
                 padded: _Graph | None = None) -> tuple[Callable[[], Any] | None, Callable[[], Any] | None]:
    if encoder is None:
        return None, None
    import torch

    def call(inputs: dict[str, Any]) -> Callable[[], Any]:
        embed = encoder.embed_text if tower == "text" else encoder.embed_images

        def run() -> Any:
            with torch.inference_mode():
                return embed(inputs)
        return run

    if padded is not None:
        batch = {name: torch.from_numpy(array) for name, array in padded.batch_feed.items()}
        one = {name: torch.from_numpy(array) for name, array in padded.one_feed.items()}
        return call(batch), call(one)
    prepare = encoder.tokenize if tower == "text" else encoder.preprocess
    return call(prepare(list(items))), call(prepare(list(items[:1])))


def int8_variants(
    model_dir: str | os.PathLike[str],
    *,
    recipes: Sequence[str] | None = None,
    workdir: str | os.PathLike[str] | None = None,
    image_buckets: str | Sequence[Any] | None = None,
    settings: Int8Settings | None = None,
    progress: Callable[[str], None] = lambda message: None,
    **load_options: Any,
) -> list[dict[str, Any]]:
    """Rows, one per (graph, variant): the fp32 baselines ("torch fp32", "onnx fp32") and every
    INT8 recipe (default: all of ``RECIPES``). Each row: ``variant``, ``graph``, ``batch``,
    ``ms_batch1``, ``ms_per_item`` (at ``batch``), ``speedup_vs_onnx_fp32`` and
    ``speedup_vs_torch_fp32`` (``{"batch1", "batch"}``), ``cosine_vs_fp32`` (``{"min", "mean",
    "n"}`` against the fp32 ONNX graph on the batch), ``bytes``, ``ops`` (quantised op counts),
    ``recipe`` (the recipe's settings), ``clock``, ``threads`` and ``error`` (a recipe that
    failed to quantise or run: the message, no numbers)."""
    from vkd.export import export_onnx
    from vkd.export.int8 import RECIPES, attention_shape, get_recipe, op_counts, quantize_int8
    from vkd.models import load_encoder

    settings = settings or Int8Settings()
    _clock(settings.clock)
    chosen = [get_recipe(name) for name in (recipes or list(RECIPES))]
    scratch = Path(workdir) if workdir is not None else Path(tempfile.mkdtemp(prefix="vkd-int8-variants-"))
    scratch.mkdir(parents=True, exist_ok=True)
    try:
        if settings.threads:
            import torch

            torch.set_num_threads(int(settings.threads))
        progress("exporting the fp32 graphs (with the parity check)")
        exported = export_onnx(model_dir, scratch / "fp32", int8="none", image_buckets=image_buckets, **load_options)
        options = exported.manifest["source"].get("options") or {}
        torch_encoder = None
        if settings.torch_baseline:
            keep = {key: value for key, value in options.items() if value is not None}
            torch_encoder = load_encoder(model_dir, device="cpu", dtype="float32", prefer="torch", **keep)
        graphs = _graphs(exported.out_dir, settings, torch_encoder)
        family = str(exported.manifest["source"]["family"])
        rows: list[dict[str, Any]] = []
        for graph in graphs:
            progress(f"{graph.key}: fp32 baselines")
            base = _measure(graph, graph.fp32, settings, "onnx fp32", None)
            reference = base.pop("_vectors")
            base["cosine_vs_fp32"] = {"min": 1.0, "mean": 1.0, "n": int(reference.shape[0])}
            graph_rows = [base]
            if graph.torch_batch is not None and graph.torch_one is not None:
                graph_rows.insert(0, _measure_torch(graph, settings, reference))
            heads, hidden = attention_shape(torch_encoder, graph.tower) if torch_encoder is not None else (0, 0)
            for recipe in chosen:
                progress(f"{graph.key}: {recipe.name}")
                target = scratch / recipe.name / f"{graph.fp32.stem}.int8.onnx"
                target.parent.mkdir(parents=True, exist_ok=True)
                try:
                    if not target.exists():  # the text@max_length row reuses the text graph's copy
                        quantize_int8(graph.fp32, target, recipe, family=family, tower=graph.tower,
                                      heads=heads, hidden=hidden)
                    row = _measure(graph, target, settings, recipe.name, recipe.describe())
                    vectors = row.pop("_vectors")
                    cos = np.sum(vectors.astype(np.float64) * reference.astype(np.float64), axis=1)
                    row["cosine_vs_fp32"] = {"min": float(cos.min()), "mean": float(cos.mean()), "n": int(cos.size)}
                    row["ops"] = op_counts(target)
                except Exception as error:  # a recipe that breaks is a finding, not a crash
                    row = {"variant": recipe.name, "graph": graph.key, "recipe": recipe.describe(),
                           "error": f"{type(error).__name__}: {error}"}
                graph_rows.append(row)
            for row in graph_rows:
                row.update(clock=settings.clock, threads=settings.threads, batch=settings.batch)
                _speedups(row, graph_rows)
            rows += graph_rows
        return rows
    finally:
        if workdir is None:
            shutil.rmtree(scratch, ignore_errors=True)


def _measure(graph: _Graph, path: Path, settings: Int8Settings, variant: str,
             recipe: dict[str, Any] | None) -> dict[str, Any]:
    from vkd.export.layout import graph_bytes  # a graph's size includes its external data

    session = _session(path, settings.threads)
    vectors = session.run(None, graph.batch_feed)[0]
    if vectors.ndim > 2:  # a bucket graph's first output (the language model's input): compared per sample
        flat = vectors.reshape(len(vectors), -1).astype(np.float64)
        vectors = flat / np.linalg.norm(flat, axis=1, keepdims=True)
    batch_ms = _time(lambda: session.run(None, graph.batch_feed), settings)
    one_ms = _time(lambda: session.run(None, graph.one_feed), settings)
    return {"variant": variant, "graph": graph.key, "recipe": recipe, "ms_batch1": one_ms,
            "ms_per_item": batch_ms / settings.batch, "bytes": graph_bytes(path), "error": None,
            "_vectors": vectors}


def _measure_torch(graph: _Graph, settings: Int8Settings, reference: np.ndarray) -> dict[str, Any]:
    assert graph.torch_batch is not None and graph.torch_one is not None
    vectors = graph.torch_batch().float().numpy()
    cos = np.sum(vectors.astype(np.float64) * reference.astype(np.float64), axis=1)
    return {"variant": "torch fp32", "graph": graph.key, "recipe": None,
            "ms_batch1": _time(graph.torch_one, settings),
            "ms_per_item": _time(graph.torch_batch, settings) / settings.batch, "bytes": None, "error": None,
            "cosine_vs_fp32": {"min": float(cos.min()), "mean": float(cos.mean()), "n": int(cos.size)}}


def _speedups(row: dict[str, Any], graph_rows: list[dict[str, Any]]) -> None:
    if row.get("error"):
        return
    for base_name, key in (("onnx fp32", "speedup_vs_onnx_fp32"), ("torch fp32", "speedup_vs_torch_fp32")):
        base = next((r for r in graph_rows if r["variant"] == base_name and not r.get("error")), None)
        if base is None:
            row[key] = None
            continue
        row[key] = {"batch1": base["ms_batch1"] / row["ms_batch1"], "batch": base["ms_per_item"] / row["ms_per_item"]}


def best_recipe(rows: Sequence[dict[str, Any]], graph: str, *, min_cosine: float = 0.999,
                at: str = "batch") -> dict[str, Any] | None:
    """The fastest INT8 row of ``graph`` (at ``at``: "batch" or "batch1") whose min cosine to
    fp32 is at least ``min_cosine``; None when none is."""
    candidates = [row for row in rows if row["graph"] == graph and row.get("recipe") and not row.get("error")
                  and row["cosine_vs_fp32"]["min"] >= min_cosine]
    field = "ms_per_item" if at == "batch" else "ms_batch1"
    return min(candidates, key=lambda row: row[field], default=None)


def markdown(rows: Sequence[dict[str, Any]]) -> str:
    """The rows as a Markdown table (speedups against ONNX fp32 and torch fp32)."""
    batch = next((row["batch"] for row in rows if "batch" in row), 32)

    def speed(row: dict[str, Any], key: str, at: str) -> float | None:
        value = row.get(key)
        return value[at] if value else None

    table = []
    for row in rows:
        if row.get("error"):
            table.append([row["graph"], row["variant"], *([None] * 9), row["error"][:80]])
            continue
        cos = row["cosine_vs_fp32"]
        table.append([
            row["graph"], row["variant"], row["ms_batch1"], row["ms_per_item"],
            speed(row, "speedup_vs_onnx_fp32", "batch1"), speed(row, "speedup_vs_onnx_fp32", "batch"),
            speed(row, "speedup_vs_torch_fp32", "batch1"), speed(row, "speedup_vs_torch_fp32", "batch"),
            f"{cos['min']:.5f}", row["bytes"] / 2**20 if row.get("bytes") else None,
            ", ".join(f"{op} {n}" for op, n in sorted((row.get("ops") or {}).items())
                      if op in ("MatMulInteger", "ConvInteger", "Conv", "DequantizeLinear")) or None,
            None,
        ])
    return markdown_table(
        ["graph", "variant", "ms b1", f"ms/item b{batch}", "x onnx b1", f"x onnx b{batch}", "x torch b1",
         f"x torch b{batch}", "min cos vs fp32", "MiB", "quantised ops", "error"],
        table, align=["l", "l"] + ["r"] * 8 + ["l", "l"], digits=3,
    )
