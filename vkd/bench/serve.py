"""Serve benchmark: ``vkd serve`` under a bounded load on loopback, torch vs the slim ONNX runtime.

For each runtime a real server process is started on 127.0.0.1 (a free port, never another
address) and measured:

* start-up: seconds from starting the process to ``GET /health`` answering 200 (models
  loaded and warmed up), and its resident memory (RSS) when idle and at its peak under load;
* load: ``clients`` threads, each with its own keep-alive connection, send
  ``requests_per_client`` text searches (``GET /search``, k=10, the held-out captions) as
  fast as answers come back: requests/s, p50/p95/p99 latency as the client sees it, errors
  (any status but 200, any connection failure), and the server's own figures from
  ``/stats`` (its latency percentiles and mean micro-batch size).

The runtimes: "torch" serves the index's models through transformers (``--prefer torch``);
"onnx" serves the ONNX exports of the student and of the teacher (exported into the
scratch folder first when a model has none), so neither torch nor transformers is loaded
in the server: ``/stats`` reports ``torch_loaded``, and the result says so. With
``serve_python`` the ONNX server runs on that interpreter (a venv with only
``vkd[serve]``: the slim install itself). Every run is bounded by count and by
``max_seconds``; the clients run in this process, on the same machine as the server, which
on a small machine takes CPU from the server (the result notes the core count).
"""

from __future__ import annotations

import http.client
import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.parse
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from vkd.bench.report import BenchResult, markdown_table
from vkd.bench.timing import MIB, latency_summary

READY_PREFIX = "vkd serve: ready at "
HOST = "127.0.0.1"  # the load goes to loopback only


@dataclass
class ServeSettings:
    clients: int = 8
    requests_per_client: int = 200
    warmup_requests: int = 10
    max_seconds: float = 120.0  # per runtime's load run; it stops there even if requests remain
    startup_timeout_s: float = 300.0
    k: int = 10

    @classmethod
    def quick(cls) -> ServeSettings:
        return cls(clients=4, requests_per_client=10, warmup_requests=2, max_seconds=30.0, startup_timeout_s=120.0)


class ServerProcess:
    """A ``vkd serve`` subprocess on a free loopback port; stopped on exit from ``with``."""

    def __init__(self, args: Sequence[str], *, python: str | None = None, env: dict[str, str] | None = None,
                 timeout_s: float = 300.0) -> None:
        self.command = [python or sys.executable, "-m", "vkd", "serve", "--host", HOST, "--port", "0",
                        "--no-access-log", "--log-level", "warning", *args]
        self.env = {**os.environ, **(env or {})}
        self.timeout_s = timeout_s
        self.process: subprocess.Popen[str] | None = None
        self.port: int | None = None
        self.lines: list[str] = []
        self.startup_s: float | None = None
        self._ready = threading.Event()

    def __enter__(self) -> ServerProcess:
        started = time.perf_counter()
        self.process = subprocess.Popen(self.command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                                        env=self.env)
        threading.Thread(target=self._read, daemon=True).start()
        deadline = started + self.timeout_s
        while not self._ready.wait(0.05):
            if self.process.poll() is not None or time.perf_counter() > deadline:
                self.stop()
                raise RuntimeError(f"`{' '.join(self.command)}` did not become ready (exit status "
                                   f"{self.process.returncode}):\n" + "\n".join(self.lines[-20:]))
        while time.perf_counter() < deadline:  # the ready line is printed once /health answers 200
            if self.get("/health")[0] == 200:
                break
            time.sleep(0.02)
        self.startup_s = time.perf_counter() - started
        return self

    def _read(self) -> None:
        assert self.process is not None and self.process.stderr is not None
        for line in self.process.stderr:
            self.lines.append(line.rstrip())
            if line.startswith(READY_PREFIX):
                address = line[len(READY_PREFIX):].split()[0]
                self.port = urllib.parse.urlsplit(address).port
                self._ready.set()

    def get(self, path: str) -> tuple[int, Any]:
        """(status, parsed JSON, or the raw bytes of any other body)."""
        connection = http.client.HTTPConnection(HOST, self.port, timeout=30)
        try:
            connection.request("GET", path)
            response = connection.getresponse()
            body = response.read()
            if body and (response.getheader("content-type") or "").startswith("application/json"):
                return response.status, json.loads(body)
            return response.status, body
        finally:
            connection.close()

    def rss_bytes(self) -> int:
        import psutil

        assert self.process is not None
        return int(psutil.Process(self.process.pid).memory_info().rss)

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(15)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(5)

    def __exit__(self, *exc: Any) -> None:
        self.stop()


def load_run(port: int, queries: Sequence[str], settings: ServeSettings,
             sample: Callable[[], None] | None = None) -> dict[str, Any]:
    """``clients`` x ``requests_per_client`` searches on loopback; at most ``max_seconds``."""
    paths = [f"/search?{urllib.parse.urlencode({'q': q, 'k': settings.k})}" for q in queries]
    latencies: list[list[float]] = [[] for _ in range(settings.clients)]
    errors: list[list[str]] = [[] for _ in range(settings.clients)]
    start = threading.Barrier(settings.clients + 1)
    deadline: list[float] = [0.0]

    def client(number: int) -> None:
        connection = http.client.HTTPConnection(HOST, port, timeout=60)
        start.wait()
        for i in range(settings.requests_per_client):
            if time.perf_counter() > deadline[0]:
                break
            path = paths[(number * settings.requests_per_client + i) % len(paths)]
            tick = time.perf_counter()
            try:
                connection.request("GET", path)
                response = connection.getresponse()
                response.read()
                if response.status != 200:
                    errors[number].append(f"HTTP {response.status}")
                else:
                    latencies[number].append(time.perf_counter() - tick)
            except (OSError, http.client.HTTPException) as error:
                errors[number].append(f"{type(error).__name__}: {error}")
                connection.close()
                connection = http.client.HTTPConnection(HOST, port, timeout=60)
        connection.close()

    threads = [threading.Thread(target=client, args=(n,), daemon=True) for n in range(settings.clients)]
    for thread in threads:
        thread.start()
    began = time.perf_counter()
    deadline[0] = began + settings.max_seconds
    start.wait()
    while any(thread.is_alive() for thread in threads):
        if sample is not None:
            sample()
        time.sleep(0.05)
    seconds = time.perf_counter() - began
    done = [value for per_client in latencies for value in per_client]
    failed = [error for per_client in errors for error in per_client]
    planned = settings.clients * settings.requests_per_client
    return {
        "clients": settings.clients,
        "requests_planned": planned,
        "requests_ok": len(done),
        "errors": len(failed),
        "error_examples": sorted(set(failed))[:5],
        "stopped_at_time_limit": len(done) + len(failed) < planned,
        "seconds": seconds,
        "requests_per_s": len(done) / seconds if seconds > 0 else None,
        "latency": latency_summary(done) if done else None,
    }


def _onnx_dir(model: str, role: str, workdir: Path, progress: Callable[[str], None]) -> str:
    """An ONNX export of ``model``: its own ``<model>/onnx`` or one written into ``workdir``."""
    from vkd.export.onnx_encoder import EXPORT_MANIFEST

    own = Path(model) / "onnx"
    if (own / EXPORT_MANIFEST).is_file():
        return str(own)
    out = workdir / f"{role}-onnx"
    if not (out / EXPORT_MANIFEST).is_file():
        from vkd.export import export_onnx

        progress(f"serve: exporting the {role} {model} to ONNX into {out} (the slim runtime needs it)")
        export_onnx(model, out)
    return str(out)


def measure_runtime(name: str, index_dir: Path, args: Sequence[str], queries: Sequence[str],
                    settings: ServeSettings, *, python: str | None = None,
                    progress: Callable[[str], None] = lambda message: None) -> dict[str, Any]:
    progress(f"serve: starting the {name} runtime")
    with ServerProcess(["--index", str(index_dir), *args], python=python,
                       timeout_s=settings.startup_timeout_s) as server:
        assert server.port is not None
        idle_rss = server.rss_bytes()
        warm = ServeSettings(clients=1, requests_per_client=settings.warmup_requests, max_seconds=30.0, k=settings.k)
        load_run(server.port, queries, warm)
        peak = [server.rss_bytes()]

        def sample() -> None:
            peak[0] = max(peak[0], server.rss_bytes())

        progress(f"serve: {name}: {settings.clients} clients x {settings.requests_per_client} searches")
        measured = load_run(server.port, queries, settings, sample=sample)
        status, stats = server.get("/stats")
        stats = stats if status == 200 else {}
    return {
        "runtime": name,
        "server_args": list(args),
        "python": python or sys.executable,
        "startup_s": server.startup_s,
        "idle_rss_mib": idle_rss / MIB,
        "peak_rss_mib": peak[0] / MIB,
        "torch_loaded": stats.get("torch_loaded"),
        "models": stats.get("models"),
        "server_latency_ms": stats.get("latency_ms"),
        "mean_batch_size": (stats.get("batching") or {}).get("mean_batch_size"),
        **measured,
    }


def run_serve_benchmark(
    index_dir: str | os.PathLike[str],
    *,
    student: str,
    teacher: str,
    queries: Sequence[str],
    workdir: str | os.PathLike[str],
    settings: ServeSettings | None = None,
    serve_python: str | None = None,
    progress: Callable[[str], None] = lambda message: None,
) -> BenchResult:
    """Both runtimes on ``index_dir`` (whose models are ``student`` and ``teacher``)."""
    settings = settings or ServeSettings()
    if not queries:
        raise ValueError("the serve benchmark needs text queries (the held-out captions)")
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    onnx_args = ["--prefer", "onnx", "--student", _onnx_dir(student, "student", workdir, progress),
                 "--teacher", _onnx_dir(teacher, "teacher", workdir, progress)]
    runtimes = [
        measure_runtime("torch", Path(index_dir), ["--prefer", "torch"], queries, settings, progress=progress),
        measure_runtime("onnx (slim)", Path(index_dir), onnx_args, queries, settings, python=serve_python,
                        progress=progress),
    ]
    results = {"index": str(index_dir), "settings": asdict(settings), "queries": len(queries),
               "host": HOST, "runtimes": runtimes}
    notes = [f"Load generated by {settings.clients} client threads in the benchmark process on the same machine "
             f"({os.cpu_count()} CPUs) as the server, over loopback; each runtime's load run is capped at "
             f"{settings.max_seconds:.0f} s."]
    for runtime in runtimes:
        if runtime["stopped_at_time_limit"]:
            notes.append(f"{runtime['runtime']}: the time limit stopped the run after {runtime['requests_ok']} of "
                         f"{runtime['requests_planned']} requests.")
    slim = runtimes[1]
    if slim["torch_loaded"]:
        notes.append("The ONNX runtime loaded torch: its RSS is not that of a slim install.")
    elif serve_python is None:
        notes.append("The ONNX runtime ran on this interpreter (torch installed but never imported: /stats said "
                     "torch_loaded=false); --serve-python runs it from a venv with only vkd[serve].")
    return BenchResult("serve", results, markdown(results), notes=notes)


def markdown(results: dict[str, Any]) -> str:
    rows = []
    for runtime in results["runtimes"]:
        latency = runtime["latency"] or {}
        rows.append([runtime["runtime"], runtime["requests_ok"], runtime["errors"], runtime["requests_per_s"],
                     latency.get("p50_ms"), latency.get("p95_ms"), latency.get("p99_ms"), runtime["mean_batch_size"],
                     runtime["startup_s"], runtime["idle_rss_mib"], runtime["peak_rss_mib"],
                     runtime["torch_loaded"]])
    settings = results["settings"]
    return "\n".join([
        f"`vkd serve` on {results['index']}: {settings['clients']} concurrent clients x "
        f"{settings['requests_per_client']} text searches (k={settings['k']}) on {results['host']}, per runtime. "
        "Latency is what a client saw, per request; start-up is process start to /health 200.",
        "",
        markdown_table(["runtime", "requests", "errors", "requests/s", "p50 ms", "p95 ms", "p99 ms", "mean batch",
                        "start-up s", "idle RSS MiB", "peak RSS MiB", "torch loaded"], rows),
    ])
