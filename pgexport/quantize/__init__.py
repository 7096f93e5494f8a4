"""Post-export quantization of ONNX graphs.

    quantize_dynamic_int8(src, dst)   fp32 graph -> dynamic int8 graph (int8.py), the graph
                                      onnxruntime's quantize_dynamic writes, built one tensor at a
                                      time so a 10 GB model fits a 24 GB machine
    quantize_int4(src, dst)           MatMul weights -> 4-bit MatMulNBits, rtn or hqq (int4.py), streamed
    quantize_embedding(src, dst)      Gather tables -> 4/8-bit GatherBlockQuantized (embed.py), streamed
    convert_fp16(...)                 fp16 with fp32 islands measured on real activations (fp16.py)
    optimize_graph(...)               onnxruntime transformer fusions, parity-checked (optimize.py)
    quantize_static_int8, tune_static_int8, calibration_feeds   calibrated int8 (static.py, tune.py,
                                      calibration.py)

Every pass streams its graph through pgexport.graphio (read a weight in row chunks, write the
new graph and its data file; one loop, `graphio.write.write_graph`); rewrite.py holds what the
rewrites share (loading a float graph, node and name helpers). artifact.py turns the passes into
the stage over a whole artifact (which precision each graph gets, the variants in the manifest,
the size report); pgexport.pipeline.quantize_artifact is the spine.
"""

from __future__ import annotations

_LAZY = {
    "quantize_dynamic_int8": "int8", "QuantizeInputError": "int8", "quantize_int4": "int4",
    "quantize_embedding": "embed", "convert_fp16": "fp16", "optimize_graph": "optimize",
}


def __getattr__(name):
    # Lazy: importing the package must not pull numpy/onnx/rich in.
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f"pgexport.quantize.{_LAZY[name]}"), name)
    raise AttributeError(f"module 'pgexport.quantize' has no attribute {name!r}")


__all__ = list(_LAZY)
