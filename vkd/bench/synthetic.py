"""Structured synthetic embedding corpora for the search benchmark.

Corpora of 100k or 1M images cannot be encoded on a CPU inside a benchmark run, so the
search benchmark searches vectors made here, optionally mixed with real encoded vectors.
The model is deliberately simple and stated in every result:

* **The teacher space is the truth.** It has a decaying spectrum, as real embeddings do:
  noise along direction j (of a random basis) has variance proportional to
  ``(j + 1) ** -decay``. Cluster anchors are points on the unit sphere drawn from that
  spectrum, or, when real vectors are given, real image vectors plus such noise, so
  synthetic items are variants of real images. Cluster sizes follow a power law: cluster k
  (in a random order) holds a share proportional to ``(k + 1) ** -a``. An item is its
  anchor plus noise, L2-normalised.
* **The student is a noisy projection of the teacher.** ``student = normalise(teacher @ M + e)``
  with one fixed map ``M`` for the whole corpus (projection onto the teacher space's top
  ``student_dim`` directions, then a random rotation) and isotropic Gaussian ``e``. With
  real vectors the same map carries each synthetic item's teacher-space deviation from its
  anchor into the student space, around the anchor's real student vector:
  ``student = normalise(anchor_student + (teacher - anchor_teacher) @ M + e)`` — which is the
  formula above when ``anchor_student = anchor_teacher @ M``. Noise is then measured in
  units of each space's spread (the real vectors' RMS distance from their mean), so the
  variants sit as close to their real image as the model's own vectors are to each other.
* **Queries are noisy copies of corpus items**, so every query has a known right answer
  (its ground truth): ``query_teacher = normalise(item_teacher + n)`` and the query's
  student vector is its own noisy projection through the same ``M``. Real queries (encoded
  captions) keep their real image as ground truth.

Everything depends only on the arguments and the seed: corpora are generated in fixed-size
chunks, each from its own seeded generator, so the same call gives identical arrays and
memory stays bounded (teacher vectors are kept as float16, as the index stores them).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

CHUNK_ROWS = 65_536
GENERATOR_NAME = "vkd.bench.synthetic.make_corpus"


@dataclass
class RealVectors:
    """Encoded vectors of a real pair set, from both models.

    Rows of ``*_images`` are unique images; rows of ``*_texts`` are captions and
    ``text_to_image[i]`` is the image row of caption ``i``.
    """

    student_images: np.ndarray
    teacher_images: np.ndarray
    student_texts: np.ndarray
    teacher_texts: np.ndarray
    text_to_image: np.ndarray

    def __post_init__(self) -> None:
        n_images, n_texts = len(self.student_images), len(self.student_texts)
        if len(self.teacher_images) != n_images or len(self.teacher_texts) != n_texts:
            raise ValueError(
                f"real vectors disagree in counts: student {n_images} images / {n_texts} texts, "
                f"teacher {len(self.teacher_images)} images / {len(self.teacher_texts)} texts"
            )
        if self.text_to_image.shape != (n_texts,):
            raise ValueError(f"text_to_image must have one entry per text ({n_texts}), got {self.text_to_image.shape}")
        if n_images == 0 or n_texts == 0:
            raise ValueError("real vectors need at least one image and one text")


@dataclass
class VectorCorpus:
    """A searchable corpus with queries and ground truth.

    ``student`` float32 [n, ds] and ``teacher`` float16 [n, dt], both L2-normalised rows;
    ``query_student`` float32 [q, ds], ``query_teacher`` float32 [q, dt];
    ``ground_truth[i]`` is the corpus row that answers query ``i``. The first ``n_real`` corpus
    rows and the first ``n_real_queries`` queries are real encoded vectors.
    """

    student: np.ndarray
    teacher: np.ndarray
    query_student: np.ndarray
    query_teacher: np.ndarray
    ground_truth: np.ndarray
    n_real: int = 0
    n_real_queries: int = 0
    description: dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.student)

    @property
    def n_queries(self) -> int:
        return len(self.query_student)


def normalize_rows(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def power_law_shares(n_clusters: int, exponent: float, rng: np.random.Generator) -> np.ndarray:
    """Cluster shares proportional to ``(rank + 1) ** -exponent``, ranks in a random order."""
    if n_clusters < 1:
        raise ValueError(f"n_clusters={n_clusters}: need at least one cluster")
    if exponent < 0:
        raise ValueError(f"exponent={exponent}: a power-law exponent must be >= 0 (0 = equal sizes)")
    shares = (np.arange(n_clusters, dtype=np.float64) + 1.0) ** -exponent
    shares /= shares.sum()
    return shares[rng.permutation(n_clusters)]


def default_clusters(n_corpus: int) -> int:
    # about sqrt(n) clusters: 100 at 10k, 1000 at 1M, like coarse topics of a photo collection
    return int(max(16, round(np.sqrt(n_corpus))))


def spectrum_basis(teacher_dim: int, decay: float, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """(basis [dt, dt] with one unit direction per row, scales [dt]) of a power-law spectrum.

    Direction j carries variance proportional to ``(j + 1) ** -decay`` (real embeddings put
    most of their variance in a few directions); scales are normalised so that the squared
    scales sum to ``teacher_dim`` and a noise level keeps meaning "norm relative to a unit vector".
    """
    if decay < 0:
        raise ValueError(f"spectrum_decay={decay}: must be >= 0 (0 = isotropic)")
    scales = (np.arange(teacher_dim, dtype=np.float64) + 1.0) ** (-decay / 2.0)
    scales *= np.sqrt(teacher_dim / np.sum(scales**2))
    basis = np.linalg.qr(rng.standard_normal((teacher_dim, teacher_dim)))[0].T
    return basis.astype(np.float32), scales.astype(np.float32)


def rms_spread(vectors: np.ndarray) -> float:
    """RMS distance of the rows from their mean (about 1 for random unit vectors)."""
    return float(np.sqrt(np.mean(np.sum((vectors - vectors.mean(axis=0)) ** 2, axis=1))))


def top_subspace_map(basis: np.ndarray, student_dim: int, rng: np.random.Generator) -> np.ndarray:
    """[dt, ds]: project onto the ``student_dim`` highest-variance directions, then rotate randomly."""
    teacher_dim = basis.shape[0]
    keep = min(student_dim, teacher_dim)
    rotation = np.linalg.qr(rng.standard_normal((student_dim, student_dim)))[0][:keep]
    return (basis[:keep].T @ rotation).astype(np.float32)


def make_corpus(
    n_corpus: int,
    n_queries: int,
    *,
    student_dim: int = 64,
    teacher_dim: int = 128,
    n_clusters: int | None = None,
    size_exponent: float = 1.0,
    spectrum_decay: float = 1.0,
    cluster_spread: float = 0.9,
    centre_spread: float = 0.35,
    query_noise: float = 0.9,
    student_noise: float | None = None,
    real: RealVectors | None = None,
    seed: int = 0,
) -> VectorCorpus:
    """A corpus of ``n_corpus`` rows (real ones first) and ``n_queries`` queries.

    Noise levels are norms in units of each space's spread (1 for random unit vectors; with
    ``real``, the real vectors' RMS distance from their mean), shaped in the teacher space
    by the power-law spectrum (per-direction std = level * spread * scale_j / sqrt(dim)):
    ``cluster_spread`` of items around their anchor, ``centre_spread`` of anchors around
    the real image they copy (real vectors only), ``query_noise`` of a query around its item;
    ``student_noise`` (default 0.3) is isotropic noise added in the student space after the map.

    The spectrum lies in random directions; the map projects onto its top ``student_dim``
    directions and rotates randomly. With ``real``, the dims come from the real vectors,
    anchors are real image vectors in both spaces, the map is scaled by the ratio of the
    student and teacher spreads, the real images are the first corpus rows and the real
    captions the first queries (at most half of ``n_queries``).
    """
    if n_corpus < 1 or n_queries < 1:
        raise ValueError(f"n_corpus={n_corpus}, n_queries={n_queries}: both must be positive")
    noise_level = 0.3 if student_noise is None else student_noise
    for name, value in (("cluster_spread", cluster_spread), ("centre_spread", centre_spread),
                        ("query_noise", query_noise), ("student_noise", noise_level)):
        if value < 0:
            raise ValueError(f"{name}={value}: a noise level cannot be negative")
    rng = np.random.default_rng([seed, 1])
    n_real = n_real_queries = 0
    spread = student_spread = 1.0  # random unit vectors lie at RMS distance ~1 from their mean
    if real is not None:
        student_dim = real.student_images.shape[1]
        teacher_dim = real.teacher_images.shape[1]
        real_teacher_images = normalize_rows(real.teacher_images)
        real_student_images = normalize_rows(real.student_images)
        n_real = min(len(real.student_images), n_corpus)
        # at most half the queries are real, so both kinds are measured
        n_real_queries = min(len(real.student_texts), n_queries // 2)
        # noise relative to how spread the real vectors are: synthetic variants of a real image
        # sit as far from it, relatively, whether the model's vectors fill the sphere or a cone
        spread = rms_spread(real_teacher_images)
        student_spread = rms_spread(real_student_images)
    basis, scales = spectrum_basis(teacher_dim, spectrum_decay, rng)
    # deviations keep their size relative to each space's spread through the map
    mapping = top_subspace_map(basis, student_dim, rng) * np.float32(student_spread / spread)
    projection_noise = noise_level * student_spread
    source = (f"projection onto the {min(student_dim, teacher_dim)} highest-variance directions of the "
              f"teacher space (power-law spectrum, decay {spectrum_decay}, random directions), then a random "
              "rotation")
    if real is not None:
        source += ("; scaled by the ratio of the real student and teacher spreads and applied to each "
                   "synthetic vector's deviation from its real anchor")
    n_synth = n_corpus - n_real
    clusters = n_clusters if n_clusters is not None else default_clusters(n_corpus)

    # per-direction std spread * scale_j / sqrt(dt); float32 throughout for speed
    direction_std = (spread * scales / np.sqrt(teacher_dim)).astype(np.float32)
    noise_scale = np.float32(projection_noise / np.sqrt(student_dim))

    def shaped_noise(noise_rng: np.random.Generator, rows: int) -> np.ndarray:
        draws = noise_rng.standard_normal((rows, teacher_dim), dtype=np.float32)
        return (draws * direction_std) @ basis

    # Every synthetic vector hangs off its cluster's anchor in both spaces: the student
    # vector is the anchor's student vector plus the map of the teacher-space deviation,
    # plus noise. Without real vectors the student anchor is the map of the teacher anchor,
    # so this is just normalise(teacher @ M + e); with them it is the real image's student
    # vector, so synthetic variants of a real image surround it in both models' spaces.
    def project(teacher: np.ndarray, ids: np.ndarray, noise_rng: np.random.Generator) -> np.ndarray:
        noise = noise_rng.standard_normal((len(teacher), student_dim), dtype=np.float32)
        deviation = teacher - centres_teacher[ids]
        return normalize_rows(centres_student[ids] + deviation @ mapping + noise_scale * noise)

    if real is not None:
        picks = rng.integers(0, len(real_teacher_images), size=clusters)
        centres_teacher = normalize_rows(real_teacher_images[picks] + centre_spread * shaped_noise(rng, clusters))
        centres_student = real_student_images[picks] + (centres_teacher - real_teacher_images[picks]) @ mapping
    else:
        centres_teacher = normalize_rows(shaped_noise(rng, clusters))
        centres_student = centres_teacher @ mapping
    shares = power_law_shares(clusters, size_exponent, rng)

    student = np.empty((n_corpus, student_dim), dtype=np.float32)
    teacher = np.empty((n_corpus, teacher_dim), dtype=np.float16)
    assignment = np.empty(n_synth, dtype=np.int64)
    if n_real:
        student[:n_real] = real_student_images[:n_real]
        teacher[:n_real] = real_teacher_images[:n_real]
    for chunk, start in enumerate(range(0, n_synth, CHUNK_ROWS)):
        stop = min(start + CHUNK_ROWS, n_synth)
        chunk_rng = np.random.default_rng([seed, 2, chunk])
        ids = chunk_rng.choice(clusters, size=stop - start, p=shares)
        items = normalize_rows(centres_teacher[ids]
                               + np.float32(cluster_spread) * shaped_noise(chunk_rng, stop - start))
        teacher[n_real + start:n_real + stop] = items
        student[n_real + start:n_real + stop] = project(items, ids, chunk_rng)
        assignment[start:stop] = ids

    query_rng = np.random.default_rng([seed, 3])
    query_teacher = np.empty((n_queries, teacher_dim), dtype=np.float32)
    query_student = np.empty((n_queries, student_dim), dtype=np.float32)
    ground_truth = np.empty(n_queries, dtype=np.int64)
    if n_real_queries:
        # captions whose image made it into the corpus (all of them unless n_corpus < images)
        keep = np.flatnonzero(np.asarray(real.text_to_image) < n_real)[:n_real_queries]
        n_real_queries = len(keep)
        query_teacher[:n_real_queries] = normalize_rows(real.teacher_texts[keep])
        query_student[:n_real_queries] = normalize_rows(real.student_texts[keep])
        ground_truth[:n_real_queries] = np.asarray(real.text_to_image)[keep]
    n_synth_queries = n_queries - n_real_queries
    if n_synth_queries and n_synth == 0:
        raise ValueError(f"n_corpus={n_corpus} holds only real vectors, so {n_synth_queries} synthetic "
                         "queries have no item to copy; raise n_corpus or lower n_queries")
    if n_synth_queries:
        targets = query_rng.choice(n_synth, size=n_synth_queries, replace=n_synth_queries > n_synth)
        queries = normalize_rows(teacher[n_real + targets].astype(np.float32)
                                 + query_noise * shaped_noise(query_rng, n_synth_queries))
        query_teacher[n_real_queries:] = queries
        query_student[n_real_queries:] = project(queries, assignment[targets], query_rng)
        ground_truth[n_real_queries:] = n_real + targets

    sizes = np.bincount(assignment, minlength=clusters) if n_synth else np.zeros(clusters, dtype=np.int64)
    description = {
        "generator": GENERATOR_NAME,
        "summary": describe_model(real is not None),
        "seed": seed,
        "n_corpus": n_corpus,
        "n_real_items": n_real,
        "n_synthetic_items": n_synth,
        "n_queries": n_queries,
        "n_real_queries": n_real_queries,
        "n_synthetic_queries": n_synth_queries,
        "student_dim": student_dim,
        "teacher_dim": teacher_dim,
        "n_clusters": clusters,
        "cluster_size_exponent": size_exponent,
        "largest_cluster_items": int(sizes.max()) if n_synth else 0,
        "smallest_cluster_items": int(sizes.min()) if n_synth else 0,
        "spectrum_decay": spectrum_decay,
        "cluster_spread": cluster_spread,
        "centre_spread": centre_spread if real is not None else None,
        "query_noise": query_noise,
        "student_noise": noise_level,
        "noise_unit_teacher": spread,
        "noise_unit_student": student_spread,
        "teacher_to_student_map": source,
        "teacher_dtype": "float16",
    }
    return VectorCorpus(student=student, teacher=teacher, query_student=query_student,
                        query_teacher=query_teacher, ground_truth=ground_truth, n_real=n_real,
                        n_real_queries=n_real_queries, description=description)


def describe_model(with_real: bool) -> str:
    """One paragraph saying exactly how the corpus was made (goes into JSON and Markdown)."""
    base = (
        "Synthetic vectors, not encoded images: a mixture of Gaussian clusters on the unit sphere of the "
        "teacher space with power-law cluster sizes (share of cluster k proportional to (k+1)^-a) and "
        "noise shaped by a decaying spectrum (variance of direction j proportional to (j+1)^-decay); the "
        "teacher space is the truth and each student vector is a noisy projection of its teacher vector "
        "through one fixed map (onto the top student-dimension directions, then a random rotation) plus "
        "Gaussian noise, L2-normalised; "
        "queries are noisy copies of corpus items, whose row is the query's ground truth."
    )
    if with_real:
        return base + (
            " The corpus also holds the real encoded test images (student and teacher vectors) and the "
            "queries include the real encoded captions with their images as ground truth. Cluster anchors "
            "are real images: each synthetic vector is a variant of one, its teacher vector the real teacher "
            "vector plus noise and its student vector the real student vector plus the projected teacher "
            "deviation plus noise, with noise in units of each space's spread (RMS distance of the real "
            "vectors from their mean)."
        )
    return base + " No real vectors were available: every vector is synthetic."
