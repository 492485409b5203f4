"""The dual-encoder backend (CLIP, SigLIP) and the loader, on tiny random models."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from vkd.cli import cli
from vkd.models import detect_family, load_encoder
from vkd.models.base import weights_digest

TEXTS = ["a dog on a beach", "two red cars parked on a road at night", "", "a small brown puppy by the sea"]


@pytest.mark.parametrize("fixture", ["tiny_clip", "tiny_siglip"])
def test_forward_pass_is_normalised_float32(fixture: str, request: pytest.FixtureRequest, images) -> None:
    encoder = load_encoder(request.getfixturevalue(fixture), device="cpu")
    text = encoder.encode_text(TEXTS, batch_size=3)
    image = encoder.encode_images(images, batch_size=3)
    assert text.shape == (len(TEXTS), encoder.dim) and image.shape == (len(images), encoder.dim)
    assert text.dtype == np.float32 and image.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(text, axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(image, axis=1), 1.0, atol=1e-5)
    assert not np.allclose(text[0], text[1]), "different captions must give different vectors"


@pytest.mark.parametrize("fixture", ["tiny_clip", "tiny_siglip"])
def test_batching_does_not_change_vectors(fixture: str, request: pytest.FixtureRequest, images) -> None:
    encoder = load_encoder(request.getfixturevalue(fixture), device="cpu")
    # CLIP pads to the longest caption in the batch; the pooled token must not depend on it.
    one_by_one = np.concatenate([encoder.encode_text([t]) for t in TEXTS])
    np.testing.assert_allclose(encoder.encode_text(TEXTS, batch_size=4), one_by_one, atol=1e-5)
    np.testing.assert_allclose(
        encoder.encode_images(images, batch_size=4),
        np.concatenate([encoder.encode_images([i]) for i in images]), atol=1e-5,
    )


def test_encode_images_accepts_paths(tiny_clip: Path, images, tmp_path: Path) -> None:
    encoder = load_encoder(tiny_clip, device="cpu")
    paths = []
    for i, image in enumerate(images):
        paths.append(tmp_path / f"{i}.png")
        image.save(paths[-1])
    np.testing.assert_allclose(encoder.encode_images(paths), encoder.encode_images(images), atol=1e-6)


@pytest.mark.parametrize("fixture", ["tiny_clip", "tiny_siglip"])
def test_save_then_load_gives_identical_vectors(fixture: str, request: pytest.FixtureRequest, images, tmp_path) -> None:
    encoder = load_encoder(request.getfixturevalue(fixture), device="cpu")
    reloaded = load_encoder(encoder.save(tmp_path / "copy"), device="cpu")
    np.testing.assert_array_equal(reloaded.encode_text(TEXTS), encoder.encode_text(TEXTS))
    np.testing.assert_array_equal(reloaded.encode_images(images), encoder.encode_images(images))
    assert reloaded.fingerprint == encoder.fingerprint


def test_model_directory_opens_with_plain_transformers(tiny_clip: Path) -> None:
    from transformers import AutoModel, AutoTokenizer

    model = AutoModel.from_pretrained(tiny_clip)
    tokenizer = AutoTokenizer.from_pretrained(tiny_clip)
    encoder = load_encoder(tiny_clip, device="cpu")
    with torch.no_grad():
        features = model.get_text_features(**tokenizer(["a dog"], return_tensors="pt")).pooler_output
    np.testing.assert_allclose(
        torch.nn.functional.normalize(features, dim=-1).numpy(), encoder.encode_text(["a dog"]), atol=1e-6
    )


def test_fingerprint_follows_weights(tiny_clip: Path) -> None:
    encoder = load_encoder(tiny_clip, device="cpu")
    before = encoder.fingerprint
    with torch.no_grad():
        next(encoder.model.parameters()).add_(1e-3)
    assert encoder.fingerprint == before, "cached until invalidated"
    encoder.invalidate_fingerprint()
    assert encoder.fingerprint != before
    assert weights_digest(encoder.model) != weights_digest(load_encoder(tiny_clip, device="cpu").model)


def test_logit_scale_is_the_models_own(tiny_clip: Path) -> None:
    encoder = load_encoder(tiny_clip, device="cpu")
    assert encoder.logit_scale == pytest.approx(float(encoder.model.logit_scale.detach().exp()))


def test_unsupported_family_lists_what_is_supported(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(ValueError, match=r"'bert' is not supported.*clip.*qwen3_vl.*siglip"):
        detect_family(tmp_path)


def test_directory_without_config_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="no config.json"):
        load_encoder(tmp_path)


def test_cli_tiny_writes_a_loadable_model(tmp_path: Path) -> None:
    result = CliRunner().invoke(cli, ["model", "tiny", "--family", "siglip", "--out", str(tmp_path / "m")])
    assert result.exit_code == 0, result.output
    assert "siglip" in result.output and "dim=32" in result.output
    assert load_encoder(tmp_path / "m", device="cpu").family == "siglip"


def test_cli_help_is_fast_and_lists_commands() -> None:
    import subprocess
    import sys

    code = "import sys; from vkd.cli import cli; print(sorted(m for m in ('torch','transformers') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]", "the CLI entry point must not import torch or transformers"
    result = CliRunner().invoke(cli, ["--help"])
    assert result.exit_code == 0 and "distill" in result.output and "vkd demo" in result.output


@pytest.mark.parametrize("args", [["--help"], ["model", "--help"], ["data", "--help"], ["data", "synth", "--help"]])
def test_help_paths_load_no_heavy_library(args: list[str]) -> None:
    # Listing the commands used to import every part's package (and numpy, PIL, pyarrow with it).
    import subprocess
    import sys

    code = (
        "import sys\nfrom vkd.cli import cli\n"
        f"try:\n    cli({args!r}, prog_name='vkd')\nexcept SystemExit:\n    pass\n"
        "print(sorted(m for m in ('torch', 'transformers', 'numpy', 'PIL', 'pyarrow') if m in sys.modules), "
        "file=sys.stderr)"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert "Usage: vkd" in done.stdout
    assert done.stderr.strip().splitlines()[-1] == "[]"


def test_cli_tiny_takes_a_caption_corpus_and_dimensions(tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text(json.dumps({"image": "a.png", "text": ["a zebra with a xylophone"] * 3}) + "\n"
                     + json.dumps({"image": "b.png", "text": "the xylophone of a zebra"}) + "\n")
    args = ["model", "tiny", "--family", "clip", "--hidden", "48", "--heads", "4", "--layers", "1", "--proj", "24",
            "--image-size", "48", "--patch-size", "16"]
    result = CliRunner().invoke(cli, [*args, "--corpus", str(pairs), "--out", str(tmp_path / "m")])
    assert result.exit_code == 0, result.output
    encoder = load_encoder(tmp_path / "m", device="cpu")
    text, vision = encoder.model.config.text_config, encoder.model.config.vision_config
    assert encoder.dim == 24 and (text.hidden_size, text.num_hidden_layers, text.num_attention_heads) == (48, 1, 4)
    assert (vision.hidden_size, vision.image_size, vision.patch_size) == (48, 48, 16)
    # the captions' words became whole tokens (<s> word </s>); without the corpus they are split
    assert len(AutoTokenizer.from_pretrained(tmp_path / "m")("xylophone")["input_ids"]) == 3
    assert CliRunner().invoke(cli, [*args, "--out", str(tmp_path / "plain")]).exit_code == 0
    assert len(AutoTokenizer.from_pretrained(tmp_path / "plain")("xylophone")["input_ids"]) > 3


@pytest.mark.parametrize(("args", "message"), [
    (["--family", "clip", "--hidden", "30", "--heads", "4"], "--hidden 30 is not a multiple of --heads 4"),
    (["--family", "clip", "--image-size", "40", "--patch-size", "16"],
     "--image-size 40 is not a multiple of --patch-size 16"),
    (["--family", "siglip", "--proj", "16"], "--proj does not apply to siglip"),
    (["--family", "qwen3-vl", "--image-size", "64"], "--image-size does not apply to qwen3-vl"),
    (["--family", "clip", "--corpus", "missing.jsonl"], "'missing.jsonl' does not exist"),
])
def test_cli_tiny_rejects_dimensions_that_do_not_fit(tmp_path: Path, args: list[str], message: str) -> None:
    result = CliRunner().invoke(cli, ["model", "tiny", *args, "--out", str(tmp_path / "m")])
    assert result.exit_code == 2 and message in result.output, result.output
    assert not (tmp_path / "m").exists()


def test_cli_tiny_help_has_examples() -> None:
    result = CliRunner().invoke(cli, ["model", "tiny", "--help"])
    assert "--corpus pairs.jsonl" in result.output and "--hidden 64" in result.output
