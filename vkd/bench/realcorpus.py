"""Synthetic vector corpora at real embedding sizes (512 … 4096 dimensions) for ``vkd bench real``.

``vkd.bench.synthetic.make_corpus`` shapes every vector with dense d × d maps: at 1M
vectors of 4096 + 2048 dimensions that is about 50 TFLOP, most of an hour on two cores. The
corpora here follow a low-rank model instead, which costs a few TFLOP and is stated in
every result (``describe``):

* **Shared factors.** Every item has ``rank`` latent factors ``f`` whose variances decay as
  a power law (factor j: proportional to ``(j + 1) ** -decay``), as real embeddings put most
  of their variance in a few directions. Items form clusters with power-law sizes (share of
  cluster k proportional to ``(k + 1) ** -size_exponent``): ``f = centre + cluster_spread · z``.
* **The teacher sees all factors**, along ``rank`` random orthonormal directions of its
  space, plus a little isotropic noise of its own: ``teacher = normalise(f @ U_t + e_t)``.
* **The student sees the first ``student_rank`` factors** (the strongest) and more noise:
  ``student = normalise(f[:student_rank] @ U_s + e_s)``. With ``matryoshka`` (the default)
  factor j is student coordinate j, so the coordinates are ordered by importance as a
  Matryoshka-trained model's are, and a prefix of the vector keeps the strongest factors;
  otherwise ``U_s`` is random orthonormal too.
* **Queries are noisy copies of items** (``f_q = f_item + query_noise · z``, projected the
  same way with fresh noise); the item is the query's ground truth.

Noise levels are norms relative to a unit vector (``teacher_noise`` 0.3 means noise of norm
about 0.3). Generation runs in chunks, each from its own seeded generator, so the same call
gives the same arrays; the teacher vectors can be written straight into a caller's float16
array (the benchmark hands in the memory of a FAISS index, so 8 GiB of teacher vectors are
held once).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from vkd.bench.synthetic import VectorCorpus, default_clusters, power_law_shares

CHUNK_ROWS = 32_768
GENERATOR_NAME = "vkd.bench.realcorpus.make_factor_corpus"


@dataclass
class FactorModel:
    """The corpus model's parameters (see the module docstring)."""

    rank: int = 512
    student_rank: int = 448
    decay: float = 0.5
    size_exponent: float = 1.0
    cluster_spread: float = 0.3
    query_noise: float = 1.1
    teacher_noise: float = 0.25
    student_noise: float = 0.4
    matryoshka: bool = True
    n_clusters: int | None = None

    def check(self, student_dim: int, teacher_dim: int) -> None:
        if not 1 <= self.student_rank <= self.rank:
            raise ValueError(f"student_rank={self.student_rank}: must be between 1 and rank={self.rank}")
        if self.rank > teacher_dim or self.student_rank > student_dim:
            raise ValueError(f"rank {self.rank} / student_rank {self.student_rank} exceed the dimensions "
                             f"(teacher {teacher_dim}, student {student_dim})")
        for name in ("cluster_spread", "query_noise", "teacher_noise", "student_noise", "decay", "size_exponent"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name}={getattr(self, name)}: cannot be negative")


def describe(model: FactorModel, student_dim: int, teacher_dim: int) -> str:
    """One paragraph saying exactly how the vectors were made (goes into JSON and Markdown)."""
    order = ("factor j is student coordinate j (coordinates ordered by importance, as a Matryoshka-trained "
             "model's are, so a prefix keeps the strongest factors)" if model.matryoshka
             else "the student's factors lie along random orthonormal directions")
    return (
        f"Synthetic vectors at the real dimensions (student {student_dim}, teacher {teacher_dim}), not encoded "
        f"images: {model.rank} latent factors with power-law variances (factor j proportional to "
        f"(j+1)^-{model.decay}); items in clusters of power-law sizes (exponent {model.size_exponent}), "
        f"spread {model.cluster_spread} around their cluster centre; teacher = normalise(factors along "
        f"{model.rank} random orthonormal directions + isotropic noise of norm {model.teacher_noise}); student = "
        f"normalise(the first {model.student_rank} factors + isotropic noise of norm {model.student_noise}), "
        f"{order}; queries are noisy copies of items (factor noise {model.query_noise}), whose row is the query's "
        "ground truth. Quality figures measure this model, not any trained CLIP or Qwen3-VL."
    )


def _orthonormal_rows(rows: int, dim: int, generator: Any) -> Any:
    """torch [rows, dim] with orthonormal rows (QR of a Gaussian [dim, rows])."""
    import torch

    q = torch.linalg.qr(torch.randn((dim, rows), generator=generator))[0]
    return q.T.contiguous()


def make_factor_corpus(
    n_corpus: int,
    n_queries: int,
    *,
    student_dim: int,
    teacher_dim: int,
    model: FactorModel | None = None,
    seed: int = 0,
    teacher_out: np.ndarray | None = None,
    progress: Any = None,
) -> VectorCorpus:
    """``n_corpus`` items and ``n_queries`` queries of the factor model (module docstring).

    ``teacher_out``: a float16 [n_corpus, teacher_dim] array to write the teacher vectors
    into (else one is allocated). ``progress(rows_done)`` is called after every chunk.
    The arithmetic runs in torch (its random numbers and matrix products are several times
    faster than numpy's here), seeded per chunk, so the arrays depend on the seed only.
    """
    import torch

    model = model or FactorModel()
    model.check(student_dim, teacher_dim)
    if n_corpus < 1 or n_queries < 1:
        raise ValueError(f"n_corpus={n_corpus}, n_queries={n_queries}: both must be positive")
    if teacher_out is not None and (teacher_out.shape != (n_corpus, teacher_dim) or teacher_out.dtype != np.float16):
        raise ValueError(f"teacher_out must be float16 [{n_corpus}, {teacher_dim}], got {teacher_out.dtype} "
                         f"{teacher_out.shape}")

    def generator(*key: int) -> Any:
        # one independent stream per purpose and chunk: the same key gives the same numbers
        return torch.Generator().manual_seed(int(np.random.SeedSequence([seed, *key]).generate_state(1)[0]))

    setup = generator(11)
    r, rs = model.rank, model.student_rank
    std = (torch.arange(r, dtype=torch.float64) + 1.0) ** (-model.decay / 2.0)
    std = (std / torch.sqrt(torch.sum(std**2))).float()  # factor variances sum to 1: |f| ~ 1
    teacher_map = _orthonormal_rows(r, teacher_dim, setup)
    student_map = None if model.matryoshka else _orthonormal_rows(rs, student_dim, setup)
    clusters = model.n_clusters or default_clusters(n_corpus)
    centres = torch.randn((clusters, r), generator=setup) * std
    shares = power_law_shares(clusters, model.size_exponent, np.random.default_rng([seed, 11]))
    t_noise = model.teacher_noise / float(np.sqrt(teacher_dim))
    s_noise = model.student_noise / float(np.sqrt(student_dim))

    def teacher_of(f: Any, gen: Any, half: bool = False) -> np.ndarray:
        out = torch.randn((len(f), teacher_dim), generator=gen).mul_(t_noise)
        out.addmm_(f, teacher_map)
        out = torch.nn.functional.normalize(out, dim=1)
        return (out.half() if half else out).numpy()  # torch narrows to float16 faster than numpy

    def student_of(f: Any, gen: Any) -> np.ndarray:
        out = torch.randn((len(f), student_dim), generator=gen).mul_(s_noise)
        if student_map is None:
            out[:, :rs] += f[:, :rs]
        else:
            out.addmm_(f[:, :rs], student_map)
        return torch.nn.functional.normalize(out, dim=1).numpy()

    query_rng = np.random.default_rng([seed, 12])
    targets = np.sort(query_rng.choice(n_corpus, size=n_queries, replace=n_queries > n_corpus))
    target_factors = torch.empty((n_queries, r))
    teacher = teacher_out if teacher_out is not None else np.empty((n_corpus, teacher_dim), dtype=np.float16)
    student = np.empty((n_corpus, student_dim), dtype=np.float32)
    sizes = np.zeros(clusters, dtype=np.int64)
    for chunk, start in enumerate(range(0, n_corpus, CHUNK_ROWS)):
        stop = min(start + CHUNK_ROWS, n_corpus)
        gen = generator(13, chunk)
        ids = np.random.default_rng([seed, 13, chunk]).choice(clusters, size=stop - start, p=shares)
        sizes += np.bincount(ids, minlength=clusters)
        f = centres[torch.from_numpy(ids)] + model.cluster_spread * (torch.randn((stop - start, r), generator=gen) * std)
        teacher[start:stop] = teacher_of(f, gen, half=True)
        student[start:stop] = student_of(f, gen)
        lo, hi = np.searchsorted(targets, [start, stop])
        target_factors[lo:hi] = f[torch.from_numpy(targets[lo:hi] - start)]
        if progress is not None:
            progress(stop)
    query_gen = generator(12)
    noisy = target_factors + model.query_noise * (torch.randn((n_queries, r), generator=query_gen) * std)
    query_teacher = teacher_of(noisy, query_gen)
    query_student = student_of(noisy, query_gen)
    order = query_rng.permutation(n_queries)  # targets were sorted to fill them chunk by chunk
    description = {
        "generator": GENERATOR_NAME,
        "summary": describe(model, student_dim, teacher_dim),
        "seed": seed,
        "n_corpus": n_corpus,
        "n_queries": n_queries,
        "student_dim": student_dim,
        "teacher_dim": teacher_dim,
        "n_clusters": clusters,
        "largest_cluster_items": int(sizes.max()),
        "smallest_cluster_items": int(sizes.min()),
        "teacher_dtype": "float16",
        **{f"model_{key}": value for key, value in asdict(model).items()},
    }
    return VectorCorpus(student=student, teacher=teacher, query_student=query_student[order],
                        query_teacher=query_teacher[order], ground_truth=targets[order].astype(np.int64),
                        description=description)
