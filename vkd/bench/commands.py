"""``vkd bench``: run the benchmarks and write JSON + Markdown + PNG into ``--out``.

Heavy libraries (torch, transformers, faiss, onnxruntime, matplotlib) load inside the
commands, so ``vkd bench --help`` stays fast.
"""

from __future__ import annotations

import re
import shlex
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

BENCHMARKS = ("distill", "search", "export", "index", "step", "real")
#: benchmarks that take no models or data from the demo (they build their own)
SELF_CONTAINED = ("real", "ray")
DEFAULT_OUT = Path("results")
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kKmM]?)\s*$")


def parse_sizes(value: str) -> tuple[int, ...]:
    """``10k,100k,1M`` → (10000, 100000, 1000000)."""
    sizes = []
    for part in value.split(","):
        match = _SIZE.match(part)
        if not match:
            raise ValueError(f"corpus size {part.strip()!r}: write a number with an optional k or M, e.g. 10k,100k,1M")
        number = float(match.group(1)) * {"": 1, "k": 10**3, "m": 10**6}[match.group(2).lower()]
        if number < 1 or number != int(number):
            raise ValueError(f"corpus size {part.strip()!r} must be a whole number of vectors, at least 1")
        sizes.append(int(number))
    return tuple(sizes)


def _sizes_option(ctx: click.Context, param: click.Parameter, value: str | None) -> tuple[int, ...] | None:
    if value is None:
        return None
    try:
        return parse_sizes(value)
    except ValueError as error:
        raise click.BadParameter(str(error)) from None


def _budget_option(ctx: click.Context, param: click.Parameter, value: str | None) -> int | None:
    if value is None:
        return None
    from vkd.indexer.build import parse_bytes

    try:
        return parse_bytes(value)
    except ValueError as error:
        raise click.BadParameter(str(error)) from None


def common_options(function: Callable[..., Any]) -> Callable[..., Any]:
    options = [
        click.option("--quick", is_flag=True,
                     help="Small and fast (a smoke test: 10k vectors, fewer repetitions, a quick demo if none is there)."),
        click.option("--out", "out_dir", type=click.Path(file_okay=False, path_type=Path), default=DEFAULT_OUT,
                     show_default=True, help="Folder for <name>.json, <name>.md and the PNG plots."),
        click.option("--threads", type=click.IntRange(min=1), default=None,
                     help="Threads for torch, FAISS and ONNX Runtime.  [default: each library's own]"),
        click.option("--demo-dir", type=click.Path(file_okay=False, path_type=Path), default=None,
                     help="Output of `vkd demo` to take models and data from.  [default: $VKD_HOME/demo]"),
        click.option("--data", type=click.Path(dir_okay=False, path_type=Path), default=None,
                     help="Held-out pair file (.jsonl), e.g. Flickr30k test; needs --teacher and --student."),
        click.option("--train-data", type=click.Path(dir_okay=False, path_type=Path), default=None,
                     help="Training pair file: static INT8 calibration and the step benchmark."),
        click.option("--teacher", default=None, help="Teacher model directory or hub id."),
        click.option("--student", default=None, help="Distilled student model directory."),
        click.option("--student-raw", default=None, help="The student before any training (distill benchmark)."),
        click.option("--student-ce", default=None, help="The student fine-tuned with CE only (distill benchmark)."),
        click.option("--int8", type=click.Path(file_okay=False, path_type=Path), default=None,
                     help="ONNX export of the student with INT8 towers.  [default: STUDENT/onnx]"),
        click.option("--images", type=click.Path(file_okay=False, path_type=Path), default=None,
                     help="Image folder for the index benchmark.  [default: the held-out images]"),
        click.option("--index", "index_dir", type=click.Path(file_okay=False, path_type=Path), default=None,
                     help="An index of real images with teacher vectors, for the full-search timing."),
    ]
    for option in reversed(options):
        function = option(function)
    return function


def search_options(function: Callable[..., Any]) -> Callable[..., Any]:
    options = [
        click.option("--sizes", callback=_sizes_option, default=None,
                     help="Corpus sizes, e.g. 10k,100k,1M.  [default: 10k,100k,1M; --quick: 10k]"),
        click.option("--index-type", type=click.Choice(("auto", "flat", "hnsw", "ivfpq")), default="auto",
                     show_default=True, help="Student ANN index (auto: vkd.indexer.choose_index's pick)."),
        click.option("--memory-budget", callback=_budget_option, default=None,
                     help="Memory budget for the student ANN index, e.g. 512MB (as `vkd index`)."),
    ]
    for option in reversed(options):
        function = option(function)
    return function


def step_options(function: Callable[..., Any]) -> Callable[..., Any]:
    options = [
        click.option("--steps", type=click.IntRange(min=1), default=None,
                     help="Timed training steps per configuration.  [default: 20; --quick: 5]"),
        click.option("--batch-size", type=click.IntRange(min=2), default=None,
                     help="Pairs per training step.  [default: 32; --quick: 16]"),
    ]
    for option in reversed(options):
        function = option(function)
    return function


def serve_options(function: Callable[..., Any]) -> Callable[..., Any]:
    options = [
        click.option("--clients", type=click.IntRange(min=1), default=None,
                     help="Concurrent clients.  [default: 8; --quick: 4]"),
        click.option("--requests", "requests_per_client", type=click.IntRange(min=1), default=None,
                     help="Searches per client.  [default: 200; --quick: 10]"),
        click.option("--max-seconds", type=click.FloatRange(min=1), default=None,
                     help="Time limit of each runtime's load run.  [default: 120; --quick: 30]"),
        click.option("--serve-python", type=click.Path(exists=True, dir_okay=False), default=None,
                     help="Python of a venv with only vkd[serve] to run the ONNX server on (the slim install). "
                          " [default: this Python]"),
    ]
    for option in reversed(options):
        function = option(function)
    return function


def _progress(message: str) -> None:
    click.echo(f"  {message}", err=True)


def command_line(ctx: click.Context) -> str:
    """The command as a user would type it: the path and every option given on the command line."""
    from click.core import ParameterSource

    words = ctx.command_path.split()
    # however it was invoked (the vkd CLI, `python -m vkd`, a script calling the group), as vkd
    words = ["vkd", *words[words.index("bench"):]] if "bench" in words else ["vkd", "bench", *words[1:]]
    for param in ctx.command.params:
        if not isinstance(param, click.Option) or param.name is None:
            continue
        if ctx.get_parameter_source(param.name) not in (ParameterSource.COMMANDLINE, ParameterSource.ENVIRONMENT):
            continue
        value = ctx.params.get(param.name)
        flag = max(param.opts, key=len)
        if param.is_flag:
            if value:
                words.append(flag)
        elif param.name == "sizes":
            words += [flag, ",".join(str(v) for v in value)]
        elif value is not None:
            words += [flag, str(value)]
    return shlex.join(words)


class Session:
    """One ``vkd bench`` invocation: options, the models + data source (resolved once,
    when a benchmark first needs it) and the result writer."""

    def __init__(self, ctx: click.Context, options: dict[str, Any]) -> None:
        self.ctx = ctx
        self.options = options
        self.quick: bool = options["quick"]
        self.out: Path = options["out_dir"]
        self.command = command_line(ctx)
        self._source: Any = None
        self._machine: dict[str, Any] | None = None
        if options.get("threads"):
            from vkd.bench.report import set_threads

            set_threads(options["threads"])

    @property
    def source(self) -> Any:
        if self._source is None:
            from vkd.bench.source import SourceError, resolve_source

            o = self.options
            try:
                self._source = resolve_source(
                    quick=self.quick, out_dir=self.out, demo_dir=o["demo_dir"], data=o["data"],
                    teacher=o["teacher"], student=o["student"], student_raw=o["student_raw"],
                    student_ce=o["student_ce"], int8=o["int8"], train_data=o["train_data"], images=o["images"],
                    index=o["index_dir"], progress=_progress,
                )
            except SourceError as error:
                raise click.UsageError(str(error)) from None
            click.echo(f"models and data: {self._source.origin}"
                       + (f" ({self._source.root})" if self._source.root else ""), err=True)
        return self._source

    def machine(self) -> dict[str, Any]:
        from vkd.bench.report import machine_info

        if self._machine is None:
            self._machine = machine_info()
        return self._machine

    def run(self, name: str) -> list[Path]:
        from vkd.bench.report import now_iso, write_result

        click.echo(f"bench {name}{' (quick)' if self.quick else ''}", err=True)
        started_at, start = now_iso(), time.perf_counter()
        result = RUNNERS[name](self)
        if name not in SELF_CONTAINED and not (name == "modes" and self.options.get("no_demo")):
            result.results["source"] = self.source.describe()
        paths = write_result(self.out, result, command=self.command, quick=self.quick, started_at=started_at,
                             duration_s=time.perf_counter() - start, machine=self.machine())
        for path in paths:
            click.echo(f"wrote {path}")
        return paths


# ---------------------------------------------------------------- the benchmarks


def _distill(session: Session) -> Any:
    from vkd.bench.distill import DistillSettings, run_distill_benchmark

    s = session.source
    models = {"teacher": s.teacher, "student raw": s.student_raw, "student CE-only": s.student_ce,
              "student distilled": s.student, "student distilled INT8": str(s.int8_dir) if s.int8_dir else None}
    settings = DistillSettings.quick() if session.quick else DistillSettings()
    return run_distill_benchmark(models, s.test_pairs, settings=settings, progress=_progress)


def _search(session: Session) -> Any:
    from vkd.bench.distill import open_model
    from vkd.bench.search import SearchSettings, encode_real, run_search_benchmark

    s, o = session.source, session.options
    settings = SearchSettings.quick() if session.quick else SearchSettings()
    if o.get("sizes"):
        settings.sizes = o["sizes"]
    settings.index_type = o.get("index_type") or "auto"
    settings.memory_budget = o.get("memory_budget")
    _progress("search: encoding the held-out split with the student and the teacher (the real vectors)")
    student, teacher = open_model(s.student), open_model(s.teacher)
    real = encode_real(student, teacher, s.test_pairs, max_images=settings.quality_queries)
    encoders = {"student (torch fp32)": student, "teacher (torch fp32)": teacher}
    if s.int8_dir is not None:
        encoders["student (ONNX INT8)"] = open_model(str(s.int8_dir), int8=True)
    from vkd.data.pairs import read_pairs

    texts = read_pairs(s.test_pairs).texts()[: max(settings.latency_queries, settings.batch)]
    return run_search_benchmark(settings, real=real, encoders=encoders, encode_texts=texts, index_dir=s.index_dir,
                                index_repeats=20 if session.quick else 100, progress=_progress,
                                workdir=_scratch(session, "search"))


def _export(session: Session) -> Any:
    from vkd.bench.export import ExportSettings, run_export_benchmark

    s = session.source
    settings = ExportSettings.quick() if session.quick else ExportSettings()
    return run_export_benchmark(s.student, s.test_pairs, workdir=_scratch(session, "export"),
                                calibration_pairs=s.train_pairs, settings=settings, progress=_progress)


def _index(session: Session) -> Any:
    from vkd.bench.index import IndexSettings, run_index_benchmark

    s = session.source
    images = s.require("an image folder", s.images_dir, "pass --images DIR")
    settings = IndexSettings.quick() if session.quick else IndexSettings()
    return run_index_benchmark(images, s.student, teacher=s.teacher, workdir=_scratch(session, "index"),
                               settings=settings, progress=_progress)


def _step(session: Session) -> Any:
    from vkd.bench.step import StepSettings, run_step_benchmark

    s, o = session.source, session.options
    train = s.require("a training pair file", s.train_pairs, "pass --train-data FILE")
    settings = StepSettings.quick() if session.quick else StepSettings()
    if o.get("steps"):
        settings.steps = o["steps"]
    if o.get("batch_size"):
        settings.batch_size = o["batch_size"]
    student = s.student_raw or s.student
    return run_step_benchmark(student, s.teacher, train, workdir=_scratch(session, "step"), settings=settings,
                              progress=_progress)


def _serve(session: Session) -> Any:
    from vkd.bench.serve import ServeSettings, run_serve_benchmark
    from vkd.data.pairs import read_pairs
    from vkd.indexer.manifest import read_manifest

    s, o = session.source, session.options
    index = s.require("an index with teacher vectors", s.index_dir, "run `vkd demo`, or pass --index DIR")
    manifest = read_manifest(Path(index))
    teacher = (manifest.get("teacher") or {}).get("name")
    if not teacher:
        raise click.UsageError(f"{index}: this index stores no teacher vectors; the serve benchmark measures the "
                               "teacher rerank: index with --teacher MODEL")
    settings = ServeSettings.quick() if session.quick else ServeSettings()
    for key in ("clients", "requests_per_client", "max_seconds"):
        if o.get(key):
            setattr(settings, key, o[key])
    return run_serve_benchmark(index, student=str(manifest["student"]["name"]), teacher=str(teacher),
                               queries=read_pairs(s.test_pairs).texts(), workdir=_scratch(session, "serve"),
                               settings=settings, serve_python=o.get("serve_python"), progress=_progress)


def _real(session: Session) -> Any:
    from vkd.bench.real import RealSettings, expected_minutes, known_archs, run_real_benchmark

    o = session.options
    settings = RealSettings.quick_settings() if session.quick else RealSettings()
    if o.get("archs"):
        archs = tuple(a.strip() for a in o["archs"].split(",") if a.strip())
        unknown = [a for a in archs if a not in known_archs()]
        if unknown:
            raise click.BadParameter(f"unknown arch(s) {', '.join(unknown)}; choose from {', '.join(known_archs())}",
                                     param_hint="--archs")
        settings.archs = archs
    if o.get("backends"):
        backends = tuple(b.strip() for b in o["backends"].split(",") if b.strip())
        from vkd.bench.real import BACKENDS

        unknown = [b for b in backends if b not in BACKENDS]
        if unknown or not backends:
            raise click.BadParameter(f"{o['backends']!r}: give some of {', '.join(BACKENDS)} (torch-fp32 is the "
                                     "reference of the cosines and speed-ups)", param_hint="--backends")
        settings.backends = backends
        settings.skip_unfit_fp32 = False  # asked for by name: time the copies even if the full model does not fit
    if o.get("repeats"):
        settings.rounds = o["repeats"]
    if o.get("corpus_size"):
        settings.corpus_size = o["corpus_size"][0]
    if o.get("pairings"):
        settings.pairings = tuple(p.strip() for p in o["pairings"].split(",") if p.strip())
    settings.threads = o.get("threads")
    work = o.get("work_dir") or _scratch(session, "real")
    if not session.quick:
        _progress(f"real: {', '.join(settings.archs)}; expect about {expected_minutes(settings, Path(work)):.0f} "
                  "minutes on two quiet cores (models and exports are built once into the work folder and reused)")
    return run_real_benchmark(settings, workdir=work, progress=_progress)


def _ray(session: Session) -> Any:
    from vkd.bench.ray_index import RayBenchSettings, run_ray_benchmark

    o = session.options
    settings = RayBenchSettings.quick_settings() if session.quick else RayBenchSettings()
    for key in ("arch", "images", "num_workers", "num_cpus"):
        if o.get(key):
            setattr(settings, key, o[key])
    if o.get("repeats"):
        settings.rounds = o["repeats"]
    try:
        import ray  # noqa: F401
        import ray.data  # noqa: F401
    except ImportError:
        raise click.UsageError('vkd bench ray needs Ray Data: pip install "vkd[ray]"') from None
    return run_ray_benchmark(settings, workdir=o.get("work_dir") or _scratch(session, "ray"), progress=_progress)


def _modes(session: Session) -> Any:
    from vkd.bench.modes import ModesSettings, print_recommendations, run_modes_benchmark

    o = session.options
    settings = ModesSettings.quick() if session.quick else ModesSettings()
    for key, name in (("real_student", "real_student"), ("real_teacher", "real_teacher"), ("qps", "queries_per_s"),
                      ("cores", "cores")):
        if o.get(key) is not None:
            setattr(settings, name, o[key])
    if o.get("no_real"):
        settings.real_student = settings.real_teacher = None
    if o.get("no_sweep"):
        settings.sweep = {}
    demo = None
    if not o.get("no_demo"):
        s = session.source
        train = s.require("a training pair file", s.train_pairs, "pass --demo-dir DIR of a finished `vkd demo`")
        demo = {"student": s.student, "teacher": s.teacher, "test_pairs": s.test_pairs, "train_pairs": train,
                "val_pairs": s.val_pairs}
    result = run_modes_benchmark(settings, workdir=o.get("work_dir") or _scratch(session, "modes"), demo=demo,
                                 progress=_progress)
    print_recommendations(result.results, click.echo)
    return result


def _scratch(session: Session, name: str) -> Path:
    from vkd.bench.source import scratch_dir

    return scratch_dir(session.out, name)


RUNNERS: dict[str, Callable[[Session], Any]] = {
    "distill": _distill, "search": _search, "export": _export, "index": _index, "step": _step, "serve": _serve,
    "real": _real, "ray": _ray, "modes": _modes,
}


# ---------------------------------------------------------------- click


@click.group()
def bench() -> None:
    """Benchmarks of the whole pipeline, written as JSON + Markdown + PNG.

    Each benchmark writes OUT/<name>.json (with the machine it ran on), OUT/<name>.md and
    its plots. Models and data come from the demo (`vkd demo`), or from --data, --teacher
    and --student; --quick builds a small demo itself when there is none.

    \b
    Examples:
      vkd bench all --quick                        # smoke run, a few minutes on 2 cores
      vkd bench search --sizes 10k,100k --out results
      vkd bench distill --data flickr/test.jsonl --teacher big-clip --student out/student
    """


def _run_one(name: str, options: dict[str, Any]) -> None:
    Session(click.get_current_context(), options).run(name)


@bench.command("distill", short_help="Recall@K, params, latency, retention: teacher vs students.")
@common_options
def distill_command(**options: Any) -> None:
    """Teacher vs raw / CE-only / distilled / INT8 students on the held-out split:
    Recall@1/5/10 both ways, rsum, params, encode latency, retention of the teacher's R@1.

    \b
    Example:
      vkd bench distill --out results
      vkd bench distill --data flickr/test.jsonl --teacher big-clip --student out/student
    """
    _run_one("distill", options)


@bench.command("search", short_help="Exact vs ANN vs two-stage search at 10k/100k/1M vectors.")
@common_options
@search_options
def search_command(**options: Any) -> None:
    """Teacher exact vs student exact vs student ANN vs two-stage (k1 100, 1000) at 10k,
    100k and 1M vectors: Recall@10, overlap@10, latency per stage, QPS, memory, build time.

    Corpora are real encoded test vectors plus structured synthetic ones (the result says so).

    \b
    Example:
      vkd bench search --sizes 10k,100k --out results
    """
    _run_one("search", options)


@bench.command("export", short_help="torch vs ONNX fp32 vs ONNX INT8: latency, cosine, Recall@1.")
@common_options
def export_command(**options: Any) -> None:
    """torch fp32 vs ONNX fp32 vs ONNX INT8 (dynamic and static): latency at batch 1 and 32,
    cosine to torch, Recall@1 change on the held-out split.

    \b
    Example:
      vkd bench export --out results
    """
    _run_one("export", options)


@bench.command("index", short_help="Indexing images/s vs the encoder alone, memory, re-run time.")
@common_options
def index_command(**options: Any) -> None:
    """Indexing: images/s end to end vs the encoder alone, peak memory, no-op re-run time.

    \b
    Example:
      vkd bench index --images ./photos --student out/student --teacher big-clip --data test.jsonl
    """
    _run_one("index", options)


@bench.command("step", short_help="Seconds per distillation step: CE, KD cached, KD uncached.")
@common_options
@step_options
def step_command(**options: Any) -> None:
    """Seconds per distillation step: CE only, KD with the teacher cache, KD without it.

    \b
    Example:
      vkd bench step --steps 20 --out results
    """
    _run_one("step", options)


@bench.command("serve", short_help="vkd serve under load on loopback: torch vs the slim ONNX runtime.")
@common_options
@serve_options
def serve_command(**options: Any) -> None:
    """`vkd serve` under a bounded load on 127.0.0.1, torch runtime vs slim ONNX runtime:
    requests/s, p50/p95/p99 latency, errors, start-up time to ready, idle and peak RSS.

    Each runtime is a real server process on a free loopback port; --clients threads send
    --requests text searches each (the held-out captions), capped at --max-seconds. Models
    without an ONNX export are exported into OUT/.work/serve first. Not part of `all`:
    it starts servers and takes the machine's CPUs for minutes.

    \b
    Example:
      vkd bench serve --out results
      vkd bench serve --quick --out /tmp/serve-smoke
      vkd bench serve --serve-python slim/bin/python     # ONNX server from a vkd[serve]-only venv
    """
    _run_one("serve", options)


def real_options(function: Callable[..., Any]) -> Callable[..., Any]:
    options = [
        click.option("--archs", default=None,
                     help="Comma-separated archs of `vkd model random` (clip-vit-b32, clip-vit-b16, clip-vit-l14, "
                          "siglip-base-patch16-224, qwen3-vl-embedding-2b, qwen3-vl-embedding-8b).  [default: "
                          "every arch above; --quick: "
                          "clip-vit-b32]"),
        click.option("--backends", default=None,
                     help="Comma-separated of torch-fp32, torch-bf16, onnx-fp32, onnx-int8.  [default: all four, "
                          "but not torch fp32 for a model whose full fp32 weights exceed 80% of the memory (the "
                          "Qwen3-VL 8B); naming backends here times them on the copies regardless]"),
        click.option("--repeats", type=click.IntRange(min=1), default=None,
                     help="Rounds each timing is repeated in (figures are their median with min–max).  "
                          "[default: 3; --quick: 2]"),
        click.option("--corpus-size", callback=_sizes_option, default=None,
                     help="Vectors in the end-to-end search corpus, e.g. 1M.  [default: 1M; --quick: 20k]"),
        click.option("--pairings", default=None,
                     help="End-to-end pairs: clip (B/32 → L/14, 512/768-d), qwen3-vl (2B → 8B, 2048/4096-d).  "
                          "[default: clip,qwen3-vl; --quick: clip]"),
        click.option("--work-dir", type=click.Path(file_okay=False, path_type=Path), default=None,
                     help="Where the random models, exports and scratch files go (kept for the next run).  "
                          "[default: OUT/.work/real]"),
    ]
    for option in reversed(options):
        function = option(function)
    return function


@bench.command("real", short_help="Costs at real model sizes (random weights): encoding, full query, indexing.")
@click.option("--quick", is_flag=True,
              help="Functional check: small depth-truncated copies, 20k vectors, 2 rounds (a few minutes).")
@click.option("--out", "out_dir", type=click.Path(file_okay=False, path_type=Path), default=DEFAULT_OUT,
              show_default=True, help="Folder for real.json, real.md and real_costs.png.")
@click.option("--threads", type=click.IntRange(min=1), default=None,
              help="Threads for torch, FAISS and ONNX Runtime.  [default: each library's own]")
@real_options
def real_command(**options: Any) -> None:
    """Encoding, a full two-stage query and indexing at the real model sizes, side by side,
    on random weights of the real architectures (`vkd model random`): speed, memory and size.

    \b
    (a) image and query ms at batch 1 and 32 per model and backend (torch fp32/bf16, ONNX
        fp32/INT8), peak RSS, size on disk, cosine to torch fp32; big models measured as
        depth-truncated copies and extrapolated per layer (marked, with the formula);
    (b) student encode + ANN + teacher encode + rerank against teacher-only at 1M vectors
        of the real dimensions, RAM and disk, a Matryoshka-prefix stage 1, vkd vs FAISS;
    (c) `vkd index` images/s with --prefer onnx and torch against the encoder alone, and
        the teacher's share; (d) overlap@10 and Recall@10 at the real dimensions.

    Every timing is a median over --repeats rounds with its min–max; speed-ups are ratios
    within each round. The full run takes about 20 minutes on two cores.

    \b
    Example:
      vkd bench real --quick --out /tmp/real-smoke
      vkd bench real --archs clip-vit-b32,clip-vit-l14 --pairings clip --out results
    """
    options = {"demo_dir": None, "data": None, "train_data": None, "teacher": None, "student": None,
               "student_raw": None, "student_ce": None, "int8": None, "images": None, "index_dir": None, **options}
    _run_one("real", options)


@bench.command("modes", short_help="two-stage vs student-query vs student-index: quality, costs, recommendation.")
@click.option("--quick", is_flag=True,
              help="Functional check: one distillation epoch, 40 captions, tiny models for the real-shape part.")
@click.option("--out", "out_dir", type=click.Path(file_okay=False, path_type=Path), default=DEFAULT_OUT,
              show_default=True, help="Folder for modes.json and modes.md.")
@click.option("--threads", type=click.IntRange(min=1), default=None,
              help="Threads for torch, FAISS and ONNX Runtime.  [default: each library's own]")
@click.option("--demo-dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Output of `vkd demo` to take models and data from.  [default: $VKD_HOME/demo]")
@click.option("--no-demo", is_flag=True, help="Skip the demo part (real-shape costs only).")
@click.option("--real-student", default=None, help="Arch of `vkd model random` for the student.  "
                                                   "[default: clip-vit-b32; --quick: tiny-clip]")
@click.option("--real-teacher", default=None, help="Arch for the teacher.  [default: clip-vit-l14; --quick: tiny-clip]")
@click.option("--no-real", is_flag=True, help="Skip the real-shape part.")
@click.option("--no-sweep", is_flag=True,
              help="Distil with the config's mode loss settings instead of choosing them on the validation split.")
@click.option("--qps", type=click.FloatRange(min=0), default=None,
              help="Expected queries per second for the recommendation.  [default: 10]")
@click.option("--cores", type=click.FloatRange(min=0, min_open=True), default=None,
              help="CPU cores the search may use, for the recommendation.  [default: 2]")
@click.option("--work-dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Models, the distilled student and the indexes (kept for the next run).  "
                   "[default: OUT/.work/modes]")
def modes_command(**options: Any) -> None:
    """The three search modes side by side, and which to use at 10k, 1M and 100M images.

    \b
    (a) demo, trained weights: the demo's student distilled further for student-query and
        student-index (train_modes), the held-out images indexed with teacher and projected
        vectors, every test caption searched in each mode: overlap@10 and R@1 against the
        teacher alone, query ms per mode, image-tower ms per image;
    (b) real shapes, random weights: per-image and per-query costs of a ViT-B/32 student and a
        ViT-L/14 teacher, the projection, student-query's scan per row and a FAISS search;
    then `recommend_mode` at 10k, 1M and 100M images (printed, and in modes.md).

    \b
    Example:
      vkd bench modes --quick --out /tmp/modes-smoke
      vkd bench modes --out results --qps 10 --cores 2
    """
    options = {"demo_dir": None, "data": None, "train_data": None, "teacher": None, "student": None,
               "student_raw": None, "student_ce": None, "int8": None, "images": None, "index_dir": None, **options}
    _run_one("modes", options)


@bench.command("ray", short_help="vkd index --engine ray vs one process: images/s at ViT-B/32, Ray's overhead.")
@click.option("--quick", is_flag=True, help="Functional check: a tiny model, 24 images, one round (about a minute).")
@click.option("--out", "out_dir", type=click.Path(file_okay=False, path_type=Path), default=DEFAULT_OUT,
              show_default=True, help="Folder for ray.json and ray.md.")
@click.option("--arch", default=None,
              help="Student arch of `vkd model random` for the throughput figure.  [default: clip-vit-b32]")
@click.option("--images", type=click.IntRange(min=1), default=None,
              help="Images (512×384 JPEG) for the throughput figure.  [default: 256]")
@click.option("--num-workers", type=click.IntRange(min=1), default=None,
              help="Ray encoder actors.  [default: one per CPU less one]")
@click.option("--num-cpus", type=click.IntRange(min=1), default=None,
              help="CPUs of the local Ray instance.  [default: all]")
@click.option("--repeats", type=click.IntRange(min=1), default=None,
              help="Interleaved rounds of local and ray.  [default: 3; --quick: 1]")
@click.option("--work-dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Where the random model and the image folders go (kept for the next run).  "
                   "[default: OUT/.work/ray]")
def ray_command(**options: Any) -> None:
    """`vkd index --engine ray` against the single-process indexer on this machine, in
    interleaved rounds: (a) images/s of a full build with a random ViT-B/32 student at its real
    size; (b) the wall-time difference at the demo's index size (300 images, tiny model): Ray's
    scheduling and actor start-up. Needs vkd[ray]. Not part of `all`: it takes every CPU.

    \b
    Example:
      vkd bench ray --out results
      vkd bench ray --quick --out /tmp/ray-smoke
    """
    options = {"demo_dir": None, "data": None, "train_data": None, "teacher": None, "student": None,
               "student_raw": None, "student_ce": None, "int8": None, "index_dir": None, **options}
    _run_one("ray", options)


@bench.command("all", short_help="Every benchmark, then OUT/RESULTS.md.")
@common_options
@search_options
@step_options
def _all_command(**options: Any) -> None:
    """Every benchmark in turn (distill, search, export, index, step, real), then OUT/RESULTS.md.

    A benchmark that fails is reported and the others still run; the exit status is
    non-zero if any failed.

    \b
    Example:
      vkd bench all --quick --out results
    """
    session = Session(click.get_current_context(), options)
    failures: dict[str, str] = {}
    for name in BENCHMARKS:
        try:
            session.run(name)
        except click.UsageError:
            raise
        except Exception as error:  # one broken benchmark must not hide the others' figures
            failures[name] = f"{type(error).__name__}: {error}"
            click.echo(f"bench {name} FAILED: {failures[name]}", err=True)
            traceback.print_exc()
    from vkd.bench.summary import write_summary

    source = session.source
    where = {"demo": f"the output of `vkd demo` in {source.root}",
             "given": f"given on the command line (held-out pairs {source.test_pairs})"}.get(
        source.origin, f"{source.origin} in {source.root}")
    summary = write_summary(session.out, [n for n in BENCHMARKS if n not in failures], command=session.command,
                            failures=failures, source=where)
    click.echo(f"wrote {summary}")
    if failures:
        raise click.ClickException(f"{len(failures)} benchmark(s) failed: {', '.join(failures)}")
