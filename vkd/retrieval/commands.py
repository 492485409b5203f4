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
@click.option("--server", default=None, metavar="URL",
              help="Send the search to a running `vkd serve` at URL instead of loading the index and models "
                   "here (the server's index and models are used).")
@click.option("--api-key", envvar="VKD_API_KEY", default=None, metavar="KEY",
              help="The server's API key, with --server.  [env: VKD_API_KEY]")
@click.option("--timeout", type=click.FloatRange(min=0, min_open=True), default=60.0, show_default=True,
              help="Seconds to wait for the server's answer, with --server.")
def search(query: str | None, image: str | None, index_dir: str | None, k: int, candidates: int, as_json: bool,
           no_rerank: bool, student: str | None, teacher: str | None, prefer: str, server: str | None,
           api_key: str | None, timeout: float) -> None:
    """Search an index: the student finds --candidates images by ANN, the teacher
    reranks them against its stored vectors, the best -k are printed (rank, final
    score, student score, path). In that listing a path's control characters (newline,
    tab, ...) and bytes that are not UTF-8 are escaped (\\n, \\t, \\xNN), so each hit
    stays on one line; --json gives the exact path.

    A text query must be non-empty UTF-8 of at most 2000 characters; text past the
    model's token limit (CLIP: 77 tokens) is cut by its tokenizer, as in training. An
    image query is decoded like an indexed image, with the same pixel limit.

    The models are opened with the options the index recorded for them: a Qwen3-VL model
    encodes a text query with the index's query instruction, and an image query like the
    indexed images, with its document instruction (so an indexed image finds itself first).

    \b
    Examples:
      vkd search "a dog on a beach"                      # the demo's index
      vkd search "a dog on a beach" --index photos.vkd -k 20 --json
      vkd search --image query.jpg --index photos.vkd    # image -> image
      VKD_INDEX=photos.vkd vkd search "red car" --no-rerank
      vkd search "a dog on a beach" --server http://127.0.0.1:8000   # a running `vkd serve`
      vkd search --image query.jpg --server https://search.example.org --api-key KEY
    """
    if server is not None:
        _search_server(server, query=query, image=image, k=k, candidates=candidates, no_rerank=no_rerank,
                       as_json=as_json, api_key=api_key, timeout=timeout)
        return
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


def _search_server(server: str, *, query: str | None, image: str | None, k: int, candidates: int, no_rerank: bool,
                   as_json: bool, api_key: str | None, timeout: float) -> None:
    """``vkd search --server``: the same search and output, answered by a running server.

    Only the standard library is imported on this path (``vkd.serve.client``), so it costs
    a fraction of a second where loading the index and models here would cost seconds.
    """
    from click.core import ParameterSource

    from vkd.serve.client import ServerError
    from vkd.serve.client import search as remote_search

    ctx = click.get_current_context()
    local_only = [f"--{name.replace('_', '-')}" for name in ("index_dir", "student", "teacher", "prefer")
                  if ctx.get_parameter_source(name) in (ParameterSource.COMMANDLINE, ParameterSource.ENVIRONMENT)]
    if local_only:
        flags = ", ".join(flag.replace("--index-dir", "--index") for flag in local_only)
        raise click.UsageError(f"{flags}: with --server the server's own index and models are searched; drop "
                               f"{'it' if len(local_only) == 1 else 'them'}, or drop --server to search here")
    if (query is None) == (image is None):
        raise click.UsageError('give a text query or --image FILE (one of them): vkd search "a dog on a beach"')
    given = ctx.get_parameter_source("candidates") == ParameterSource.COMMANDLINE
    if given and candidates < k:
        raise click.UsageError(f"--candidates {candidates} is smaller than -k {k}; stage 1 must find at least k")
    try:
        answer = remote_search(server, query=query, image=image, k=k, candidates=candidates if given else None,
                               rerank=False if no_rerank else None, api_key=api_key, timeout=timeout)
    except ValueError as error:
        raise click.UsageError(str(error)) from None
    except ServerError as error:
        if error.status == 401:
            raise click.ClickException(f"{server}: {error.detail} (vkd search: --api-key KEY or VKD_API_KEY)") from None
        if 400 <= error.status < 500:
            raise click.UsageError(f"{server}: {error.detail}") from None
        raise click.ClickException(f"{server}: {error.detail}" if error.status else error.detail) from None
    except OSError as error:  # the --image file could not be read
        raise click.ClickException(f"{image}: {error.strerror or error}") from None
    hits = answer.get("results", [])
    if as_json:
        payload = {key: answer.get(key) for key in ("query", "reranked", "candidates", "timings")}
        payload.update(hits=hits, image=image, server=server, k=answer.get("k", k))
        click.echo(json.dumps(payload, indent=2))
        return
    if not hits:
        click.echo(f"no images in the index of {server}")
        return

    def score(value: float | None) -> str:
        return f"{value:7.4f}" if isinstance(value, int | float) else f"{'-':>7}"

    click.echo(f"{'rank':>4}  {'score':>7}  {'student':>7}  path")
    for hit in hits:
        click.echo(f"{hit['rank']:>4}  {score(hit.get('score'))}  {score(hit.get('student_score'))}  "
                   f"{printable(str(hit['path']))}")
    times = answer.get("timings", {})
    stages = ", ".join(f"{stage.removesuffix('_ms').replace('_', ' ')} {float(times.get(stage, 0.0)):.1f} ms"
                       for stage in STAGES)
    how = {"teacher": "teacher rerank", "student": "exact student rerank (no teacher vectors)", None: "no rerank"}
    click.echo(f"{server}: {answer.get('candidates')} candidates, {how.get(answer.get('reranked'), 'rerank')}; "
               f"{stages}; total {float(times.get('total_ms', 0.0)):.1f} ms", err=True)


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
