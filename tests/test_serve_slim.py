"""The slim runtime: a fresh venv with only ``vkd[serve]`` (no torch, no transformers) serves
the quick demo's index from its ONNX exports, and answers as the full install does.

This is what deploy/Dockerfile installs; containers cannot be built here, so this test is
the check that the image's install works. It builds the venv with pip from the checkout
(with ``-c constraints.txt``), so it needs the package index, and is marked slow.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from serve_helpers import quick_demo

from vkd.retrieval import Retriever

ROOT = Path(__file__).resolve().parents[1]
TORCH_STACK = ("torch", "transformers", "peft", "accelerate", "safetensors", "onnxscript")


@pytest.fixture(scope="module")
def slim_python(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``python`` of a new venv holding ``vkd[serve]`` installed from a copy of the checkout
    (a copy: building in place would leave build/ and egg-info in the work tree)."""
    work = tmp_path_factory.mktemp("slim")
    source = work / "src"
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, source / name)
    shutil.copytree(ROOT / "vkd", source / "vkd", ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    venv = work / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
    python = venv / "bin" / "python"
    install = subprocess.run(
        [str(python), "-m", "pip", "install", "-q", "--disable-pip-version-check", f"{source}[serve]",
         "-c", str(ROOT / "constraints.txt")],
        capture_output=True, text=True, timeout=1200)
    assert install.returncode == 0, install.stdout[-3000:] + install.stderr[-3000:]
    return python


@pytest.mark.slow
def test_the_slim_install_has_no_torch_and_serves_the_demo(slim_python: Path,
                                                           tmp_path_factory: pytest.TempPathFactory) -> None:
    from vkd.bench.serve import ServerProcess
    from vkd.serve.client import search as remote_search

    installed = subprocess.run(
        [str(slim_python), "-c", "import importlib.util as u; print(' '.join(m for m in "
         f"{TORCH_STACK!r} if u.find_spec(m)))"], capture_output=True, text=True, check=True)
    assert installed.stdout.strip() == "", f"the slim venv has {installed.stdout.strip()}"
    demo = quick_demo(tmp_path_factory)
    vkd_command = slim_python.parent / "vkd"
    needs_torch = subprocess.run([str(vkd_command), "export", str(demo / "student-kd" / "model"), "--out",
                                  str(tmp_path_factory.mktemp("no-export"))], capture_output=True, text=True, timeout=120)
    assert needs_torch.returncode == 1 and 'pip install "vkd[full]"' in needs_torch.stderr, needs_torch.stderr

    reference = Retriever(demo / "index", prefer="onnx")  # the full install's answer, same exports
    with ServerProcess(["--index", str(demo / "index")], python=str(slim_python), timeout_s=300) as server:
        url = f"http://127.0.0.1:{server.port}"
        assert server.get("/health")[0] == 200
        for query in ("a dog on a beach", "a boat on a lake"):
            answer = remote_search(url, query=query, k=5)
            expected = reference.search(query, k=5)
            assert [hit["id"] for hit in answer["results"]] == [hit.id for hit in expected]
            assert [hit["score"] for hit in answer["results"]] == pytest.approx([hit.score for hit in expected],
                                                                                abs=1e-5)
            assert answer["reranked"] == "teacher"
        image = sorted((demo / "data" / "images" / "test").glob("*.png"))[0]
        by_image = remote_search(url, image=image, k=3)
        assert by_image["results"][0]["path"] == image.name
        status, _ = server.get(by_image["results"][0]["thumb_url"])
        assert status == 200
        status, stats = server.get("/stats")
        assert status == 200 and stats["torch_loaded"] is False
        assert {model["backend"] for model in stats["models"].values()} == {"onnx"}

        client = subprocess.run([str(vkd_command), "search", "a dog on a beach", "--server", url, "-k", "2"],
                                capture_output=True, text=True, timeout=60)
        assert client.returncode == 0 and len(client.stdout.splitlines()) == 3, client.stderr
