"""pgexport: PaliGemma checkpoints to validated edge artifacts.

Python API (the CLI mirrors it one-to-one):
    export_onnx(model, output, int8=...)      checkpoint -> ONNX artifact, validated
    quantize_artifact(artifact, output, ...)  fp32 artifact -> quantized variants, validated
    to_coreml(model, output, ...)             checkpoint -> Core ML packages
    distill(teacher, output, ...)             teacher -> smaller student checkpoint
    validate_artifact(artifact, ...)          rerun the parity gate
    pgexport.build.build(recipe, output)      every stage a recipe names, cached, gated, verified
Each takes its stage's config (pgexport.config) or that config's fields as keywords.
    OnnxPaliGemma(artifact).generate(...)     run an artifact on ONNX Runtime
    load_checkpoint(model)                    load and check a PaliGemma checkpoint
"""

__version__ = "0.1.0"

_API = {
    "export_onnx": "pgexport.pipeline",
    "quantize_artifact": "pgexport.pipeline",
    "to_coreml": "pgexport.coreml.convert",
    "distill": None,  # the package itself, callable (pgexport/distill/__init__.py)
    "validate_artifact": "pgexport.validate",
    "OnnxPaliGemma": "pgexport.runtime",
    "load_checkpoint": "pgexport.load",
}


def __getattr__(name):
    # Lazy, so `pgexport --help` does not pay for importing torch.
    if name in _API:
        import importlib

        if _API[name] is None:
            return importlib.import_module(f"pgexport.{name}")
        return getattr(importlib.import_module(_API[name]), name)
    raise AttributeError(f"module 'pgexport' has no attribute {name!r}")


__all__ = [*_API, "__version__"]
