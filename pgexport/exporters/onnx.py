"""PaliGemma -> three ONNX graphs in the layout Optimum and transformers.js consume, as
`pgexport.contract` declares them (names, dims, cache naming, `logits_to_keep`).

Each graph is exported from its wrapper (exporters/wrappers.py) with example inputs made here;
the contract's dynamic dims are named on the saved graph. `logits_to_keep` (int64 scalar,
transformers' argument of that name) is then added to the decoder as an overridable initializer:
consumers that do not feed it (transformers.js, Optimum) get logits for every position, and a
generation loop feeds 1 at prefill and skips the LM head for the prompt (a [batch, prompt, 257216]
fp32 tensor: 4.2 GB per row at 896 px).
"""

from __future__ import annotations

import contextlib
import gc
import io
import logging
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import onnx
import torch
from onnx import helper, numpy_helper
from torch.utils import _pytree as pytree

from pgexport.config import DEFAULT_OPSET, check_opset
from pgexport.contract import DECODER, EMBED, LOGITS, LOGITS_TO_KEEP, VISION, GraphSpec
from pgexport.exporters.wrappers import Decoder, EmbedTokens, VisionEncoder

# Above this a graph's weights go to one external-data file (protobuf's hard limit is 2 GiB).
EXTERNAL_DATA_THRESHOLD = 1 << 30


@dataclass(frozen=True)
class GraphExport:
    """How one contract graph is exported: the module that implements it and its example inputs.
    Names and dynamic axes are the contract's, for the model's layer count."""

    contract: GraphSpec
    wrapper: Callable[[torch.nn.Module], torch.nn.Module]
    example_inputs: Callable[[object], tuple]
    layers: int = 0

    @property
    def filename(self) -> str:
        return self.contract.filename()

    @property
    def input_names(self) -> list[str]:
        return self.contract.input_names(self.layers)

    @property
    def output_names(self) -> list[str]:
        return self.contract.output_names(self.layers)

    @property
    def dynamic_axes(self) -> dict[str, dict[int, str]]:
        return self.contract.dynamic_axes(self.layers)


def vision_pixels(config) -> tuple:
    image_size = config.vision_config.image_size
    return (torch.randn(2, 3, image_size, image_size),)


def embed_ids(config) -> tuple:
    return (torch.randint(0, config.text_config.vocab_size, (2, 5)),)


def decoder_step(config) -> tuple:
    """A decode call past a short cache. Sizes >= 2 everywhere: the exporter specialises dimensions
    it sees as 0 or 1."""
    text = config.text_config
    batch, past, seq = 2, 3, 4
    mask = torch.ones(batch, past + seq, dtype=torch.int64)
    positions = torch.arange(past + 1, past + seq + 1).expand(batch, seq)
    kv = [torch.randn(batch, text.num_key_value_heads, past, text.head_dim) for _ in range(2 * text.num_hidden_layers)]
    return (torch.randn(batch, seq, text.hidden_size), mask, positions, kv)


def graph_exports(config) -> list[GraphExport]:
    """The contract's three graphs, each with its wrapper and example inputs."""
    return [
        GraphExport(VISION, VisionEncoder, vision_pixels),
        GraphExport(EMBED, EmbedTokens, embed_ids),
        GraphExport(DECODER, Decoder, decoder_step, layers=config.text_config.num_hidden_layers),
    ]


def _parameter_bytes(module: torch.nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in module.parameters())


@contextlib.contextmanager
def quiet_exporter():
    """torch.onnx prints its progress and many warnings; keep the CLI output to ours."""
    loggers = [logging.getLogger(name) for name in ("torch.onnx", "onnxscript", "torch.export", "torch._dynamo")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)


def _dynamic_shapes(spec: GraphExport, example: tuple):
    # Example inputs may nest (the decoder takes its past as one list): input names follow the
    # flattened order. Dim.DYNAMIC lets torch.export find the relations (total = past + sequence)
    # itself; _name_axes writes the contract's axis names onto the graph afterwards.
    leaves, structure = pytree.tree_flatten(example)
    shapes = [{axis: torch.export.Dim.DYNAMIC for axis in spec.dynamic_axes.get(name, {})} for name in spec.input_names]
    assert len(leaves) == len(shapes), f"{spec.contract.name}: {len(leaves)} example inputs for {len(shapes)} names"
    return pytree.tree_unflatten(shapes, structure)


def _name_axes(model: onnx.ModelProto, spec: GraphExport) -> None:
    for value in [*model.graph.input, *model.graph.output]:
        for axis, label in spec.dynamic_axes.get(value.name, {}).items():
            dim = value.type.tensor_type.shape.dim[axis]
            dim.Clear()
            dim.dim_param = label


# Elementwise ops that may sit between the LM head's MatMul and `logits` (Gemma2's final soft-cap).
_LOGIT_TAIL_OPS = {"Div", "Tanh", "Mul", "Cast"}


def _add_logits_to_keep(model: onnx.ModelProto) -> None:
    """Slice the LM head's input to its last LOGITS_TO_KEEP positions (0, the default: all).

    Done on the ONNX graph: the output length depends on an input's value, which torch.export
    would have to treat as an unbacked size. The head is the MatMul that LOGITS come from,
    through the soft-cap's elementwise ops, if any."""
    producers = {out: node for node in model.graph.node for out in node.output}
    node = producers[LOGITS]
    while node.op_type in _LOGIT_TAIL_OPS:
        node = producers[node.input[0]]
    if node.op_type != "MatMul":
        raise RuntimeError(f"LM head not found: {LOGITS} come from {node.op_type}")
    hidden = node.input[0]
    keep = LOGITS_TO_KEEP
    model.graph.initializer.append(numpy_helper.from_array(np.array(0, dtype=np.int64), keep))
    model.graph.input.append(helper.make_tensor_value_info(keep, onnx.TensorProto.INT64, []))
    zero, end, axes, shape = f"{keep}_zero", f"{keep}_end", f"{keep}_axes", f"{keep}_shape"
    constants = {
        zero: np.array(0, dtype=np.int64),
        end: np.array([np.iinfo(np.int64).max], dtype=np.int64),
        axes: np.array([1], dtype=np.int64),
        shape: np.array([1], dtype=np.int64),
    }
    model.graph.initializer.extend(numpy_helper.from_array(value, name) for name, value in constants.items())
    some, neg, start0, start, sliced = f"{keep}_some", f"{keep}_neg", f"{keep}_start0", f"{keep}_start", f"{hidden}_last"
    nodes = [
        helper.make_node("Greater", [keep, zero], [some]),
        helper.make_node("Neg", [keep], [neg]),
        helper.make_node("Where", [some, neg, zero], [start0]),
        helper.make_node("Reshape", [start0, shape], [start]),
        helper.make_node("Slice", [hidden, start, end, axes], [sliced]),
    ]
    node.input[0] = sliced
    position = list(model.graph.node).index(node)
    for offset, new in enumerate(nodes):
        model.graph.node.insert(position + offset, new)


def _forget_matched_graphs() -> None:
    """Release the model's tensors once a graph is saved. onnxscript's rewrite rules are module
    objects whose matchers keep the last graph they matched (SimplePatternMatcher's `_graph`,
    `_match`, `_current_node`, `_tracer`, onnxscript 0.7.2; each match sets them anew), and that
    graph keeps its former inputs, the model's parameters: at 3B, 6 GB of PyTorch weights held
    into the parity gate (benchmarks/results/memory_3b.md). tests/test_export_parity.py checks
    that an exported model's parameters are freed."""
    from onnxscript.rewriter._matcher import SimplePatternMatcher

    gc.collect()  # the exported program's own reference cycles
    for matcher in (o for o in gc.get_objects() if isinstance(o, SimplePatternMatcher)):
        matcher._graph = matcher._match = matcher._current_node = matcher._tracer = None
    gc.collect()


def export_graph(model, spec: GraphExport, out_dir: Path, opset: int = DEFAULT_OPSET) -> Path:
    """Export one graph of `model` into `out_dir` and return its path."""
    check_opset(opset)
    module = spec.wrapper(model).eval()
    path = Path(out_dir) / spec.filename
    external = _parameter_bytes(module) > EXTERNAL_DATA_THRESHOLD
    example = spec.example_inputs(model.config)
    with torch.no_grad(), quiet_exporter():
        program = torch.onnx.export(
            module,
            example,
            input_names=spec.input_names,
            output_names=spec.output_names,
            dynamic_shapes=_dynamic_shapes(spec, example),
            opset_version=opset,
            dynamo=True,
            external_data=external,
        )
        program.save(str(path), external_data=external)
    del program
    _forget_matched_graphs()
    proto = onnx.load(str(path), load_external_data=False)
    _name_axes(proto, spec)
    if any(t.name == LOGITS_TO_KEEP for t in spec.contract.optional_inputs):
        _add_logits_to_keep(proto)
    onnx.save(proto, str(path))
    onnx.checker.check_model(str(path))
    return path


def export_graphs(model, out_dir: Path, opset: int = DEFAULT_OPSET, progress=None) -> list[Path]:
    """Export the vision, embedding and decoder graphs of a PaliGemma model into `out_dir`."""
    paths = []
    for spec in graph_exports(model.config):
        if progress is not None:
            progress(f"exporting {spec.filename}")
        paths.append(export_graph(model, spec, out_dir, opset))
    return paths
