"""Where an exported graph's bytes live: ``name.onnx`` alone, or ``name.onnx`` + ``name.onnx.data``.

A protobuf message cannot exceed 2 GiB, so a graph whose weights are larger keeps them in
an external-data file (ONNX's standard layout: each large initializer's ``external_data``
names a file relative to the graph, with an offset and a length; ONNX Runtime opens the
graph by path and maps the file). vkd writes at most one such file per graph, named after
it, so an export directory stays a flat list of ``*.onnx`` / ``*.onnx.data`` pairs that
can be copied, listed and hashed as a whole. Graphs that fit stay single files (the tiny
and demo models, CLIP), because a single file is simpler to move around.

The writers this module tidies up produce other layouts: torch's TorchScript exporter
writes a graph over 2 GiB as one file *per tensor* next to it, and onnxruntime's quantizer
writes ``name.onnx.data`` at whatever offsets it likes. ``relayout`` turns any of them into
vkd's layout, streaming the tensors (never holding the weights in memory when they are
external), and ``move_graph`` / ``remove_graph`` keep a graph and its data file together.

Needs the ``onnx`` package (export time only); readers of an export use the file names the
export manifest records and need only onnxruntime.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

#: A graph whose tensors total more than this is written with external data. The protobuf
#: limit is 2 GiB (2**31 - 1 bytes) for the whole message; the margin leaves room for the
#: graph's own structure (nodes, names, shapes, small inline constants).
SINGLE_FILE_MAX_BYTES = 2**31 - 128 * 2**20
#: tensors smaller than this stay inline even in an external-data graph (onnx's own default)
INLINE_TENSOR_BYTES = 1024
#: offsets in the data file are aligned so that onnxruntime can memory-map each tensor
_ALIGN = 4096
_CHUNK = 64 * 2**20


def data_file(graph: str | os.PathLike[str]) -> Path:
    """The external-data file vkd writes for ``graph``: ``name.onnx.data`` beside it."""
    graph = Path(graph)
    return graph.with_name(graph.name + ".data")


def _all_tensors(model: Any) -> list[Any]:
    # initializers and tensors held in node attributes (Constant values), subgraphs included
    from onnx.external_data_helper import _get_all_tensors

    return list(_get_all_tensors(model))


def _external_info(tensor: Any) -> dict[str, str]:
    return {entry.key: entry.value for entry in tensor.external_data}


def _is_external(tensor: Any) -> bool:
    import onnx

    return bool(tensor.HasField("data_location") and tensor.data_location == onnx.TensorProto.EXTERNAL)


def external_files(graph: str | os.PathLike[str]) -> list[Path]:
    """The files ``graph``'s external tensors are stored in (empty for a single-file graph);
    reads the graph's structure only."""
    import onnx

    graph = Path(graph)
    model = onnx.load(str(graph), load_external_data=False)
    found = {graph.parent / _external_info(t)["location"] for t in _all_tensors(model) if _is_external(t)}
    return sorted(found)


def graph_files(graph: str | os.PathLike[str]) -> list[Path]:
    """``graph`` and every external-data file it reads."""
    return [Path(graph), *external_files(graph)]


def graph_bytes(graph: str | os.PathLike[str]) -> int:
    """Bytes on disk of ``graph`` and its external data."""
    return sum(path.stat().st_size for path in graph_files(graph))


def remove_graph(graph: str | os.PathLike[str]) -> None:
    """Delete ``graph`` and its external-data files."""
    graph = Path(graph)
    files = graph_files(graph) if graph.exists() else [data_file(graph)]
    for path in files:
        path.unlink(missing_ok=True)


def _tensor_bytes(tensor: Any, base: Path) -> int:
    if _is_external(tensor):
        info = _external_info(tensor)
        if "length" in info:
            return int(info["length"])
        return (base / info["location"]).stat().st_size - int(info.get("offset", 0))
    return len(tensor.raw_data)


def _copy_range(source: Path, offset: int, length: int | None, out: Any) -> int:
    copied = 0
    with open(source, "rb") as handle:
        handle.seek(offset)
        while length is None or copied < length:
            chunk = handle.read(_CHUNK if length is None else min(_CHUNK, length - copied))
            if not chunk:
                break
            out.write(chunk)
            copied += len(chunk)
    if length is not None and copied != length:
        raise ValueError(f"{source}: external data ends after {copied} of {length} bytes at offset {offset}")
    return copied


def _point(tensor: Any, location: str, offset: int, length: int | str | None) -> None:
    # onnx's set_external_data wants the bytes still inline; here they may be in another file
    import onnx

    del tensor.external_data[:]
    fields = [("location", location), ("offset", str(offset))]
    if length is not None:
        fields.append(("length", str(length)))
    for key, value in fields:
        entry = tensor.external_data.add()
        entry.key, entry.value = key, value
    tensor.data_location = onnx.TensorProto.EXTERNAL


def relayout(src: str | os.PathLike[str], dst: str | os.PathLike[str],
             max_single_bytes: int = SINGLE_FILE_MAX_BYTES) -> Path | None:
    """Write the graph at ``src`` (any layout) as ``dst``: a single file when its tensors total
    at most ``max_single_bytes``, else ``dst`` + ``data_file(dst)`` holding every tensor of
    ``INLINE_TENSOR_BYTES`` or more. ``src``'s files are removed unless they are ``dst``'s.
    Returns the data file, or None for a single file."""
    import onnx
    from onnx.external_data_helper import load_external_data_for_model

    src, dst = Path(src), Path(dst)
    model = onnx.load(str(src), load_external_data=False)
    tensors = _all_tensors(model)
    sources = {src.resolve(), *(p.resolve() for p in external_files(src))}
    total = sum(_tensor_bytes(tensor, src.parent) for tensor in tensors)
    data = data_file(dst)
    if total <= max_single_bytes:
        if len(sources) > 1:  # small enough for one file: bring the external tensors back inline
            load_external_data_for_model(model, str(src.parent))
        onnx.save_model(model, str(dst))
        written: list[Path] = [dst]
    else:
        outside = {_external_info(t)["location"] for t in tensors if _is_external(t)}
        big_inline = any(not _is_external(t) and len(t.raw_data) >= INLINE_TENSOR_BYTES for t in tensors)
        if len(outside) == 1 and not big_inline:
            # already one data file (onnxruntime's quantizer writes one): move it, rename it in the graph
            only = src.parent / outside.pop()
            if only.resolve() != data.resolve():
                os.replace(only, data)
            for tensor in tensors:
                if _is_external(tensor):
                    info = _external_info(tensor)
                    _point(tensor, data.name, int(info.get("offset", 0)), info.get("length"))
        else:
            partial = data.with_name(data.name + ".partial")
            with open(partial, "wb") as out:
                offset = 0
                for tensor in tensors:
                    if _is_external(tensor):
                        info = _external_info(tensor)
                        length = int(info["length"]) if "length" in info else None
                        pad = -offset % _ALIGN
                        out.write(b"\0" * pad)
                        offset += pad
                        size = _copy_range(src.parent / info["location"], int(info.get("offset", 0)), length, out)
                    elif len(tensor.raw_data) >= INLINE_TENSOR_BYTES:
                        pad = -offset % _ALIGN
                        out.write(b"\0" * pad)
                        offset += pad
                        size = len(tensor.raw_data)
                        out.write(tensor.raw_data)
                        tensor.ClearField("raw_data")
                    else:
                        continue
                    _point(tensor, data.name, offset, size)
                    offset += size
                out.flush()
                os.fsync(out.fileno())
            os.replace(partial, data)
        onnx.save_model(model, str(dst))
        written = [dst, data]
    keep = {path.resolve() for path in written}
    for path in sources - keep:
        path.unlink(missing_ok=True)
    if data.resolve() not in keep:
        data.unlink(missing_ok=True)  # a stale data file of an earlier dst
    return data if len(written) == 2 else None


def move_graph(src: str | os.PathLike[str], dst: str | os.PathLike[str]) -> None:
    """Rename a graph written by ``relayout`` (or a single file) to ``dst``, its data file with
    it; the graph's reference to the data file is rewritten, the weights are not copied."""
    src, dst = Path(src), Path(dst)
    if not external_files(src):
        os.replace(src, dst)
        data_file(dst).unlink(missing_ok=True)
        return
    relayout(src, dst, max_single_bytes=-1)

