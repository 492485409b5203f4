"""SigLIP and SigLIP 2 specifics: lowercased text, NaFlex image inputs, and a logit scale
that may start above CLIP's cap of 100."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import make_images

from vkd.models import load_encoder
from vkd.models.hf_dual import HFDualEncoder

CASED = ["A Red Car parked on THE Road", "Two DOGS on a Beach"]


@pytest.fixture(scope="module")
def cased_siglip(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A SigLIP whose tokenizer keeps case, as some hub tokenizers do."""
    from vkd.models.tiny import build_tiny

    return build_tiny("siglip", tmp_path_factory.mktemp("cased-siglip"), seed=3, lowercase_tokenizer=False)


@pytest.fixture(scope="module")
def tiny_siglip2(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from vkd.models.tiny import build_tiny

    return build_tiny("siglip2", tmp_path_factory.mktemp("tiny-siglip2"), seed=0)


def test_siglip_text_is_lowercased_when_its_tokenizer_keeps_case(cased_siglip: Path) -> None:
    encoder = load_encoder(cased_siglip, device="cpu")
    # the tokenizer alone tells the cases apart ...
    assert encoder.tokenizer(CASED[:1])["input_ids"] != encoder.tokenizer([CASED[0].lower()])["input_ids"]
    # ... the encoder does not: the model was trained on lowercased text
    np.testing.assert_array_equal(encoder.encode_text(CASED), encoder.encode_text([t.lower() for t in CASED]))
    assert encoder.preprocessing_config()["lowercase_text"] is True
    assert "lowercased before tokenizing" in encoder.describe()["text_preprocessing"]


def test_clip_text_and_fingerprint_keep_their_case_rules(tiny_clip: Path) -> None:
    encoder = load_encoder(tiny_clip, device="cpu")
    assert not encoder.lowercase_text
    assert "lowercase_text" not in encoder.preprocessing_config()
    assert "text_preprocessing" not in encoder.describe()


def test_siglip2_tiny_model_runs_the_real_classes(tiny_siglip2: Path) -> None:
    """Siglip2Model with NaFlex inputs: images of any aspect ratio, batched or one by one."""
    encoder = load_encoder(tiny_siglip2, device="cpu")
    assert type(encoder.model).__name__ == "Siglip2Model" and encoder.family == "siglip2"
    images = make_images(2, size=(40, 32)) + make_images(1, seed=1, size=(16, 60))
    inputs = encoder.preprocess(images)
    assert {"pixel_values", "pixel_attention_mask", "spatial_shapes"} <= set(inputs)
    batched = encoder.encode_images(images, batch_size=3)
    one_by_one = np.concatenate([encoder.encode_images([image]) for image in images])
    np.testing.assert_allclose(batched, one_by_one, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(batched, axis=1), 1.0, atol=1e-5)
    assert encoder.preprocessing_config()["image"]["max_num_patches"] == 16


def test_siglip2_lowercases_with_the_hub_gemma_tokenizer(tiny_siglip2: Path) -> None:
    """Before transformers 5.2, AutoTokenizer loads SigLIP 2's tokenizer as the Gemma tokenizer
    the checkpoint declares, which keeps case; the encoder lowercases all the same."""
    from transformers import PreTrainedTokenizerFast

    encoder = load_encoder(tiny_siglip2, device="cpu")
    hub_style = PreTrainedTokenizerFast.from_pretrained(tiny_siglip2)  # the declared tokenizer, no wrapper
    assert hub_style("A Dog")["input_ids"] != hub_style("a dog")["input_ids"]
    encoder.tokenizer = hub_style
    np.testing.assert_array_equal(encoder.encode_text(CASED), encoder.encode_text([t.lower() for t in CASED]))
    assert encoder.preprocessing_config()["lowercase_text"] is True


def _with_logit_scale(source: Path, out: Path, value: float) -> Path:
    from transformers import AutoModel

    model = AutoModel.from_pretrained(source)
    with torch.no_grad():
        model.logit_scale.fill_(value)
    model.save_pretrained(out)
    for name in ("tokenizer.json", "tokenizer_config.json", "preprocessor_config.json"):
        (out / name).write_bytes((source / name).read_bytes())
    return out


def test_a_logit_scale_that_starts_above_100_is_kept_and_learns(tiny_siglip: Path, tmp_path: Path) -> None:
    """Pretrained SigLIP starts at exp(logit_scale) ≈ 117: the cap must not cut it to 100 and
    freeze its gradient."""
    encoder = load_encoder(_with_logit_scale(tiny_siglip, tmp_path / "m", math.log(117.0)), device="cpu")
    assert isinstance(encoder, HFDualEncoder)
    encoder.model.logit_scale.requires_grad_(True)
    scale = encoder.logit_scale_tensor()
    assert float(scale.detach()) == pytest.approx(117.0, rel=1e-5)
    scale.backward()
    assert float(encoder.model.logit_scale.grad) == pytest.approx(117.0, rel=1e-5)  # d exp(s)/ds


def test_a_logit_scale_below_the_cap_is_still_capped_at_100(tiny_clip: Path) -> None:
    encoder = load_encoder(tiny_clip, device="cpu")
    assert encoder.logit_scale < 100 and encoder.max_logit_scale == 100.0
    with torch.no_grad():
        encoder.model.logit_scale.fill_(math.log(150.0))
    assert float(encoder.logit_scale_tensor().detach()) == pytest.approx(100.0)


def test_the_onnx_export_lowercases_as_the_torch_encoder_does(cased_siglip: Path, tmp_path: Path) -> None:
    """The export's parity samples include capitals: without the same lowercasing in the ONNX
    tokenizer the export would fail its check, or search would encode queries differently."""
    from vkd.export import export_onnx
    from vkd.export.onnx_encoder import OnnxEncoder

    result = export_onnx(cased_siglip, tmp_path / "onnx", int8="none")
    onnx = OnnxEncoder(result.out_dir)
    torch_encoder = load_encoder(cased_siglip, device="cpu")
    np.testing.assert_allclose(onnx.encode_text(CASED), onnx.encode_text([t.lower() for t in CASED]), atol=1e-6)
    np.testing.assert_allclose(onnx.encode_text(CASED), torch_encoder.encode_text(CASED), atol=1e-4)
    assert onnx.fingerprint == torch_encoder.fingerprint
