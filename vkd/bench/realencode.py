"""Encoding at real model sizes: every backend of a model in its own process, in rounds.

For one architecture, ``measure_arch`` starts a ``vkd.bench.realworker`` process per (model
copy, backend), lets each load and warm up, then runs ``rounds`` rounds in which every
process, in a rotating order, times image and query encoding at batch 1 and at batch
``batch``. Each process's peak RSS is its own. Per round, a figure is the median of that
round's calls; the report gives the median over rounds with the spread, and every ratio
(e.g. ONNX INT8 over torch fp32) is taken within a round and then summarised.

Models too big to time whole on the machine (each measured call would take minutes, or the
weights do not fit in memory) are measured as two depth-truncated copies — the same
architecture with ``n1`` and ``n2`` layers per tower — and extrapolated to the real depth
``L`` per round:

    t(L) = t(n2) + (t(n2) - t(n1)) · Σ_k w_k (L_k - n2_k) / Σ_k w_k (n2_k - n1_k)

over the layer stacks ``k`` the call runs through (CLIP's image call: the vision stack;
Qwen3-VL's image call: vision blocks and language-model layers), ``w_k`` each stack's time
per layer, measured inside the torch model with hooks (ONNX calls take the torch fp32
shares of the same copy). With one stack it is the straight line through the two depths.
Memory and sizes on disk are extrapolated along the parameter count instead:
``x(full) = x(n2) + (x(n2) - x(n1)) / (P(n2) - P(n1)) · (P_full - P(n2))``, with the exact
parameter counts of the copies and of the full model. Every extrapolated figure says so and
carries its formula.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from vkd.bench.timing import ratio_spread, round_medians, spread

LAYER_NAME = re.compile(r"\.(layers|blocks)\.(\d+)\.")
TEXTS = [
    "a dog running on the beach at sunset",
    "two children playing football in a park on a sunny afternoon",
    "a red car parked near a lake at night",
    "a woman in a blue coat walking through the snow with her dog",
    "close up of a yellow flower with a bee on it",
    "an old man reading a newspaper on a bench",
    "a cat sleeping on a white sofa next to a window",
    "a group of people hiking up a mountain trail",
    "a plate of pasta with tomatoes and basil on a wooden table",
    "a small boat on a calm river surrounded by trees",
    "a city street full of yellow taxis in the rain",
    "a bird flying over the sea",
]


@dataclass
class Copy:
    """One model directory to measure: the architecture at ``layers`` depth per stack."""

    dir: Path
    layers: dict[str, int]
    full: bool
    parameters: int  # of this copy (tied weights once)
    full_parameters: int  # of the architecture at its real depth
    onnx: dict[str, Any] = field(default_factory=dict)  # status, reason, bytes per precision


@dataclass
class WorkerRun:
    copy: Copy
    backend: str
    process: subprocess.Popen | None = None
    log: Path | None = None
    ready: dict[str, Any] | None = None
    rounds: list[dict[str, Any]] = field(default_factory=list)
    done: dict[str, Any] | None = None
    error: str | None = None
    vectors: Path | None = None


def checkpoint_parameters(model_dir: Path) -> tuple[int, dict[str, int]]:
    """(parameters stored in the safetensors files, depth of each layer stack), read from the
    safetensors headers only: no weights are loaded."""
    total = 0
    indices: dict[str, set[int]] = {}
    for path in sorted(Path(model_dir).glob("*.safetensors")):
        with path.open("rb") as handle:
            size = int.from_bytes(handle.read(8), "little")
            header = json.loads(handle.read(size))
        for name, info in header.items():
            if name == "__metadata__":
                continue
            total += int(np.prod(info["shape"], dtype=np.int64))
            match = LAYER_NAME.search(name)
            if match:
                stack = "vision" if ("vision" in name or "visual" in name) else "text"
                indices.setdefault(stack, set()).add(int(match.group(2)))
    return total, {stack: len(found) for stack, found in indices.items()}


def call_stacks(family: str, call: str) -> list[str]:
    """The layer stacks a call runs through: CLIP/SigLIP image → vision, text → text;
    Qwen3-VL image → vision and text (the language model reads the image tokens)."""
    kind = call.split("_b")[0]
    if kind == "text":
        return ["text"]
    return ["vision", "text"] if family == "qwen3-vl" else ["vision"]


# ---------------------------------------------------------------- extrapolation


def extrapolate(value1: float, value2: float, layers1: Mapping[str, int], layers2: Mapping[str, int],
                full: Mapping[str, int], stacks: Sequence[str], weights: Mapping[str, float]) -> float | None:
    """A figure at full depth from its values at two truncated depths (module docstring).

    ``weights``: each stack's cost per layer, relative (time or bytes). Stacks already at
    their full depth in both copies add nothing (their cost is in both values). None when
    the copies do not differ in depth along ``stacks``.
    """
    grown = [k for k in stacks if layers2.get(k, 0) != layers1.get(k, 0)]
    step = sum(weights.get(k, 0.0) * (layers2[k] - layers1[k]) for k in grown)
    if not grown or step <= 0:
        return None
    remaining = sum(weights.get(k, 0.0) * (full[k] - layers2[k]) for k in grown)
    return value2 + (value2 - value1) * remaining / step


def formula(layers1: Mapping[str, int], layers2: Mapping[str, int], full: Mapping[str, int], stacks: Sequence[str],
            weights: Mapping[str, float], what: str, symbol: str = "t") -> str:
    """The extrapolation as a reader can redo it, with this call's numbers."""
    grown = [k for k in stacks if layers2.get(k, 0) != layers1.get(k, 0)]
    if len(grown) == 1:
        k = grown[0]
        n1, n2, big = layers1[k], layers2[k], full[k]
        return (f"{symbol}({big}) = {symbol}({n2}) + ({symbol}({n2}) - {symbol}({n1})) · ({big} - {n2}) / ({n2} - {n1}), "
                f"a straight line in the {k} depth through two truncated copies")
    total = sum(weights.get(k, 0.0) for k in grown) or 1.0
    shares = ", ".join(f"{k} {weights.get(k, 0.0) / total:.2f}" for k in grown)
    parts = " + ".join(f"w_{k}·({full[k]} - {layers2[k]})" for k in grown)
    steps = " + ".join(f"w_{k}·({layers2[k]} - {layers1[k]})" for k in grown)
    return (f"{symbol}(full) = {symbol}(n2) + ({symbol}(n2) - {symbol}(n1)) · [{parts}] / [{steps}], "
            f"w = {what} per layer ({shares})")


# ---------------------------------------------------------------- the worker group


def _spec(run: WorkerRun, *, batch: int, image_size: tuple[int, int], b1_calls: int, threads: int | None,
          parity_images: int, options: Mapping[str, Any] | None, vectors: Path) -> dict[str, Any]:
    return {"model": str(run.copy.dir), "backend": run.backend, "batch": batch, "image_size": list(image_size),
            "b1_calls": b1_calls, "threads": threads, "texts": TEXTS * 3, "n_images": 2 * batch,
            "parity": {"images": parity_images, "texts": TEXTS[:parity_images]}, "vectors_out": str(vectors),
            "hooks": run.backend.startswith("torch"), "options": dict(options or {})}


def _read(run: WorkerRun) -> dict[str, Any]:
    assert run.process is not None and run.process.stdout is not None
    line = run.process.stdout.readline()
    if not line:
        run.process.wait()
        tail = run.log.read_text(errors="replace")[-1500:] if run.log and run.log.exists() else ""
        raise RuntimeError(f"the {run.backend} worker exited ({run.process.returncode}) without answering: {tail}")
    message = json.loads(line)
    if message.get("event") == "error":
        raise RuntimeError(message.get("error", "worker error"))
    return message


def _command(run: WorkerRun, command: str) -> dict[str, Any]:
    assert run.process is not None and run.process.stdin is not None
    run.process.stdin.write(command + "\n")
    run.process.stdin.flush()
    return _read(run)


def _stop(run: WorkerRun) -> None:
    if run.process is not None and run.process.poll() is None:
        try:
            run.process.stdin.close()  # type: ignore[union-attr]
            run.process.wait(timeout=30)
        except (OSError, subprocess.TimeoutExpired):
            run.process.kill()
            run.process.wait()


def run_group(runs: list[WorkerRun], *, rounds: int, batch: int, image_size: tuple[int, int], b1_calls: int,
              threads: int | None, workdir: Path, parity_images: int = 8,
              options: Mapping[str, Any] | None = None,
              progress: Callable[[str], None] = lambda message: None, label: str = "") -> None:
    """Start every run's worker (one at a time, so loading does not overlap), warm them up,
    time ``rounds`` interleaved rounds, then collect vectors and peak RSS. A worker that
    fails is recorded in its ``error`` and left out of the rest."""
    workdir.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "OMP_WAIT_POLICY": "PASSIVE"}
    try:
        for index, run in enumerate(runs):
            run.log = workdir / f"worker-{index}-{run.backend}-{_layers_tag(run.copy.layers)}.log"
            run.vectors = workdir / f"vectors-{index}.npz"
            spec_path = workdir / f"spec-{index}.json"
            spec_path.write_text(json.dumps(_spec(run, batch=batch, image_size=image_size, b1_calls=b1_calls,
                                                  threads=threads, parity_images=parity_images,
                                                  options=options, vectors=run.vectors)))
            progress(f"{label}: loading {run.backend} at {_layers_text(run.copy.layers)}")
            with run.log.open("w") as log:
                run.process = subprocess.Popen(
                    [sys.executable, "-m", "vkd.bench.realworker", str(spec_path)], stdin=subprocess.PIPE,
                    stdout=subprocess.PIPE, stderr=log, text=True, env=env)
            try:
                run.ready = _read(run)
                _command(run, "warmup")
            except (RuntimeError, ValueError, OSError) as error:
                run.error = str(error)
                _stop(run)
                progress(f"{label}: {run.backend} at {_layers_text(run.copy.layers)} failed: {error}")
        live = [run for run in runs if run.error is None]
        for round_index in range(rounds):
            progress(f"{label}: round {round_index + 1}/{rounds} over {len(live)} backend(s)")
            shift = round_index % max(len(live), 1)
            for run in live[shift:] + live[:shift]:
                if run.error is not None:
                    continue
                try:
                    run.rounds.append(_command(run, "round"))
                except (RuntimeError, ValueError, OSError) as error:
                    run.error = str(error)
                    _stop(run)
        for run in live:
            if run.error is None:
                try:
                    run.done = _command(run, "finish")
                except (RuntimeError, ValueError, OSError) as error:
                    run.error = str(error)
    finally:
        for run in runs:
            _stop(run)


def _layers_tag(layers: Mapping[str, int]) -> str:
    return "-".join(f"{k}{v}" for k, v in sorted(layers.items()))


def _layers_text(layers: Mapping[str, int]) -> str:
    return ", ".join(f"{v} {k} layers" for k, v in sorted(layers.items()))


# ---------------------------------------------------------------- turning rounds into figures


def round_values(run: WorkerRun, call: str) -> list[float]:
    """Seconds per call of ``call``, one value (the round's median) per round."""
    return round_medians([message["seconds"][call] for message in run.rounds])


def stack_shares(run: WorkerRun, call: str, stacks: Sequence[str]) -> dict[str, float] | None:
    """Seconds per layer of each stack during ``call`` (median over every timed call), from
    the torch hooks; None when the run has no hook times for them."""
    times = {k: [] for k in stacks}
    for message in run.rounds:
        for sample in message["stacks"].get(call, []):
            for k in stacks:
                if k in sample:
                    times[k].append(sample[k])
    if not all(times.values()):
        return None
    return {k: float(np.median(times[k])) / max(run.copy.layers.get(k, 1), 1) for k in stacks}


def _cosines(reference: Path | None, candidate: Path | None) -> dict[str, Any] | None:
    if reference is None or candidate is None or not reference.exists() or not candidate.exists():
        return None
    ref, got = np.load(reference), np.load(candidate)
    out: dict[str, Any] = {}
    for kind in ("image", "text"):
        if kind in ref and kind in got and ref[kind].shape == got[kind].shape:
            cos = np.sum(ref[kind].astype(np.float64) * got[kind].astype(np.float64), axis=1)
            out[kind] = {"mean": float(cos.mean()), "min": float(cos.min()), "n": int(cos.size)}
    return out or None


def summarise_backend(runs: Mapping[tuple[int, str], WorkerRun], copies: list[Copy], backend: str, *,
                      family: str, full: Mapping[str, int], batch: int) -> dict[str, Any]:
    """The figures of one backend: per call ms per item (measured at full depth, or
    extrapolated from the two deepest copies), peak RSS, bytes on disk, cosine to torch fp32,
    and the ratio to torch fp32 within each round."""
    mine = [(index, runs.get((index, backend))) for index in range(len(copies))]
    mine = [(index, run) for index, run in mine if run is not None]
    failed = [run.error for _, run in mine if run.error]
    good = [(index, run) for index, run in mine if run.error is None and run.rounds]
    record: dict[str, Any] = {"backend": backend, "calls": {}}
    if not good:
        record["status"] = "failed" if failed else "not measured"
        record["reason"] = failed[0] if failed else "no copy of this model ran with this backend"
        return record
    record["status"] = "measured"
    if failed:
        record["errors"] = failed
    full_runs = [(index, run) for index, run in good if copies[index].full]
    reference_runs = {index: runs.get((index, "torch-fp32")) for index in range(len(copies))}
    if full_runs:
        index, run = full_runs[0]
        record["extrapolated"] = False
        record["layers"] = dict(copies[index].layers)
        for call in run.ready["calls"]:  # type: ignore[index]
            per_item = int(call.split("_b")[1])
            values = round_values(run, call)
            entry = {"ms_per_item": spread([1000.0 * v / per_item for v in values]), "per_item_divisor": per_item,
                     "round_seconds": values}
            reference = reference_runs.get(index)
            if backend != "torch-fp32" and reference is not None and reference.error is None and reference.rounds:
                entry["speedup_vs_torch_fp32"] = _paired(round_values(reference, call), values)
            record["calls"][call] = entry
        record["peak_rss_bytes"] = {"value": run.done["peak_rss_bytes"] if run.done else None, "extrapolated": False}
        record["model_bytes"] = _model_bytes(backend, copies[index], None, None)
        record["cosine_vs_torch_fp32"] = (_cosines(reference_runs[index].vectors, run.vectors)
                                          if reference_runs.get(index) is not None else None)
        record["load_s"] = run.ready.get("load_s") if run.ready else None
        return record

    if len(good) < 2:
        index, run = good[0]
        record["status"] = "failed"
        record["reason"] = (f"only one truncated copy ({_layers_text(copies[index].layers)}) ran: extrapolating "
                            "to the full depth needs two")
        return record
    (i1, run1), (i2, run2) = good[-2], good[-1]
    c1, c2 = copies[i1], copies[i2]
    record["extrapolated"] = True
    record["layers"] = {"copies": [dict(c1.layers), dict(c2.layers)], "full": dict(full)}
    torch_ref = reference_runs.get(i2)
    for call in run2.ready["calls"]:  # type: ignore[index]
        per_item = int(call.split("_b")[1])
        stacks = call_stacks(family, call)
        weights = stack_shares(run2, call, stacks)
        source = "hooks in this backend"
        if weights is None and torch_ref is not None and torch_ref.error is None and torch_ref.rounds:
            weights, source = stack_shares(torch_ref, call, stacks), "hooks in torch fp32 at the same depth"
        if weights is None:
            weights, source = {k: 1.0 for k in stacks}, "equal (no hook times)"
        v1, v2 = round_values(run1, call), round_values(run2, call)
        count = min(len(v1), len(v2))
        extrapolated = [extrapolate(v1[r], v2[r], c1.layers, c2.layers, full, stacks, weights) for r in range(count)]
        entry: dict[str, Any] = {
            "per_item_divisor": per_item,
            "formula": formula(c1.layers, c2.layers, full, stacks, weights, "time") + f" (weights: {source})",
            "measured_ms_per_item": {_layers_text(c1.layers): spread([1000.0 * v / per_item for v in v1]),
                                     _layers_text(c2.layers): spread([1000.0 * v / per_item for v in v2])},
        }
        if any(value is None or value <= 0 for value in extrapolated):
            entry["ms_per_item"] = None
            entry["note"] = "the two depths did not give a positive per-layer cost (noise larger than a layer)"
        else:
            entry["ms_per_item"] = spread([1000.0 * v / per_item for v in extrapolated])  # type: ignore[operator]
            entry["round_seconds"] = extrapolated
        record["calls"][call] = entry
    peak = [run.done["peak_rss_bytes"] if run.done else None for run in (run1, run2)]
    if None not in peak:
        record["peak_rss_bytes"] = {
            "value": along_parameters(float(peak[0]), float(peak[1]), c1, c2),  # type: ignore[arg-type]
            "extrapolated": True,
            "measured": {_layers_text(c1.layers): peak[0], _layers_text(c2.layers): peak[1]},
            "formula": parameters_formula("rss", c1, c2),
        }
    record["model_bytes"] = _model_bytes(backend, c2, c1, c2)
    record["cosine_vs_torch_fp32"] = (_cosines(torch_ref.vectors, run2.vectors) if torch_ref is not None else None)
    record["cosine_at_layers"] = dict(c2.layers)
    record["load_s"] = run2.ready.get("load_s") if run2.ready else None
    return record


def _paired(reference_seconds: Sequence[float], seconds: Sequence[float]) -> dict[str, Any] | None:
    count = min(len(reference_seconds), len(seconds))
    if not count:
        return None
    return ratio_spread(list(reference_seconds)[:count], list(seconds)[:count])


def pair_with_reference(records: list[dict[str, Any]]) -> None:
    """Add ``speedup_vs_torch_fp32`` (torch fp32 time / this backend's, within each round)
    to every extrapolated backend's calls; measured ones got it from the raw rounds."""
    reference = next((r for r in records if r["backend"] == "torch-fp32" and r.get("status") == "measured"), None)
    if reference is None:
        return
    for record in records:
        if record is reference or record.get("status") != "measured" or not record.get("extrapolated"):
            continue
        for call, entry in record["calls"].items():
            ref = reference["calls"].get(call, {})
            if entry.get("round_seconds") and ref.get("round_seconds"):
                entry["speedup_vs_torch_fp32"] = _paired(ref["round_seconds"], entry["round_seconds"])


def along_parameters(value1: float, value2: float, c1: Copy, c2: Copy) -> float | None:
    """A size (bytes in memory or on disk) at the full parameter count, from two copies."""
    if c2.parameters == c1.parameters:
        return None
    slope = (value2 - value1) / (c2.parameters - c1.parameters)
    return value2 + slope * (c2.full_parameters - c2.parameters)


def parameters_formula(symbol: str, c1: Copy, c2: Copy) -> str:
    return (f"{symbol}(full) = {symbol}(n2) + ({symbol}(n2) - {symbol}(n1)) / (P(n2) - P(n1)) · (P_full - P(n2)), "
            f"P = parameters: {c1.parameters:,} and {c2.parameters:,} in the copies, {c2.full_parameters:,} in full")


def _model_bytes(backend: str, copy: Copy, c1: Copy | None, c2: Copy | None) -> dict[str, Any]:
    """Bytes on disk of the model as this backend loads it, at full depth.

    torch: the full model's exact parameter count times 4 (fp32) or 2 (bf16: the size of a
    bf16 checkpoint). ONNX: the export's model files, extrapolated along the parameter count
    when measured on copies."""
    if backend.startswith("torch"):
        item = 2 if backend == "torch-bf16" else 4
        return {"value": float(copy.full_parameters * item), "extrapolated": False,
                "how": f"{copy.full_parameters:,} parameters × {item} bytes ({'bf16' if item == 2 else 'fp32'} "
                       "checkpoint)"}
    precision = backend.split("-", 1)[1]
    if c1 is None or c2 is None:
        size = (copy.onnx.get("bytes") or {}).get(precision)
        return {"value": size, "extrapolated": False, "how": f"ONNX {precision} model files"}
    s1, s2 = ((c.onnx.get("bytes") or {}).get(precision) for c in (c1, c2))
    if s1 is None or s2 is None:
        return {"value": None, "extrapolated": True, "how": "the export is missing on a copy"}
    return {"value": along_parameters(float(s1), float(s2), c1, c2), "extrapolated": True,
            "measured": {_layers_text(c1.layers): s1, _layers_text(c2.layers): s2},
            "how": f"ONNX {precision} model files; " + parameters_formula("bytes", c1, c2)}


def extrapolation_check(runs: Mapping[tuple[int, str], WorkerRun], copies: list[Copy], *, family: str,
                        full: Mapping[str, int], check: Sequence[int]) -> dict[str, Any] | None:
    """How far the two-depth extrapolation lands from the measured full-depth figure, per
    call and round (torch fp32): the trust one can put in the extrapolated rows."""
    measured = next((index for index, c in enumerate(copies) if c.full), None)
    if measured is None or len(check) != 2:
        return None
    whole, a, b = (runs.get((i, "torch-fp32")) for i in (measured, *check))
    if any(run is None or run.error or not run.rounds for run in (whole, a, b)):
        return None
    out: dict[str, Any] = {"copies": [dict(copies[i].layers) for i in check], "calls": {}}
    for call in whole.ready["calls"]:  # type: ignore[union-attr,index]
        stacks = call_stacks(family, call)
        weights = stack_shares(b, call, stacks) or {k: 1.0 for k in stacks}  # type: ignore[arg-type]
        va, vb, vm = round_values(a, call), round_values(b, call), round_values(whole, call)  # type: ignore[arg-type]
        count = min(len(va), len(vb), len(vm))
        errors = []
        for r in range(count):
            predicted = extrapolate(va[r], vb[r], copies[check[0]].layers, copies[check[1]].layers, full, stacks,
                                    weights)
            if predicted is not None:
                errors.append(100.0 * (predicted - vm[r]) / vm[r])
        if errors:
            out["calls"][call] = {"error_percent": spread(errors)}
    return out


def write_temp_dir(parent: Path, prefix: str) -> Path:
    parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=prefix, dir=parent))


def elapsed(since: float) -> str:
    seconds = int(time.perf_counter() - since)
    return f"{seconds // 60}:{seconds % 60:02d}"
