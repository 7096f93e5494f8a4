"""Static int8 (QDQ, neural-compressor) and accuracy-aware tuning: the figures of
benchmarks/results/quantize_static.md. Prints one JSON object.

    python benchmarks/quantize_static.py demo OUT
        export the demo model (fp32), quantize both graphs on the default calibration data,
        run the parity gate against PyTorch (token agreement, logits cosine, exact-match change
        on the 200 held-out rows), then two tuning runs of the decoder: demo exact match at
        target 0.99 and the gate's prefill min logits cosine (8 held-out prompts) at target 0.99,
        and the gate again with that tuned decoder
    python benchmarks/quantize_static.py graph ARTIFACT GRAPH OUT [--limit N] [--streamed]
        quantize one graph of an existing artifact (for peak memory: run it under
        benchmarks/measure.py, e.g. on the 3B-shape vision encoder)
    python benchmarks/quantize_static.py compare ARTIFACT DECODER [--rows N]
        one prefill of N held-out prompts through the artifact's fp32 decoder, then DECODER
        (loaded one after the other): logits cosine, argmax agreement, next token
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

import numpy as np

GRAPHS = ("vision_encoder", "decoder_model_merged")


def with_graphs(artifact: Path, folder: Path, graphs: dict[str, Path]) -> Path:
    """A copy of the artifact whose fp32 graph files are the given ones."""
    from pgexport.manifest import read_manifest, write_manifest

    if folder.exists():
        shutil.rmtree(folder)
    shutil.copytree(artifact, folder, ignore=shutil.ignore_patterns(".nc-workspace*", "*_int8_static*", "candidates"))
    for graph, path in graphs.items():
        shutil.copy(path, folder / "onnx" / f"{graph}.onnx")
    fields = {k: v for k, v in read_manifest(folder).items() if k not in ("files", "versions")}
    write_manifest(folder, **fields)  # the runtime refuses graphs the manifest does not describe
    return folder


def demo_exact_match(artifact: Path, rows) -> tuple[float, list[str]]:
    from pgexport.runtime import OnnxPaliGemma, open_image
    from pgexport.validate import EVAL_MAX_NEW_TOKENS, exact_match

    runtime, answers = OnnxPaliGemma(artifact, dtype="fp32"), []
    for start in range(0, len(rows), 50):
        chunk = rows[start : start + 50]
        answers += [g.text for g in runtime.generate([open_image(r.image) for r in chunk], [r.prefix for r in chunk], EVAL_MAX_NEW_TOKENS)]
    return exact_match(answers, rows), answers


def min_logits_cosine(session, feeds, reference) -> float:
    cosines = []
    for feed, ref in zip(feeds, reference):
        out = session.run(["logits"], feed)[0].reshape(-1, ref.shape[-1])
        ref = ref.reshape(-1, ref.shape[-1])
        cosines.append(np.sum(out * ref, -1) / (np.linalg.norm(out, axis=-1) * np.linalg.norm(ref, axis=-1)))
    return float(np.concatenate(cosines).min())


def run_demo(out: Path) -> dict:
    import onnxruntime as ort

    from pgexport.demo import EVAL_FILE, load_split
    from pgexport.load import load_checkpoint
    from pgexport.pipeline import export_onnx
    from pgexport.quantize.calibration import calibration_feeds
    from pgexport.quantize.static import quantize_static_int8
    from pgexport.quantize.tune import tune_static_int8
    from pgexport.runtime import OnnxPaliGemma
    from pgexport.validate import THRESHOLDS, check_hop, reference_outputs

    fp32 = out / "fp32"
    export_onnx(None, fp32, validate=False, progress=False, force=True)
    quantized = out / "graphs"
    quantized.mkdir(parents=True, exist_ok=True)
    result = {"graphs": {}}
    for graph in GRAPHS:
        started = time.perf_counter()
        feeds = calibration_feeds(fp32, graph)
        info = quantize_static_int8(fp32 / "onnx" / f"{graph}.onnx", quantized / f"{graph}_int8_static.onnx", feeds, progress=False)
        info["calibration_seconds"] = round(time.perf_counter() - started - info["seconds"], 2)
        result["graphs"][graph] = {k: v for k, v in info.items() if k != "op_types"}
    sizes = lambda folder: {p.name: p.stat().st_size for p in (folder / "onnx").iterdir() if p.suffix == ".onnx"}  # noqa: E731
    static = with_graphs(fp32, out / "static", {g: quantized / f"{g}_int8_static.onnx" for g in GRAPHS})
    fp32_total, static_total = sum(sizes(fp32).values()), sum(sizes(static).values())
    result["package"] = {"fp32_bytes": fp32_total, "static_bytes": static_total, "ratio": round(static_total / fp32_total, 4)}

    # The parity gate against PyTorch, as for every artifact: fp32 graphs and static int8 graphs.
    checkpoint = load_checkpoint(None)
    rows = load_split(EVAL_FILE)
    reference = reference_outputs(checkpoint.model, checkpoint.processor, eval_rows=rows)
    del checkpoint
    thresholds = THRESHOLDS.get("int8-static", THRESHOLDS["int8"])
    result["gate"] = {
        "fp32": check_hop(OnnxPaliGemma(fp32, dtype="fp32"), reference, THRESHOLDS["fp32"]),
        "int8-static": check_hop(OnnxPaliGemma(static, dtype="fp32"), reference, thresholds),
    }
    em_fp32, answers_fp32 = demo_exact_match(fp32, rows)
    em_static, answers_static = demo_exact_match(static, rows)
    result["answers_identical_to_fp32_graphs"] = float(np.mean([a == b for a, b in zip(answers_fp32, answers_static)]))

    # Tuning the decoder: (a) demo exact match, target 0.99; (b) prefill min logits cosine vs the fp32 decoder, 0.96.
    graph = "decoder_model_merged"
    src = fp32 / "onnx" / f"{graph}.onnx"
    feeds = calibration_feeds(fp32, graph)

    def exact_match_of(path: Path) -> float:
        return demo_exact_match(with_graphs(fp32, out / "candidates" / "artifact", {graph: path}), rows)[0]

    held_out = calibration_feeds(fp32, graph, source=EVAL_FILE, limit=8)
    reference_logits = [ort.InferenceSession(str(src)).run(["logits"], f)[0] for f in held_out]

    def cosine_of(path: Path) -> float:
        return min_logits_cosine(ort.InferenceSession(str(path)), held_out, reference_logits)

    result["tuning"] = {}
    for name, metric, target in (("exact_match", exact_match_of, 0.99), ("min_logits_cosine", cosine_of, 0.99)):
        info = tune_static_int8(src, quantized / f"{graph}_tuned_{name}.onnx", feeds, metric, target, progress=False)
        info["history"] = [{"trial": h["trial"], "metric": h["metric"]} for h in info["history"]]
        result["tuning"][name] = info
    # The gate again, with the decoder tuned to the gate's own cosine.
    tuned = with_graphs(fp32, out / "static-tuned", {
        "vision_encoder": quantized / "vision_encoder_int8_static.onnx",
        graph: quantized / f"{graph}_tuned_min_logits_cosine.onnx",
    })
    result["gate"]["int8-static-tuned"] = check_hop(OnnxPaliGemma(tuned, dtype="fp32"), reference, thresholds)
    result["exact_match"] = {"fp32_graphs": em_fp32, "int8_static": em_static, "change_points": round(100 * (em_static - em_fp32), 2)}
    return result


def run_graph(artifact: Path, graph: str, out: Path, limit: int, streamed: bool | None) -> dict:
    from pgexport.quantize.calibration import calibration_feeds
    from pgexport.quantize.static import quantize_static_int8

    started = time.perf_counter()
    feeds = calibration_feeds(artifact, graph, limit=limit)
    calibration_seconds = time.perf_counter() - started
    out.mkdir(parents=True, exist_ok=True)
    info = quantize_static_int8(artifact / "onnx" / f"{graph}.onnx", out / f"{graph}_int8_static.onnx", feeds, progress=False, streamed=streamed)
    info["calibration_seconds"] = round(calibration_seconds, 2)
    info["ratio"] = round(info["bytes_after"] / info["bytes_before"], 4)
    return {k: v for k, v in info.items() if k not in ("op_types", "fp32_nodes")} | {"fp32_nodes": len(info["fp32_nodes"])}


def run_compare(artifact: Path, candidate: Path, rows: int) -> dict:
    """One prefill of `rows` held-out demo prompts: the artifact's fp32 decoder, then `candidate`
    (each loaded alone, so a 3B pair never shares memory)."""
    import gc

    import onnxruntime as ort

    from pgexport.demo import EVAL_FILE
    from pgexport.quantize.calibration import calibration_feeds

    feeds = calibration_feeds(artifact, "decoder_model_merged", source=EVAL_FILE, limit=rows)
    result, logits = {}, {}
    for name, path in (("fp32", artifact / "onnx" / "decoder_model_merged.onnx"), ("candidate", candidate)):
        started = time.perf_counter()
        session = ort.InferenceSession(str(path))
        loaded = time.perf_counter()
        logits[name] = [session.run(["logits"], feed)[0][0] for feed in feeds]
        result[name] = {"load_seconds": round(loaded - started, 1), "prefill_seconds": round(time.perf_counter() - loaded, 1)}
        del session
        gc.collect()
    pairs = list(zip(logits["fp32"], logits["candidate"]))
    result["min_cosine_per_row"] = [
        float((np.sum(a * b, -1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))).min()) for a, b in pairs
    ]
    result["argmax_agreement_per_row"] = [float((a.argmax(-1) == b.argmax(-1)).mean()) for a, b in pairs]
    result["next_token_equal"] = [bool(a[-1].argmax() == b[-1].argmax()) for a, b in pairs]
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="mode", required=True)
    demo = sub.add_parser("demo")
    demo.add_argument("out", type=Path)
    one = sub.add_parser("graph")
    one.add_argument("artifact", type=Path)
    one.add_argument("graph", choices=GRAPHS)
    one.add_argument("out", type=Path)
    one.add_argument("--limit", type=int, default=32)
    one.add_argument("--streamed", action="store_true", default=None, help="force the streamed path (default: by size)")
    compare = sub.add_parser("compare")
    compare.add_argument("artifact", type=Path)
    compare.add_argument("candidate", type=Path, help="a decoder graph to compare with the artifact's fp32 one")
    compare.add_argument("--rows", type=int, default=2)
    args = parser.parse_args()
    if args.mode == "demo":
        result = run_demo(args.out)
    elif args.mode == "graph":
        result = run_graph(args.artifact, args.graph, args.out, args.limit, args.streamed)
    else:
        result = run_compare(args.artifact, args.candidate, args.rows)
    json.dump(result, sys.stdout, indent=1, default=str)
    print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
