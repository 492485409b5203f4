"""The teacher cache (Arrow file keyed by sample id and fingerprint) and the EMA teacher."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import torch
from conftest import make_images

from vkd.distill.teacher import EmaTeacher, TeacherCache


def _cache(directory: Path, dim: int = 4) -> TeacherCache:
    return TeacherCache(directory, fingerprint="abc123", dim=dim, logit_scale=14.3, teacher="tiny")


def _rows(n: int, dim: int = 4, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.standard_normal((n, dim)).astype(np.float32), rng.standard_normal((n, dim)).astype(np.float32)


def test_cache_round_trip_appends_and_counts(tmp_path: Path) -> None:
    cache = _cache(tmp_path)
    assert len(cache) == 0 and not cache.path.exists()
    text, image = _rows(3)
    cache.add(["a", "b", "c"], text, image)
    assert cache.keys() == frozenset()  # written only at flush
    assert cache.flush() == 3
    assert cache.path == tmp_path / "abc123" and cache.keys() == {"a", "b", "c"}
    assert len(cache.segment_files()) == 1

    got_text, got_image = cache.lookup(["c", "a"])
    np.testing.assert_array_equal(got_text, text[[2, 0]])
    np.testing.assert_array_equal(got_image, image[[2, 0]])
    assert (cache.hits, cache.misses) == (2, 3)

    # a second cache object (another run) appends; rows already present are not duplicated
    other = _cache(tmp_path)
    more_text, more_image = _rows(2, seed=1)
    other.add(["c", "d"], more_text, more_image)
    assert other.flush() == 1
    reopened = _cache(tmp_path)
    assert reopened.keys() == {"a", "b", "c", "d"}
    np.testing.assert_array_equal(reopened.lookup(["c"])[0], text[[2]])  # the first value stays
    np.testing.assert_array_equal(reopened.lookup(["d"])[1], more_image[[1]])

    # append-only: the second run added a segment of its own, the first one's is untouched
    segments = reopened.segment_files()
    assert len(segments) == 2
    with pa.memory_map(str(segments[0])) as source:
        table = pa.ipc.open_file(source).read_all()
    assert table.column("key").to_pylist() == ["a", "b", "c"]
    meta = table.schema.metadata
    assert meta[b"fingerprint"] == b"abc123" and float(meta[b"logit_scale"]) == pytest.approx(14.3)
    assert meta[b"version"] == b"3"
    assert table.schema.field("text").type == pa.list_(pa.float32(), 4)
    assert not list(cache.path.glob(".*.tmp"))  # the temporary files were renamed away


def test_cache_rejects_a_file_of_another_dimension(tmp_path: Path) -> None:
    cache = _cache(tmp_path, dim=4)
    cache.add(["a"], *_rows(1))
    cache.flush()
    with pytest.raises(ValueError, match=r"abc123/\S+\.arrow: not a teacher cache for a 8-d teacher"):
        _cache(tmp_path, dim=8)


def test_ema_update_matches_the_formula(tiny_clip: Path) -> None:
    """One update by hand: ema = m·ema + (1 − m)·student, for trained weights only."""
    from vkd.models import load_encoder

    student = load_encoder(tiny_clip, device="cpu")
    student.model.requires_grad_(False)
    student.model.text_projection.weight.requires_grad_(True)
    ema = EmaTeacher(student, momentum=0.9, every=1)
    before = student.model.text_projection.weight.detach().clone()
    frozen_before = ema.encoder.model.visual_projection.weight.detach().clone()
    with torch.no_grad():
        student.model.text_projection.weight.add_(1.0)
        student.model.visual_projection.weight.add_(1.0)  # frozen: the EMA ignores it
    ema.update()
    expected = 0.9 * before + 0.1 * (before + 1.0)
    torch.testing.assert_close(ema.encoder.model.text_projection.weight, expected, rtol=0, atol=1e-6)
    torch.testing.assert_close(ema.encoder.model.visual_projection.weight, frozen_before, rtol=0, atol=0)
    assert ema.encoder.model is not student.model and ema.updates == 1
    assert not any(p.requires_grad for p in ema.encoder.model.parameters())
    assert set(ema.state_dict()) == {"text_projection.weight"}

    # the EMA teacher embeds with its own (averaged) weights
    inputs = student.tokenize(["a red car"])
    with torch.no_grad():
        out = ema.output([inputs], [student.preprocess(make_images(1))])
    assert out.text.shape == (1, student.dim) and torch.allclose(out.text.norm(dim=-1), torch.ones(1))
