"""Shared pieces of the serve tests: the quick demo as a realistic index, built once per
session, and a client for an app served in-process."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest


def quick_demo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``vkd demo --quick``'s output (index, student with its ONNX export, teacher), with the
    teacher exported to ONNX too, so that the server runs without torch.

    Kept in the session's base temporary folder, so every serve test module of the session
    shares one build (~20 s) rather than one each.
    """
    from vkd.demo import run_demo
    from vkd.export import export_onnx

    out = tmp_path_factory.getbasetemp() / "serve-quick-demo"
    if not (out / "results.json").is_file():
        run_demo(out, quick=True)
    teacher = out / "teacher" / "model"
    if not (teacher / "onnx" / "export.json").is_file():
        export_onnx(teacher)
    return out


@contextlib.contextmanager
def served(retriever: Any = None, **options: Any) -> Iterator[Any]:
    """A ``TestClient`` on ``create_app(ServeConfig(**options))``, models loaded.

    ``retriever``: an open ``Retriever`` to serve (several apps can share one) instead of
    loading the models again.
    """
    from fastapi.testclient import TestClient

    from vkd.serve import SearchEngine, ServeConfig, create_app

    config = ServeConfig(**options)
    app = create_app(config, engine=SearchEngine(config, retriever=retriever))
    with TestClient(app) as client:
        assert app.state.engine.wait_ready(120), app.state.engine.error
        yield client
