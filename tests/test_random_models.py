"""Random models at the real architectures' sizes (vkd.models.random, `vkd model random`),
`vkd model info`, the random marker (vkd.json) and the builders' module layout."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from conftest import make_images

from vkd.cli import cli
from vkd.models import load_encoder
from vkd.models.random import (
    ARCHS,
    DoesNotFit,
    build_config,
    build_random,
    check_fits,
    count_parameters,
    depths,
    get_arch,
    meta_model,
)

# The full-size counts (tied weights once), as transformers instantiates these configs.
FULL_PARAMETERS = {
    "clip-vit-b32": 151_277_313,
    "clip-vit-b16": 149_620_737,
    "clip-vit-l14": 427_616_513,
    "siglip-base-patch16-224": 203_155_970,
    "qwen3-vl-embedding-2b": 2_127_532_032,
    "qwen3-vl-embedding-8b": 8_767_123_696,
}
GIB = 2**30


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_full_size_configs_give_the_published_parameter_counts(arch: str) -> None:
    spec = get_arch(arch)
    model = meta_model(spec, build_config(spec))
    # counted on the meta device: shapes only, not one weight allocated
    assert {parameter.device.type for parameter in model.parameters()} == {"meta"}
    count = count_parameters(arch)
    assert count == FULL_PARAMETERS[arch]
    # the model cards round: CLIP 151.3M / 149.6M / 427.6M, SigLIP 203.2M, Qwen3-VL ~2.1B / ~8.8B
    assert abs(count - spec.published_parameters) / spec.published_parameters < 0.015


def test_the_archs_have_the_real_shapes() -> None:
    eight = get_arch("qwen3-vl-embedding-8b")
    assert (eight.text_layers, eight.dim, eight.vision_layers, eight.vision["hidden_size"]) == (36, 4096, 27, 1152)
    two = get_arch("qwen3-vl-embedding-2b")
    assert (two.text_layers, two.dim, two.vision_layers, two.vision["hidden_size"]) == (28, 2048, 24, 1024)
    for spec in (two, eight):
        assert (spec.vision["patch_size"], spec.vision["spatial_merge_size"], spec.vocab_size) == (16, 2, 151936)
    assert [get_arch(name).dim for name in ("clip-vit-b32", "clip-vit-b16", "clip-vit-l14")] == [512, 512, 768]
    assert get_arch("siglip-base-patch16-224").dim == 768


def test_depths_truncate_each_stack_and_refuse_what_the_arch_lacks() -> None:
    spec = get_arch("clip-vit-l14")  # text 12, vision 24
    assert depths(spec) == {"text": 12, "vision": 24}
    assert depths(spec, 16) == {"text": 12, "vision": 16}
    assert depths(spec, 2, 5) == {"text": 2, "vision": 5}
    with pytest.raises(ValueError, match="1..24"):
        depths(spec, 25)
    # a truncated Qwen3-VL keeps the DeepStack taps inside its vision depth only
    config = build_config(get_arch("qwen3-vl-embedding-8b"), layers=4, vision_layers=17)
    assert config.vision_config.deepstack_visual_indexes == [8, 16]
    assert config.text_config.num_hidden_layers == 4


def _check_encodes(path: Path, arch: str, dtype: str | None = None) -> None:
    spec = get_arch(arch)
    encoder = load_encoder(path, device="cpu", dtype=dtype)
    text = encoder.encode_text(["a dog on a beach", "two red cars"])
    image = encoder.encode_images(make_images(2, size=(64, 48)))
    assert text.shape == (2, spec.dim) and image.shape == (2, spec.dim) and encoder.dim == spec.dim
    assert np.isfinite(text).all() and np.isfinite(image).all()
    np.testing.assert_allclose(np.linalg.norm(image, axis=1), 1.0, atol=1e-3)
    described = encoder.describe()
    assert described["weights"].startswith(f"random weights: arch {arch}, truncated to ")
    assert described["weights"].endswith(", not a trained model")
    assert described["random"]["arch"] == arch and described["random"]["truncated"] is True
    # the checkpoint's files, not tensors, identify it: nothing was missing from them
    assert encoder.weights_dir == path.resolve()


def _build_with_cli(tmp_path: Path, arch: str, *extra: str) -> Path:
    out = tmp_path / arch
    result = CliRunner().invoke(cli, ["model", "random", "--arch", arch, "--out", str(out), *extra])
    assert result.exit_code == 0, result.output
    full = FULL_PARAMETERS[arch]
    assert f"the full model has {full:,}" in result.output
    return out


def _check_record_and_info(out: Path, arch: str, layers: dict[str, int]) -> None:
    spec = get_arch(arch)
    record = json.loads((out / "vkd.json").read_text())
    assert record["random"] is True and record["arch"] == arch and record["reference"] == spec.reference
    assert record["layers"] == layers
    assert record["full_layers"] == {"text": spec.text_layers, "vision": spec.vision_layers}
    assert record["parameters"] == count_parameters(arch, layers=layers["text"], vision_layers=layers["vision"])
    assert record["full_parameters"] == FULL_PARAMETERS[arch]
    config = json.loads((out / "config.json").read_text())
    assert config["text_config"]["vocab_size"] == spec.vocab_size
    assert config["text_config"]["hidden_size"] == spec.text["hidden_size"]
    tokenizer = json.loads((out / "tokenizer.json").read_text())
    # the tokenizer's vocabulary is the real size, row for row with the embedding table
    assert len(tokenizer["model"]["vocab"]) + len([t for t in tokenizer["added_tokens"]
                                                   if t["content"] not in tokenizer["model"]["vocab"]]) == spec.vocab_size

    result = CliRunner().invoke(cli, ["model", "info", str(out)])
    assert result.exit_code == 0, result.output
    assert f"random weights: arch {arch}" in result.output and "not a trained model" in result.output
    info = json.loads(CliRunner().invoke(cli, ["model", "info", str(out), "--json"]).output)
    assert info["random"] is True and info["parameters"] == record["parameters"]
    assert info["dim"] == spec.dim and info["weights_bytes"] > 0 and info["size_on_disk_bytes"] > info["weights_bytes"]


@pytest.mark.parametrize("arch", ["clip-vit-b32", "clip-vit-b16", "clip-vit-l14", "siglip-base-patch16-224"])
def test_dual_encoder_archs_build_and_encode(tmp_path: Path, arch: str) -> None:
    out = _build_with_cli(tmp_path, arch, "--layers", "1")
    assert json.loads((out / "config.json").read_text())["dtype"] == "float32"  # the published checkpoints'
    _check_record_and_info(out, arch, {"text": 1, "vision": 1})
    _check_encodes(out, arch)


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["qwen3-vl-embedding-2b", "qwen3-vl-embedding-8b"])
def test_qwen3vl_archs_build_and_encode(tmp_path: Path, arch: str) -> None:
    # one text layer and one vision block: the real embedding tables (151936 rows) stay
    out = _build_with_cli(tmp_path, arch, "--layers", "1")
    record = json.loads((out / "vkd.json").read_text())
    assert record["dtype"] == "bfloat16" and record["deepstack_visual_indexes"] == []
    _check_record_and_info(out, arch, {"text": 1, "vision": 1})
    _check_encodes(out, arch, dtype="bfloat16")


def test_sharded_build_is_the_same_model(tmp_path: Path) -> None:
    """Shards and model.safetensors.index.json past the shard size, as save_pretrained writes
    them; the same seed gives the same weights, shards or not."""
    one = build_random("clip-vit-b32", tmp_path / "one", layers=1, vision_layers=2)
    sharded = build_random("clip-vit-b32", tmp_path / "sharded", layers=1, vision_layers=2, max_shard_bytes=50 * 10**6)
    index = json.loads((sharded / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    assert not (sharded / "model.safetensors").exists()
    a, b = load_encoder(one, device="cpu"), load_encoder(sharded, device="cpu")
    mine, theirs = a.model.state_dict(), b.model.state_dict()
    assert mine.keys() == theirs.keys() and all(bool((mine[key] == theirs[key]).all()) for key in mine)
    images = make_images(2)
    np.testing.assert_allclose(a.encode_images(images), b.encode_images(images), atol=1e-6)
    other = build_random("clip-vit-b32", tmp_path / "other", layers=1, vision_layers=2, seed=1)

    def digest(path: Path) -> str:
        return hashlib.sha256((path / "model.safetensors").read_bytes()).hexdigest()

    assert digest(other) != digest(one)


def test_random_model_indexes_and_its_copy_stays_marked(tmp_path: Path) -> None:
    from vkd.indexer import build_index

    model = build_random("siglip-base-patch16-224", tmp_path / "siglip", layers=1)
    folder = tmp_path / "images"
    folder.mkdir()
    for number, image in enumerate(make_images(3)):
        image.save(folder / f"{number}.png")
    result = build_index(folder, tmp_path / "index", student=str(model))
    assert result.added == 3
    encoder = load_encoder(model, device="cpu")
    copy = encoder.save(tmp_path / "copy")  # the same weights: as random as the original
    assert json.loads((copy / "vkd.json").read_text())["arch"] == "siglip-base-patch16-224"
    assert load_encoder(copy, device="cpu").describe()["weights"].startswith("random weights")
    encoder.invalidate_fingerprint()  # what training does: the weights are no longer the files'
    assert "weights" not in encoder.describe()
    encoder.save(tmp_path / "trained")
    assert not (tmp_path / "trained" / "vkd.json").exists()


@pytest.mark.slow
def test_random_model_exports_to_onnx(tmp_path: Path) -> None:
    from vkd.export.onnx_export import export_onnx

    model = build_random("clip-vit-b32", tmp_path / "b32", layers=1)
    export_onnx(model, int8="none")
    onnx = load_encoder(model, prefer="onnx")
    assert type(onnx).__name__ == "OnnxEncoder"
    assert onnx.describe()["weights"].startswith("random weights: arch clip-vit-b32")
    assert CliRunner().invoke(cli, ["model", "info", str(model), "--json"]).exit_code == 0


def test_what_does_not_fit_is_refused_with_what_fits(tmp_path: Path) -> None:
    eight = get_arch("qwen3-vl-embedding-8b")
    machine = {"memory_bytes": 24 * GIB, "free_disk_bytes": 100 * GIB}
    # 8.8B parameters: 17.5 GB in bf16 fits a 24 GiB machine, 35.1 GB in fp32 does not
    assert check_fits(eight, "bfloat16", depths(eight), tmp_path / "m", **machine) == FULL_PARAMETERS[eight.name] * 2
    with pytest.raises(DoesNotFit, match=r"35\.1 GB of weights") as refused:
        check_fits(eight, "float32", depths(eight), tmp_path / "m", **machine)
    assert "What fits: --dtype bf16 (17.5 GB); --layers 18 or fewer" in str(refused.value)
    with pytest.raises(DoesNotFit, match="free on the disk"):
        check_fits(eight, "bfloat16", depths(eight), tmp_path / "m", memory_bytes=24 * GIB, free_disk_bytes=10**9)


def test_cli_refuses_a_build_this_machine_cannot_hold(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import vkd.models.random as random_models

    monkeypatch.setattr(random_models, "physical_memory_bytes", lambda: 500 * 10**6)  # 400 MB for weights
    result = CliRunner().invoke(cli, ["model", "random", "--arch", "clip-vit-b32", "--out", str(tmp_path / "m")])
    assert result.exit_code == 1 and "605.1 MB of weights" in result.output, result.output
    assert "What fits: --dtype bf16 (302.6 MB); --layers 6 or fewer (a truncated copy" in result.output
    monkeypatch.setattr(random_models, "physical_memory_bytes", lambda: 200 * 10**6)  # 160 MB for weights
    result = CliRunner().invoke(cli, ["model", "random", "--arch", "clip-vit-b32", "--out", str(tmp_path / "m")])
    assert result.exit_code == 1 and "What fits: --layers 1 (a truncated copy" in result.output
    assert not (tmp_path / "m").exists()


def test_cli_refuses_a_folder_with_files_and_bad_layers(tmp_path: Path) -> None:
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("mine")
    args = ["model", "random", "--arch", "clip-vit-b32", "--layers", "1"]
    result = CliRunner().invoke(cli, [*args, "--out", str(tmp_path / "full")])
    assert result.exit_code == 2 and "not an empty folder" in result.output
    result = CliRunner().invoke(cli, ["model", "random", "--arch", "clip-vit-b32", "--layers", "13",
                                      "--out", str(tmp_path / "m")])
    assert result.exit_code == 2 and "1..12" in result.output
    help_text = CliRunner().invoke(cli, ["model", "random", "--help"]).output
    assert "qwen3-vl-embedding-8b" in help_text and "bf16" in help_text and "80%" in help_text


def test_tiny_models_are_marked_random(tiny_clip: Path, tiny_qwen3vl: Path) -> None:
    for path, family in ((tiny_clip, "clip"), (tiny_qwen3vl, "qwen3-vl")):
        record = json.loads((path / "vkd.json").read_text())
        assert record["random"] is True and record["family"] == family and record["built_by"] == "vkd model tiny"
    assert load_encoder(tiny_clip, device="cpu").describe()["weights"] == (
        "random weights: arch clip (tiny test size), not a trained model")
    assert "random weights" in CliRunner().invoke(cli, ["model", "info", str(tiny_qwen3vl)]).output


def test_model_info_of_a_trained_looking_directory_and_a_missing_one(tmp_path: Path, tiny_siglip: Path) -> None:
    encoder = load_encoder(tiny_siglip, device="cpu")
    encoder.invalidate_fingerprint()
    plain = encoder.save(tmp_path / "plain")  # as a training run saves its student
    info = json.loads(CliRunner().invoke(cli, ["model", "info", str(plain), "--json"]).output)
    assert info["random"] is False and "not marked random" in info["weights"]
    positions = json.loads((plain / "config.json").read_text())["text_config"]["max_position_embeddings"]
    assert info["parameters"] == encoder.num_parameters() and info["options"] == {"max_text_length": positions}
    result = CliRunner().invoke(cli, ["model", "info", str(tmp_path / "nowhere")])
    assert result.exit_code == 2 and "no such model directory" in result.output


def test_builders_have_no_import_circle() -> None:
    """The encoder module does not import the builders; the builders import the encoder's
    constants only when a Qwen3-VL model is built."""
    code = ("import sys, vkd.models.qwen3vl; assert 'vkd.models.tiny' not in sys.modules, 'qwen3vl imports tiny'\n"
            "import vkd.models.tiny, vkd.models.random, vkd.models.commands\n"
            "import vkd.models.tiny as t; assert callable(t.build_tiny) and callable(t.build_qwen3vl)\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    light = ("import sys, vkd.models.tiny, vkd.models.random, vkd.models.commands\n"
             "heavy = [m for m in ('torch', 'transformers', 'vkd.models.qwen3vl') if m in sys.modules]\n"
             "assert not heavy, heavy\n")
    done = subprocess.run([sys.executable, "-c", light], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
