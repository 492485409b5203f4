"""``vkd search --html FILE``: one self-contained gallery page of a search's hits.

Thumbnails are small JPEGs embedded as base64 ``data:`` URLs, made through the shared
image conversion (``vkd.data.images.load_image``: guards, EXIF rotation, RGB), so the page
opens offline, anywhere, and shows each image the way the index saw it.
"""

from __future__ import annotations

import html
from pathlib import Path

from vkd.data.images import thumbnail_data_url
from vkd.indexer.fsutil import atomic_write_bytes
from vkd.retrieval.results import SearchResult

THUMB_SIDE = 256


def render_gallery(result: SearchResult, *, title: str) -> str:
    cards = []
    for hit in result:
        url = thumbnail_data_url(hit.path, THUMB_SIDE)
        picture = (f'<img src="{url}" alt="{html.escape(hit.path)}">' if url
                   else '<div class="missing">image not readable</div>')
        teacher = f"{hit.teacher_score:.4f}" if hit.teacher_score is not None else "-"
        cards.append(
            f'<figure>{picture}<figcaption><b>#{hit.rank}</b> score {hit.score:.4f} '
            f'(teacher {teacher}, student {hit.student_score:.4f})<br>'
            f'<span class="path">{html.escape(hit.path)}</span></figcaption></figure>')
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>vkd: {html.escape(title)}</title>
<style>
body{{font-family:system-ui,sans-serif;margin:1.5em;background:#fafafa}}
main{{display:grid;grid-template-columns:repeat(auto-fill,minmax(260px,1fr));gap:1em}}
figure{{margin:0;background:#fff;padding:.5em;border:1px solid #ddd}}
img{{max-width:100%;display:block;margin:auto}} .path{{word-break:break-all;font-size:.85em;color:#444}}
.missing{{height:120px;display:flex;align-items:center;justify-content:center;color:#999}}
</style></head><body>
<h1>{html.escape(title)}</h1>
<p>{len(result)} hit(s); reranked: {html.escape(str(result.reranked))}; {result.timings.total_ms:.1f} ms</p>
<main>
{chr(10).join(cards)}
</main></body></html>
"""


def write_gallery(path: Path, result: SearchResult, *, title: str) -> None:
    """Write the page atomically (a half-written page is never left behind)."""
    atomic_write_bytes(path, render_gallery(result, title=title).encode("utf-8"))
