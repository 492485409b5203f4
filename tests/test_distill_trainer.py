"""The distillation trainer on tiny models: teacher cache, ensembles, stages, EMA, gradient
caching and exact resumption."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from vkd.config import DistillConfig
from vkd.distill.trainer import Trainer, distill, latest_checkpoint


@pytest.fixture(scope="module")
def pair_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """24 captioned synthetic scenes (8 images, several captions each): three batches of 8."""
    from vkd.data.pairs import read_pairs, write_pairs
    from vkd.data.synth import generate

    root = tmp_path_factory.mktemp("distill-data")
    generate(root / "synth", 12, seed=0, size=32, val_frac=0.0, test_frac=0.0)
    pairs = read_pairs(root / "synth" / "train.jsonl")[:24]
    path = root / "pairs.jsonl"
    write_pairs(path, [{"image": p.image, "text": p.text, "image_id": p.image_id} for p in pairs])
    return path


def make_config(out: Path, data: Path, student: Path, teacher: Path | list[Path], **overrides: Any) -> DistillConfig:
    teachers = [str(t) for t in teacher] if isinstance(teacher, list) else str(teacher)
    values: dict[str, Any] = {
        "model_name_or_path": str(student), "teacher_model_name_or_path": teachers,
        "data_path": str(data), "output_dir": str(out), "epochs": 1, "batch_size": 8,
        "learning_rate": 1e-3, "warmup_ratio": 0.0, "logging_steps": 1, "eval_strategy": "no",
        "lora_dropout": 0.0, "distillation_loss_type": ["kl_divergence", "feature_mse"],
    }
    values.update(overrides)
    return DistillConfig.from_dict(values)


def train_rows(out: Path) -> list[dict[str, Any]]:
    lines = (out / "metrics.jsonl").read_text().splitlines()
    return [row for row in map(json.loads, lines) if row["type"] == "train"]


def last_weights(out: Path) -> dict[str, torch.Tensor]:
    return load_file(latest_checkpoint(out / "checkpoints") / "trainable.safetensors")


def assert_same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], atol: float) -> None:
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=atol, msg=name)


def counting(encoder: Any) -> dict[str, int]:
    """Count the rows the real teacher embeds (wrapping its own embed functions)."""
    counts = {"text": 0, "image": 0}
    embed_text, embed_images = encoder.embed_text, encoder.embed_images

    def text(inputs: dict) -> torch.Tensor:
        out = embed_text(inputs)
        counts["text"] += out.shape[0]
        return out

    def images(inputs: dict) -> torch.Tensor:
        out = embed_images(inputs)
        counts["image"] += out.shape[0]
        return out

    encoder.embed_text, encoder.embed_images = text, images
    return counts


def test_teacher_cache_runs_the_teacher_once_per_sample(
    tmp_path: Path, pair_file: Path, tiny_clip: Path, tiny_clip_teacher: Path
) -> None:
    """Three epochs over 24 pairs: the cached teacher embeds each pair once (72 without the
    cache), and the student ends with the same weights and per-step losses either way."""
    from vkd.models import load_encoder

    results = {}
    for cached in (True, False):
        teacher = load_encoder(tiny_clip_teacher, device="cpu")
        counts = counting(teacher)
        out = tmp_path / f"cache-{cached}"
        config = make_config(out, pair_file, tiny_clip, tiny_clip_teacher, epochs=3, teacher_cache=cached)
        result = distill(config, teachers=[teacher])
        results[cached] = (counts, result.report, train_rows(out), last_weights(out))

    counts, report, rows, weights = results[True]
    assert counts == {"text": 24, "image": 24}
    assert report["teacher_cache"] == {"hits": 48, "misses": 24}
    assert report["teachers"][0]["forward_rows"] == 24
    # one segment (<cache_dir>/<teacher fingerprint>/…arrow): the later epochs added no rows to flush
    assert len(list((tmp_path / "cache-True" / "teacher_cache").glob("*/*.arrow"))) == 1

    plain_counts, plain_report, plain_rows, plain_weights = results[False]
    assert plain_counts == {"text": 72, "image": 72}
    assert plain_report["teacher_cache"] == {"hits": 0, "misses": 0}
    assert len(rows) == len(plain_rows) == 9
    for row, plain in zip(rows, plain_rows, strict=True):
        for key in ("loss", "ce", "kl_divergence", "feature_mse"):
            assert row[key] == pytest.approx(plain[key], abs=1e-5), (row["step"], key)
    assert_same_weights(weights, plain_weights, atol=1e-5)


def test_a_second_run_reads_the_cache_of_the_first(
    tmp_path: Path, pair_file: Path, tiny_clip: Path, tiny_clip_teacher: Path
) -> None:
    cache_dir = tmp_path / "shared-cache"
    first = distill(make_config(tmp_path / "a", pair_file, tiny_clip, tiny_clip_teacher,
                                teacher_cache_dir=str(cache_dir)))
    second = distill(make_config(tmp_path / "b", pair_file, tiny_clip, tiny_clip_teacher,
                                 teacher_cache_dir=str(cache_dir)))
    assert first.report["teacher_cache"] == {"hits": 0, "misses": 24}
    assert second.report["teacher_cache"] == {"hits": 24, "misses": 0}
    assert second.report["teacher_forward_rows"] == 0


def test_ensemble_of_teachers_with_different_dimensions(
    tmp_path: Path, pair_file: Path, tiny_clip: Path, tiny_clip_teacher: Path, tiny_siglip: Path
) -> None:
    """A 48-d CLIP and a 32-d SigLIP teach a 32-d student together, with every KD term."""
    config = make_config(tmp_path, pair_file, tiny_clip, [tiny_clip_teacher, tiny_siglip], teacher_weights=[2, 1],
                         distillation_loss_type=["kl_divergence", "feature_mse", "icl", "similarity_mse"])
    trainer = Trainer(config)
    projections = dict(trainer.loss.named_parameters())
    # one learned map into the 48-d teacher; the 32-d teacher needs none
    assert {name: tuple(p.shape) for name, p in projections.items()} == {
        "kd.feature_mse.projections.maps.0.weight": (48, 32)}
    before = projections["kd.feature_mse.projections.maps.0.weight"].detach().clone()
    result = trainer.train()

    rows = train_rows(tmp_path)
    assert len(rows) == 3
    for row in rows:
        for key in ("ce", "kl_divergence", "feature_mse", "icl", "similarity_mse"):
            assert 0 <= row[key] < 100, (key, row)
    assert not torch.equal(before, projections["kd.feature_mse.projections.maps.0.weight"])
    teachers = result.report["teachers"]
    assert [(t["dim"], t["family"], t["weight"]) for t in teachers] == [(48, "clip", 2.0), (32, "siglip", 1.0)]
    assert result.report["teacher_cache"]["misses"] == 48


def test_stages_run_in_order(tmp_path: Path, pair_file: Path, tiny_clip: Path, tiny_clip_teacher: Path) -> None:
    config = make_config(tmp_path, pair_file, tiny_clip, tiny_clip_teacher, stages=[
        {"epochs": 1, "temperature": 4.0, "distillation_weight": 0.9},
        {"epochs": 2, "temperature": 1.0, "distillation_weight": 0.3, "learning_rate": 1e-5},
    ])
    trainer = Trainer(config)
    seen = []
    forward = trainer.loss.forward

    def recording(*args: Any, **kwargs: Any) -> Any:
        seen.append((trainer.loss.temperature, trainer.loss.distillation_weight))
        return forward(*args, **kwargs)

    trainer.loss.forward = recording
    trainer.train()
    assert seen == [(4.0, 0.9)] * 3 + [(1.0, 0.3)] * 6
    rows = train_rows(tmp_path)
    assert [row["stage"] for row in rows] == [0] * 3 + [1] * 6
    assert [row["temperature"] for row in rows] == [4.0] * 3 + [1.0] * 6
    # each stage has its own schedule (no warm-up here): it starts at its own rate, then decays
    assert rows[0]["lr"] == pytest.approx(1e-3) and rows[3]["lr"] == pytest.approx(1e-5)
    assert rows[2]["lr"] < rows[1]["lr"] < 1e-3 and rows[8]["lr"] < rows[4]["lr"] < 1e-5


def test_ema_teacher_updates_every_n_steps(tmp_path: Path, pair_file: Path, tiny_clip: Path,
                                           tiny_clip_teacher: Path) -> None:
    config = make_config(tmp_path, pair_file, tiny_clip, tiny_clip_teacher, epochs=2, teacher_mode="ema",
                         teacher_cache=False, update_teacher_every=2, teacher_momentum=0.5)
    trainer = Trainer(config)
    assert trainer.loss.kd["feature_mse"].projections.teacher_dims == (48, 32)  # the teacher, then the EMA
    result = trainer.train()
    assert result.report["ema_teacher"]["updates"] == 3  # steps 2, 4, 6
    ema = trainer.ema.encoder.model
    assert not any(p.requires_grad for p in ema.parameters())


def test_gradient_cache_matches_the_plain_step(
    tmp_path: Path, pair_file: Path, tiny_clip: Path, tiny_clip_teacher: Path
) -> None:
    """Chunks of 3 rows (uneven: 3+3+2) give the per-step losses and weights of whole batches."""
    runs = {}
    for cached in (False, True):
        out = tmp_path / f"gc-{cached}"
        distill(make_config(out, pair_file, tiny_clip, tiny_clip_teacher, epochs=2, use_gradient_cache=cached,
                            gradient_cache_chunk_size=3, distillation_loss_type=["kl_divergence", "icl"]))
        runs[cached] = (train_rows(out), last_weights(out))
    (plain_rows, plain_weights), (rows, weights) = runs[False], runs[True]
    assert len(rows) == 6
    for row, plain in zip(rows, plain_rows, strict=True):
        for key in ("loss", "ce", "kl_divergence", "icl"):
            assert row[key] == pytest.approx(plain[key], abs=1e-5), (row["step"], key)
    assert_same_weights(weights, plain_weights, atol=1e-5)


def test_resume_continues_exactly(tmp_path: Path, pair_file: Path, tiny_clip: Path, tiny_clip_teacher: Path) -> None:
    """A run cut after step 4 (mid-epoch, LoRA dropout on) and resumed by a new Trainer ends
    with the weights, losses and evaluations of the uninterrupted run."""
    common = {"epochs": 3, "lora_dropout": 0.2, "val_data_path": str(pair_file), "eval_strategy": "epoch",
              "stages": [{"epochs": 1, "temperature": 3.0, "distillation_weight": 0.7},
                         {"epochs": 2, "temperature": 1.0, "distillation_weight": 0.5}]}
    full = tmp_path / "full"
    distill(make_config(full, pair_file, tiny_clip, tiny_clip_teacher, **common))

    cut = tmp_path / "cut"
    first = distill(make_config(cut, pair_file, tiny_clip, tiny_clip_teacher, max_steps=4, **common))
    assert first.report["steps"] == 4 and latest_checkpoint(cut / "checkpoints").name == "step-000004"
    resumed = distill(make_config(cut, pair_file, tiny_clip, tiny_clip_teacher, resume_from_checkpoint="latest",
                                  **common))
    assert resumed.report["resumed_from"].endswith("step-000004") and resumed.report["steps"] == 9

    assert_same_weights(last_weights(cut), last_weights(full), atol=0)
    full_rows, cut_rows = train_rows(full), train_rows(cut)
    assert [r["step"] for r in cut_rows] == list(range(1, 10))  # rows of the cut run are not repeated
    assert [r["loss"] for r in cut_rows] == [r["loss"] for r in full_rows]
    full_report = json.loads((full / "report.json").read_text())
    assert resumed.report["val"] == full_report["val"] and resumed.report["best"] == full_report["best"]
    for name in ("model.safetensors",):
        assert_same_weights(load_file(cut / "model" / name), load_file(full / "model" / name), atol=0)


def test_a_fresh_run_refuses_an_output_dir_with_checkpoints(
    tmp_path: Path, pair_file: Path, tiny_clip: Path, tiny_clip_teacher: Path
) -> None:
    config = make_config(tmp_path, pair_file, tiny_clip, tiny_clip_teacher, max_steps=1)
    distill(config)
    with pytest.raises(ValueError, match="already holds checkpoints.*resume_from_checkpoint: latest"):
        distill(config)


def test_the_final_model_is_the_best_evaluated_one(
    tmp_path: Path, pair_file: Path, tiny_clip: Path, tiny_clip_teacher: Path
) -> None:
    """A second stage with a destructive learning rate makes the first epoch the best; the
    merged model written at the end is that epoch's, recall for recall."""
    from vkd.evaluate import evaluate_encoder
    from vkd.models import load_encoder

    config = make_config(tmp_path, pair_file, tiny_clip, tiny_clip_teacher, use_lora=False,
                         val_data_path=str(pair_file), eval_strategy="epoch", stages=[
                             {"epochs": 1, "temperature": 2.0, "distillation_weight": 0.5, "learning_rate": 1e-3},
                             {"epochs": 1, "temperature": 2.0, "distillation_weight": 0.5, "learning_rate": 0.5}])
    result = distill(config)
    val = result.report["val"]
    assert [v["epoch"] for v in val] == [1.0, 2.0] and val[1]["t2i_R@1"] < val[0]["t2i_R@1"]
    assert result.report["best_epoch"] == 1.0 and result.report["final_model"] == "best"
    final = evaluate_encoder(load_encoder(result.model_dir, device="cpu"), pair_file)
    assert final["t2i_R@1"] == val[0]["t2i_R@1"] and final["rsum"] == val[0]["rsum"]


def test_the_best_evaluation_is_chosen_on_the_stated_metric_ties_to_the_later() -> None:
    from vkd.distill.trainer import choose_best

    rows = [{"step": 1, "t2i_R@1": 50.0, "rsum": 300.0},
            {"step": 2, "t2i_R@1": 40.0, "rsum": 310.0},
            {"step": 3, "t2i_R@1": 45.0, "rsum": 310.0}]
    assert choose_best(rows, "rsum")["step"] == 3  # a tie goes to the later evaluation
    assert choose_best(rows, "t2i_R@1")["step"] == 1
    assert choose_best([], "rsum") is None
    assert DistillConfig.from_dict({"model_name_or_path": "m", "use_distillation": False, "data_path": "d",
                                    "output_dir": "o"}).best_metric == "rsum"


# -- per-model options: each model gets the options given for it ------------------------------


@pytest.fixture(scope="module")
def large_image_pairs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """8 pairs of 500x375 photos (192 Qwen3-VL image tokens each) with long captions."""
    from conftest import make_images

    from vkd.data.pairs import write_pairs

    root = tmp_path_factory.mktemp("large-images")
    records = []
    for i, image in enumerate(make_images(8, seed=5, size=(500, 375))):
        image.save(root / f"{i}.png")
        records.append({"image": f"{i}.png", "text": f"photo {i}: a dog on a beach with a red ball near the blue sea"})
    write_pairs(root / "pairs.jsonl", records)
    return root / "pairs.jsonl"


@pytest.fixture(scope="module")
def tiny_clip_64(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A CLIP whose text tower has 64 positions (the tiny SigLIP has 32)."""
    from vkd.models.tiny import build_tiny

    return build_tiny("clip", tmp_path_factory.mktemp("tiny-clip-64"), seed=2, max_text_length=64)


def test_a_qwen3vl_teacher_with_a_short_text_limit_trains_on_large_images(
    tmp_path: Path, large_image_pairs: Path, tiny_clip: Path, tiny_qwen3vl: Path
) -> None:
    """The student's limit stays the student's, and a Qwen3-VL teacher's own limit cuts its
    text only: the image's 192 tokens and the template's end survive."""
    from vkd.models.qwen3vl import MAX_LENGTH

    config = make_config(tmp_path, large_image_pairs, tiny_clip, tiny_qwen3vl, max_steps=1, max_text_length=16,
                         teacher_max_text_length=8)
    trainer = Trainer(config)
    teacher = trainer.teachers[0].encoder
    assert trainer.student.max_text_length == 16
    assert (teacher.processor.max_text_length, teacher.processor.max_length) == (8, MAX_LENGTH)
    batch = trainer._collator()([(i, trainer.train_pairs[i]) for i in range(8)])
    inputs = batch["teachers"][0].image_chunks[0]
    assert inputs["mm_token_type_ids"].sum(dim=1).tolist() == [192] * 8
    result = trainer.train()
    assert result.report["steps"] == 1 and 0 <= train_rows(tmp_path)[0]["loss"] < 100


def test_a_matryoshka_student_leaves_the_teachers_targets_full_size(
    tmp_path: Path, pair_file: Path, tiny_qwen3vl: Path, tiny_clip: Path
) -> None:
    """matryoshka_dim is the student's: the teacher's targets keep its own (full, or its own
    teacher_matryoshka_dim) size, and feature_mse learns the map between the two."""
    config = make_config(tmp_path / "full", pair_file, tiny_qwen3vl, tiny_qwen3vl, max_steps=1, matryoshka_dim=8)
    trainer = Trainer(config)
    assert (trainer.student.dim, trainer.teachers[0].encoder.dim) == (8, 32)
    projections = {name: tuple(p.shape) for name, p in trainer.loss.named_parameters()}
    assert projections == {"kd.feature_mse.projections.maps.0.weight": (32, 8)}
    batch = trainer._collator()([(i, trainer.train_pairs[i]) for i in range(8)])
    targets = trainer.teacher_outputs(batch)[0]
    assert targets.text.shape == targets.image.shape == (8, 32)
    result = trainer.train()
    assert [t["dim"] for t in result.report["teachers"]] == [32]

    own = make_config(tmp_path / "own", pair_file, tiny_qwen3vl, tiny_qwen3vl, max_steps=1, matryoshka_dim=8,
                      teacher_matryoshka_dim=16)
    assert Trainer(own).teachers[0].encoder.dim == 16
    with pytest.raises(ValueError, match="teacher_matryoshka_dim = 16 for .*only Qwen3-VL.*give null for this"):
        Trainer(make_config(tmp_path / "clip", pair_file, tiny_qwen3vl, [tiny_qwen3vl, tiny_clip],
                            teacher_matryoshka_dim=16))
    mixed = make_config(tmp_path / "mixed", pair_file, tiny_qwen3vl, [tiny_qwen3vl, tiny_clip],
                        teacher_matryoshka_dim=[16, None])
    assert [t.encoder.dim for t in Trainer(mixed).teachers] == [16, 32]


def test_a_siglip_teacher_keeps_its_own_text_length(
    tmp_path: Path, pair_file: Path, tiny_clip_64: Path, tiny_siglip: Path
) -> None:
    """A student limit above the SigLIP teacher's 32 positions is the student's alone."""
    config = make_config(tmp_path / "run", pair_file, tiny_clip_64, tiny_siglip, max_steps=1, max_text_length=48)
    trainer = Trainer(config)
    assert (trainer.student.max_text_length, trainer.teachers[0].encoder.max_text_length) == (48, 32)
    assert trainer.train().report["steps"] == 1
    with pytest.raises(ValueError, match="max_text_length=48 exceeds the text tower's 32 positions"):
        Trainer(make_config(tmp_path / "too-long", pair_file, tiny_clip_64, tiny_siglip, teacher_max_text_length=48))


def test_queries_and_documents_keep_their_instructions_in_training(
    tmp_path: Path, pair_file: Path, tiny_qwen3vl: Path
) -> None:
    """Captions are queries and images documents for the student and the teacher alike; the
    teacher takes the student's instructions unless given its own, and the trained model
    keeps them."""
    from vkd.models import load_encoder

    config = make_config(tmp_path, pair_file, tiny_qwen3vl, tiny_qwen3vl, max_steps=1, use_lora=False,
                         distillation_loss_type="kl_divergence", query_instruction="Find the photo",
                         teacher_document_instruction="Represent the photo")
    trainer = Trainer(config)
    student, teacher = trainer.student, trainer.teachers[0].encoder
    assert (student.query_instruction, student.document_instruction) == ("Find the photo.", "Represent the user's input.")
    assert (teacher.query_instruction, teacher.document_instruction) == ("Find the photo.", "Represent the photo.")
    batch = trainer._collator()([(i, trainer.train_pairs[i]) for i in range(8)])
    decode = student.processor.tokenizer.decode
    assert decode(batch["text_chunks"][0]["input_ids"][0]).startswith("<|im_start|>system\nFind the photo.<|im_end|>")
    assert decode(batch["image_chunks"][0]["input_ids"][0]).startswith(
        "<|im_start|>system\nRepresent the user's input.<|im_end|>")
    assert decode(batch["teachers"][0].image_chunks[0]["input_ids"][0]).startswith(
        "<|im_start|>system\nRepresent the photo.<|im_end|>")
    result = trainer.train()
    saved = load_encoder(result.model_dir, device="cpu")
    assert (saved.query_instruction, saved.document_instruction) == ("Find the photo.", "Represent the user's input.")
