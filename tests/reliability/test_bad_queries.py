"""Every bad CLI argument and query gets one clear line and a non-zero exit, never a traceback;
model names in the index resolve from any directory (issue 10, defects 6 and 11)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from click.testing import CliRunner

from reliability.conftest import plain_folder
from vkd.cli import cli
from vkd.indexer import Index, build_index
from vkd.retrieval.retriever import MAX_QUERY_CHARS, QueryError, Retriever


@pytest.fixture(scope="module")
def index_dir(tmp_path_factory: pytest.TempPathFactory, tiny_clip: Path) -> Path:
    root = tmp_path_factory.mktemp("bad-queries")
    out = root / "idx"
    build_index(plain_folder(root / "imgs", 6), out, student=str(tiny_clip), device="cpu", workers=1)
    return out


NOT_UTF8 = os.fsdecode(b"a dog \xff on a beach")  # what a shell argument with a Latin-1 byte becomes


@pytest.mark.parametrize("query, words", [
    ("", "empty query"),
    ("   \t\n", "empty query"),
    (NOT_UTF8, "not valid UTF-8"),
    ("x" * 100_000, f"the limit is {MAX_QUERY_CHARS}"),
])
def test_bad_text_queries(index_dir: Path, query: str, words: str) -> None:
    with pytest.raises(QueryError, match=words):
        Retriever(index_dir, rerank=False, prefer="torch").search(query)
    result = CliRunner().invoke(cli, ["search", query, "--index", str(index_dir)])
    assert result.exit_code == 2 and words in result.output and "Traceback" not in result.output


def test_a_long_query_within_the_limit_is_searched(index_dir: Path) -> None:
    hits = Retriever(index_dir, rerank=False, prefer="torch").search("a dog " * 300, k=3)
    assert len(hits) == 3


@pytest.mark.parametrize("args, words", [
    (["search", "a dog", "-k", "0"], "-k"),
    (["search", "a dog", "-k", "abc"], "-k"),
    (["search", "a dog", "-k", "20", "--candidates", "5"], "--candidates"),
    (["search", "a dog", "--image", "x.jpg"], "x.jpg"),
    (["search"], "give a text query"),
    (["search", "a dog + "], "--raw"),  # an empty term of a combined query (text + --image combine, issue 16)
    (["search", "a dog", "--index", "NOWHERE"], "manifest"),
    (["search", "a dog", "--prefer", "gpu"], "--prefer"),
    (["index", "IMAGES", "--model", "MODEL", "--memory-budget", "lots"], "memory budget"),
    (["index", "IMAGES", "--model", "MODEL", "--shard-size", "0"], "--shard-size"),
    (["index", "IMAGES", "--model", "MODEL", "--index-type", "lsh"], "--index-type"),
    (["index", "IMAGES"], "--model"),
    (["index", "NOWHERE", "--model", "MODEL"], "NOWHERE"),
    (["index", "IMAGES", "--model", "NOWHERE-MODEL", "--out", "OUT"], "NOWHERE-MODEL"),
    (["index", "info", "NOWHERE"], "NOWHERE"),
    (["index", "verify", "IMAGES"], "manifest"),
    (["index", "compact", "IMAGES"], "manifest"),
])
def test_bad_cli_arguments(tmp_path: Path, index_dir: Path, args: list[str], words: str) -> None:
    images = plain_folder(tmp_path / "imgs", 1)
    (tmp_path / "IMG").write_bytes(b"")
    substitutions = {"IMAGES": str(images), "OUT": str(tmp_path / "out"), "IMG": str(tmp_path / "IMG")}
    args = [substitutions.get(arg, arg) for arg in args]
    if args[0] == "search" and "--index" not in args:
        args += ["--index", str(index_dir)]
    env = {"HF_HUB_OFFLINE": "1"}
    result = CliRunner().invoke(cli, args, env=env)
    assert result.exit_code in (1, 2), (args, result.output)
    assert words in result.output and "Traceback" not in result.output, (args, result.output)


def test_relative_model_paths_are_stored_so_that_they_resolve_anywhere(
        tmp_path: Path, tiny_clip: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    images = plain_folder(tmp_path / "imgs", 3)
    monkeypatch.chdir(tiny_clip.parent)
    built = CliRunner().invoke(cli, ["index", str(images), "--model", tiny_clip.name, "--out", str(tmp_path / "idx"),
                                     "--no-progress", "--device", "cpu"])
    assert built.exit_code == 0, built.output
    assert Index.open(tmp_path / "idx").student["name"] == str(tiny_clip.resolve())
    monkeypatch.chdir(tmp_path)
    found = CliRunner().invoke(cli, ["search", "a photo", "--index", "idx", "--no-rerank", "--prefer", "torch"])
    assert found.exit_code == 0, found.output
