"""Dynamic int8 quantization of an fp32 ONNX graph, one tensor at a time.

`quantize_dynamic_int8(src, dst)` writes the graph that onnxruntime's
`quantize_dynamic(src, dst, weight_type=QuantType.QInt8, op_types_to_quantize=["MatMul"])`
writes: same initializers (names, values, scales, zero points) and node structure, so the two
run bit-identical. (Left out, as out of scope: onnxruntime's defaults also turn Conv into
ConvInteger and quantize Gather tables; here Conv and Gather stay fp32.) What differs is
memory: onnxruntime loads the whole model, deep-copies it, saves and reloads it (about three
copies alive, more than twice the model's size). Here the graph is loaded without its weights and
each weight is read from its external data file (or the proto, when inline), quantized and
written out on its own, in row chunks of `chunk_bytes` (pgexport/graphio): the peak is the graph
proto plus a few chunks, whatever the model's size (plus, for a Gemm weight that must be
transposed, its int8 copy). Figures: benchmarks/results/graphio.md.

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
  Add) into DynamicQuantizeMatMul at session load, so both run the same kernel at the same speed
  (benchmarks/results/graphio.md); the standard form uses only ai.onnx ops, so other runtimes
  take it too, and it is what `quantize_dynamic` itself writes.
- A quantized weight that something else uses too (not a quantized MatMul/Gemm) stays in the
  graph in fp32 for that consumer, exact; onnxruntime instead feeds it DequantizeLinear(int8).
- Subgraphs (If/Loop bodies) are left alone, as onnxruntime's default (EnableSubgraph off) does.
  MatMuls not quantized are listed in the result's "skipped" with the reason.

Output files, their layout and the atomic rename: pgexport/graphio/write.py (`write_graph`).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper

from pgexport.graphio.read import CHUNK_BYTES, Source, copy_message, file_bytes
from pgexport.graphio.write import Sink, write_graph
from pgexport.quantize.rewrite import (
    FreshNames,
    QuantizeInputError,
    all_names,
    attribute,
    open_source,
    replace_nodes,
    subgraph_skips,
    used_names,
    weight_problem,
)

__all__ = ["QuantizeInputError", "SUPPORTED_OP_TYPES", "quantize_dynamic_int8"]
SUPPORTED_OP_TYPES = ("MatMul", "Gemm")
INT8_MIN, INT8_MAX, SYMMETRIC_QMAX = -128, 127, 127  # symmetric int8 weights use [-127, 127]


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
    chunk_bytes: int = CHUNK_BYTES,
) -> dict:
    """Quantize the fp32 ONNX model `src` to dynamic int8 at `dst`, a .onnx path (see the module docstring).

    op_types: which of "MatMul" and "Gemm" to quantize (both by default, as onnxruntime does).
    external_data: None picks by size (external above 1.5 GiB of tensors), True/False force it.
    chunk_bytes: about how much of a weight is read and quantized at a time (the output does not
    depend on it).

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
    model, source, source_files = open_source(src, dst)
    plan = _rewrite(model, op_types, per_channel)
    by_name = {t.name: t for t in model.graph.initializer}

    def producer(weight: _Weight):
        def produce(tensor: TensorProto, sink: Sink) -> None:
            scale, zero_point = by_name[weight.scale_name], by_name[weight.zp_name]
            _quantize(weight, source, sink, tensor, scale, zero_point, per_channel, chunk_bytes)
            weight.source = TensorProto()  # let go of the source (its data, when inline)
        return produce

    produce = {name: producer(w) for name, w in plan.weights.items()}
    skip = {name for w in plan.weights.values() for name in (w.scale_name, w.zp_name)}
    external = write_graph(model, source, dst, produce, skip=skip, external_data=external_data,
                           label="int8", progress=progress)
    data_name = dst.name + ".data"

    weight_before = sum(4 * w.shape[0] * w.shape[1] for w in plan.weights.values())
    channels = sum(w.shape[1] if per_channel else 1 for w in plan.weights.values())
    return {
        "quantized": plan.quantized_nodes,
        "quantized_weights": len(plan.weights),
        "skipped": plan.skipped,
        "bytes_before": file_bytes(src, source_files),
        "bytes_after": file_bytes(dst, [dst.parent / data_name] if external else []),
        "weight_bytes_before": weight_before,
        "weight_bytes_after": weight_before // 4 + 5 * channels,  # int8 + float32 scale + int8 zero point
        "external_data": data_name if external else None,
        "per_channel": per_channel,
        "seconds": round(time.perf_counter() - started, 3),
    }


# ---------------------------------------------------------------------------------------------
# checks


def _check_op_types(op_types) -> frozenset:
    op_types = frozenset([op_types] if isinstance(op_types, str) else op_types)
    unknown = op_types - set(SUPPORTED_OP_TYPES)
    if unknown or not op_types:
        raise ValueError(f"op_types: {sorted(unknown) or 'empty'}: choose among {list(SUPPORTED_OP_TYPES)}")
    return op_types


# ---------------------------------------------------------------------------------------------
# the graph rewrite


def _why_not(node, op_types, initializers, graph_inputs) -> str | None:
    """Why this MatMul/Gemm is not quantized, or None when it is."""
    if node.op_type not in op_types:
        return f"{node.op_type} is not in op_types"
    if node.op_type == "Gemm":
        if attribute(node, "transA", 0):
            return "Gemm with transA=1"
        if attribute(node, "alpha", 1.0) != 1.0:
            return "Gemm with alpha != 1"
        if len(node.input) > 2 and node.input[2] and attribute(node, "beta", 1.0) != 1.0:
            return "Gemm with beta != 1"
    return weight_problem(node, initializers, graph_inputs)


def _rewrite(model: onnx.ModelProto, op_types: frozenset, per_channel: bool) -> _Plan:
    """Replace quantizable MatMul/Gemm nodes of the main graph by onnxruntime's IntegerOps form.

    Quantized initializers are added as placeholders (name, type, dims; no data): `_stream`
    fills them in (through write_graph's produce callbacks). Source weights no node uses any more are dropped.
    """
    graph = model.graph
    plan = _Plan()
    fresh = FreshNames(all_names(graph))
    initializers = {t.name: t for t in graph.initializer}
    graph_inputs = {v.name for v in graph.input}
    weights: dict[tuple[str, bool], _Weight] = {}
    activations: dict[str, tuple[str, str, str]] = {}
    scale_muls: dict[str, str] = {}
    nodes: list[onnx.NodeProto] = []

    for node in graph.node:
        plan.skipped += subgraph_skips(node, SUPPORTED_OP_TYPES)
        if node.op_type not in SUPPORTED_OP_TYPES or node.domain not in ("", "ai.onnx"):
            nodes.append(node)
            continue
        reason = _why_not(node, op_types, initializers, graph_inputs)
        if reason:
            plan.skipped.append({"node": node.name, "op_type": node.op_type, "reason": reason})
            nodes.append(node)
            continue

        a, b, out = node.input[0], node.input[1], node.output[0]
        transpose = node.op_type == "Gemm" and bool(attribute(node, "transB", 0))
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

    replace_nodes(graph, nodes)
    used = used_names(graph)
    by_source: dict[str, list[_Weight]] = {}
    for weight in plan.weights.values():
        by_source.setdefault(weight.source.name, []).append(weight)
    unused = []
    for index, tensor in enumerate(graph.initializer):
        for w in by_source.get(tensor.name, []):
            if tensor.name in used:  # kept: streaming rewrites its data fields, so read from a copy
                w.source = copy_message(tensor)
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


def _quantize(weight: _Weight, source: Source, sink: Sink, q: TensorProto, scale_t: TensorProto,
              zp_t: TensorProto, per_channel: bool, chunk_bytes: int) -> None:
    """Fill the placeholders q, scale_t and zp_t: two passes over the weight's row chunks (its
    range, then its int8 values), streamed into the sink."""
    tensor = weight.source
    rows, cols = (int(d) for d in tensor.dims)
    # per channel = per output column N: a column of W, or a row of B when it is transposed
    channels = rows if weight.transpose else cols
    axis = 1 if weight.transpose else 0
    if per_channel:
        rmin = np.zeros(channels, np.float32)
        rmax = np.zeros(channels, np.float32)
        for r0, block in source.rows(tensor, chunk_bytes):
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
        for _, block in source.rows(tensor, chunk_bytes):
            if block.size:
                rmin, rmax = min(rmin, block.min()), max(rmax, block.max())
    scales = _scales(np.asarray(rmin, np.float32), np.asarray(rmax, np.float32))
    if not per_channel:
        scales = scales.reshape(())

    def blocks():
        work = None
        for r0, block in source.rows(tensor, chunk_bytes):
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
    # per-channel vectors of INLINE_LIMIT and more go to the data file
    sink.put_array(scale_t, scales.astype(np.float32))
    sink.put_array(zp_t, np.zeros(scales.shape, np.int8))
