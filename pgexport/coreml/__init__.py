"""Core ML packages for PaliGemma (`pgexport coreml`): an image encoder taking the camera frame and a
decoder holding its KV cache as Core ML state, optionally compressed.

    to_coreml(model, output, compress=..., target=..., max_context=...)   checkpoint -> packages
    validate_coreml(artifact)                                             files, specs, runtime parity (macOS)
    check_wrappers(model, processor)                                      export wrappers vs transformers (PyTorch)

Design choices and their reasons: docs/coreml.md.
"""

from __future__ import annotations

# The choices of --compress and --target, here (no heavy import) so the CLI reads them.
COMPRESSIONS = ("none", "int8", "int4", "palettize4")
TARGETS = ("iOS18", "macOS15", "iOS17")
STATEFUL_TARGETS = ("iOS18", "macOS15")  # Core ML state (ct.StateType) starts with iOS18 / macOS15


def to_coreml(*args, **kwargs):
    from pgexport.coreml.convert import to_coreml as run

    return run(*args, **kwargs)


def validate_coreml(*args, **kwargs):
    from pgexport.coreml.validate import validate_coreml as run

    return run(*args, **kwargs)


def check_wrappers(*args, **kwargs):
    from pgexport.coreml.parity import check_wrappers as run

    return run(*args, **kwargs)
