"""fp16 graphs with float32 islands chosen from real activations, not assumed.

Gemma's activations can leave fp16's range (norms square the hidden state, the attention mask
is float32's minimum, soft-capping divides large logits); SigLIP's rarely do. Which nodes must
stay in float32 is measured here rather than listed by op type:

1. run the fp32 graph on real inputs (the demo samples through the artifact's own fp32 graphs:
   pixel values, token ids, and the decoder's prefill feed), every float node output exposed;
2. a node is an island when its output overflows fp16 (max |x| above FP16_LIMIT, a margin of 4
   under 65504 for inputs larger than the samples) or loses precision in fp16 (relative L2
   error of the fp16 round trip above PRECISION_LIMIT: underflow of small values, mostly);
3. convert with onnxruntime.transformers.float16.convert_float_to_float16, those nodes blocked
   (it inserts the casts at the island borders), fp16 inputs and outputs;
4. verify: the fp16 graph on the same inputs, every output finite and close (cosine) to fp32.

The conversion is streamed: the converter runs on the graph's structure alone (shapes inferred
on the file, `infer_shapes_path`), where it retypes each external float initializer it converts
without touching its data, and `write_fp16` then writes each weight's bytes through
pgexport.graphio, converted with the converter's own `convert_np_to_float16` (the same clamping)
a chunk at a time. A 3B decoder's conversion holds one 16 MB chunk, not the 10 GB fp32 model and
its 5 GB fp16 copy (21.3 GB peak before, benchmarks/results/memory_3b.md).

Graphs whose weights live in a .data file (over 1 GiB; the 3B decoder's 10 GB is over protobuf's
2 GB): the probe is the graph's structure alone, saved beside hard links to its data file, run on
one sample row with the node outputs exposed an eighth at a time (all at once, a 3-row probe of
the 3B decoder ran 24 GB out); the fp16 graph keeps its weights in a .data file too; the fp32
and fp16 sessions of the check run one after the other.
"""

from __future__ import annotations

import contextlib
import gc
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx

from pgexport.contract import DECODER, EMBED, VISION, graph_path
from pgexport.graphio.read import (Source, copy_message, external_files, graph_bytes, is_external, link_data_files,
                                   load_structure, nbytes)
from pgexport.graphio.write import write_graph
from pgexport.metrics import row_cosines
from pgexport.quantize.rewrite import load_float_graph

FP16_MAX = 65504.0
FP16_LIMIT = FP16_MAX / 4
# The 3B decoder's probe in shares of its node outputs: with 4 the probe was the fp16 stage's peak,
# 14.36 GB; 8 peak at 12.56 GB standalone in about the same time, 183 s (memory_3b.md).
LARGE_GRAPH_PROBE_GROUPS = 8
PRECISION_LIMIT = 2e-3  # fp16 rounds a normal value by at most 4.9e-4 relative; more means underflow


def sample_feeds(folder: Path, graph: str) -> list[dict[str, np.ndarray]]:
    """Real inputs of `graph`: the demo samples through the artifact's fp32 vision and embedding
    graphs. The decoder is not loaded (its input names are read without its weights): a session
    on the 3B decoder alone peaks at 11.4 GB, and --optimize's feeds were made beside the fused
    10 GB model."""
    from pgexport.quantize.calibration import PrefillFeeds
    from pgexport.validate import default_samples

    model = PrefillFeeds(folder, with_graphs=graph == DECODER.name)
    images, prompts = zip(*default_samples())
    inputs = model.preprocess(list(images), list(prompts))
    pixels, ids = VISION.inputs[0].name, EMBED.inputs[0].name
    if graph == VISION.name:
        return [{pixels: inputs[pixels].astype(np.float32)}]
    if graph == EMBED.name:
        return [{ids: np.where(inputs[ids] == model.image_token_id, 0, inputs[ids])}]
    feed = model.prefill_feed(**inputs)
    names = {i.name for i in onnx.load(str(graph_path(folder, graph, "fp32")), load_external_data=False).graph.input}
    return [{k: v for k, v in feed.items() if k in names}]


def activation_ranges(src: Path, feeds: list[dict], groups: int = 1) -> dict[str, dict]:
    """node name -> {"op", "max_abs", "fp16_rel_error"} over every float output of every node of
    the graph file `src`. `groups` > 1 exposes the node outputs in that many sessions, one after
    the other, so only a share of the activations is held at once (the 3B decoder's are ~10 GB)."""
    from pgexport.sessions import open_session

    base = onnx.load(str(src), load_external_data=False)
    known = {o.name for o in base.graph.output}
    owner = {output: node for node in base.graph.node for output in node.output if output}
    candidates = [name for name in owner if name not in known]
    size = max(1, -(-len(candidates) // groups))
    stats: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "probe.onnx"
        link_data_files(src, base, Path(tmp))
        for start in range(0, max(len(candidates), 1), size):
            probe = onnx.ModelProto()
            probe.CopyFrom(base)
            probe.graph.output.extend(onnx.ValueInfoProto(name=name) for name in candidates[start:start + size])
            onnx.save(probe, str(path))
            del probe
            session = open_session(path, low_memory=True)
            names = [o.name for o in session.get_outputs()]
            for feed in feeds:
                for name, value in zip(names, session.run(names, feed)):
                    _record(stats, owner.get(name), value)
            del session
            gc.collect()
    return stats


def _record(stats: dict, node, value) -> None:
    if node is None or not isinstance(value, np.ndarray) or value.dtype != np.float32 or not value.size:
        return
    finite = value[np.isfinite(value)]
    max_abs = float(np.abs(finite).max()) if finite.size else float("inf")
    if finite.size < value.size:
        max_abs = float("inf")
    with np.errstate(over="ignore"):
        rounded = finite.astype(np.float16).astype(np.float32)
    norm = float(np.linalg.norm(finite))
    error = float(np.linalg.norm(np.nan_to_num(rounded - finite, posinf=FP16_MAX))) / norm if norm else 0.0
    entry = stats.setdefault(node.name, {"op": node.op_type, "max_abs": 0.0, "fp16_rel_error": 0.0})
    entry["max_abs"] = max(entry["max_abs"], max_abs)
    entry["fp16_rel_error"] = max(entry["fp16_rel_error"], error)


def islands(stats: dict[str, dict]) -> dict[str, str]:
    """Nodes to keep in float32, each with the measured reason."""
    keep = {}
    for name, entry in stats.items():
        if entry["max_abs"] > FP16_LIMIT:
            keep[name] = f"{entry['op']}: max |x| {entry['max_abs']:.3g} > {FP16_LIMIT:.0f}"
        elif entry["fp16_rel_error"] > PRECISION_LIMIT:
            keep[name] = f"{entry['op']}: fp16 round trip loses {entry['fp16_rel_error']:.2%}"
    return keep


def _inferred_structure(src: Path, scratch: Path) -> onnx.ModelProto:
    """`src` with inferred shapes, its weights left where they are; shape inference runs on the
    file, so graphs over protobuf's 2 GB work too, and nothing is written beside `src`."""
    inferred = scratch / "inferred.onnx"
    onnx.shape_inference.infer_shapes_path(str(src), str(inferred))
    model = load_structure(inferred)
    inferred.unlink()
    return model


@contextlib.contextmanager
def _value_info_from_dims():
    """The converter's `make_value_info_from_tensor` reads each converted initializer's whole array
    (numpy_helper.to_array) only for its shape: here the shape comes from the tensor's dims, which
    is the same value info without reading (or finding) the external data."""
    from onnx import helper
    from onnxruntime.transformers import float16

    original = float16.make_value_info_from_tensor
    float16.make_value_info_from_tensor = lambda t: helper.make_tensor_value_info(t.name, t.data_type, list(t.dims))
    try:
        yield
    finally:
        float16.make_value_info_from_tensor = original


def write_fp16(src: Path, dst: Path, keep: dict[str, str]) -> int:
    """Convert graph `src` to fp16 at `dst`, the nodes in `keep` blocked (left in float32);
    streamed (see the module docstring). Returns the node count."""
    from onnxruntime.transformers.float16 import convert_float_to_float16, convert_np_to_float16

    with tempfile.TemporaryDirectory(dir=dst.parent) as scratch:
        model = _inferred_structure(src, Path(scratch))
    external_floats = {t.name: copy_message(t) for t in model.graph.initializer
                       if is_external(t) and t.data_type == onnx.TensorProto.FLOAT}
    with _value_info_from_dims():
        converted = convert_float_to_float16(model, keep_io_types=False, node_block_list=sorted(keep),
                                             disable_shape_infer=True)
    source = Source(src.parent)
    source.check_all(converted, src)

    def producer(original: onnx.TensorProto):
        def produce(tensor: onnx.TensorProto, sink) -> None:
            parts = (convert_np_to_float16(np.frombuffer(chunk, dtype=np.float32)) for chunk in source.chunks(original))
            sink.put(tensor, parts, nbytes(original) // 2)
        return produce

    retyped = {t.name: producer(external_floats[t.name]) for t in converted.graph.initializer
               if t.name in external_floats and t.data_type == onnx.TensorProto.FLOAT16}
    try:
        # Weights beside the graph as the export wrote them: a .data file when the source has one.
        write_graph(converted, source, dst, retyped, external_data=bool(external_files(converted)))
    finally:
        source.close()
    return len(converted.graph.node)


def graph_outputs(path: Path, feeds: list[dict]) -> list[dict[str, np.ndarray]]:
    """Every output of the graph at `path` for each feed, as float32 (float inputs cast to fp16
    where the graph takes fp16); the session is released before returning. The fp16 check and
    the optimization pass's parity run both graphs of a comparison through it."""
    from pgexport.sessions import open_session

    session = open_session(path, low_memory=True)
    wanted = {i.name: i.type for i in session.get_inputs()}
    results = []
    for feed in feeds:
        cast = {k: v.astype(np.float16) if wanted[k] == "tensor(float16)" else v for k, v in feed.items()}
        results.append([r.astype(np.float32) for r in session.run(None, cast)])
    names = [o.name for o in session.get_outputs()]
    del session
    gc.collect()
    return [dict(zip(names, r)) for r in results]


def convert_fp16(folder: Path, graph: str, src: Path, dst: Path, *, progress: bool = True) -> dict:
    """fp32 graph `src` of artifact `folder` -> fp16 graph `dst` with measured fp32 islands."""
    from pgexport.exporters.onnx import EXTERNAL_DATA_THRESHOLD

    started = time.perf_counter()
    load_float_graph(src)  # refuses a graph that is quantized already
    source_bytes = graph_bytes(src)
    feeds = sample_feeds(folder, graph)
    gc.collect()  # the artifact's sessions that made the feeds
    large = source_bytes > EXTERNAL_DATA_THRESHOLD
    if large:  # the 3B decoder: one sample row, its activations probed an eighth of the nodes at a time
        feeds = [{key: value[:1] if value.ndim else value for key, value in feed.items()} for feed in feeds[:1]]
    groups = LARGE_GRAPH_PROBE_GROUPS if large else 1
    stats = activation_ranges(src, feeds, groups)
    keep = islands(stats)
    dst.parent.mkdir(parents=True, exist_ok=True)
    nodes = write_fp16(src, dst, keep)

    check = {}
    for want, got in zip(graph_outputs(src, feeds), graph_outputs(dst, feeds)):
        for name, expected in want.items():
            actual = got[name]
            if not expected.size:
                continue
            ref, cand = (np.atleast_1d(a).reshape(-1, np.atleast_1d(a).shape[-1]) for a in (expected, actual))
            both_zero = ~ref.any(-1) & ~cand.any(-1)  # agree exactly; row_cosines would score them 0
            cosine = np.where(both_zero, 1.0, row_cosines(ref, cand))
            entry = check.setdefault(name, {"finite": True, "min_cosine": 1.0})
            entry["finite"] &= bool(np.isfinite(actual).all())
            entry["min_cosine"] = min(entry["min_cosine"], float(np.min(cosine)))
    first = next(iter(check))
    return {
        "islands": keep,
        "nodes": nodes,
        "probed_nodes": len(stats),
        "probe": {"rows": int(sum(next(iter(f.values())).shape[0] for f in feeds)), "sessions": groups},
        "max_abs_activation": max((e["max_abs"] for e in stats.values()), default=0.0),
        "check": {first: check[first], "all_finite": all(c["finite"] for c in check.values()),
                  "min_cosine": min(c["min_cosine"] for c in check.values())},
        "bytes_before": source_bytes,
        "bytes_after": graph_bytes(dst),
        "seconds": round(time.perf_counter() - started, 3),
    }
