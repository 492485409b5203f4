"""Training memory of the Qwen3-VL-Embedding 2B student, measured on depth-reduced copies.

``deploy/TRAINING.md`` computes the memory per GPU of distilling Qwen3-VL-Embedding-8B into
2B from the parameter counts; the one term that is not a parameter count, the student's
activations, is measured here: peak RSS of real ``vkd distill`` training steps (the trainer's
own code path: LoRA at the config defaults, gradient caching, KD losses) on random copies of
the 2B at its real widths with 1 and 2 layers per stack (``vkd model random --layers``), on the
CPU, in float32. The difference between the two depths is one text layer plus one vision
block; the intercept is everything that does not grow with depth. Each measurement runs in a
fresh process, so one run's freed memory does not hide the next one's peak.

The teacher in these runs is a tiny Qwen3-VL (its memory is computed in TRAINING.md from its
parameter count, not measured), so the peak is the student's.

    python -m vkd.bench.train_memory --work /tmp/train-mem --out train_memory.json
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import click

ARCH = "qwen3-vl-embedding-2b"


def measure_step(student: str, teacher: str, data: str, out: str, *, batch: int, chunk: int | None,
                 steps: int, mixed_precision: str = "no") -> dict[str, Any]:
    """One training run of ``steps`` steps in this process; RSS after loading and at the peak."""
    import torch

    from vkd.bench.timing import PeakMemory, rss_bytes
    from vkd.config import DistillConfig
    from vkd.distill.trainer import Trainer

    torch.manual_seed(0)
    config = DistillConfig.from_dict({
        "model_name_or_path": student, "teacher_model_name_or_path": teacher, "data_path": data,
        "output_dir": out, "batch_size": batch, "epochs": 1, "max_steps": steps, "logging_steps": 1,
        "eval_strategy": "no", "use_lora": True, "lora_r": 16, "lora_alpha": 32,
        "use_gradient_cache": chunk is not None, "gradient_cache_chunk_size": chunk or batch,
        "distillation_loss_type": ["kl_divergence", "icl"], "teacher_cache": False, "mixed_precision": mixed_precision,
        "max_text_length": 77,
    })
    trainer = Trainer(config)
    loaded = rss_bytes()
    lora = sum(p.numel() for _, p in trainer.trainable)
    batches = iter(trainer.epoch_loader(0))
    prepared = [next(batches) for _ in range(steps)]
    tokens = {"text": int(prepared[0]["text_chunks"][0]["attention_mask"].sum(dim=1).float().mean())}
    image_chunk = prepared[0]["image_chunks"][0]
    if "image_grid_thw" in image_chunk:
        tokens["vision_patches"] = int(image_chunk["image_grid_thw"][0].prod())
    if "attention_mask" in image_chunk:
        tokens["image_sequence"] = int(image_chunk["attention_mask"].sum(dim=1).float().mean())
    started = time.perf_counter()
    with PeakMemory() as peak:
        for batch_data in prepared:
            trainer.train_step(batch_data)
    return {"rss_loaded_bytes": loaded, "rss_peak_bytes": peak.peak_bytes, "step_peak_over_loaded": peak.peak_bytes - loaded,
            "lora_parameters": lora, "student_parameters": sum(p.numel() for p in trainer.student.model.parameters()),
            "tokens": tokens, "seconds": time.perf_counter() - started, "batch": batch, "chunk": chunk,
            "mixed_precision": mixed_precision}


def _worker(spec: dict[str, Any]) -> dict[str, Any]:
    code = ("import json, sys; from vkd.bench.train_memory import measure_step; "
            "spec = json.loads(sys.argv[1]); print('RESULT ' + json.dumps(measure_step(**spec)))")
    proc = subprocess.run([sys.executable, "-c", code, json.dumps(spec)], capture_output=True, text=True, timeout=1800)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"measurement {spec} failed: {proc.stderr[-3000:]}")
    return json.loads(lines[-1][len("RESULT "):])


def run(work: Path, *, batch: int = 8, chunk: int = 4, image_size: int = 384, steps: int = 2,
        mixed_precision: str = "no", without_cache: bool = True, progress: Any = print) -> dict[str, Any]:
    from vkd.bench.real import arch_info, build_copy
    from vkd.data.synth import generate
    from vkd.models.tiny import build_tiny

    work.mkdir(parents=True, exist_ok=True)
    arch = arch_info(ARCH)
    copies = {layers: build_copy(arch, layers, work / "models", progress) for layers in (1, 2)}
    teacher = work / "models" / "tiny-qwen3vl-teacher"
    if not (teacher / "config.json").is_file():
        build_tiny("qwen3-vl", teacher, seed=1)
    data = work / f"data-{image_size}"
    if not (data / "train.jsonl").is_file():
        generate(data, 4 * batch * steps, seed=0, size=image_size, val_frac=0.0, test_frac=0.0)
    runs = []
    for layers, student in copies.items():
        for cached in (chunk, None) if without_cache else (chunk,):
            progress(f"train memory: {layers} layer(s) per stack, batch {batch}, "
                     f"{'gradient cache chunk ' + str(cached) if cached else 'no gradient cache'}")
            result = _worker({"student": str(student), "teacher": str(teacher), "data": str(data / "train.jsonl"),
                              "out": str(work / f"run-{layers}-{cached}-{mixed_precision}"), "batch": batch,
                              "chunk": cached, "steps": steps, "mixed_precision": mixed_precision})
            runs.append({"layers_per_stack": layers, **result})
    return {"arch": ARCH, "device": "cpu", "weights": "float32 (the trainer loads the student so)",
            "mixed_precision": mixed_precision, "image_size": image_size, "runs": runs}


@click.command()
@click.option("--work", type=click.Path(file_okay=False, path_type=Path), required=True)
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), required=True)
@click.option("--batch", type=int, default=8, show_default=True)
@click.option("--chunk", type=int, default=4, show_default=True)
@click.option("--image-size", type=int, default=384, show_default=True)
@click.option("--mixed-precision", type=click.Choice(["no", "bf16"]), default="no", show_default=True)
@click.option("--only-cached", is_flag=True, help="Skip the runs without gradient caching.")
def main(work: Path, out: Path, batch: int, chunk: int, image_size: int, mixed_precision: str,
         only_cached: bool) -> None:
    """Measure the student's training-step memory at 1 and 2 layers per stack (see the module docstring)."""
    result = run(work, batch=batch, chunk=chunk, image_size=image_size, mixed_precision=mixed_precision,
                 without_cache=not only_cached)
    out.write_text(json.dumps(result, indent=2))
    click.echo(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
