"""Streamed writing of ONNX graph files, their weights in external data or inline.

`write_graph` is the one streaming skeleton every graph-rewriting pass shares: each initializer,
in graph order, is either produced by the pass (a quantized weight, written by its callback) or
copied through from the source (pgexport/graphio/read.py's `Source`), then the non-initializer
tensors (Constant attributes, subgraphs); `Sink` appends each tensor's bytes to the output's data
file as they come, so no pass holds more than the chunk it is working on.

Output layout: `dst` and, in external-data mode, `dst.name + ".data"` beside it. By default
(`external_data=None`) the weights go to the .data file when the output's tensors total more than
EXTERNAL_DATA_THRESHOLD (protobuf's hard limit for one file is 2 GiB), into the .onnx otherwise.
In the .data file tensors are laid out in graph order, those of ALIGN_THRESHOLD and more aligned to
ALIGNMENT (onnx's own converter's layout, so onnxruntime can mmap them); tensors under INLINE_LIMIT
stay in the .onnx. A one-file output is streamed too: tensors go to a temporary data file first,
then the .onnx is assembled from it one tensor at a time (`write_inline`, hand-encoded protobuf:
onnx-ir and onnx serialize the whole model in memory, see benchmarks/results/graphio.md).
Everything is written in a temporary folder beside dst and renamed into place, the .onnx last: a
crash never leaves an .onnx that looks complete, and an earlier dst stays until the new one is ready.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable

import numpy as np
import onnx
from onnx import TensorProto, numpy_helper
from onnx.external_data_helper import ExternalDataInfo

from pgexport.graphio.read import COPY_BYTES, GraphFileError, Source, all_tensors, copy_message, is_external, nbytes

EXTERNAL_DATA_THRESHOLD = 3 << 29  # 1.5 GiB of tensors: the output keeps its weights in dst.name + ".data"
INLINE_LIMIT = 1024  # tensors smaller than this stay inside the .onnx (onnx's default threshold)
ALIGN_THRESHOLD, ALIGNMENT, SMALL_ALIGNMENT = 1 << 20, 1 << 16, 64


class Sink:
    """Puts tensor bytes in the output: appended to the data file, or inline when small."""

    def __init__(self, file, location: str):
        self.file, self.location, self.offset = file, location, 0

    def put(self, tensor: TensorProto, parts, size: int) -> None:
        """Stores `size` bytes, given as an iterable of buffers, as the tensor's data.

        `parts` may read the tensor's own source data lazily: its fields change only at the end.
        """
        if size < INLINE_LIMIT:
            data = b"".join(bytes(memoryview(p).cast("B")) for p in parts)
            del tensor.external_data[:]
            tensor.ClearField("data_location")
            tensor.raw_data = data
            return
        pad = -self.offset % (ALIGNMENT if size >= ALIGN_THRESHOLD else SMALL_ALIGNMENT)
        if pad:
            self.file.write(b"\0" * pad)
            self.offset += pad
        begin = self.offset
        for part in parts:
            view = memoryview(part).cast("B")
            self.file.write(view)
            self.offset += view.nbytes
        if self.offset - begin != size:
            raise RuntimeError(f"{tensor.name}: wrote {self.offset - begin} bytes, expected {size}")
        tensor.ClearField("raw_data")
        del tensor.external_data[:]
        tensor.data_location = TensorProto.EXTERNAL
        for key, value in (("location", self.location), ("offset", str(begin)), ("length", str(size))):
            entry = tensor.external_data.add()
            entry.key, entry.value = key, value

    def put_array(self, tensor: TensorProto, value: np.ndarray) -> None:
        """Make `tensor` hold `value` (its name and dims kept), stored as `copy_through` would."""
        tensor.CopyFrom(numpy_helper.from_array(np.ascontiguousarray(value).reshape(list(tensor.dims)), tensor.name))
        copy_through(tensor, None, self)


def copy_through(tensor: TensorProto, source: Source | None, sink: Sink) -> None:
    """Store a source tensor's data unchanged: external data streamed from `source`, inline raw
    data of INLINE_LIMIT and more moved to the sink, anything else left inline as it is."""
    if is_external(tensor):
        sink.put(tensor, source.chunks(tensor), nbytes(tensor))
    elif tensor.HasField("raw_data") and len(tensor.raw_data) >= INLINE_LIMIT:
        data = tensor.raw_data
        tensor.ClearField("raw_data")
        sink.put(tensor, [data], len(data))


# ---------------------------------------------------------------------------------------------
# the streaming skeleton


def write_graph(model: onnx.ModelProto, source: Source, dst: Path, produce: dict[str, Callable], *,
                skip=frozenset(), external_data: bool | None = None, label: str = "", progress: bool = False) -> bool:
    """Write `model` at `dst`, every tensor streamed: an initializer named in `produce` is a
    placeholder that `produce[name](tensor, sink)` fills (and the placeholders it owns, named in
    `skip`, with it); every other tensor is copied through from `source`. Returns whether the
    output uses external data (see the module docstring for the layout)."""
    return write_model(model, source, dst, external_data,
                       lambda sink: stream_tensors(model, source, sink, produce, skip, label, progress))


def stream_tensors(model, source: Source, sink: Sink, produce: dict, skip, label: str, progress: bool) -> None:
    """write_graph's walk: initializers in graph order, then the other tensors, with a progress bar."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    graph = model.graph
    others = list(all_tensors(graph, initializers=False))
    bar = Progress(
        TextColumn(label + " {task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
        console=Console(stderr=True), disable=not progress, transient=False,
    )
    with bar:
        task = bar.add_task("", total=sum(t.name not in skip for t in graph.initializer) + len(others))
        for tensor in graph.initializer:
            if tensor.name in skip:
                continue
            bar.update(task, description=tensor.name[-48:])
            if tensor.name in produce:
                produce[tensor.name](tensor, sink)
            else:
                copy_through(tensor, source, sink)
            bar.advance(task)
        for tensor in others:
            copy_through(tensor, source, sink)
            bar.advance(task)


def write_model(model: onnx.ModelProto, source: Source, dst: Path, external_data: bool | None, fill) -> bool:
    """Write `model` at `dst` through a temporary folder; `fill(sink)` puts every tensor's data.

    For a one-file output the .onnx is then assembled from the sink's data file tensor by tensor,
    so no mode holds the model in memory. Returns whether the output uses external data.
    """
    total = sum(nbytes(t) for t in all_tensors(model.graph))
    external = total > EXTERNAL_DATA_THRESHOLD if external_data is None else bool(external_data)
    if not external and total > (2 << 30) - (64 << 20):
        raise GraphFileError(f"{dst}: {total / 2**30:.2f} GiB of tensors do not fit one .onnx file: use external data")
    dst.parent.mkdir(parents=True, exist_ok=True)
    data_name = dst.name + ".data"
    work = Path(tempfile.mkdtemp(prefix=f".{dst.name}.", suffix=".tmp", dir=dst.parent))
    try:
        try:
            with open(work / data_name, "wb") as data:
                fill(Sink(data, data_name))
                if external:
                    data.flush()
                    os.fsync(data.fileno())
        finally:
            source.close()
        with open(work / dst.name, "wb") as f:
            if external:
                f.write(model.SerializeToString())
            else:
                write_inline(model, work / data_name, f)
                (work / data_name).unlink()
            f.flush()
            os.fsync(f.fileno())
        _move_into_place(work, dst, data_name, external)
    finally:
        source.close()
        shutil.rmtree(work, ignore_errors=True)
    return external


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte, value = value & 0x7F, value >> 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


# protobuf keys (field number << 3 | wire type 2, length-delimited) of the fields written by hand
_MODEL_GRAPH, _GRAPH_INITIALIZER, _TENSOR_RAW_DATA = b"\x3a", b"\x2a", b"\x4a"  # fields 7, 5, 9


def write_inline(model: onnx.ModelProto, data_path: Path, out) -> None:
    """Writes `model` as one .onnx to the file `out`, its external tensors read back from `data_path`.

    The main graph's initializers are serialized one at a time after the rest of the model:
    protobuf allows fields in any order and concatenates repeated ones, so the file is the
    model's ordinary encoding, but only one tensor's data is ever in memory.
    """
    graph = model.graph
    with open(data_path, "rb") as data:

        def read(tensor: TensorProto) -> bytes:
            info = ExternalDataInfo(tensor)
            data.seek(int(info.offset or 0))
            return data.read(int(info.length))

        for tensor in all_tensors(graph, initializers=False):  # Constant and subgraph tensors
            if is_external(tensor):
                raw = read(tensor)
                tensor.ClearField("data_location")
                del tensor.external_data[:]
                tensor.raw_data = raw

        heads, total = [], 0
        for tensor in graph.initializer:
            head = copy_message(tensor)
            length = 0
            if is_external(tensor):
                length = int(ExternalDataInfo(tensor).length)
                head.ClearField("data_location")
                del head.external_data[:]
            encoded = head.SerializeToString()
            size = len(encoded) + (len(_TENSOR_RAW_DATA) + len(_varint(length)) + length if length else 0)
            heads.append((tensor, encoded, length, size))
            total += len(_GRAPH_INITIALIZER) + len(_varint(size)) + size

        rest = copy_message(graph)
        rest.ClearField("initializer")
        rest = rest.SerializeToString()
        outer = copy_message(model)
        outer.ClearField("graph")
        out.write(outer.SerializeToString())
        out.write(_MODEL_GRAPH + _varint(len(rest) + total) + rest)
        for tensor, encoded, length, size in heads:
            out.write(_GRAPH_INITIALIZER + _varint(size) + encoded)
            if length:
                out.write(_TENSOR_RAW_DATA + _varint(length))
                data.seek(int(ExternalDataInfo(tensor).offset or 0))
                left = length
                while left:
                    chunk = data.read(min(left, COPY_BYTES))
                    if not chunk:
                        raise RuntimeError(f"{data_path}: ends inside tensor {tensor.name!r}")
                    out.write(chunk)
                    left -= len(chunk)


def _move_into_place(work: Path, dst: Path, data_name: str, external: bool) -> None:
    """Renames the finished files over dst: the data first, the .onnx last."""
    data = dst.parent / data_name
    if dst.exists():
        dst.unlink()  # an old .onnx must not meet the new data
    if external:
        os.replace(work / data_name, data)
    elif data.exists():
        data.unlink()  # a stale data file from an earlier external run
    os.replace(work / dst.name, dst)

