"""Static int8 (QDQ) quantization of an fp32 ONNX graph, calibrated on data, with Intel
neural-compressor 3.7.1 (its 2.x-style ONNX Runtime API, `neural_compressor.quantization.fit`;
the last release with ONNX Runtime support).

    quantize_static_int8(src, dst, feeds, exclude_nodes=()) -> info

`feeds` are the graph's fp32 inputs on calibration data (pgexport.quantize.calibration). What
neural-compressor does with them, on this graph (read from adaptor/onnxrt.py and
ox_utils/calibration.py):
- pre-optimizes the graph with onnxruntime at level ENABLE_BASIC (constant folding, redundant
  node removal; no com.microsoft fusions, so the output stays in standard ONNX ops). Its automatic
  choice is BASIC for a graph it does not take for NLP and EXTENDED for one it does; it is pinned
  here so a graph's output does not depend on that guess;
- runs the graph once per feed with every quantizable op's inputs and outputs added as graph
  outputs, keeping each tensor's min/max;
- writes QuantizeLinear/DequantizeLinear pairs on the inputs and outputs of each MatMul and Gemm
  (the LM head's output included: logits pass through uint8): weights int8
  symmetric per output channel (neural-compressor's first choice with onnxruntime >= 1.13; per
  tensor, forced, lost 0.01 of the demo decoder's worst-position logits cosine) on 7 bits,
  [-64, 64] (WEIGHT_QRANGE, below), activations uint8 asymmetric per tensor on the full 8 bits.
  neural-compressor leaves the MatMuls of two activations (attention's Q.K and P.V) in fp32 on
  these graphs; the info's "fp32_nodes" lists them. Every other op type is pinned to fp32: by
  default neural-compressor also wraps data-movement ops (Reshape, Transpose, Slice) in QDQ
  pairs, which changed neither the demo's answers nor its size and made the tuning space (one
  trial per quantized node) more than twice as large.
`exclude_nodes` keeps the named nodes in fp32 (accuracy-aware tuning passes what it fell back).

Why 7-bit weights: an artifact is made once and run on any x86 CPU. onnxruntime's u8s8 int8
kernels on a CPU without AVX-512 VNNI (AVX2 laptops, AMD EPYC before Zen 4) add pairs of
uint8 x int8 products into int16 with saturation (vpmaddubsw): 2 x 255 x 127 > 32767. Measured on
an AMD EPYC with AVX2 only (onnxruntime 1.32, MatMulInteger with weights at +-127 and inputs near
255): every output wrong; with weights in [-64, 64] (2 x 255 x 64 = 32640): exact. The demo's
full-range graphs read prefill logits cosine 0.930 there against 0.992 for the same graphs in float
math (docs/quantize-static.md). 7-bit weights are onnxruntime's documented remedy (its
quantize_static `reduce_range`). neural-compressor's own `reduce_range` is no substitute: left
unset it is chosen by the CPU that quantizes (`not CpuInfo().vnni`), so the same command wrote
different artifacts on different machines, and it also cuts the activations to 7 bits (qrange 127
on uint8), which took the demo vision encoder's background patches apart (prefill logits cosine
-0.47). So `reduce_range` is pinned off (activations 8 bits, whatever the CPU) and
`neural_compressor_session` gives neural-compressor's weight quantizer the 7-bit range.

Memory: neural-compressor works on whole models. It opens an onnxruntime session on the model
just to detect the framework, then holds the graph with its weights, a deep copy to quantize and
the serialized bytes it hands onnxruntime: several times the graph's size
(benchmarks/results/quantize_static.md), too much for the 10 GB 3B decoder on a 24 GB machine. Its
large-model answer, the `layer_wise_quant` recipe, splits our decoder at its blocks but fails in
calibration: "Required inputs (['past_key_values.1.key']) are missing from input feed" (its split
dataloader does not carry graph inputs that later blocks read). So a graph over 2 GiB of weights
(or `streamed=True`) takes static_streamed.py: the same QDQ form on MatMuls, calibrated with one
onnxruntime session and written one tensor at a time. (onnxruntime's quantize_static, the other
candidate, also works on the whole model in memory.) Not tuned: tune.py runs neural-compressor's
loop, which needs the whole model.

Output: written in a temporary folder beside `dst` (also neural-compressor's workspace, so no
./nc_workspace appears) and renamed into place, the .onnx last, so a crash never leaves an .onnx
that looks complete.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import tempfile
import time
import warnings
from collections import Counter
from pathlib import Path
from typing import Sequence

import onnx

from pgexport.errors import import_optional
from pgexport.graphio.read import CHUNK_BYTES, graph_bytes, link_data_files
from pgexport.graphio.write import EXTERNAL_DATA_THRESHOLD
from pgexport.quantize.rewrite import QuantizeInputError, load_float_graph
from pgexport.quantize.static_streamed import WEIGHT_QRANGE, quantize_static_int8_streamed

GRAPH_OPTIMIZATION_LEVEL = "ENABLE_BASIC"
# The ops whose int8 form does the work; the rest only carry int8. Not Conv: PaliGemma's one Conv is
# the vision encoder's patch embedding (0.2% of its FLOPs), and in int8 it alone took a 6-layer
# So400m-width random tower's image features to cosine 0.72 against fp32, every MatMul class alone
# staying >= 0.9997; it is what failed int8-static's gate at 3B (benchmarks/results/quantize_static.md).
COMPUTE_OPS = ("MatMul", "Gemm")
STREAMED_THRESHOLD = 2 << 30  # bytes of weights above which the graph takes the streamed path


def quantize_static_int8(
    src: Path,
    dst: Path,
    feeds: list[dict],
    *,
    exclude_nodes: Sequence[str] = (),
    progress: bool = True,
    streamed: bool | None = None,
    chunk_bytes: int = CHUNK_BYTES,
) -> dict:
    """Calibrate `src` on `feeds` and write its int8 QDQ graph at `dst` (see the module docstring).

    Returns {"quantized_nodes": MatMul/Gemm nodes fed by DequantizeLinear, "fp32_nodes": those
    left in fp32 (names), "excluded": exclude_nodes, "op_types": {op: count} of the output,
    "calibration_feeds": len(feeds), "bytes_before", "bytes_after", "external_data", "seconds"}.
    Raises QuantizeInputError (BadInputError) for a missing, non-ONNX or already quantized src, no
    feeds, feeds that do not match the graph's inputs, or an excluded name the graph lacks.
    streamed: None picks by size (over 2 GiB of weights), True/False force the streamed path or
    neural-compressor's own. chunk_bytes: how much of a weight the streamed path reads at a time
    (the output does not depend on it).
    """
    started = time.perf_counter()
    src, dst = Path(src), Path(dst)
    graph = check_source(src, feeds, exclude_nodes)
    if streamed is None:
        streamed = graph_bytes(src) > STREAMED_THRESHOLD
    with neural_compressor_session(dst.parent) as workspace:
        if streamed:
            quantize_static_int8_streamed(src, dst, graph, feeds, exclude_nodes, workspace, chunk_bytes)
            return _info(src, dst, feeds, exclude_nodes, True, started) | {"streamed": True}
        from neural_compressor import quantization

        source, defaults = without_overridable_initializers(src, graph, workspace)
        conf = post_training_config(graph, len(feeds), exclude_nodes)
        model = quantization.fit(str(source), conf, calib_dataloader=CalibrationLoader(feeds, defaults))
        if model is None:
            raise RuntimeError(f"neural-compressor returned no model for {src}")
        external = save(model, dst, workspace, defaults)
    return _info(src, dst, feeds, exclude_nodes, external, started) | {"streamed": False}


def _info(src: Path, dst: Path, feeds, exclude_nodes, external: bool, started: float) -> dict:
    return {
        **describe(dst),
        "excluded": list(exclude_nodes),
        "calibration_feeds": len(feeds),
        "bytes_before": graph_bytes(src),
        "bytes_after": graph_bytes(dst),
        "external_data": dst.name + ".data" if external else None,
        "seconds": round(time.perf_counter() - started, 3),
    }


# ---------------------------------------------------------------------------------------------
# shared with tune.py


def check_source(src: Path, feeds: list[dict], exclude_nodes: Sequence[str] = ()) -> onnx.ModelProto:
    """The graph (without its weights) after checking src, the feeds and the excluded names."""
    model = load_float_graph(src)  # without its weights; QuantizeInputError for a missing, non-ONNX or quantized file
    if not feeds:
        raise QuantizeInputError(f"{src}: no calibration feeds")
    inputs = {i.name for i in model.graph.input}
    required = inputs - {t.name for t in model.graph.initializer}
    for number, feed in enumerate(feeds):
        if not required <= set(feed) <= inputs:
            raise QuantizeInputError(
                f"calibration feed {number} has inputs {sorted(feed)}, the graph takes {sorted(required)}"
            )
    unknown = sorted(set(exclude_nodes) - {n.name for n in model.graph.node})
    if unknown:
        raise QuantizeInputError(f"{src}: no node named {', '.join(unknown[:5])}{' ...' if len(unknown) > 5 else ''}")
    return model


class CalibrationLoader:
    """The dataloader neural-compressor iterates: (inputs, label) pairs and a batch_size; each
    feed completed with the defaults of the inputs it leaves out."""

    batch_size = 1

    def __init__(self, feeds: list[dict], defaults: dict | None = None):
        self.feeds, self.defaults = feeds, defaults or {}

    def __iter__(self):
        for feed in self.feeds:
            yield {**self.defaults, **feed}, None


def without_overridable_initializers(src: Path, graph: onnx.ModelProto, workspace: Path) -> tuple[Path, dict]:
    """(the graph neural-compressor should read, {input: default value}).

    A graph input that an initializer gives a default (the decoder's `logits_to_keep`) would not
    survive: neural-compressor's pre-optimization drops such inputs (ox_utils/util.py,
    remove_init_from_model_input) and onnxruntime then folds the default in as a constant. So the
    default is taken out, making it a plain input that calibration feeds, and put back in the
    output by `restore_defaults`. The rewritten graph goes into the workspace, beside links to
    src's external data files (pgexport.graphio.read.link_data_files)."""
    from onnx import numpy_helper

    inputs = {i.name for i in graph.graph.input}
    overridable = [t for t in graph.graph.initializer if t.name in inputs]
    if not overridable:
        return src, {}
    defaults = {t.name: numpy_helper.to_array(t, base_dir=str(src.parent)) for t in overridable}
    graph = onnx.ModelProto.FromString(graph.SerializeToString())
    for tensor in [t for t in graph.graph.initializer if t.name in defaults]:
        graph.graph.initializer.remove(tensor)
    folder = workspace / "source"
    folder.mkdir()
    link_data_files(src, graph, folder)
    onnx.save(graph, str(folder / src.name))
    return folder / src.name, defaults


def restore_defaults(proto: onnx.ModelProto, defaults: dict) -> None:
    """Give the inputs of `defaults` their initializer back (see without_overridable_initializers)."""
    from onnx import numpy_helper

    present = {t.name for t in proto.graph.initializer}
    inputs = {i.name for i in proto.graph.input}
    proto.graph.initializer.extend(
        numpy_helper.from_array(value, name) for name, value in defaults.items() if name in inputs and name not in present
    )


def post_training_config(graph: onnx.ModelProto, calibration_size: int, exclude_nodes: Sequence[str] = (), **kwargs):
    """neural-compressor's static QDQ config for `graph`: MatMul/Gemm in int8 (min/max
    calibration, weights per output channel), every other op type of the graph in fp32, the
    excluded nodes in fp32; every feed calibrates. `reduce_range` is pinned off (8-bit
    activations on every CPU; unset, neural-compressor picks it from the quantizing CPU); the
    7-bit weights come from neural_compressor_session."""
    from neural_compressor import PostTrainingQuantConfig

    fp32 = {"activation": {"dtype": ["fp32"]}, "weight": {"dtype": ["fp32"]}}
    op_types = {op: fp32 for op in {n.op_type for n in graph.graph.node} - set(COMPUTE_OPS)}
    for op in COMPUTE_OPS:
        op_types[op] = {"activation": {"algorithm": ["minmax"]}, "weight": {"granularity": ["per_channel"]}}
    return PostTrainingQuantConfig(
        approach="static",
        quant_format="QDQ",
        calibration_sampling_size=[calibration_size],
        recipes={"graph_optimization_level": GRAPH_OPTIMIZATION_LEVEL},
        op_type_dict=op_types,
        op_name_dict={name: fp32 for name in exclude_nodes} or None,
        **{"reduce_range": False, **kwargs},
    )


@contextlib.contextmanager
def neural_compressor_session(folder: Path):
    """neural-compressor's workspace in a temporary folder inside `folder` (its default is
    ./nc_workspace in the current directory), its logging at errors only (dozens of INFO lines and
    warnings about its own internals per graph: mpi4py, eval_func checks, renamed nodes; pgexport's
    stage bar and manifest report what happened), and its weight quantizer on 7 bits
    (WEIGHT_QRANGE); all restored, the folder removed.

    The 7 bits: neural-compressor's quantizer (ox_utils/quantizer.py) asks
    `_get_qrange_for_qType(qType, reduce_range)` for the range of each weight it quantizes (int8
    here); that name is replaced, inside this block only, by one answering WEIGHT_QRANGE for int8.
    Calibration (ox_utils/calibration.py, the activations' uint8 range) has its own binding and is
    left alone. Not thread-safe: two quantizations must not run at once in one process."""
    with warnings.catch_warnings():  # its import uses setuptools' deprecated pkg_resources
        warnings.filterwarnings("ignore", message="pkg_resources is deprecated", category=UserWarning)
        import_optional("neural_compressor", "inc")
    from neural_compressor.adaptor.ox_utils import quantizer
    from neural_compressor.config import options
    from onnx import TensorProto

    full_range = quantizer._get_qrange_for_qType

    def weight_range(qType, reduce_range=False):
        return WEIGHT_QRANGE if qType == TensorProto.INT8 else full_range(qType, reduce_range)

    folder.mkdir(parents=True, exist_ok=True)
    workspace = Path(tempfile.mkdtemp(prefix=".nc-workspace.", dir=folder))
    logger = logging.getLogger("neural_compressor")
    saved = options.workspace, logger.level
    options.workspace = str(workspace) + os.sep
    logger.setLevel(logging.ERROR)
    quantizer._get_qrange_for_qType = weight_range
    try:
        yield workspace
    finally:
        quantizer._get_qrange_for_qType = full_range
        options.workspace = saved[0]
        logger.setLevel(saved[1])
        shutil.rmtree(workspace, ignore_errors=True)


def save(model, dst: Path, workspace: Path, defaults: dict | None = None) -> bool:
    """Write neural-compressor's ONNXModel at `dst` (weights in dst.name + ".data" over 1.5 GiB)
    through `workspace`, renamed into place .data first; returns whether external data was used."""
    data_name = dst.name + ".data"
    staged = Path(tempfile.mkdtemp(prefix="out.", dir=workspace))
    external = write(model, staged / dst.name, defaults)
    if external:
        os.replace(staged / data_name, dst.parent / data_name)
    elif (dst.parent / data_name).exists():
        (dst.parent / data_name).unlink()  # an earlier external-data output's weights
    os.replace(staged / dst.name, dst)
    shutil.rmtree(staged, ignore_errors=True)
    return external


def write(model, path: Path, defaults: dict | None = None) -> bool:
    """onnx.save of neural-compressor's ONNXModel, or of the ModelProto its eval_func is given,
    with the weights in path.name + ".data" over 1.5 GiB and the inputs of `defaults` given their
    initializer back; returns whether the weights went to path.name + ".data".

    A large model's proto may already point at weights in neural-compressor's workspace: such a
    proto is written as is, and `path` must then be in that workspace (tune.py's candidates are)."""
    from onnx.external_data_helper import load_external_data_for_model

    proto = getattr(model, "model", model)
    restore_defaults(proto, defaults or {})
    model_path = getattr(model, "model_path", None)
    if getattr(model, "is_large_model", False) and model_path:  # an ONNXModel whose weights live in its files
        load_external_data_for_model(proto, os.path.dirname(model_path))
    if any(t.data_location == onnx.TensorProto.EXTERNAL for t in proto.graph.initializer):
        onnx.save_model(proto, str(path))  # its weights stay in neural-compressor's files
        return False
    external = sum(t.ByteSize() for t in proto.graph.initializer) > EXTERNAL_DATA_THRESHOLD
    onnx.save_model(
        proto, str(path), save_as_external_data=external, all_tensors_to_one_file=True,
        location=path.name + ".data", size_threshold=1024, convert_attribute=False,
    )
    if external:  # saving moved the weights out of the proto: bring them back, neural-compressor may reuse it
        load_external_data_for_model(proto, str(path.parent))
    return external


def describe(path: Path) -> dict:
    """What a QDQ graph quantized: compute nodes fed by DequantizeLinear vs left in fp32, op counts."""
    model = onnx.load(str(path), load_external_data=False)
    dequantized = {o for n in model.graph.node if n.op_type == "DequantizeLinear" for o in n.output}
    compute = [n for n in model.graph.node if n.op_type in COMPUTE_OPS]
    quantized = [any(i in dequantized for i in n.input) for n in compute]
    return {
        "quantized_nodes": sum(quantized),
        "fp32_nodes": [n.name for n, q in zip(compute, quantized) if not q],  # neural-compressor renames only quantized nodes (+"_quant")
        "op_types": dict(Counter(n.op_type for n in model.graph.node).most_common()),
    }
