"""``vkd index``: build an index from an image folder, and inspect, check or compact one.

``vkd index IMAGES_DIR ...`` builds; ``vkd index info|verify|compact INDEX_DIR`` are
subcommands. The group treats its first argument as a subcommand when it names one and as
IMAGES_DIR otherwise (a folder literally called ``info`` is reached as ``./info``).
torch, transformers and faiss load only inside the commands.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import click

from vkd.indexer.faiss_index import INDEX_TYPES

BUILD = "build"
DEFAULT_MAX_PIXELS = 89_478_485  # = vkd.indexer.decode.DEFAULT_MAX_PIXELS (PIL's), without importing PIL


def _memory_budget(ctx: click.Context, param: click.Parameter, value: str | None) -> int | None:
    from vkd.indexer.build import parse_bytes

    try:
        return parse_bytes(value)
    except ValueError as error:
        raise click.BadParameter(str(error)) from None


def _library_errors() -> tuple[type[BaseException], ...]:
    from vkd.indexer.fsutil import IndexLockedError

    # the library's messages name the file or value at fault and the fix: show them as they are;
    # OSError covers disk full, read-only file systems and permissions (one line, never a traceback)
    return (ValueError, OSError, IndexLockedError)


def _failure(error: BaseException) -> click.ClickException:
    from vkd.indexer.fsutil import describe_os_error

    if isinstance(error, OSError) and error.errno is not None:
        return click.ClickException(describe_os_error(error))
    return click.ClickException(str(error))


class _DefaultCommand(click.Command):
    """The build command, shown as ``vkd index IMAGES_DIR`` rather than ``vkd index build``."""

    def format_usage(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        parent = ctx.parent.command_path if ctx.parent else ctx.command_path
        formatter.write_usage(parent, " ".join(self.collect_usage_pieces(ctx)))


class IndexGroup(click.Group):
    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        if args and args[0] not in self.commands and args[0] not in ctx.help_option_names:
            args = [BUILD, *args]
        return super().parse_args(ctx, args)

    def format_usage(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        formatter.write_usage(ctx.command_path, "IMAGES_DIR --model STUDENT [OPTIONS]")
        formatter.write_usage(ctx.command_path, "info|verify|compact INDEX_DIR [OPTIONS]", prefix="       ")

    def format_options(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        build_command = self.commands[BUILD]
        build_ctx = click.Context(build_command, info_name=ctx.info_name, parent=ctx.parent)
        rows = [record for param in build_command.get_params(build_ctx)
                if isinstance(param, click.Option) and (record := param.get_help_record(build_ctx)) is not None]
        with formatter.section("Build options (vkd index IMAGES_DIR ...)"):
            formatter.write_dl(rows)
        self.format_commands(ctx, formatter)


@click.group(cls=IndexGroup, no_args_is_help=True)
def index() -> None:
    """Encode an image folder into Arrow shards + FAISS indexes, incrementally.

    Running it again adds new images, re-encodes changed ones and retires deleted ones;
    a killed run resumes where it stopped. Moved, renamed and copied files keep their
    stored vectors (matched by content hash: no re-encoding). Images that cannot be decoded
    are skipped and listed in INDEX_DIR/skipped.jsonl. Formats: JPEG, PNG, WebP, GIF, TIFF,
    BMP, AVIF, camera RAW (the embedded JPEG preview) and, with vkd[formats], HEIC/HEIF.

    \b
    Examples:
      vkd index ./photos --model out/student --teacher out/teacher   # -> ./photos.vkd
      vkd index ./photos --model out/student --out idx --shard-size 20000 --memory-budget 4GB
      vkd index info ./photos.vkd --json
      vkd index verify ./photos.vkd
      vkd index compact ./photos.vkd
    """


@index.command(BUILD, cls=_DefaultCommand, hidden=True)
@click.argument("images_dir", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--model", "-m", "student", required=True,
              help="Student model (directory or hub id): its vectors drive the ANN search.")
@click.option("--teacher", "-t", default=None,
              help="Teacher model: its vectors are stored (float16) for the rerank stage.")
@click.option("--out", "-o", "out_dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Index directory.  [default: IMAGES_DIR.vkd, next to IMAGES_DIR]")
@click.option("--batch-size", type=click.IntRange(min=1), default=32, show_default=True,
              help="Images per encoder call.")
@click.option("--workers", type=click.IntRange(min=1), default=None,
              help="Decoding threads.  [default: min(8, CPUs)]")
@click.option("--shard-size", type=click.IntRange(min=1), default=50_000, show_default=True,
              help="Rows per shard; each shard is committed as soon as it is written.")
@click.option("--index-type", type=click.Choice(INDEX_TYPES), default="auto", show_default=True,
              help="FAISS index per shard; auto: flat, HNSW or IVF-PQ by shard size and budget.")
@click.option("--memory-budget", callback=_memory_budget, default=None,
              help="RAM for all FAISS indexes together, e.g. 4GB or 512MiB.  [default: unbounded]")
@click.option("--max-pixels", type=click.IntRange(min=1), default=DEFAULT_MAX_PIXELS, show_default=True,
              help="Images with more pixels are skipped (decompression-bomb guard).")
@click.option("--follow-links", is_flag=True,
              help="Also index what symlinks leading outside IMAGES_DIR point to; without it they are "
                   "skipped and listed. Links inside IMAGES_DIR are always followed.")
@click.option("--device", default=None, help="torch device for the encoders.  [default: cuda if available]")
@click.option("--prefer", type=click.Choice(["onnx", "torch"]), default=None,
              help="Run each model from its ONNX export (MODEL/onnx, made by `vkd export`, with an image tower) or "
                   "as torch; either stores the same model's vectors (same fingerprint).  [default: onnx on a CPU "
                   "when the model has an export, torch on CUDA]")
@click.option("--query-instruction", default=None, metavar="TEXT",
              help="Qwen3-VL: instruction of the text queries `vkd search` will encode (recorded in the "
                   "index).  [default: the model's own]")
@click.option("--document-instruction", default=None, metavar="TEXT",
              help="Qwen3-VL: instruction the images are encoded with.  [default: the model's own]")
@click.option("--rebuild", is_flag=True, help="Discard the existing index at --out and start over.")
@click.option("--projected/--no-projected", default=None,
              help="Also store the student's image vectors projected into its teacher's space, for "
                   "`vkd search --mode student-index` (no teacher needed here; the student must be distilled with "
                   "train_modes: [student-index]).  [default: as the existing index; off for a new one]")
@click.option("--teacher-ann/--no-teacher-ann", default=None,
              help="Also build, per shard, a FAISS index over the stored teacher vectors, for `vkd search --mode "
                   "student-query` (on an existing index: built from its stored teacher vectors, nothing is encoded "
                   "again).  [default: as the existing index; on for a new one with --teacher]")
@click.option("--teacher-ann-dim", type=click.IntRange(min=1), default=None, metavar="N",
              help="The teacher ANN holds the first N dimensions of each teacher vector (normalised again); the "
                   "candidates are re-scored on the full vectors.  [default: 256 for a Matryoshka teacher "
                   "(Qwen3-VL-Embedding), else the whole vector]")
@click.option("--engine", type=click.Choice(["local", "ray"]), default="local", show_default=True,
              help="local: this process (decode threads, one encoder). ray: Ray Data decode tasks, a pool of "
                   "encoder actors and shard-writing tasks, on this machine or --ray-address; needs vkd[ray]. "
                   "Same plan, same shard files, one manifest committed by this process.")
@click.option("--ray-address", default=None, metavar="ADDR",
              help="--engine ray: a running Ray cluster (ray://HOST:10001, auto); images and --out must be at the "
                   "same paths on every node.  [default: start Ray on this machine]")
@click.option("--num-workers", type=click.IntRange(min=1), default=None,
              help="--engine ray: encoder actors, each loading the models once.  [default: one per GPU with "
                   "--gpus-per-worker, else one per CPU less one]")
@click.option("--gpus-per-worker", type=click.FloatRange(min=0), default=0.0, show_default=True,
              help="--engine ray: GPUs per encoder actor (0.5: two actors share a GPU).")
@click.option("--progress/--no-progress", default=True, show_default=True, help="Show a progress bar.")
@click.option("--json", "as_json", is_flag=True, help="Print the run summary as JSON.")
def build_command(images_dir: Path, student: str, teacher: str | None, out_dir: Path | None, batch_size: int,
                  workers: int | None, shard_size: int, index_type: str, memory_budget: int | None,
                  max_pixels: int, follow_links: bool, device: str | None, rebuild: bool, progress: bool,
                  as_json: bool, query_instruction: str | None = None,
                  document_instruction: str | None = None, prefer: str | None = None, engine: str = "local",
                  ray_address: str | None = None, num_workers: int | None = None,
                  gpus_per_worker: float = 0.0, projected: bool | None = None, teacher_ann: bool | None = None,
                  teacher_ann_dim: int | None = None) -> None:
    """Index IMAGES_DIR (recursively) with the student, and the teacher if given.

    Images are documents: a Qwen3-VL model encodes them with its document instruction; the
    index records both instructions, and `vkd search` encodes text queries with the query
    one. The instruction options apply to the student and the teacher (CLIP and SigLIP
    take none and ignore them).

    Incremental: a second run encodes only new and changed files. A moved, renamed or copied
    file is recognised by its content hash and keeps its stored vectors (reported as
    "reused"). Reads JPEG, PNG, WebP, GIF, TIFF, BMP, AVIF, camera RAW (CR2, NEF, ARW, DNG,
    RAF ...: the embedded JPEG preview) and, with `pip install "vkd[formats]"`, HEIC/HEIF.

    \b
    Examples:
      vkd index ./photos --model out/student --teacher out/teacher --out photos.vkd
      vkd index ./photos --model out/student --out photos.vkd --json   # after moving folders: "reused"
    """
    from vkd.distill.rundir import resolve_model_option
    from vkd.indexer.build import build_index
    from vkd.indexer.index import Index

    instructions = {"query_instruction": query_instruction, "document_instruction": document_instruction}
    try:
        student = resolve_model_option(student, "using {model} as the student")
        teacher = resolve_model_option(teacher, "using {model} as the teacher") if teacher is not None else None
        common = {"student": student, "teacher": teacher, "batch_size": batch_size, "shard_size": shard_size,
                  "index_type": index_type, "memory_budget": memory_budget, "rebuild": rebuild,
                  "show_progress": progress, "max_pixels": max_pixels, "device": device,
                  "follow_links": follow_links, "student_options": instructions,
                  "teacher_options": instructions, "prefer": prefer}
        if engine == "ray" and projected:
            raise click.UsageError("--projected is not supported with --engine ray yet; index with --engine local")
        if engine == "ray":
            from vkd.indexer.ray_engine import build_index_ray  # imports ray only when asked for

            # the Ray writers build each shard's teacher ANN index with the local writer's functions
            result = build_index_ray(images_dir, out_dir, ray_address=ray_address, num_workers=num_workers,
                                     gpus_per_worker=gpus_per_worker, teacher_ann=teacher_ann,
                                     teacher_ann_dim=teacher_ann_dim, **common)
        else:
            if ray_address is not None or num_workers is not None or gpus_per_worker:
                raise click.UsageError("--ray-address, --num-workers and --gpus-per-worker apply to --engine ray; "
                                       "add --engine ray, or leave them out to index in this process")
            result = build_index(images_dir, out_dir, workers=workers, projected=projected, teacher_ann=teacher_ann,
                                 teacher_ann_dim=teacher_ann_dim, **common)
        opened = Index.open(result.index_dir)
    except ImportError as error:  # --engine ray without Ray installed: the message says what to install
        raise click.ClickException(str(error)) from None
    except _library_errors() as error:
        raise _failure(error) from None
    if as_json:
        click.echo(json.dumps({**result.to_dict(), "live_rows": len(opened), "shards": len(opened.shards)},
                              indent=2))
        return
    click.echo(f"indexed {result.added} images in {result.seconds:.1f} s ({result.images_per_s:.1f} img/s); "
               f"{result.reused} reused (moved, renamed or copied files: vectors copied, not encoded), "
               f"{result.unchanged} unchanged, {result.retired} retired, {result.skipped} skipped"
               + (f" (listed in {result.index_dir / 'skipped.jsonl'})" if result.skipped else ""))
    if result.upgraded:
        click.echo(f"added {', '.join(_vector_names(opened))} to {len(result.upgraded)} committed shard(s) from "
                   "their stored vectors (no image encoded again)")
    if result.repaired:
        click.echo(f"repaired {len(result.repaired)} damaged shard(s) ({', '.join(result.repaired)}): FAISS files "
                   "rebuilt from their Arrow shards, or shards with a damaged Arrow file re-encoded")
    click.echo(f"index {result.index_dir}: {len(opened)} images in {len(opened.shards)} shards; "
               f"{_models(opened.student, opened.teacher)}")
    if result.added - result.reused > 0:
        click.echo(f"encoded with: student {result.student_backend}"
                   + (f", teacher {result.teacher_backend}" if result.teacher_backend else ""))


def _vector_names(index: Any) -> list[str]:
    names = ["projected vectors"] if "projected_vec" in index.vectors else []
    if (index.vectors.get("teacher_vec") or {}).get("ann"):
        names.append("the teacher ANN index")
    return names


def _models(student: dict[str, Any], teacher: dict[str, Any] | None) -> str:
    text = f"student {student['name']} (dim {student['dim']}, {student['fingerprint']})"
    if teacher:
        text += f", teacher {teacher['name']} (dim {teacher['dim']}, {teacher['fingerprint']})"
    return text


def _human(size: int) -> str:
    value = float(size)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} TiB"


INDEX_DIR = click.argument("index_dir", type=click.Path(exists=True, file_okay=False, path_type=Path))


@index.command("info")
@INDEX_DIR
@click.option("--json", "as_json", is_flag=True, help="Print as JSON.")
def info_command(index_dir: Path, as_json: bool) -> None:
    """Rows, live rows, shards, models, bytes on disk and skipped files of an index.

    \b
    Example:
      vkd index info ./photos.vkd --json
    """
    from vkd.indexer.index import Index

    try:
        info = Index.open(index_dir).info()
    except _library_errors() as error:
        raise _failure(error) from None
    if as_json:
        click.echo(json.dumps(info, indent=2))
        return
    kinds = ", ".join(f"{n} {kind}" for kind, n in sorted(info["index_types"].items())) or "none"
    click.echo(f"index        {info['path']}")
    click.echo(f"images       {info['images_root']}")
    click.echo(f"rows         {info['live_rows']} live of {info['rows']} ({info['retired_rows']} retired)")
    click.echo(f"shards       {info['shards']} ({kinds})")
    click.echo(f"student      {_models(info['student'], None)[len('student '):]}")
    teacher = info["teacher"]
    click.echo("teacher      " + (_models(teacher, None)[len("student "):] if teacher else "none"))
    click.echo(f"search modes {', '.join(info['search_modes'])}"
               + ("" if "student-index" in info["search_modes"] else
                  " (student-index: index with --projected a student distilled with train_modes)"))
    teacher_vec = info["vectors"].get("teacher_vec") or {}
    if teacher_vec:
        ann = teacher_vec.get("ann")
        click.echo("teacher ANN  " + (f"first {ann['dim']} of {teacher_vec['dim']} dimensions" if ann else
                                      "none (student-query needs `vkd search --scan`, or add it: vkd index ... "
                                      "--teacher-ann)"))
    click.echo(f"on disk      {_human(info['bytes_on_disk'])}")
    click.echo(f"skipped      {info['skipped']}" + (" (see skipped.jsonl)" if info["skipped"] else ""))
    click.echo(f"updated      {info['updated']}")
    if info["unfinished_run"]:
        run = info["unfinished_run"]
        click.echo(f"unfinished   a run started {run.get('started')} did not finish: run `vkd index` again")
    for name, damage in info["damaged_shards"].items():
        click.echo(f"damaged      {name}: FAISS file {damage}: run `vkd index verify --repair {info['path']}`")


@index.command("verify")
@INDEX_DIR
@click.option("--repair", is_flag=True,
              help="Rebuild damaged or missing FAISS files from the Arrow shards; drop shards whose Arrow "
                   "file is damaged (the next `vkd index` run re-encodes their images).")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
def verify_command(index_dir: Path, repair: bool, as_json: bool) -> None:
    """Check checksums, row counts, FAISS sizes and vector dimensions; exit 1 on any problem.

    An index left by an indexing run that did not finish (killed, failed) is sound but
    incomplete: verify says so and exits 0; run `vkd index` on the images folder to finish it.

    \b
    Examples:
      vkd index verify ./photos.vkd
      vkd index verify ./photos.vkd --repair
    """
    from vkd.indexer.manifest import ManifestError, read_manifest
    from vkd.indexer.verify import repair_index, verify_index

    repaired = None
    if repair:
        try:
            repaired = repair_index(index_dir)
        except _library_errors() as error:
            raise _failure(error) from None
    problems = verify_index(index_dir)
    try:
        unfinished = read_manifest(index_dir).get("unfinished_run")
    except ManifestError:
        unfinished = None
    if as_json:
        click.echo(json.dumps({"ok": not problems, "problems": problems, "complete": unfinished is None,
                               "unfinished_run": unfinished,
                               "repaired": repaired.__dict__ if repaired is not None else None}, indent=2))
    else:
        if repaired is not None:
            click.echo(f"{index_dir}: rebuilt FAISS for {len(repaired.rebuilt_faiss)} shard(s)"
                       + (f" ({', '.join(repaired.rebuilt_faiss)})" if repaired.rebuilt_faiss else "")
                       + f"; dropped {len(repaired.dropped_shards)} shard(s) with a damaged Arrow file"
                       + (f" ({', '.join(repaired.dropped_shards)}: run `vkd index` on the images folder to "
                          "re-encode their images)" if repaired.dropped_shards else ""))
        for problem in problems:
            click.echo(problem, err=True)
    if problems:
        hint = "" if repair else f"run `vkd index verify --repair {index_dir}`, or "
        raise click.ClickException(
            f"{index_dir}: {len(problems)} problem(s); {hint}re-create the index with "
            "`vkd index IMAGES_DIR --model STUDENT --out INDEX_DIR --rebuild`")
    if as_json:
        return
    if unfinished is not None:
        what = "a rebuild" if unfinished.get("rebuild") else "an indexing run"
        state = ("the index is the one before the rebuild" if unfinished.get("rebuild")
                 else "the index holds only part of the images")
        click.echo(f"{index_dir}: ok, but incomplete: {what} started {unfinished.get('started')} (pid "
                   f"{unfinished.get('pid')}, {unfinished.get('to_encode')} images to encode) did not finish; "
                   f"{state}. Run `vkd index` on the images folder again to finish it.")
    else:
        click.echo(f"{index_dir}: ok")


@index.command("compact")
@INDEX_DIR
@click.option("--reindex", is_flag=True, help="Rewrite every shard and rebuild its FAISS index from the Arrow vectors.")
@click.option("--index-type", type=click.Choice(INDEX_TYPES), default=None,
              help="With --reindex: the FAISS index kind.  [default: as built]")
@click.option("--memory-budget", callback=_memory_budget, default=None,
              help="With --reindex: RAM for all FAISS indexes, e.g. 4GB.  [default: as built]")
def compact_command(index_dir: Path, reindex: bool, index_type: str | None, memory_budget: int | None) -> None:
    """Rewrite shards without their retired rows (deleted or changed images), atomically.

    \b
    Example:
      vkd index compact ./photos.vkd
      vkd index compact ./photos.vkd --reindex --index-type hnsw
    """
    from vkd.indexer.build import compact_index

    try:
        result = compact_index(index_dir, reindex=reindex, index_type=index_type, memory_budget=memory_budget)
    except _library_errors() as error:
        raise _failure(error) from None
    click.echo(f"{result.index_dir}: dropped {result.rows_dropped} retired rows; rewrote "
               f"{len(result.rewritten)} shards; {result.shards_before} -> {result.shards_after} shards")


@click.command("dupes")
@click.option("--index", "index_dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Index directory.  [default: $VKD_INDEX, else the demo's index under $VKD_HOME]")
@click.option("--threshold", type=click.FloatRange(-1.0, 1.0), default=0.95, show_default=True,
              help="Cosine similarity (teacher vectors when the index stores them, else student) from which "
                   "two images are near copies. Lower finds more (and looser) copies.")
@click.option("-k", "k", type=click.IntRange(min=1), default=10, show_default=True,
              help="Nearest neighbours (student ANN) checked for each image.")
@click.option("--json", "as_json", is_flag=True, help="Print the groups as JSON.")
@click.option("--html", "html_file", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Write a self-contained web page (thumbnails embedded) to this file.")
def dupes_command(index_dir: Path | None, threshold: float, k: int, as_json: bool, html_file: Path | None) -> None:
    """Find duplicate images in an index: exact copies (same bytes) and near copies
    (resized, re-compressed) whose vectors are closer than --threshold.

    Prints one group per paragraph: the paths of its images, groups separated by a blank
    line (a summary goes to stderr). No image is re-encoded: the index's vectors are used.

    \b
    Examples:
      vkd dupes --index photos.vkd
      vkd dupes --index photos.vkd --threshold 0.9 --html dupes.html
      vkd dupes --index photos.vkd --json | jq '.groups[] | select(.kind == "exact") | .members[1:][].path'
    """
    from vkd.indexer.dupes import find_duplicates, write_duplicates_html
    from vkd.indexer.index import Index
    from vkd.paths import default_index_dir

    if as_json and html_file is not None:
        raise click.UsageError("choose one of --json and --html")
    path = index_dir if index_dir is not None else default_index_dir()
    if not (path / "manifest.json").is_file():
        raise click.ClickException(f"no index at {path}: pass --index DIR (an index made by `vkd index IMAGES "
                                   "--model STUDENT --out DIR`), or set $VKD_INDEX")
    try:
        index = Index.open(path)
        groups = find_duplicates(index, threshold=threshold, k=k)
    except _library_errors() as error:
        raise _failure(error) from None
    exact = sum(group.kind == "exact" for group in groups)
    summary = (f"{len(groups)} group(s) of duplicates among {len(index)} images: {exact} of exact copies, "
               f"{len(groups) - exact} of near copies (threshold {threshold:g})")
    if as_json:
        click.echo(json.dumps({"index": str(index.path), "threshold": threshold, "k": k,
                               "groups": [group.to_json() for group in groups]}, indent=2))
        return
    if html_file is not None:
        try:
            written = write_duplicates_html(groups, html_file)
        except OSError as error:
            raise _failure(error) from None
        click.echo(f"{summary}; wrote {written}")
        return
    click.echo(summary, err=True)
    click.echo("\n\n".join("\n".join(group.paths) for group in groups))
