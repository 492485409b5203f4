"""Distillation makes a better student than contrastive training alone, on synthetic scenes."""

from __future__ import annotations

from pathlib import Path

import pytest

from vkd.config import DistillConfig
from vkd.data.pairs import read_pairs, write_pairs
from vkd.data.synth import generate
from vkd.distill.trainer import distill
from vkd.evaluate import evaluate_encoder
from vkd.models import load_encoder
from vkd.models.tiny import build_tiny


@pytest.mark.slow
def test_distillation_raises_student_recall_over_its_ce_only_twin(tmp_path: Path) -> None:
    """What it shows: a tiny student (32-d CLIP) trained for a short budget (3 epochs over 840
    pairs, ~80 steps) reaches a higher val text→image Recall@1 when it also learns from a
    teacher (a 64-d CLIP first trained contrastively, ``use_distillation: false``, on all ~1700
    training pairs of the same synthetic scenes) than its CE-only twin with the same steps,
    seed and data order. That is the regime distillation is for: the teacher has seen more
    than the student's budget allows, and its soft similarities (KL at T=4) and its embeddings
    as contrastive anchors (ICL) pass that on. Over training seeds 0-4 the gain was +3.3 to
    +5.5 points (from ~3-6 % to ~7-9 %, on 328 val captions over 90 images); the assertion asks
    for 2 points and a clearly higher rsum.
    """
    data = tmp_path / "scenes"
    generate(data, 600, seed=0, size=32, val_frac=0.15, test_frac=0.0)
    subset = tmp_path / "student-pairs.jsonl"
    write_pairs(subset, [{"image": p.image, "text": p.text, "image_id": p.image_id}
                         for p in read_pairs(data / "train.jsonl")[:840]])
    teacher_init = build_tiny("clip", tmp_path / "teacher-init", seed=4, overrides={"hidden": 64, "proj": 64})
    student_init = build_tiny("clip", tmp_path / "student-init", seed=3)
    common = {"batch_size": 32, "use_lora": False, "learning_rate": 1e-3, "warmup_ratio": 0.1,
              "logging_steps": 1000, "eval_strategy": "no", "seed": 0}

    teacher = distill(DistillConfig.from_dict({
        **common, "model_name_or_path": str(teacher_init), "data_path": str(data / "train.jsonl"),
        "output_dir": str(tmp_path / "teacher"), "use_distillation": False, "epochs": 6,
    }))
    student = {"model_name_or_path": str(student_init), "data_path": str(subset), "epochs": 3}
    ce_only = distill(DistillConfig.from_dict({
        **common, **student, "output_dir": str(tmp_path / "ce"), "use_distillation": False}))
    distilled = distill(DistillConfig.from_dict({
        **common, **student, "output_dir": str(tmp_path / "kd"),
        "teacher_model_name_or_path": str(teacher.model_dir), "distillation_weight": 0.9, "temperature": 4.0,
        "distillation_loss_type": ["kl_divergence", "icl"],
    }))
    assert ce_only.report["steps"] == distilled.report["steps"] == 78

    val = read_pairs(data / "val.jsonl")
    recall = {name: evaluate_encoder(load_encoder(result.model_dir, device="cpu"), val)
              for name, result in (("teacher", teacher), ("ce", ce_only), ("kd", distilled))}
    summary = {name: (round(m["t2i_R@1"], 1), round(m["rsum"])) for name, m in recall.items()}
    assert recall["teacher"]["t2i_R@1"] > recall["kd"]["t2i_R@1"], summary
    assert recall["kd"]["t2i_R@1"] >= recall["ce"]["t2i_R@1"] + 2.0, summary
    assert recall["kd"]["rsum"] >= recall["ce"]["rsum"] + 30, summary
