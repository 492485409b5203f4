"""The GPU check: what only a GPU run can show, in under five minutes, downloading nothing.

    benchmarks/gpu/check.sh                          # one GPU (CUDA)
    python benchmarks/gpu/check.py --device cpu --quick --out /tmp/gpu-check   # the same code on a CPU

Checks, in order (each timed; a failed check fails the run, and the checks that need its
output are skipped):

1. ``model``        a random CLIP at ViT-B/32 size (12 layers, 768 wide, 224 px, patch 32,
                    512-d; built from a config by ``vkd.models.tiny``, marked random) is written
                    as a plain model directory;
2. ``fingerprint``  it loads in bf16 on ``--device`` and in fp32 on the CPU with one fingerprint,
                    and the two give the same vectors within bf16 precision;
3. ``distill``      a short distillation into a small CLIP on synthetic scenes (``vkd data
                    synth``) on ``--device``, with gradient caching and the teacher cache: the
                    second epoch runs no teacher forward pass;
4. ``index``        the student and the teacher index the scenes on ``--device``;
5. ``export``       the student is exported to ONNX (INT8) and passes its parity check;
6. ``search``       the index is searched on the CPU with the ONNX student and the teacher
                    reranking: every probe image finds itself first, and text queries answer.

Writes ``results.json`` and ``summary.md`` to ``--out`` (default ``$OUT`` when set, else
``./gpu-check``) and prints the summary; models, data and index (the teacher alone is ~700 MB)
go to ``--work`` (default: a temporary folder, deleted at the end unless ``--keep``), so that
the output stays small enough to copy back. Exit status 0 when every check passed.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

# ViT-B/32's vision tower; the tiny builder gives both towers these dimensions.
FULL = {"teacher": {"hidden": 768, "layers": 12, "heads": 12, "image": 224, "patch": 32, "proj": 512},
        "student": {"hidden": 128, "layers": 4, "heads": 4, "image": 64, "patch": 8, "proj": 128},
        "images": 96, "image_size": 64, "batch_size": 32, "chunk": 8, "epochs": 2}
QUICK = {"teacher": {"hidden": 64, "layers": 2, "heads": 2, "image": 32, "patch": 8, "proj": 48},
         "student": {"hidden": 32, "layers": 2, "heads": 2, "image": 32, "patch": 8, "proj": 32},
         "images": 8, "image_size": 32, "batch_size": 8, "chunk": 3, "epochs": 2}
QUERIES = ["a dog on a beach", "two red cars parked on a road at night", "a boat on a lake"]
PROBES = 5


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda", help="where models train and index: cuda (default), cuda:N or cpu")
    parser.add_argument("--quick", action="store_true", help="small models and data (the CPU smoke test)")
    parser.add_argument("--out", default=None, help="output folder (default: $OUT, else ./gpu-check)")
    parser.add_argument("--work", default=None, help="folder for models, data and index (default: a temporary one)")
    parser.add_argument("--keep", action="store_true", help="keep the work folder")
    return parser.parse_args(argv)


class Checks:
    """Runs named checks in order, recording time, outcome and details of each."""

    def __init__(self) -> None:
        self.results: list[dict[str, Any]] = []

    def run(self, name: str, check: Callable[[], dict[str, Any]], *, needs: tuple[str, ...] = ()) -> dict[str, Any]:
        failed = [n for n in needs if not self.passed(n)]
        if failed:
            record = {"name": name, "ok": False, "skipped": f"needs {', '.join(failed)}", "seconds": 0.0}
            self.results.append(record)
            return {}
        started = time.perf_counter()
        try:
            details = check()
            record = {"name": name, "ok": bool(details.pop("ok", True)), **details}
        except Exception as error:  # the check's own failure is the result, not a crash
            record = {"name": name, "ok": False, "error": f"{type(error).__name__}: {error}",
                      "traceback": traceback.format_exc(limit=8)}
            details = {}
        record["seconds"] = round(time.perf_counter() - started, 2)
        self.results.append(record)
        print(f"[{'ok' if record['ok'] else 'FAIL'}] {name} ({record['seconds']} s)", flush=True)
        return details

    def passed(self, name: str) -> bool:
        return any(r["name"] == name and r["ok"] for r in self.results)

    @property
    def ok(self) -> bool:
        return all(r["ok"] for r in self.results)


def _cosines(a: Any, b: Any) -> float:
    import numpy as np

    return float(np.min(np.sum(np.asarray(a) * np.asarray(b), axis=1)))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    out = Path(args.out or os.environ.get("OUT") or "gpu-check").resolve()
    out.mkdir(parents=True, exist_ok=True)
    work = Path(args.work).resolve() if args.work else Path(tempfile.mkdtemp(prefix="vkd-gpu-check-"))
    work.mkdir(parents=True, exist_ok=True)
    # the file-hash cache and anything else vkd keeps stay in the work folder, not in ~/.cache
    os.environ.setdefault("VKD_HOME", str(work / "vkd-home"))
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.device == "cpu":
        # the trainer takes CUDA whenever it sees one: a CPU run must not see it
        os.environ["CUDA_VISIBLE_DEVICES"] = ""

    import torch

    from vkd.models import load_encoder
    from vkd.models.tiny import build_tiny

    plan = QUICK if args.quick else FULL
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print(f"--device {args.device}: CUDA is not available here (torch {torch.__version__}); use --device cpu",
              file=sys.stderr)
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)
        return 2
    checks = Checks()
    started = time.perf_counter()
    paths = {"teacher": work / "teacher", "student": work / "student-init", "data": work / "data",
             "run": work / "distill", "index": work / "index"}

    def model() -> dict[str, Any]:
        build_tiny("clip", paths["teacher"], seed=0, size="small", overrides=plan["teacher"])
        # what the directory is, for anyone who finds it: random weights at a real shape
        (paths["teacher"] / "RANDOM_WEIGHTS.txt").write_text("random weights built by benchmarks/gpu/check.py\n")
        build_tiny("clip", paths["student"], seed=1, size="small", overrides=plan["student"])
        teacher = load_encoder(paths["teacher"], device="cpu", dtype="float32")
        return {"teacher_parameters": teacher.num_parameters(), "teacher_dims": plan["teacher"],
                "student_dims": plan["student"]}

    def fingerprint() -> dict[str, Any]:
        from vkd.export.onnx_export import sample_images

        on_device = load_encoder(paths["teacher"], device=device, dtype="bfloat16")
        on_cpu = load_encoder(paths["teacher"], device="cpu", dtype="float32")
        images = sample_images(4)
        text_cos = _cosines(on_device.encode_text(QUERIES), on_cpu.encode_text(QUERIES))
        image_cos = _cosines(on_device.encode_images(images), on_cpu.encode_images(images))
        same = on_device.fingerprint == on_cpu.fingerprint
        return {"ok": same and min(text_cos, image_cos) > 0.98, "fingerprint_device_bf16": on_device.fingerprint,
                "fingerprint_cpu_fp32": on_cpu.fingerprint, "min_cosine_text": round(text_cos, 5),
                "min_cosine_image": round(image_cos, 5)}

    def distill() -> dict[str, Any]:
        from vkd.config import DistillConfig
        from vkd.data.pairs import read_pairs, write_pairs
        from vkd.data.synth import generate
        from vkd.distill import distill as run_distill

        generate(paths["data"], plan["images"], seed=0, size=plan["image_size"], val_frac=0.0, test_frac=0.0,
                 overwrite=True)
        # whole batches only: every epoch then sees every pair, and the cache counts are exact
        pairs = list(read_pairs(paths["data"] / "train.jsonl"))
        pairs = pairs[: len(pairs) - len(pairs) % plan["batch_size"]]
        data = paths["data"] / "pairs.jsonl"
        write_pairs(data, [{"image": p.image, "text": p.text, "image_id": p.image_id} for p in pairs])
        config = DistillConfig.from_dict({
            "model_name_or_path": str(paths["student"]), "teacher_model_name_or_path": str(paths["teacher"]),
            "data_path": str(data), "output_dir": str(paths["run"]),
            "epochs": plan["epochs"], "batch_size": plan["batch_size"], "learning_rate": 1e-4,
            "warmup_ratio": 0.0, "logging_steps": 1, "eval_strategy": "no", "use_lora": True,
            "distillation_loss_type": ["kl_divergence", "feature_mse"], "use_gradient_cache": True,
            "gradient_cache_chunk_size": plan["chunk"], "teacher_cache": True, "mixed_precision": "auto",
        })
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        report = run_distill(config).report
        rows = [json.loads(line) for line in (paths["run"] / "metrics.jsonl").read_text().splitlines()]
        losses = [row["loss"] for row in rows if row.get("type") == "train"]
        per_epoch = len(pairs)
        cache = report["teacher_cache"]
        details = {
            "steps": report["steps"], "teacher_cache": cache, "teacher_forward_rows": report["teacher_forward_rows"],
            "first_loss": losses[0] if losses else None, "last_loss": losses[-1] if losses else None,
            "wall_time_s": report["wall_time_s"],
        }
        if device.type == "cuda":
            details["peak_cuda_memory_mib"] = round(torch.cuda.max_memory_allocated(device) / 2**20, 1)
        finite = bool(losses) and all(loss == loss and abs(loss) < float("inf") for loss in losses)
        # epoch 1 runs the teacher on every row, every later epoch on none
        details["ok"] = (finite and cache["misses"] == per_epoch and report["teacher_forward_rows"] == per_epoch
                         and cache["hits"] == per_epoch * (plan["epochs"] - 1)
                         and (device.type != "cuda" or details["peak_cuda_memory_mib"] > 0))
        return details

    def index() -> dict[str, Any]:
        from vkd.indexer import Index

        built = Index.build(paths["data"] / "images" / "train", paths["index"], student=str(paths["run"] / "model"),
                            teacher=str(paths["teacher"]), rebuild=True, device=device)
        return {"ok": len(built) == plan["images"], "images": len(built), "shards": len(built.shards)}

    def export() -> dict[str, Any]:
        from vkd.export import export_onnx

        result = export_onnx(paths["run"] / "model", int8="dynamic")
        return {"onnx_dir": str(result.out_dir), "parity": result.parity}

    def search() -> dict[str, Any]:
        from vkd.retrieval import Retriever

        retriever = Retriever(paths["index"], prefer="onnx", device="cpu", rerank=True)
        student = type(retriever._state.student).__name__
        probes = sorted((paths["data"] / "images" / "train").glob("*.png"))[:PROBES]
        found_self = [Path(retriever.search(probe, k=1)[0].path).resolve() == probe.resolve() for probe in probes]
        answers = {query: [hit.to_dict() for hit in retriever.search(query, k=3)] for query in QUERIES}
        return {"ok": student == "OnnxEncoder" and all(found_self) and all(answers.values()),
                "student_backend": student, "probes_found_first": f"{sum(found_self)}/{len(found_self)}",
                "queries": {q: [Path(h["path"]).name for h in hits] for q, hits in answers.items()}}

    checks.run("model", model)
    checks.run("fingerprint", fingerprint, needs=("model",))
    checks.run("distill", distill, needs=("model",))
    checks.run("index", index, needs=("distill",))
    checks.run("export", export, needs=("distill",))
    checks.run("search", search, needs=("index", "export"))

    environment = {"device": str(device), "quick": args.quick, "python": platform.python_version(),
                   "torch": torch.__version__, "cuda": torch.version.cuda,
                   "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None}
    try:
        import transformers

        environment["transformers"] = transformers.__version__
    except ImportError:  # pragma: no cover - vkd needs it
        pass
    results = {"ok": checks.ok, "seconds": round(time.perf_counter() - started, 1), "environment": environment,
               "checks": checks.results}
    (out / "results.json").write_text(json.dumps(results, indent=2, default=str) + "\n")
    summary = _summary(results)
    (out / "summary.md").write_text(summary)
    print(summary)
    if args.keep or args.work:
        print(f"models, data and index kept in {work}")
    else:
        shutil.rmtree(work, ignore_errors=True)
    return 0 if checks.ok else 1


def _summary(results: dict[str, Any]) -> str:
    env = results["environment"]
    lines = [f"# vkd GPU check: {'PASSED' if results['ok'] else 'FAILED'}", "",
             f"device {env['device']} ({env.get('gpu') or 'no GPU'}), torch {env['torch']}, "
             f"transformers {env.get('transformers')}, quick={env['quick']}, {results['seconds']} s", "",
             "| check | result | seconds | details |", "|---|---|---|---|"]
    for record in results["checks"]:
        details = {k: v for k, v in record.items() if k not in ("name", "ok", "seconds", "traceback")}
        outcome = "ok" if record["ok"] else ("skipped" if "skipped" in record else "FAILED")
        text = json.dumps(details, default=str)
        lines.append(f"| {record['name']} | {outcome} | {record['seconds']} | {text[:400]} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
