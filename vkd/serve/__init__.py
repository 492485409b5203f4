"""``vkd serve``: the two-stage search over HTTP, with a web page.

``create_app(ServeConfig(index=...))`` is the FastAPI application; ``vkd serve`` runs it
under uvicorn. With ONNX exports of the student and of the teacher's text tower nothing on
this path imports torch or transformers, so ``pip install "vkd[serve]"`` is enough to run it
(``deploy/README.md``). ``vkd.serve.client`` is the standard-library client that
``vkd search --server URL`` uses.

Names load on first use, so that ``vkd --help`` does not import FastAPI.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from vkd._lazy import lazy_exports

_EXPORTS: dict[str, str] = {
    "ServeConfig": "vkd.serve.config",
    "create_app": "vkd.serve.app",
    "SearchEngine": "vkd.serve.engine",
}

__all__ = ["SearchEngine", "ServeConfig", "create_app"]

if TYPE_CHECKING:  # pragma: no cover
    from vkd.serve.app import create_app
    from vkd.serve.config import ServeConfig
    from vkd.serve.engine import SearchEngine

__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
