"""Loading a model: names that open from anywhere, and nothing from a checkpoint runs as
code (pickle weights, remote code) unless the caller asks for it."""

from __future__ import annotations

import inspect
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from vkd.export import OnnxEncoder, export_onnx
from vkd.models import detect_family, load_encoder
from vkd.models.hf_dual import HFDualEncoder
from vkd.models.qwen3vl import Qwen3VLEncoder


@pytest.fixture(autouse=True)
def vkd_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VKD_HOME", str(tmp_path / "vkd-home"))


def _copy(model: Path, dest: Path) -> Path:
    return Path(shutil.copytree(model, dest, ignore=shutil.ignore_patterns("onnx")))


# -- names ---------------------------------------------------------------------------------


def test_relative_path_is_named_absolutely(tiny_clip: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _copy(tiny_clip, tmp_path / "work" / "models" / "clip")
    monkeypatch.chdir(tmp_path / "work")
    encoder = load_encoder("models/clip", device="cpu")
    assert encoder.name == str((tmp_path / "work" / "models" / "clip").resolve())
    assert Path(encoder.name).is_absolute()

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    reopened = load_encoder(encoder.name, device="cpu")
    assert reopened.name == encoder.name and reopened.fingerprint == encoder.fingerprint


def test_backends_and_onnx_name_relative_paths_absolutely(tiny_clip: Path, tiny_qwen3vl: Path, tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    _copy(tiny_clip, tmp_path / "clip")
    _copy(tiny_qwen3vl, tmp_path / "qwen")
    monkeypatch.chdir(tmp_path)
    dual = HFDualEncoder.from_pretrained("clip", device=torch.device("cpu"), dtype=torch.float32)
    assert dual.name == str((tmp_path / "clip").resolve())
    assert Qwen3VLEncoder.from_pretrained("qwen").name == str((tmp_path / "qwen").resolve())

    export_onnx("clip", int8="none")
    assert load_encoder("clip", prefer="onnx").name == dual.name
    assert OnnxEncoder("clip/onnx").name == dual.name


def test_hub_ids_stay_ids(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from vkd.models.checkpoint import resolve_model_name

    monkeypatch.chdir(tmp_path)
    assert resolve_model_name("openai/clip-vit-base-patch32") == "openai/clip-vit-base-patch32"


# -- pickle weights -------------------------------------------------------------------------


@pytest.fixture
def pickle_only(tiny_clip: Path, tmp_path: Path) -> Path:
    """tiny CLIP with its weights as pytorch_model.bin only (transformers 5 writes
    safetensors whatever ``safe_serialization`` says, so the pickle is written directly)."""
    from safetensors.torch import load_file

    model = _copy(tiny_clip, tmp_path / "pickled")
    torch.save(load_file(model / "model.safetensors"), model / "pytorch_model.bin")
    (model / "model.safetensors").unlink()
    return model


def test_pickle_only_weights_are_refused_by_default(pickle_only: Path) -> None:
    with pytest.raises(ValueError) as raised:
        load_encoder(pickle_only, device="cpu")
    message = str(raised.value)
    assert str(pickle_only.resolve()) in message
    assert "pytorch_model.bin" in message and "run arbitrary code" in message
    assert "safetensors" in message and "allow_pickle=True" in message


def test_pickle_only_weights_load_when_allowed(pickle_only: Path, tiny_clip: Path) -> None:
    encoder = load_encoder(pickle_only, device="cpu", allow_pickle=True)
    safe = load_encoder(tiny_clip, device="cpu")
    np.testing.assert_allclose(encoder.encode_text(["a dog"]), safe.encode_text(["a dog"]), atol=1e-6)
    # the pickle is its own checkpoint file; converting it is what the error message advises
    converted = load_encoder(encoder.save(pickle_only.parent / "converted"), device="cpu")
    assert (Path(converted.name) / "model.safetensors").is_file()
    np.testing.assert_allclose(converted.encode_text(["a dog"]), encoder.encode_text(["a dog"]), atol=1e-6)


def test_backends_refuse_pickle_too(pickle_only: Path) -> None:
    with pytest.raises(ValueError, match="allow_pickle=True"):
        HFDualEncoder.from_pretrained(pickle_only, device=torch.device("cpu"), dtype=torch.float32)


def test_safetensors_win_over_pickle_when_both_exist(tiny_clip: Path, tmp_path: Path) -> None:
    model = _copy(tiny_clip, tmp_path / "both")
    (model / "pytorch_model.bin").write_bytes(b"not a pickle: must never be opened")
    assert load_encoder(model, device="cpu").dim == load_encoder(tiny_clip, device="cpu").dim


# -- remote code ------------------------------------------------------------------------------


@pytest.mark.parametrize("load", [load_encoder, HFDualEncoder.from_pretrained, Qwen3VLEncoder.from_pretrained])
def test_remote_code_is_off_by_default(load: object) -> None:
    assert inspect.signature(load).parameters["trust_remote_code"].default is False
    assert inspect.signature(load).parameters["allow_pickle"].default is False


def test_auto_map_config_is_refused_without_trust_remote_code(tiny_clip: Path, tmp_path: Path) -> None:
    model = _copy(tiny_clip, tmp_path / "custom")
    config = json.loads((model / "config.json").read_text())
    config["auto_map"] = {"AutoModel": "modeling_custom.CustomCLIPModel"}
    (model / "config.json").write_text(json.dumps(config))
    # would it run, this file proves it: it raises on import
    (model / "modeling_custom.py").write_text("raise RuntimeError('remote code ran')\n")
    with pytest.raises(ValueError, match=r"auto_map.*trust_remote_code=True"):
        load_encoder(model, device="cpu")
    with pytest.raises(ValueError, match="auto_map"):
        detect_family(model)
