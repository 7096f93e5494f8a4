"""Core ML packages for PaliGemma (`pgexport coreml`): an image encoder taking the camera frame and a
decoder holding its KV cache as Core ML state, optionally compressed.

    convert.to_coreml(model, output, compress=..., target=..., max_context=...)   checkpoint -> packages
    validate.validate_coreml(artifact)                 files, specs, runtime parity (macOS)
    parity.check_wrappers(model, processor)            export wrappers vs transformers (PyTorch)

Design choices and their reasons: docs/coreml.md.
"""

from __future__ import annotations

import contextlib
import logging
import sys

# What coremltools logs (WARNING, logger "coremltools") on import and on every conversion that says
# nothing to a pgexport user; any other line still shows.
HARMLESS_COREMLTOOLS_LOGS = (
    # Only its converter of scikit-learn models is disabled; palettization imports sklearn itself.
    "scikit-learn version ",
    # The pinned torch is newer than coremltools' last tested one: pgexport's tests convert with this
    # pair, and every export checks its packages' specs.
    "has not been tested with coremltools",
    # The Core ML runtime (coremltools.libcoremlpython) ships for macOS only: elsewhere validate skips the
    # runtime check and says so. On macOS the lines stay: there they would be a fault.
    *(("No module named 'coremltools.libcoremlpython'",) if sys.platform != "darwin" else ()),
    # The decoder's key_cache / value_cache buffers are states: the torch frontend keeps the state and
    # skips the buffer's constant copy, as a stateful conversion should.
    "Torch var key_cache is added again", "Torch var value_cache is added again",
    # --compress int4 quantizes per block of 32 input channels: SigLIP's patch embedding has 3 (RGB), so
    # that one small weight stays fp16, as intended (the package's size is in the manifest).
    "Unable to perform structured quantization", "_patch_embedding_weight_to_fp16. Skipped this op",
    # Gemma's embedding has a padding_idx, which only changes gradients: the gather is the same.
    "Core ML embedding (gather) layer does not support any inputs besides the weights and indices",
)


class _HarmlessCoremltoolsLogs(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(known in message for known in HARMLESS_COREMLTOOLS_LOGS)


HARMLESS_COREMLTOOLS_FILTER = _HarmlessCoremltoolsLogs("coremltools")


# coremltools logs through the "coremltools" logger, and some of its modules through the root logger
# (`coremltools._getLogger()` with no name): a logger's filter sees only what is logged on it.
COREMLTOOLS_LOGGERS = ("coremltools", "")


@contextlib.contextmanager
def harmless_coremltools_logs_dropped():
    """Drop HARMLESS_COREMLTOOLS_LOGS for the block (filters on the loggers coremltools logs through;
    enter before coremltools is first imported). Nests: a filter is removed only by the block that
    added it."""
    loggers = [logging.getLogger(name) for name in COREMLTOOLS_LOGGERS]
    added = [logger for logger in loggers if HARMLESS_COREMLTOOLS_FILTER not in logger.filters]
    for logger in added:
        logger.addFilter(HARMLESS_COREMLTOOLS_FILTER)
    try:
        yield
    finally:
        for logger in added:
            logger.removeFilter(HARMLESS_COREMLTOOLS_FILTER)
