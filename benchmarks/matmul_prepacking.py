"""What onnxruntime's `session.disable_prepacking` does to one MatMul of the 3B decoder's shape
(2048 x 16384) in fp32, dynamic int8 and 4-bit MatMulNBits (block 32, accuracy_level 4):
seconds per call at 1 and 256 rows, and the largest output difference between the two sessions.

    python benchmarks/matmul_prepacking.py

Results and reading: benchmarks/results/memory_3b.md ("The gate's sessions and prepacking")."""

import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper
from onnxruntime.quantization import QuantType, quantize_dynamic
from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

K, N, REPEATS = 2048, 16384, 5


def main(folder: Path) -> None:
    weight = np.random.default_rng(0).standard_normal((K, N)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["A", "W"], ["Y"])], "matmul",
        [helper.make_tensor_value_info("A", TensorProto.FLOAT, ["M", K])],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, ["M", N])], [numpy_helper.from_array(weight, "W")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.save(model, folder / "fp32.onnx")
    quantize_dynamic(folder / "fp32.onnx", folder / "int8.onnx", weight_type=QuantType.QInt8)
    q4 = MatMulNBitsQuantizer(model, block_size=32, is_symmetric=True, accuracy_level=4)
    q4.process()
    onnx.save(q4.model.model, folder / "q4.onnx")
    print(f"onnxruntime {ort.__version__}; one MatMul [M, {K}] x [{K}, {N}], median of {REPEATS} calls")
    print("| graph | rows | prepacked s | not prepacked s | ratio | max abs diff | largest output |")
    print("|---|---|---|---|---|---|---|")
    for name in ("fp32", "int8", "q4"):
        sessions = {}
        for prepack in (True, False):
            options = ort.SessionOptions()
            options.intra_op_num_threads = 2
            options.add_session_config_entry("session.disable_prepacking", "0" if prepack else "1")
            sessions[prepack] = ort.InferenceSession(str(folder / f"{name}.onnx"), options,
                                                     providers=["CPUExecutionProvider"])
        for rows in (1, 256):
            a = np.random.default_rng(rows).standard_normal((rows, K)).astype(np.float32)
            seconds, outputs = {}, {}
            for prepack, session in sessions.items():
                session.run(None, {"A": a})
                times = []
                for _ in range(REPEATS):
                    start = time.perf_counter()
                    outputs[prepack] = session.run(None, {"A": a})[0]
                    times.append(time.perf_counter() - start)
                seconds[prepack] = float(np.median(times))
            diff = float(np.abs(outputs[True] - outputs[False]).max())
            print(f"| {name} | {rows} | {seconds[True]:.4f} | {seconds[False]:.4f} | {seconds[False] / seconds[True]:.1f}x "
                  f"| {diff:.3g} | {float(np.abs(outputs[True]).max()):.1f} |")


if __name__ == "__main__":
    with tempfile.TemporaryDirectory() as scratch:
        main(Path(sys.argv[1]) if len(sys.argv) > 1 else Path(scratch))
