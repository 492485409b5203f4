"""The teacher cache answers for image content, not for image paths: rows are keyed by the
sha256 of the image file and the caption (the teacher by the file's fingerprint)."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pytest
from PIL import Image

from vkd.config import DistillConfig
from vkd.data.pairs import PairSet, read_pairs, write_pairs
from vkd.distill.teacher import CACHE_FORMAT, TeacherCache, cache_key
from vkd.distill.trainer import distill

N_PAIRS = 16  # two batches of 8


def _synth(root: Path, seed: int) -> PairSet:
    from vkd.data.synth import generate

    generate(root, 8, seed=seed, size=32, val_frac=0.0, test_frac=0.0)
    return read_pairs(root / "train.jsonl")


def _write(path: Path, records: list[dict[str, Any]]) -> Path:
    write_pairs(path, records)
    return path


def _records(pairs: PairSet, root: Path) -> list[dict[str, Any]]:
    """The first N_PAIRS pairs, image paths as written relative to ``root``."""
    return [{"image": p.image.relative_to(root).as_posix(), "text": p.text, "image_id": p.image_id}
            for p in list(pairs)[:N_PAIRS]]


def _run(out: Path, data: Path, student: Path, teacher: Path, cache_dir: Path) -> dict[str, int]:
    config = DistillConfig.from_dict({
        "model_name_or_path": str(student), "teacher_model_name_or_path": str(teacher),
        "data_path": str(data), "output_dir": str(out), "epochs": 1, "batch_size": 8,
        "learning_rate": 1e-3, "warmup_ratio": 0.0, "logging_steps": 1, "eval_strategy": "no",
        "lora_dropout": 0.0, "distillation_loss_type": ["kl_divergence"], "teacher_cache_dir": str(cache_dir),
    })
    return distill(config).report["teacher_cache"]


def test_rows_follow_image_content_not_paths(tmp_path: Path, tiny_clip: Path, tiny_clip_teacher: Path) -> None:
    cache = tmp_path / "cache"
    a_root, b_root = tmp_path / "a", tmp_path / "b"
    records = _records(_synth(a_root, seed=0), a_root)
    _synth(b_root, seed=1)  # the same file names (images/train/00000.png ...), other pictures
    assert all((b_root / r["image"]).is_file() for r in records)
    a = _write(a_root / "pairs.jsonl", records)
    # the same paths as written and the same captions: until now, the same sample ids
    b = _write(b_root / "pairs.jsonl", records)
    assert read_pairs(a).sample_ids() == read_pairs(b).sample_ids()

    assert _run(tmp_path / "run-a", a, tiny_clip, tiny_clip_teacher, cache) == {"hits": 0, "misses": N_PAIRS}
    # other bytes behind the same names: nothing of a's is reused
    assert _run(tmp_path / "run-b", b, tiny_clip, tiny_clip_teacher, cache) == {"hits": 0, "misses": N_PAIRS}

    # a's images copied elsewhere under other names: every row is found
    moved = tmp_path / "moved"
    (moved / "pics").mkdir(parents=True)
    copies = []
    for i, record in enumerate(records):  # one copy per caption: each its own image
        shutil.copy2(a_root / record["image"], moved / "pics" / f"copy-{i}.png")
        copies.append({**record, "image": f"pics/copy-{i}.png", "image_id": f"copy-{i}"})
    c = _write(moved / "pairs.jsonl", copies)
    assert _run(tmp_path / "run-c", c, tiny_clip, tiny_clip_teacher, cache) == {"hits": N_PAIRS, "misses": 0}

    # one of a's images edited in place (new bytes, same name): its captions miss, the rest hit
    edited = records[0]["image"]
    picture = Image.open(a_root / edited).convert("RGB")
    picture.putpixel((0, 0), tuple(255 - v for v in picture.getpixel((0, 0))))
    picture.save(a_root / edited)
    changed = sum(r["image"] == edited for r in records)
    assert 0 < changed < N_PAIRS
    assert _run(tmp_path / "run-a2", a, tiny_clip, tiny_clip_teacher, cache) == {
        "hits": N_PAIRS - changed, "misses": changed}
    # one folder for the teacher, one segment per run that added rows (runs a, b, a2; c only hit)
    assert [p.name for p in cache.iterdir()] == [next(cache.iterdir()).name]
    assert len(list(next(cache.iterdir()).glob("*.arrow"))) == 3


def test_cache_key_is_content_and_caption() -> None:
    assert cache_key("ab" * 32, "a dog") == cache_key("ab" * 32, "a dog")
    assert cache_key("ab" * 32, "a dog") != cache_key("cd" * 32, "a dog")
    assert cache_key("ab" * 32, "a dog") != cache_key("ab" * 32, "a cat")


def _write_table(path: Path, meta: dict[str, str], key_column: str = "key", dim: int = 4) -> None:
    vector = pa.list_(pa.float32(), dim)
    schema = pa.schema([(key_column, pa.string()), ("text", vector), ("image", vector)], metadata=meta)
    values = pa.array(np.ones(dim, np.float32))
    table = pa.table({key_column: ["path-keyed-id"],
                      "text": pa.FixedSizeListArray.from_arrays(values, dim),
                      "image": pa.FixedSizeListArray.from_arrays(values, dim)}, schema=schema)
    with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_file(sink, schema) as writer:
        writer.write_table(table)


def test_a_version_1_cache_is_ignored_with_a_warning_and_replaced(tmp_path: Path) -> None:
    """Version 1 keyed rows by image path: its rows must not answer, and the file is rebuilt."""
    _write_table(tmp_path / "abc123.arrow", {"format": CACHE_FORMAT, "version": "1", "fingerprint": "abc123",
                                             "dim": "4", "logit_scale": "14.3"}, key_column="sample_id")
    with pytest.warns(UserWarning, match=r"abc123\.arrow: teacher cache format version 1 .*ignored and replaced"):
        cache = TeacherCache(tmp_path, fingerprint="abc123", dim=4, logit_scale=14.3, teacher="tiny")
    assert len(cache) == 0
    cache.add(["k"], np.zeros((1, 4), np.float32), np.zeros((1, 4), np.float32))
    assert cache.flush() == 1 and cache.keys() == {"k"}
    assert not (tmp_path / "abc123.arrow").exists()  # the version 1 file is gone: no warning next time
    (segment,) = cache.segment_files()
    with pa.memory_map(str(segment)) as source:
        table = pa.ipc.open_file(source).read_all()
    assert table.schema.metadata[b"version"] == b"3" and table.column_names == ["key", "text", "image"]


def test_a_cache_file_of_another_fingerprint_is_refused(tmp_path: Path) -> None:
    _write_table(tmp_path / "abc123.arrow", {"format": CACHE_FORMAT, "version": "2", "fingerprint": "other",
                                             "dim": "4", "logit_scale": "14.3"})
    with pytest.raises(ValueError, match=r"abc123\.arrow: holds the rows of teacher fingerprint other"):
        TeacherCache(tmp_path, fingerprint="abc123", dim=4, logit_scale=14.3, teacher="tiny")
