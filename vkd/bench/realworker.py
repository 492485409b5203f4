"""One encoder backend in its own process, timed in rounds on command (``vkd bench real``).

``python -m vkd.bench.realworker SPEC.json`` loads one model with one backend (torch fp32,
torch bf16, ONNX fp32, ONNX INT8), says ``ready`` and then answers commands read from
stdin, one per line, with one JSON line each:

* ``warmup`` — every call once, untimed;
* ``round`` — one timing round: image and query encoding at batch 1 (``b1_calls`` calls,
  in a rotating order with the rest) and at batch ``batch`` (one call), seconds per call,
  and for torch models the seconds spent inside each layer stack (``stacks``: "text",
  "vision"), which the driver uses to split a call's time between towers;
* ``finish`` — encode the parity inputs, save their vectors, report the peak RSS, exit.

Each backend runs in a process of its own so that its peak RSS is its own (the kernel's
high-water mark ``VmHWM``, which catches peaks a sampler would miss), and the driver starts every
backend of a model and interleaves their rounds, so a slow minute of the machine falls on
all of them alike. Protocol lines go to a private copy of stdout; whatever a library prints
goes to stderr.
"""

from __future__ import annotations

import json
import os
import resource
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any, TextIO

import numpy as np

BACKENDS = ("torch-fp32", "torch-bf16", "onnx-fp32", "onnx-int8")
STACK_NAMES = ("layers", "blocks")


def make_images(n: int, size: tuple[int, int], seed: int = 0) -> list[Any]:
    """``n`` deterministic RGB images of ``size`` (width, height): smooth colour fields with
    noise, decoded in memory, so timings cover preprocessing and the model, not disk reads."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    width, height = size
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    images = []
    for _ in range(n):
        a, b, c = rng.uniform(0.2, 2.0, 3)
        base = np.stack([np.sin(a * x / width * 6.28), np.cos(b * y / height * 6.28), np.sin(c * (x + y) / 100)], -1)
        pixels = np.clip(127.5 * (base + 1.0) + rng.normal(0, 12, base.shape), 0, 255).astype(np.uint8)
        images.append(Image.fromarray(pixels))
    return images


def load(spec: dict[str, Any]) -> Any:
    """The encoder ``spec["backend"]`` names, on the CPU."""
    backend, model = spec["backend"], spec["model"]
    threads = spec.get("threads")
    if backend.startswith("onnx"):
        from vkd.export import OnnxEncoder

        return OnnxEncoder(Path(model) / "onnx", precision=backend.split("-", 1)[1], threads=threads,
                           batch_size=int(spec["batch"]))
    import torch

    if threads:
        torch.set_num_threads(int(threads))
    from vkd.models import load_encoder

    dtype = {"torch-fp32": "float32", "torch-bf16": "bfloat16"}[backend]
    return load_encoder(model, device="cpu", dtype=dtype, prefer="torch", batch_size=int(spec["batch"]),
                        **(spec.get("options") or {}))


class StackTimer:
    """Seconds spent in each layer stack of a torch model (first layer entered → last left).

    A stack is an ``nn.ModuleList`` named ``layers`` or ``blocks``; it is a "vision" stack
    when its path names the vision tower, else a "text" one (CLIP's two encoders, Qwen3-VL's
    vision blocks and language-model layers)."""

    def __init__(self, model: Any) -> None:
        import torch

        self.depths: dict[str, int] = {}
        self.seconds: dict[str, float] = {}
        self._started: dict[str, float] = {}
        for name, module in model.named_modules():
            if not isinstance(module, torch.nn.ModuleList) or name.rsplit(".", 1)[-1] not in STACK_NAMES:
                continue
            if not len(module):
                continue
            tower = "vision" if ("vision" in name or "visual" in name) else "text"
            if tower in self.depths:  # one stack per tower; a second (e.g. mergers) is not a layer stack
                continue
            self.depths[tower] = len(module)
            module[0].register_forward_pre_hook(self._enter(tower))
            module[-1].register_forward_hook(self._leave(tower))
        self.reset()

    def _enter(self, tower: str) -> Callable[..., None]:
        def hook(*_: Any) -> None:
            self._started[tower] = time.perf_counter()
        return hook

    def _leave(self, tower: str) -> Callable[..., None]:
        def hook(*_: Any) -> None:
            self.seconds[tower] += time.perf_counter() - self._started.pop(tower, time.perf_counter())
        return hook

    def reset(self) -> None:
        self.seconds = {tower: 0.0 for tower in self.depths}


class Worker:
    def __init__(self, spec: dict[str, Any]) -> None:
        self.spec = spec
        started = time.perf_counter()
        self.encoder = load(spec)
        self.load_s = time.perf_counter() - started
        self.batch = int(spec["batch"])
        self.b1_calls = int(spec.get("b1_calls", 3))
        size = tuple(spec["image_size"])
        self.images = make_images(int(spec.get("n_images", 2 * self.batch)), size, seed=1)
        self.texts = list(spec["texts"])
        self.has_image = bool(getattr(self.encoder, "has_image_tower", True))
        model = getattr(self.encoder, "model", None)
        self.stacks = StackTimer(model) if model is not None and spec.get("hooks", True) else None
        self._cursor = {"image": 0, "text": 0}
        self.calls = [f"{kind}_b{size}" for kind in ("image", "text") for size in (1, self.batch)
                      if kind == "text" or self.has_image]
        self._round = 0

    def _take(self, kind: str, count: int) -> list[Any]:
        items = self.images if kind == "image" else self.texts
        start = self._cursor[kind]
        self._cursor[kind] = start + count
        return [items[(start + i) % len(items)] for i in range(count)]

    def _call(self, name: str) -> tuple[float, dict[str, float]]:
        kind, size = name.split("_b")
        count = int(size)
        inputs = self._take(kind, count)
        encode = self.encoder.encode_images if kind == "image" else self.encoder.encode_text
        if self.stacks is not None:
            self.stacks.reset()
        start = time.perf_counter()
        encode(inputs, batch_size=count)
        seconds = time.perf_counter() - start
        return seconds, dict(self.stacks.seconds) if self.stacks is not None else {}

    def warmup(self) -> dict[str, Any]:
        for name in self.calls:
            self._call(name)
        return {"event": "warmed"}

    def round(self) -> dict[str, Any]:
        # a rotating order inside the worker too: no call always runs first after a pause
        shift = self._round % len(self.calls)
        self._round += 1
        seconds: dict[str, list[float]] = {}
        stacks: dict[str, list[dict[str, float]]] = {}
        for name in self.calls[shift:] + self.calls[:shift]:
            for _ in range(self.b1_calls if name.endswith("_b1") else 1):
                elapsed, stack = self._call(name)
                seconds.setdefault(name, []).append(elapsed)
                stacks.setdefault(name, []).append(stack)
        return {"event": "round", "seconds": seconds, "stacks": stacks}

    def finish(self) -> dict[str, Any]:
        parity = self.spec.get("parity") or {}
        out: dict[str, np.ndarray] = {}
        texts = list(parity.get("texts") or [])
        if texts:
            out["text"] = self.encoder.encode_text(texts, batch_size=len(texts))
        n_images = int(parity.get("images") or 0)
        if n_images and self.has_image:
            images = make_images(n_images, tuple(self.spec["image_size"]), seed=2)
            out["image"] = self.encoder.encode_images(images, batch_size=n_images)
        if self.spec.get("vectors_out") and out:
            np.savez(self.spec["vectors_out"], **out)
        return {"event": "done", "peak_rss_bytes": peak_rss_bytes(), "rss_bytes": current_rss_bytes()}

    def ready(self) -> dict[str, Any]:
        describe = self.encoder.describe()
        return {"event": "ready", "load_s": self.load_s, "rss_bytes": current_rss_bytes(),
                "dim": int(self.encoder.dim), "has_image": self.has_image, "calls": self.calls,
                "stack_depths": self.stacks.depths if self.stacks is not None else {},
                "backend": describe.get("backend", "torch"), "pid": os.getpid()}


def peak_rss_bytes() -> int:
    """This process's peak resident set since it started.

    Linux: ``VmHWM`` of /proc/self/status, the high-water mark of this program's own memory.
    Not ``ru_maxrss``: Linux carries that across exec from the process that forked us (the
    driver, which holds torch and the corpus), so every worker would report the driver's peak.
    """
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    scale = 1 if sys.platform == "darwin" else 1024
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * scale


def current_rss_bytes() -> int:
    import psutil

    return int(psutil.Process(os.getpid()).memory_info().rss)


def _send(channel: TextIO, message: dict[str, Any]) -> None:
    channel.write(json.dumps(message) + "\n")
    channel.flush()


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print("usage: python -m vkd.bench.realworker SPEC.json", file=sys.stderr)
        return 2
    channel = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)  # anything a library prints goes to stderr, never into the protocol
    try:
        worker = Worker(json.loads(Path(argv[0]).read_text()))
        _send(channel, worker.ready())
        for line in sys.stdin:
            command = line.strip()
            if command == "warmup":
                _send(channel, worker.warmup())
            elif command == "round":
                _send(channel, worker.round())
            elif command == "finish":
                _send(channel, worker.finish())
                return 0
            elif command:
                _send(channel, {"event": "error", "error": f"unknown command {command!r}"})
        return 0
    except Exception as error:  # reported to the driver, which records it as the backend's result
        _send(channel, {"event": "error", "error": f"{type(error).__name__}: {error}",
                        "traceback": traceback.format_exc()})
        return 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
