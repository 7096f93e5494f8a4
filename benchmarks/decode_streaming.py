"""Is a q4 decode step bound by memory or by the kernel? One-row matmuls through a stack of the 3B
decoder's MLP shapes (2048 x 16384 then 16384 x 2048, repeated: far larger than any cache), in
fp32, dynamic int8 and 4-bit MatMulNBits (accuracy_level 4, block 32 and 128), at 1 and 2 threads,
beside the read-only bandwidth of the same machine (torch sum of a 1 GiB tensor).

    python benchmarks/decode_streaming.py [--pairs 6] [--repeats 15]

A kernel that streams its weights at the memory's rate gains little from a second thread once one
thread already saturates the bus; one limited by its own arithmetic (unpacking 4-bit blocks,
per-block scales) speeds up about 2x. Printed: weight GB/s = the graph's initializer bytes /
median seconds per call. Results and reading: benchmarks/results/q4_profile_intel.md."""

from __future__ import annotations

import argparse
import logging
import platform
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
from onnx import TensorProto, helper, numpy_helper
from onnxruntime.quantization import QuantType, quantize_dynamic
from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

HIDDEN, MLP = 2048, 16384


def stack(pairs: int) -> onnx.ModelProto:
    """A -> (up, down) x pairs: every weight read once per call, like a decode step's MLPs."""
    rng = np.random.default_rng(0)
    nodes, weights, name = [], [], "A"
    for i in range(2 * pairs):
        shape = (HIDDEN, MLP) if i % 2 == 0 else (MLP, HIDDEN)
        weights.append(numpy_helper.from_array((rng.standard_normal(shape) * 0.02).astype(np.float32), f"W{i}"))
        nodes.append(helper.make_node("MatMul", [name, f"W{i}"], [f"Y{i}"]))
        name = f"Y{i}"
    graph = helper.make_graph(nodes, "stack", [helper.make_tensor_value_info("A", TensorProto.FLOAT, [1, HIDDEN])],
                              [helper.make_tensor_value_info(name, TensorProto.FLOAT, [1, HIDDEN])], weights)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def build(folder: Path, pairs: int) -> dict[str, Path]:
    model = stack(pairs)
    paths = {"fp32": folder / "fp32.onnx", "int8": folder / "int8.onnx"}
    onnx.save(model, paths["fp32"], save_as_external_data=True, location="fp32.data")
    quantize_dynamic(paths["fp32"], paths["int8"], weight_type=QuantType.QInt8)
    for block in (32, 128):
        quantizer = MatMulNBitsQuantizer(onnx.load(paths["fp32"]), block_size=block, is_symmetric=True, accuracy_level=4)
        quantizer.process()
        paths[f"q4 b{block}"] = folder / f"q4b{block}.onnx"
        onnx.save(quantizer.model.model, paths[f"q4 b{block}"])
    return paths


def weight_bytes(path: Path) -> int:
    model = onnx.load(path)
    return sum(numpy_helper.to_array(t, base_dir=str(path.parent)).nbytes for t in model.graph.initializer)


def per_call(path: Path, threads: int, repeats: int) -> float:
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    a = np.random.default_rng(1).standard_normal((1, HIDDEN)).astype(np.float32)
    for _ in range(3):
        session.run(None, {"A": a})
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        session.run(None, {"A": a})
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def read_bandwidth(threads: int, repeats: int) -> float:
    torch.set_num_threads(threads)
    data = torch.ones((1 << 30) // 4, dtype=torch.float32)
    data.sum()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        data.sum()
        times.append(time.perf_counter() - start)
    return data.nbytes / statistics.median(times) / 1e9


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pairs", type=int, default=6, help="(up, down) pairs in the stack (default 6: 403 M weights)")
    parser.add_argument("--repeats", type=int, default=15)
    args = parser.parse_args()
    logging.getLogger("onnxruntime.quantization").setLevel(logging.WARNING)
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    print(f"{cpu}; onnxruntime {ort.__version__}, torch {torch.__version__}; {2 * args.pairs} matmuls of "
          f"{HIDDEN} x {MLP} / {MLP} x {HIDDEN}, 1 row; median of {args.repeats} calls")
    reads = {t: read_bandwidth(t, args.repeats) for t in (1, 2)}
    print(f"read-only bandwidth (torch sum of 1 GiB): {reads[1]:.1f} GB/s at 1 thread, {reads[2]:.1f} at 2")
    print("| graph | weight MB | ms per call, 1 thread | 2 threads | 2-thread speedup | weight GB/s at 2 threads | x read bandwidth |")
    print("|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as scratch:
        for name, path in build(Path(scratch), args.pairs).items():
            size = weight_bytes(path)
            seconds = {t: per_call(path, t, args.repeats) for t in (1, 2)}
            rate = size / seconds[2] / 1e9
            print(f"| {name} | {size / 1e6:.0f} | {1000 * seconds[1]:.1f} | {1000 * seconds[2]:.1f} "
                  f"| {seconds[1] / seconds[2]:.2f}x | {rate:.1f} | {reads[2] / rate:.2f}x |")


if __name__ == "__main__":
    main()
