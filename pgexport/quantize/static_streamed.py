"""Static int8 (QDQ) in bounded memory, for graphs too large for neural-compressor's whole-model passes.

    quantize_static_int8_streamed(src, dst, graph, feeds, exclude_nodes, workspace, chunk_bytes)

The same QDQ form neural-compressor writes (pgexport/quantize/static.py), on MatMuls with a
constant 2-D float32 weight, minus the QDQ pairs on their outputs:

    X -> QuantizeLinear -> DequantizeLinear (uint8, asymmetric, per tensor, calibrated min/max)
    W_quantized int8 -> DequantizeLinear (symmetric, per output column, axis 1)
    MatMul(X_dequantized, W_dequantized)   (renamed with "_quant", as neural-compressor renames)

Calibration is one onnxruntime session on src (its weights mapped once, the target MatMuls'
activations added as graph outputs; min/max kept per tensor, widened to include 0). The output
is written one tensor at a time from src's data files (pgexport/graphio), each weight read twice
in row chunks of `chunk_bytes` (its per-column range, then its int8 values). Scales, zero points
and int8 values come from neural-compressor's own functions (ox_utils/util.py: calculate_scale_zp,
quantize_data_with_scale_zero) with the ranges it is given (ACTIVATION_QRANGE, WEIGHT_QRANGE), so
weights and scales are bit-identical to its whole-model path's. Conv and Gemm stay fp32 here, and
so does everything neural-compressor leaves in fp32.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper

from pgexport.graphio.read import CHUNK_BYTES, Source, copy_message, link_data_files
from pgexport.graphio.write import Sink, write_graph
from pgexport.quantize.rewrite import replace_nodes, used_names

# neural-compressor's quantize_range for int8 symmetric weights: scale = 2 * max|w| / 128, values in
# [-64, 64], so that no x86 int8 kernel saturates (static.py's docstring). Its full range is 254.
WEIGHT_QRANGE = 128
ACTIVATION_QRANGE = 255  # uint8 asymmetric activations: the full 8 bits


def quantize_static_int8_streamed(src: Path, dst: Path, graph: onnx.ModelProto, feeds: list[dict], exclude_nodes,
                                  workspace: Path, chunk_bytes: int = CHUNK_BYTES) -> None:
    """Calibrate `graph` (src's structure, loaded without weights) on `feeds` and write its QDQ
    form at `dst`, weights in dst.name + ".data" (see the module docstring). `workspace` is a
    scratch folder for the calibration graph; `chunk_bytes` does not change the output."""
    initializers = {t.name: t for t in graph.graph.initializer}
    excluded = set(exclude_nodes)
    targets = [
        n for n in graph.graph.node
        if n.op_type == "MatMul" and n.name not in excluded and n.input[0] not in initializers
        and n.input[1] in initializers and len(initializers[n.input[1]].dims) == 2
        and initializers[n.input[1]].data_type == TensorProto.FLOAT
    ]
    activations = sorted({n.input[0] for n in targets})
    ranges = _calibrate(src, graph, activations, feeds, workspace)
    weights = _rewrite(graph, targets, activations, ranges)
    by_name = {t.name: t for t in graph.graph.initializer}

    def producer(weight: TensorProto):
        def produce(tensor: TensorProto, sink: Sink) -> None:
            _quantize_weight(weight, source, sink, tensor, by_name, chunk_bytes)
        return produce

    source = Source(src.parent)
    source.check_all(graph, src)
    produce = {f"{w.name}_quantized": producer(w) for w in weights}
    skip = {f"{w.name}{suffix}" for w in weights for suffix in ("_scale", "_zero_point")}
    write_graph(graph, source, dst, produce, skip=skip, external_data=True, label="int8-static")


def _calibrate(src: Path, graph: onnx.ModelProto, activations: list[str], feeds: list[dict], workspace: Path) -> dict:
    """{activation: [min(.., 0), max(.., 0)]} over every feed (zero stays exact)."""
    import onnxruntime as ort

    augmented = onnx.ModelProto.FromString(graph.SerializeToString())
    present = {o.name for o in augmented.graph.output}
    augmented.graph.output.extend(helper.ValueInfoProto(name=a) for a in activations if a not in present)
    calibration = workspace / "calibration"
    calibration.mkdir()
    link_data_files(src, graph, calibration)
    onnx.save(augmented, str(calibration / src.name))
    del augmented
    from pgexport.sessions import session_options

    options = session_options(low_memory=True)
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # as neural-compressor calibrates
    session = ort.InferenceSession(str(calibration / src.name), options, providers=["CPUExecutionProvider"])
    ranges = {a: [0.0, 0.0] for a in activations}
    for feed in feeds:
        for name, value in zip(activations, session.run(activations, feed)):
            if value.size:
                ranges[name] = [min(ranges[name][0], float(value.min())), max(ranges[name][1], float(value.max()))]
    return ranges


def _rewrite(graph: onnx.ModelProto, targets: list, activations: list[str], ranges: dict) -> list[TensorProto]:
    """The QDQ graph: one Quantize/Dequantize pair per activation, one DequantizeLinear per weight,
    the target MatMuls reading the dequantized tensors; placeholders for each weight's int8
    values, scale and zero point. Returns the source weights to quantize."""
    from neural_compressor.adaptor.ox_utils.util import calculate_scale_zp

    for name in activations:
        scale, zero_point = calculate_scale_zp(ranges[name][0], ranges[name][1], ACTIVATION_QRANGE, TensorProto.UINT8, "asym")
        graph.graph.initializer.extend([
            helper.make_tensor(f"{name}_scale", TensorProto.FLOAT, [], [float(scale)]),
            helper.make_tensor(f"{name}_zero_point", TensorProto.UINT8, [], [int(zero_point)]),
        ])
    quantize_nodes = {
        name: [
            helper.make_node("QuantizeLinear", [name, f"{name}_scale", f"{name}_zero_point"], [f"{name}_quantized"], name=f"{name}_QuantizeLinear"),
            helper.make_node("DequantizeLinear", [f"{name}_quantized", f"{name}_scale", f"{name}_zero_point"], [f"{name}_dequantized"], name=f"{name}_DequantizeLinear"),
        ]
        for name in activations
    }
    weights: list[str] = []
    for node in targets:
        weight = node.input[1]
        if weight not in weights:
            weights.append(weight)
            quantize_nodes.setdefault(weight, []).append(
                helper.make_node(
                    "DequantizeLinear", [f"{weight}_quantized", f"{weight}_scale", f"{weight}_zero_point"],
                    [f"{weight}_dequantized"], name=f"{weight}_DequantizeLinear", axis=1,  # per output column
                )
            )
    rewritten, placed, target_ids = [], set(), {id(n) for n in targets}
    for node in graph.graph.node:
        if id(node) in target_ids:
            for tensor in (node.input[0], node.input[1]):
                if tensor not in placed:
                    rewritten += quantize_nodes[tensor]
                    placed.add(tensor)
            node.input[0], node.input[1] = f"{node.input[0]}_dequantized", f"{node.input[1]}_dequantized"
            node.name = f"{node.name}_quant"
        rewritten.append(node)
    replace_nodes(graph.graph, rewritten)

    used = used_names(graph.graph)
    sources = {t.name: copy_message(t) for t in graph.graph.initializer if t.name in weights}
    kept = [copy_message(t) for t in graph.graph.initializer if t.name not in sources or t.name in used]
    graph.graph.ClearField("initializer")
    graph.graph.initializer.extend(kept)
    for name in weights:  # placeholders, filled by _quantize_weight
        rows, columns = (int(d) for d in sources[name].dims)
        graph.graph.initializer.add(name=f"{name}_quantized", data_type=TensorProto.INT8, dims=[rows, columns])
        graph.graph.initializer.add(name=f"{name}_scale", data_type=TensorProto.FLOAT, dims=[columns])
        graph.graph.initializer.add(name=f"{name}_zero_point", data_type=TensorProto.INT8, dims=[columns])
    return [sources[name] for name in weights]


def _quantize_weight(weight: TensorProto, source: Source, sink: Sink, tensor: TensorProto, placeholders: dict,
                     chunk_bytes: int) -> None:
    """int8 in [-64, 64] per output column, as neural-compressor quantizes a MatMul weight: its
    range in one pass over row chunks, its values in a second, streamed into the sink."""
    from neural_compressor.adaptor.ox_utils.util import calculate_scale_zp, quantize_data_with_scale_zero

    rows, columns = (int(d) for d in weight.dims)
    low, high = np.zeros(columns, np.float32), np.zeros(columns, np.float32)
    for _, chunk in source.rows(weight, chunk_bytes):
        low, high = np.minimum(low, chunk.min(0)), np.maximum(high, chunk.max(0))
    scale, zero_point = calculate_scale_zp(low, high, WEIGHT_QRANGE, TensorProto.INT8, "sym")  # per column, 7 bits
    chunks = (quantize_data_with_scale_zero(c, TensorProto.INT8, "sym", scale, zero_point) for _, c in source.rows(weight, chunk_bytes))
    sink.put(tensor, chunks, rows * columns)
    sink.put_array(placeholders[f"{weight.name}_scale"], scale.astype(np.float32))
    sink.put_array(placeholders[f"{weight.name}_zero_point"], zero_point.astype(np.int8))
