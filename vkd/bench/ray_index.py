"""``vkd bench ray``: ``vkd index --engine ray`` against the single-process indexer.

Two figures, each measured on the same folder with both engines in interleaved rounds
(``timing.repeat_rounds``), every run a ``--rebuild`` into its own index directory:

a. **Throughput at the real ViT-B/32 size**: images/s of a full build with the student a
   random CLIP ViT-B/32 at its real depth (``vkd model random --arch clip-vit-b32``, built once
   into the work folder, torch fp32 on the CPU for both engines), on ``images`` JPEGs of
   ``image_size``. Local: decode threads + one encoder. Ray: decode tasks, ``num_workers``
   encoder actors (each ``cpus_per_worker`` torch threads), write tasks.
b. **Scheduling overhead at demo size**: the same on the demo's index size (300 images) with a
   tiny model, whose encoding costs almost nothing, so the difference of the two wall times is
   what Ray's scheduling, actor start-up (one model load per actor) and object transfers cost.
   Starting Ray itself (``ray.init`` of a local instance) is timed apart: a cluster pays it once.

Wall seconds cover the whole ``build_index`` / ``build_index_ray`` call: models loaded, files
listed, decoded, encoded, shards written and committed. Ray runs on a local instance of this
machine's CPUs (a cluster address is not the point here: the question is what the engine costs
where the single-process indexer also runs).
"""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from vkd.bench.report import BenchResult, markdown_table
from vkd.bench.timing import format_ratio, format_spread, ratio_spread, repeat_rounds, round_medians, spread

DEMO_IMAGES = 300  # the demo's index: the 20 % test split of 1 500 target scenes (vkd.demo.FULL)


@dataclass
class RayBenchSettings:
    arch: str = "clip-vit-b32"
    images: int = 256
    image_size: tuple[int, int] = (512, 384)
    batch: int = 32
    rounds: int = 3
    demo_images: int = DEMO_IMAGES
    #: encoder actors; None: one per CPU less one (``ray_engine._default_workers``)
    num_workers: int | None = None
    cpus_per_worker: float = 1.0
    num_cpus: int | None = None
    shard_size: int = 50_000
    quick: bool = False

    @classmethod
    def quick_settings(cls) -> RayBenchSettings:
        # the code paths of a full run in about a minute: a tiny model, few images, one round
        return cls(arch="tiny-clip", images=24, image_size=(64, 48), batch=8, rounds=1, demo_images=24, quick=True)


def _image_folder(folder: Path, n: int, size: tuple[int, int], seed: int) -> Path:
    from vkd.bench.realworker import make_images

    if folder.is_dir() and len(list(folder.glob("*.jpg"))) == n:
        return folder
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    for i, image in enumerate(make_images(n, size, seed=seed)):
        image.save(folder / f"{i:05d}.jpg", quality=90)
    return folder


def _compare(images: Path, student: Path, work: Path, settings: RayBenchSettings, *, batch: int,
             progress: Callable[[str], None], label: str) -> dict[str, Any]:
    from vkd.indexer.build import build_index
    from vkd.indexer.ray_engine import build_index_ray

    n = len(list(images.glob("*.jpg")))
    summaries: dict[str, dict[str, Any]] = {}
    common = {"student": str(student), "batch_size": batch, "rebuild": True, "device": "cpu", "prefer": "torch",
              "shard_size": settings.shard_size}

    def local() -> None:
        result = build_index(images, work / f"{label}-local.vkd", **common)
        summaries["local"] = result.to_dict()

    def on_ray() -> None:
        result = build_index_ray(images, work / f"{label}-ray.vkd", num_workers=settings.num_workers,
                                 cpus_per_worker=settings.cpus_per_worker, **common)
        summaries["ray"] = result.to_dict()

    progress(f"ray bench, {label}: {n} images, {settings.rounds} round(s) of local and ray (after a warm-up each)")
    seconds = repeat_rounds({"local": local, "ray": on_ray}, rounds=settings.rounds)
    local_s, ray_s = round_medians(seconds["local"]), round_medians(seconds["ray"])
    return {
        "images": n,
        "local": {"images_per_s": spread([n / s for s in local_s]), "wall_seconds": spread(local_s),
                  "round_seconds": local_s, "backend": summaries["local"]["student_backend"]},
        "ray": {"images_per_s": spread([n / s for s in ray_s]), "wall_seconds": spread(ray_s),
                "round_seconds": ray_s, "backend": summaries["ray"]["student_backend"],
                "shards": summaries["ray"]["shards_written"]},
        "ray_over_local_speed": ratio_spread(local_s, ray_s),
        "ray_minus_local_seconds": spread([r - loc for r, loc in zip(ray_s, local_s, strict=True)]),
    }


def run_ray_benchmark(settings: RayBenchSettings, *, workdir: str | os.PathLike[str],
                      progress: Callable[[str], None] = lambda message: None) -> BenchResult:
    """Measure (a) and (b) of the module docstring; models and images are built once into ``workdir``."""
    import ray

    from vkd.bench.real import arch_info, build_copy
    from vkd.indexer.ray_engine import _default_workers

    work = Path(workdir)
    work.mkdir(parents=True, exist_ok=True)
    arch = arch_info(settings.arch)
    student = build_copy(arch, None, work / "models", progress)
    tiny = build_copy(arch_info("tiny-clip"), None, work / "models", progress)
    big_images = _image_folder(work / f"images-{settings.images}-{settings.image_size[0]}x{settings.image_size[1]}",
                               settings.images, settings.image_size, seed=5)
    demo_images = _image_folder(work / f"images-demo-{settings.demo_images}", settings.demo_images, (224, 224),
                                seed=6)

    tick = time.perf_counter()
    ray.init(address="local", num_cpus=settings.num_cpus, include_dashboard=False, log_to_driver=False)
    startup = time.perf_counter() - tick
    try:
        workers = settings.num_workers or _default_workers(ray, 0.0, settings.cpus_per_worker)
        cpus = int(ray.cluster_resources().get("CPU", 0))
        throughput = _compare(big_images, student, work, settings, batch=settings.batch, progress=progress,
                              label="throughput")
        overhead = _compare(demo_images, tiny, work, settings, batch=settings.batch, progress=progress,
                            label="overhead")
    finally:
        ray.shutdown()
    results = {"settings": {**asdict(settings), "image_size": list(settings.image_size)},
               "arch": settings.arch, "ray_cpus": cpus, "encoder_actors": workers,
               "ray_init_seconds": startup, "throughput": throughput, "scheduling_overhead": overhead}
    notes = [
        f"Student: random {settings.arch} weights at the real shape (speed does not depend on trained weights), "
        "torch fp32 on the CPU in both engines.",
        "Wall time of the whole call (model loads, listing, decode, encode, shard writes, commits); a Ray run also "
        "loads the models once more to record their fingerprints.",
        f"Ray: a local instance of {cpus} CPUs, {workers} encoder actor(s) of {settings.cpus_per_worker} CPU each; "
        f"ray.init itself took {startup:.1f} s, paid once per cluster, not per run.",
    ]
    return BenchResult("ray", results, markdown(results), notes=notes)


def markdown(results: dict[str, Any]) -> str:
    rows = []
    for key, title in (("throughput", f"{results['arch']}, {results['throughput']['images']} images"),
                       ("scheduling_overhead", f"demo size, tiny model, {results['scheduling_overhead']['images']} "
                                               "images")):
        figure = results[key]
        for engine in ("local", "ray"):
            rows.append([title, engine, figure[engine]["backend"], format_spread(figure[engine]["images_per_s"]),
                         format_spread(figure[engine]["wall_seconds"], suffix=" s"),
                         format_ratio(figure["ray_over_local_speed"]) if engine == "ray" else "1",
                         format_spread(figure["ray_minus_local_seconds"], suffix=" s") if engine == "ray" else ""])
    table = markdown_table(["folder", "engine", "student backend", "images/s", "wall", "speed vs local",
                            "ray − local"], rows)
    return (f"### vkd index --engine ray vs the single-process indexer\n\n{table}\n\n"
            f"Ray: {results['ray_cpus']} CPUs, {results['encoder_actors']} encoder actor(s); starting Ray "
            f"(ray.init) took {results['ray_init_seconds']:.1f} s and is not in the wall times.\n")
