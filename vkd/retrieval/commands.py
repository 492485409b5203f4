"""``vkd search``: two-stage search from the command line (text or image queries)."""

from __future__ import annotations

import json
import os
import unicodedata
import warnings
from pathlib import Path
from typing import Any

import click

from vkd.retrieval.results import STAGES

_NEW_FLAGS = ("and_terms", "not_terms", "image_and", "image_not", "raw", "path_glob", "path_prefix",
              "modified_after", "modified_before", "taken_after", "taken_before", "min_width", "max_width",
              "min_height", "max_height", "orientation", "min_score", "paths", "print0", "html")


@click.command("search")
@click.argument("query", required=False)
@click.option("--image", "image", type=click.Path(exists=True, dir_okay=False), default=None,
              help="Search with an image (image -> image); with a text QUERY too, the two are one combined "
                   "query.")
@click.option("--and", "and_terms", multiple=True, metavar="TEXT",
              help="Another text term to add (repeatable; 'W:TEXT' gives it weight W).")
@click.option("--not", "not_terms", multiple=True, metavar="TEXT",
              help="A text term to push down (repeatable; 'W:TEXT' for weight -W).")
@click.option("--image-and", multiple=True, type=click.Path(exists=True, dir_okay=False), metavar="FILE",
              help="An image term to add (repeatable).")
@click.option("--image-not", multiple=True, type=click.Path(exists=True, dir_okay=False), metavar="FILE",
              help="An image term to push down (repeatable).")
@click.option("--raw", is_flag=True, help="Take QUERY (and --and/--not texts) literally: no ' + ', ' - ' or "
                                          "'W:' parsing.")
@click.option("--path-glob", default=None, metavar="GLOB",
              help="Only paths (relative to the images folder) matching GLOB, e.g. 'trips/*.jpg'; '*' crosses '/'.")
@click.option("--path-prefix", default=None, metavar="PREFIX",
              help="Only paths (relative to the images folder) starting with PREFIX, e.g. 'trips/2024/'.")
@click.option("--modified-after", default=None, metavar="DATE", help="Only files modified at or after DATE "
                                                                       "(ISO: 2024-05-01 or 2024-05-01T12:30; UTC).")
@click.option("--modified-before", default=None, metavar="DATE", help="Only files modified at or before DATE.")
@click.option("--taken-after", default=None, metavar="DATE",
              help="Only photos whose EXIF capture date is at or after DATE (photos without one are left out).")
@click.option("--taken-before", default=None, metavar="DATE", help="Only photos taken at or before DATE.")
@click.option("--min-width", type=click.IntRange(min=0), default=None, help="Only images at least this wide (px).")
@click.option("--max-width", type=click.IntRange(min=0), default=None, help="Only images at most this wide (px).")
@click.option("--min-height", type=click.IntRange(min=0), default=None, help="Only images at least this high.")
@click.option("--max-height", type=click.IntRange(min=0), default=None, help="Only images at most this high.")
@click.option("--orientation", type=click.Choice(["landscape", "portrait", "square"]), default=None,
              help="Only images of this orientation (after EXIF rotation).")
@click.option("--min-score", type=float, default=None, metavar="SCORE",
              help="Drop hits scoring below SCORE (the teacher's cosine; the student's with --no-rerank).")
@click.option("--index", "index_dir", type=click.Path(file_okay=False), default=None,
              help="Index directory.  [default: $VKD_INDEX, else the demo's index under $VKD_HOME "
                   "(~/.cache/vkd/demo/index)]")
@click.option("-k", "k", type=click.IntRange(min=1), default=10, show_default=True, help="Results to return.")
@click.option("--candidates", type=click.IntRange(min=1), default=1000, show_default=True,
              help="Stage 1: student ANN candidates passed to the rerank.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON (hits, scores and per-stage timings).")
@click.option("--paths", is_flag=True, help="Print only the hits' absolute paths, one a line (for pipes).")
@click.option("--print0", is_flag=True, help="With --paths: end each path with NUL instead of a newline "
                                             "(for xargs -0; safe for any file name).")
@click.option("--html", "html_file", type=click.Path(dir_okay=False, writable=True), default=None, metavar="FILE",
              help="Also write a self-contained gallery page (embedded thumbnails, scores) to FILE.")
@click.option("--no-rerank", is_flag=True, help="Stage 1 only: the student's ANN ranking.")
@click.option("--mode", type=click.Choice(["two-stage", "student-query", "student-index"]), default="two-stage",
              show_default=True,
              help="two-stage: student ANN, teacher rerank. student-query: the projected student encodes the query "
                   "against the stored teacher vectors (no teacher at query time). student-index: the teacher "
                   "encodes the query against the stored projected student vectors (index built with --projected).")
@click.option("--scan", is_flag=True,
              help="--mode student-query: rank every stored teacher vector (exact, linear in the index's size) "
                   "instead of the teacher ANN index; serves indexes built before it existed.")
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
def search(query: str | None, image: str | None, and_terms: tuple[str, ...], not_terms: tuple[str, ...],
           image_and: tuple[str, ...], image_not: tuple[str, ...], raw: bool, path_glob: str | None,
           path_prefix: str | None, modified_after: str | None, modified_before: str | None,
           taken_after: str | None, taken_before: str | None, min_width: int | None, max_width: int | None,
           min_height: int | None, max_height: int | None, orientation: str | None, min_score: float | None,
           index_dir: str | None, k: int, candidates: int, as_json: bool, paths: bool, print0: bool,
           html_file: str | None, no_rerank: bool, mode: str, scan: bool, student: str | None, teacher: str | None, prefer: str,
           server: str | None, api_key: str | None, timeout: float) -> None:
    """Search an index: the student finds --candidates images by ANN, the teacher
    reranks them against its stored vectors, the best -k are printed (rank, final
    score, student score, path). In that listing a path's control characters (newline,
    tab, ...) and bytes that are not UTF-8 are escaped (\\n, \\t, \\xNN), so each hit
    stays on one line; --json gives the exact path.

    Combined queries: QUERY may join terms with ' + ' and ' - ' (spaces on both sides,
    so 't-shirt' stays one word), each with an optional 'W:' weight: "2:cat + dog - grass"
    is cat twice, plus dog, minus grass. --and/--not/--image-and/--image-not add terms.
    Both stages rank by the weighted sum of the terms' normalised vectors. --raw takes
    the text literally (to search for "a + b" itself).

    Filters (--path-glob, --path-prefix, --modified-*, --taken-*, --min/max-width/height,
    --orientation) pick the rows before ranking, so the search stays exact over them; a
    filter that matches nothing gives no hits.

    --paths prints the absolute paths only (nothing else on stdout). A name containing a
    newline is printed as it is, so it would span two lines: use --paths --print0 (and
    xargs -0) where such names can occur.

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
      vkd search "2:cat + dog - grass" --index photos.vkd    # cat x2, + dog, - grass
      vkd search "a t-shirt + 1+1 shirt"                 # '-'/'+' without spaces are literal
      vkd search "a dog" --and "on the snow" --not "a cat" --image-not other.jpg
      vkd search "sunset" --path-prefix trips/2024/ --taken-after 2024-06-01 --orientation landscape
      vkd search "red car" --min-score 0.25 --paths | xargs -d '\\n' cp -t picked/
      vkd search "red car" --paths --print0 | xargs -0 ls -l
      vkd search "a boat" -k 50 --html boats.html        # a gallery page that opens offline
      VKD_INDEX=photos.vkd vkd search "red car" --no-rerank
      vkd search "a dog on a beach" --server http://127.0.0.1:8000   # a running `vkd serve`
      vkd search --image query.jpg --server https://search.example.org --api-key KEY
    """
    # only the standard library and the query model so far: a --server search loads no index code
    from vkd.retrieval.query import (
        Filters,
        Query,
        QueryError,
        Term,
        check_path_glob,
        check_text_query,
        parse_compact,
    )

    if query is None and image is None:
        raise click.UsageError('give a text query or --image FILE: vkd search "a dog on a beach"')
    if print0 and not paths:
        raise click.UsageError("--print0 changes how --paths ends each path: add --paths")
    if paths and as_json:
        raise click.UsageError("--paths and --json each decide the whole output: choose one")
    try:
        terms: list[Term] = []
        if query is not None:
            terms += parse_compact(query, raw=raw)
        if image is not None:
            terms.append(Term(Path(image), 1.0))
        for text in and_terms:
            terms.append(Term(text, 1.0) if raw else _single(text, +1))
        for text in not_terms:
            terms.append(Term(text, -1.0) if raw else _single(text, -1))
        terms += [Term(Path(file), 1.0) for file in image_and]
        terms += [Term(Path(file), -1.0) for file in image_not]
        for term in terms:
            if isinstance(term.query, str):
                check_text_query(term.query)
        filters = Filters(
            path_glob=check_path_glob(path_glob) if path_glob is not None else None, path_prefix=path_prefix,
            modified_after=modified_after, modified_before=modified_before,  # type: ignore[arg-type]
            taken_after=taken_after, taken_before=taken_before,  # type: ignore[arg-type]
            min_width=min_width, max_width=max_width, min_height=min_height, max_height=max_height,
            orientation=orientation)
        request = Query(tuple(terms), filters)
    except QueryError as error:
        raise click.UsageError(str(error)) from None
    if server is not None:
        if paths or html_file is not None:
            raise click.UsageError("--paths and --html need the images' own paths: drop --server to search the "
                                   "index here, or use --json (paths relative to the server's images folder)")
        # a plain text or image goes as before (any server version answers it); else the terms as given
        plain = len(terms) == 1 and terms[0].weight == 1.0 and not raw
        texts = [(t.query, t.weight) for t in terms if isinstance(t.query, str)]
        _search_server(server, query=query if plain and image is None else None,
                       image=image if plain and query is None else None, k=k, candidates=candidates,
                       no_rerank=no_rerank, as_json=as_json, api_key=api_key, timeout=timeout,
                       terms=None if plain else texts,
                       images=None if plain else [(t.query, t.weight) for t in terms if not isinstance(t.query, str)],
                       options={**filters.to_dict(), "min_score": min_score,
                                **({"mode": mode} if mode != "two-stage" else {})})
        return
    from vkd.indexer import IndexMismatchError, ManifestError
    from vkd.paths import default_index_dir
    from vkd.retrieval.retriever import Retriever

    if candidates < k:
        raise click.UsageError(f"--candidates {candidates} is smaller than -k {k}; stage 1 must find at least k")
    path = Path(index_dir) if index_dir is not None else default_index_dir()
    if index_dir is None and not (path / "manifest.json").is_file():
        raise click.ClickException(
            f"no index at {path} (the default: $VKD_INDEX, else the demo's index). Run `vkd demo` to build the "
            "demo index, or pass --index DIR (an index made by `vkd index IMAGES --model STUDENT --out DIR`)"
        )
    # a plain text or image query keeps its old form (and its old --json "query" field)
    simple = len(terms) == 1 and not filters.active
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", UserWarning)
        try:
            retriever = Retriever(path, student=student, teacher=teacher, candidates=candidates, prefer=prefer,
                                  rerank=not no_rerank, mode=mode, scan=scan)
            result = retriever.search(terms[0].query if simple else request, k=k, min_score=min_score)
        except QueryError as error:
            raise click.UsageError(str(error)) from None
        except (IndexMismatchError, ManifestError, ValueError, OSError) as error:
            raise click.ClickException(str(error)) from error
    for warning in caught:
        if issubclass(warning.category, UserWarning):
            click.echo(f"warning: {warning.message}", err=True)

    if html_file is not None:
        from vkd.retrieval.gallery import write_gallery

        try:
            write_gallery(Path(html_file), result, title=request.describe())
        except OSError as error:
            raise click.ClickException(f"{html_file}: cannot write the page: {error.strerror or error}") from None
    if paths:
        # exact names, nothing escaped: a pipe's reader needs the real path
        end = b"\0" if print0 else b"\n"
        out = click.get_binary_stream("stdout")
        for hit in result:
            out.write(os.fsencode(hit.path) + end)
        out.flush()
        return
    if as_json:
        payload = {
            **result.to_dict(),
            "query": (query if image is None else None) if simple else request.describe(),
            "image": image,
            "terms": [{"text" if isinstance(t.query, str) else "image": str(t.query), "weight": t.weight}
                      for t in terms],
            "filters": filters.to_dict(),
            "min_score": min_score,
            "index": str(retriever.index.path),
            "k": k,
            "student": retriever.student.describe(),
            "teacher": retriever.teacher.describe() if result.reranked == "teacher" else None,
        }
        click.echo(json.dumps(payload, indent=2))
        return
    if not result:
        why = "no hits" + (" (filters or --min-score left none)" if filters.active or min_score is not None else "")
        click.echo(f"{why} in {retriever.index.path}")
        return
    click.echo(f"{'rank':>4}  {'score':>7}  {'student':>7}  path")
    for hit in result:
        click.echo(f"{hit.rank:>4}  {hit.score:7.4f}  {hit.student_score:7.4f}  {printable(hit.path)}")
    times = result.timings
    stages = ", ".join(f"{stage.removesuffix('_ms').replace('_', ' ')} {getattr(times, stage):.1f} ms"
                       for stage in STAGES)
    how = {"teacher": "teacher rerank", "student": "exact student rerank (no teacher vectors)", None: "no rerank",
           "exact": f"{result.mode}, exact re-score"}
    click.echo(f"{len(retriever.index)} images, {result.candidates} candidates, {how[result.reranked]}; "
               f"{stages}; total {times.total_ms:.1f} ms", err=True)


def _single(text: str, sign: int) -> Any:
    """One --and/--not text with an optional 'W:' weight (no ' + '/' - ' splitting: the
    flag already says which side the term is on)."""
    from vkd.retrieval.query import Term, parse_compact

    weight_and_text = parse_compact(text.replace(" + ", "\0").replace(" - ", "\1"))[0]
    restored = str(weight_and_text.query).replace("\0", " + ").replace("\1", " - ")
    return Term(restored, sign * abs(weight_and_text.weight))


def _search_server(server: str, *, query: str | None, image: str | None, k: int, candidates: int, no_rerank: bool,
                   as_json: bool, api_key: str | None, timeout: float, terms: list[tuple[str, float]] | None = None,
                   images: list[tuple[Any, float]] | None = None, options: dict[str, Any] | None = None) -> None:
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
    given = ctx.get_parameter_source("candidates") == ParameterSource.COMMANDLINE
    if given and candidates < k:
        raise click.UsageError(f"--candidates {candidates} is smaller than -k {k}; stage 1 must find at least k")
    try:
        answer = remote_search(server, query=query, image=image, k=k, candidates=candidates if given else None,
                               rerank=False if no_rerank else None, api_key=api_key, timeout=timeout,
                               terms=terms, images=images, options=options)
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
