"""Checkpoints a crash cannot half-write, and an EMA teacher that starts from the weights
every rank trains (copied after the initial broadcast)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest

from vkd.config import DistillConfig
from vkd.distill.trainer import distill, latest_checkpoint


@pytest.fixture(scope="module")
def pair_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """16 captioned synthetic scenes: two batches of 8."""
    from vkd.data.pairs import read_pairs, write_pairs
    from vkd.data.synth import generate

    root = tmp_path_factory.mktemp("durability-data")
    generate(root / "synth", 8, seed=0, size=32, val_frac=0.0, test_frac=0.0)
    pairs = list(read_pairs(root / "synth" / "train.jsonl"))[:16]
    path = root / "pairs.jsonl"
    write_pairs(path, [{"image": p.image, "text": p.text, "image_id": p.image_id} for p in pairs])
    return path


def _config(out: Path, data: Path, student: Path, teacher: Path, **overrides: Any) -> DistillConfig:
    values: dict[str, Any] = {
        "model_name_or_path": str(student), "teacher_model_name_or_path": str(teacher),
        "data_path": str(data), "output_dir": str(out), "epochs": 1, "batch_size": 8,
        "learning_rate": 1e-3, "warmup_ratio": 0.0, "logging_steps": 1, "eval_strategy": "no",
        "lora_dropout": 0.0, "distillation_loss_type": ["kl_divergence"], **overrides,
    }
    return DistillConfig.from_dict(values)


def test_a_checkpoint_is_fsynced_under_a_temporary_name_then_renamed(
    tmp_path: Path, pair_file: Path, tiny_clip: Path, tiny_clip_teacher: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    events: list[tuple[str, ...]] = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd: int) -> None:
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        real_fsync(fd)

    def replace(src: Any, dst: Any, **kwargs: Any) -> None:
        events.append(("replace", os.fspath(src), os.fspath(dst)))
        real_replace(src, dst, **kwargs)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    out = tmp_path / "run"
    distill(_config(out, pair_file, tiny_clip, tiny_clip_teacher, max_steps=1))

    checkpoints = (out / "checkpoints").resolve()
    final = checkpoints / "step-000001"
    temporary = checkpoints / "step-000001.tmp"
    assert latest_checkpoint(checkpoints) == final and not temporary.exists()
    renames = [e for e in events if e[0] == "replace" and e[2] == str(final)]
    assert renames == [("replace", str(temporary), str(final))]
    commit = events.index(renames[0])
    synced_before = {e[1] for e in events[:commit] if e[0] == "fsync"}
    written = [temporary / p.relative_to(final) for p in final.rglob("*")] + [temporary]
    assert {"trainer_state.json", "trainable.safetensors", "rng-0.pt", "adapter"} <= {p.name for p in written}
    missing = [str(p) for p in written if str(p) not in synced_before]
    assert not missing, f"not fsynced before the rename: {missing}"
    assert ("fsync", str(checkpoints)) in events[commit:], "the rename itself is not made durable"


def test_resume_skips_partial_and_temporary_checkpoints(
    tmp_path: Path, pair_file: Path, tiny_clip: Path, tiny_clip_teacher: Path
) -> None:
    out = tmp_path / "run"
    distill(_config(out, pair_file, tiny_clip, tiny_clip_teacher, max_steps=1))
    checkpoints = out / "checkpoints"
    complete = checkpoints / "step-000001"
    # what a crash can leave: a save still under its temporary name (complete or not) ...
    shutil.copytree(complete, checkpoints / "step-000005.tmp")
    # ... and a step directory without trainer_state.json (cut while deleting or copying)
    shutil.copytree(complete, checkpoints / "step-000007", ignore=shutil.ignore_patterns("trainer_state.json"))
    assert latest_checkpoint(checkpoints) == complete

    resumed = distill(_config(out, pair_file, tiny_clip, tiny_clip_teacher, max_steps=2,
                              resume_from_checkpoint="latest"))
    assert resumed.report["resumed_from"] == str(complete) and resumed.report["steps"] == 2
    assert latest_checkpoint(checkpoints) == checkpoints / "step-000002"


def test_saving_a_step_again_replaces_it_whole(
    tmp_path: Path, pair_file: Path, tiny_clip: Path, tiny_clip_teacher: Path
) -> None:
    """A run resumed from step 1 saves step 2 again over the copy an earlier run left."""
    out = tmp_path / "run"
    distill(_config(out, pair_file, tiny_clip, tiny_clip_teacher, max_steps=2, save_steps=1))
    checkpoints = out / "checkpoints"
    shutil.rmtree(checkpoints / "step-000002" / "adapter")  # mark the old copy
    (checkpoints / "step-000002" / "stale").write_text("from the earlier run")
    # resume from step 1 explicitly: step 2 is saved again
    distill(_config(out, pair_file, tiny_clip, tiny_clip_teacher, max_steps=2,
                    resume_from_checkpoint=str(checkpoints / "step-000001")))
    step2 = checkpoints / "step-000002"
    assert (step2 / "adapter").is_dir() and not (step2 / "stale").exists()
    assert sorted(p.name for p in checkpoints.iterdir()) == ["step-000001", "step-000002"]


EMA_SCRIPT = textwrap.dedent('''
    import json, os, sys
    import torch
    from vkd.config import DistillConfig
    from vkd.distill.trainer import Trainer
    from vkd.models import load_encoder

    student_dir, teacher_dir, data, out, results = sys.argv[1:6]
    rank = int(os.environ["RANK"])
    student = load_encoder(student_dir, device="cpu")
    if rank == 1:  # this rank starts from other weights than rank 0
        with torch.no_grad():
            for p in student.model.parameters():
                p.add_(0.5)
    config = DistillConfig.from_dict({
        "model_name_or_path": student_dir, "teacher_model_name_or_path": teacher_dir, "data_path": data,
        "output_dir": out, "epochs": 1, "batch_size": 4, "eval_strategy": "no", "use_lora": False,
        "teacher_mode": "ema", "teacher_cache": False, "distillation_loss_type": ["kl_divergence"],
    })
    trainer = Trainer(config, student=student)
    assert trainer.world == 2, trainer.world
    rank0 = dict(load_encoder(student_dir, device="cpu").model.named_parameters())
    trained = dict(trainer.student.model.named_parameters())
    ema = dict(trainer.ema.encoder.model.named_parameters())
    gap = lambda a, b: max(float((a[n].detach() - b[n].detach()).abs().max()) for n in rank0)
    with open(os.path.join(results, f"rank{rank}.json"), "w") as handle:
        json.dump({"student_vs_rank0": gap(trained, rank0), "ema_vs_student": gap(ema, trained)}, handle)
''')


@pytest.mark.slow
def test_the_ema_teacher_is_copied_from_the_broadcast_weights(
    tmp_path: Path, pair_file: Path, tiny_clip: Path, tiny_clip_teacher: Path
) -> None:
    """Two gloo processes under torchrun; rank 1 starts from other weights. After the
    broadcast both students hold rank 0's weights, and so must both EMA copies."""
    script = tmp_path / "ema_check.py"
    script.write_text(EMA_SCRIPT)
    results = tmp_path / "results"
    results.mkdir()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               str(script), str(tiny_clip), str(tiny_clip_teacher), str(pair_file), str(tmp_path / "out"),
               str(results)]
    proc = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    for rank in (0, 1):
        gaps = json.loads((results / f"rank{rank}.json").read_text())
        assert gaps == {"student_vs_rank0": 0.0, "ema_vs_student": 0.0}, (rank, gaps)
