"""Qwen3-VL-Embedding backend on a tiny random Qwen3-VL (real patch/merge sizes)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import make_images
from PIL import Image

from vkd.models import load_encoder
from vkd.models.qwen3vl import (
    DEFAULT_INSTRUCTION,
    DEFAULT_QUERY_INSTRUCTION,
    LORA_TARGET_MODULES,
    MAX_PIXELS,
    MIN_PIXELS,
    Qwen3VLEncoder,
    normalize_instruction,
    smart_resize,
)

TEXTS = ["a dog on a beach with a red ball", "cat", ""]


@pytest.fixture(scope="module")
def encoder(tiny_qwen3vl: Path) -> Qwen3VLEncoder:
    return load_encoder(tiny_qwen3vl, device="cpu")


def _mixed_items() -> list[tuple[Image.Image | None, str | None]]:
    """Inputs of different lengths and kinds, so a batch needs padding."""
    first, second = make_images(2, seed=3)
    return [(first, "a dog"), (second.resize((50, 100)), None), (None, "a cat sitting on grass near the lake"), (None, "")]


def test_forward_through_load_encoder(encoder: Qwen3VLEncoder, images: list[Image.Image]) -> None:
    assert isinstance(encoder, Qwen3VLEncoder)
    assert (encoder.family, encoder.dim) == ("qwen3_vl", 32)
    for vectors, n in ((encoder.encode_text(TEXTS), 3), (encoder.encode_images(images), 4)):
        assert vectors.shape == (n, 32) and vectors.dtype == np.float32
        np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
        assert np.abs(vectors[0] - vectors[1]).max() > 1e-3  # different inputs, different vectors
    assert encoder.logit_scale == pytest.approx(20.0)
    assert float(encoder.logit_scale_tensor()) == pytest.approx(20.0)


def test_embedding_is_differentiable(encoder: Qwen3VLEncoder, images: list[Image.Image]) -> None:
    encoder.model.zero_grad()
    loss = encoder.embed_text(encoder.tokenize(["a dog"])).sum() + encoder.embed_images(encoder.preprocess(images[:1])).sum()
    loss.backward()
    assert encoder.model.language_model.layers[0].self_attn.q_proj.weight.grad.abs().sum() > 0
    assert encoder.model.visual.blocks[0].attn.qkv.weight.grad.abs().sum() > 0
    encoder.model.zero_grad()


def test_prompt_comes_from_the_chat_template(encoder: Qwen3VLEncoder) -> None:
    assert encoder.prompt("a dog", image=True) == (
        "<|im_start|>system\nRepresent the user's input.<|im_end|>\n"
        "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>a dog<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    assert encoder.prompt("", image=False) == (  # text alone is a query: the query instruction
        f"<|im_start|>system\n{DEFAULT_QUERY_INSTRUCTION}<|im_end|>\n"
        "<|im_start|>user\nNULL<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    assert encoder.prompt(None, image=True, instruction="  Find the matching photo ").startswith(
        "<|im_start|>system\nFind the matching photo.<|im_end|>\n<|im_start|>user\n"
        "<|vision_start|><|image_pad|><|vision_end|><|im_end|>\n"
    )


def test_instruction_normalisation() -> None:
    assert normalize_instruction("  Retrieve images relevant to the query  ") == "Retrieve images relevant to the query."
    assert normalize_instruction("Is this a dog?") == "Is this a dog?"
    assert normalize_instruction("Represent the user's input.") == "Represent the user's input."
    assert normalize_instruction("   ") == normalize_instruction(None) == "Represent the user's input."


def test_image_tokens_expand_to_the_merged_grid(encoder: Qwen3VLEncoder) -> None:
    image = make_images(1, size=(40, 32))[0]  # 32x40 -> min bound -> 64x96 -> grid 4x6 -> 6 tokens
    inputs = encoder.preprocess([image])
    assert inputs["image_grid_thw"].tolist() == [[1, 4, 6]]
    assert inputs["pixel_values"].shape == (24, 3 * 2 * 16 * 16)
    expected = encoder.prompt(None, image=True).replace("<|image_pad|>", "<|image_pad|>" * 6)
    assert encoder.processor.tokenizer.decode(inputs["input_ids"][0]) == expected  # no extra special tokens
    assert inputs["mm_token_type_ids"].sum() == 6


def test_resize_bounds(encoder: Qwen3VLEncoder) -> None:
    small = encoder.processor.resize(Image.new("RGB", (12, 9)))
    assert small.width % 32 == 0 and small.height % 32 == 0
    assert MIN_PIXELS <= small.width * small.height < MIN_PIXELS * 2
    assert small.size == (96, 64)  # 4:3 kept as closely as the 32-grid allows

    huge = encoder.processor.resize(Image.new("RGB", (4000, 3000)))
    assert huge.width % 32 == 0 and huge.height % 32 == 0
    assert MAX_PIXELS * 0.9 <= huge.width * huge.height <= MAX_PIXELS
    assert huge.width / huge.height == pytest.approx(4 / 3, rel=0.03)

    fits = Image.new("RGB", (320, 224))
    assert encoder.processor.resize(fits).size == (320, 224)  # already on the grid, in bounds: unchanged
    assert smart_resize(6000, 40) == (6016, 32)  # a narrow side never rounds below one 32-cell
    with pytest.raises(ValueError, match="aspect ratio"):
        smart_resize(10_000, 40)


@pytest.mark.parametrize("kind", ["mixed", "text"])
@pytest.mark.parametrize("padding_side", ["left", "right"])
def test_pooling_is_the_last_real_tokens_hidden_state(tiny_qwen3vl: Path, padding_side: str, kind: str) -> None:
    encoder = Qwen3VLEncoder.from_pretrained(tiny_qwen3vl, padding_side=padding_side)
    items = _mixed_items() if kind == "mixed" else [(None, text) for text in TEXTS]
    inputs = encoder.prepare(items)
    mask = inputs["attention_mask"]
    assert (mask[:, 0] == 0).any() if padding_side == "left" else (mask[:, -1] == 0).any()
    with torch.no_grad():
        pooled = encoder.embed(inputs)
        hidden = encoder.model(**inputs).last_hidden_state
        for row, item in enumerate(items):
            last = mask.shape[1] - 1 if padding_side == "left" else int(mask[row].sum()) - 1
            by_hand = torch.nn.functional.normalize(hidden[row, last], dim=-1)
            torch.testing.assert_close(pooled[row], by_hand, atol=1e-5, rtol=0)
            alone = encoder.prepare([item])  # no padding at all: the last token is the last position
            unpadded = encoder.model(**alone).last_hidden_state[0, -1]
            torch.testing.assert_close(pooled[row], torch.nn.functional.normalize(unpadded, dim=-1), atol=1e-5, rtol=0)


def test_padding_side_does_not_change_vectors(tiny_qwen3vl: Path, encoder: Qwen3VLEncoder) -> None:
    left = Qwen3VLEncoder.from_pretrained(tiny_qwen3vl, padding_side="left")
    np.testing.assert_allclose(left.encode_text(TEXTS), encoder.encode_text(TEXTS), atol=1e-5)
    images, texts = zip(*_mixed_items(), strict=True)
    np.testing.assert_allclose(
        left.encode_multimodal(images, texts), encoder.encode_multimodal(images, texts), atol=1e-5
    )
    assert left.fingerprint == encoder.fingerprint


def test_encode_multimodal_matches_single_modalities(encoder: Qwen3VLEncoder, images: list[Image.Image]) -> None:
    pairs = encoder.encode_multimodal([images[0], None, images[1]], [None, "a dog", "a dog"])
    np.testing.assert_allclose(pairs[0], encoder.encode_images(images[:1])[0], atol=1e-5)
    np.testing.assert_allclose(pairs[1], encoder.encode_text(["a dog"])[0], atol=1e-5)
    assert np.abs(pairs[2] - pairs[0]).max() > 1e-3  # the text changes the image's vector


def test_matryoshka_prefix_is_renormalised(tiny_qwen3vl: Path, encoder: Qwen3VLEncoder) -> None:
    short = load_encoder(tiny_qwen3vl, device="cpu", matryoshka_dim=8)
    assert short.dim == 8
    full = encoder.encode_text(TEXTS)
    prefix = full[:, :8] / np.linalg.norm(full[:, :8], axis=1, keepdims=True)
    np.testing.assert_allclose(short.encode_text(TEXTS), prefix, atol=1e-5)
    assert short.fingerprint != encoder.fingerprint
    with pytest.raises(ValueError, match="matryoshka_dim=64 is outside 1..32"):
        load_encoder(tiny_qwen3vl, device="cpu", matryoshka_dim=64)


def test_save_and_reload_give_identical_vectors(tiny_qwen3vl: Path, tmp_path: Path, images: list[Image.Image]) -> None:
    original = load_encoder(tiny_qwen3vl, device="cpu", instruction="Find the matching photo", matryoshka_dim=16)
    out = original.save(tmp_path / "saved")
    for name in ("config.json", "model.safetensors", "tokenizer.json", "chat_template.jinja", "preprocessor_config.json"):
        assert (out / name).is_file(), name
    reopened = load_encoder(out, device="cpu")
    # `instruction` sets both roles; the saved options restore both
    assert (reopened.query_instruction, reopened.document_instruction, reopened.dim) == (
        "Find the matching photo.", "Find the matching photo.", 16)
    assert reopened.fingerprint == original.fingerprint
    np.testing.assert_array_equal(reopened.encode_text(TEXTS), original.encode_text(TEXTS))
    np.testing.assert_array_equal(reopened.encode_images(images), original.encode_images(images))
    direct = Qwen3VLEncoder.from_pretrained(out)
    np.testing.assert_array_equal(direct.encode_text(TEXTS), original.encode_text(TEXTS))


def test_preprocessing_config_names_what_decides_the_vectors(encoder: Qwen3VLEncoder) -> None:
    config = encoder.preprocessing_config()
    assert config["query_instruction"] == DEFAULT_QUERY_INSTRUCTION
    assert config["document_instruction"] == DEFAULT_INSTRUCTION == "Represent the user's input."
    assert config["max_text_length"] is None
    assert (config["min_pixels"], config["max_pixels"], config["factor"]) == (4 * 32 * 32, 1800 * 32 * 32, 32)
    assert config["matryoshka_dim"] is None
    assert config["image"]["patch_size"] == 16 and config["image"]["merge_size"] == 2


def test_lora_targets_cover_language_and_vision_blocks(tiny_qwen3vl: Path) -> None:
    from peft import LoraConfig, get_peft_model

    model = Qwen3VLEncoder.from_pretrained(tiny_qwen3vl).model
    wrapped = get_peft_model(model, LoraConfig(r=2, target_modules=LORA_TARGET_MODULES))
    adapted = {name.removeprefix("base_model.model.") for name, module in wrapped.named_modules() if hasattr(module, "lora_A")}
    language = {f"language_model.layers.{i}.{part}" for i in range(2) for part in (
        "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
        "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")}
    vision = {f"visual.blocks.{i}.{part}" for i in range(2) for part in (
        "attn.qkv", "attn.proj", "mlp.linear_fc1", "mlp.linear_fc2")}
    assert adapted == language | vision  # mergers and the patch embedding stay frozen


def test_bad_model_directories_are_named(tiny_qwen3vl: Path, tmp_path: Path, encoder: Qwen3VLEncoder) -> None:
    import shutil

    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    from vkd.models.qwen3vl import Qwen3VLEmbeddingProcessor

    other = Qwen3VLEmbeddingProcessor(encoder.processor.tokenizer, Qwen2VLImageProcessorPil(patch_size=14))
    with pytest.raises(ValueError, match=r"preprocessor_config.json .* = \(14, 2, 2\) .* \(16, 2, 2\)"):
        Qwen3VLEncoder(encoder.model, other, name="m", device=torch.device("cpu"), dtype=torch.float32)

    no_template = shutil.copytree(tiny_qwen3vl, tmp_path / "no-template")
    (no_template / "chat_template.jinja").unlink()
    with pytest.raises(ValueError, match="no chat template"):
        Qwen3VLEncoder.from_pretrained(no_template)


def test_queries_and_documents_carry_their_own_instructions(
    tiny_qwen3vl: Path, encoder: Qwen3VLEncoder, images: list[Image.Image]
) -> None:
    """Text is a query (the task instruction), an image a document (the default instruction),
    as in the official evaluation; each instruction changes only its own side's vectors."""
    decode = encoder.processor.tokenizer.decode
    query = f"<|im_start|>system\n{DEFAULT_QUERY_INSTRUCTION}<|im_end|>\n<|im_start|>user\n"
    document = f"<|im_start|>system\n{DEFAULT_INSTRUCTION}<|im_end|>\n<|im_start|>user\n"
    assert encoder.prompt("a dog").startswith(query)
    assert encoder.prompt(None, image=True).startswith(document)
    # what the model is fed, not only what prompt() says
    assert decode(encoder.tokenize(["a dog"])["input_ids"][0]).startswith(query)
    assert decode(encoder.preprocess(images[:1])["input_ids"][0]).startswith(document)

    generic = "Retrieve images or text relevant to the user's query."
    other_query = load_encoder(tiny_qwen3vl, device="cpu", query_instruction=generic)
    assert (other_query.query_instruction, other_query.document_instruction) == (generic, DEFAULT_INSTRUCTION)
    assert decode(other_query.tokenize(["a dog"])["input_ids"][0]).startswith(f"<|im_start|>system\n{generic}<|im_end|>")
    assert np.abs(other_query.encode_text(TEXTS) - encoder.encode_text(TEXTS)).max() > 1e-3
    np.testing.assert_array_equal(other_query.encode_images(images), encoder.encode_images(images))

    other_document = load_encoder(tiny_qwen3vl, device="cpu", document_instruction="Represent the given image")
    assert decode(other_document.preprocess(images[:1])["input_ids"][0]).startswith(
        "<|im_start|>system\nRepresent the given image.<|im_end|>")
    assert np.abs(other_document.encode_images(images) - encoder.encode_images(images)).max() > 1e-3
    np.testing.assert_array_equal(other_document.encode_text(TEXTS), encoder.encode_text(TEXTS))


def test_fingerprint_covers_both_instructions(tiny_qwen3vl: Path, encoder: Qwen3VLEncoder) -> None:
    fingerprints = {
        encoder.fingerprint,
        load_encoder(tiny_qwen3vl, device="cpu", query_instruction="Find a photo").fingerprint,
        load_encoder(tiny_qwen3vl, device="cpu", document_instruction="Represent the photo").fingerprint,
    }
    assert len(fingerprints) == 3
    # the defaults spelled out are the defaults
    same = load_encoder(tiny_qwen3vl, device="cpu", query_instruction=DEFAULT_QUERY_INSTRUCTION,
                        document_instruction=DEFAULT_INSTRUCTION)
    assert same.fingerprint == encoder.fingerprint
    assert encoder.load_options()["query_instruction"] == DEFAULT_QUERY_INSTRUCTION
    assert encoder.load_options()["document_instruction"] == DEFAULT_INSTRUCTION


def _real_length(inputs: dict[str, torch.Tensor], row: int) -> int:
    return int(inputs["attention_mask"][row].sum())


def test_text_limit_cuts_the_text_never_the_image_or_the_template(
    tiny_qwen3vl: Path, encoder: Qwen3VLEncoder
) -> None:
    """max_text_length counts the user's text only: a 500x375 image keeps its 192 tokens, and
    the last real token is still the chat template's end (what last-token pooling reads)."""
    short = load_encoder(tiny_qwen3vl, device="cpu", max_text_length=4)
    tokenizer = short.processor.tokenizer
    long_text = "a dog on a beach with a red ball near the blue sea on a sunny day"
    image = make_images(1, size=(500, 375))[0]
    inputs = short.prepare([(image, long_text), (None, long_text), (None, "cat")])
    ending = "<|im_end|>\n<|im_start|>assistant\n"
    assert int(inputs["mm_token_type_ids"][0].sum()) == 192  # 512x384 / 32² merged patches
    for row, has_image in ((0, True), (1, False)):
        ids = inputs["input_ids"][row][inputs["attention_mask"][row].bool()]
        rendered = tokenizer.decode(ids)
        assert rendered.endswith(ending)
        user = rendered.split("<|im_start|>user\n")[1].removesuffix(ending).replace("<|vision_end|>", "|")
        text = user.split("|")[-1] if has_image else user
        assert long_text.startswith(text) and 0 < len(tokenizer(text, add_special_tokens=False)["input_ids"]) <= 4
        assert rendered == short.prompt(text, image=has_image).replace("<|image_pad|>", "<|image_pad|>" * (192 if has_image else 0))
    # a text within the limit is untouched, so its vector is the unlimited encoder's
    np.testing.assert_allclose(short.encode_text(["cat"]), encoder.encode_text(["cat"]), atol=1e-6)
    cut = tokenizer.decode(inputs["input_ids"][1][inputs["attention_mask"][1].bool()]).split("user\n")[1].removesuffix(ending)
    np.testing.assert_allclose(short.encode_text([long_text]), encoder.encode_text([cut]), atol=1e-6)
    assert short.fingerprint != encoder.fingerprint
    with pytest.raises(ValueError, match="max_text_length=0"):
        load_encoder(tiny_qwen3vl, device="cpu", max_text_length=0)


def test_the_whole_sequence_bound_also_cuts_only_the_text(tiny_qwen3vl: Path) -> None:
    bounded = load_encoder(tiny_qwen3vl, device="cpu", max_length=64)
    text = " ".join(["a dog on a beach"] * 20)
    inputs = bounded.prepare([(None, text)])
    assert 50 < _real_length(inputs, 0) <= 64
    assert bounded.processor.tokenizer.decode(inputs["input_ids"][0]).endswith("<|im_end|>\n<|im_start|>assistant\n")
    # an image that alone needs more tokens than max_length is an error, never a cut image
    with pytest.raises(ValueError, match=r"max_length=64.*raise max_length or lower max_pixels"):
        bounded.prepare([(make_images(1, size=(500, 375))[0], "a dog")])
