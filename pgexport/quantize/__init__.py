"""Post-export quantization of ONNX graphs.

    quantize_dynamic_int8(src, dst)   fp32 graph -> dynamic int8 graph (pgexport.quantize.int8),
                                      the graph onnxruntime's quantize_dynamic writes, built one
                                      tensor at a time so a 10 GB model fits a 24 GB machine
"""

from __future__ import annotations


def __getattr__(name):
    # Lazy: importing the package must not pull numpy/onnx/rich in.
    if name in ("quantize_dynamic_int8", "QuantizeInputError"):
        from pgexport.quantize import int8

        return getattr(int8, name)
    raise AttributeError(f"module 'pgexport.quantize' has no attribute {name!r}")


__all__ = ["quantize_dynamic_int8", "QuantizeInputError"]
