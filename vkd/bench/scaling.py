"""Measurements behind docs/scaling.md, at 1M vectors on this machine.

docs/scaling.md lays out indexes of 100M and 1B images from per-vector formulas; this
measures the same structures at 1M (the synthetic corpus of ``vkd.bench.synthetic``: a
student of 512 dims, the teacher of 768, CLIP ViT-B/32 → L/14's dimensions) so each formula
has a measured point:

1. **IVF-PQ trained once, shards added separately**: one ``IVF{nlist},PQ{m}x8`` trained on a
   sample, cloned empty for each of ``shards`` shards, each shard's rows added to its own
   copy and written to its own file; every shard searched for the top ``k1`` and the lists
   merged with ``vkd.retrieval.stages.merge_candidates`` (what a search process per shard,
   or per host, returns and a front end merges); candidate recall: the share of the exact
   top 10 found among the merged ``k1``.
2. **On-disk inverted lists**: the shards' lists merged into one ``.ivfdata`` file
   (``faiss.contrib.ondisk.merge_ondisk``), the index opened memory-mapped; its resident
   size and search time.
3. **HNSW** (M=32) over a 128-d prefix of the student vectors: bytes per vector and build
   rate (the synthetic student is not Matryoshka-trained, so recall on its prefix means
   nothing and is not reported).
4. **Teacher rerank gather**: ``k1`` rows of a memory-mapped float16 teacher matrix per
   query, read in file order, as stage 2 reads them; warm page cache (the machine is shared:
   the cache is not dropped), so this is the CPU side; the disk side is the formula in the doc.

    python -m vkd.bench.scaling --work /tmp/scaling --out scaling.json [--n 1000000]
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import click
import numpy as np


def _rss() -> int:
    from vkd.bench.timing import rss_bytes

    return rss_bytes()


def run(work: Path, *, n: int = 1_000_000, queries: int = 200, shards: int = 4, nlist: int = 1024, m: int = 64,
        train_rows: int = 50_000, nprobe: int = 64, k1: int = 1000, hnsw_rows: int = 200_000,
        prefix: int = 128, threads: int | None = None) -> dict[str, Any]:
    import faiss
    from faiss.contrib.ondisk import merge_ondisk

    from vkd.bench.synthetic import make_corpus
    from vkd.retrieval.stages import merge_candidates

    if threads:
        faiss.omp_set_num_threads(threads)
    work.mkdir(parents=True, exist_ok=True)
    out: dict[str, Any] = {"n": n, "queries": queries, "shards": shards, "faiss": faiss.__version__}
    tick = time.perf_counter()
    corpus = make_corpus(n, queries, student_dim=512, teacher_dim=768, seed=0)
    student = np.ascontiguousarray(corpus.student, dtype=np.float32)
    q = np.ascontiguousarray(corpus.query_student, dtype=np.float32)
    dim = student.shape[1]
    out["corpus_seconds"] = time.perf_counter() - tick
    out["corpus"] = corpus.description

    exact = faiss.IndexFlatIP(dim)
    exact.add(student)
    _, truth = exact.search(q, 10)
    del exact

    # 1. IVF-PQ: trained once on a sample, cloned per shard, shards added separately
    rng = np.random.default_rng(0)
    sample = student[rng.choice(n, size=min(train_rows, n), replace=False)]
    trained = faiss.index_factory(dim, f"IVF{nlist},PQ{m}x8", faiss.METRIC_INNER_PRODUCT)
    tick = time.perf_counter()
    trained.train(sample)
    out["ivfpq"] = {"nlist": nlist, "m": m, "nbits": 8, "train_rows": len(sample),
                    "train_seconds": time.perf_counter() - tick, "nprobe": nprobe, "k1": k1}
    trained_path = work / "trained.faiss"
    faiss.write_index(trained, str(trained_path))
    bounds = np.linspace(0, n, shards + 1).astype(int)
    shard_files, add_seconds, search_seconds, per_shard = [], 0.0, 0.0, []
    for s in range(shards):
        index = faiss.clone_index(trained)
        rows = np.arange(bounds[s], bounds[s + 1])
        tick = time.perf_counter()
        index.add_with_ids(student[rows], rows.astype(np.int64))
        add_seconds += time.perf_counter() - tick
        faiss.extract_index_ivf(index).nprobe = nprobe
        tick = time.perf_counter()
        scores, ids = index.search(q, k1)
        search_seconds += time.perf_counter() - tick
        per_shard.append((scores, ids))
        path = work / f"shard-{s}.faiss"
        faiss.write_index(index, str(path))
        shard_files.append(path)
        del index
    merged = merge_candidates(per_shard, k1, len(q))
    found = np.array([len(set(truth[i]) & set(merged.row[i][merged.row[i] >= 0])) / 10 for i in range(len(q))])
    shard_bytes = sum(p.stat().st_size for p in shard_files)
    out["ivfpq"].update({
        "add_seconds": add_seconds, "add_rows_per_s": n / add_seconds,
        "search_ms_per_query_all_shards": 1000 * search_seconds / len(q),
        "candidate_recall_at_10_in_k1": float(found.mean()),
        "shard_file_bytes": shard_bytes, "bytes_per_vector_on_disk": shard_bytes / n,
        "code_bytes_per_vector": int(trained.sa_code_size()) if hasattr(trained, "sa_code_size") else m,
        "trained_file_bytes": trained_path.stat().st_size,
    })

    # 2. on-disk inverted lists: every shard's lists in one file, opened memory-mapped
    ondisk = faiss.read_index(str(trained_path))
    tick = time.perf_counter()
    merge_ondisk(ondisk, [str(p) for p in shard_files], str(work / "merged.ivfdata"))
    merge_seconds = time.perf_counter() - tick
    faiss.write_index(ondisk, str(work / "populated.faiss"))
    del ondisk
    before = _rss()
    # the inverted lists stay in merged.ivfdata, which OnDiskInvertedLists maps itself
    opened = faiss.read_index(str(work / "populated.faiss"))
    faiss.extract_index_ivf(opened).nprobe = nprobe
    opened_rss = _rss() - before
    tick = time.perf_counter()
    _, ids = opened.search(q, k1)
    ondisk_ms = 1000 * (time.perf_counter() - tick) / len(q)
    same = float(np.mean([len(set(ids[i][ids[i] >= 0]) & set(merged.row[i][merged.row[i] >= 0]))
                          / max(1, int((merged.row[i] >= 0).sum())) for i in range(len(q))]))
    out["ondisk"] = {"merge_seconds": merge_seconds, "ivfdata_bytes": (work / "merged.ivfdata").stat().st_size,
                     "index_file_bytes": (work / "populated.faiss").stat().st_size,
                     "rss_after_open_bytes": opened_rss, "search_ms_per_query_warm": ondisk_ms,
                     "same_candidates_as_sharded": same}
    del opened
    # the synthetic student vectors are no longer needed: free them before HNSW and the gather

    # 3. HNSW over a prefix
    hnsw_rows = min(hnsw_rows, n)
    prefix_vectors = np.ascontiguousarray(student[:hnsw_rows, :prefix])
    prefix_vectors /= np.linalg.norm(prefix_vectors, axis=1, keepdims=True)
    hnsw = faiss.IndexHNSWFlat(prefix, 32, faiss.METRIC_INNER_PRODUCT)
    tick = time.perf_counter()
    hnsw.add(prefix_vectors)
    build = time.perf_counter() - tick
    faiss.write_index(hnsw, str(work / "hnsw.faiss"))
    hnsw_bytes = (work / "hnsw.faiss").stat().st_size
    out["hnsw"] = {"rows": hnsw_rows, "dim": prefix, "M": 32, "build_seconds": build,
                   "build_rows_per_s": hnsw_rows / build, "file_bytes": hnsw_bytes,
                   "bytes_per_vector": hnsw_bytes / hnsw_rows}
    del hnsw

    # 4. teacher rerank gather from a memory-mapped float16 matrix
    teacher_path = work / "teacher.f16"
    corpus.teacher.astype(np.float16).tofile(teacher_path)
    teacher = np.memmap(teacher_path, dtype=np.float16, mode="r", shape=corpus.teacher.shape)
    tick = time.perf_counter()
    for i in range(len(q)):
        rows = np.sort(merged.row[i][merged.row[i] >= 0])
        block = np.asarray(teacher[rows], dtype=np.float32)
        block @ corpus.query_teacher[i].astype(np.float32)
    gather_ms = 1000 * (time.perf_counter() - tick) / len(q)
    out["rerank_gather"] = {"teacher_dim": int(corpus.teacher.shape[1]), "rows_per_query": k1,
                            "bytes_per_query": k1 * int(corpus.teacher.shape[1]) * 2,
                            "ms_per_query_warm_cache": gather_ms}
    for path in [*shard_files, teacher_path, work / "merged.ivfdata"]:
        path.unlink(missing_ok=True)
    out["cpu_count"] = os.cpu_count()
    return out


@click.command()
@click.option("--work", type=click.Path(file_okay=False, path_type=Path), required=True)
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), required=True)
@click.option("--n", type=int, default=1_000_000, show_default=True)
@click.option("--threads", type=int, default=None)
def main(work: Path, out: Path, n: int, threads: int | None) -> None:
    """Measure the structures of docs/scaling.md at N vectors (see the module docstring)."""
    result = run(work, n=n, threads=threads)
    out.write_text(json.dumps(result, indent=2, default=str))
    click.echo(json.dumps(result, indent=2, default=str))


if __name__ == "__main__":
    main()
