"""``vkd bench real``: costs at the real model sizes, on random weights of the real shapes.

Speed and memory do not need trained weights (DESIGN.md, "Encoders"): ``vkd model random``
builds CLIP ViT-B/32 … Qwen3-VL-Embedding-8B with the published configs and random weights,
and this benchmark measures, side by side in one run:

a. **Encoding** per model and backend (torch fp32, torch bf16 where the CPU runs it, ONNX
   fp32 and INT8 made by ``vkd export``): image and query ms per item at batch 1 and 32,
   peak RSS (each backend in its own process), model bytes on disk, cosine of each backend
   to torch fp32 (``vkd.bench.realencode``). Models too slow or too big to time whole are
   measured as two depth-truncated copies and extrapolated per layer; the figures say so
   and carry the formula. An extrapolation check times ViT-B/32 both ways.
b. **A full query end to end** at 1M vectors of the real dimensions: student encode +
   ANN + teacher encode + rerank against teacher encode + exact search, with RAM and disk
   of each configuration, stage 1 on a Matryoshka prefix, and stage 1 through vkd against
   the same FAISS index called directly (``vkd.bench.realsearch``).
c. **Indexing**: ``build_index`` images/s against the encoder alone, with the student's
   ONNX export and with torch (``prefer``), and the teacher's share when its vectors are stored.
d. **Search quality** at the real dimensions: overlap@10 with teacher-only and Recall@10
   (of the synthetic vector model: random models have no quality to measure).

Every timing is the median over repeated rounds with its spread; ratios are taken within
each round (``vkd.bench.timing``). The full run is sized for about 20 minutes on two cores
(see ``RealSettings``); ``--quick`` is a functional check of the same code paths.
"""

from __future__ import annotations

import gc
import json
import os
import shutil
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from vkd.bench.report import BenchResult, Figure, markdown_table
from vkd.bench.timing import (
    MIB,
    format_ratio,
    format_spread,
    ratio_spread,
    spread,
)

GIB = 1024.0**3
BACKENDS = ("torch-fp32", "torch-bf16", "onnx-fp32", "onnx-int8")
#: every arch of `vkd model random`: both towers of each, INT8 included, at every real size
DEFAULT_ARCHS = ("clip-vit-b32", "clip-vit-b16", "siglip-base-patch16-224", "clip-vit-l14", "qwen3-vl-embedding-2b",
                 "qwen3-vl-embedding-8b")
QUICK_ARCHS = ("clip-vit-b32",)
#: archs cheap enough to time at their real depth on two cores (a batch of 32 images in ~1 s)
FULL_DEPTH_ARCHS = ("clip-vit-b32",)
#: Peak RSS of ``vkd export`` (fp32 + dynamic INT8, parity-checked), two phases: the torch
#: model and its export (~1.5x the fp32 weights), then onnxruntime's quantizer, which holds
#: ~3.6x the bytes of the graph it quantises (11.8 GB for a 3.3 GB text graph), plus the
#: interpreter and libraries. Measured: 10.5 GB for a 6-layer real-width Qwen3-VL 2B copy
#: (667 M parameters; text graph 2.45 GB: 3.6 x 2.45 + 1.5 = 10.3 GB).
EXPORT_TORCH_FACTOR, EXPORT_QUANTIZER_FACTOR, EXPORT_BASE_BYTES = 1.5, 3.6, 1.5 * 1024**3
#: torch fp32 is not timed for a model whose full fp32 weights exceed this share of the memory
FP32_MEMORY_SHARE = 0.8
#: Tiny test archs (``vkd.models.tiny``): the code paths of a real run in seconds, for tests.
#: Their "full" depth is a pretend 4 layers per stack, so extrapolation is exercised too.
TINY_ARCHS: dict[str, dict[str, Any]] = {
    "tiny-clip": {"family": "clip", "dim": 32, "full_layers": {"text": 4, "vision": 4}},
    "tiny-qwen3-vl": {"family": "qwen3-vl", "dim": 32, "full_layers": {"text": 4, "vision": 4}},
}
STATEMENT = ("Random weights at the real architectures' shapes (`vkd model random`): these figures are speed, "
             "memory and size, which do not depend on trained weights. Quality columns measure synthetic vectors "
             "at the real dimensions, not any trained model.")


@dataclass(frozen=True)
class ArchInfo:
    name: str
    family: str  # "dual" or "qwen3-vl"
    dim: int
    full_layers: dict[str, int]
    tiny: bool = False


def arch_info(name: str) -> ArchInfo:
    """Family, embedding size and real depth of an arch (``vkd.models.random.ARCHS`` or a tiny test arch)."""
    if name in TINY_ARCHS:
        spec = TINY_ARCHS[name]
        return ArchInfo(name, "qwen3-vl" if spec["family"] == "qwen3-vl" else "dual", spec["dim"],
                        dict(spec["full_layers"]), tiny=True)
    from vkd.models.random import get_arch

    arch = get_arch(name)
    return ArchInfo(name, "qwen3-vl" if arch.family == "qwen3-vl" else "dual", arch.dim,
                    {"text": arch.text_layers, "vision": arch.vision_layers})


def known_archs() -> list[str]:
    from vkd.models.random import ARCHS

    return [*ARCHS, *TINY_ARCHS]


@dataclass
class RealSettings:
    """What the run measures. The defaults fit about 20 minutes on two cores (see
    ``expected_minutes`` and the README): six archs (B/32 at its real depth; B/16, SigLIP
    base, L/14 and both Qwen3-VL models as copies of 1 and 2 layers per stack), 3 rounds, 224 × 224 images,
    1M vectors per pairing, 64 images to index."""

    archs: tuple[str, ...] = DEFAULT_ARCHS
    backends: tuple[str, ...] = BACKENDS
    rounds: int = 3
    b1_calls: int = 3
    batch: int = 32
    image_size: tuple[int, int] = (224, 224)
    truncated_layers: tuple[int, int] = (1, 2)
    full_depth_archs: tuple[str, ...] = FULL_DEPTH_ARCHS
    check_extrapolation: bool = True
    corpus_size: int = 1_000_000
    quality_queries: int = 300
    latency_queries: int = 10
    pairings: tuple[str, ...] = ("clip", "qwen3-vl")
    index_images: int = 64
    index_image_size: tuple[int, int] = (512, 384)
    threads: int | None = None
    #: skip torch fp32 for models whose full fp32 weights do not fit (the 8B: 35 GB)
    skip_unfit_fp32: bool = True
    quick: bool = False

    @classmethod
    def quick_settings(cls) -> RealSettings:
        return cls(archs=QUICK_ARCHS, rounds=2, b1_calls=2, full_depth_archs=(), check_extrapolation=False,
                   corpus_size=20_000, quality_queries=100, latency_queries=5, pairings=("clip",),
                   index_images=16, quick=True)


def cpu_bf16() -> dict[str, Any]:
    """Whether torch runs bf16 on this CPU: the CPU's flags, oneDNN's answer, and a try."""
    flags: set[str] = set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
                break
    except OSError:
        pass
    import torch

    info: dict[str, Any] = {
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "native_bf16": bool(flags & {"avx512_bf16", "amx_bf16"}),
        "amx": bool(flags & {"amx_bf16", "amx_tile"}),
    }
    try:
        info["onednn_bf16"] = bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        info["onednn_bf16"] = None
    try:
        a = torch.randn(64, 64, dtype=torch.bfloat16)
        (a @ a).float().sum().item()
        info["works"] = True
    except RuntimeError as error:
        info["works"] = False
        info["error"] = str(error)
    return info


# ---------------------------------------------------------------- models


def build_copy(arch: ArchInfo, layers: int | None, models_dir: Path, progress: Callable[[str], None]) -> Path:
    """A random model of ``arch`` with ``layers`` per stack (None: the real depth), built
    once into ``models_dir`` and reused by later runs (the weights depend on the seed only)."""
    tag = "full" if layers is None else f"L{layers}"
    out = models_dir / f"{arch.name}-{tag}"
    if (out / "config.json").is_file() and (out / "vkd.json").is_file():
        return out
    models_dir.mkdir(parents=True, exist_ok=True)
    if out.exists():
        shutil.rmtree(out)
    progress(f"building {arch.name} ({'real depth' if layers is None else f'{layers} layer(s) per stack'}), "
             "random weights")
    if arch.tiny:
        from vkd.models.tiny import build_tiny

        family = TINY_ARCHS[arch.name]["family"]
        depth = layers or arch.full_layers["text"]
        overrides: dict[str, Any] = {"layers": depth}
        if family == "qwen3-vl":
            overrides.update(vision_depth=depth, deepstack=[0])
        partial = models_dir / f".{out.name}.partial-{os.getpid()}"
        shutil.rmtree(partial, ignore_errors=True)
        build_tiny(family, partial, overrides=overrides)
        os.replace(partial, out)
        return out
    from vkd.models.random import build_random

    # the published storage dtype (bf16 for Qwen3-VL): the torch fp32 backend upcasts on load
    build_random(arch.name, out, layers=layers, progress=lambda message: progress(f"  {arch.name}: {message}"))
    return out


def make_copy(arch: ArchInfo, path: Path) -> Any:
    from vkd.bench.realencode import Copy, checkpoint_parameters
    from vkd.models.provenance import read_provenance

    parameters, stacks = checkpoint_parameters(path)
    record = read_provenance(path) or {}
    layers = {k: int(v) for k, v in (record.get("layers") or stacks).items()}
    full = {k: int(v) for k, v in (record.get("full_layers") or arch.full_layers).items()}
    return Copy(dir=path, layers=layers, full=layers == full, parameters=int(record.get("parameters") or parameters),
                full_parameters=int(record.get("full_parameters") or 0))


def export_copy(copy: Any, family: str, image_size: tuple[int, int], progress: Callable[[str], None],
                memory_bytes: float | None = None) -> None:
    """``vkd export`` of a copy (fp32 + dynamic INT8), reused when already there; records
    the result, or why there is none, in ``copy.onnx``. Graphs over 2 GiB (the 8B's
    embedding table alone is 2.5 GB in fp32) are written with external data; a copy whose
    export would not fit in ``memory_bytes`` is skipped with the reason."""
    from vkd.export.onnx_encoder import EXPORT_MANIFEST

    onnx_dir = copy.dir / "onnx"
    if (onnx_dir / EXPORT_MANIFEST).is_file():
        copy.onnx = _export_record(onnx_dir, reused=True)
        return
    needed = export_memory_bytes(copy.dir)
    if memory_bytes is not None and needed > FP32_MEMORY_SHARE * memory_bytes:
        copy.onnx = {"status": "skipped", "reason": (
            f"{copy.parameters:,} parameters are {copy.parameters * 4 / GIB:.1f} GiB in fp32; exporting needs about "
            f"{needed / GIB:.0f} GiB of memory, over {FP32_MEMORY_SHARE:.0%} of this machine's "
            f"{memory_bytes / GIB:.0f} GiB: use a copy with fewer layers (vkd model random --layers)")}
        return
    import inspect

    from vkd.export import ExportError
    from vkd.export.onnx_export import export_onnx

    accepted = inspect.signature(export_onnx).parameters
    options: dict[str, Any] = {}
    if family == "qwen3-vl" and "image_buckets" in accepted:
        options["image_buckets"] = f"{image_size[0]}x{image_size[1]}"  # the image side, at the benchmark's size
    if "int8_recipe" in accepted:
        from vkd.export.int8 import DEFAULT_CANDIDATES

        # The export tries its INT8 recipes fastest first and keeps the first within 0.999 of
        # torch. On random weights the first one can miss that target (it did on a 2B copy), and
        # the export would go on to a slower recipe, spending minutes quantising a 2B model twice:
        # the fastest recipe is the one measured here, its cosine reported as it is.
        options["int8_recipe"] = DEFAULT_CANDIDATES[0]
    progress(f"exporting {copy.dir.name} to ONNX (fp32 + dynamic INT8"
             f"{', recipe ' + options['int8_recipe'] if 'int8_recipe' in options else ''}, parity-checked)")
    started = time.perf_counter()
    try:
        try:
            export_onnx(copy.dir, int8="dynamic", **options)
        except ExportError:
            if "int8_recipe" not in options:
                raise
            options.pop("int8_recipe")  # below the export's hard INT8 bound: let it choose
            export_onnx(copy.dir, int8="dynamic", **options)
    except (ExportError, ValueError, OSError, RuntimeError) as error:
        copy.onnx = {"status": "failed", "reason": f"{type(error).__name__}: {error}"}
        return
    copy.onnx = {**_export_record(onnx_dir, reused=False), "export_s": time.perf_counter() - started,
                 "int8_recipe_asked": options.get("int8_recipe")}


def export_memory_bytes(model_dir: Path) -> float:
    """Estimated peak RSS of ``vkd export`` of ``model_dir`` (see ``EXPORT_QUANTIZER_FACTOR``),
    from its safetensors headers: the largest graph is taken as the larger stack's weights
    (vision, or everything else but an untied lm_head, which no tower runs)."""
    stacks = {"vision": 0, "text": 0}
    total = 0
    for path in sorted(Path(model_dir).glob("*.safetensors")):
        with path.open("rb") as handle:
            header = json.loads(handle.read(int.from_bytes(handle.read(8), "little")))
        for name, info in header.items():
            if name == "__metadata__":
                continue
            count = 1
            for dim in info["shape"]:
                count *= int(dim)
            total += count
            if not name.startswith("lm_head"):
                stacks["vision" if ("vision" in name or "visual" in name) else "text"] += count
    return max(EXPORT_TORCH_FACTOR * 4 * total, EXPORT_QUANTIZER_FACTOR * 4 * max(stacks.values())) + EXPORT_BASE_BYTES


def _export_record(onnx_dir: Path, *, reused: bool) -> dict[str, Any]:
    manifest = json.loads((onnx_dir / "export.json").read_text())
    sizes: dict[str, int] = {}
    for precision in ("fp32", "int8"):
        total = 0
        for name in os.listdir(onnx_dir):
            # a graph over 2 GiB is name.onnx + name.onnx.data: both are the model on disk
            if name.endswith((".onnx", ".onnx.data")) and ((".int8." in name) == (precision == "int8")):
                total += (onnx_dir / name).stat().st_size
        sizes[precision] = total
    recipes = {tower: manifest[tower].get("int8_recipe") for tower in ("text", "image")
               if isinstance(manifest.get(tower), dict) and manifest[tower].get("int8_recipe")}
    return {"status": "exported", "reused": reused, "bytes": sizes, "image_tower": bool(manifest.get("image")),
            "image_unsupported": manifest.get("image_unsupported"), "parity": manifest.get("parity"),
            "int8_recipes": recipes, "export_seconds": manifest.get("export_seconds")}


# ---------------------------------------------------------------- (a) encoding


def _estimated_rss(copy: Any, backend: str, family: str) -> float:
    """A worker's resident memory, generously: its weights plus 0.6 GiB of runtime. ONNX INT8
    keeps embedding tables in fp32 (2 bytes a parameter on average, not 1), and a Qwen3-VL
    export holds the language model twice, in the text graph and in the image graph
    (measured: 3.0–3.8 GiB per ONNX worker for a 0.4B-parameter 2B copy)."""
    item = {"torch-fp32": 4, "torch-bf16": 2, "onnx-fp32": 4, "onnx-int8": 2}[backend]
    graphs = 2 if backend.startswith("onnx") and family == "qwen3-vl" else 1
    return copy.parameters * item * graphs + 0.6 * GIB


def measure_encoding(arch: ArchInfo, settings: RealSettings, *, work: Path, progress: Callable[[str], None],
                     memory_bytes: float) -> dict[str, Any]:
    """Section (a) for one arch: build copies, export them, run every backend in rounds."""
    from vkd.bench.realencode import (
        WorkerRun,
        extrapolation_check,
        pair_with_reference,
        run_group,
        summarise_backend,
    )

    full_depth = arch.name in settings.full_depth_archs
    depths: list[int | None] = [None] if full_depth else list(settings.truncated_layers)
    check = full_depth and settings.check_extrapolation
    if check:
        depths = [*settings.truncated_layers, None]
    models = work / "models"
    copies = [make_copy(arch, build_copy(arch, layers, models, progress)) for layers in depths]
    if arch.tiny and copies and not copies[0].full_parameters:
        # a tiny arch has no record of its full size: parameters grow linearly with the depth
        (c1, c2) = copies[:2]
        grow = (c2.parameters - c1.parameters) / max(c2.layers["text"] - c1.layers["text"], 1)
        for copy in copies:
            copy.full_parameters = int(c2.parameters + grow * (arch.full_layers["text"] - c2.layers["text"]))
    onnx_wanted = any(b.startswith("onnx") for b in settings.backends)
    for index, copy in enumerate(copies):
        measured_copy = not (check and index < 2)  # the check copies run torch fp32 only
        if onnx_wanted and measured_copy:
            export_copy(copy, arch.family, settings.image_size, progress, memory_bytes)
    runs: dict[tuple[int, str], WorkerRun] = {}
    skipped: dict[str, str] = {}
    bf16 = cpu_bf16()
    for index, copy in enumerate(copies):
        backends = ["torch-fp32"] if check and index < 2 else list(settings.backends)
        for backend in backends:
            if backend == "torch-bf16" and not bf16.get("works"):
                skipped[backend] = f"this CPU does not run bf16 in torch ({bf16.get('error', 'no support')})"
                continue
            if backend.startswith("onnx") and copy.onnx.get("status") != "exported":
                skipped[backend] = copy.onnx.get("reason") or "no ONNX export"
                continue
            full_fp32 = copy.full_parameters * 4
            if (backend == "torch-fp32" and not arch.tiny and settings.skip_unfit_fp32
                    and full_fp32 > FP32_MEMORY_SHARE * memory_bytes):
                # a figure for a configuration this machine cannot hold is of no use, and the
                # time goes to the backends that fit (the brief's "measure it in bf16")
                skipped[backend] = (f"the full model's fp32 weights ({full_fp32 / GIB:.1f} GiB) exceed "
                                    f"{FP32_MEMORY_SHARE:.0%} of this machine's {memory_bytes / GIB:.1f} GiB; "
                                    "measured in bf16 (pass --backends to time fp32 copies anyway)")
                continue
            runs[(index, backend)] = WorkerRun(copy=copy, backend=backend)
    # all backends of all copies at once when they fit in memory (rounds interleave them);
    # else one copy at a time (its backends still interleave)
    everything = list(runs.values())
    if sum(_estimated_rss(r.copy, r.backend, arch.family) for r in everything) <= 0.6 * memory_bytes:
        groups = [everything]
    else:
        groups = [[r for (i, _b), r in runs.items() if i == index] for index in range(len(copies))]
    for number, group in enumerate(groups):
        if group:
            run_group(group, rounds=settings.rounds, batch=settings.batch, image_size=settings.image_size,
                      b1_calls=settings.b1_calls, threads=settings.threads,
                      workdir=work / "workers" / f"{arch.name}-{number}", progress=progress, label=arch.name)
    measured = [i for i in range(len(copies)) if not (check and i < 2)]
    main_copies = [copies[i] for i in measured]
    main_runs = {(measured.index(i), b): r for (i, b), r in runs.items() if i in measured}
    records = [summarise_backend(main_runs, main_copies, backend, family=arch.family,
                                 full=main_copies[-1].layers if main_copies[-1].full else _full(arch, main_copies),
                                 batch=settings.batch)
               for backend in settings.backends]
    for record in records:
        if record["backend"] in skipped and record.get("status") != "measured":
            record["status"], record["reason"] = "skipped", skipped[record["backend"]]
    pair_with_reference(records)
    result: dict[str, Any] = {
        "arch": arch.name, "family": arch.family, "dim": arch.dim, "full_layers": arch.full_layers,
        "tiny_test_arch": arch.tiny,
        "copies": [{"dir": str(c.dir), "layers": c.layers, "parameters": c.parameters,
                    "full_parameters": c.full_parameters, "onnx": c.onnx} for c in copies],
        "measured_at": "real depth" if full_depth else "truncated copies, extrapolated",
        "backends": records,
        "memory_groups": len(groups),
    }
    if check:
        result["extrapolation_check"] = extrapolation_check(runs, copies, family=arch.family, full=arch.full_layers,
                                                            check=[0, 1])
    return result


def _full(arch: ArchInfo, copies: Sequence[Any]) -> dict[str, int]:
    record = copies[-1]
    from vkd.models.provenance import read_provenance

    provenance = read_provenance(record.dir) or {}
    return {k: int(v) for k, v in (provenance.get("full_layers") or arch.full_layers).items()}


# ---------------------------------------------------------------- (c) indexing


def measure_indexing(student: ArchInfo, teacher: ArchInfo | None, encoding: Mapping[str, Any],
                     settings: RealSettings, *, work: Path, progress: Callable[[str], None]) -> dict[str, Any]:
    """``build_index`` images/s with the student's ONNX export and with torch, against the
    encoder alone on the same (pre-decoded) images, and with the teacher's vectors stored;
    in ``settings.rounds`` interleaved rounds."""
    from PIL import Image

    from vkd.bench.realworker import make_images
    from vkd.indexer.build import build_index
    from vkd.indexer.decode import Decoded, decode_file
    from vkd.indexer.encode import as_encoder, backend_label
    from vkd.indexer.scan import scan_images

    student_record = encoding[student.name]
    student_dir = Path(student_record["copies"][-1]["dir"])
    teacher_dir = Path(encoding[teacher.name]["copies"][-1]["dir"]) if teacher is not None else None
    images_dir = work / "index-images"
    if not images_dir.is_dir() or len(list(images_dir.glob("*.jpg"))) != settings.index_images:
        shutil.rmtree(images_dir, ignore_errors=True)
        images_dir.mkdir(parents=True)
        for i, image in enumerate(make_images(settings.index_images, settings.index_image_size, seed=3)):
            image.save(images_dir / f"{i:05d}.jpg", quality=90)
    entries, _ = scan_images(images_dir)
    decoded = [d.image for e in entries if isinstance(d := decode_file(e), Decoded)]
    assert all(isinstance(image, Image.Image) for image in decoded)
    encoders = {prefer: as_encoder(str(student_dir), device="cpu", batch_size=settings.batch, prefer=prefer,
                                   images=True) for prefer in ("onnx", "torch")}
    labels = {prefer: backend_label(encoder) for prefer, encoder in encoders.items()}
    index_dir = work / "index-out"
    seconds: dict[str, list[float]] = {}
    backends: dict[str, dict[str, Any]] = {}

    def encoder_alone(prefer: str) -> Callable[[], float]:
        def call() -> float:
            tick = time.perf_counter()
            encoders[prefer].encode_images(decoded, batch_size=settings.batch)
            return time.perf_counter() - tick
        return call

    def indexer(prefer: str, with_teacher: bool) -> Callable[[], float]:
        def call() -> float:
            result = build_index(images_dir, index_dir, student=str(student_dir),
                                 teacher=str(teacher_dir) if with_teacher else None, batch_size=settings.batch,
                                 rebuild=True, device="cpu", prefer=prefer)
            backends[f"{prefer}{'+teacher' if with_teacher else ''}"] = {
                "student": result.student_backend, "teacher": result.teacher_backend}
            return result.seconds
        return call

    calls: dict[str, Callable[[], float]] = {
        "encoder alone, onnx": encoder_alone("onnx"), "encoder alone, torch": encoder_alone("torch"),
        "vkd index, prefer onnx": indexer("onnx", False), "vkd index, prefer torch": indexer("torch", False),
    }
    if teacher_dir is not None:
        calls["vkd index, prefer onnx, + teacher"] = indexer("onnx", True)
    for name, call in calls.items():  # warm-up, and the first build writes the index folder
        progress(f"indexing: warm-up of {name}")
        call()
    names = list(calls)
    for r in range(settings.rounds):
        progress(f"indexing: round {r + 1}/{settings.rounds}")
        shift = r % len(names)
        for name in names[shift:] + names[:shift]:
            seconds.setdefault(name, []).append(calls[name]())
    n = len(decoded)
    rows = {name: {"images_per_s": spread([n / s for s in values]), "round_seconds": values}
            for name, values in seconds.items()}
    for prefer in ("onnx", "torch"):
        rows[f"vkd index, prefer {prefer}"]["vs_encoder_alone"] = ratio_spread(
            seconds[f"encoder alone, {prefer}"], seconds[f"vkd index, prefer {prefer}"])
    result: dict[str, Any] = {
        "images": n, "image_size": list(settings.index_image_size), "images_dir": str(images_dir),
        "student": {"arch": student.name, "dir": str(student_dir), "layers": student_record["copies"][-1]["layers"],
                    "backends": labels},
        "teacher": ({"arch": teacher.name, "dir": str(teacher_dir),
                     "layers": encoding[teacher.name]["copies"][-1]["layers"]} if teacher is not None else None),
        "runs": rows, "backends_used": backends, "batch": settings.batch,
    }
    if teacher_dir is not None:
        with_t, without = seconds["vkd index, prefer onnx, + teacher"], seconds["vkd index, prefer onnx"]
        result["teacher_share_measured"] = spread([(a - b) / a for a, b in zip(with_t, without, strict=True)])
        result["teacher_share_measured_layers"] = encoding[teacher.name]["copies"][-1]["layers"]
        result["teacher_share_full"] = _teacher_share_full(encoding[teacher.name], backends, without, n, settings)
    return result


def _teacher_share_full(teacher_record: Mapping[str, Any], backends: Mapping[str, Any], without: Sequence[float],
                        n: int, settings: RealSettings) -> dict[str, Any] | None:
    """The teacher's share of an indexing run at its real depth: its image ms/img at batch
    32 from the encoding table (extrapolated there), against the measured run without it."""
    label = (backends.get("onnx+teacher") or {}).get("teacher") or "torch float32"
    backend = ("onnx-int8" if "int8" in label else "onnx-fp32") if label.startswith("onnx") else "torch-fp32"
    record = next((b for b in teacher_record["backends"] if b["backend"] == backend and b.get("status") == "measured"),
                  None)
    call = (record or {}).get("calls", {}).get(f"image_b{settings.batch}") or {}
    rounds = call.get("round_seconds")
    if not rounds:
        return None
    count = min(len(rounds), len(without))
    teacher_s = [rounds[r] / settings.batch * n for r in range(count)]  # seconds for the n images
    shares = [t / (w + t) for t, w in zip(teacher_s, without[:count], strict=True)]
    return {"share": spread(shares), "teacher_backend": backend, "extrapolated": bool(record.get("extrapolated")),
            "images_per_s_with_teacher": spread([n / (w + t) for t, w in zip(teacher_s, without[:count], strict=True)]),
            "formula": "share = t_teacher / (t_index_without_teacher + t_teacher); t_teacher = the encoding table's "
                       f"image ms/img at batch {settings.batch} ({backend}, real depth) × images"}


def derived_indexing(encoding: Mapping[str, Any], pairs: Sequence[tuple[str, str]], batch: int) -> list[dict[str, Any]]:
    """Encoder-bound indexing rates at real depth from the encoding table (no index run):
    student alone, student + teacher, and the teacher's share, per pair measured."""
    rows = []
    for student, teacher in pairs:
        if student not in encoding or teacher not in encoding:
            continue
        ms = {}
        for role, arch in (("student", student), ("teacher", teacher)):
            record = next((b for b in encoding[arch]["backends"]
                           if b["backend"] == "torch-fp32" and b.get("status") == "measured"), None)
            call = (record or {}).get("calls", {}).get(f"image_b{batch}") or {}
            ms[role] = call.get("round_seconds")
        if not ms["student"] or not ms["teacher"]:
            continue
        count = min(len(ms["student"]), len(ms["teacher"]))
        s, t = ms["student"][:count], ms["teacher"][:count]
        rows.append({"student": student, "teacher": teacher, "backend": "torch-fp32",
                     "encoder_images_per_s": spread([batch / v for v in s]),
                     "with_teacher_images_per_s": spread([batch / (a + b) for a, b in zip(s, t, strict=True)]),
                     "teacher_share": spread([b / (a + b) for a, b in zip(s, t, strict=True)])})
    return rows


# ---------------------------------------------------------------- the run


@dataclass
class _Clock:
    start: float = field(default_factory=time.perf_counter)

    def stamp(self) -> str:
        seconds = int(time.perf_counter() - self.start)
        return f"{seconds // 60:02d}:{seconds % 60:02d}"


def run_real_benchmark(settings: RealSettings, *, workdir: str | os.PathLike[str],
                       progress: Callable[[str], None] = lambda message: None) -> BenchResult:
    """Sections (a)–(d) (module docstring) with ``settings``; models and exports are kept
    in ``workdir`` for the next run."""
    import psutil

    from vkd.bench.realsearch import PAIRINGS, SearchSettings, encode_summary, measure_pairing

    clock = _Clock()

    def say(message: str) -> None:
        progress(f"[{clock.stamp()}] {message}")

    work = Path(workdir)
    work.mkdir(parents=True, exist_ok=True)
    memory = float(psutil.virtual_memory().total)
    archs = [arch_info(name) for name in settings.archs]
    notes: list[str] = [STATEMENT]
    encoding: dict[str, Any] = {}
    for arch in archs:
        say(f"encoding: {arch.name}")
        encoding[arch.name] = measure_encoding(arch, settings, work=work, progress=say, memory_bytes=memory)
        gc.collect()

    search_settings = SearchSettings(corpus_size=settings.corpus_size, quality_queries=settings.quality_queries,
                                     latency_queries=settings.latency_queries, rounds=settings.rounds)
    end_to_end = []
    for key in settings.pairings:
        pairing = PAIRINGS[key]
        say(f"end to end: {pairing.name}")
        encoders = {
            "student": encode_summary(encoding.get(pairing.student_arch), ("onnx-int8", "onnx-fp32", "torch-fp32"),
                                      None),
            "teacher": encode_summary(encoding.get(pairing.teacher_arch), ("torch-fp32", "torch-bf16"),
                                      0.8 * memory),
        }
        end_to_end.append(measure_pairing(pairing, search_settings, workdir=work / "search", encode=encoders,
                                          progress=say))
        gc.collect()

    indexing = None
    student = next((a for a in archs if a.family == "dual"), None)
    if student is not None:
        teacher = next((a for a in archs if a.family == "dual" and a.name != student.name
                        and a.dim > student.dim), None)
        say(f"indexing: {student.name}" + (f" + teacher {teacher.name}" if teacher else ""))
        indexing = measure_indexing(student, teacher, encoding, settings, work=work, progress=say)
    derived = derived_indexing(encoding, [(p.student_arch, p.teacher_arch) for p in PAIRINGS.values()],
                               settings.batch)

    results = {
        "random_weights": True,
        "statement": STATEMENT,
        "settings": {**asdict(settings), "archs": list(settings.archs), "backends": list(settings.backends)},
        "timing_shape": ("every timing is {median, min, max, q1, q3, n} over n rounds; ratios (speed-ups) are taken "
                         "within each round, then summarised the same way"),
        "cpu_bf16": cpu_bf16(),
        "encoding": {"image_size": list(settings.image_size), "batch": settings.batch, "rounds": settings.rounds,
                     "b1_calls_per_round": settings.b1_calls, "archs": list(encoding.values())},
        "end_to_end": end_to_end,
        "indexing": indexing,
        "indexing_derived": derived,
        "duration_s": time.perf_counter() - clock.start,
    }
    notes += _notes(results)
    return BenchResult("real", results, markdown(results), notes=notes, figures=[real_figure(results)])


def _notes(results: Mapping[str, Any]) -> list[str]:
    notes = [
        "Timings: median over rounds (min–max); each round times every backend (or search method) back to back in "
        "a rotating order, and a speed-up is the ratio within each round, then its median (min–max). "
        "'within spread' marks a ratio whose range includes 1: no difference beyond the run-to-run variation.",
        "Extrapolated (†): measured on two depth-truncated copies of the same widths and scaled per layer to the real "
        "depth; each figure's formula is in real.json (calls.*.formula). Query texts are tokenized by the random "
        "model's locally trained tokenizer (padded to the real vocabulary), which splits text into more tokens than "
        "the real one: query costs lean high.",
    ]
    bf16 = results["cpu_bf16"]
    notes.append(f"bf16 on this CPU: native instructions {'yes' if bf16.get('native_bf16') else 'no'} (AMX "
                 f"{'yes' if bf16.get('amx') else 'no'}), oneDNN bf16 {bf16.get('onednn_bf16')}, torch capability "
                 f"{bf16.get('cpu_capability')}.")
    split = [a["arch"] for a in results["encoding"]["archs"] if a.get("memory_groups", 1) > 1]
    if split:
        notes.append(f"{', '.join(split)}: all backends of both copies would not fit in memory at once, so each "
                     "copy's backends ran in rounds of their own, one copy after the other; an extrapolation pairs "
                     "round r of one copy with round r of the other, minutes apart.")
    if any(a["family"] == "qwen3-vl" for a in results["encoding"]["archs"]):
        notes.append("Qwen3-VL copies of 1–2 layers keep none of the DeepStack taps (vision blocks 5/11/17, 8/16/24), "
                     "so the extrapolation leaves out the three DeepStack mergers' cost (a few percent of an image).")
    external = sorted({a["arch"] for a in results["encoding"]["archs"] for b in a["backends"]
                       if b["backend"].startswith("onnx") and ((b.get("model_bytes") or {}).get("value") or 0)
                       > 2 * 1024**3})
    if external:
        notes.append(f"ONNX at full size ({', '.join(external)}): over the 2 GiB protobuf limit, so `vkd export` "
                     "writes such graphs as name.onnx + name.onnx.data (external data); sizes count both files.")
    recipes = sorted({r for a in results["encoding"]["archs"] for c in a["copies"]
                      for r in ((c.get("onnx") or {}).get("int8_recipes") or {}).values()})
    if recipes:
        notes.append(f"ONNX INT8: dynamic, recipe {', '.join(recipes)} (the export's fastest, asked for by name; how "
                     "close INT8 stays to fp32 on random weights says little about a trained model).")
    for pairing in results["end_to_end"]:
        notes.append(f"{pairing['pairing']}: " + pairing["corpus"]["summary"])
    notes.append("Stage 1 is IVF-PQ with vkd's exact re-scoring (FaissSearcher), nlist ≤ 1024 trained on 40 "
                 "points per list, 10 k-means iterations: HNSW over 1M × 2048 takes most of an hour to build on two "
                 "cores. Teacher-only scans the float16 teacher vectors exactly (FAISS SQfp16 flat) per query.")
    return notes


# ---------------------------------------------------------------- report


def _ms(call: Mapping[str, Any] | None) -> str | None:
    if not call or call.get("ms_per_item") is None:
        return None
    return format_spread(call["ms_per_item"])


def _mark(record: Mapping[str, Any]) -> str:
    return " †" if record.get("extrapolated") else ""


def encoding_rows(results: Mapping[str, Any]) -> list[list[Any]]:
    batch = results["encoding"]["batch"]
    rows = []
    for arch in results["encoding"]["archs"]:
        for record in arch["backends"]:
            if record.get("status") != "measured":
                rows.append([arch["arch"], record["backend"], record.get("status"), *[None] * 9,
                             _short(record.get("reason"))])
                continue
            calls = record["calls"]
            speed = (calls.get("text_b1") or {}).get("speedup_vs_torch_fp32")
            speed_img = (calls.get(f"image_b{batch}") or {}).get("speedup_vs_torch_fp32")
            cos = record.get("cosine_vs_torch_fp32") or {}
            rss = (record.get("peak_rss_bytes") or {}).get("value")
            size = (record.get("model_bytes") or {}).get("value")
            rows.append([
                arch["arch"], record["backend"] + _mark(record),
                "real" if not record.get("extrapolated") else "/".join(
                    str(c["layers"].get("vision", "")) for c in arch["copies"][-2:]) + " → full",
                _ms(calls.get("image_b1")), _ms(calls.get(f"image_b{batch}")), _ms(calls.get("text_b1")),
                _ms(calls.get(f"text_b{batch}")),
                format_ratio(speed_img) if record["backend"] != "torch-fp32" else "1",
                format_ratio(speed) if record["backend"] != "torch-fp32" else "1",
                rss / GIB if rss else None, size / MIB if size else None,
                _cos(cos, record["backend"]), None,
            ])
    return rows


def _cos(cos: Mapping[str, Any], backend: str) -> str | None:
    if backend == "torch-fp32":
        return "1"
    parts = [f"{kind} {cos[kind]['min']:.4f}" for kind in ("image", "text") if kind in cos]
    return ", ".join(parts) or None


def _short(text: str | None, limit: int = 110) -> str | None:
    if text is None:
        return None
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[:limit - 1] + "…"


def markdown(results: Mapping[str, Any]) -> str:
    enc = results["encoding"]
    batch = enc["batch"]
    w, h = enc["image_size"]
    parts = [
        f"**{STATEMENT}**",
        "",
        f"### Encoding (per item, ms; images {w}×{h}, queries are captions of 6–13 words)",
        "",
        f"Median over {enc['rounds']} rounds (min–max). × torch fp32: speed-up within each round. † extrapolated "
        "from depth-truncated copies (layers: vision depths of the two copies → the real depth; formulas in "
        "real.json). Cosine: min over 8 images / 8 texts, at the deepest copy measured.",
        "",
        markdown_table(
            ["model", "backend", "layers", "image b1", f"image b{batch}", "query b1", f"query b{batch}",
             f"× torch fp32 image b{batch}", "× torch fp32 query b1", "peak RSS GiB", "size MiB", "cos min",
             "not measured"],
            encoding_rows(results), align=["l", "l", "l"] + ["r"] * 9 + ["l"],
        ),
    ]
    checks = [(a["arch"], a["extrapolation_check"]) for a in enc["archs"] if a.get("extrapolation_check")]
    for arch, check in checks:
        rows = [[call, format_spread(v["error_percent"], suffix=" %")] for call, v in check["calls"].items()]
        depths = " and ".join(str(c.get("vision")) for c in check["copies"])
        parts += ["", f"Extrapolation check on {arch} (torch fp32): the real-depth time predicted from copies of "
                      f"{depths} layers against the one measured, error per round:", "",
                  markdown_table(["call", "error (median, min–max)"], rows, align=["l", "r"])]
    for pairing in results["end_to_end"]:
        parts += ["", _pairing_markdown(pairing)]
    if results.get("indexing"):
        parts += ["", _indexing_markdown(results["indexing"], results.get("indexing_derived") or [])]
    return "\n".join(parts)


def _gib(value: float | None) -> float | None:
    return None if value is None else value / GIB


def _pairing_markdown(pairing: Mapping[str, Any]) -> str:
    rows = []
    for m in pairing["methods"]:
        memory = m["memory"]
        rows.append([
            m["method"], m["index"]["factory"] if m.get("index") else m.get("index_name") or "fp16 flat",
            m["quality"]["recall@10"], m["quality"]["overlap@10"], format_spread(m["search_ms"]),
            format_spread(m["full_query_ms"]),
            format_ratio(m.get("search_speedup_vs_teacher_only")) if m["kind"] != "exact" else "1",
            format_ratio(m.get("full_query_speedup_vs_teacher_only")) if m["kind"] != "exact" else "1",
            _gib(memory["index_or_vectors_resident_bytes"]), _gib(memory["vectors_read_on_demand_bytes"]),
            _gib(memory["models_peak_rss_bytes"]), _gib(memory["disk_bytes"]),
        ])
    enc = pairing["encoders"]

    def who(role: str) -> str:
        e = enc.get(role)
        if e is None:
            return f"{role} encode not measured (arch not in --archs)"
        ms = format_spread(e.get("ms"))
        return f"{role} {e['arch']} {e['backend']}{' †' if e['extrapolated'] else ''} query encode {ms} ms"

    overhead = pairing["stage1_overhead"]
    return "\n".join([
        f"### A full query at {pairing['corpus_size']:,} vectors: {pairing['pairing']} "
        f"(student {pairing['student_dim']}-d, teacher {pairing['teacher_dim']}-d)",
        "",
        "Per query at batch 1, ms: search = ANN + rerank (or the exact scan); full query adds the query encodings ("
        + "; ".join(who(r) for r in ("student", "teacher")) + "), round by round. × = teacher-only time / this "
        "configuration's, within each round. RAM = index (or scanned vectors) resident; on demand = vectors "
        "memory-mapped and read only for candidates; models = peak RSS of the encoders.",
        "",
        markdown_table(["configuration", "stage 1 index", "R@10 %", "overlap@10 %", "search ms", "full query ms",
                        "× search", "× full query", "RAM GiB", "on demand GiB", "models GiB", "disk GiB"], rows,
                       align=["l", "l"] + ["r"] * 10),
        "",
        f"Stage 1 through vkd (FaissSearcher: {overhead['faiss_fetch']:,} rows fetched, re-scored exactly, merged) "
        f"against the same FAISS index asked directly for {overhead['faiss_fetch']:,} rows (nprobe "
        f"{overhead['nprobe']}): vkd {format_spread(overhead['ms']['vkd stage 1'])} ms, FAISS "
        f"{format_spread(overhead['ms']['faiss direct'])} ms, vkd / FAISS {format_ratio(overhead['vkd_over_faiss'])}.",
    ])


def _indexing_markdown(indexing: Mapping[str, Any], derived: Sequence[Mapping[str, Any]]) -> str:
    student = indexing["student"]
    rows = []
    for name, row in indexing["runs"].items():
        rows.append([name, format_spread(row["images_per_s"]), format_ratio(row.get("vs_encoder_alone"))])
    lines = [
        f"### Indexing ({indexing['images']} JPEGs of {indexing['image_size'][0]}×{indexing['image_size'][1]}, "
        f"batch {indexing['batch']})",
        "",
        f"Student {student['arch']} (layers {student['layers']}; `prefer onnx` runs {student['backends']['onnx']}, "
        f"`prefer torch` runs {student['backends']['torch']}). Images/s: median over rounds (min–max); "
        "vkd index / encoder alone within each round.",
        "",
        markdown_table(["run", "images/s", "vkd index / encoder alone"], rows, align=["l", "r", "r"]),
    ]
    if indexing.get("teacher"):
        teacher = indexing["teacher"]
        lines += ["", f"Teacher {teacher['arch']} stored too: its share of the indexing time is "
                      f"{format_spread(indexing['teacher_share_measured'])} with the copy measured (layers "
                      f"{teacher['layers']})."]
        full = indexing.get("teacher_share_full")
        if full:
            lines[-1] += (f" At its real depth{' †' if full['extrapolated'] else ''}: "
                          f"{format_spread(full['share'])}, i.e. {format_spread(full['images_per_s_with_teacher'])} "
                          f"images/s ({full['formula']}).")
    if derived:
        rows = [[f"{d['student']} + {d['teacher']}", format_spread(d["encoder_images_per_s"]),
                 format_spread(d["with_teacher_images_per_s"]), format_spread(d["teacher_share"])] for d in derived]
        lines += ["", "Encoder-bound indexing at real depth, from the encoding table (torch fp32, batch images/s; "
                      "not an index run):", "",
                  markdown_table(["student + teacher", "student images/s", "with teacher images/s", "teacher share"],
                                 rows, align=["l", "r", "r", "r"])]
    return "\n".join(lines)


def real_figure(results: Mapping[str, Any]) -> Figure:
    """Encoding ms per item (log scale, min–max bars) per model and backend, and the full
    query's ms per configuration per pairing."""
    batch = results["encoding"]["batch"]

    def draw(fig: Any) -> None:
        axes = fig.subplots(1, 1 + len(results["end_to_end"]), squeeze=False)[0]
        ax = axes[0]
        measured = [(arch, record) for arch in results["encoding"]["archs"] for record in arch["backends"]
                    if record.get("status") == "measured"]
        labels = [f"{arch['arch']}\n{record['backend']}{'†' if record.get('extrapolated') else ''}"
                  for arch, record in measured]
        for offset, (kind, colour) in enumerate(((f"image_b{batch}", "tab:blue"), ("text_b1", "tab:orange"))):
            xs, ys, lo, hi = [], [], [], []
            for position, (_arch, record) in enumerate(measured):
                figure = ((record.get("calls") or {}).get(kind) or {}).get("ms_per_item")
                if figure is None:
                    continue
                xs.append(position + 0.4 * offset)
                ys.append(figure["median"])
                lo.append(figure["median"] - figure["min"])
                hi.append(figure["max"] - figure["median"])
            ax.bar(xs, ys, 0.4, yerr=[lo, hi], color=colour, capsize=2,
                   label="image ms/img, batch " + str(batch) if kind.startswith("image") else "query ms, batch 1")
        ax.set_xticks([i + 0.2 for i in range(len(labels))])
        ax.set_xticklabels(labels, rotation=90, fontsize=6)
        ax.set_yscale("log")
        ax.set_ylabel("ms per item (log)")
        ax.set_title("Encoding, random weights at real shapes", fontsize=9)
        ax.legend(fontsize=7)
        ax.grid(True, axis="y", alpha=0.3)
        for ax, pairing in zip(axes[1:], results["end_to_end"], strict=True):
            methods = [m for m in pairing["methods"]]
            values = [(m["full_query_ms"] or m["search_ms"]) for m in methods]
            ax.bar(range(len(methods)), [v["median"] for v in values],
                   yerr=[[v["median"] - v["min"] for v in values], [v["max"] - v["median"] for v in values]],
                   capsize=2, color=["tab:red" if m["kind"] == "exact" else "tab:green" for m in methods])
            ax.set_xticks(range(len(methods)))
            ax.set_xticklabels([m["method"] for m in methods], rotation=60, fontsize=6, ha="right")
            ax.set_yscale("log")
            full = all(m["full_query_ms"] for m in methods)
            ax.set_ylabel(("full query" if full else "search only") + " ms per query (log)")
            ax.set_title(f"{pairing['pairing']}, {pairing['corpus_size']:,} vectors", fontsize=9)
            ax.grid(True, axis="y", alpha=0.3)

    return Figure("real_costs.png", draw, size=(6.0 + 4.0 * len(results["end_to_end"]), 6.5))


def expected_minutes(settings: RealSettings, work: Path | None = None) -> float:
    """A rough duration of a full run on two quiet cores, printed before the run so the reader
    knows what to expect: per arch, building and exporting the copies (skipped when the work
    folder has them from an earlier run: about 2.5 minutes for the Qwen3-VL 2B copies), loading
    each backend's process and timing the rounds (quick runs on a loaded machine, halved)."""
    timing = {"clip-vit-b32": 1.5, "clip-vit-b16": 1.5, "siglip-base-patch16-224": 1.5, "clip-vit-l14": 1.5,
              "qwen3-vl-embedding-2b": 3.0, "qwen3-vl-embedding-8b": 2.5}
    setup = {"clip-vit-b32": 0.5, "clip-vit-b16": 0.5, "siglip-base-patch16-224": 0.5, "clip-vit-l14": 0.5,
             "qwen3-vl-embedding-2b": 3.0, "qwen3-vl-embedding-8b": 0.7}
    minutes = 0.0
    for arch in settings.archs:
        built = work is not None and any((work / "models").glob(f"{arch}-*/onnx/export.json"))
        minutes += timing.get(arch, 0.5) * (settings.rounds + 1) / 4 + (0.2 if built else setup.get(arch, 0.2))
    minutes += sum({"clip": 1.0, "qwen3-vl": 3.5}.get(p, 1.0) for p in settings.pairings) * settings.corpus_size / 1e6
    return minutes + 1.0  # indexing

