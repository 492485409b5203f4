"""The pure parts of the benchmarks: synthetic vectors, timing math, tables, machine record."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from vkd.bench.report import (
    MACHINE_KEYS,
    REQUIRED_KEYS,
    BenchResult,
    Figure,
    format_cell,
    machine_info,
    markdown_table,
    read_result,
    to_jsonable,
    write_result,
)
from vkd.bench.search import overlap_at_k, recall_at_k
from vkd.bench.synthetic import RealVectors, make_corpus, power_law_shares, rms_spread
from vkd.bench.timing import PeakMemory, latency_summary, qps_from_batches, throughput, time_calls

# ---------------------------------------------------------------- synthetic vectors


def test_corpus_shapes_dtypes_and_unit_norm():
    corpus = make_corpus(3000, 50, student_dim=16, teacher_dim=32, seed=1)
    assert corpus.student.shape == (3000, 16) and corpus.student.dtype == np.float32
    assert corpus.teacher.shape == (3000, 32) and corpus.teacher.dtype == np.float16
    assert corpus.query_student.shape == (50, 16) and corpus.query_teacher.shape == (50, 32)
    for vectors, tolerance in ((corpus.student, 1e-5), (corpus.query_student, 1e-5),
                               (corpus.query_teacher, 1e-5), (corpus.teacher, 2e-3)):
        norms = np.linalg.norm(vectors.astype(np.float64), axis=1)
        np.testing.assert_allclose(norms, 1.0, atol=tolerance)
    assert corpus.ground_truth.shape == (50,)
    assert corpus.ground_truth.min() >= 0 and corpus.ground_truth.max() < 3000
    assert corpus.description["n_clusters"] == 55  # ~sqrt(3000)
    assert corpus.description["largest_cluster_items"] > corpus.description["smallest_cluster_items"]


def test_corpus_is_deterministic_in_the_seed():
    a = make_corpus(2000, 20, student_dim=8, teacher_dim=16, seed=3)
    b = make_corpus(2000, 20, student_dim=8, teacher_dim=16, seed=3)
    c = make_corpus(2000, 20, student_dim=8, teacher_dim=16, seed=4)
    for name in ("student", "teacher", "query_student", "query_teacher", "ground_truth"):
        np.testing.assert_array_equal(getattr(a, name), getattr(b, name))
    assert not np.array_equal(a.student, c.student)


def test_queries_find_their_item_and_teacher_beats_student():
    corpus = make_corpus(4000, 200, student_dim=16, teacher_dim=64, seed=0)
    teacher = corpus.teacher.astype(np.float32)

    def recall(vectors: np.ndarray, queries: np.ndarray) -> float:
        top = np.argsort(-(queries @ vectors.T), axis=1)[:, :10]
        return recall_at_k(top, corpus.ground_truth)

    teacher_recall = recall(teacher, corpus.query_teacher)
    student_recall = recall(corpus.student, corpus.query_student)
    # ground truth is real: far above chance (10 / 4000), and the noisy projection costs recall
    assert teacher_recall > 80.0
    assert 5.0 < student_recall < teacher_recall


def test_cluster_sizes_follow_the_power_law():
    shares = power_law_shares(100, 1.0, np.random.default_rng(0))
    assert shares.sum() == pytest.approx(1.0)
    ordered = np.sort(shares)[::-1]
    assert ordered[0] / ordered[9] == pytest.approx(10.0)
    flat = power_law_shares(10, 0.0, np.random.default_rng(0))
    np.testing.assert_allclose(flat, 0.1)
    with pytest.raises(ValueError, match="exponent"):
        power_law_shares(10, -1.0, np.random.default_rng(0))


def test_real_vectors_come_first_and_keep_their_ground_truth():
    rng = np.random.default_rng(0)
    teacher_images = rng.standard_normal((40, 24)).astype(np.float32)
    student_images = teacher_images[:, :12] + 0.1 * rng.standard_normal((40, 12)).astype(np.float32)
    text_to_image = np.repeat(np.arange(40), 2)
    real = RealVectors(student_images, teacher_images, student_images[text_to_image],
                       teacher_images[text_to_image], text_to_image)
    corpus = make_corpus(500, 30, real=real, seed=0)
    assert corpus.n_real == 40 and corpus.n_real_queries == 15  # at most half the queries
    assert corpus.student.shape[1] == 12 and corpus.teacher.shape[1] == 24
    unit = teacher_images[0] / np.linalg.norm(teacher_images[0])
    np.testing.assert_allclose(corpus.teacher[0].astype(np.float32), unit, atol=2e-3)
    np.testing.assert_array_equal(corpus.ground_truth[:15], text_to_image[:15])
    assert (corpus.ground_truth[15:] >= 40).all()  # synthetic queries copy synthetic items
    assert "real encoded test images" in corpus.description["summary"]


def test_real_anchored_variants_surround_their_real_image():
    rng = np.random.default_rng(1)
    # real vectors in a narrow cone, as a trained model's are
    teacher_images = 3.0 + rng.standard_normal((50, 32)).astype(np.float32)
    student_images = 3.0 + rng.standard_normal((50, 16)).astype(np.float32)
    real = RealVectors(student_images, teacher_images, student_images, teacher_images, np.arange(50))
    corpus = make_corpus(2000, 20, real=real, n_clusters=50, seed=0)
    assert corpus.description["noise_unit_teacher"] == pytest.approx(
        rms_spread(corpus.teacher[:50].astype(np.float32)), rel=1e-3)  # float16 storage
    synthetic_t = corpus.teacher[50:].astype(np.float32)
    synthetic_s = corpus.student[50:]
    # each variant's nearest real image is the same one in both spaces far more often than chance
    nearest_t = np.argmax(synthetic_t @ corpus.teacher[:50].astype(np.float32).T, axis=1)
    nearest_s = np.argmax(synthetic_s @ corpus.student[:50].T, axis=1)
    assert np.mean(nearest_t == nearest_s) > 0.5
    # variants stay inside the real cone: as close to the real mean direction as real images are
    mean = corpus.teacher[:50].astype(np.float32).mean(axis=0)
    mean /= np.linalg.norm(mean)
    assert np.median(synthetic_t @ mean) > 0.8 * np.median(corpus.teacher[:50].astype(np.float32) @ mean)


def test_corpus_rejects_bad_arguments():
    with pytest.raises(ValueError, match="positive"):
        make_corpus(0, 10)
    with pytest.raises(ValueError, match="query_noise"):
        make_corpus(100, 10, query_noise=-1.0)


# ---------------------------------------------------------------- quality and timing math


def test_recall_and_overlap():
    found = np.array([[1, 2, 3], [4, 5, 6]])
    assert recall_at_k(found, np.array([3, 7]), k=3) == 50.0
    assert recall_at_k(found, np.array([3, 7]), k=2) == 0.0
    reference = np.array([[3, 2, 9], [-1, -1, -1]])
    # query 0 shares 2 of 3, padding never counts
    assert overlap_at_k(found, reference, k=3) == pytest.approx(100.0 * (2 / 3) / 2)


def test_latency_summary_percentiles_in_ms():
    seconds = [i / 1000.0 for i in range(1, 101)]  # 1..100 ms
    summary = latency_summary(seconds)
    assert summary["n"] == 100
    assert summary["p50_ms"] == pytest.approx(50.5)
    assert summary["p95_ms"] == pytest.approx(95.05)
    assert summary["p99_ms"] == pytest.approx(99.01)
    assert summary["min_ms"] == pytest.approx(1.0) and summary["max_ms"] == pytest.approx(100.0)
    assert latency_summary([0.002])["p99_ms"] == pytest.approx(2.0)
    with pytest.raises(ValueError, match="at least one"):
        latency_summary([])
    with pytest.raises(ValueError, match="finite"):
        latency_summary([float("nan")])


def test_throughput_and_qps():
    assert throughput(100, 2.0) == 50.0
    assert qps_from_batches(32, [0.5, 0.5]) == pytest.approx(64.0)
    assert qps_from_batches(1, [0.01] * 10) == pytest.approx(100.0)
    with pytest.raises(ValueError, match="positive"):
        throughput(10, 0.0)


def test_time_calls_counts_warmup_and_repeats():
    calls = []
    timing = time_calls(lambda: calls.append(1) or len(calls), repeats=4, warmup=2)
    assert len(calls) == 6 and timing.repeats == 4 and timing.warmup == 2
    assert timing.result == 6
    assert all(s >= 0 for s in timing.seconds)
    assert timing.summary()["n"] == 4 and timing.summary()["warmup"] == 2
    extended = time_calls(lambda: None, repeats=1, warmup=0, min_seconds=0.005, max_repeats=10**6)
    assert extended.repeats > 1 and extended.total_s >= 0.005


def test_peak_memory_sees_an_allocation():
    with PeakMemory(interval=0.001) as peak:
        block = np.ones(64 * 1024 * 1024 // 8)  # 64 MiB, touched
        block.sum()
        # the sampler thread may not be scheduled while the block lives (it failed once in CI):
        # sample at the known peak too, so the test does not depend on thread timing
        peak.sample()
        del block
    assert peak.delta_bytes > 32 * 1024 * 1024
    assert set(peak.summary()) == {"peak_rss_mib", "start_rss_mib", "peak_delta_mib"}


# ---------------------------------------------------------------- tables, JSON, machine


def test_markdown_table_alignment_and_formatting():
    table = markdown_table(["model", "R@1", "params"], [["teacher", 81.2345, 1_234_567], ["student", None, 12]])
    lines = table.splitlines()
    assert lines[0] == "| model | R@1 | params |"
    assert lines[1] == "| :--- | ---: | ---: |"
    assert lines[2] == "| teacher | 81.2 | 1,234,567 |"
    assert lines[3] == "| student | - | 12 |"
    with pytest.raises(ValueError, match="row 0 has 2 cells"):
        markdown_table(["a", "b", "c"], [[1, 2]])


def test_format_cell():
    assert format_cell(0.012345) == "0.0123"
    assert format_cell(1234.5) == "1,234"
    assert format_cell(0.0) == "0"
    assert format_cell(True) == "yes"
    assert format_cell("a|b") == "a\\|b"


def test_to_jsonable_rejects_non_finite_and_converts_numpy():
    data = to_jsonable({"a": np.float32(1.5), "b": np.arange(3), "c": (np.int64(2), None)})
    assert data == {"a": 1.5, "b": [0, 1, 2], "c": [2, None]}
    with pytest.raises(ValueError, match=r"results\.x\[1\]"):
        to_jsonable({"x": [1.0, math.inf]})


def test_machine_info_keys():
    info = machine_info()
    for key in MACHINE_KEYS:
        assert key in info
    assert set(info["libraries"]) == {"torch", "transformers", "faiss", "onnxruntime", "numpy", "pyarrow"}
    assert info["libraries"]["numpy"] == np.__version__
    assert info["logical_cores"] >= 1 and info["cpu_model"]
    assert set(info["threads"]) == {"torch", "faiss", "onnxruntime"}


def test_write_result_files(tmp_path):
    def draw(fig):
        ax = fig.subplots()
        ax.plot([1, 2], [3, 4])

    result = BenchResult("demo", {"value": np.float64(2.5)}, markdown_table(["x"], [[1]]),
                         notes=["a note"], figures=[Figure("demo.png", draw)])
    paths = write_result(tmp_path, result, command="vkd bench demo", quick=True,
                         started_at="2026-01-01T00:00:00+00:00", duration_s=1.25, machine=machine_info())
    assert [p.name for p in paths] == ["demo.json", "demo.md", "demo.png"]
    data = read_result(tmp_path / "demo.json")
    assert set(REQUIRED_KEYS) <= set(data)
    assert data["results"] == {"value": 2.5} and data["figures"] == ["demo.png"]
    markdown = (tmp_path / "demo.md").read_text()
    assert "| x |" in markdown and "> a note" in markdown and "vkd bench demo" in markdown
    assert (tmp_path / "demo.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not list(tmp_path.glob(".*tmp*"))
    json.loads((tmp_path / "demo.json").read_text())
