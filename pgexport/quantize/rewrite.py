"""What every quantizer's graph rewrite shares: the checks on its source graph and destination,
which MatMul weights can be quantized offline, and the graph-walking helpers (fresh names, node
lists rebuilt in place, the names still read).

Each quantizer (int8.py, int4.py, embed.py, static_streamed.py) loads its source with
`open_source`: the graph without its weights, refused when it is already quantized, its external
data checked, the destination checked not to overwrite it; then it rewrites nodes and writes
with pgexport.graphio.write.write_graph.
"""

from __future__ import annotations

from pathlib import Path

import onnx
from onnx import TensorProto, helper

from pgexport.graphio.read import GraphFileError, Source, copy_message, load_structure, subgraphs

# Ops whose presence means the model is quantized already (QLinear* is matched by prefix).
QUANTIZED_OPS = frozenset({
    "MatMulInteger", "ConvInteger", "DynamicQuantizeLinear", "QuantizeLinear", "DequantizeLinear",
    "DynamicQuantizeMatMul", "MatMulIntegerToFloat", "MatMulNBits", "MatMulBnb4", "QGemm",
    "QAttention", "DynamicQuantizeLSTM", "GatherBlockQuantized", "QOrderedMatMul",
})


class QuantizeInputError(GraphFileError):
    """The source graph cannot be quantized: not an ONNX model, already quantized, bad paths."""


def is_quantized_op(op_type: str) -> bool:
    """Whether an op only appears in quantized graphs."""
    return op_type in QUANTIZED_OPS or op_type.startswith("QLinear")


def load_float_graph(src: Path) -> onnx.ModelProto:
    """The graph at `src` without its weights, checked to be a float ONNX graph every quantizer
    can take: QuantizeInputError when it is missing, not ONNX, already quantized or below opset 11."""
    src = Path(src)
    try:
        model = load_structure(src)
    except GraphFileError as error:
        raise QuantizeInputError(str(error)) from None
    found = sorted({node.op_type for node in all_nodes(model.graph) if is_quantized_op(node.op_type)})
    if found:
        raise QuantizeInputError(f"{src}: already quantized (contains {', '.join(found)})")
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
    if opset < 11:
        raise QuantizeInputError(f"{src}: opset {opset}: DynamicQuantizeLinear needs opset 11 or later")
    return model


def check_destination(src: Path, dst: Path, source_files: list[Path]) -> None:
    """Refuse a destination that would overwrite the source graph or its external data."""
    if dst.resolve() == src.resolve():
        raise QuantizeInputError(f"{dst}: the destination is the source")
    data = (dst.parent / (dst.name + ".data")).resolve()
    if any(data == f.resolve() for f in source_files):
        raise QuantizeInputError(f"{dst}: its data file {data.name} would overwrite the source's external data")


def open_source(src: Path, dst: Path) -> tuple[onnx.ModelProto, Source, list[Path]]:
    """(the float graph without its weights, a Source on its data, its data files), after every
    check that must pass before anything is written (load_float_graph, the external data's files
    and ranges, check_destination)."""
    model = load_float_graph(src)
    source = Source(src.parent)
    try:
        source_files = source.check_all(model, src)
    except GraphFileError as error:
        raise QuantizeInputError(str(error)) from None
    check_destination(src, dst, source_files)
    return model, source, source_files


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


def subgraph_skips(node, op_types) -> list[dict]:
    """The result's "skipped" entries for ops of `op_types` inside `node`'s subgraphs, which no
    quantizer rewrites (as onnxruntime's default, EnableSubgraph off)."""
    return [
        {"node": inner.name, "op_type": inner.op_type, "reason": f"inside a subgraph of {node.op_type} {node.name!r}"}
        for sub in subgraphs(node) for inner in all_nodes(sub)
        if inner.op_type in op_types and inner.domain in ("", "ai.onnx")
    ]


# ---------------------------------------------------------------------------------------------
# walking and rebuilding graphs


def all_nodes(graph: onnx.GraphProto):
    """Every node of a graph and of its subgraphs, depth first."""
    for node in graph.node:
        yield node
        for sub in subgraphs(node):
            yield from all_nodes(sub)


def all_names(graph: onnx.GraphProto, names: set | None = None) -> set:
    """Every tensor name a graph and its subgraphs use (to pick fresh ones)."""
    names = set() if names is None else names
    names.update(t.name for t in graph.initializer)
    names.update(v.name for v in (*graph.input, *graph.output, *graph.value_info))
    for node in graph.node:
        names.update(node.input)
        names.update(node.output)
        for sub in subgraphs(node):
            all_names(sub, names)
    return names


class FreshNames:
    """Fresh tensor names: `base` unless taken, else base_1, base_2, ... (onnxruntime's scheme)."""

    def __init__(self, taken: set):
        self.taken = taken

    def __call__(self, base: str, suffixes=("",)) -> str:
        name, i = base, 0
        while any(name + s in self.taken for s in suffixes):
            i += 1
            name = f"{base}_{i}"
        self.taken.update(name + s for s in suffixes)
        return name


def attribute(node: onnx.NodeProto, name: str, default):
    """A node attribute's value, or `default` when the node does not set it."""
    for attr in node.attribute:
        if attr.name == name:
            return helper.get_attribute_value(attr)
    return default


def replace_nodes(graph: onnx.GraphProto, nodes: list) -> None:
    """Make `nodes` (originals of the graph among them) the graph's node list."""
    kept = [copy_message(n) for n in nodes]  # copies: the originals live in the field cleared next
    graph.ClearField("node")
    graph.node.extend(kept)


def used_names(graph: onnx.GraphProto) -> set:
    """Names some node (subgraphs included) or a graph output reads."""
    used = {o.name for o in graph.output}
    for node in all_nodes(graph):
        used.update(node.input)
    return used


def add_opset(model: onnx.ModelProto, domain: str) -> None:
    """Import `domain` (version 1) unless the model does already."""
    if not any(o.domain == domain for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid(domain, 1))
