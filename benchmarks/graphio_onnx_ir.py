"""pgexport's hand-written streamed graph writer (pgexport/graphio) against onnx-ir's load/save, on a
decoder with PaliGemma-1 3B's per-layer shapes (fewer layers) and its LM head, random weights.

    python benchmarks/graphio_onnx_ir.py build FOLDER [--layers 2]   # FOLDER/decoder.onnx(+.data)
    python benchmarks/graphio_onnx_ir.py STEP SRC DST                # one step, timed by the caller

Steps (each run alone under `/usr/bin/time -v` for wall time and peak RSS, benchmarks/results/graphio.md):
  copy-graphio    every tensor copied through into a new external data file (write_graph, no producer)
  copy-graphio-nofsync  the same without the fsync that write_graph does before renaming into place
  copy-onnx-ir    onnx_ir.load + onnx_ir.save(external_data=...) (onnx-ir does not fsync)
  inline-graphio  an external-data graph written as one .onnx (write_inline, tensor by tensor)
  inline-onnx-ir  onnx_ir.load + external_data.load_to_model + onnx_ir.save (one proto in memory)
  int8-graphio    quantize_dynamic_int8, the whole pass (rewrite + streamed write)
  load-onnx       onnx.load(load_external_data=False), the structure every pass starts from
  load-onnx-ir    onnx_ir.load (structure; weights stay in the file, mapped on access)
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

HIDDEN, HEAD_DIM, HEADS, KV_HEADS, MLP, VOCAB = 2048, 256, 8, 1, 16384, 257216  # PaliGemma-1 3B (Gemma 2B)


def build(folder: Path, layers: int) -> Path:
    """decoder.onnx: per layer the attention and MLP projections of the 3B decoder (q, k, v, o,
    gate, up, down) and two norm scales, then the [hidden, vocab] LM head; weights written to
    decoder.onnx.data one tensor at a time (random normals, float32)."""
    from onnx import TensorProto, helper

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    data_name = "decoder.onnx.data"
    initializers, nodes, outputs = [], [], []
    with open(folder / data_name, "wb") as data:

        def weight(name: str, shape: tuple[int, ...]) -> str:
            offset = data.tell()
            rows = max(1, (64 << 20) // (4 * shape[-1]))
            for r0 in range(0, shape[0], rows):
                n = min(rows, shape[0] - r0)
                data.write((rng.standard_normal((n, *shape[1:]), dtype=np.float32) * 0.02).tobytes())
            tensor = TensorProto(name=name, data_type=TensorProto.FLOAT, dims=list(shape), data_location=TensorProto.EXTERNAL)
            for key, value in (("location", data_name), ("offset", str(offset)), ("length", str(data.tell() - offset))):
                tensor.external_data.add(key=key, value=value)
            initializers.append(tensor)
            data.write(b"\0" * (-data.tell() % 4096))
            return name

        x = "inputs_embeds"
        for i in range(layers):
            p = f"layers.{i}."
            nodes.append(helper.make_node("Mul", [x, weight(p + "input_norm", (HIDDEN,))], [p + "normed"]))
            for kind, width in (("q", HEADS * HEAD_DIM), ("k", KV_HEADS * HEAD_DIM), ("v", KV_HEADS * HEAD_DIM)):
                nodes.append(helper.make_node("MatMul", [p + "normed", weight(p + kind + "_proj", (HIDDEN, width))], [p + kind], p + kind))
            outputs += [p + "k", p + "v"]
            nodes.append(helper.make_node("MatMul", [p + "q", weight(p + "o_proj", (HEADS * HEAD_DIM, HIDDEN))], [p + "attn"], p + "o"))
            nodes.append(helper.make_node("Add", [x, p + "attn"], [p + "residual"]))
            nodes.append(helper.make_node("Mul", [p + "residual", weight(p + "post_norm", (HIDDEN,))], [p + "normed2"]))
            for kind in ("gate", "up"):
                nodes.append(helper.make_node("MatMul", [p + "normed2", weight(p + kind + "_proj", (HIDDEN, MLP))], [p + kind], p + kind))
            nodes.append(helper.make_node("Mul", [p + "gate", p + "up"], [p + "act"]))
            nodes.append(helper.make_node("MatMul", [p + "act", weight(p + "down_proj", (MLP, HIDDEN))], [p + "mlp"], p + "down"))
            nodes.append(helper.make_node("Add", [p + "residual", p + "mlp"], [p + "out"]))
            x = p + "out"
        nodes.append(helper.make_node("MatMul", [x, weight("lm_head", (HIDDEN, VOCAB))], ["logits"], "lm_head"))
    f32 = TensorProto.FLOAT
    graph = helper.make_graph(nodes, "decoder", [helper.make_tensor_value_info("inputs_embeds", f32, ["batch", "seq", HIDDEN])],
                              [helper.make_tensor_value_info(n, f32, None) for n in ["logits", *outputs]], initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=10)
    (folder / "decoder.onnx").write_bytes(model.SerializeToString())
    return folder / "decoder.onnx"


def run(step: str, src: Path, dst: Path) -> None:
    import onnx
    import onnx_ir as ir

    dst.parent.mkdir(parents=True, exist_ok=True)
    if step in ("copy-graphio", "copy-graphio-nofsync", "inline-graphio"):
        import os

        from pgexport.graphio.read import Source, load_structure
        from pgexport.graphio.write import write_graph

        if step.endswith("nofsync"):
            os.fsync = lambda fd: None
        model = load_structure(src)
        write_graph(model, Source(src.parent), dst, {}, external_data=step.startswith("copy"))
    elif step == "copy-onnx-ir":
        ir.save(ir.load(str(src)), str(dst), external_data=dst.name + ".data")
    elif step == "inline-onnx-ir":  # save() keeps external tensors external: load them first
        model = ir.load(str(src))
        ir.external_data.load_to_model(model)
        ir.save(model, str(dst))
    elif step == "int8-graphio":
        from pgexport.quantize.int8 import quantize_dynamic_int8

        quantize_dynamic_int8(src, dst, progress=False)
    elif step == "load-onnx":
        for _ in range(5):
            onnx.load(str(src), load_external_data=False)
    elif step == "load-onnx-ir":
        for _ in range(5):
            ir.load(str(src))
    else:
        raise SystemExit(f"unknown step {step}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("step")
    parser.add_argument("paths", nargs="+", type=Path)
    parser.add_argument("--layers", type=int, default=2)
    args = parser.parse_args()
    started = time.perf_counter()
    if args.step == "build":
        print(build(args.paths[0], args.layers))
    else:
        run(args.step, *args.paths)
    print(f"{args.step}: {time.perf_counter() - started:.2f} s")


if __name__ == "__main__":
    main()
