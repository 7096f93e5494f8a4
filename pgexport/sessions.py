"""onnxruntime sessions as pgexport opens them: one graph file each, CPU unless told otherwise,
errors-only logging, and a low-memory form for the parity gate and the quantizers' probes."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import onnxruntime as ort


def session_options(threads: int | None = None, low_memory: bool = False,
                    prepack: bool | None = None) -> ort.SessionOptions:
    """open_session's options (see there): errors-only logging, `threads`, `low_memory`, `prepack`."""
    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
    options.log_severity_level = 3
    if low_memory:
        options.enable_cpu_mem_arena = False
    if not (prepack if prepack is not None else not low_memory):
        options.add_session_config_entry("session.disable_prepacking", "1")
    return options


def open_session(path: str | Path, threads: int | None = None, providers: list[str] | None = None,
                 low_memory: bool = False, prepack: bool | None = None) -> ort.InferenceSession:
    """An onnxruntime session of one graph file (CPU unless `providers` say otherwise) that logs
    errors only: onnxruntime warns at every load that the decoder's `logits_to_keep` is an
    initializer that is also an input, which is the point (exporters/onnx.py).

    `low_memory`: no prepacked weight copies (the weights stay mapped from their file, pages the
    kernel can drop, and there is no 2 GB packing transient on the 3B decoder's LM head) and no
    CPU arena (what a run frees goes back to the OS; the arena kept a 3B prefill's 1 GB of logits).
    Measured on the 3B fp32 decoder, a 3 x 268-token prefill takes as long either way
    (benchmarks/results/memory_3b.md); the parity gate and the quantizers' probes use it.

    `prepack` (default: not `low_memory`) overrides the first half. A graph of 4-bit MatMulNBits
    needs it: without its packed weights onnxruntime's kernel dequantizes every weight to fp32 on
    every call, which is a different computation from the int8 one (accuracy_level 4) a user
    runs (0.6% of the largest output apart on one 2048 x 16384 MatMul) and 100x slower at one
    token. int8 MatMuls give the same figures either way, fp32 ones within 1e-6 of the largest
    output (benchmarks/matmul_prepacking.py, benchmarks/results/memory_3b.md)."""
    return ort.InferenceSession(str(path), session_options(threads, low_memory, prepack),
                                providers=providers or ["CPUExecutionProvider"])


class Sessions(dict):
    """graph name -> onnxruntime session, for the graph files in `paths`: each opened on first use
    (or all at once, `eager`), and closed again by `release`."""

    def __init__(self, paths: dict[str, Path], open_one: Callable[[str, Path], ort.InferenceSession],
                 eager: bool = True):
        super().__init__()
        self.paths, self._open = paths, open_one
        for graph in paths if eager else ():
            self[graph] = open_one(graph, paths[graph])

    def __missing__(self, graph: str) -> ort.InferenceSession:
        if graph not in self.paths:
            raise KeyError(graph)
        session = self[graph] = self._open(graph, self.paths[graph])
        return session

    def replace(self, graph: str, path: Path) -> None:
        """Use the graph file at `path` for `graph` from now on (opened on next use)."""
        self.paths[graph] = path
        self.release(graph)

    def release(self, graph: str) -> None:
        """Close a graph's session (its memory goes back now); the next use opens it again."""
        self.pop(graph, None)
