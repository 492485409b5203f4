"""``vkd search``: two-stage search from the command line (text or image queries)."""

from __future__ import annotations

import json
import unicodedata
import warnings
from pathlib import Path

import click

from vkd.retrieval.results import STAGES


@click.command("search")
@click.argument("query", required=False)
@click.option("--image", "image", type=click.Path(exists=True, dir_okay=False), default=None,
              help="Search with an image instead of text (image -> image).")
@click.option("--index", "index_dir", type=click.Path(file_okay=False), default=None,
              help="Index directory.  [default: $VKD_INDEX, else the demo's index under $VKD_HOME "
                   "(~/.cache/vkd/demo/index)]")
@click.option("-k", "k", type=click.IntRange(min=1), default=10, show_default=True, help="Results to return.")
@click.option("--candidates", type=click.IntRange(min=1), default=1000, show_default=True,
              help="Stage 1: student ANN candidates passed to the rerank.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON (hits, scores and per-stage timings).")
@click.option("--no-rerank", is_flag=True, help="Stage 1 only: the student's ANN ranking.")
@click.option("--student", default=None, metavar="MODEL",
              help="Student model (directory or ONNX export).  [default: the one the index was built with]")
@click.option("--teacher", default=None, metavar="MODEL",
              help="Teacher for the rerank.  [default: the one whose vectors the index stores]")
@click.option("--prefer", type=click.Choice(["onnx", "torch"]), default="onnx", show_default=True,
              help="Use a model's ONNX export (MODEL/onnx) when it has one; torch otherwise.")
def search(query: str | None, image: str | None, index_dir: str | None, k: int, candidates: int, as_json: bool,
           no_rerank: bool, student: str | None, teacher: str | None, prefer: str) -> None:
    """Search an index: the student finds --candidates images by ANN, the teacher
    reranks them against its stored vectors, the best -k are printed (rank, final
    score, student score, path). In that listing a path's control characters (newline,
    tab, ...) and bytes that are not UTF-8 are escaped (\\n, \\t, \\xNN), so each hit
    stays on one line; --json gives the exact path.

    A text query must be non-empty UTF-8 of at most 2000 characters; text past the
    model's token limit (CLIP: 77 tokens) is cut by its tokenizer, as in training. An
    image query is decoded like an indexed image, with the same pixel limit.

    \b
    Examples:
      vkd search "a dog on a beach"                      # the demo's index
      vkd search "a dog on a beach" --index photos.vkd -k 20 --json
      vkd search --image query.jpg --index photos.vkd    # image -> image
      VKD_INDEX=photos.vkd vkd search "red car" --no-rerank
    """
    from vkd.indexer import IndexMismatchError, ManifestError
    from vkd.paths import default_index_dir
    from vkd.retrieval.retriever import Retriever

    if (query is None) == (image is None):
        raise click.UsageError('give a text query or --image FILE (one of them): vkd search "a dog on a beach"')
    if query is not None:
        from vkd.retrieval.retriever import QueryError, check_text_query

        try:
            check_text_query(query)
        except QueryError as error:
            raise click.UsageError(str(error)) from None
    if candidates < k:
        raise click.UsageError(f"--candidates {candidates} is smaller than -k {k}; stage 1 must find at least k")
    path = Path(index_dir) if index_dir is not None else default_index_dir()
    if index_dir is None and not (path / "manifest.json").is_file():
        raise click.ClickException(
            f"no index at {path} (the default: $VKD_INDEX, else the demo's index). Run `vkd demo` to build the "
            "demo index, or pass --index DIR (an index made by `vkd index IMAGES --model STUDENT --out DIR`)"
        )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", UserWarning)
        try:
            retriever = Retriever(path, student=student, teacher=teacher, candidates=candidates, prefer=prefer,
                                  rerank=not no_rerank)
            result = retriever.search(Path(image) if image is not None else query, k=k)
        except (IndexMismatchError, ManifestError, ValueError, OSError) as error:
            raise click.ClickException(str(error)) from error
    for warning in caught:
        if issubclass(warning.category, UserWarning):
            click.echo(f"warning: {warning.message}", err=True)

    if as_json:
        payload = {
            **result.to_dict(),
            "query": query if image is None else None,
            "image": image,
            "index": str(retriever.index.path),
            "k": k,
            "student": retriever.student.describe(),
            "teacher": retriever.teacher.describe() if result.reranked == "teacher" else None,
        }
        click.echo(json.dumps(payload, indent=2))
        return
    if not result:
        click.echo(f"no images in {retriever.index.path}")
        return
    click.echo(f"{'rank':>4}  {'score':>7}  {'student':>7}  path")
    for hit in result:
        click.echo(f"{hit.rank:>4}  {hit.score:7.4f}  {hit.student_score:7.4f}  {printable(hit.path)}")
    times = result.timings
    stages = ", ".join(f"{stage.removesuffix('_ms').replace('_', ' ')} {getattr(times, stage):.1f} ms"
                       for stage in STAGES)
    how = {"teacher": "teacher rerank", "student": "exact student rerank (no teacher vectors)", None: "no rerank"}
    click.echo(f"{len(retriever.index)} images, {result.candidates} candidates, {how[result.reranked]}; "
               f"{stages}; total {times.total_ms:.1f} ms", err=True)


_ESCAPES = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def printable(path: str) -> str:
    """``path`` for one line of a terminal: control and line-separator characters and
    surrogate-escaped bytes (a name that is not UTF-8) spelled with backslashes.

    A name could otherwise forge output lines or send terminal escape sequences, and a
    surrogate cannot be written to a UTF-8 stdout at all.
    """
    out = []
    for char in path:
        code = ord(char)
        if char in _ESCAPES:
            out.append(_ESCAPES[char])
        elif 0xDC80 <= code <= 0xDCFF:  # os.fsdecode's stand-in for the byte code - 0xDC00
            out.append(f"\\x{code - 0xDC00:02x}")
        elif 0xD800 <= code <= 0xDFFF or unicodedata.category(char) in ("Cc", "Zl", "Zp"):
            out.append(f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}")
        else:
            out.append(char)
    return "".join(out)
