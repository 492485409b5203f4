"""The HTTP API and the web page: ``create_app(ServeConfig(index=...))``.

Routes (``/openapi.json`` describes each, with its errors):

* ``GET /search?q=TEXT&k=10&candidates=1000&rerank=true`` and ``POST /search`` (JSON
  ``{"q": ...}``, or ``multipart/form-data`` with an ``image`` file for image -> image).
  Combined queries (``vkd.retrieval.query``): ``q`` in the compact syntax
  (``2:cat + dog - grass``; ``raw=true`` takes it literally), JSON ``"terms": [{"text":
  ..., "weight": ...}]``, several ``image`` files with ``image_weight`` fields; filters
  (``path_glob``, ``path_prefix``, ``modified_after``/``_before``, ``taken_after``/``_before``,
  ``min_width``/``max_width``/``min_height``/``max_height``, ``orientation``) and
  ``min_score``, as query parameters, JSON fields or form fields;
* ``GET /images/{id}`` (the original file) and ``GET /thumbs/{id}`` (a JPEG thumbnail),
  for ids of live rows only, the file path taken from the row, never from the request;
* ``GET /health`` (200 once the models are loaded, 503 before), ``GET /stats``;
* ``POST /login`` / ``POST /logout`` (the API-key cookie), ``GET /`` (the page) and
  ``/static/...``.

With an API key set, ``/search``, ``/images``, ``/thumbs`` and ``/stats`` need it
(``Authorization: Bearer KEY``, ``X-API-Key: KEY`` or the cookie ``POST /login`` sets);
``/health``, ``/login``, the page, its static files and the API description stay open so
that a load balancer can probe the server and the page can show its login form.

Every error is JSON ``{"detail": "..."}`` saying what is wrong and what is accepted; bad
input gets a 4xx, never a 500.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import json
import logging
import math
import os
import time
from pathlib import Path, PurePosixPath
from typing import Any, Literal
from urllib.parse import quote

from fastapi import Depends, FastAPI, HTTPException, Query, Request, Security
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, Response, StreamingResponse
from fastapi.security import APIKeyCookie, APIKeyHeader, HTTPAuthorizationCredentials, HTTPBearer
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, Field
from starlette.concurrency import run_in_threadpool
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from vkd.serve.config import ServeConfig
from vkd.serve.engine import Busy, NotReady, SearchEngine, Served
from vkd.serve.files import (
    NotServable,
    content_type,
    display_path,
    iter_file,
    make_thumbnail,
    open_inside,
    resolve_inside,
)
from vkd.serve.stats import RequestStats

log = logging.getLogger("uvicorn.error.vkd")

STATIC_DIR = Path(__file__).parent / "static"
COOKIE = "vkd_api_key"
COOKIE_MAX_AGE = 30 * 24 * 3600
# multipart boundaries and headers around the image part; the part itself gets the exact bound
MULTIPART_SLACK = 64 * 1024
FILTER_FIELDS = ("path_glob", "path_prefix", "modified_after", "modified_before", "taken_after", "taken_before",
                 "min_width", "max_width", "min_height", "max_height", "orientation")
QUERY_FIELDS = ("raw", "min_score", *FILTER_FIELDS)
SEARCH_FIELDS = ("q", "terms", "k", "candidates", "rerank", "mode", *QUERY_FIELDS)
FORM_FIELDS = ("image", "image_weight", "q", "terms", "k", "candidates", "rerank", "mode", *QUERY_FIELDS)
SEARCH_MODES = ("two-stage", "student-query", "student-index")  # = vkd.retrieval.modes.MODES (no numpy here)
#: image terms one multipart request may carry (their bytes together stay under --max-upload-bytes)
MAX_IMAGE_TERMS = 8
MAX_TERMS = 32
TIMING_KEYS = ("student_encode_ms", "ann_ms", "teacher_encode_ms", "rerank_ms", "total_ms")
_TRUE, _FALSE = ("true", "1", "yes", "on"), ("false", "0", "no", "off")
# The page loads its script and styles from /static and shows thumbnails from /thumbs; nothing
# else may run or be framed. Inline style attributes are allowed, inline scripts are not.
PAGE_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; img-src 'self' data: blob:; style-src 'self' 'unsafe-inline'; "
                               "script-src 'self'; object-src 'none'; base-uri 'none'; frame-ancestors 'none'; "
                               "form-action 'self'",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
}
FALLBACK_PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>vkd</title></head>
<body><h1>vkd search server</h1>
<p>The web page is not installed with this copy of vkd (no vkd/serve/static/index.html).
The API works: <code>GET /search?q=a+dog+on+a+beach</code>; its description is at
<a href="docs">/docs</a> and <a href="openapi.json">/openapi.json</a>.</p>
</body></html>
"""


# -- response models (for /openapi.json; responses are written directly) ---------------


class ErrorResponse(BaseModel):
    detail: str = Field(description="One line: what is wrong and what would be accepted.")


class HitModel(BaseModel):
    id: str = Field(description="The image's id: 32 hex characters, stable across re-indexing.")
    rank: int
    score: float = Field(description="What the ranking used: the teacher's cosine after a teacher rerank, "
                                     "else the student's.")
    teacher_score: float | None = Field(description="The teacher's cosine; null without a teacher rerank.")
    student_score: float | None = Field(description="The student's cosine (stage 1).")
    path: str = Field(description="Relative to the index's images folder, '/'-separated; a byte that is not "
                                  "UTF-8 is written \\xNN.")
    width: int | None
    height: int | None
    image_url: str = Field(description="/images/{id}: the original file.")
    thumb_url: str = Field(description="/thumbs/{id}: a JPEG thumbnail.")


class TimingsModel(BaseModel):
    student_encode_ms: float
    ann_ms: float
    teacher_encode_ms: float
    rerank_ms: float
    total_ms: float = Field(description="The search itself; the stage times are those of the micro-batch "
                                        "this request was searched in.")
    queue_ms: float = Field(description="Time the request waited for its micro-batch to start.")
    batch_size: int = Field(description="Requests searched together in that micro-batch.")


class SearchResponse(BaseModel):
    query: str | None = Field(description="The text searched for; null for an image query; a combined query or "
                                          "one with filters in the compact syntax (\"2:cat + dog - grass\").")
    k: int
    reranked: Literal["teacher", "student", "exact"] | None = Field(
        description="teacher: reranked with stored teacher vectors; student: exact student scores (the index "
                    "stores no teacher vectors); exact: an asymmetric mode's exact re-score; null: no rerank asked.")
    mode: Literal["two-stage", "student-query", "student-index"] = Field(
        "two-stage", description="The search mode that answered (see the mode parameter).")
    candidates: int = Field(description="Stage-1 candidates found (at most the candidates asked for).")
    results: list[HitModel]
    timings: TimingsModel


class TermModel(BaseModel):
    text: str = Field(description="A text term (1 to 2000 characters), taken literally.")
    weight: float = Field(1.0, description="Its weight; negative pushes its matches down.")


class SearchBody(BaseModel):
    q: str | None = Field(None, description="The text to search for (1 to 2000 characters), in the compact syntax: "
                                            "terms joined by ' + ' / ' - ', each with an optional 'W:' weight "
                                            "(raw=true: literally).", examples=["a dog on a beach", "2:cat + dog - grass"])
    terms: list[TermModel] | None = Field(None, description="Weighted text terms (with or instead of q).")
    raw: bool | None = Field(None, description="true: q is one literal term (no ' + ', ' - ', 'W:' parsing).")
    min_score: float | None = Field(None, description="Drop hits whose score is below this.")
    path_glob: str | None = Field(None, description="Only paths (relative to the images folder) matching this glob.")
    path_prefix: str | None = Field(None, description="Only paths (relative to the images folder) with this prefix.")
    modified_after: str | None = Field(None, description="ISO date: only files modified at or after it (UTC).")
    modified_before: str | None = Field(None, description="ISO date: only files modified at or before it.")
    taken_after: str | None = Field(None, description="ISO date: only photos whose EXIF capture date is at or after it.")
    taken_before: str | None = Field(None, description="ISO date: only photos taken at or before it.")
    min_width: int | None = None
    max_width: int | None = None
    min_height: int | None = None
    max_height: int | None = None
    orientation: Literal["landscape", "portrait", "square"] | None = None
    k: int | None = Field(None, description="Results to return.")
    candidates: int | None = Field(None, description="Stage-1 candidates passed to the rerank (>= k).")
    rerank: bool | None = Field(None, description="false: stage 1 only (the student's ANN ranking).")
    mode: Literal["two-stage", "student-query", "student-index"] | None = Field(
        None, description="two-stage (default): student ANN, teacher rerank; student-query: the projected student "
                          "encodes the query against stored teacher vectors; student-index: the teacher encodes it "
                          "against stored projected student vectors.")


class LoginBody(BaseModel):
    api_key: str


def _errors(*codes: int) -> dict[int | str, dict[str, Any]]:
    meanings = {
        400: "Bad input: an empty or too long query, k or candidates out of range, a body that is not what "
             "the route accepts, an upload that is not a readable image.",
        401: "The API key is missing or wrong (only when the server has one).",
        404: "No live row of the index has this id (ids are 32 hex characters).",
        403: "The row's file resolves outside the images folder, or is not a regular file.",
        413: "The upload is over --max-upload-bytes, or the image over --max-image-pixels (decompression bomb).",
        415: "The body is neither application/json nor multipart/form-data.",
        422: "The image cannot be decoded, or this server's models cannot encode image queries.",
        503: "The models are still loading (retry after Retry-After seconds), the search queue is full, or "
             "the index cannot be searched.",
    }
    out: dict[int | str, dict[str, Any]] = {code: {"model": ErrorResponse, "description": meanings[code]}
                                            for code in codes}
    out["default"] = {"model": ErrorResponse, "description": "Any other error, as {\"detail\": ...}."}
    return out


# -- middleware ---------------------------------------------------------------------


class BodyTooLarge(Exception):
    def __init__(self, limit: int, size: int | None = None) -> None:
        self.limit = limit
        self.size = size
        super().__init__(f"the request body is {f'{size} bytes' if size is not None else 'over the limit'}; "
                         f"this server accepts at most {limit} bytes (vkd serve --max-upload-bytes)")


class ServeMiddleware:
    """Bounds request bodies (a 413 before or while they arrive), counts requests and their
    wall times per route kind for ``/stats``, and marks every response ``nosniff``."""

    def __init__(self, app: ASGIApp, *, stats: RequestStats, max_body: int, root_path: str = "") -> None:
        self.app = app
        self.stats = stats
        self.max_body = max_body
        self.root_path = root_path

    def _kind(self, path: str) -> str:
        if self.root_path and path.startswith(self.root_path):
            path = path[len(self.root_path):]
        head = path.strip("/").split("/", 1)[0]
        return head if head in ("search", "images", "thumbs", "stats", "health", "login", "logout", "static") else "other"

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500
        response_started = False

        async def send_marked(message: Message) -> None:
            nonlocal status, response_started
            if message["type"] == "http.response.start":
                status = int(message["status"])
                response_started = True
                message["headers"] = [*message.get("headers", []), (b"x-content-type-options", b"nosniff")]
            await send(message)

        received = 0

        async def receive_bounded() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_body:
                    raise BodyTooLarge(self.max_body)
            return message

        try:
            declared = _content_length(scope)
            if declared is not None and declared > self.max_body:
                await _send_json(send_marked, 413, {"detail": str(BodyTooLarge(self.max_body, declared))})
                return
            await self.app(scope, receive_bounded, send_marked)
        except BodyTooLarge as error:
            if response_started:
                raise
            await _send_json(send_marked, 413, {"detail": str(error)})
        finally:
            self.stats.record(self._kind(scope.get("path", "")), (time.perf_counter() - started) * 1000.0, status)


def _content_length(scope: Scope) -> int | None:
    for name, value in scope.get("headers", []):
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None
    return None


async def _send_json(send: Send, status: int, payload: dict[str, Any]) -> None:
    body = JSONResponse(payload).body
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            (b"connection", b"close")]})
    await send({"type": "http.response.body", "body": body})


# -- input checks -------------------------------------------------------------------


def _bad(detail: str, status: int = 400) -> HTTPException:
    return HTTPException(status_code=status, detail=detail)


def parse_int(name: str, value: Any, low: int, high: int) -> int:
    """``value`` (a JSON number or a form field's text) as an integer in [low, high]."""
    accepted = f"give an integer from {low} to {high}"
    if isinstance(value, str):
        try:
            number = int(value.strip())
        except ValueError:
            raise _bad(f"{name}={value[:40]!r} is not an integer; {accepted}") from None
    elif isinstance(value, bool) or not isinstance(value, int | float):
        raise _bad(f"{name}={value!r:.40} is not an integer; {accepted}")
    elif isinstance(value, float) and not value.is_integer():
        raise _bad(f"{name}={value!r} is not a whole number; {accepted}")
    else:
        number = int(value)
    if not low <= number <= high:
        raise _bad(f"{name}={number} is out of range; {accepted}")
    return number


def parse_bool(name: str, value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in _TRUE + _FALSE:
        return value.strip().lower() in _TRUE
    raise _bad(f"{name}={value!r:.40} is not true or false; give true or false")


class SearchParams:
    """k, candidates and rerank checked against the server's bounds and each other."""

    def __init__(self, config: ServeConfig, k: Any = None, candidates: Any = None, rerank: Any = None,
                 mode: Any = None) -> None:
        self.k = parse_int("k", k, 1, config.max_k) if k is not None else min(10, config.max_k)
        if candidates is None:
            self.candidates = min(max(config.candidates, self.k), config.max_candidates)
        else:
            self.candidates = parse_int("candidates", candidates, 1, config.max_candidates)
        if self.candidates < self.k:
            raise _bad(f"candidates={self.candidates} is smaller than k={self.k}: stage 1 must find at least k "
                       "images; give candidates >= k")
        self.rerank = True if rerank is None else parse_bool("rerank", rerank)
        if mode is not None and mode not in SEARCH_MODES:
            raise _bad(f"mode={mode!r:.40} is not a search mode; give one of {', '.join(SEARCH_MODES)}")
        self.mode = mode or "two-stage"


def check_query(text: Any) -> str:
    from vkd.retrieval.retriever import QueryError, check_text_query

    if not isinstance(text, str):
        raise _bad(f"q must be text, got {type(text).__name__}: give the words to search for, e.g. \"a dog on a beach\"")
    try:
        return check_text_query(text)
    except QueryError as error:
        raise _bad(str(error)) from None


def parse_float(name: str, value: Any) -> float:
    try:
        number = float(value.strip() if isinstance(value, str) else value)
    except (TypeError, ValueError):
        raise _bad(f"{name}={value!r:.40} is not a number; give e.g. 0.25") from None
    if isinstance(value, bool) or not math.isfinite(number):
        raise _bad(f"{name}={value!r:.40} is not a finite number; give e.g. 0.25")
    return number


def parse_filters(given: Any) -> Any:
    """``Filters`` from the request's filter fields (query parameters, JSON or form fields)."""
    from vkd.retrieval.query import Filters, QueryError, check_path_glob

    values: dict[str, Any] = {}
    for name in FILTER_FIELDS:
        value = given.get(name)
        if value is None or value == "":
            continue
        if name.startswith(("min_", "max_")):
            values[name] = parse_int(name, value, 0, 2**31 - 1)
        elif not isinstance(value, str):
            raise _bad(f"{name}={value!r:.40} must be text")
        else:
            values[name] = value
    try:
        if "path_glob" in values:
            check_path_glob(values["path_glob"])
        return Filters(**values)
    except QueryError as error:
        raise _bad(str(error)) from None


def build_query(q: Any, terms: Any, images: list[tuple[Any, float]], given: Any) -> tuple[Any, str | None, float | None]:
    """(what the engine searches, the response's "query" text, min_score) from a request.

    A plain text or image query without filters stays a ``str`` / image, as before this
    API took combined queries, so old clients get exactly the old answers.
    """
    from vkd.retrieval.query import Query, QueryError, Term, parse_compact

    raw = parse_bool("raw", given.get("raw")) if given.get("raw") not in (None, "") else False
    min_score = parse_float("min_score", given.get("min_score")) if given.get("min_score") not in (None, "") else None
    filters = parse_filters(given)
    collected: list[Term] = []
    try:
        if q is not None:
            collected += parse_compact(check_query(q), raw=raw)
        if terms is not None:
            if not isinstance(terms, list):
                raise _bad('terms must be a list: [{"text": "a dog", "weight": 1}, {"text": "a cat", "weight": -1}]')
            for i, term in enumerate(terms):
                if not isinstance(term, dict) or set(term) - {"text", "weight"} or "text" not in term:
                    raise _bad(f'terms[{i}] must be {{"text": TEXT, "weight": NUMBER}} (weight optional, default 1); '
                               "image terms are sent as multipart files")
                weight = parse_float(f"terms[{i}].weight", term.get("weight", 1.0))
                collected.append(Term(check_query(term["text"]), weight))
        collected += [Term(image, weight) for image, weight in images]
        if not collected:
            raise _bad('no query: give q=TEXT, "terms": [{"text": ..., "weight": ...}], or an image as '
                       'multipart/form-data with an "image" field')
        if len(collected) > MAX_TERMS:
            raise _bad(f"{len(collected)} query terms; at most {MAX_TERMS}")
        query = Query(tuple(collected), filters)
    except QueryError as error:
        raise _bad(str(error)) from None
    if len(collected) == 1 and not filters.active and collected[0].weight == 1.0:
        only = collected[0].query
        return only, only if isinstance(only, str) else None, min_score
    return query, query.describe(), min_score


def decode_upload(data: bytes, max_pixels: int) -> Any:
    """The uploaded bytes as an upright RGB image, through the indexer's guards."""
    from vkd.data.images import ImageError, ImageTooLarge, decode_image_bytes

    if not data:
        raise _bad("the uploaded image is empty (0 bytes); send a JPEG, PNG, WebP, GIF, TIFF or BMP file")
    try:
        return decode_image_bytes(data, max_pixels=max_pixels, source="the uploaded image")
    except ImageTooLarge as error:
        raise _bad(f"{error}; this server decodes images of at most {max_pixels} pixels (vkd serve "
                   "--max-image-pixels)", 413) from None
    except ImageError as error:
        raise _bad(f"{error}; send a JPEG, PNG, WebP, GIF, TIFF or BMP file") from None


def _number(value: float | None) -> float | None:
    return float(value) if value is not None and math.isfinite(value) else None


def search_payload(served: Served, *, query: str | None, k: int, root_path: str = "") -> dict[str, Any]:
    """The JSON of one search (see ``SearchResponse``)."""
    result = served.result
    hits = []
    for hit in result:
        try:
            relpath = Path(hit.path).relative_to(served.index.images_root).as_posix()
        except ValueError:  # not under the recorded root: cannot happen for a row of this snapshot
            relpath = PurePosixPath(hit.path).name
        hits.append({
            "id": hit.id, "rank": hit.rank, "score": _number(hit.score), "teacher_score": _number(hit.teacher_score),
            "student_score": _number(hit.student_score), "path": display_path(relpath),
            "width": hit.width, "height": hit.height,
            "image_url": f"{root_path}/images/{hit.id}", "thumb_url": f"{root_path}/thumbs/{hit.id}",
        })
    timings = {key: round(float(getattr(result.timings, key)), 3) for key in TIMING_KEYS}
    timings.update(queue_ms=round(served.queue_ms, 3), batch_size=served.batch_size)
    return {"query": query, "k": k, "reranked": result.reranked, "mode": getattr(result, "mode", "two-stage"),
            "candidates": int(result.candidates), "results": hits, "timings": timings}


# -- the application ----------------------------------------------------------------


def cookie_token(api_key: str) -> str:
    """What the login cookie holds: derived from the key, so the browser never stores the key
    itself, and a new key invalidates every cookie."""
    return hmac.new(api_key.encode("utf-8"), b"vkd serve login cookie v1", hashlib.sha256).hexdigest()


def _same(given: str | None, expected: str) -> bool:
    return given is not None and hmac.compare_digest(given.encode("utf-8", "surrogateescape"),
                                                     expected.encode("utf-8"))


def create_app(config: ServeConfig, *, engine: SearchEngine | None = None) -> FastAPI:
    """The FastAPI app for ``config``. Its lifespan starts the engine (models load in the
    background: ``/health`` says when they are ready) and stops it on shutdown. Pass
    ``engine`` to serve one built elsewhere (tests share an open ``Retriever`` that way)."""
    import vkd

    engine = engine or SearchEngine(config)
    stats = RequestStats()
    root = config.root_path

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> Any:
        engine.start()
        try:
            yield
        finally:
            await run_in_threadpool(engine.close)

    app = FastAPI(
        title="vkd search", version=vkd.__version__, lifespan=lifespan,
        description="Two-stage image search: the student finds candidates by ANN, the teacher reranks them "
                    "against its stored vectors. Errors are JSON {\"detail\": ...}."
                    + (" Every API route needs the API key: `Authorization: Bearer KEY`, `X-API-Key: KEY`, or "
                       "the cookie POST /login sets; /health, /login and the page do not." if config.api_key else ""),
    )
    app.state.engine = engine
    app.state.stats = stats
    app.state.config = config
    app.add_middleware(ServeMiddleware, stats=stats, max_body=config.max_upload_bytes + MULTIPART_SLACK,
                       root_path=root)

    bearer = HTTPBearer(auto_error=False, description="Authorization: Bearer KEY")
    header_key = APIKeyHeader(name="X-API-Key", auto_error=False, description="X-API-Key: KEY")
    cookie_key = APIKeyCookie(name=COOKIE, auto_error=False, description="set by POST /login")

    async def require_key(credentials: HTTPAuthorizationCredentials | None = Security(bearer),
                          key: str | None = Security(header_key),
                          cookie: str | None = Security(cookie_key)) -> None:
        expected = config.api_key
        assert expected is not None
        if (_same(credentials.credentials if credentials else None, expected) or _same(key, expected)
                or _same(cookie, cookie_token(expected))):
            return
        raise HTTPException(
            status_code=401, headers={"WWW-Authenticate": "Bearer"},
            detail="this server needs its API key: send the header 'Authorization: Bearer KEY' or 'X-API-Key: KEY', "
                   "or log in with POST /login {\"api_key\": KEY}, which sets a cookie" if not (credentials or key or cookie)
                   else "wrong API key: send the key the server was started with (--api-key / VKD_API_KEY)")

    guarded = [Depends(require_key)] if config.api_key else []

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, error: RequestValidationError) -> JSONResponse:
        problems = []
        for item in error.errors():
            name = ".".join(str(part) for part in item.get("loc", ()) if part not in ("query", "path", "body"))
            given = item.get("input")
            shown = f" (got {given!r:.40})" if isinstance(given, str | int | float) else ""
            problems.append(f"{name or 'request'}: {item.get('msg', 'invalid')}{shown}")
        return JSONResponse({"detail": "; ".join(problems)}, status_code=400)

    @app.exception_handler(BodyTooLarge)
    async def too_large(request: Request, error: BodyTooLarge) -> JSONResponse:
        return JSONResponse({"detail": str(error)}, status_code=413)

    # -- search ---------------------------------------------------------------

    async def run_search(query: Any, text: str | None, params: SearchParams,
                         min_score: float | None = None) -> JSONResponse:
        from vkd.indexer import IndexMismatchError, ManifestError
        from vkd.retrieval.modes import ModeUnavailableError

        try:
            served = await engine.search(query, k=params.k, candidates=params.candidates, rerank=params.rerank,
                                         min_score=min_score, mode=params.mode)
        except NotReady as error:
            raise HTTPException(503, detail=str(error), headers={"Retry-After": "5"}) from None
        except Busy as error:
            raise HTTPException(503, detail=str(error), headers={"Retry-After": "1"}) from None
        except ModeUnavailableError as error:  # this request's mode, not the server, is at fault
            raise _bad(str(error), 422) from None
        except (IndexMismatchError, ManifestError) as error:
            raise HTTPException(503, detail=f"the index cannot be searched: {error}") from None
        except ValueError as error:
            if text is None or getattr(query, "has_images", False):  # e.g. an export without an image tower
                raise _bad(f"this server cannot search with images: {error}", 422) from None
            raise _bad(str(error)) from None
        except Exception as error:
            log.exception("vkd serve: search failed")
            raise HTTPException(500, detail=f"internal error: {type(error).__name__}: {error}") from None
        return JSONResponse(search_payload(served, query=text, k=params.k, root_path=root))

    @app.get("/search", response_model=SearchResponse, dependencies=guarded, responses=_errors(400, 401, 503),
             summary="Text -> image search (combined terms, filters)", tags=["search"])
    async def search_get(
        q: str | None = Query(None, description="The text to search for (1 to 2000 characters), in the compact "
                                                "syntax: terms joined by ' + ' / ' - ' (spaces on both sides), "
                                                "each with an optional 'W:' weight; raw=true takes it literally.",
                              examples=["a dog on a beach", "2:cat + dog - grass"]),
        k: int | None = Query(None, ge=1, le=config.max_k, description="Results to return (default 10)."),
        candidates: int | None = Query(None, ge=1, le=config.max_candidates,
                                       description=f"Stage-1 candidates (>= k; default {config.candidates})."),
        rerank: bool | None = Query(None, description="false: stage 1 only (default true)."),
        mode: Literal["two-stage", "student-query", "student-index"] | None = Query(
            None, description="Search mode (default two-stage); student-query / student-index need the index's "
                              "teacher / projected vectors."),
        raw: bool | None = Query(None, description="true: q is one literal term (no ' + ', ' - ', 'W:' parsing)."),
        min_score: float | None = Query(None, description="Drop hits whose score is below this."),
        path_glob: str | None = Query(None, description="Only paths (relative to the images folder) matching it."),
        path_prefix: str | None = Query(None, description="Only paths (relative to the images folder) with it."),
        modified_after: str | None = Query(None, description="ISO date: modified at or after it (UTC)."),
        modified_before: str | None = Query(None, description="ISO date: modified at or before it (UTC)."),
        taken_after: str | None = Query(None, description="ISO date: EXIF capture date at or after it."),
        taken_before: str | None = Query(None, description="ISO date: EXIF capture date at or before it."),
        min_width: int | None = Query(None, ge=0),
        max_width: int | None = Query(None, ge=0),
        min_height: int | None = Query(None, ge=0),
        max_height: int | None = Query(None, ge=0),
        orientation: Literal["landscape", "portrait", "square"] | None = Query(None),
    ) -> JSONResponse:
        if q is None:
            raise _bad('no query: give q=TEXT (GET /search?q=a+dog+on+a+beach), or POST an image as '
                       'multipart/form-data with an "image" field')
        params = SearchParams(config, k, candidates, rerank, mode)
        given = dict(raw=raw, min_score=min_score, path_glob=path_glob, path_prefix=path_prefix,
                     modified_after=modified_after, modified_before=modified_before, taken_after=taken_after,
                     taken_before=taken_before, min_width=min_width, max_width=max_width, min_height=min_height,
                     max_height=max_height, orientation=orientation)
        query, text, cut = build_query(q, None, [], given)
        return await run_search(query, text, params, cut)

    @app.post(
        "/search", response_model=SearchResponse, dependencies=guarded,
        responses=_errors(400, 401, 413, 415, 422, 503), summary="Text or image search", tags=["search"],
        openapi_extra={"requestBody": {"required": True, "content": {
            "application/json": {"schema": SearchBody.model_json_schema()},
            "multipart/form-data": {"schema": {
                "type": "object", "required": ["image"],
                "properties": {"image": {"type": "array", "items": {"type": "string", "format": "binary"},
                                         "description": f"The query image(s), at most {MAX_IMAGE_TERMS}."},
                               "image_weight": {"type": "array", "items": {"type": "number"},
                                                "description": "Each image's weight, in the order of the "
                                                               "images (default 1; negative: push down)."},
                               "q": {"type": "string", "description": "Text terms, compact syntax."},
                               "terms": {"type": "string", "description": "Text terms as JSON, as in the "
                                                                         "JSON body."},
                               "k": {"type": "integer"}, "candidates": {"type": "integer"},
                               "rerank": {"type": "boolean"}, "min_score": {"type": "number"},
                               "mode": {"type": "string", "enum": list(SEARCH_MODES)},
                               **{name: {"type": "string"} for name in FILTER_FIELDS}}}},
        }}},
    )
    async def search_post(request: Request) -> JSONResponse:
        media = request.headers.get("content-type", "").split(";", 1)[0].strip().lower()
        if media == "multipart/form-data":
            async with request.form(max_files=MAX_IMAGE_TERMS,
                                    max_fields=len(FORM_FIELDS) + MAX_IMAGE_TERMS) as form:
                unknown = sorted(set(form.keys()) - set(FORM_FIELDS))
                if unknown:
                    raise _bad(f"unknown form field(s) {', '.join(unknown)}; accepted: {', '.join(FORM_FIELDS)}")
                uploads = form.getlist("image")
                if any(isinstance(upload, str) for upload in uploads):
                    raise _bad('"image" must be a file upload, not a text field')
                if not uploads and form.get("q") is None and form.get("terms") is None:
                    raise _bad('no image: send the query image as a file in the form field "image"')
                weights = [parse_float("image_weight", value) for value in form.getlist("image_weight")]
                if weights and len(weights) != len(uploads):
                    raise _bad(f"{len(weights)} image_weight field(s) for {len(uploads)} image(s): give one weight "
                               "per image, in the same order, or none (all 1)")
                params = SearchParams(config, form.get("k"), form.get("candidates"), form.get("rerank"),
                                      form.get("mode"))
                given = {name: form.get(name) for name in QUERY_FIELDS}
                q, terms_text = form.get("q"), form.get("terms")
                datas, total = [], 0
                for upload in uploads:
                    data = await upload.read(config.max_upload_bytes + 1)
                    total += len(data)
                    if total > config.max_upload_bytes:
                        raise _bad(f"the uploaded image(s) are over {config.max_upload_bytes} bytes, the most this "
                                   "server accepts (vkd serve --max-upload-bytes)", 413)
                    datas.append(data)
            try:
                terms = json.loads(terms_text) if isinstance(terms_text, str) else None
            except ValueError:
                raise _bad('the "terms" field is not valid JSON: [{"text": "a dog", "weight": 1}]') from None
            images = [await run_in_threadpool(decode_upload, data, config.max_image_pixels) for data in datas]
            query, text, cut = build_query(q, terms, list(zip(images, weights or [1.0] * len(images), strict=True)),
                                           given)
            return await run_search(query, text, params, cut)
        if media not in ("application/json", ""):
            raise _bad(f"content type {media!r} is not accepted: send application/json {{\"q\": TEXT}} or "
                       'multipart/form-data with an "image" file', 415)
        try:
            body = await request.json()
        except ValueError:
            raise _bad('the body is not valid JSON: send {"q": "a dog on a beach", "k": 10}') from None
        if not isinstance(body, dict):
            raise _bad('the body must be a JSON object: {"q": "a dog on a beach", "k": 10}')
        unknown = sorted(set(body) - set(SEARCH_FIELDS))
        if unknown:
            raise _bad(f"unknown field(s) {', '.join(unknown)}; accepted: {', '.join(SEARCH_FIELDS)} (an image is "
                       "sent as multipart/form-data)")
        if "q" not in body and "terms" not in body:
            raise _bad('no query: send {"q": TEXT} or {"terms": [{"text": TEXT, "weight": 1}, ...]}, or an image '
                       'as multipart/form-data with an "image" field')
        params = SearchParams(config, body.get("k"), body.get("candidates"), body.get("rerank"), body.get("mode"))
        query, text, cut = build_query(body.get("q"), body.get("terms"), [], body)
        return await run_search(query, text, params, cut)

    # -- files --------------------------------------------------------------------

    def locate(image_id: str) -> Any:
        try:
            return engine.locate(image_id)
        except NotServable as error:
            raise HTTPException(error.status, detail=error.detail) from None
        except NotReady as error:
            raise HTTPException(503, detail=str(error), headers={"Retry-After": "5"}) from None

    def not_modified(request: Request, etag: str) -> bool:
        return etag in [tag.strip() for tag in request.headers.get("if-none-match", "").split(",")]

    @app.get("/images/{image_id}", dependencies=guarded, responses={
        **_errors(401, 403, 404, 503), 200: {"content": {"image/*": {}}, "description": "The original file."}},
        response_class=Response, summary="An indexed image's file", tags=["images"])
    async def image_file(image_id: str, request: Request) -> Response:
        located = locate(image_id)
        try:
            handle = await run_in_threadpool(open_inside, located.images_root, located.relpath)
        except NotServable as error:
            raise HTTPException(error.status, detail=error.detail) from None
        info = os.fstat(handle.fileno())
        etag = f'"{info.st_size:x}-{info.st_mtime_ns:x}"'
        headers = {"ETag": etag, "Cache-Control": "private, max-age=3600"}
        if not_modified(request, etag):
            handle.close()
            return Response(status_code=304, headers=headers)
        name = display_path(PurePosixPath(located.relpath).name)
        headers.update({"Content-Length": str(info.st_size),
                        "Content-Disposition": f"inline; filename*=UTF-8''{quote(name)}"})
        return StreamingResponse(iter_file(handle), media_type=content_type(handle, name), headers=headers)

    @app.get("/thumbs/{image_id}", dependencies=guarded, responses={
        **_errors(401, 403, 404, 422, 503), 200: {"content": {"image/jpeg": {}}, "description": "A JPEG thumbnail."}},
        response_class=Response, summary="An indexed image's thumbnail", tags=["images"])
    async def thumbnail(image_id: str, request: Request) -> Response:
        located = locate(image_id)
        try:
            resolve_inside(located.images_root, located.relpath)  # also for a cached one: the rule holds now
        except NotServable as error:
            raise HTTPException(error.status, detail=error.detail) from None
        key = f"{image_id}-{config.thumb_size}-{located.sha256[:16]}"
        headers = {"ETag": f'"{key}"', "Cache-Control": "private, max-age=86400"}
        if not_modified(request, headers["ETag"]):
            return Response(status_code=304, headers=headers)
        data = await run_in_threadpool(engine.thumbs.get, key)
        if data is None:
            data = await run_in_threadpool(make_thumb, located, key)
        return Response(data, media_type="image/jpeg", headers=headers)

    def make_thumb(located: Any, key: str) -> bytes:
        from vkd.data.images import ImageError

        try:
            with open_inside(located.images_root, located.relpath) as handle:
                data = handle.read()
        except NotServable as error:
            raise HTTPException(error.status, detail=error.detail) from None
        try:
            thumb = make_thumbnail(data, config.thumb_size, max_pixels=located.max_pixels)
        except ImageError as error:
            raise _bad(f"this image's file can no longer be decoded ({error.reason}); re-run `vkd index` on the "
                       "folder", 422) from None
        engine.thumbs.put(key, thumb)
        return thumb

    # -- status -------------------------------------------------------------------

    health_responses: dict[int | str, dict[str, Any]] = {
        200: {"description": '{"status": "ready", ...}: the models are loaded.'},
        503: {"description": '{"status": "loading"} while the models load; {"status": "failed", "detail": ...} '
                             "when they could not be loaded."}}

    @app.head("/health", include_in_schema=False)  # for probes that send HEAD
    @app.get("/health", summary="Ready or not (no API key needed)", tags=["status"], responses=health_responses)
    async def health() -> JSONResponse:
        if engine.state == "ready" and engine.retriever is not None:
            return JSONResponse({"status": "ready", "live_rows": len(engine.retriever.index),
                                 "uptime_s": round(time.time() - engine.started, 3)})
        body: dict[str, Any] = {"status": engine.state}
        if engine.state == "failed":
            body["detail"] = engine.not_ready_detail()
        return JSONResponse(body, status_code=503, headers={"Retry-After": "5"})

    @app.get("/stats", dependencies=guarded, responses=_errors(401), summary="Index, models and request figures",
             tags=["status"])
    async def server_stats() -> JSONResponse:
        routes = stats.summary()
        search = routes.get("search", {})
        return JSONResponse({
            **engine.describe(),
            "requests": stats.total,
            "latency_ms": search.get("latency_ms") or {"p50": None, "p95": None, "p99": None, "n": 0},
            "routes": routes,
            "workers_note": "figures are this worker process's own",
        })

    # -- login --------------------------------------------------------------------

    @app.post("/login", status_code=204, responses=_errors(400, 401), tags=["login"],
              summary="Trade the API key for a cookie (for the page)",
              openapi_extra={"requestBody": {"required": True, "content": {
                  "application/json": {"schema": LoginBody.model_json_schema()}}}})
    async def login(request: Request) -> Response:
        try:
            body = await request.json()
        except ValueError:
            raise _bad('the body is not valid JSON: send {"api_key": KEY}') from None
        key = body.get("api_key") if isinstance(body, dict) else None
        if not isinstance(key, str):
            raise _bad('send the key as JSON: {"api_key": KEY}')
        response = Response(status_code=204)
        if config.api_key is None:
            return response  # nothing to log in to: every route is open
        if not _same(key, config.api_key):
            raise HTTPException(401, detail="wrong API key: give the key the server was started with "
                                            "(--api-key / VKD_API_KEY)")
        response.set_cookie(COOKIE, cookie_token(config.api_key), max_age=COOKIE_MAX_AGE, path=root or "/",
                            httponly=True, samesite="strict", secure=request.url.scheme == "https")
        return response

    @app.post("/logout", status_code=204, tags=["login"], summary="Drop the login cookie")
    async def logout() -> Response:
        response = Response(status_code=204)
        response.delete_cookie(COOKIE, path=root or "/", httponly=True, samesite="strict")
        return response

    # -- the page -----------------------------------------------------------------

    @app.get("/", include_in_schema=False)
    async def page() -> Response:
        index_html = STATIC_DIR / "index.html"
        if index_html.is_file():
            return FileResponse(index_html, media_type="text/html; charset=utf-8",
                                headers={**PAGE_HEADERS, "Cache-Control": "no-cache"})
        return HTMLResponse(FALLBACK_PAGE, headers=PAGE_HEADERS)

    # check_dir=False: the page's files may not be there yet (the app still serves the API)
    app.mount("/static", StaticFiles(directory=STATIC_DIR, check_dir=False), name="static")
    return app


def app_from_env() -> FastAPI:
    """The app of one uvicorn worker process (``vkd serve --workers N``): its config comes
    from ``VKD_SERVE_CONFIG``, set by ``vkd serve``."""
    return create_app(ServeConfig.from_env())
