"""Index image folders with a student (and teacher) encoder: Arrow shards + FAISS + a manifest.

``Index.build(images_dir, student=...)`` makes or updates an index, ``Index.open(path)``
reads one; ``choose_index`` is the pure rule that picks each shard's FAISS index.
Names are imported on first use so that ``vkd index --help`` does not load pyarrow.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from vkd._lazy import lazy_exports

_EXPORTS: dict[str, str] = {
    "BuildResult": "vkd.indexer.build",
    "CompactResult": "vkd.indexer.build",
    "IndexMismatchError": "vkd.indexer.build",
    "build_index": "vkd.indexer.build",
    "compact_index": "vkd.indexer.build",
    "IndexSpec": "vkd.indexer.faiss_index",
    "choose_index": "vkd.indexer.faiss_index",
    "Index": "vkd.indexer.index",
    "Shard": "vkd.indexer.index",
    "ManifestError": "vkd.indexer.manifest",
    "verify_index": "vkd.indexer.verify",
    "DuplicateGroup": "vkd.indexer.dupes",
    "find_duplicates": "vkd.indexer.dupes",
}

__all__ = [
    "BuildResult",
    "CompactResult",
    "DuplicateGroup",
    "Index",
    "IndexMismatchError",
    "IndexSpec",
    "ManifestError",
    "Shard",
    "build_index",
    "choose_index",
    "compact_index",
    "find_duplicates",
    "verify_index",
]

if TYPE_CHECKING:  # pragma: no cover
    from vkd.indexer.build import BuildResult, CompactResult, IndexMismatchError, build_index, compact_index
    from vkd.indexer.dupes import DuplicateGroup, find_duplicates
    from vkd.indexer.faiss_index import IndexSpec, choose_index
    from vkd.indexer.index import Index, Shard
    from vkd.indexer.manifest import ManifestError
    from vkd.indexer.verify import verify_index


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
