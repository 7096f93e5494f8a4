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

The graph is loaded whole (the converter works on a ModelProto): fine for the demo model and
SigLIP; the 3B decoder (10 GB) is not streamed here.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import numpy as np
import onnx

from pgexport.errors import UnsupportedError
from pgexport.quantize.int8 import _load

FP16_MAX = 65504.0
FP16_LIMIT = FP16_MAX / 4
PRECISION_LIMIT = 2e-3  # fp16 rounds a normal value by at most 4.9e-4 relative; more means underflow


def sample_feeds(folder: Path, graph: str) -> list[dict[str, np.ndarray]]:
    """Real inputs of `graph`: the demo samples through the artifact's fp32 graphs."""
    from pgexport.runtime import OnnxPaliGemma
    from pgexport.validate import default_samples

    model = OnnxPaliGemma(folder, dtype="fp32")
    images, prompts = zip(*default_samples())
    inputs = model.preprocess(list(images), list(prompts))
    if graph == "vision_encoder":
        return [{"pixel_values": inputs["pixel_values"].astype(np.float32)}]
    if graph == "embed_tokens":
        ids = np.where(inputs["input_ids"] == model.image_token_id, 0, inputs["input_ids"])
        return [{"input_ids": ids}]
    feed = model.prefill_feed(inputs["input_ids"], inputs["attention_mask"], inputs["pixel_values"])
    names = {i.name for i in model.sessions[graph].get_inputs()}
    return [{k: v for k, v in feed.items() if k in names}]


def activation_ranges(model: onnx.ModelProto, feeds: list[dict]) -> dict[str, dict]:
    """node name -> {"op", "max_abs", "fp16_rel_error"} over every float output of every node."""
    import onnxruntime as ort

    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    known = {o.name for o in probe.graph.output}
    owner = {}
    for node in probe.graph.node:
        for output in node.output:
            if output and output not in known:
                probe.graph.output.append(onnx.ValueInfoProto(name=output))
            owner[output] = node
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "probe.onnx"
        onnx.save(probe, str(path), save_as_external_data=True, location="probe.onnx.data")
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        names = [o.name for o in session.get_outputs()]
        stats: dict[str, dict] = {}
        for feed in feeds:
            for name, value in zip(names, session.run(names, feed)):
                node = owner.get(name)
                if node is None or not isinstance(value, np.ndarray) or value.dtype != np.float32 or not value.size:
                    continue
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
    return stats


def islands(stats: dict[str, dict]) -> dict[str, str]:
    """Nodes to keep in float32, each with the measured reason."""
    keep = {}
    for name, entry in stats.items():
        if entry["max_abs"] > FP16_LIMIT:
            keep[name] = f"{entry['op']}: max |x| {entry['max_abs']:.3g} > {FP16_LIMIT:.0f}"
        elif entry["fp16_rel_error"] > PRECISION_LIMIT:
            keep[name] = f"{entry['op']}: fp16 round trip loses {entry['fp16_rel_error']:.2%}"
    return keep


def convert_fp16(folder: Path, graph: str, src: Path, dst: Path, *, progress: bool = True) -> dict:
    """fp32 graph `src` of artifact `folder` -> fp16 graph `dst` with measured fp32 islands."""
    import onnxruntime as ort
    from onnxruntime.transformers.float16 import convert_float_to_float16

    started = time.perf_counter()
    _load(src)  # refuses a graph that is quantized already
    data = src.with_name(src.name + ".data")
    if src.stat().st_size + (data.stat().st_size if data.is_file() else 0) > (2 << 30) - (64 << 20):
        raise UnsupportedError(f"{src}: fp16 conversion loads the graph whole; graphs over 2 GB are not supported yet")
    model = onnx.load(str(src))
    feeds = sample_feeds(folder, graph)
    stats = activation_ranges(model, feeds)
    keep = islands(stats)
    converted = convert_float_to_float16(model, keep_io_types=False, node_block_list=sorted(keep))
    dst.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(converted, str(dst))

    reference = ort.InferenceSession(str(src), providers=["CPUExecutionProvider"])
    candidate = ort.InferenceSession(str(dst), providers=["CPUExecutionProvider"])
    types = {i.name: i.type for i in candidate.get_inputs()}
    check = {}
    for feed in feeds:
        fp16_feed = {k: v.astype(np.float16) if types[k] == "tensor(float16)" else v for k, v in feed.items()}
        for out, want, got in zip(reference.get_outputs(), reference.run(None, feed), candidate.run(None, fp16_feed)):
            got = got.astype(np.float32).reshape(-1, want.shape[-1]) if want.ndim else got.astype(np.float32)
            want = want.reshape(-1, want.shape[-1]) if want.ndim else want
            norms = np.linalg.norm(want, axis=-1) * np.linalg.norm(got, axis=-1)
            cosine = np.where(norms > 0, np.sum(want * got, -1) / np.maximum(norms, 1e-30), 1.0)
            check[out.name] = {"finite": bool(np.isfinite(got).all()), "min_cosine": float(np.min(cosine))}
    first = next(iter(check))
    return {
        "islands": keep,
        "nodes": len(model.graph.node),
        "probed_nodes": len(stats),
        "max_abs_activation": max((e["max_abs"] for e in stats.values()), default=0.0),
        "check": {first: check[first], "all_finite": all(c["finite"] for c in check.values()),
                  "min_cosine": min(c["min_cosine"] for c in check.values())},
        "bytes_before": src.stat().st_size,
        "bytes_after": dst.stat().st_size,
        "seconds": round(time.perf_counter() - started, 3),
    }
