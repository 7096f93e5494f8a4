"""What the machine gives this process, measured in the same run as the targets: copy bandwidth,
matmul peaks per precision, and the environment (CPU, threads, memory, GPU, versions)."""

from __future__ import annotations

import contextlib
import os
import platform
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from pgexport.bench.measure import Clock

SIMD_FLAGS = ("avx2", "fma", "avx512f", "avx512bw", "avx512_vnni", "avx512_bf16", "amx_tile", "amx_int8", "amx_bf16")
COPY_BYTES = 256 << 20  # per buffer: far above any CPU cache, so the copy runs from memory
MATMUL_SIZE = {"cpu": 2048, "cuda": 8192}


def copy_bandwidth(device: str, threads: int, repeats: int = 6) -> dict:
    """Copy a buffer far larger than the caches; bytes read + written over the time. Best and median."""
    times = []
    if device == "cuda":
        import torch

        source = torch.ones((1 << 30) // 4, dtype=torch.float32, device="cuda")
        target = torch.empty_like(source)
        clock = Clock("cuda")
        for _ in range(repeats + 1):
            start = clock()
            target.copy_(source)
            times.append(clock() - start)
        nbytes, method = 2 * source.numel() * 4, "torch copy_ on the GPU, 1 GiB buffers"
    else:
        source = np.ones(COPY_BYTES // 4, np.float32)
        target = np.zeros_like(source)  # touched, so no page faults are timed
        edges = np.linspace(0, source.size, threads + 1).astype(int)
        bounds = list(zip(edges[:-1], edges[1:]))
        with ThreadPoolExecutor(threads) as pool:
            for _ in range(repeats + 1):
                start = time.perf_counter()
                list(pool.map(lambda b: np.copyto(target[b[0]:b[1]], source[b[0]:b[1]]), bounds))
                times.append(time.perf_counter() - start)
        nbytes, method = 2 * source.nbytes, f"numpy copyto over {threads} threads, {COPY_BYTES >> 20} MiB buffers"
    times = times[1:]
    return {"gbps_best": nbytes / min(times) / 1e9, "gbps_median": nbytes / float(np.median(times)) / 1e9,
            "bytes_per_copy": nbytes, "repeats": repeats, "method": method}


def _time_best(fn, repeats: int, clock) -> tuple[float, float]:
    fn()
    times = []
    for _ in range(repeats):
        start = clock()
        fn()
        times.append(clock() - start)
    return min(times), float(np.median(times))


def matmul_peaks(device: str, threads: int, repeats: int = 3) -> dict:
    """Square matmul throughput per precision, in GFLOP/s (best and median).

    CPU: fp32 with numpy and torch (the better is the peak), int8 with onnxruntime's MatMulInteger
    (the kernel the dynamic int8 graphs use). CUDA: torch fp32, bf16 and fp16."""
    import torch

    n = MATMUL_SIZE[device]
    flops = 2 * n**3
    peaks = {}

    def record(name, method, fn, clock=time.perf_counter):
        best, median = _time_best(fn, repeats, clock)
        peaks[name] = {"gflops_best": flops / best / 1e9, "gflops_median": flops / median / 1e9, "n": n, "method": method}

    if device == "cuda":
        for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16), ("fp16", torch.float16)):
            a = torch.randn(n, n, device="cuda", dtype=dtype)
            record(name, f"torch {name} matmul on the GPU", lambda a=a: a @ a, Clock("cuda"))
        return peaks
    a = np.random.default_rng(0).standard_normal((n, n), dtype=np.float32)
    record("fp32_numpy", "numpy matmul (BLAS)", lambda: a @ a)
    with torch_threads(threads):
        ta = torch.from_numpy(a)
        record("fp32_torch", f"torch matmul, {threads} threads", lambda: ta @ ta)
    peaks["fp32"] = max((peaks["fp32_numpy"], peaks["fp32_torch"]), key=lambda p: p["gflops_best"])
    peaks["int8"] = _ort_int8_peak(n, threads, repeats)
    return peaks


def _ort_int8_peak(n: int, threads: int, repeats: int) -> dict:
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    weight = numpy_helper.from_array(rng.integers(-128, 127, (n, n), dtype=np.int8), "B")
    graph = helper.make_graph(
        [helper.make_node("MatMulInteger", ["A", "B"], ["Y"])], "int8_peak",
        [helper.make_tensor_value_info("A", TensorProto.UINT8, [n, n])],
        [helper.make_tensor_value_info("Y", TensorProto.INT32, [n, n])], [weight],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    a = rng.integers(0, 255, (n, n), dtype=np.uint8)
    best, median = _time_best(lambda: session.run(None, {"A": a}), repeats, time.perf_counter)
    flops = 2 * n**3
    return {"gflops_best": flops / best / 1e9, "gflops_median": flops / median / 1e9, "n": n,
            "method": f"onnxruntime MatMulInteger u8 x s8, {threads} threads"}


@contextlib.contextmanager
def torch_threads(threads: int):
    """torch's intra-op thread count for the duration, restored after."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def environment(device: str, threads: int) -> dict:
    """CPU model and flags, threads, memory, GPU, versions."""
    import onnxruntime as ort

    from pgexport.manifest import versions

    cpuinfo = {}
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():  # the first processor's entries
            key, _, value = line.partition(":")
            cpuinfo.setdefault(key.strip(), value.strip())
    cpu = {"model": cpuinfo.get("model name") or platform.processor() or platform.machine(),
           "flags": cpuinfo.get("flags", "").split()}
    memory = None
    with contextlib.suppress(OSError, ValueError, IndexError):
        memory = int(Path("/proc/meminfo").read_text().split("\n")[0].split()[1]) * 1024
    env = {
        "cpu": {**cpu, "simd": [flag for flag in SIMD_FLAGS if flag in cpu["flags"]], "logical_cpus": os.cpu_count(),
                "usable_cpus": len(os.sched_getaffinity(0))},
        "memory_bytes": memory,
        "threads": threads,
        "device": device,
        "platform": platform.platform(),
        "versions": versions(),
        "onnxruntime_providers": ort.get_available_providers(),
    }
    with contextlib.suppress(ImportError):
        import matplotlib

        env["versions"]["matplotlib"] = matplotlib.__version__
    if device == "cuda":
        import torch

        props = torch.cuda.get_device_properties(0)
        env["gpu"] = {"name": props.name, "memory_bytes": props.total_memory, "capability": f"{props.major}.{props.minor}",
                      "cuda": torch.version.cuda}
    return env


def probe_hardware(device: str, threads: int) -> dict:
    return {"copy_bandwidth": copy_bandwidth(device, threads), "matmul": matmul_peaks(device, threads)}


def best_of(probes: list[dict]) -> dict:
    """The best copy bandwidth and the best peak per precision over several probes."""
    best = {"copy_bandwidth": max((p["copy_bandwidth"] for p in probes), key=lambda c: c["gbps_best"]), "matmul": {}}
    for name in probes[0]["matmul"]:
        best["matmul"][name] = max((p["matmul"][name] for p in probes), key=lambda m: m["gflops_best"])
    return best


def probe_summary(probe: dict) -> dict:
    """A probe in three numbers: how much of the machine this process got at that moment."""
    return {"copy_gbps": probe["copy_bandwidth"]["gbps_best"],
            **{f"{name}_gflops": m["gflops_best"] for name, m in probe["matmul"].items() if "_" not in name}}


