"""A graph-optimization pass before quantizing: onnxruntime.transformers' fusions that apply to
SigLIP and Gemma, checked for parity on real inputs.

What fuses (measured on the demo model, onnxruntime 1.32, `optimize_model(opt_level=0)`, python
fusions only, so the graph stays portable across execution providers):
  SigLIP (model type "vit"): LayerNormalization + residual Add -> SkipLayerNormalization, the
    tanh GELU -> FastGelu;
  Gemma (model type "gpt2"): RMSNorm -> SimplifiedLayerNormalization / SkipSimplifiedLayerNormalization
    (Gemma's (1 + weight) is a constant folded into the scale), the tanh GELU -> FastGelu.
Attention fusion is off: it packs Q/K/V weights into an Attention node, which would hide the
MatMuls the int8 and int4 quantizers rewrite (and its masks do not know PaliGemma's prefix-LM).
The token table (a Gather) has nothing to fuse. The graph is loaded whole: graphs over 2 GB
(the 3B decoder) are refused (UnsupportedError), not streamed.
"""

from __future__ import annotations

import collections
import time
from pathlib import Path

import numpy as np

from pgexport.errors import GateFailedError, UnsupportedError

MODEL_TYPES = {"vision_encoder": "vit", "decoder_model_merged": "gpt2"}
MAX_REL_DIFF = 1e-4  # the fp32 gate's: fusions reorder float math, they must not change the model


def optimize_graph(folder: Path, graph: str, src: Path, dst: Path) -> dict:
    """Fuse `src` (an fp32 graph of artifact `folder`) into `dst`; returns the op-count changes and
    the parity of dst against src on the demo samples. Raises GateFailedError past MAX_REL_DIFF."""
    import onnx
    import onnxruntime as ort
    from onnxruntime.transformers.fusion_options import FusionOptions
    from onnxruntime.transformers.optimizer import optimize_model

    from pgexport.quantize.fp16 import sample_feeds

    started = time.perf_counter()
    if graph not in MODEL_TYPES:
        return {"skipped": f"nothing to fuse in {graph}"}
    data = src.with_name(src.name + ".data")
    if src.stat().st_size + (data.stat().st_size if data.is_file() else 0) > (2 << 30) - (64 << 20):
        raise UnsupportedError(f"{src}: the optimization pass loads the graph whole; graphs over 2 GB are not supported yet")
    options = FusionOptions(MODEL_TYPES[graph])
    options.enable_attention = False
    optimized = optimize_model(str(src), model_type=MODEL_TYPES[graph], opt_level=0, optimization_options=options)
    dst.parent.mkdir(parents=True, exist_ok=True)
    optimized.save_model_to_file(str(dst))
    before = collections.Counter(n.op_type for n in onnx.load(str(src), load_external_data=False).graph.node)
    after = collections.Counter(n.op_type for n in optimized.model.graph.node)

    worst = 0.0
    reference, candidate = (ort.InferenceSession(str(p), providers=["CPUExecutionProvider"]) for p in (src, dst))
    for feed in sample_feeds(folder, graph):
        for want, got in zip(reference.run(None, feed), candidate.run(None, feed)):
            span = float(want.max() - want.min()) or 1.0
            worst = max(worst, float(np.abs(want - got).max()) / span)
    report = {
        "model_type": MODEL_TYPES[graph],
        "op_changes": {op: after[op] - before[op] for op in sorted(set(before) | set(after)) if after[op] != before[op]},
        "max_rel_diff": worst,
        "seconds": round(time.perf_counter() - started, 3),
    }
    if worst > MAX_REL_DIFF:
        raise GateFailedError(f"{graph}: the optimization pass changed outputs by {worst:.2e} of their range > {MAX_REL_DIFF:.0e}")
    return report
