"""PaliGemma -> three ONNX graphs in the layout Optimum and transformers.js consume.

    vision_encoder.onnx          pixel_values -> image_features (projector included)
    embed_tokens.onnx            input_ids -> inputs_embeds
    decoder_model_merged.onnx    inputs_embeds, attention_mask, position_ids, past_key_values.{i}.key/value
                                 [, logits_to_keep] -> logits, present.{i}.key/value

`logits_to_keep` (int64 scalar, transformers' argument of that name) is an overridable
initializer: consumers that do not feed it (transformers.js, Optimum) get logits for every
position, as before; a generation loop feeds 1 at prefill and skips the LM head for the prompt
(a [batch, prompt, 257216] fp32 tensor: 4.2 GB per row at 896 px).

Each graph's I/O contract is data (`GraphSpec`) next to the wrapper that implements it.
"""

from __future__ import annotations

import contextlib
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

from pgexport.errors import UnsupportedError
from pgexport.exporters.wrappers import Decoder, EmbedTokens, VisionEncoder

MIN_OPSET, MAX_OPSET, DEFAULT_OPSET = 18, 23, 18
# Above this a graph's weights go to one external-data file (protobuf's hard limit is 2 GiB).
EXTERNAL_DATA_THRESHOLD = 1 << 30


@dataclass(frozen=True)
class GraphSpec:
    """One graph's contract: names, dynamic axes, and how to build example inputs."""

    name: str
    wrapper: Callable[[torch.nn.Module], torch.nn.Module]
    input_names: list[str]
    output_names: list[str]
    dynamic_axes: dict[str, dict[int, str]]
    example_inputs: Callable[[object], tuple]

    @property
    def filename(self) -> str:
        return f"{self.name}.onnx"


def _text(config):
    return config.text_config


def kv_names(config, prefix: str) -> list[str]:
    """past_key_values.{i}.key/value or present.{i}.key/value, in layer order."""
    return [f"{prefix}.{i}.{kind}" for i in range(_text(config).num_hidden_layers) for kind in ("key", "value")]


def vision_spec(config) -> GraphSpec:
    vision = config.vision_config

    def example(cfg):
        return (torch.randn(2, 3, vision.image_size, vision.image_size),)

    return GraphSpec(
        name="vision_encoder",
        wrapper=VisionEncoder,
        input_names=["pixel_values"],
        output_names=["image_features"],
        dynamic_axes={"pixel_values": {0: "batch_size"}, "image_features": {0: "batch_size"}},
        example_inputs=example,
    )


def embed_spec(config) -> GraphSpec:
    def example(cfg):
        return (torch.randint(0, _text(cfg).vocab_size, (2, 5)),)

    return GraphSpec(
        name="embed_tokens",
        wrapper=EmbedTokens,
        input_names=["input_ids"],
        output_names=["inputs_embeds"],
        dynamic_axes={
            "input_ids": {0: "batch_size", 1: "sequence_length"},
            "inputs_embeds": {0: "batch_size", 1: "sequence_length"},
        },
        example_inputs=example,
    )


def decoder_spec(config) -> GraphSpec:
    text = _text(config)
    past_names, present_names = kv_names(config, "past_key_values"), kv_names(config, "present")

    def example(cfg):
        # Sizes >= 2 everywhere: the exporter specialises dimensions it sees as 0 or 1.
        batch, past, seq = 2, 3, 4
        mask = torch.ones(batch, past + seq, dtype=torch.int64)
        positions = torch.arange(past + 1, past + seq + 1).expand(batch, seq)
        kv = [torch.randn(batch, text.num_key_value_heads, past, text.head_dim) for _ in past_names]
        return (torch.randn(batch, seq, text.hidden_size), mask, positions, kv)

    axes = {
        "inputs_embeds": {0: "batch_size", 1: "sequence_length"},
        "attention_mask": {0: "batch_size", 1: "total_sequence_length"},
        "position_ids": {0: "batch_size", 1: "sequence_length"},
        "logits": {0: "batch_size", 1: "logits_length"},  # sequence_length, or logits_to_keep
    }
    axes.update({name: {0: "batch_size", 2: "past_sequence_length"} for name in past_names})
    axes.update({name: {0: "batch_size", 2: "total_sequence_length"} for name in present_names})
    return GraphSpec(
        name="decoder_model_merged",
        wrapper=Decoder,
        input_names=["inputs_embeds", "attention_mask", "position_ids", *past_names],
        output_names=["logits", *present_names],
        dynamic_axes=axes,
        example_inputs=example,
    )


def graph_specs(config) -> list[GraphSpec]:
    return [vision_spec(config), embed_spec(config), decoder_spec(config)]


def _parameter_bytes(module: torch.nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in module.parameters())


@contextlib.contextmanager
def _quiet_exporter():
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


def _dynamic_shapes(spec: GraphSpec, example: tuple):
    # Example inputs may nest (the decoder takes its past as one list): input names follow the
    # flattened order. Dim.DYNAMIC lets torch.export find the relations (total = past + sequence)
    # itself; _name_axes writes the contract's axis names onto the graph afterwards.
    leaves, structure = pytree.tree_flatten(example)
    shapes = [{axis: torch.export.Dim.DYNAMIC for axis in spec.dynamic_axes.get(name, {})} for name in spec.input_names]
    assert len(leaves) == len(shapes), f"{spec.name}: {len(leaves)} example inputs for {len(shapes)} names"
    return pytree.tree_unflatten(shapes, structure)


def _name_axes(model: onnx.ModelProto, spec: GraphSpec) -> None:
    for value in [*model.graph.input, *model.graph.output]:
        for axis, label in spec.dynamic_axes.get(value.name, {}).items():
            dim = value.type.tensor_type.shape.dim[axis]
            dim.Clear()
            dim.dim_param = label


# Elementwise ops that may sit between the LM head's MatMul and `logits` (Gemma2's final soft-cap).
_LOGIT_TAIL_OPS = {"Div", "Tanh", "Mul", "Cast"}


def _add_logits_to_keep(model: onnx.ModelProto) -> None:
    """Slice the LM head's input to its last `logits_to_keep` positions (0, the default: all).

    Done on the ONNX graph: the output length depends on an input's value, which torch.export
    would have to treat as an unbacked size. The head is the MatMul that `logits` comes from,
    through the soft-cap's elementwise ops, if any."""
    producers = {out: node for node in model.graph.node for out in node.output}
    node = producers["logits"]
    while node.op_type in _LOGIT_TAIL_OPS:
        node = producers[node.input[0]]
    if node.op_type != "MatMul":
        raise RuntimeError(f"LM head not found: logits come from {node.op_type}")
    hidden = node.input[0]
    keep = "logits_to_keep"
    model.graph.initializer.append(numpy_helper.from_array(np.array(0, dtype=np.int64), keep))
    model.graph.input.append(helper.make_tensor_value_info(keep, onnx.TensorProto.INT64, []))
    constants = {
        "logits_to_keep_zero": np.array(0, dtype=np.int64),
        "logits_to_keep_end": np.array([np.iinfo(np.int64).max], dtype=np.int64),
        "logits_to_keep_axes": np.array([1], dtype=np.int64),
        "logits_to_keep_shape": np.array([1], dtype=np.int64),
    }
    model.graph.initializer.extend(numpy_helper.from_array(value, name) for name, value in constants.items())
    sliced = f"{hidden}_last"
    nodes = [
        helper.make_node("Greater", [keep, "logits_to_keep_zero"], ["logits_to_keep_some"]),
        helper.make_node("Neg", [keep], ["logits_to_keep_neg"]),
        helper.make_node("Where", ["logits_to_keep_some", "logits_to_keep_neg", "logits_to_keep_zero"], ["logits_to_keep_start0"]),
        helper.make_node("Reshape", ["logits_to_keep_start0", "logits_to_keep_shape"], ["logits_to_keep_start"]),
        helper.make_node("Slice", [hidden, "logits_to_keep_start", "logits_to_keep_end", "logits_to_keep_axes"], [sliced]),
    ]
    node.input[0] = sliced
    position = list(model.graph.node).index(node)
    for offset, new in enumerate(nodes):
        model.graph.node.insert(position + offset, new)


def check_opset(opset: int) -> int:
    if not MIN_OPSET <= opset <= MAX_OPSET:
        raise UnsupportedError(f"opset {opset} is not supported: choose {MIN_OPSET}..{MAX_OPSET}")
    return opset


def export_graph(model, spec: GraphSpec, out_dir: Path, opset: int = DEFAULT_OPSET) -> Path:
    """Export one graph of `model` into `out_dir` and return its path."""
    check_opset(opset)
    module = spec.wrapper(model).eval()
    path = Path(out_dir) / spec.filename
    external = _parameter_bytes(module) > EXTERNAL_DATA_THRESHOLD
    example = spec.example_inputs(model.config)
    with torch.no_grad(), _quiet_exporter():
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
    proto = onnx.load(str(path), load_external_data=False)
    _name_axes(proto, spec)
    if "logits" in spec.output_names:
        _add_logits_to_keep(proto)
    onnx.save(proto, str(path))
    onnx.checker.check_model(str(path))
    return path


def export_graphs(model, out_dir: Path, opset: int = DEFAULT_OPSET, progress=None) -> list[Path]:
    """Export the vision, embedding and decoder graphs of a PaliGemma model into `out_dir`."""
    paths = []
    for spec in graph_specs(model.config):
        if progress is not None:
            progress(f"exporting {spec.filename}")
        paths.append(export_graph(model, spec, out_dir, opset))
    return paths
