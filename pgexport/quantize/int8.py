"""Dynamic int8 quantization of an fp32 ONNX graph, one tensor at a time.

`quantize_dynamic_int8(src, dst)` writes the graph that onnxruntime's
`quantize_dynamic(src, dst, weight_type=QuantType.QInt8, op_types_to_quantize=["MatMul"])`
writes: same initializers (names, values, scales, zero points) and node structure, so the two
run bit-identical. (Left out, as out of scope: onnxruntime's defaults also turn Conv into
ConvInteger and quantize Gather tables; here Conv and Gather stay fp32.) What differs is
memory: onnxruntime loads the whole model, deep-copies it, saves and reloads it (about three
copies alive: 9.3 GiB peak for a 3 GiB model, more than 21 GB for a 10 GB decoder). Here the
graph is loaded without its weights (`onnx.load(src, load_external_data=False)`) and each
weight is read from its external data file (or the proto, when inline), quantized and written
out on its own, in row chunks: the peak is the graph proto plus about 100 MB of chunks,
whatever the model's size (plus, for a Gemm weight that must be transposed, its int8 copy).
Measured: 0.16 GiB peak RSS for 3 GiB and 6.25 GiB fp32 models of 8192 x 8192 MatMuls.

The graph, per MatMul `Y = MatMul(X, W)` with W a constant 2-D float32 initializer [K, N]
(onnxruntime's IntegerOps form, operators/matmul.py):

    X_quantized, X_scale, X_zero_point = DynamicQuantizeLinear(X)         # uint8, one per X
    Y_output_quantized = MatMulInteger(X_quantized, W_quantized, X_zero_point, W_zero_point)
    Y = Mul(Cast<float>(Y_output_quantized), Mul(X_scale, W_scale))

- W_quantized is int8, symmetric (onnxruntime's default for QInt8 weights: range [-127, 127],
  zero point 0, scale = max|W| / 127 computed in float64 and stored as float32; reduce_range off).
  per_channel=True gives one scale per output column (W_scale and W_zero_point of shape [N],
  zero points all 0), as onnxruntime's per_channel=True does (axis -1 of the MatMul weight).
- Gemm(A, B, C) with alpha = 1, transA = 0 (and beta = 1 when C is given) is first lowered to
  MatMul (+ Add C), with B transposed to B_Transposed [K, N] when transB = 1, exactly as
  onnxruntime's dynamic mode does (onnx_model.replace_gemm_with_matmul); torch.onnx exports
  nn.Linear on 2-D inputs as Gemm(transB=1).
- The standard-ONNX form is emitted, not the com.microsoft DynamicQuantizeMatMul /
  MatMulIntegerToFloat form: onnxruntime's CPU graph optimizer (level EXTENDED and above; the
  default is ALL) fuses DynamicQuantizeLinear + MatMulInteger + Cast + Mul (+ a following bias
  Add) into DynamicQuantizeMatMul at session load, so both run the same kernel (measured on
  onnxruntime 1.32, 2 CPU cores, four 2048x8192 MLP blocks: 23.0 ms standard vs 23.5 ms
  pre-fused at 1 token, 184 vs 180 ms at 128 tokens, within noise; fp32 57 / 574 ms). The
  standard form uses only ai.onnx ops, so other runtimes take it too, and it is what
  `quantize_dynamic` itself writes.
- A quantized weight that something else uses too (not a quantized MatMul/Gemm) stays in the
  graph in fp32 for that consumer, exact; onnxruntime instead feeds it DequantizeLinear(int8).
- Subgraphs (If/Loop bodies) are left alone, as onnxruntime's default (EnableSubgraph off) does.
  MatMuls not quantized are listed in the result's "skipped" with the reason.

Output files: `dst` and, in external-data mode, `dst.name + ".data"` beside it. By default
(`external_data=None`) the weights go to the .data file when the output's tensors total more
than 1.5 GiB (protobuf's hard limit for one file is 2 GiB) and into the .onnx otherwise;
True/False force either. In the .data file tensors are laid out in graph order, tensors of
1 MiB and more aligned to 64 KiB (onnx's own converter's layout, so onnxruntime can mmap
them); tensors under 1 KiB stay in the .onnx. A one-file output is streamed too: tensors go to
a temporary data file first, then the .onnx is assembled from it one tensor at a time.
Everything is written into a temporary folder in dst's folder and renamed into place at the
end, the .onnx last: a crash never leaves an .onnx that looks complete, and an earlier dst
stays as it was until the new one is ready.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper
from onnx.external_data_helper import ExternalDataInfo

from pgexport.errors import BadInputError

# Above this many bytes of tensors the output keeps its weights in `dst.name + ".data"`.
EXTERNAL_DATA_THRESHOLD = 3 << 29  # 1.5 GiB
INLINE_LIMIT = 1024  # tensors smaller than this stay inside the .onnx (onnx's default threshold)
ALIGN_THRESHOLD, ALIGNMENT, SMALL_ALIGNMENT = 1 << 20, 1 << 16, 64
CHUNK_BYTES = 32 << 20  # how much of a weight is read at a time
SUPPORTED_OP_TYPES = ("MatMul", "Gemm")
# Ops whose presence means the model is quantized already (QLinear* is matched by prefix).
QUANTIZED_OPS = frozenset({
    "MatMulInteger", "ConvInteger", "DynamicQuantizeLinear", "QuantizeLinear", "DequantizeLinear",
    "DynamicQuantizeMatMul", "MatMulIntegerToFloat", "MatMulNBits", "MatMulBnb4", "QGemm",
    "QAttention", "DynamicQuantizeLSTM", "GatherBlockQuantized", "QOrderedMatMul",
})
INT8_MIN, INT8_MAX, SYMMETRIC_QMAX = -128, 127, 127  # symmetric int8 weights use [-127, 127]
_F32 = np.dtype("<f4")
_PACKED_4BIT = {getattr(TensorProto, n) for n in ("INT4", "UINT4", "FLOAT4E2M1") if hasattr(TensorProto, n)}


class QuantizeInputError(BadInputError, ValueError):
    """The source graph cannot be quantized: not an ONNX model, already quantized, bad paths."""


@dataclass
class _Weight:
    """One int8 weight to produce: from `source` (transposed when `transpose`) to q/scale/zp."""

    source: TensorProto  # a copy of the source initializer (no data when that lives externally)
    transpose: bool
    q_name: str
    scale_name: str
    zp_name: str
    shape: tuple[int, int]  # the int8 weight's [K, N]


@dataclass
class _Plan:
    weights: dict[str, _Weight] = field(default_factory=dict)  # by q_name
    quantized_nodes: int = 0
    skipped: list[dict] = field(default_factory=list)


# ---------------------------------------------------------------------------------------------
# the API


def quantize_dynamic_int8(
    src: Path,
    dst: Path,
    *,
    per_channel: bool = False,
    op_types=SUPPORTED_OP_TYPES,
    progress: bool = True,
    external_data: bool | None = None,
) -> dict:
    """Quantize the fp32 ONNX model `src` to dynamic int8 at `dst`, a .onnx path (see the module docstring).

    op_types: which of "MatMul" and "Gemm" to quantize (both by default, as onnxruntime does).
    external_data: None picks by size (external above 1.5 GiB of tensors), True/False force it.

    Returns stats: "quantized" (MatMul/Gemm nodes rewritten), "quantized_weights" (int8
    initializers written), "skipped" ([{"node", "op_type", "reason"}]), "bytes_before" and
    "bytes_after" (the .onnx plus its external data files, on disk), "weight_bytes_before" and
    "weight_bytes_after" (the quantized weights: fp32 vs int8 + scales + zero points),
    "external_data" (the data file's name, or None), "per_channel", "seconds".

    Raises QuantizeInputError (a ValueError) when src is missing, is not an ONNX model, is
    already quantized, or when dst would overwrite src or its data.
    """
    started = time.perf_counter()
    src, dst = Path(src), Path(dst)
    op_types = _check_op_types(op_types)
    model = _load(src)
    source = _Source(src.parent)
    source_files = source.check_all(model, src)
    _check_destination(src, dst, source_files)

    plan = _rewrite(model, op_types, per_channel)
    external = write_model(
        model, source, dst, external_data, lambda sink: _stream(model, plan, source, sink, per_channel, progress)
    )
    data_name = dst.name + ".data"

    weight_before = sum(4 * w.shape[0] * w.shape[1] for w in plan.weights.values())
    channels = sum(w.shape[1] if per_channel else 1 for w in plan.weights.values())
    return {
        "quantized": plan.quantized_nodes,
        "quantized_weights": len(plan.weights),
        "skipped": plan.skipped,
        "bytes_before": _file_bytes(src, source_files),
        "bytes_after": _file_bytes(dst, [dst.parent / data_name] if external else []),
        "weight_bytes_before": weight_before,
        "weight_bytes_after": weight_before // 4 + 5 * channels,  # int8 + float32 scale + int8 zero point
        "external_data": data_name if external else None,
        "per_channel": per_channel,
        "seconds": round(time.perf_counter() - started, 3),
    }


def write_model(model: onnx.ModelProto, source: _Source, dst: Path, external_data: bool | None, fill) -> bool:
    """Write `model` at `dst` through a temporary folder; `fill(sink)` puts every tensor's data.

    The rewritten graph's placeholders are filled by `fill`, which streams tensor data into the
    sink (a data file); for a one-file output the .onnx is then assembled from it tensor by
    tensor, so no mode holds the model in memory. Returns whether the output uses external data.
    Shared by the int8, int4 and embedding quantizers.
    """
    total = sum(_nbytes(t) for t in _all_tensors(model.graph))
    external = total > EXTERNAL_DATA_THRESHOLD if external_data is None else bool(external_data)
    if not external and total > (2 << 30) - (64 << 20):
        raise QuantizeInputError(f"{dst}: {total / 2**30:.2f} GiB of tensors do not fit one .onnx file: use external data")
    dst.parent.mkdir(parents=True, exist_ok=True)
    data_name = dst.name + ".data"
    work = Path(tempfile.mkdtemp(prefix=f".{dst.name}.", suffix=".tmp", dir=dst.parent))
    try:
        try:
            with open(work / data_name, "wb") as data:
                fill(_Sink(data, data_name))
                if external:
                    data.flush()
                    os.fsync(data.fileno())
        finally:
            source.close()
        with open(work / dst.name, "wb") as f:
            if external:
                f.write(model.SerializeToString())
            else:
                _write_inline(model, work / data_name, f)
                (work / data_name).unlink()
            f.flush()
            os.fsync(f.fileno())
        _move_into_place(work, dst, data_name, external)
    finally:
        source.close()
        shutil.rmtree(work, ignore_errors=True)
    return external


# ---------------------------------------------------------------------------------------------
# checks


def _check_op_types(op_types) -> frozenset:
    op_types = frozenset([op_types] if isinstance(op_types, str) else op_types)
    unknown = op_types - set(SUPPORTED_OP_TYPES)
    if unknown or not op_types:
        raise ValueError(f"op_types: {sorted(unknown) or 'empty'}: choose among {list(SUPPORTED_OP_TYPES)}")
    return op_types


def _load(src: Path) -> onnx.ModelProto:
    if not src.is_file():
        raise QuantizeInputError(f"{src}: no such file")
    try:
        model = onnx.load(str(src), load_external_data=False)
    except Exception as error:  # protobuf's DecodeError and friends
        raise QuantizeInputError(f"{src}: not an ONNX model ({type(error).__name__}: {error})") from None
    if model.ir_version <= 0 or not model.opset_import or not model.graph.node:
        raise QuantizeInputError(f"{src}: not an ONNX model (no IR version, opset or nodes)")
    found = sorted({node.op_type for node in _all_nodes(model.graph) if _is_quantized_op(node.op_type)})
    if found:
        raise QuantizeInputError(f"{src}: already quantized (contains {', '.join(found)})")
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
    if opset < 11:
        raise QuantizeInputError(f"{src}: opset {opset}: DynamicQuantizeLinear needs opset 11 or later")
    return model


def _is_quantized_op(op_type: str) -> bool:
    return op_type in QUANTIZED_OPS or op_type.startswith("QLinear")


def _check_destination(src: Path, dst: Path, source_files: list[Path]) -> None:
    if dst.resolve() == src.resolve():
        raise QuantizeInputError(f"{dst}: the destination is the source")
    data = (dst.parent / (dst.name + ".data")).resolve()
    if any(data == f.resolve() for f in source_files):
        raise QuantizeInputError(f"{dst}: its data file {data.name} would overwrite the source's external data")


def _file_bytes(path: Path, data_files) -> int:
    return path.stat().st_size + sum(Path(f).stat().st_size for f in data_files)


def _external_files(graph: onnx.ModelProto) -> set[str]:
    """The external data files a graph's initializers name, relative to the graph's folder."""
    return {
        e.value
        for t in graph.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL
        for e in t.external_data if e.key == "location"
    }


def _graph_bytes(path: Path) -> int:
    """A graph file and the external data files it names."""
    model = onnx.load(str(path), load_external_data=False)
    return sum(f.stat().st_size for f in {path} | {path.parent / name for name in _external_files(model)})


def _link_data_files(src: Path, graph: onnx.ModelProto, folder: Path) -> None:
    """Make src's external data files visible in `folder`, for a rewritten graph saved there:
    hard links (onnxruntime 1.32 rejects a symlink that resolves outside the model's folder), or
    copies across file systems."""
    for location in _external_files(graph):
        try:
            os.link(src.parent / location, folder / location)
        except OSError:
            shutil.copyfile(src.parent / location, folder / location)


# ---------------------------------------------------------------------------------------------
# walking graphs


def _subgraphs(node: onnx.NodeProto):
    for attr in node.attribute:
        if attr.type == onnx.AttributeProto.GRAPH:
            yield attr.g
        elif attr.type == onnx.AttributeProto.GRAPHS:
            yield from attr.graphs


def _all_nodes(graph: onnx.GraphProto):
    for node in graph.node:
        yield node
        for sub in _subgraphs(node):
            yield from _all_nodes(sub)


def _all_tensors(graph: onnx.GraphProto, initializers: bool = True):
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
        for sub in _subgraphs(node):
            yield from _all_tensors(sub)


def _all_names(graph: onnx.GraphProto, names: set | None = None) -> set:
    names = set() if names is None else names
    names.update(t.name for t in graph.initializer)
    names.update(v.name for v in (*graph.input, *graph.output, *graph.value_info))
    for node in graph.node:
        names.update(node.input)
        names.update(node.output)
        for sub in _subgraphs(node):
            _all_names(sub, names)
    return names


def _is_external(tensor: TensorProto) -> bool:
    return tensor.HasField("data_location") and tensor.data_location == TensorProto.EXTERNAL


def _nbytes(tensor: TensorProto) -> int:
    """Bytes of a tensor's data, without reading it."""
    if _is_external(tensor):
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


# ---------------------------------------------------------------------------------------------
# the graph rewrite


class _Names:
    """Fresh tensor names: onnxruntime's names unless one is taken already."""

    def __init__(self, taken: set):
        self.taken = taken

    def __call__(self, base: str, suffixes=("",)) -> str:
        name, i = base, 0
        while any(name + s in self.taken for s in suffixes):
            i += 1
            name = f"{base}_{i}"
        self.taken.update(name + s for s in suffixes)
        return name


def _attr(node: onnx.NodeProto, name: str, default):
    for attr in node.attribute:
        if attr.name == name:
            return helper.get_attribute_value(attr)
    return default


def _why_not(node, op_types, initializers, graph_inputs) -> str | None:
    """Why this MatMul/Gemm is not quantized, or None when it is."""
    if node.op_type not in op_types:
        return f"{node.op_type} is not in op_types"
    if node.op_type == "Gemm":
        if _attr(node, "transA", 0):
            return "Gemm with transA=1"
        if _attr(node, "alpha", 1.0) != 1.0:
            return "Gemm with alpha != 1"
        if len(node.input) > 2 and node.input[2] and _attr(node, "beta", 1.0) != 1.0:
            return "Gemm with beta != 1"
    return weight_problem(node, initializers, graph_inputs)


def weight_problem(node, initializers, graph_inputs) -> str | None:
    """Why `node`'s weight (input B) cannot be quantized offline, or None: it must be a constant
    2-D float32 initializer that is not also a graph input, with a non-constant input A."""
    a, b = node.input[0], node.input[1]
    if b not in initializers:
        return "weight (input B) is not a constant initializer"
    if b in graph_inputs:
        return "weight (input B) is also a graph input, so it can be overridden at run time"
    if a in initializers:
        return "input A is a constant initializer too"
    weight = initializers[b]
    if weight.data_type != TensorProto.FLOAT:
        return f"weight is {TensorProto.DataType.Name(weight.data_type)}, not FLOAT"
    if len(weight.dims) != 2:
        return f"weight is {len(weight.dims)}-D, not 2-D"
    return None


def _rewrite(model: onnx.ModelProto, op_types: frozenset, per_channel: bool) -> _Plan:
    """Replace quantizable MatMul/Gemm nodes of the main graph by onnxruntime's IntegerOps form.

    Quantized initializers are added as placeholders (name, type, dims; no data): `_stream`
    fills them in. Source weights no node uses any more are dropped.
    """
    graph = model.graph
    plan = _Plan()
    fresh = _Names(_all_names(graph))
    initializers = {t.name: t for t in graph.initializer}
    graph_inputs = {v.name for v in graph.input}
    weights: dict[tuple[str, bool], _Weight] = {}
    activations: dict[str, tuple[str, str, str]] = {}
    scale_muls: dict[str, str] = {}
    nodes: list[onnx.NodeProto] = []

    for node in graph.node:
        for sub in _subgraphs(node):
            for inner in _all_nodes(sub):
                if inner.op_type in SUPPORTED_OP_TYPES and inner.domain in ("", "ai.onnx"):
                    plan.skipped.append({"node": inner.name, "op_type": inner.op_type,
                                         "reason": f"inside a subgraph of {node.op_type} {node.name!r}"})
        if node.op_type not in SUPPORTED_OP_TYPES or node.domain not in ("", "ai.onnx"):
            nodes.append(node)
            continue
        reason = _why_not(node, op_types, initializers, graph_inputs)
        if reason:
            plan.skipped.append({"node": node.name, "op_type": node.op_type, "reason": reason})
            nodes.append(node)
            continue

        a, b, out = node.input[0], node.input[1], node.output[0]
        transpose = node.op_type == "Gemm" and bool(_attr(node, "transB", 0))
        bias = node.input[2] if node.op_type == "Gemm" and len(node.input) > 2 else ""
        if node.op_type == "Gemm":  # onnxruntime's replace_gemm_with_matmul, names included
            name = node.name + "_MatMul" if node.name else ""
            mm_out = fresh(out + "_MatMul") if bias else out
        else:
            name, mm_out = node.name, out

        weight = weights.get((b, transpose))
        if weight is None:
            source = initializers[b]
            suffixes = ("_quantized", "_scale", "_zero_point")
            if transpose:  # reserves B_Transposed and the names derived from it, as onnxruntime does
                base = fresh(b + "_Transposed", ("", *suffixes))
                q_name, scale_name, zp_name = (base + s for s in suffixes)
            else:
                q_name, scale_name, zp_name = (fresh(b + s) for s in suffixes)
            k, n = source.dims[::-1] if transpose else source.dims
            weight = _Weight(source, transpose, q_name, scale_name, zp_name, (int(k), int(n)))
            weights[(b, transpose)] = weight
            plan.weights[weight.q_name] = weight

        if a not in activations:
            activations[a] = (fresh(a + "_quantized"), fresh(a + "_scale"), fresh(a + "_zero_point"))
            nodes.append(helper.make_node("DynamicQuantizeLinear", [a], list(activations[a]), a + "_QuantizeLinear"))
        a_q, a_scale, a_zp = activations[a]

        mmi_name = name + "_quant" if name else ""
        mmi_out = fresh(mm_out + "_output_quantized")
        cast_out = fresh(mmi_out + "_cast_output")
        mul_name = mmi_name + "_scales_mul" if mmi_name else f"{a_scale}_{weight.scale_name}_mul"
        if mul_name not in scale_muls:
            scale_muls[mul_name] = fresh(mul_name + ":0")
            nodes.append(helper.make_node("Mul", [a_scale, weight.scale_name], [scale_muls[mul_name]], mul_name))
        nodes.append(helper.make_node("MatMulInteger", [a_q, weight.q_name, a_zp, weight.zp_name], [mmi_out], mmi_name))
        nodes.append(helper.make_node("Cast", [mmi_out], [cast_out], mmi_out + "_cast", to=TensorProto.FLOAT))
        nodes.append(helper.make_node("Mul", [cast_out, scale_muls[mul_name]], [mm_out],
                                      mmi_name + "_output_scale_mul" if mmi_name else ""))
        if bias:
            nodes.append(helper.make_node("Add", [mm_out, bias], [out], node.name + "_Add" if node.name else ""))
        plan.quantized_nodes += 1

    kept_nodes = [_copy(n) for n in nodes]  # copies: the originals live in the field cleared next
    graph.ClearField("node")
    graph.node.extend(kept_nodes)

    used = {o.name for o in graph.output}
    for node in _all_nodes(graph):
        used.update(node.input)
    by_source: dict[str, list[_Weight]] = {}
    for weight in plan.weights.values():
        by_source.setdefault(weight.source.name, []).append(weight)
    unused = []
    for index, tensor in enumerate(graph.initializer):
        for w in by_source.get(tensor.name, []):
            if tensor.name in used:  # kept: streaming rewrites its data fields, so read from a copy
                w.source = _copy(tensor)
            elif not unused or unused[-1] != index:
                unused.append(index)
    for index in reversed(unused):  # deleted in place, not copied (python protobuf keeps the
        del graph.initializer[index]  # references held by the _Weights valid)
    for w in plan.weights.values():  # placeholders, filled by _stream
        channels = [w.shape[1]] if per_channel else []
        graph.initializer.add(name=w.q_name, data_type=TensorProto.INT8, dims=list(w.shape))
        graph.initializer.add(name=w.scale_name, data_type=TensorProto.FLOAT, dims=channels)
        graph.initializer.add(name=w.zp_name, data_type=TensorProto.INT8, dims=channels)
    return plan


def _copy(message):
    copy = type(message)()
    copy.CopyFrom(message)
    return copy


# ---------------------------------------------------------------------------------------------
# reading and writing tensor data


class _Source:
    """Reads the source's tensors: external data by file offset, inline data from the proto."""

    def __init__(self, base: Path):
        self.base = base
        self.files: dict[Path, object] = {}

    def _where(self, tensor: TensorProto) -> tuple[Path, int, int]:
        info = ExternalDataInfo(tensor)
        return (self.base / info.location), int(info.offset or 0), _nbytes(tensor)

    def check_all(self, model: onnx.ModelProto, src: Path) -> list[Path]:
        """Checks every external tensor's file and range now, before anything is written."""
        files: dict[Path, int] = {}
        for tensor in _all_tensors(model.graph):
            if not _is_external(tensor):
                continue
            path, offset, length = self._where(tensor)
            if path not in files:
                if not path.is_file():
                    raise QuantizeInputError(f"{src}: external data file {path.name} of {tensor.name!r} is missing")
                files[path] = path.stat().st_size
            if offset + length > files[path]:
                raise QuantizeInputError(f"{src}: external data of {tensor.name!r} ends past the end of {path.name}")
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
                raise QuantizeInputError(f"{path}: ends inside tensor {tensor.name!r}")
            done += got

    def chunks(self, tensor: TensorProto, size: int = 16 << 20):
        """The tensor's raw bytes, a chunk at a time."""
        length = _nbytes(tensor)
        buffer = bytearray(min(size, length))
        for start in range(0, length, size):
            view = memoryview(buffer)[: min(size, length - start)]
            self.read(tensor, start, view)
            yield view

    def rows(self, tensor: TensorProto, max_bytes: int = CHUNK_BYTES):
        """(first row, float32 [rows, cols] block) over a 2-D float32 tensor; blocks are reused."""
        rows, cols = (int(d) for d in tensor.dims)
        step = max(1, max_bytes // max(1, 4 * cols))
        if _is_external(tensor):
            buffer = np.empty(min(step, rows) * cols, dtype=_F32)
            for r0 in range(0, rows, step):
                n = min(step, rows - r0)
                block = buffer[: n * cols]
                self.read(tensor, 4 * r0 * cols, memoryview(block).cast("B"))
                yield r0, block.reshape(n, cols)
        else:
            if tensor.HasField("raw_data"):
                array = np.frombuffer(tensor.raw_data, dtype=_F32).reshape(rows, cols)
            else:
                array = numpy_helper.to_array(tensor).astype(np.float32).reshape(rows, cols)
            for r0 in range(0, rows, step):
                yield r0, array[r0 : r0 + step]


class _Sink:
    """Puts tensor bytes in the output: appended to the data file, or inline when small."""

    def __init__(self, file, location: str):
        self.file, self.location, self.offset = file, location, 0

    def put(self, tensor: TensorProto, parts, nbytes: int) -> None:
        """Stores `nbytes` bytes, given as an iterable of buffers, as the tensor's data.

        `parts` may read the tensor's own source data lazily: its fields change only at the end.
        """
        if nbytes < INLINE_LIMIT:
            data = b"".join(bytes(memoryview(p).cast("B")) for p in parts)
            del tensor.external_data[:]
            tensor.ClearField("data_location")
            tensor.raw_data = data
            return
        pad = -self.offset % (ALIGNMENT if nbytes >= ALIGN_THRESHOLD else SMALL_ALIGNMENT)
        if pad:
            self.file.write(b"\0" * pad)
            self.offset += pad
        begin = self.offset
        for part in parts:
            view = memoryview(part).cast("B")
            self.file.write(view)
            self.offset += view.nbytes
        if self.offset - begin != nbytes:
            raise RuntimeError(f"{tensor.name}: wrote {self.offset - begin} bytes, expected {nbytes}")
        tensor.ClearField("raw_data")
        del tensor.external_data[:]
        tensor.data_location = TensorProto.EXTERNAL
        for key, value in (("location", self.location), ("offset", str(begin)), ("length", str(nbytes))):
            entry = tensor.external_data.add()
            entry.key, entry.value = key, value


def _copy_through(tensor: TensorProto, source: _Source, sink: _Sink) -> None:
    if _is_external(tensor):
        sink.put(tensor, source.chunks(tensor), _nbytes(tensor))
    elif tensor.HasField("raw_data") and len(tensor.raw_data) >= INLINE_LIMIT:
        data = tensor.raw_data
        tensor.ClearField("raw_data")
        sink.put(tensor, [data], len(data))
    # else: typed fields (float_data, ...) or small: stays inline as it is


# ---------------------------------------------------------------------------------------------
# quantization: onnxruntime's quant_utils.compute_scale_zp / quantize_nparray, vectorized


def _scales(rmin: np.ndarray, rmax: np.ndarray) -> np.ndarray:
    """Symmetric int8 scales (float32) from float32 minima/maxima, as onnxruntime computes them."""
    rmin = np.minimum(rmin, np.float32(0))
    rmax = np.maximum(rmax, np.float32(0))
    absmax = np.maximum(np.abs(rmin), np.abs(rmax)).astype(np.float64)
    scale = (absmax - (-absmax)) / np.float64(2 * SYMMETRIC_QMAX)
    out = np.atleast_1d(scale.astype(np.float32))
    out[np.atleast_1d(scale) < np.finfo(np.float32).tiny] = 1.0  # all-zero weights: scale 1, zp 0
    return out


def _quantize_block(block: np.ndarray, scale: np.ndarray, work: np.ndarray) -> np.ndarray:
    """round(block / scale) clipped to int8; `work` is a float32 scratch of block's size."""
    np.divide(block, scale, out=work)
    np.rint(work, out=work)  # numpy's round: half to even, as onnxruntime's .round()
    np.clip(work, INT8_MIN, INT8_MAX, out=work)
    return work.astype(np.int8)


def _quantize(weight: _Weight, source: _Source, sink: _Sink, q: TensorProto, scale_t: TensorProto,
              zp_t: TensorProto, per_channel: bool) -> None:
    tensor = weight.source
    rows, cols = (int(d) for d in tensor.dims)
    # per channel = per output column N: a column of W, or a row of B when it is transposed
    channels = rows if weight.transpose else cols
    axis = 1 if weight.transpose else 0
    if per_channel:
        rmin = np.zeros(channels, np.float32)
        rmax = np.zeros(channels, np.float32)
        for r0, block in source.rows(tensor):
            if block.size == 0:
                continue
            if weight.transpose:
                rmin[r0 : r0 + len(block)] = block.min(axis=axis)
                rmax[r0 : r0 + len(block)] = block.max(axis=axis)
            else:
                np.minimum(rmin, block.min(axis=axis), out=rmin)
                np.maximum(rmax, block.max(axis=axis), out=rmax)
    else:
        rmin = rmax = np.float32(0)
        for _, block in source.rows(tensor):
            if block.size:
                rmin, rmax = min(rmin, block.min()), max(rmax, block.max())
    scales = _scales(np.asarray(rmin, np.float32), np.asarray(rmax, np.float32))
    if not per_channel:
        scales = scales.reshape(())

    def blocks():
        work = None
        for r0, block in source.rows(tensor):
            if work is None or work.shape != block.shape:
                work = np.empty(block.shape, np.float32)
            if not per_channel:
                s = scales
            elif weight.transpose:
                s = scales[r0 : r0 + len(block), None]
            else:
                s = scales[None, :]
            yield r0, _quantize_block(block, s, work)

    k, n = weight.shape
    if weight.transpose:  # [N, K] source -> [K, N] int8, assembled in memory (1/4 of the fp32)
        out = np.empty((k, n), np.int8)
        for r0, block in blocks():
            out[:, r0 : r0 + len(block)] = block.T
        sink.put(q, [out], out.nbytes)
    else:
        sink.put(q, (block for _, block in blocks()), k * n)
    scale_t.CopyFrom(numpy_helper.from_array(scales.astype(np.float32), weight.scale_name))
    zp_t.CopyFrom(numpy_helper.from_array(np.zeros(scales.shape, np.int8), weight.zp_name))
    _copy_through(scale_t, source, sink)  # per-channel vectors of 1 KiB or more go to the data file
    _copy_through(zp_t, source, sink)


def _stream(model, plan: _Plan, source: _Source, sink: _Sink, per_channel: bool, progress: bool) -> None:
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    graph = model.graph
    by_name = {t.name: t for t in graph.initializer}
    filled = {name for w in plan.weights.values() for name in (w.scale_name, w.zp_name)}
    others = list(_all_tensors(graph, initializers=False))
    bar = Progress(
        TextColumn("int8 {task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
        console=Console(stderr=True), disable=not progress, transient=False,
    )
    with bar:
        task = bar.add_task("", total=len(graph.initializer) - len(filled) + len(others))
        for tensor in graph.initializer:
            if tensor.name in filled:
                continue
            bar.update(task, description=tensor.name[-48:])
            weight = plan.weights.get(tensor.name)
            if weight is not None:
                _quantize(weight, source, sink, tensor, by_name[weight.scale_name], by_name[weight.zp_name], per_channel)
                weight.source = TensorProto()  # let go of the source (its data, when inline)
            else:
                _copy_through(tensor, source, sink)
            bar.advance(task)
        for tensor in others:
            _copy_through(tensor, source, sink)
            bar.advance(task)


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte, value = value & 0x7F, value >> 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


# protobuf keys (field number << 3 | wire type 2, length-delimited) of the fields written by hand
_MODEL_GRAPH, _GRAPH_INITIALIZER, _TENSOR_RAW_DATA = b"\x3a", b"\x2a", b"\x4a"  # fields 7, 5, 9


def _write_inline(model: onnx.ModelProto, data_path: Path, out) -> None:
    """Writes `model` as one .onnx, its externally stored tensors read back from `data_path`.

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

        for tensor in _all_tensors(graph, initializers=False):  # Constant and subgraph tensors
            if _is_external(tensor):
                raw = read(tensor)
                tensor.ClearField("data_location")
                del tensor.external_data[:]
                tensor.raw_data = raw

        heads, total = [], 0
        for tensor in graph.initializer:
            head = _copy(tensor)
            length = 0
            if _is_external(tensor):
                length = int(ExternalDataInfo(tensor).length)
                head.ClearField("data_location")
                del head.external_data[:]
            encoded = head.SerializeToString()
            size = len(encoded) + (len(_TENSOR_RAW_DATA) + len(_varint(length)) + length if length else 0)
            heads.append((tensor, encoded, length, size))
            total += len(_GRAPH_INITIALIZER) + len(_varint(size)) + size

        rest = _copy(graph)
        rest.ClearField("initializer")
        rest = rest.SerializeToString()
        outer = _copy(model)
        outer.ClearField("graph")
        out.write(outer.SerializeToString())
        out.write(_MODEL_GRAPH + _varint(len(rest) + total) + rest)
        for tensor, encoded, length, size in heads:
            out.write(_GRAPH_INITIALIZER + _varint(size) + encoded)
            if length:
                out.write(_TENSOR_RAW_DATA + _varint(length))
                info = ExternalDataInfo(tensor)
                data.seek(int(info.offset or 0))
                left = length
                while left:
                    chunk = data.read(min(left, 16 << 20))
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
