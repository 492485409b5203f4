"""A client of ``vkd serve`` on the standard library alone (``urllib``).

``vkd search --server URL`` runs this instead of loading an index and models, so it must
start fast: it imports nothing but the standard library (no numpy, pyarrow or HTTP
library), which a test checks.
"""

from __future__ import annotations

import json
import mimetypes
import os
import urllib.error
import urllib.parse
import urllib.request
import uuid
from typing import Any

DEFAULT_TIMEOUT = 60.0


class ServerError(Exception):
    """The server answered with an error, or could not be reached (``status`` 0).

    ``detail`` is the server's one-line explanation (its JSON ``detail``) or ours.
    """

    def __init__(self, status: int, detail: str) -> None:
        super().__init__(f"{status}: {detail}" if status else detail)
        self.status = status
        self.detail = detail


def _base(server: str) -> str:
    server = server.strip()
    if "://" not in server:
        server = f"http://{server}"
    parsed = urllib.parse.urlsplit(server)
    if parsed.scheme not in ("http", "https") or not parsed.netloc:
        raise ValueError(f"--server {server!r}: give the server's URL, e.g. http://127.0.0.1:8000")
    return server.rstrip("/")


def _multipart(fields: list[tuple[str, str]], files: list[tuple[str, str, bytes]]) -> tuple[bytes, str]:
    """A multipart/form-data body: text ``fields`` (a name may repeat) and ``files``
    (field, file name, bytes), in order."""
    boundary = f"vkd-{uuid.uuid4().hex}"
    parts = []
    for name, value in fields:
        parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n{value}\r\n'.encode())
    for file_field, filename, data in files:
        safe_name = filename.replace('"', "_").replace("\r", "_").replace("\n", "_")
        media = mimetypes.guess_type(filename)[0] or "application/octet-stream"
        parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="{file_field}"; filename="{safe_name}"\r\n'
                     f"Content-Type: {media}\r\n\r\n".encode("utf-8", "surrogateescape") + data + b"\r\n")
    parts.append(f"--{boundary}--\r\n".encode())
    return b"".join(parts), f"multipart/form-data; boundary={boundary}"


def search(
    server: str,
    *,
    query: str | None = None,
    image: str | os.PathLike[str] | None = None,
    k: int | None = None,
    candidates: int | None = None,
    rerank: bool | None = None,
    api_key: str | None = None,
    timeout: float = DEFAULT_TIMEOUT,
    images: list[tuple[str | os.PathLike[str], float]] | None = None,
    terms: list[tuple[str, float]] | None = None,
    options: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """One search on a running server: the response JSON (see ``vkd.serve.app.SearchResponse``).

    Text goes as ``GET /search``, image files as a multipart ``POST /search``. ``query`` is
    in the server's compact syntax ("2:cat + dog - grass"); ``image`` is one image of weight
    1, ``images`` more as (path, weight); ``terms`` text terms as (text, weight), sent
    literally (JSON ``terms``); ``options`` are the server's other query fields
    (filters, ``min_score``, ``raw``). Options left None take the server's defaults. Raises
    ``ServerError`` with the server's explanation.
    """
    files = ([(image, 1.0)] if image is not None else []) + list(images or [])
    if query is None and not files and not terms:
        raise ValueError("give a text query or an image")
    base = _base(server)
    params: dict[str, Any] = {name: value for name, value in (("k", k), ("candidates", candidates))
                              if value is not None}
    if rerank is not None:
        params["rerank"] = "true" if rerank else "false"
    for name, value in (options or {}).items():
        if value is not None:
            params[name] = ("true" if value else "false") if isinstance(value, bool) else value
    headers = {"Accept": "application/json", "User-Agent": "vkd-search"}
    if api_key:
        headers["Authorization"] = f"Bearer {api_key}"
    typed = {**params, "rerank": rerank} if rerank is not None else dict(params)
    typed.update({name: value for name, value in (options or {}).items() if value is not None})
    text_terms = [{"text": text, "weight": float(weight)} for text, weight in terms or []]
    if not files and text_terms:
        body_json = {**typed, "terms": text_terms, **({"q": query} if query is not None else {})}
        request = urllib.request.Request(f"{base}/search", data=json.dumps(body_json).encode("utf-8", "surrogatepass"),
                                         method="POST", headers={**headers, "Content-Type": "application/json"})
    elif not files:
        try:
            encoded = urllib.parse.urlencode({"q": query, **params})
        except UnicodeEncodeError:
            raise ServerError(0, "the query is not valid UTF-8 text; check the terminal's encoding "
                                 "(LANG=C.UTF-8) or the text's source") from None
        request = urllib.request.Request(f"{base}/search?{encoded}", headers=headers, method="GET")
    else:
        fields = [(name, str(value)) for name, value in params.items()]
        if query is not None:
            fields.append(("q", query))
        if text_terms:
            fields.append(("terms", json.dumps(text_terms)))
        uploads = []
        for path_like, _ in files:
            path = os.fspath(path_like)
            with open(path, "rb") as handle:
                uploads.append(("image", os.path.basename(path), handle.read()))
        if any(float(weight) != 1.0 for _, weight in files):  # a server before weights refuses the field
            fields += [("image_weight", repr(float(weight))) for _, weight in files]
        try:
            body, content_type = _multipart(fields, uploads)
        except UnicodeEncodeError:
            raise ServerError(0, "the query is not valid UTF-8 text; check the terminal's encoding "
                                 "(LANG=C.UTF-8) or the text's source") from None
        request = urllib.request.Request(f"{base}/search", data=body, method="POST",
                                         headers={**headers, "Content-Type": content_type})
    return _send(request, base, timeout)


def _send(request: urllib.request.Request, base: str, timeout: float) -> dict[str, Any]:
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:  # noqa: S310 - the user's own server URL
            return json.loads(response.read())
    except urllib.error.HTTPError as error:
        raise ServerError(error.code, _detail(error)) from None
    except urllib.error.URLError as error:
        reason = error.reason
        why = getattr(reason, "strerror", None) or str(reason)
        raise ServerError(0, f"cannot reach {base} ({why}): is `vkd serve` running there? (start it with "
                             "`vkd serve --index DIR`)") from None
    except TimeoutError:
        raise ServerError(0, f"{base} did not answer within {timeout:.0f} s "
                             "(--timeout)") from None
    except json.JSONDecodeError:
        raise ServerError(0, f"{base} answered with something other than JSON: is it a vkd server?") from None


def _detail(error: urllib.error.HTTPError) -> str:
    try:
        body = error.read()
        detail = json.loads(body).get("detail")
    except (ValueError, AttributeError, OSError):
        detail = None
    return detail if isinstance(detail, str) else f"{error.code} {error.reason}"
