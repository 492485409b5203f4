"""What every benchmark writes: the machine it ran on, JSON, a Markdown table, PNG plots.

A benchmark returns a :class:`BenchResult`; :func:`write_result` turns it into
``<out>/<name>.json``, ``<out>/<name>.md`` and the figures' PNG files. The JSON always
holds ``benchmark``, ``machine``, ``command``, ``quick``, ``started_at``, ``duration_s``,
``notes`` and ``results``; numbers are plain finite floats (a figure that could not be
measured is ``null`` with a note saying why, never a guess).
"""

from __future__ import annotations

import datetime as _dt
import importlib.metadata
import json
import math
import os
import platform
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vkd.indexer.fsutil import atomic_write, atomic_write_bytes

SCHEMA_VERSION = 1
# distribution names (what pip installed) of the libraries whose versions decide the figures
LIBRARIES = {
    "torch": "torch",
    "transformers": "transformers",
    "faiss": "faiss-cpu",
    "onnxruntime": "onnxruntime",
    "numpy": "numpy",
    "pyarrow": "pyarrow",
}
REQUIRED_KEYS = ("schema_version", "benchmark", "machine", "command", "quick", "started_at",
                 "duration_s", "notes", "results")
MACHINE_KEYS = ("cpu_model", "physical_cores", "logical_cores", "threads", "memory_total_gib",
                "platform", "python", "libraries")


@dataclass
class Figure:
    """A plot to write as ``<out>/<filename>``; ``draw(fig)`` fills a matplotlib Figure."""

    filename: str
    draw: Callable[[Any], None]
    size: tuple[float, float] = (7.0, 4.5)


@dataclass
class BenchResult:
    name: str
    results: dict[str, Any]
    markdown: str
    notes: list[str] = field(default_factory=list)
    figures: list[Figure] = field(default_factory=list)


def cpu_model() -> str:
    """The CPU's marketing name (``/proc/cpuinfo`` on Linux, ``platform`` elsewhere)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith(("model name", "hardware", "cpu model")):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def library_versions() -> dict[str, str | None]:
    versions: dict[str, str | None] = {}
    for key, dist in LIBRARIES.items():
        try:
            versions[key] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            versions[key] = None
    return versions


_ORT_THREADS: int | None = None


def ort_threads() -> int | None:
    """Intra-op threads for the ONNX Runtime sessions a benchmark opens (None: ORT's default)."""
    return _ORT_THREADS


def threads_in_use() -> dict[str, int | None]:
    """Threads each compute library is set to use right now (``None``: library not installed)."""
    threads: dict[str, int | None] = {"torch": None, "faiss": None, "onnxruntime": None}
    try:
        import torch

        threads["torch"] = int(torch.get_num_threads())
    except ImportError:
        pass
    try:
        import faiss

        threads["faiss"] = int(faiss.omp_get_max_threads())
    except ImportError:
        pass
    # ONNX Runtime has no global setting: the benchmarks pass this to the sessions they open
    threads["onnxruntime"] = _ORT_THREADS
    return threads


def machine_info() -> dict[str, Any]:
    """CPU model, core counts, threads in use, memory, OS, Python and library versions."""
    import psutil

    return {
        "cpu_model": cpu_model(),
        "physical_cores": psutil.cpu_count(logical=False),
        "logical_cores": psutil.cpu_count(logical=True),
        "affinity_cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "threads": threads_in_use(),
        "memory_total_gib": psutil.virtual_memory().total / 1024**3,
        "platform": platform.platform(),
        "python": sys.version.split()[0],
        "libraries": library_versions(),
    }


def set_threads(n: int) -> None:
    """Use ``n`` threads in torch, FAISS and the ONNX Runtime sessions the benchmarks create."""
    global _ORT_THREADS
    if n < 1:
        raise ValueError(f"threads={n}: use at least one thread")
    _ORT_THREADS = n
    import torch

    torch.set_num_threads(n)
    try:
        import faiss

        faiss.omp_set_num_threads(n)
    except ImportError:
        pass


# ---------------------------------------------------------------- JSON


def to_jsonable(value: Any, where: str = "results") -> Any:
    """Plain JSON types; numpy scalars and arrays become numbers and lists, paths strings.

    A NaN or infinity is an error naming where it is: a benchmark must report ``None``
    with a note for a figure it could not measure, not a non-number.
    """
    import numpy as np

    if isinstance(value, Mapping):
        return {str(key): to_jsonable(item, f"{where}.{key}") for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_jsonable(item, f"{where}[{index}]") for index, item in enumerate(value)]
    if isinstance(value, np.ndarray):
        return to_jsonable(value.tolist(), where)
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    if isinstance(value, (int, np.integer)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        number = float(value)
        if not math.isfinite(number):
            raise ValueError(f"{where} = {number}: benchmark figures must be finite; use None for "
                             "a figure that was not measured")
        return number
    if isinstance(value, Path):
        return str(value)
    if value is None or isinstance(value, str):
        return value
    raise TypeError(f"{where}: cannot write a {type(value).__name__} to JSON")


# ---------------------------------------------------------------- Markdown


def format_cell(value: Any, digits: int = 3) -> str:
    """A table cell: ``-`` for missing, integers with thousands separators, floats to
    ``digits`` significant figures (at least one decimal below 1000)."""
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        if not math.isfinite(value):
            return str(value)
        if value == 0:
            return "0"
        magnitude = abs(value)
        if magnitude >= 1000:
            return f"{value:,.0f}"
        decimals = max(0, digits - 1 - int(math.floor(math.log10(magnitude))))
        return f"{value:.{decimals}f}"
    return str(value).replace("|", "\\|").replace("\n", " ")


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[Any]], *,
                   align: Sequence[str] | None = None, digits: int = 3) -> str:
    """A GitHub Markdown table. ``align`` holds "l" or "r" per column (default: text left,
    numbers right, decided by the first row)."""
    if not headers:
        raise ValueError("a table needs at least one column")
    for index, row in enumerate(rows):
        if len(row) != len(headers):
            raise ValueError(f"row {index} has {len(row)} cells, the table has {len(headers)} columns")
    if align is None:
        def numeric(column: int) -> bool:
            cells = [row[column] for row in rows if row[column] is not None]
            return bool(cells) and all(isinstance(c, (int, float)) and not isinstance(c, bool) for c in cells)

        align = ["r" if numeric(column) else "l" for column in range(len(headers))]
    if len(align) != len(headers) or any(a not in ("l", "r") for a in align):
        raise ValueError(f"align must hold 'l' or 'r' for each of the {len(headers)} columns, got {list(align)}")
    rule = ["---:" if a == "r" else ":---" for a in align]
    lines = ["| " + " | ".join(format_cell(h) for h in headers) + " |", "| " + " | ".join(rule) + " |"]
    lines += ["| " + " | ".join(format_cell(cell, digits) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def machine_line(machine: Mapping[str, Any]) -> str:
    libs = ", ".join(f"{k} {v}" for k, v in machine.get("libraries", {}).items() if v)
    threads = ", ".join(f"{k} {v}" for k, v in machine.get("threads", {}).items() if v is not None)
    return (f"{machine.get('cpu_model')}, {machine.get('physical_cores')} physical cores, "
            f"{machine.get('logical_cores')} logical CPUs (threads used: {threads}), "
            f"{machine.get('memory_total_gib', 0):.1f} GiB; Python {machine.get('python')}; {libs}")


def render_markdown(payload: Mapping[str, Any], body: str) -> str:
    title = f"## {payload['benchmark']}" + (" (quick)" if payload.get("quick") else "")
    parts = [title, "", body.strip(), ""]
    for note in payload.get("notes", []):
        parts.append(f"> {note}")
        parts.append("")
    parts.append(f"Machine: {machine_line(payload['machine'])}.  ")
    parts.append(f"Command: `{payload['command']}`; started {payload['started_at']}, "
                 f"took {payload['duration_s']:.1f} s.")
    return "\n".join(parts) + "\n"


# ---------------------------------------------------------------- writing


def now_iso() -> str:
    return _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat()


def build_payload(result: BenchResult, *, command: str, quick: bool, started_at: str,
                  duration_s: float, machine: Mapping[str, Any] | None = None) -> dict[str, Any]:
    payload = {
        "schema_version": SCHEMA_VERSION,
        "benchmark": result.name,
        "machine": dict(machine) if machine is not None else machine_info(),
        "command": command,
        "quick": quick,
        "started_at": started_at,
        "duration_s": duration_s,
        "notes": list(result.notes),
        "results": result.results,
        "figures": [figure.filename for figure in result.figures],
    }
    return to_jsonable(payload, where=result.name)


def write_result(out_dir: str | os.PathLike[str], result: BenchResult, *, command: str, quick: bool,
                 started_at: str, duration_s: float, machine: Mapping[str, Any] | None = None) -> list[Path]:
    """Write ``<name>.json``, ``<name>.md`` and the figures; return the paths written.

    Each file is written to a temporary name and renamed, so a crash never leaves half a
    result where an older complete one was.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    payload = build_payload(result, command=command, quick=quick, started_at=started_at,
                            duration_s=duration_s, machine=machine)
    written = []
    for figure in result.figures:
        written.append(save_figure(figure, out / figure.filename))
    json_path = out / f"{result.name}.json"
    atomic_write_bytes(json_path, (json.dumps(payload, indent=2, allow_nan=False) + "\n").encode())
    md_path = out / f"{result.name}.md"
    body = result.markdown
    if result.figures:
        body += "\n\n" + "\n".join(f"![{f.filename}]({f.filename})" for f in result.figures)
    atomic_write_bytes(md_path, render_markdown(payload, body).encode())
    return [json_path, md_path, *written]


def save_figure(figure: Figure, path: Path) -> Path:
    """Draw ``figure`` headless (matplotlib's Agg backend) into a PNG at ``path``."""
    try:
        import matplotlib
    except ImportError as error:
        raise RuntimeError("the benchmark plots need matplotlib: pip install 'vkd[bench]'") from error
    matplotlib.use("Agg", force=True)
    from matplotlib.figure import Figure as MplFigure

    fig = MplFigure(figsize=figure.size, dpi=110)
    figure.draw(fig)
    fig.tight_layout()
    atomic_write(path, lambda handle: fig.savefig(handle, format="png"))
    return path


def read_result(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Load a result JSON and check the common keys are there (used by tests and summaries)."""
    data = json.loads(Path(path).read_text(encoding="utf-8"))
    missing = [key for key in REQUIRED_KEYS if key not in data]
    if missing:
        raise ValueError(f"{path}: not a vkd benchmark result, missing keys {missing}")
    missing = [key for key in MACHINE_KEYS if key not in data["machine"]]
    if missing:
        raise ValueError(f"{path}: machine record lacks {missing}")
    return data
