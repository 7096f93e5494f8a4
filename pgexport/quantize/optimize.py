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
The token table (a Gather) has nothing to fuse. The fusions work on the graph loaded whole
(weights included: Gemma's norm scales are folded); a graph over 1 GiB (the 3B decoder, 10 GB)
is fused without symbolic shape inference (it copies the model), so its residual Adds stay out of
the norms; it is saved with its weights as external data, the fused model is freed before the
parity check, and the two parity sessions run one after the other.
"""

from __future__ import annotations

import collections
import gc
import time
from pathlib import Path

from pgexport.contract import DECODER, VISION
from pgexport.errors import GateFailedError
from pgexport.graphio.read import graph_bytes
from pgexport.metrics import max_rel_diff

MODEL_TYPES = {VISION.name: "vit", DECODER.name: "gpt2"}
MAX_REL_DIFF = 1e-4  # the fp32 gate's: fusions reorder float math, they must not change the model


def optimize_graph(folder: Path, graph: str, src: Path, dst: Path) -> dict:
    """Fuse `src` (an fp32 graph of artifact `folder`) into `dst`; returns the op-count changes and
    the parity of dst against src on the demo samples. Raises GateFailedError past MAX_REL_DIFF."""
    import onnx
    from onnxruntime.transformers.fusion_options import FusionOptions
    from onnxruntime.transformers.optimizer import optimize_model

    from pgexport.exporters.onnx import EXTERNAL_DATA_THRESHOLD
    from pgexport.quantize.fp16 import graph_outputs, sample_feeds

    started = time.perf_counter()
    if graph not in MODEL_TYPES:
        return {"skipped": f"nothing to fuse in {graph}"}
    external = graph_bytes(src) > EXTERNAL_DATA_THRESHOLD
    options = FusionOptions(MODEL_TYPES[graph])
    options.enable_attention = False
    # Symbolic shape inference (the skip-norm fusions' broadcast check) copies the whole model:
    # 20 GB for the 3B decoder, which ran 24 GB out. Without it the norms and GELU still fuse; the
    # residual Adds stay outside them (no SkipSimplifiedLayerNormalization).
    options.enable_shape_inference = not external
    optimized = optimize_model(str(src), model_type=MODEL_TYPES[graph], opt_level=0, optimization_options=options)
    dst.parent.mkdir(parents=True, exist_ok=True)
    optimized.save_model_to_file(str(dst), use_external_data_format=external)
    before = collections.Counter(n.op_type for n in onnx.load(str(src), load_external_data=False).graph.node)
    after = collections.Counter(n.op_type for n in optimized.model.graph.node)
    del optimized
    gc.collect()  # the optimizer's reference cycles hold the fused model (10 GB for the 3B decoder)

    worst = 0.0
    feeds = sample_feeds(folder, graph)
    for want, got in zip(graph_outputs(src, feeds), graph_outputs(dst, feeds)):
        for name, expected in want.items():
            worst = max(worst, max_rel_diff(expected, got[name]))
    report = {
        "model_type": MODEL_TYPES[graph],
        "op_changes": {op: after[op] - before[op] for op in sorted(set(before) | set(after)) if after[op] != before[op]},
        "max_rel_diff": worst,
        "seconds": round(time.perf_counter() - started, 3),
    }
    if worst > MAX_REL_DIFF:
        raise GateFailedError(f"{graph}: the optimization pass changed outputs by {worst:.2e} of their range > {MAX_REL_DIFF:.0e}")
    return report
