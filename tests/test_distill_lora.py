"""LoRA on the student: the merged model equals base + adapter, both reload, targets per family."""

from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import make_images

from vkd.config import DistillConfig
from vkd.distill.lora import apply_lora, merge, resolve_targets
from vkd.distill.trainer import distill
from vkd.models import load_encoder

TEXTS = ["a red car on a road", "two dogs on the beach", "a small yellow bird"]


@pytest.fixture(scope="module")
def pair_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from vkd.data.synth import generate

    root = tmp_path_factory.mktemp("lora-data")
    generate(root, 8, seed=1, size=32, val_frac=0.0, test_frac=0.0)
    return root / "train.jsonl"


def _config(out: Path, data: Path, student: Path, teacher: Path, **overrides: object) -> DistillConfig:
    return DistillConfig.from_dict({
        "model_name_or_path": str(student), "teacher_model_name_or_path": str(teacher), "data_path": str(data),
        "output_dir": str(out), "batch_size": 8, "max_steps": 3, "learning_rate": 5e-3, "warmup_ratio": 0.0,
        "eval_strategy": "no", "lora_r": 4, "lora_alpha": 8, **overrides,
    })


def _vectors(encoder: object, images: list) -> np.ndarray:
    return np.concatenate([encoder.encode_text(TEXTS), encoder.encode_images(images)])


def test_merged_model_equals_base_plus_adapter(tmp_path: Path, pair_file: Path, tiny_clip: Path,
                                                tiny_clip_teacher: Path) -> None:
    from peft import PeftModel

    result = distill(_config(tmp_path, pair_file, tiny_clip, tiny_clip_teacher))
    assert result.model_dir == tmp_path / "model" and result.adapter_dir == tmp_path / "adapter"
    assert {p.name for p in result.adapter_dir.iterdir()} >= {"adapter_config.json", "adapter_model.safetensors"}
    adapter_config = json.loads((result.adapter_dir / "adapter_config.json").read_text())
    assert adapter_config["base_model_name_or_path"] == str(tiny_clip)
    assert sorted(adapter_config["modules_to_save"]) == ["text_projection", "visual_projection"]

    images = make_images(3)
    merged = load_encoder(result.model_dir, device="cpu")
    base = load_encoder(tiny_clip, device="cpu")
    before = _vectors(base, images)
    PeftModel.from_pretrained(base.model, result.adapter_dir)  # injects the adapter into base.model
    adapted = _vectors(base, images)
    assert np.abs(adapted - before).max() > 1e-3  # training moved the student
    np.testing.assert_allclose(_vectors(merged, images), adapted, atol=1e-4)
    # a plain model class, no peft wrappers left
    assert type(merged.model).__name__ == "CLIPModel" and not any("lora" in n for n, _ in merged.model.named_parameters())
    # under LoRA the logit scale stays at the student's pretrained value
    assert merged.logit_scale == pytest.approx(load_encoder(tiny_clip, device="cpu").logit_scale)


def test_full_finetuning_writes_no_adapter(tmp_path: Path, pair_file: Path, tiny_clip: Path,
                                          tiny_clip_teacher: Path) -> None:
    result = distill(_config(tmp_path, pair_file, tiny_clip, tiny_clip_teacher, use_lora=False))
    assert result.adapter_dir is None and not (tmp_path / "adapter").exists()
    trained, original = load_encoder(result.model_dir, device="cpu"), load_encoder(tiny_clip, device="cpu")
    assert trained.logit_scale != original.logit_scale
    assert result.report["student"]["trained_parameters"] == original.num_parameters()


def test_siglip_pooling_head_is_trained_whole_not_adapted(tiny_siglip: Path) -> None:
    encoder = load_encoder(tiny_siglip, device="cpu")
    excluded = resolve_targets(encoder.model, ["q_proj", "out_proj", "fc1", "fc2"],
                               ["text_model.head", "vision_model.head"])
    assert excluded == ["vision_model.head.attention.out_proj", "vision_model.head.mlp.fc1",
                        "vision_model.head.mlp.fc2"]
    images = make_images(2)
    peft_model = apply_lora(encoder, r=4, alpha=8, dropout=0.0)
    with torch.no_grad():
        for name, p in encoder.model.named_parameters():
            if "lora_B" in name or "modules_to_save" in name:
                p.add_(torch.randn_like(p) * 0.05)
    adapted = _vectors(encoder, images)
    merge(encoder, peft_model)
    np.testing.assert_allclose(_vectors(encoder, images), adapted, atol=1e-4)


def test_qwen3vl_default_targets_cover_language_and_vision_blocks(tiny_qwen3vl: Path) -> None:
    encoder = load_encoder(tiny_qwen3vl, device="cpu")
    apply_lora(encoder, r=4, alpha=8, dropout=0.0)
    adapted = {name.rsplit(".lora_A", 1)[0] for name, _ in encoder.model.named_parameters() if ".lora_A." in name}
    assert "visual.blocks.0.attn.qkv" in adapted and "visual.blocks.1.mlp.linear_fc2" in adapted
    assert "language_model.layers.0.self_attn.q_proj" in adapted and "language_model.layers.1.mlp.down_proj" in adapted
    assert not any("merger" in name for name in adapted)


def test_a_target_that_matches_nothing_is_named(tiny_clip: Path) -> None:
    encoder = load_encoder(tiny_clip, device="cpu")
    with pytest.raises(ValueError, match=r"lora_target_modules: 'qkv' matches no linear layer of CLIPModel; "
                                         r"linear layers end in: .*fc1"):
        apply_lora(encoder, r=4, alpha=8, dropout=0.0, target_modules=["q_proj", "qkv"])


def test_a_lora_run_emits_no_future_warning(tmp_path: Path, pair_file: Path, tiny_clip: Path,
                                           tiny_clip_teacher: Path) -> None:
    # peft's PeftModel reads transformers' deprecated `is_gradient_checkpointing` on every
    # LoRA run; the user must not see that FutureWarning (pyproject ignores FutureWarning
    # for the suite, so turn it back into an error here).
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        distill(_config(tmp_path, pair_file, tiny_clip, tiny_clip_teacher, max_steps=1))


def test_the_adapter_loads_from_another_directory(tmp_path: Path, pair_file: Path, tiny_clip: Path,
                                                  tiny_clip_teacher: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from peft import PeftModel
    from transformers import AutoModel

    work = tmp_path / "work"
    shutil.copytree(tiny_clip, work / "student")
    monkeypatch.chdir(work)
    result = distill(_config(Path("run"), pair_file, Path("student"), tiny_clip_teacher, max_steps=1))
    adapter = (work / result.adapter_dir).resolve()
    base = json.loads((adapter / "adapter_config.json").read_text())["base_model_name_or_path"]
    assert base == str((work / "student").resolve())

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    model = PeftModel.from_pretrained(AutoModel.from_pretrained(base), adapter)
    assert type(model.get_base_model()).__name__ == "CLIPModel"


def test_a_hub_id_stays_an_id_in_the_adapter(tiny_clip: Path) -> None:
    encoder = load_encoder(tiny_clip, device="cpu")
    peft_model = apply_lora(encoder, r=4, alpha=8, dropout=0.0, base_name="openai/clip-vit-base-patch32")
    assert peft_model.peft_config["default"].base_model_name_or_path == "openai/clip-vit-base-patch32"
