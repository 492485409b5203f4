"""The fingerprint names the checkpoint (its weight files) and the preprocessing, never the
dtype, device or backend it runs in, and reading it costs no pass over the weights once
the files' hashes are cached."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch

import vkd.models.checkpoint as checkpoint
from vkd.export import OnnxEncoder, export_onnx
from vkd.models import load_encoder
from vkd.models.base import TorchEncoder


@pytest.fixture(autouse=True)
def vkd_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A private hash cache per test, so one test's cached hashes never answer another's."""
    home = tmp_path / "vkd-home"
    monkeypatch.setenv("VKD_HOME", str(home))
    return home


@pytest.fixture
def hash_calls(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The files hashed from their content, in order (the real hashing still runs)."""
    calls: list[str] = []
    real = checkpoint.sha256_file

    def counting(path: str | os.PathLike[str]) -> str:
        calls.append(str(path))
        return real(path)

    monkeypatch.setattr(checkpoint, "sha256_file", counting)
    return calls


def _copy(model: Path, dest: Path) -> Path:
    return Path(shutil.copytree(model, dest, ignore=shutil.ignore_patterns("onnx")))


def _torch(path: Path | str, **options: object) -> TorchEncoder:
    encoder = load_encoder(path, device="cpu", **options)
    assert isinstance(encoder, TorchEncoder)
    return encoder


@pytest.mark.parametrize("fixture", ["tiny_clip", "tiny_siglip", "tiny_qwen3vl"])
def test_fp32_and_bf16_loads_share_a_fingerprint(fixture: str, request: pytest.FixtureRequest) -> None:
    model = request.getfixturevalue(fixture)
    fp32 = _torch(model, dtype="float32")
    bf16 = _torch(model, dtype="bfloat16")
    assert next(bf16.model.parameters()).dtype == torch.bfloat16
    assert fp32.fingerprint == bf16.fingerprint


def test_onnx_export_records_the_torch_fingerprint(tiny_clip: Path, tmp_path: Path) -> None:
    model = _copy(tiny_clip, tmp_path / "clip")
    export = export_onnx(model, int8="none")
    recorded = export.manifest["source"]["fingerprint"]
    assert OnnxEncoder(export.out_dir).fingerprint == recorded
    assert load_encoder(model, prefer="onnx").fingerprint == recorded
    # search opens the model on whatever device it has: bf16 on a GPU, fp32 on a CPU
    assert _torch(model, dtype="float32").fingerprint == recorded
    assert _torch(model, dtype="bfloat16").fingerprint == recorded


def test_second_load_reads_the_cached_hash(tiny_clip: Path, tmp_path: Path, vkd_home: Path,
                                           hash_calls: list[str]) -> None:
    model = _copy(tiny_clip, tmp_path / "clip")
    weights = model / "model.safetensors"
    first = _torch(model).fingerprint
    assert hash_calls == [str(weights.resolve())]
    cached = json.loads((vkd_home / checkpoint.HASH_CACHE_FILE).read_text())["files"][str(weights.resolve())]
    stat = weights.stat()
    assert cached == {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns,
                      "sha256": hashlib.sha256(weights.read_bytes()).hexdigest()}

    assert _torch(model, dtype="bfloat16").fingerprint == first
    assert hash_calls == [str(weights.resolve())], "the second load must not read the weights again"


def _rewrite(path: Path, edit: Callable[[bytes], bytes]) -> None:
    """Rewrite ``path`` with ``edit`` applied, moving its mtime on as a real write would."""
    before = path.stat().st_mtime_ns
    path.write_bytes(edit(path.read_bytes()))
    os.utime(path, ns=(before + 2_000_000_000, before + 2_000_000_000))


def test_changed_weight_file_changes_the_fingerprint(tiny_clip: Path, tmp_path: Path) -> None:
    from safetensors.torch import load_file, save_file

    model = _copy(tiny_clip, tmp_path / "clip")
    before = _torch(model)
    weights = model / "model.safetensors"
    tensors = load_file(weights)
    tensors["logit_scale"] = tensors["logit_scale"] + 0.5
    stamp = weights.stat().st_mtime_ns + 2_000_000_000
    save_file(tensors, weights, metadata={"format": "pt"})
    os.utime(weights, ns=(stamp, stamp))
    after = _torch(model)
    assert after.logit_scale != pytest.approx(before.logit_scale)
    assert after.fingerprint != before.fingerprint
    # ``before`` holds the old weights: the rewrite, though read after it, is not its identity.
    assert before.fingerprint == _torch(tiny_clip).fingerprint


def test_rewritten_identical_file_keeps_the_fingerprint(tiny_clip: Path, tmp_path: Path,
                                                        hash_calls: list[str]) -> None:
    model = _copy(tiny_clip, tmp_path / "clip")
    before = _torch(model).fingerprint
    _rewrite(model / "model.safetensors", lambda data: data)
    assert _torch(model).fingerprint == before
    assert len(hash_calls) == 2, "a new mtime means hashing the content again"


def test_preprocessing_config_is_part_of_the_fingerprint(tiny_clip: Path, tmp_path: Path) -> None:
    model = _copy(tiny_clip, tmp_path / "clip")
    before = _torch(model).fingerprint
    assert _torch(model, max_text_length=16).fingerprint != before
    config_path = model / "preprocessor_config.json"
    config = json.loads(config_path.read_text())
    config["image_mean"] = [0.5, 0.5, 0.5]
    config_path.write_text(json.dumps(config))
    assert _torch(model).fingerprint != before


def test_trained_model_is_identified_by_its_tensors_until_saved(tiny_clip: Path, tmp_path: Path) -> None:
    model = _copy(tiny_clip, tmp_path / "clip")
    encoder = _torch(model)
    original = encoder.fingerprint
    with torch.no_grad():
        next(encoder.model.parameters()).add_(1e-2)
    encoder.invalidate_fingerprint()
    trained = encoder.fingerprint
    assert trained != original
    assert encoder.weights_dir is None

    out = encoder.save(tmp_path / "trained")
    saved = encoder.fingerprint
    assert saved != original
    assert saved == _torch(out, dtype="float32").fingerprint == _torch(out, dtype="bfloat16").fingerprint
    np.testing.assert_array_equal(_torch(out).encode_text(["a dog"]), encoder.encode_text(["a dog"]))


def test_corrupt_cache_is_recomputed_and_repaired(tiny_clip: Path, tmp_path: Path, vkd_home: Path,
                                                  hash_calls: list[str]) -> None:
    model = _copy(tiny_clip, tmp_path / "clip")
    expected = _torch(model).fingerprint
    cache = vkd_home / checkpoint.HASH_CACHE_FILE
    for garbage in ("{not json", '{"format": 1, "files": []}', "[]", ""):
        cache.write_text(garbage)
        assert _torch(model).fingerprint == expected
        assert json.loads(cache.read_text())["format"] == checkpoint.HASH_CACHE_FORMAT
    assert len(hash_calls) == 5
    assert not [p for p in vkd_home.iterdir() if p.name != checkpoint.HASH_CACHE_FILE], "no temporary files left"


def test_unwritable_cache_only_costs_a_rehash(tiny_clip: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                              hash_calls: list[str]) -> None:
    model = _copy(tiny_clip, tmp_path / "clip")
    expected = _torch(model).fingerprint
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("")
    # A home below a regular file cannot be created, even by root.
    monkeypatch.setenv("VKD_HOME", str(blocker / "home"))
    assert _torch(model).fingerprint == expected
    assert _torch(model).fingerprint == expected
    assert len(hash_calls) == 3


def _fake_hub_cache(model: Path, cache: Path, repo_id: str) -> Path:
    """``model``'s files laid out as the hub cache stores a download of ``repo_id``:
    blobs named by their sha256, a snapshot of symlinks, refs/main."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    commit = "0123456789abcdef0123456789abcdef01234567"
    snapshot, blobs = repo / "snapshots" / commit, repo / "blobs"
    snapshot.mkdir(parents=True)
    blobs.mkdir()
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    for path in model.iterdir():
        if path.is_file():
            blob = blobs / hashlib.sha256(path.read_bytes()).hexdigest()
            shutil.copyfile(path, blob)
            (snapshot / path.name).symlink_to(os.path.relpath(blob, snapshot))
    return snapshot


def test_hub_id_is_identified_by_its_snapshot_files(tiny_clip: Path, tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch,
                                                    hash_calls: list[str]) -> None:
    import huggingface_hub.constants

    snapshot = _fake_hub_cache(_copy(tiny_clip, tmp_path / "clip"), tmp_path / "hub", "vkd-test/tiny-clip")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    from_hub = _torch("vkd-test/tiny-clip", dtype="bfloat16")
    assert from_hub.name == "vkd-test/tiny-clip"
    assert from_hub.weights_dir == snapshot.resolve()
    assert hash_calls == [], "a hub blob is named by its sha256: nothing to read"
    assert from_hub.fingerprint == _torch(tmp_path / "clip", dtype="float32").fingerprint
