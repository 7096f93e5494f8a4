"""Embedding-table quantization: Gather(table, ids) -> com.microsoft GatherBlockQuantized, 4 or 8 bits.

PaliGemma's token table is 257,216 x 2,048 (2.1 GB in fp32): left in fp32 it is most of a 4-bit
package (the public q4 conversions do that). onnxruntime's GatherBlockQuantized gathers rows of
a block-quantized table and dequantizes them: `quantize_embedding(src, dst, bits=4)` rewrites
each Gather whose data is a constant 2-D float32 initializer, gathered along axis 0, into

    GatherBlockQuantized(table_Q uint8 [V, H * bits / 8], ids, table_scales float32 [V, blocks],
                         table_zero_points uint8) (bits, block_size, gather_axis=0, quantize_axis=1)

Blocks run along the hidden axis (each row is quantized on its own, so the table streams row
chunk by row chunk). Asymmetric, as onnxruntime's own Gather quantization
(DefaultWeightOnlyQuantizer.quant_slice_asymmetric): per block, min/max widened to include 0,
scale = (max - min) / (2^bits - 1), zero point = round(-min / scale); 4-bit values and 4-bit
zero points are packed two per byte, low nibble first (the operator's uint8 layout).
Memory: one chunk of rows (`chunk_bytes`) at a time, streamed through pgexport/graphio as int8's are.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper

from pgexport.graphio.read import CHUNK_BYTES, Source, copy_message, file_bytes
from pgexport.graphio.write import Sink, write_graph
from pgexport.quantize.int4 import check_block_size
from pgexport.quantize.rewrite import (
    FreshNames,
    QuantizeInputError,
    add_opset,
    all_names,
    attribute,
    open_source,
    replace_nodes,
    used_names,
)

BITS = (4, 8)


def quantize_embedding(
    src: Path, dst: Path, *, bits: int = 4, block_size: int = 32, progress: bool = True,
    external_data: bool | None = None, chunk_bytes: int = CHUNK_BYTES,
) -> dict:
    """Quantize the Gather tables of the fp32 ONNX model `src` to `bits` at `dst`, `chunk_bytes`
    of a table at a time (the output does not depend on it).

    Returns {"quantized": Gathers rewritten, "tables": [names], "skipped": [...], "bits",
    "block_size", "bytes_before", "bytes_after", "external_data", "seconds"}.
    """
    started = time.perf_counter()
    if bits not in BITS:
        raise QuantizeInputError(f"embedding bits {bits}: choose 4 or 8")
    check_block_size(block_size)
    src, dst = Path(src), Path(dst)
    model, source, source_files = open_source(src, dst)
    tables, skipped = _rewrite(model, bits, block_size)
    by_name = {t.name: t for t in model.graph.initializer}

    def producer(entry: dict):
        def produce(tensor, sink: Sink) -> None:
            _quantize(entry, source, sink, tensor, by_name, bits, block_size, chunk_bytes)
        return produce

    skip = {e[k] for e in tables.values() for k in ("scales", "zero_points")}
    external = write_graph(model, source, dst, {e["q"]: producer(e) for e in tables.values()}, skip=skip,
                           external_data=external_data, label="embed", progress=progress)
    return {
        "quantized": sum(len(t["nodes"]) for t in tables.values()),
        "tables": sorted(tables),
        "skipped": skipped,
        "bits": bits,
        "block_size": block_size,
        "bytes_before": file_bytes(src, source_files),
        "bytes_after": file_bytes(dst, [dst.parent / (dst.name + ".data")] if external else []),
        "external_data": dst.name + ".data" if external else None,
        "seconds": round(time.perf_counter() - started, 3),
    }


def _rewrite(model: onnx.ModelProto, bits: int, block_size: int):
    graph = model.graph
    fresh = FreshNames(all_names(graph))
    initializers = {t.name: t for t in graph.initializer}
    graph_inputs = {v.name for v in graph.input}
    tables, skipped, nodes = {}, [], []
    for node in graph.node:
        if node.op_type != "Gather" or node.domain not in ("", "ai.onnx"):
            nodes.append(node)
            continue
        data = node.input[0]
        table = initializers.get(data)
        reason = None
        if table is None or data in graph_inputs:
            reason = "data is not a constant initializer"
        elif table.data_type != TensorProto.FLOAT or len(table.dims) != 2:
            reason = "data is not a 2-D float32 table"
        elif attribute(node, "axis", 0) != 0:
            reason = "gathers along an axis other than 0"
        elif bits == 4 and table.dims[1] % 2:
            reason = "odd row length: 4-bit values pack two per byte"
        if reason:
            skipped.append({"node": node.name, "op_type": "Gather", "reason": reason})
            nodes.append(node)
            continue
        if data not in tables:
            tables[data] = {"source": table, "q": fresh(data + f"_Q{bits}"), "scales": fresh(data + "_scales"),
                            "zero_points": fresh(data + "_zero_points"), "nodes": []}
        entry = tables[data]
        entry["nodes"].append(node.name)
        nodes.append(helper.make_node(
            "GatherBlockQuantized", [entry["q"], node.input[1], entry["scales"], entry["zero_points"]], [node.output[0]],
            node.name + f"_Q{bits}" if node.name else "", domain="com.microsoft",
            bits=bits, block_size=block_size, gather_axis=0, quantize_axis=1,
        ))
    replace_nodes(graph, nodes)
    if tables:
        add_opset(model, "com.microsoft")
    used = used_names(graph)
    for index in reversed(range(len(graph.initializer))):
        tensor = graph.initializer[index]
        if tensor.name in tables:
            if tensor.name in used:
                tables[tensor.name]["source"] = copy_message(tensor)
            else:
                del graph.initializer[index]
    for entry in tables.values():
        rows, cols = (int(d) for d in entry["source"].dims)
        blocks = -(-cols // block_size)
        per_byte = 8 // bits
        graph.initializer.add(name=entry["q"], data_type=TensorProto.UINT8, dims=[rows, cols // per_byte])
        graph.initializer.add(name=entry["scales"], data_type=TensorProto.FLOAT, dims=[rows, blocks])
        graph.initializer.add(name=entry["zero_points"], data_type=TensorProto.UINT8, dims=[rows, -(-blocks // per_byte)])
    return tables, skipped


def quantize_rows(block: np.ndarray, bits: int, block_size: int):
    """float32 [rows, H] -> (values uint8 [rows, H], scales float32 [rows, blocks], zero points uint8
    [rows, blocks]), unpacked. Asymmetric, per block of `block_size` along H."""
    rows, cols = block.shape
    blocks = -(-cols // block_size)
    padded = np.zeros((rows, blocks * block_size), np.float32)
    padded[:, :cols] = block
    padded = padded.reshape(rows, blocks, block_size)
    qmax = (1 << bits) - 1
    low = np.minimum(padded.min(-1), 0)  # the zero padding of a partial last block changes nothing:
    high = np.maximum(padded.max(-1), 0)  # the range includes 0 anyway
    scales = (high - low) / np.float32(qmax)
    safe = np.where(scales == 0, np.float32(1), scales)
    zero_points = np.where(scales == 0, 1 << (bits - 1), np.clip(np.rint(-low / safe), 0, qmax))
    values = np.where(scales[..., None] == 0, zero_points[..., None],
                      np.clip(np.rint(padded / safe[..., None] + zero_points[..., None]), 0, qmax))
    values = values.reshape(rows, -1)[:, :cols].astype(np.uint8)
    return values, scales.astype(np.float32), zero_points.astype(np.uint8)


def _pack(values: np.ndarray, bits: int) -> np.ndarray:
    if bits == 8:
        return values
    if values.shape[1] % 2:
        values = np.pad(values, ((0, 0), (0, 1)))
    return (values[:, 0::2] | (values[:, 1::2] << 4)).astype(np.uint8)


def _quantize(entry: dict, source: Source, sink: Sink, tensor, placeholders: dict, bits: int, block_size: int,
              chunk_bytes: int) -> None:
    """Fill a table's placeholders: its packed values streamed into the sink a chunk of rows at a
    time, its scales and zero points (a few per row) gathered meanwhile and put after."""
    rows, cols = (int(d) for d in entry["source"].dims)
    scales = np.empty(list(placeholders[entry["scales"]].dims), np.float32)
    zero_points = np.empty(list(placeholders[entry["zero_points"]].dims), np.uint8)

    def parts():
        for r0, block in source.rows(entry["source"], chunk_bytes):
            values, s, z = quantize_rows(block, bits, block_size)
            scales[r0 : r0 + len(block)] = s
            zero_points[r0 : r0 + len(block)] = _pack(z, bits)
            yield _pack(values, bits)

    sink.put(tensor, parts(), rows * cols * bits // 8)
    sink.put_array(placeholders[entry["scales"]], scales)
    sink.put_array(placeholders[entry["zero_points"]], zero_points)
    entry["source"] = TensorProto()
