"""The quantization stage over a whole artifact: which precision each graph gets, the graph files
that makes, and what they weigh.

A *variant* is one precision per graph, e.g. {"vision_encoder": "int8", "embed_tokens": "q4",
"decoder_model_merged": "q4"}; its files are `onnx/<graph><suffix>.onnx` (contract.DTYPE_SUFFIX,
transformers.js naming), each made once from the fp32 graph of the same artifact by
`quantize_graph`, whatever the number of variants that use it. A variant is named after its
lowest precision (the last in config.PRECISIONS), which also picks its parity thresholds (validate.THRESHOLDS);
the manifest records each variant's per-graph map under "variants" and the runtime loads it
from there (transformers.js takes the same map as its per-graph `dtype`).

Methods per precision: int8 = dynamic int8 (pgexport/quantize/int8.py) for MatMul graphs and an
8-bit GatherBlockQuantized table (embed.py) for the embedding; int8-static = calibrated QDQ int8
(static.py); q4 = 4-bit MatMulNBits, rtn or hqq (int4.py), 4-bit
GatherBlockQuantized for the table; fp16 = fp16.py.
"""

from __future__ import annotations

from pathlib import Path

from pgexport.config import EMBED_PRECISIONS, PRECISIONS, QuantizeOptions
from pgexport.config import METHODS as METHOD_OPTIONS
from pgexport.contract import DECODER, EMBED, GRAPH_NAMES, GRAPHS, VISION, graph_path
from pgexport.errors import BadInputError, UnsupportedError, import_optional
from pgexport.memory import release_freed

# CLI option -> graph
GRAPH_OPTIONS = {spec.option: spec.name for spec in GRAPHS}
ALLOWED = {VISION.name: PRECISIONS, EMBED.name: EMBED_PRECISIONS, DECODER.name: PRECISIONS}
# What a whole-artifact method means per graph (config.METHODS, by graph name).
METHODS = {method: {GRAPH_OPTIONS[key]: precision for key, precision in graphs.items()}
           for method, graphs in METHOD_OPTIONS.items()}


def variant_name(graphs: dict[str, str]) -> str:
    """A variant is named after its lowest precision (the last in config.PRECISIONS)."""
    return max(graphs.values(), key=PRECISIONS.index, default="fp32")


def plan_variants(methods=(), overrides: dict[str, str | None] | None = None) -> dict[str, dict[str, str]]:
    """Variants to make: one per whole-artifact method, the per-graph overrides applied to each (or,
    with no method, one variant of the overrides alone). Returns {name: {graph: precision}},
    fp32 graphs left out. Unknown names raise BadInputError listing the allowed ones."""
    overrides = {key: value for key, value in (overrides or {}).items() if value}
    for key, precision in overrides.items():
        graph = GRAPH_OPTIONS.get(key, key)
        if graph not in ALLOWED:
            raise BadInputError(f"unknown graph {key!r}: choose from {', '.join(GRAPH_OPTIONS)}")
        if precision not in ALLOWED[graph]:
            raise BadInputError(f"--{key} {precision!r}: choose from {', '.join(ALLOWED[graph])}")
    for method in methods:
        if method not in METHODS:
            raise BadInputError(f"unknown method {method!r}: choose from {', '.join(METHODS)}")
    bases = [METHODS[m] for m in methods] or ([{}] if overrides else [])
    variants = {}
    for base in bases:
        graphs = {**base, **{GRAPH_OPTIONS.get(k, k): v for k, v in overrides.items()}}
        graphs = {g: graphs[g] for g in GRAPH_NAMES if graphs.get(g, "fp32") != "fp32"}
        if not graphs:
            continue
        name = variant_name(graphs)
        if name in variants and variants[name] != graphs:
            raise BadInputError(f"two variants named {name!r} ({variants[name]} and {graphs}): make them in two runs")
        variants[name] = graphs
    return variants


def _need(module: str):
    """A method module whose dependencies may be an optional extra (neural-compressor: `inc`)."""
    return import_optional(f"pgexport.quantize.{module}", "inc")


def quantize_graph(folder: Path, graph: str, precision: str, options: QuantizeOptions, *, progress: bool = True,
                   evaluate=None) -> dict:
    """Make `onnx/<graph><suffix>.onnx` of `folder` from its fp32 graph; returns the method's info."""
    src, dst = graph_path(folder, graph, "fp32"), graph_path(folder, graph, precision)
    fresh_target(dst)
    if options.optimize and graph != EMBED.name:
        from pgexport.quantize.optimize import optimize_graph

        fused = src.with_name(f".{graph}_optimized.onnx")
        fresh_target(fused)
        try:
            report = optimize_graph(folder, graph, src, fused)
            info = _quantize_file(folder, graph, precision, fused, dst, options, progress, evaluate)
        finally:
            for leftover in (fused, fused.with_name(fused.name + ".data")):
                leftover.unlink(missing_ok=True)
        return {**info, "optimized": report}
    return _quantize_file(folder, graph, precision, src, dst, options, progress, evaluate)


def fresh_target(path: Path) -> None:
    """Remove `path` and its external data before a writer creates them: a file there may be a
    hard link to an input's file (quantize_artifact links the input artifact), and writing into
    it, as onnx.save does, would change the input."""
    for old in (path, path.with_name(path.name + ".data")):
        old.unlink(missing_ok=True)


def _quantize_file(folder: Path, graph: str, precision: str, src: Path, dst: Path, options: QuantizeOptions,
                   progress: bool, evaluate) -> dict:
    if graph == EMBED.name and precision in ("int8", "q4"):
        from pgexport.quantize.embed import quantize_embedding

        bits = 8 if precision == "int8" else 4
        info = quantize_embedding(src, dst, bits=bits, block_size=options.block_size, progress=progress)
        return {**info, "method": f"GatherBlockQuantized {bits}-bit"}
    if precision == "int8":
        from pgexport.quantize.int8 import quantize_dynamic_int8

        return {**quantize_dynamic_int8(src, dst, progress=progress), "method": "dynamic int8"}
    if precision == "q4":
        from pgexport.quantize.int4 import quantize_int4

        info = quantize_int4(src, dst, method=options.int4_method, block_size=options.block_size,
                             accuracy_level=options.accuracy_level, progress=progress)
        return {**info, "method": f"MatMulNBits 4-bit {options.int4_method}"}
    if precision == "fp16":
        fp16 = _need("fp16")
        return {**fp16.convert_fp16(folder, graph, src, dst, progress=progress), "method": "fp16 with fp32 islands"}
    if precision == "int8-static":
        calibration = _need("calibration")
        feeds = calibration.calibration_feeds(folder, graph, options.calibration)
        if options.accuracy_target is not None:
            tune = _need("tune")
            if evaluate is None:
                raise UnsupportedError("accuracy-aware tuning needs the reference model's metric (run with validation on)")
            info = tune.tune_static_int8(src, dst, feeds, lambda path: evaluate(graph, path), options.accuracy_target,
                                         progress=progress)
            return {**info, "method": "static int8 (tuned)"}
        static = _need("static")
        return {**static.quantize_static_int8(src, dst, feeds, progress=progress), "method": "static int8"}
    raise UnsupportedError(f"no {precision} method for {graph}")


def quantize_variants(folder: Path, variants: dict[str, dict[str, str]], options: QuantizeOptions, *,
                      progress: bool = True, evaluate=None) -> dict:
    """Make every graph file the variants need, each once, in `folder`; returns {"graph/precision": info}."""
    made = {}
    for graphs in variants.values():
        for graph, precision in graphs.items():
            key = f"{graph}/{precision}"
            if key not in made:
                made[key] = quantize_graph(folder, graph, precision, options, progress=progress, evaluate=evaluate)
                release_freed()  # the next graph's peak is its own: glibc kept 3.2 GB of the last one's
    return made


def graph_bytes(folder: Path, graph: str, precision: str) -> int:
    """The .onnx plus its external data file."""
    path = graph_path(folder, graph, precision)
    data = path.with_name(path.name + ".data")
    return path.stat().st_size + (data.stat().st_size if data.is_file() else 0)


def size_report(folder: Path, variants: dict[str, dict[str, str]]) -> dict:
    """Bytes per graph and in total for fp32 and each variant, and each total's ratio to fp32."""
    fp32 = {graph: graph_bytes(folder, graph, "fp32") for graph in GRAPH_NAMES}
    report = {"fp32": {"graphs": fp32, "total": sum(fp32.values()), "ratio": 1.0}}
    for name, graphs in variants.items():
        sizes = {graph: graph_bytes(folder, graph, graphs.get(graph, "fp32")) for graph in GRAPH_NAMES}
        total = sum(sizes.values())
        report[name] = {"graphs": sizes, "precisions": {g: graphs.get(g, "fp32") for g in GRAPH_NAMES},
                        "total": total, "ratio": round(total / report["fp32"]["total"], 4)}
    return report


__all__ = ["ALLOWED", "GRAPH_OPTIONS", "METHODS", "QuantizeOptions", "plan_variants",
           "quantize_graph", "quantize_variants", "size_report", "variant_name"]
