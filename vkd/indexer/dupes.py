"""Duplicate images in an index: exact copies (same file bytes) and near copies (resized,
re-encoded, lightly edited).

Exact copies share the ``sha256`` column. Near copies are found in two steps, the way search
works: each live row's student vector asks the FAISS indexes for its ``k`` nearest rows
(cheap, approximate), and each candidate pair is then checked on the stored teacher vectors
(cosine similarity, exact; the student's when the index has no teacher) against
``threshold``. Pairs join into groups transitively (a union-find), so a group may hold two
images less similar than ``threshold`` that both resemble a third; a group's ``score`` is the
lowest similarity among the pairs that joined it.

Finding them reads no image file: the vectors and hashes stored at index time are enough (the
HTML page reads each member once, for its thumbnail).
"""

from __future__ import annotations

import html
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from vkd.data.images import thumbnail_data_url
from vkd.indexer.index import Index, Shard

DEFAULT_THRESHOLD = 0.95
DEFAULT_K = 10
_QUERY_BLOCK = 1024  # student queries per FAISS call: bounds the candidate arrays


@dataclass
class DuplicateMember:
    path: str  # absolute
    relpath: str
    sha256: str
    size: int
    width: int
    height: int


@dataclass
class DuplicateGroup:
    """Images that are copies of each other. ``kind`` is "exact" when every member has the same
    bytes, else "near"; ``score`` is the lowest similarity among the pairs that joined the
    group (1.0 for exact copies); ``measure`` names the vectors it was taken on."""

    kind: str
    score: float
    measure: str
    members: list[DuplicateMember] = field(default_factory=list)

    @property
    def paths(self) -> list[str]:
        return [member.path for member in self.members]

    def to_json(self) -> dict[str, Any]:
        return {"kind": self.kind, "score": round(self.score, 6), "measure": self.measure,
                "members": [asdict(member) for member in self.members]}


class _Union:
    def __init__(self, n: int) -> None:
        self.parent = np.arange(n)

    def find(self, a: int) -> int:
        root = a
        while self.parent[root] != root:
            root = self.parent[root]
        while self.parent[a] != root:  # path compression keeps later finds short
            self.parent[a], a = root, self.parent[a]
        return int(root)

    def join(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.parent[max(ra, rb)] = min(ra, rb)


def _normalised(vectors: np.ndarray) -> np.ndarray:
    # teacher vectors are stored as float16: renormalise so that a self-similarity is 1.0
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    return vectors / np.maximum(norms, 1e-12)


def find_duplicates(index: Index | str | os.PathLike[str], *, threshold: float = DEFAULT_THRESHOLD,
                    k: int = DEFAULT_K) -> list[DuplicateGroup]:
    """Groups of duplicate images among the live rows of ``index`` (an ``Index`` or its path).

    ``threshold``: the cosine similarity (teacher vectors when stored, else student) above
    which two images count as near copies; 0.95 catches resized and re-compressed copies
    with a good model and leaves apart photos of the same scene taken moments apart (raise
    it for fewer, surer groups). ``k``: nearest neighbours checked per image: a group larger
    than ``k`` + 1 is still found whole through its chains of neighbours.
    Groups come largest first; members in path order.
    """
    if not -1.0 <= threshold <= 1.0:
        raise ValueError(f"threshold={threshold}: a cosine similarity, between -1 and 1")
    if k < 1:
        raise ValueError(f"k={k}: must be at least 1")
    opened = index if isinstance(index, Index) else Index.open(index)
    shards = opened.shards
    offsets = np.cumsum([0] + [shard.rows for shard in shards])
    union = _Union(int(offsets[-1]))
    use_teacher = opened.teacher is not None and all(shard.teacher_dim for shard in shards)
    measure = "teacher cosine" if use_teacher else "student cosine"

    def check_vectors(shard: Shard, rows: np.ndarray) -> np.ndarray:
        vectors = shard.teacher_vectors(rows) if use_teacher else shard.student_vectors(rows)
        return _normalised(vectors.astype(np.float32))

    # only the hashes of every live row are held; full records are read for group members only
    by_hash: dict[str, int] = {}
    sha_of: dict[int, str] = {}
    for number, shard in enumerate(shards):
        live = np.flatnonzero(shard.live_mask())
        hashes = shard.table.column("sha256").take(pa.array(live, type=pa.int64())).to_pylist()
        for row, digest in zip(live.tolist(), hashes, strict=True):
            node = int(offsets[number]) + row
            sha_of[node] = digest
            first = by_hash.setdefault(digest, node)
            if first != node:
                union.join(first, node)

    near_scores: list[tuple[int, int, float]] = []
    for number, shard in enumerate(shards):
        live = np.flatnonzero(shard.live_mask())
        for start in range(0, len(live), _QUERY_BLOCK):
            rows = live[start:start + _QUERY_BLOCK]
            queries = shard.student_vectors(rows)
            mine = check_vectors(shard, rows)
            for other_number, other in enumerate(shards):
                if not other.live_rows:
                    continue
                _, found = other.search(queries, min(k + 1, other.live_rows))
                for column in range(found.shape[1]):
                    hits = found[:, column]
                    ok = hits >= 0
                    if other_number == number:
                        ok &= hits != rows  # itself
                    if not ok.any():
                        continue
                    theirs = check_vectors(other, hits[ok])
                    similarity = np.einsum("ij,ij->i", mine[ok], theirs)
                    close = similarity >= threshold  # filtered in numpy: most candidates are not copies
                    for a, b, score in zip(rows[ok][close], hits[ok][close], similarity[close], strict=True):
                        near_scores.append((int(offsets[number]) + int(a), int(offsets[other_number]) + int(b),
                                            float(score)))
    for a, b, _ in near_scores:
        union.join(a, b)

    members: dict[int, list[int]] = {}
    for node in sha_of:
        members.setdefault(union.find(node), []).append(node)
    members = {root: nodes for root, nodes in members.items() if len(nodes) > 1}
    lowest: dict[int, float] = {}
    for a, b, score in near_scores:
        if sha_of[a] != sha_of[b]:
            root = union.find(a)
            lowest[root] = min(lowest.get(root, 1.0), score)
    records = _records(shards, offsets, [node for nodes in members.values() for node in nodes])
    groups = []
    for root, nodes in members.items():
        chosen = sorted((records[node] for node in nodes), key=lambda r: r["relpath"])
        exact = len({r["sha256"] for r in chosen}) == 1
        groups.append(DuplicateGroup(
            kind="exact" if exact else "near", score=1.0 if exact else lowest.get(root, 1.0),
            measure="sha256" if exact else measure,
            members=[DuplicateMember(r["path"], r["relpath"], r["sha256"], int(r["size"]), int(r["width"]),
                                     int(r["height"])) for r in chosen]))
    groups.sort(key=lambda g: (-len(g.members), g.members[0].relpath))
    return groups


def _records(shards: list[Shard], offsets: np.ndarray, nodes: list[int]) -> dict[int, dict[str, Any]]:
    """Row metadata of ``nodes`` (global row numbers), read shard by shard."""
    found: dict[int, dict[str, Any]] = {}
    wanted = np.asarray(sorted(nodes), dtype=np.int64)
    for number, shard in enumerate(shards):
        mine = wanted[(wanted >= offsets[number]) & (wanted < offsets[number + 1])]
        for node, record in zip(mine.tolist(), shard.records(mine - offsets[number]), strict=True):
            found[node] = record
    return found


def duplicates_html(groups: list[DuplicateGroup], *, title: str = "vkd dupes") -> str:
    """One self-contained page: each group a row of thumbnails (embedded, no external files)."""
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'>",
        f"<title>{html.escape(title)}</title>",
        "<style>body{font-family:system-ui,sans-serif;margin:1.5em}section{margin-bottom:1.5em;"
        "border-bottom:1px solid #ddd;padding-bottom:1em}figure{display:inline-block;margin:.3em;"
        "vertical-align:top;width:170px}img{max-width:160px;max-height:160px;display:block}"
        "figcaption{font-size:.75em;word-break:break-all}</style></head><body>",
        f"<h1>{html.escape(title)}</h1><p>{len(groups)} group(s)</p>",
    ]
    for number, group in enumerate(groups, 1):
        what = "exact copies" if group.kind == "exact" else f"near copies ({group.measure} ≥ {group.score:.3f})"
        parts.append(f"<section><h2>Group {number}: {len(group.members)} {html.escape(what)}</h2>")
        for member in group.members:
            data = thumbnail_data_url(member.path, 160)
            picture = f"<img src='{data}' alt=''>" if data else "<div>(cannot be read)</div>"
            parts.append(f"<figure>{picture}<figcaption>{html.escape(member.relpath)}<br>{member.width}×"
                         f"{member.height}, {member.size} bytes</figcaption></figure>")
        parts.append("</section>")
    parts.append("</body></html>")
    return "\n".join(parts)


def write_duplicates_html(groups: list[DuplicateGroup], path: str | os.PathLike[str]) -> Path:
    target = Path(path)
    target.write_text(duplicates_html(groups), encoding="utf-8")
    return target
