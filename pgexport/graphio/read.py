"""Reading ONNX graph files whose weights may live in external data, without loading the weights.

`load_structure` loads a graph's protobuf alone; `Source` reads one tensor's bytes from its external
data file (or the proto) a chunk at a time, so a pass over a multi-GB decoder holds one chunk of a
weight at a time; the file helpers size a graph with its data files and make those files visible
beside a rewritten copy. The writing side is pgexport/graphio/write.py.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper
from onnx.external_data_helper import ExternalDataInfo

from pgexport.errors import BadInputError

F32 = np.dtype("<f4")
COPY_BYTES = 16 << 20  # how much of a tensor is copied through at a time
CHUNK_BYTES = 32 << 20  # the passes' default `chunk_bytes`: how much of a weight they read at a time
_PACKED_4BIT = {getattr(TensorProto, n) for n in ("INT4", "UINT4", "FLOAT4E2M1") if hasattr(TensorProto, n)}


class GraphFileError(BadInputError, ValueError):
    """A graph file that cannot be read: missing, not ONNX, external data missing or too short."""


def load_structure(path: Path) -> onnx.ModelProto:
    """The graph at `path` without its external weights; GraphFileError when it is no ONNX model."""
    path = Path(path)
    if not path.is_file():
        raise GraphFileError(f"{path}: no such file")
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as error:  # protobuf's DecodeError and friends
        raise GraphFileError(f"{path}: not an ONNX model ({type(error).__name__}: {error})") from None
    if model.ir_version <= 0 or not model.opset_import or not model.graph.node:
        raise GraphFileError(f"{path}: not an ONNX model (no IR version, opset or nodes)")
    return model


def subgraphs(node: onnx.NodeProto):
    """The graphs held by a node's attributes (If/Loop/Scan bodies)."""
    for attr in node.attribute:
        if attr.type == onnx.AttributeProto.GRAPH:
            yield attr.g
        elif attr.type == onnx.AttributeProto.GRAPHS:
            yield from attr.graphs


def all_tensors(graph: onnx.GraphProto, initializers: bool = True):
    """Every TensorProto of a graph: initializers, sparse ones, node attributes, subgraphs."""
    if initializers:
        yield from graph.initializer
    for sparse in graph.sparse_initializer:
        yield sparse.values
        yield sparse.indices
    for node in graph.node:
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.TENSOR:
                yield attr.t
            elif attr.type == onnx.AttributeProto.TENSORS:
                yield from attr.tensors
            elif attr.type == onnx.AttributeProto.SPARSE_TENSOR:
                yield attr.sparse_tensor.values
                yield attr.sparse_tensor.indices
        for sub in subgraphs(node):
            yield from all_tensors(sub)


def copy_message(message):
    """A deep copy of a protobuf message (a node or tensor kept while its field is rebuilt)."""
    copy = type(message)()
    copy.CopyFrom(message)
    return copy



def is_external(tensor: TensorProto) -> bool:
    """Whether a tensor's data lives in an external data file."""
    return tensor.HasField("data_location") and tensor.data_location == TensorProto.EXTERNAL


def nbytes(tensor: TensorProto) -> int:
    """Bytes of a tensor's data, without reading it."""
    if is_external(tensor):
        info = ExternalDataInfo(tensor)
        if info.length:
            return int(info.length)
    elif tensor.HasField("raw_data"):
        return len(tensor.raw_data)
    if tensor.data_type == TensorProto.STRING:
        return sum(len(s) for s in tensor.string_data)
    count = int(np.prod(tensor.dims, dtype=np.int64)) if tensor.dims else 1
    if tensor.data_type in _PACKED_4BIT:
        return (count + 1) // 2
    try:
        return count * helper.tensor_dtype_to_np_dtype(tensor.data_type).itemsize
    except (KeyError, ValueError, TypeError):  # UNDEFINED or a type numpy has no size for
        return 0


def external_files(model: onnx.ModelProto) -> set[str]:
    """The external data files a graph's initializers name, relative to the graph's folder."""
    return {
        e.value
        for t in model.graph.initializer if is_external(t)
        for e in t.external_data if e.key == "location"
    }


def graph_bytes(path: Path) -> int:
    """Bytes on disk of a graph file and the external data files it names."""
    path = Path(path)
    model = onnx.load(str(path), load_external_data=False)
    return sum(f.stat().st_size for f in {path} | {path.parent / name for name in external_files(model)})


def file_bytes(path: Path, data_files) -> int:
    """Bytes of `path` plus the given data files."""
    return Path(path).stat().st_size + sum(Path(f).stat().st_size for f in data_files)


def link_data_files(src: Path, model: onnx.ModelProto, folder: Path) -> None:
    """Make src's external data files visible in `folder`, for a rewritten graph saved there:
    hard links (onnxruntime 1.32 rejects a symlink that resolves outside the model's folder), or
    copies across file systems."""
    for location in external_files(model):
        try:
            os.link(src.parent / location, folder / location)
        except OSError:
            shutil.copyfile(src.parent / location, folder / location)


class Source:
    """Reads a graph's tensors: external data by file offset, inline data from the proto."""

    def __init__(self, base: Path):
        self.base = Path(base)
        self.files: dict[Path, object] = {}

    def _where(self, tensor: TensorProto) -> tuple[Path, int, int]:
        info = ExternalDataInfo(tensor)
        return (self.base / info.location), int(info.offset or 0), nbytes(tensor)

    def check_all(self, model: onnx.ModelProto, src: Path) -> list[Path]:
        """Checks every external tensor's file and range now, before anything is written;
        returns the data files."""
        files: dict[Path, int] = {}
        for tensor in all_tensors(model.graph):
            if not is_external(tensor):
                continue
            path, offset, length = self._where(tensor)
            if path not in files:
                if not path.is_file():
                    raise GraphFileError(f"{src}: external data file {path.name} of {tensor.name!r} is missing")
                files[path] = path.stat().st_size
            if offset + length > files[path]:
                raise GraphFileError(f"{src}: external data of {tensor.name!r} ends past the end of {path.name}")
        return list(files)

    def _file(self, path: Path):
        if path not in self.files:
            self.files[path] = open(path, "rb", buffering=0)
        return self.files[path]

    def close(self):
        for f in self.files.values():
            f.close()
        self.files.clear()

    def read(self, tensor: TensorProto, start: int, out: memoryview) -> None:
        """Fills `out` with the tensor's bytes from `start` (external tensors only)."""
        path, offset, _ = self._where(tensor)
        f = self._file(path)
        f.seek(offset + start)
        done = 0
        while done < len(out):
            got = f.readinto(out[done:])
            if not got:
                raise GraphFileError(f"{path}: ends inside tensor {tensor.name!r}")
            done += got

    def chunks(self, tensor: TensorProto, size: int = COPY_BYTES):
        """The tensor's raw bytes, a chunk at a time (external tensors only)."""
        length = nbytes(tensor)
        buffer = bytearray(min(size, length))
        for start in range(0, length, size):
            view = memoryview(buffer)[: min(size, length - start)]
            self.read(tensor, start, view)
            yield view

    def rows(self, tensor: TensorProto, chunk_bytes: int):
        """(first row, float32 [rows, cols] block) over a 2-D float32 tensor, about `chunk_bytes`
        (at least one row) a block; blocks are reused, so each must be consumed before the next."""
        rows, cols = (int(d) for d in tensor.dims)
        step = max(1, chunk_bytes // max(1, 4 * cols))
        if is_external(tensor):
            buffer = np.empty(min(step, rows) * cols, dtype=F32)
            for r0 in range(0, rows, step):
                n = min(step, rows - r0)
                block = buffer[: n * cols]
                self.read(tensor, 4 * r0 * cols, memoryview(block).cast("B"))
                yield r0, block.reshape(n, cols)
        else:
            if tensor.HasField("raw_data"):
                array = np.frombuffer(tensor.raw_data, dtype=F32).reshape(rows, cols)
            else:
                array = numpy_helper.to_array(tensor).astype(np.float32).reshape(rows, cols)
            for r0 in range(0, rows, step):
                yield r0, array[r0 : r0 + step]


