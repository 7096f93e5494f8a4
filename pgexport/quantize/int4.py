"""int4 weight-only quantization: MatMul(X, W) -> com.microsoft MatMulNBits, one weight at a time.

`quantize_int4(src, dst, method="rtn" | "hqq", block_size=32)` writes the graph onnxruntime's
`MatMulNBitsQuantizer` writes (onnxruntime/quantization/matmul_nbits_quantizer.py), QOperator
format: each MatMul whose weight W [K, N] is a constant 2-D float32 initializer becomes

    Y = MatMulNBits(X, W_Q4 uint8 [N, k_blocks, block_size / 2], W_scales, W_zero_points)
        (K, N, bits=4, block_size; dequantized weight = (q - zero_point) * scale, per block of
        `block_size` rows of W, i.e. along K)

- "rtn" (round to nearest): onnxruntime's own C++ kernel (`quantize_matmul_4bits`, the one its
  DefaultWeightOnlyQuantizer calls), asymmetric by default (uint8 zero points, two per byte,
  scales [N, k_blocks]); `symmetric=True` drops the zero points (implicit 8).
- "hqq" (half-quadratic quantization, data-free but error-aware: it fits each block's zero point
  to minimise an lp-norm (p = 0.7) of the weight's reconstruction error by a proximal solver):
  onnxruntime's `HQQWeightOnlyQuantizer.quantize_internal` (torch). Its zero points z are floats.
  onnxruntime writes them as MatMulNBits' float zero points, which its CPU kernel serves by
  dequantizing the whole weight on every call (two orders of magnitude slower than with uint8
  zero points; benchmarks/results/graphio.md). Here the same weight,
  (q - z) * s = (q - 8) * s + (8 - z) * s, is written as a symmetric MatMulNBits (q, s: implicit
  zero point 8, the fast kernel) plus a per-block correction: the sums of X over each block of K
  rows times C = (8 - z) * s [k_blocks, N] (Pad to whole blocks, Reshape, ReduceSum, MatMul,
  Add), close to the fast kernel's speed. q and s are onnxruntime's bytes; the outputs match its graph's
  to float rounding (tests/test_quantize_methods.py).

Why not call `MatMulNBitsQuantizer` itself: it loads the whole model (10 GB for the 3B decoder)
and keeps quantized copies beside it. Here, as for int8 (both stream through pgexport/graphio), the graph is loaded without its weights and each weight is
read in chunks of whole blocks along K (an even number of them, so packed zero points never
straddle two chunks), quantized and written out; only the weight's packed output (1/8 of its
fp32 size, plus scales) is held until it is written. Chunks give the same bytes as onnxruntime
for rtn. hqq runs onnxruntime's solver on pieces of at most 1 MiB (HQQ_PIECE_BYTES, columns of a
chunk), not on the whole tensor: its elementwise temporaries then stay in cache, an order of magnitude
faster (benchmarks/results/graphio.md). Each piece's blocks are solved exactly as onnxruntime solves them; the
one difference is the solver's early stop, which onnxruntime decides on the mean error of the
whole tensor and this module per piece. A tensor of at most 1 MiB comes out identical; above
that, the mean reconstruction error agrees with onnxruntime's to about 1e-4 of itself
(tests/test_quantize_methods.py).

Left alone, and listed in the result's "skipped": MatMuls whose weight is not a constant 2-D
float32 initializer (attention's activation x activation MatMuls), subgraphs, Gemm (torch.onnx
exports nn.Linear on 3-D inputs as MatMul, which is what PaliGemma's graphs hold). A weight
that something other than a quantized MatMul uses too stays in fp32 for that consumer.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from pgexport.graphio.read import CHUNK_BYTES, Source, copy_message, file_bytes
from pgexport.graphio.write import Sink, write_graph
from pgexport.quantize.rewrite import (
    FreshNames,
    QuantizeInputError,
    add_opset,
    all_names,
    open_source,
    replace_nodes,
    subgraph_skips,
    used_names,
    weight_problem,
)

METHODS = ("rtn", "hqq")
BITS = 4
IMPLICIT_ZERO_POINT = 1 << (BITS - 1)  # MatMulNBits without zero points: 8
HQQ_PIECE_BYTES = 1 << 20  # the solver's temporaries stay in cache (module docstring)


@dataclass
class _Weight:
    source: TensorProto
    q_name: str
    scale_name: str
    zp_name: str | None  # rtn, asymmetric: uint8 zero points
    k: int
    n: int
    correction_name: str | None = None  # hqq: (8 - z) * s per block, [k_blocks, N]


@dataclass
class _Plan:
    weights: dict[str, _Weight] = field(default_factory=dict)  # by q_name
    quantized_nodes: int = 0
    skipped: list[dict] = field(default_factory=list)


def check_block_size(block_size: int) -> int:
    """MatMulNBits and GatherBlockQuantized take a power of two, 16 or more."""
    if block_size < 16 or block_size & (block_size - 1):
        raise QuantizeInputError(f"block size {block_size}: must be a power of two, 16 or more")
    return block_size


def quantize_int4(
    src: Path,
    dst: Path,
    *,
    method: str = "rtn",
    block_size: int = 32,
    symmetric: bool = False,
    accuracy_level: int | None = None,
    progress: bool = True,
    external_data: bool | None = None,
    chunk_bytes: int = CHUNK_BYTES,
) -> dict:
    """Quantize the MatMul weights of the fp32 ONNX model `src` to 4 bits at `dst` (see the module docstring).

    accuracy_level: MatMulNBits' attribute (4 = int8 activations, onnxruntime's fast CPU path;
    None leaves it out: fp32 compute). chunk_bytes: about how much of a weight is read at a time
    (whole blocks; rtn's output does not depend on it, hqq's early stop is decided per chunk piece).
    Returns stats like `quantize_dynamic_int8`'s: "quantized",
    "quantized_weights", "skipped", "bytes_before", "bytes_after", "weight_bytes_before",
    "weight_bytes_after", "method", "block_size", "external_data", "seconds".
    """
    started = time.perf_counter()
    if method not in METHODS:
        raise QuantizeInputError(f"int4 method {method!r}: choose from {', '.join(METHODS)}")
    if method == "hqq" and symmetric:
        raise QuantizeInputError("hqq fits zero points: it has no symmetric form")
    check_block_size(block_size)
    src, dst = Path(src), Path(dst)
    model, source, source_files = open_source(src, dst)
    plan = _rewrite(model, block_size, method, symmetric or method == "hqq", accuracy_level)
    quantize = _hqq if method == "hqq" else _rtn(symmetric)
    by_name = {t.name: t for t in model.graph.initializer}

    def producer(weight: _Weight):
        def produce(tensor: TensorProto, sink: Sink) -> None:
            _quantize(weight, source, sink, by_name, quantize, block_size, chunk_bytes)
            weight.source = TensorProto()
        return produce

    skip = {name for w in plan.weights.values() for name in (w.scale_name, w.zp_name, w.correction_name) if name}
    external = write_graph(model, source, dst, {name: producer(w) for name, w in plan.weights.items()}, skip=skip,
                           external_data=external_data, label="int4", progress=progress)
    weight_before = sum(4 * w.k * w.n for w in plan.weights.values())
    weight_after = 0
    for w in plan.weights.values():
        blocks = -(-w.k // block_size)
        weight_after += w.n * blocks * (block_size // 2 + 4)
        if w.zp_name:
            weight_after += w.n * (blocks + 1) // 2
        if w.correction_name:
            weight_after += w.n * blocks * 4
    return {
        "quantized": plan.quantized_nodes,
        "quantized_weights": len(plan.weights),
        "skipped": plan.skipped,
        "bytes_before": file_bytes(src, source_files),
        "bytes_after": file_bytes(dst, [dst.parent / (dst.name + ".data")] if external else []),
        "weight_bytes_before": weight_before,
        "weight_bytes_after": weight_after,
        "method": method,
        "block_size": block_size,
        "symmetric": symmetric,
        "accuracy_level": accuracy_level,
        "external_data": dst.name + ".data" if external else None,
        "seconds": round(time.perf_counter() - started, 3),
    }


def _rewrite(model: onnx.ModelProto, block_size: int, method: str, symmetric: bool, accuracy_level) -> _Plan:
    """Replace quantizable MatMuls of the main graph by MatMulNBits (hqq: plus its zero-point
    correction); placeholders for their weights."""
    graph = model.graph
    plan = _Plan()
    fresh = FreshNames(all_names(graph))
    constants: dict[tuple, str] = {}

    def constant(*values: int) -> str:  # int64 1-D initializers, one per distinct value
        if values not in constants:
            constants[values] = fresh("MatMulNBits_hqq_const")
            graph.initializer.append(numpy_helper.from_array(np.array(values, np.int64), constants[values]))
        return constants[values]
    initializers = {t.name: t for t in graph.initializer}
    graph_inputs = {v.name for v in graph.input}
    by_source: dict[str, _Weight] = {}
    nodes = []
    for node in graph.node:
        plan.skipped += subgraph_skips(node, ("MatMul",))
        if node.op_type != "MatMul" or node.domain not in ("", "ai.onnx"):
            if node.op_type == "Gemm":
                plan.skipped.append({"node": node.name, "op_type": "Gemm", "reason": "Gemm is not quantized to 4 bits"})
            nodes.append(node)
            continue
        reason = weight_problem(node, initializers, graph_inputs)
        if reason:
            plan.skipped.append({"node": node.name, "op_type": node.op_type, "reason": reason})
            nodes.append(node)
            continue
        b = node.input[1]
        weight = by_source.get(b)
        if weight is None:
            k, n = (int(d) for d in initializers[b].dims)
            zp = None if symmetric else fresh(b + "_zero_points")
            weight = _Weight(initializers[b], fresh(b + f"_Q{BITS}"), fresh(b + "_scales"), zp, k, n,
                             fresh(b + "_zero_correction") if method == "hqq" else None)
            by_source[b] = plan.weights.setdefault(weight.q_name, weight)
        inputs = [node.input[0], weight.q_name, weight.scale_name] + ([weight.zp_name] if weight.zp_name else [])
        attributes = dict(K=weight.k, N=weight.n, bits=BITS, block_size=block_size)
        if accuracy_level is not None:
            attributes["accuracy_level"] = accuracy_level
        name = node.name + f"_Q{BITS}" if node.name else ""
        y = fresh(node.output[0] + "_symmetric") if weight.correction_name else node.output[0]
        nodes.append(helper.make_node("MatMulNBits", inputs, [y], name, domain="com.microsoft", **attributes))
        if weight.correction_name:
            nodes += _correction(node.input[0], y, node.output[0], weight, block_size, fresh, constant, name)
        plan.quantized_nodes += 1
    replace_nodes(graph, nodes)
    if plan.quantized_nodes:
        add_opset(model, "com.microsoft")
    used = used_names(graph)
    for index in reversed(range(len(graph.initializer))):
        tensor = graph.initializer[index]
        weight = by_source.get(tensor.name)
        if weight is None:
            continue
        if tensor.name in used:
            weight.source = copy_message(tensor)  # kept for another consumer: streaming rewrites its fields
        else:
            del graph.initializer[index]  # in place: the _Weight keeps a valid reference
    for w in plan.weights.values():  # placeholders, filled by _stream
        blocks = -(-w.k // block_size)
        graph.initializer.add(name=w.q_name, data_type=TensorProto.UINT8, dims=[w.n, blocks, block_size // 2])
        if method == "hqq":  # scales flattened, as onnxruntime writes them
            graph.initializer.add(name=w.scale_name, data_type=TensorProto.FLOAT, dims=[w.n * blocks])
            graph.initializer.add(name=w.correction_name, data_type=TensorProto.FLOAT, dims=[blocks, w.n])
        else:
            graph.initializer.add(name=w.scale_name, data_type=TensorProto.FLOAT, dims=[w.n, blocks])
            if w.zp_name:
                graph.initializer.add(name=w.zp_name, data_type=TensorProto.UINT8, dims=[w.n, (blocks + 1) // 2])
    return plan


def _correction(x: str, y: str, out: str, weight: _Weight, block_size: int, fresh, constant, name: str) -> list:
    """out = y + (X's sums over each block of K) @ C, whatever X's leading dimensions."""
    blocks = -(-weight.k // block_size)
    t = lambda suffix: fresh(f"{out}_hqq_{suffix}")  # noqa: E731
    prefix = (name or out) + "_hqq_"
    nodes = []
    if weight.k % block_size:  # zeros to whole blocks, along K only (opset 18's Pad axes)
        padded = t("padded")
        nodes.append(helper.make_node("Pad", [x, constant(0, blocks * block_size - weight.k), "", constant(-1)],
                                      [padded], prefix + "pad"))
        x = padded
    rows, sums, per_row, product, shape = t("blocks"), t("sums"), t("block_sums"), t("correction"), t("shape")
    nodes += [
        helper.make_node("Reshape", [x, constant(-1, block_size)], [rows], prefix + "blocks"),
        helper.make_node("ReduceSum", [rows, constant(1)], [sums], prefix + "sum", keepdims=0),
        helper.make_node("Reshape", [sums, constant(-1, blocks)], [per_row], prefix + "rows"),
        helper.make_node("MatMul", [per_row, weight.correction_name], [product], prefix + "matmul"),
        helper.make_node("Shape", [y], [shape], prefix + "shape"),
        helper.make_node("Reshape", [product, shape], [t("reshaped")], prefix + "reshape"),
    ]
    nodes.append(helper.make_node("Add", [y, nodes[-1].output[0]], [out], prefix + "add"))
    return nodes


# ---------------------------------------------------------------------------------------------
# per-chunk quantizers: float32 [rows, N] (rows a whole number of blocks but in the last chunk,
# which each pads with zeros as onnxruntime does) -> packed [N, blocks, bs/2],
# scales [N, blocks], zero points (rtn: uint8 [N, ceil(blocks / 2)]; hqq: float32 [N, blocks])


def _rtn(symmetric: bool):
    def quantize(chunk: np.ndarray, block_size: int):
        from onnxruntime.capi._pybind_state import quantize_matmul_4bits

        rows, cols = chunk.shape  # rows: K's, unpadded (the kernel is told the true count, as onnxruntime does)
        blocks = -(-rows // block_size)
        if rows % block_size:
            chunk = np.pad(chunk, ((0, blocks * block_size - rows), (0, 0)))
        packed = np.zeros((cols, blocks, block_size // 2), np.uint8)
        scales = np.zeros((cols, blocks), np.float32)
        zero_points = np.zeros((cols, (blocks + 1) // 2), np.uint8)
        quantize_matmul_4bits(packed, np.ascontiguousarray(chunk), scales, zero_points, block_size, cols, rows, symmetric)
        return packed, scales, None if symmetric else zero_points

    return quantize


def _hqq(chunk: np.ndarray, block_size: int):
    """onnxruntime's solver on pieces of at most HQQ_PIECE_BYTES (columns of a chunk, N, are
    independent); returns the packed q, the scales and the correction (8 - z) * s, [N, blocks]."""
    import torch
    from onnxruntime.quantization.matmul_nbits_quantizer import HQQWeightOnlyQuantConfig, HQQWeightOnlyQuantizer

    quantizer = HQQWeightOnlyQuantizer(HQQWeightOnlyQuantConfig(block_size=block_size, bits=BITS))
    rows, cols = chunk.shape
    width = max(1, HQQ_PIECE_BYTES // (4 * rows))
    pieces = []
    for c0 in range(0, cols, width):
        piece = torch.from_numpy(np.array(chunk[:, c0 : c0 + width])).T
        pieces.append(quantizer.quantize_internal(piece, bits=BITS, group_size=block_size))
    q, scales, zero = (torch.cat(parts) for parts in zip(*pieces))
    q = q.to(torch.uint8).numpy()  # [N, rows], values 0..15
    packed = (q[:, 0::2] | (q[:, 1::2] << 4)).reshape(q.shape[0], -1, block_size // 2)
    return packed, scales.numpy(), ((IMPLICIT_ZERO_POINT - zero) * scales).numpy()


def _quantize(weight: _Weight, source: Source, sink: Sink, placeholders: dict, quantize, block_size: int,
              chunk_bytes: int) -> None:
    """Fill the weight's placeholders: row chunks of whole blocks (an even number of them, so
    packed zero points never straddle two chunks) quantized, the packed output assembled whole."""
    k, n = weight.k, weight.n
    blocks = -(-k // block_size)
    packed = np.empty((n, blocks, block_size // 2), np.uint8)
    scales = np.empty((n, blocks), np.float32)
    # the quantizer's third output: rtn's uint8 zero points, two a byte, or hqq's float corrections
    zero_points = np.empty((n, (blocks + 1) // 2), np.uint8) if weight.zp_name else None
    corrections = np.empty((n, blocks), np.float32) if weight.correction_name else None
    step = max(2, chunk_bytes // (4 * n * block_size) // 2 * 2) * block_size  # rows: an even number of blocks
    for r0, chunk in source.rows(weight.source, 4 * n * step):
        p, s, z = quantize(chunk, block_size)
        b0, nb = r0 // block_size, p.shape[1]
        packed[:, b0 : b0 + nb] = p
        scales[:, b0 : b0 + nb] = s
        if zero_points is not None:
            zero_points[:, b0 // 2 : b0 // 2 + z.shape[1]] = z
        if corrections is not None:
            corrections[:, b0 : b0 + nb] = z
    sink.put(placeholders[weight.q_name], [packed], packed.nbytes)
    written = [(weight.scale_name, scales)]
    if zero_points is not None:
        written.append((weight.zp_name, zero_points))
    if corrections is not None:
        written.append((weight.correction_name, corrections.T))  # [blocks, N], the correction MatMul's B
    for name, value in written:
        sink.put_array(placeholders[name], value)
