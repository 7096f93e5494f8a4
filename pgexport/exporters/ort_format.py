"""ONNX Runtime Mobile (`--ort-format`): every ONNX graph of an artifact also in ONNX Runtime's own
flatbuffer format, `onnx/<graph><suffix>.ort` beside `onnx/<graph><suffix>.onnx`, and the operators
those graphs use, `onnx/required_operators.config`: the `--include_ops_by_config` input of a
reduced-operator (minimal) onnxruntime build, which loads .ort files only.

The conversion is onnxruntime's own tool (`onnxruntime.tools.convert_onnx_models_to_ort`, the
`python -m onnxruntime.tools.convert_onnx_models_to_ort onnx/ --optimization_style Fixed` of the
command line), run on the staging folder's onnx/ before its manifest is written, so the manifest
lists and hashes what it writes. Its choices, recorded in the manifest's "ort_format":
- optimization style "Fixed": the graph optimizations are applied at conversion and saved (the
  tool's guidance: "Runtime" when a compiling EP such as NNAPI or Core ML takes part of the graph,
  "Fixed" otherwise). PaliGemma's graphs run on the CPU EP (dynamic sequence and cache lengths), and
  "Runtime" would also need `session.enable_saved_runtime_optimizations` at load, for trusted models
  only; "Fixed" needs nothing at load, and a minimal build (no optimizers) runs it as optimized;
- optimization level "all" (the tool's default; its NCHWc layout transformer, x86-only, stays off),
  so an .ort graph is the graph onnxruntime's default session runs from the .onnx: the same tokens;
- target platform left unset (neither "arm" nor "amd64"): the file runs on both.

A .ort file is one flatbuffer of at most 2 GiB, weights included (no external data): graphs whose
.onnx (with its external data) pass that are refused before any work (`check_fits`).
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
from pathlib import Path

from pgexport.contract import ORT_OPERATORS_CONFIG
from pgexport.errors import UnsupportedError

OPTIMIZATION_STYLE = "Fixed"
OPTIMIZATION_LEVEL = "all"
LEVEL_VARIABLE = "ORT_CONVERT_ONNX_MODELS_TO_ORT_OPTIMIZATION_LEVEL"  # the tool reads its level from here
MAX_ORT_BYTES = 2**31 - 1  # flatbuffers' limit on one buffer
TOOL_LOGGERS = ("ort_format_model.utils",)  # log every config it writes at INFO, with its own root handler


def onnx_graphs(folder: Path) -> list[Path]:
    """The .onnx graphs of an artifact (or staging) folder: what the tool converts."""
    return sorted((Path(folder) / "onnx").glob("*.onnx"))


def graph_bytes(graph: Path) -> int:
    """A graph's .onnx and its external data (`<graph>.onnx.data`, any `<graph>.onnx*`)."""
    return sum(path.stat().st_size for path in graph.parent.glob(graph.name + "*") if path.is_file())


def check_fits(folder: Path) -> None:
    """UnsupportedError (exit 7) when an .onnx graph of `folder` (weights included) is over what one
    .ort flatbuffer holds; called on the fp32 graphs before quantizing, and again before converting."""
    for graph in onnx_graphs(folder):
        if (size := graph_bytes(graph)) > MAX_ORT_BYTES:
            raise UnsupportedError(
                f"--ort-format: onnx/{graph.name} is {size / 2**30:.1f} GiB with its weights, and an ORT format "
                f"graph is one flatbuffer of at most 2 GiB (no external data): leave --ort-format out for this model")


def ort_files(manifest: dict) -> set[str]:
    """The files of a manifest that a conversion writes (.ort graphs and the operator config): what
    `quantize` makes anew (or leaves out) rather than linking from its input."""
    return {name for name in manifest.get("files", {}) if name.endswith(".ort") or name == ORT_OPERATORS_CONFIG}


@contextlib.contextmanager
def _quiet_tool():
    """The tool as a library: its prints (stdout) captured, its logger and onnxruntime's load warnings
    (the decoder's overridable `logits_to_keep`) silenced, the root logging handler its import adds
    removed, and its optimization level pinned. Yields (the tool's module, its captured prints)."""
    import onnxruntime as ort

    root_handlers, level = list(logging.getLogger().handlers), os.environ.get(LEVEL_VARIABLE)
    captured = io.StringIO()
    try:
        from onnxruntime.tools import convert_onnx_models_to_ort as tool

        logging.getLogger().handlers[:] = root_handlers
        for name in TOOL_LOGGERS:
            logging.getLogger(name).setLevel(logging.WARNING)
        os.environ[LEVEL_VARIABLE] = OPTIMIZATION_LEVEL
        ort.set_default_logger_severity(3)
        with contextlib.redirect_stdout(captured):
            yield tool, captured
    finally:
        ort.set_default_logger_severity(2)  # onnxruntime's default: warnings
        if level is None:
            os.environ.pop(LEVEL_VARIABLE, None)
        else:
            os.environ[LEVEL_VARIABLE] = level


def _failed_graph(captured: str) -> str:
    """The graph the tool names in its last "Error converting <path>: ..." line, else "the graphs"."""
    lines = [line for line in captured.splitlines() if line.startswith("Error converting ")]
    return f"onnx/{Path(lines[-1][len('Error converting '):].split(': ')[0]).name}" if lines else "the graphs"


def convert(folder: Path) -> dict:
    """Write `<graph>.ort` beside every .onnx graph under `folder`/onnx and the operators they use
    (ORT_OPERATORS_CONFIG); returns the manifest's "ort_format" record. Existing .ort files and
    config are removed first, so that nothing is written through a hard link (quantize's)."""
    import onnxruntime as ort

    folder = Path(folder)
    check_fits(folder)
    graphs = onnx_graphs(folder)
    for stale in [*(folder / "onnx").glob("*.ort"), folder / ORT_OPERATORS_CONFIG]:
        stale.unlink(missing_ok=True)
    with _quiet_tool() as (tool, captured):
        try:
            tool.convert_onnx_models_to_ort(folder / "onnx", optimization_styles=[tool.OptimizationStyle.Fixed])
        except (OSError, MemoryError):
            raise
        except Exception as error:  # noqa: BLE001 - onnxruntime's own errors: one line, exit 7
            message = " ".join(str(error).split())[:300]
            raise UnsupportedError(f"--ort-format: onnxruntime could not convert {_failed_graph(captured.getvalue())} "
                                   f"to the ORT format: {type(error).__name__}: {message}") from error
    record = {}
    for graph in graphs:
        ort_graph = graph.with_suffix(".ort")
        if not ort_graph.is_file():
            raise UnsupportedError(f"--ort-format: onnxruntime wrote no onnx/{ort_graph.name} for onnx/{graph.name}")
        record[f"onnx/{ort_graph.name}"] = {"from": f"onnx/{graph.name}", "onnx_bytes": graph_bytes(graph),
                                            "ort_bytes": ort_graph.stat().st_size}
    _relative_sources(folder)
    return {"optimization_style": OPTIMIZATION_STYLE, "optimization_level": OPTIMIZATION_LEVEL,
            "operators_config": ORT_OPERATORS_CONFIG, "onnxruntime": ort.__version__, "graphs": record}


def _relative_sources(folder: Path) -> None:
    """The config's "# - <model path>" comments name the staging folder's absolute paths: made
    relative to the artifact (onnx/<graph>.ort), so the file is the same wherever it was made."""
    config = folder / ORT_OPERATORS_CONFIG
    if not config.is_file():
        raise UnsupportedError(f"--ort-format: onnxruntime wrote no {ORT_OPERATORS_CONFIG}")
    lines = [f"# - onnx/{Path(line[4:]).name}" if line.startswith("# - ") else line
             for line in config.read_text().splitlines()]
    config.write_text("\n".join(lines) + "\n")


def operators(config_text: str) -> dict[str, set[str]]:
    """A required_operators.config's operators (`domain;opset;Op1,Op2` lines, no type reduction):
    domain -> op types, opsets merged."""
    found: dict[str, set[str]] = {}
    for line in config_text.splitlines():
        if line.strip() and not line.startswith("#"):
            domain, _, ops = line.split(";", 2)
            found.setdefault(domain, set()).update(op for op in ops.split(",") if op)
    return found
