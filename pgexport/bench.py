"""Latency benchmarks: ONNX Runtime artifacts and PyTorch checkpoints on the same inputs, in one run.

    bench(targets, ...) -> report       (`pgexport bench TARGET...` mirrors it option for option)

Stages: measure the hardware (copy bandwidth, matmul peaks) -> for each (target, dtype,
resolution): load -> for each batch: warm up, then time `runs` greedy generations -> derive
percentiles, tokens/s, physical floors, ratios to the baseline -> write JSON, markdown, plot.

A target is an artifact folder (ONNX Runtime, each dtype it has) or a checkpoint folder
(transformers' PaliGemmaForConditionalGeneration: eager; on CUDA also the static-cache path that
transformers compiles). Inputs are arrays made here from the model's config (seeded random
pixels, the image tokens, `prompt_tokens` text tokens), so the processor is never timed.
Generation never stops at eos: every run makes exactly `new_tokens` tokens per row.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import json
import os
import platform
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from pgexport.errors import BadInputError, UnsupportedError

SCHEMA = "pgexport-bench/1"
TORCH_DTYPES = ("fp32", "bf16", "fp16")
LATENCY_ONLY = "latency-only (untrained at this size)"
SIMD_FLAGS = ("avx2", "fma", "avx512f", "avx512bw", "avx512_vnni", "avx512_bf16", "amx_tile", "amx_int8", "amx_bf16")
COPY_BYTES = 256 << 20  # per buffer: far above any CPU cache, so the copy runs from memory
MATMUL_SIZE = {"cpu": 2048, "cuda": 8192}


# ----------------------------------------------------------------------------------------- settings


@dataclass(frozen=True)
class Settings:
    """One benchmark's options (the keyword arguments of `bench`, validated)."""

    device: str = "cpu"
    dtypes: tuple[str, ...] | None = None
    batches: tuple[int, ...] = (1, 4)
    resolutions: tuple[int, ...] | None = None
    prompt_tokens: int = 10
    new_tokens: int = 16
    warmup: int = 1
    runs: int = 3
    threads: int | None = None
    prefill_rows: int = 0
    seed: int = 0

    def __post_init__(self):
        if self.device not in ("cpu", "cuda"):
            raise BadInputError(f"device {self.device!r}: choose cpu or cuda")
        checks = {
            "batch": all(b >= 1 for b in self.batches) and bool(self.batches),
            "prompt_tokens": self.prompt_tokens >= 1,
            "new_tokens": self.new_tokens >= 2,  # the first comes from prefill; at least one decode step
            "warmup": self.warmup >= 0,
            "runs": self.runs >= 1,
            "prefill_rows": self.prefill_rows >= 0,
            "threads": self.threads is None or self.threads >= 1,
            "resolutions": self.resolutions is None or (bool(self.resolutions) and all(r > 0 for r in self.resolutions)),
        }
        bad = [name for name, ok in checks.items() if not ok]
        if bad:
            raise BadInputError(f"invalid bench option(s): {', '.join(bad)} (new_tokens >= 2, runs >= 1, sizes > 0)")

    @property
    def thread_count(self) -> int:
        return self.threads or len(os.sched_getaffinity(0))


@dataclass
class Target:
    """A folder to benchmark, classified once, before anything runs."""

    path: Path
    name: str  # as the user gave it
    kind: str  # "artifact" or "checkpoint"
    config: dict
    dtypes: tuple[str, ...]  # what the folder offers
    latency_only: str | None = None  # set on checkpoints resized by `resize_checkpoint`

    @property
    def native_resolution(self) -> int:
        return int(self.config["vision_config"]["image_size"])


def resolve_target(target: str | Path) -> Target:
    """Classify `target` as an artifact or a checkpoint folder, or raise BadInputError (exit 4)."""
    path = Path(target)
    config_path = path / "config.json"
    if not path.is_dir() or not config_path.is_file():
        raise BadInputError(f"{target}: not an artifact folder nor a PaliGemma checkpoint folder (no config.json)")
    try:
        config = json.loads(config_path.read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise BadInputError(f"{config_path}: unreadable ({error})") from error
    if config.get("model_type") != "paligemma":
        raise BadInputError(f"{target}: model_type is {config.get('model_type')!r}, not paligemma")
    latency_only = config.get("pgexport_variant")
    if (path / "manifest.json").is_file() and (path / "onnx").is_dir():
        from pgexport.manifest import read_manifest

        manifest = read_manifest(path)
        return Target(path, str(target), "artifact", config, tuple(manifest.get("dtypes", ["fp32"])), latency_only)
    if any(path.glob("*.safetensors")):
        return Target(path, str(target), "checkpoint", config, TORCH_DTYPES, latency_only)
    raise BadInputError(f"{target}: neither an artifact (manifest.json + onnx/) nor a checkpoint (*.safetensors)")


# ------------------------------------------------------------------------------------- measurement


def summarize(samples: list[float]) -> dict:
    """Percentiles and spread of a list of seconds."""
    values = np.asarray(samples, dtype=np.float64)
    p50, p90, p99 = np.percentile(values, [50, 90, 99])
    return {
        "p50": float(p50), "p90": float(p90), "p99": float(p99), "mean": float(values.mean()),
        "min": float(values.min()), "max": float(values.max()), "stdev": float(values.std()), "n": int(values.size),
    }


class Clock:
    """perf_counter that first waits for the GPU, so a timer never stops before the work does."""

    def __init__(self, device: str):
        self.sync = None
        if device == "cuda":
            import torch

            self.sync = torch.cuda.synchronize

    def __call__(self) -> float:
        if self.sync:
            self.sync()
        return time.perf_counter()


def reset_peak_rss() -> bool:
    """Reset the kernel's resident-set high-water mark (VmHWM) to the current RSS."""
    release_freed_memory()  # give freed heap back first, so the reset starts low
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
        return True
    except OSError:
        return False


def peak_rss_bytes() -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return 0


@dataclass
class Timing:
    """One generation's clock readings, in seconds."""

    vision: float
    prefill: float  # from the image features to the first token's logits (embedding, merge, decoder)
    ttft: float
    steps: list[float]  # each decode step after the first token


def make_inputs(config: dict, batch: int, prompt_tokens: int, resolution: int, seed: int = 0) -> dict[str, np.ndarray]:
    """Processor-shaped arrays: pixels in [-1, 1], `<image>` x n_img + bos + random text tokens."""
    rng = np.random.default_rng(seed)
    patch = int(config["vision_config"]["patch_size"])
    image_tokens = (resolution // patch) ** 2
    image_id = int(config["image_token_index"])
    vocab = int(config["text_config"]["vocab_size"])
    bos = int(config["text_config"].get("bos_token_id", 2) or 2)
    text = rng.integers(3, vocab, size=(batch, prompt_tokens))
    text[text == image_id] = 3
    text[:, 0] = bos
    input_ids = np.concatenate([np.full((batch, image_tokens), image_id), text], axis=1).astype(np.int64)
    pixels = rng.uniform(-1, 1, size=(batch, 3, resolution, resolution)).astype(np.float32)
    return {"input_ids": input_ids, "attention_mask": np.ones_like(input_ids), "pixel_values": pixels}


def kv_cache_bytes(config: dict, batch: int, context: float, itemsize: int) -> int:
    """Bytes of keys and values a decode step reads at `context` past positions."""
    text = config["text_config"]
    head_dim = text.get("head_dim") or text["hidden_size"] // text["num_attention_heads"]
    per_position = 2 * text["num_hidden_layers"] * text["num_key_value_heads"] * head_dim * itemsize
    return int(batch * context * per_position)


# ----------------------------------------------------------------------------------------- runners


class OnnxRunner:
    """An artifact on ONNX Runtime; the decode loop of `pgexport.runtime`, timed stage by stage."""

    engine = "onnxruntime"

    def __init__(self, target: Target, dtype: str, settings: Settings):
        import onnxruntime as ort

        from pgexport.runtime import OnnxPaliGemma, graph_path

        providers = ["CPUExecutionProvider"]
        if settings.device == "cuda":
            if "CUDAExecutionProvider" not in ort.get_available_providers():
                raise UnsupportedError("onnxruntime has no CUDA execution provider here (install onnxruntime-gpu)")
            providers = ["CUDAExecutionProvider", "CPUExecutionProvider"]
        self.model = OnnxPaliGemma(target.path, dtype=dtype, providers=providers, threads=settings.thread_count,
                                   prefill_rows=settings.prefill_rows)
        decoder = graph_path(target.path, "decoder_model_merged", dtype)
        self.weight_bytes, _, self.matmul_precision = graph_weight_stats(
            decoder if decoder.is_file() else graph_path(target.path, "decoder_model_merged", "fp32"))
        _, self.decoder_params, _ = graph_weight_stats(graph_path(target.path, "decoder_model_merged", "fp32"))
        self.kv_itemsize = np.dtype(self.model.float_type).itemsize

    def run(self, inputs: dict, new_tokens: int, clock: Clock) -> Timing:
        from pgexport.runtime import left_pad_positions

        model, sessions = self.model, self.model.sessions
        decoder, embed = sessions["decoder_model_merged"], sessions["embed_tokens"]
        input_ids, batch = inputs["input_ids"], inputs["input_ids"].shape[0]
        start = clock()
        features = sessions["vision_encoder"].run(None, {"pixel_values": inputs["pixel_values"].astype(model.float_type)})[0]
        vision_done = clock()
        slots = input_ids == model.image_token_id
        embeds = embed.run(None, {"input_ids": np.where(slots, 0, input_ids)})[0]
        embeds[slots] = features.reshape(-1, features.shape[-1]).astype(embeds.dtype)
        mask = inputs["attention_mask"].astype(np.int64)
        past = {i.name: np.zeros((batch, i.shape[1], 0, i.shape[3]), model.float_type) for i in model.past_inputs}
        feed = {"inputs_embeds": embeds.astype(model.float_type), "attention_mask": mask, "position_ids": left_pad_positions(mask)}
        if any(i.name == "logits_to_keep" for i in decoder.get_overridable_initializers()):
            feed["logits_to_keep"] = np.array(1, np.int64)  # LM head on the last prompt position only
        outputs = model.run_prefill({**feed, **past})
        token = outputs[0][:, -1].argmax(-1)
        first = clock()
        steps = []
        for _ in range(new_tokens - 1):
            step_start = clock()
            past = {i.name: value for i, value in zip(model.past_inputs, outputs[1:])}
            mask = np.concatenate([mask, np.ones((batch, 1), np.int64)], axis=1)
            embeds = embed.run(None, {"input_ids": token[:, None].astype(np.int64)})[0]
            feed = {"inputs_embeds": embeds.astype(model.float_type), "attention_mask": mask,
                    "position_ids": mask.sum(-1, keepdims=True)}
            outputs = decoder.run(None, {**feed, **past})
            token = outputs[0][:, -1].argmax(-1)
            steps.append(clock() - step_start)
        return Timing(vision_done - start, first - vision_done, first - start, steps)


class TorchRunner:
    """A checkpoint on transformers' `generate` (greedy). Hooks stamp the clock around the vision
    tower and projector inside generate's prefill, and a logits processor after each forward pass,
    so vision, prefill and every token are timed within one ordinary generate call."""

    def __init__(self, target: Target, dtype: str, settings: Settings, static_cache: bool = False):
        import torch
        from transformers import PaliGemmaForConditionalGeneration

        from pgexport.errors import BadModelError

        self.torch, self.device, self.static_cache = torch, settings.device, static_cache
        self.engine = "pytorch-static-compiled" if static_cache else "pytorch-eager"
        self.dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[dtype]
        try:
            with quiet_transformers():
                model = PaliGemmaForConditionalGeneration.from_pretrained(target.path, dtype=self.dtype, use_safetensors=True)
        except (OSError, ValueError, RuntimeError) as error:
            raise BadModelError(f"{target.name}: cannot load: {str(error).strip().splitlines()[0]}") from error
        self.model = model.eval().to(settings.device)
        unique = {p.data_ptr(): p for p in [*self.model.model.language_model.parameters(), self.model.lm_head.weight]}
        self.decoder_params = sum(p.numel() for p in unique.values())  # the tied LM head counts once
        self.weight_bytes = sum(p.numel() * p.element_size() for p in unique.values())
        self.kv_itemsize = self.model.lm_head.weight.element_size()
        self.matmul_precision = dtype
        self.clock, self.stamps = Clock(settings.device), {}
        self.model.model.vision_tower.register_forward_pre_hook(self._stamp("vision_start"))
        self.model.model.multi_modal_projector.register_forward_hook(self._stamp("vision_end"))

    def _stamp(self, name: str):
        def hook(*_):  # returns None: the module's inputs and outputs stay as they are
            self.stamps.setdefault(name, self.clock())

        return hook

    def tensors(self, inputs: dict) -> dict:
        """The arrays of `make_inputs` as `generate`'s tensors on the runner's device."""
        tensors = {key: self.torch.from_numpy(value).to(self.device) for key, value in inputs.items()}
        tensors["pixel_values"] = tensors["pixel_values"].to(self.dtype)
        tensors["token_type_ids"] = self.torch.zeros_like(tensors["input_ids"])  # the whole prompt is the prefix
        return tensors

    def generate(self, tensors: dict, new_tokens: int, logits_processors=()) -> None:
        """One greedy `generate` call of exactly `new_tokens` tokens."""
        from transformers import GenerationConfig, LogitsProcessorList

        torch, model = self.torch, self.model
        config = GenerationConfig(
            max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, eos_token_id=None,
            pad_token_id=model.generation_config.pad_token_id, bos_token_id=model.generation_config.bos_token_id,
            cache_implementation="static" if self.static_cache else None,
        )
        with torch.inference_mode():
            model.generate(**tensors, generation_config=config, logits_processor=LogitsProcessorList(list(logits_processors)))

    def run(self, inputs: dict, new_tokens: int, clock: Clock) -> Timing:
        from transformers import LogitsProcessor

        stamps = []

        class StepTimer(LogitsProcessor):
            """Called once per new token, right after the forward pass that produced its logits."""

            def __call__(self, input_ids, scores):
                stamps.append(clock())
                return scores

        tensors = self.tensors(inputs)
        self.clock, self.stamps = clock, {}
        start = clock()
        self.generate(tensors, new_tokens, [StepTimer()])
        vision_start, vision_end = self.stamps["vision_start"], self.stamps["vision_end"]
        return Timing(vision_end - vision_start, stamps[0] - vision_end, stamps[0] - start, list(np.diff(stamps)))


def graph_weight_stats(path: Path) -> tuple[int, int, str]:
    """(bytes, floating-point elements, matmul arithmetic) of a graph's initializers, read without
    their external data. The arithmetic is "int8" where the MatMuls compute in int8 (dynamic or
    static int8; 4-bit MatMulNBits at accuracy_level 4 quantizes its activations too), else "fp32"."""
    import onnx

    floating = {onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16, onnx.TensorProto.DOUBLE}
    graph = onnx.load(str(path), load_external_data=False).graph
    total = params = 0
    for tensor in graph.initializer:
        count = int(np.prod(tensor.dims)) if len(tensor.dims) else 1
        total += count * np.dtype(onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type)).itemsize
        params += count if tensor.data_type in floating else 0
    int8_ops = {"MatMulInteger", "DynamicQuantizeMatMul", "QLinearMatMul", "QuantizeLinear"}
    nbits_level = {a.i for n in graph.node if n.op_type == "MatMulNBits" for a in n.attribute if a.name == "accuracy_level"}
    int8 = any(n.op_type in int8_ops for n in graph.node) or nbits_level == {4}
    return total, params, "int8" if int8 else "fp32"


def gpu_memory_used() -> int:
    import torch

    free, total = torch.cuda.mem_get_info()
    return total - free


# ---------------------------------------------------------------------------------------- hardware


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
def quiet_transformers():
    """No tqdm bar from transformers while loading (it would break through the bench's own bar)."""
    from transformers.utils import logging

    enabled = logging.is_progress_bar_enabled()
    logging.disable_progress_bar()
    try:
        yield
    finally:
        if enabled:
            logging.enable_progress_bar()


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


# -------------------------------------------------------------------------------------- variants


def resize_checkpoint(checkpoint: str | Path, output: str | Path, resolution: int) -> Path:
    """Write a copy of `checkpoint` at `resolution` px: SigLIP's position embeddings interpolated
    (bicubic, transformers' own `interpolate_pos_encoding`), the processor resized to match.

    The copy is for latency only: the model was never trained at this size. Its config says so
    (`pgexport_variant`), and an artifact exported from it carries that config along.
    """
    import torch
    from transformers import AutoProcessor, PaliGemmaForConditionalGeneration

    with quiet_transformers():
        model = PaliGemmaForConditionalGeneration.from_pretrained(checkpoint, dtype=torch.float32, use_safetensors=True)
    tower = model.model.vision_tower
    embeddings = getattr(tower, "vision_model", tower).embeddings
    patch, native = embeddings.patch_size, embeddings.image_size
    if resolution % patch:
        raise BadInputError(f"resolution {resolution} is not a multiple of the patch size {patch}")
    positions = (resolution // patch) ** 2
    with torch.no_grad():
        probe = torch.zeros(1, positions, embeddings.embed_dim)
        weight = embeddings.interpolate_pos_encoding(probe, resolution, resolution)[0].clone()
    embeddings.position_embedding = torch.nn.Embedding.from_pretrained(weight, freeze=False)
    embeddings.image_size, embeddings.num_patches, embeddings.num_positions = resolution, positions, positions
    embeddings.position_ids = torch.arange(positions).expand((1, -1))
    model.config.vision_config.image_size = resolution
    model.config.text_config.num_image_tokens = positions
    model.config.pgexport_variant = f"{LATENCY_ONLY}: position embeddings interpolated from {native} to {resolution} px"
    output = Path(output)
    with quiet_transformers():
        model.save_pretrained(output)
    model.generation_config.save_pretrained(output)
    processor = AutoProcessor.from_pretrained(checkpoint)
    processor.image_processor.size = {"height": resolution, "width": resolution}
    processor.image_processor.image_seq_length = positions
    processor.image_seq_length = positions
    processor.save_pretrained(output)
    return output


# ------------------------------------------------------------------------------------------ spine


@dataclass
class Job:
    """One loaded model to time: a target in one precision and engine, at one resolution."""

    target: Target
    dtype: str
    engine: str  # onnxruntime, pytorch-eager, pytorch-static-compiled
    resolution: int
    label: str = field(init=False)

    def __post_init__(self):
        suffix = f"@{self.resolution}" if self.target.latency_only else ""
        self.label = f"{self.target.name}{suffix} [{self.engine} {self.dtype}]"


def plan_jobs(targets: list[Target], settings: Settings, workdir: Path) -> tuple[list[Job], list[dict]]:
    """Every (target, dtype, engine, resolution) to run, and what was skipped with its reason."""
    jobs, skipped = [], []
    for target in targets:
        resolutions = settings.resolutions or (target.native_resolution,)
        for resolution in resolutions:
            resolved = target
            if resolution != target.native_resolution:
                if target.kind == "artifact":
                    skipped.append({"target": target.name, "resolution": resolution, "reason":
                                    f"artifact graphs are fixed at {target.native_resolution} px; export a resized checkpoint "
                                    "(pgexport.bench.resize_checkpoint, then pgexport onnx --no-validate)"})
                    continue
                folder = resize_checkpoint(target.path, workdir / f"{len(jobs)}-{resolution}", resolution)
                resolved = Target(folder, target.name, "checkpoint", json.loads((folder / "config.json").read_text()),
                                  TORCH_DTYPES, LATENCY_ONLY)
            if target.kind == "artifact":
                for dtype in settings.dtypes or target.dtypes:
                    if dtype in target.dtypes:
                        jobs.append(Job(resolved, dtype, "onnxruntime", resolution))
                    else:
                        skipped.append({"target": target.name, "dtype": dtype,
                                        "reason": f"artifact has no {dtype} graphs (has {', '.join(target.dtypes)})"})
            else:  # the PyTorch reference: the requested torch precisions, or the device's usual one
                wanted = [d for d in (settings.dtypes or ()) if d in TORCH_DTYPES]
                for dtype in wanted or ["bf16" if settings.device == "cuda" else "fp32"]:
                    jobs.append(Job(resolved, dtype, "pytorch-eager", resolution))
                    if settings.device == "cuda":
                        jobs.append(Job(resolved, dtype, "pytorch-static-compiled", resolution))
    return jobs, skipped


def load_runner(job: Job, settings: Settings):
    if job.engine == "onnxruntime":
        return OnnxRunner(job.target, job.dtype, settings)
    return TorchRunner(job.target, job.dtype, settings, static_cache=job.engine == "pytorch-static-compiled")


def decode_and_prefill_work(runner, job: Job, settings: Settings, batch: int, prompt_length: int) -> dict:
    """What a decode step must read and what prefill must compute: the numerators of the floors."""
    context = prompt_length + settings.new_tokens / 2  # the mean past length over the decode steps
    kv = kv_cache_bytes(job.target.config, batch, context, runner.kv_itemsize)
    return {
        "decoder_weight_bytes": runner.weight_bytes,
        "kv_cache_bytes": kv,
        "kv_context": context,
        "decode_bytes": runner.weight_bytes + kv,
        "decoder_params": runner.decoder_params,
        "matmul_precision": runner.matmul_precision,
        "prefill_tokens": batch * prompt_length,
        "prefill_flops": 2 * runner.decoder_params * batch * prompt_length,
    }


def add_floors(rows: list[dict], hardware: dict) -> None:
    """Each row's floors over the machine's best measured bandwidth and matmul peak, and the row as
    a multiple of them. Contention only ever lowers a probe, so the best of all probes is the
    closest to what the hardware allows."""
    bandwidth = hardware["copy_bandwidth"]["gbps_best"] * 1e9
    for row in rows:
        floor = row["floor"]
        precision = floor.get("matmul_precision", row["dtype"])  # reports written before the field: the dtype
        peak_name = precision if precision in hardware["matmul"] else "fp32"
        peak = hardware["matmul"][peak_name]["gflops_best"] * 1e9
        floor.update({
            "bandwidth_gbps": bandwidth / 1e9,
            "decode_floor_s": floor["decode_bytes"] / bandwidth,
            "decode_x_floor": row["per_token_s"]["p50"] / (floor["decode_bytes"] / bandwidth),
            "decode_gbps": floor["decode_bytes"] / row["per_token_s"]["p50"] / 1e9,
            "matmul_peak": peak_name,
            "matmul_peak_gflops": peak / 1e9,
            "prefill_floor_s": floor["prefill_flops"] / peak,
            "prefill_x_floor": row["prefill_s"]["p50"] / (floor["prefill_flops"] / peak),
        })


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


def time_batch(runner, job: Job, settings: Settings, batch: int, advance) -> tuple[dict, list[Timing], dict]:
    """Warm-up runs, then `runs` timed generations at one batch size; with the peak memory they took."""
    clock = Clock(settings.device)
    inputs = make_inputs(job.target.config, batch, settings.prompt_tokens, job.resolution, settings.seed)
    rss_reset = reset_peak_rss()
    if settings.device == "cuda":
        import torch

        torch.cuda.reset_peak_memory_stats()
        gpu_sampled = 0
    timings = []
    for index in range(settings.warmup + settings.runs):
        warm = index < settings.warmup
        timing = runner.run(inputs, settings.new_tokens, clock)
        if not warm:
            timings.append(timing)
        if settings.device == "cuda":
            gpu_sampled = max(gpu_sampled, gpu_memory_used())
        count = index + 1 if warm else index + 1 - settings.warmup
        advance(f"{job.label} batch {batch}: {'warm-up' if warm else 'run'} {count}")
    memory = {"peak_rss_bytes": peak_rss_bytes() if rss_reset else None, "peak_gpu_bytes": None}
    if settings.device == "cuda":
        # torch's allocator knows its own peak; onnxruntime's arena is seen only as device memory in use
        memory["peak_gpu_bytes"] = torch.cuda.max_memory_allocated() if job.engine != "onnxruntime" else gpu_sampled
    return inputs, timings, memory


def run_job(job: Job, settings: Settings, advance) -> list[dict]:
    """Load once, then time each batch size; one result row per batch (floors added later)."""
    rss_reset = reset_peak_rss()
    started = time.perf_counter()
    runner = load_runner(job, settings)
    load_s = time.perf_counter() - started
    load_peak = peak_rss_bytes() if rss_reset else None
    advance(f"{job.label}: loaded")
    rows = []
    for batch in settings.batches:
        inputs, timings, memory = time_batch(runner, job, settings, batch, advance)
        prompt_length = inputs["input_ids"].shape[1]
        per_token = summarize([step for t in timings for step in t.steps])
        row = {
            "label": job.label, "target": job.target.name, "kind": job.target.kind, "engine": job.engine,
            "dtype": job.dtype, "resolution": job.resolution, "latency_only": job.target.latency_only,
            "batch": batch, "prompt_tokens": prompt_length, "image_tokens": prompt_length - settings.prompt_tokens,
            "new_tokens": settings.new_tokens, "warmup": settings.warmup, "runs": settings.runs,
            "load_s": load_s,
            "vision_s": summarize([t.vision for t in timings]),
            "prefill_s": summarize([t.prefill for t in timings]),
            "ttft_s": summarize([t.ttft for t in timings]),
            "per_token_s": per_token,
            "tokens_per_s": batch / per_token["p50"],
            "e2e_tokens_per_s": batch * settings.new_tokens / float(np.median([t.ttft + sum(t.steps) for t in timings])),
            "load_peak_rss_bytes": load_peak,
            **memory,
        }
        rows.append({**row, "floor": decode_and_prefill_work(runner, job, settings, batch, prompt_length)})
    del runner
    gc.collect()
    release_freed_memory()
    return rows


def release_freed_memory() -> None:
    """Hand the heap's freed pages back to the system (glibc's malloc_trim), so that the next
    target's peak RSS does not include what the last one freed but the allocator kept. At 896 px,
    a 15 GB PyTorch prefill left that much resident under the onnxruntime target after it."""
    with contextlib.suppress(OSError, AttributeError, ValueError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def add_baseline_ratios(rows: list[dict], baseline: str) -> None:
    """speedup = the baseline's median / this row's median, at the same batch and resolution."""
    for row in rows:
        match = next((r for r in rows if r["label"] == baseline and r["batch"] == row["batch"]
                      and r["resolution"] == row["resolution"]), None)
        row["vs_baseline"] = None if match is None else {
            "baseline": baseline,
            "ttft_speedup": match["ttft_s"]["p50"] / row["ttft_s"]["p50"],
            "per_token_speedup": match["per_token_s"]["p50"] / row["per_token_s"]["p50"],
            "vision_speedup": match["vision_s"]["p50"] / row["vision_s"]["p50"],
        }


def bench(
    targets: list[str | Path],
    *,
    device: str = "cpu",
    dtypes: list[str] | None = None,
    batches: list[int] = (1, 4),
    resolutions: list[int] | None = None,
    prompt_tokens: int = 10,
    new_tokens: int = 16,
    warmup: int = 1,
    runs: int = 3,
    threads: int | None = None,
    prefill_rows: int = 0,
    baseline: str | None = None,
    json_path: str | Path | None = None,
    markdown_path: str | Path | None = None,
    plot_path: str | Path | None = None,
    progress: bool = True,
) -> dict:
    """Benchmark each target on the same inputs and return the report (see the module docstring).

    `baseline` is a target as given or a row label (default: the first target's first job); every
    row gets its speedup over the baseline at the same batch and resolution. Writes the report as
    JSON, markdown and a latency-vs-batch PNG (needs matplotlib: `pgexport[bench]`) where asked.
    Raises BadInputError (exit 4) for a folder that is neither an artifact nor a checkpoint.
    """
    settings = Settings(
        device=device, dtypes=tuple(dtypes) if dtypes else None, batches=tuple(batches or ()),
        resolutions=tuple(resolutions) if resolutions else None, prompt_tokens=prompt_tokens,
        new_tokens=new_tokens, warmup=warmup, runs=runs, threads=threads, prefill_rows=prefill_rows,
    )
    if not targets:
        raise BadInputError("give at least one target (an artifact or a checkpoint folder)")
    resolved = [resolve_target(target) for target in targets]
    if device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise UnsupportedError("--device cuda: torch sees no CUDA device here")
    from pgexport.pipeline import stages

    threads = settings.thread_count
    with tempfile.TemporaryDirectory(prefix="pgexport-bench-") as workdir, torch_threads(threads):
        jobs, skipped = plan_jobs(resolved, settings, Path(workdir))
        labels = [job.label for job in jobs]
        chosen = next((job.label for job in jobs if baseline in (None, job.label, job.target.name)), None)
        if chosen is None:
            raise BadInputError(f"baseline {baseline!r} is none of the targets: {', '.join(labels)}")
        units = 1 + sum(2 + len(settings.batches) * (settings.warmup + settings.runs) for _ in jobs)
        rows, probes = [], []
        with stages(units, progress) as advance:
            for job in jobs:
                advance(f"{job.label}: measuring copy bandwidth and matmul peaks")
                probes.append(probe_hardware(device, threads))
                advance(f"{job.label}: loading")
                try:
                    job_rows = run_job(job, settings, advance)
                except UnsupportedError as error:
                    skipped.append({"target": job.target.name, "dtype": job.dtype, "engine": job.engine, "reason": str(error)})
                    continue
                rows += [{**row, "probe_before": probe_summary(probes[-1])} for row in job_rows]
                if json_path:  # what is done so far survives a later job that runs out of memory
                    Path(json_path).write_text(json.dumps({"schema": SCHEMA, "partial": True, "settings": asdict(settings),
                                                           "results": rows, "skipped": skipped}, indent=2) + "\n")
            advance("measuring copy bandwidth and matmul peaks again")
            probes.append(probe_hardware(device, threads))
    if not rows:
        raise UnsupportedError("nothing to benchmark: " + "; ".join(s["reason"] for s in skipped))
    if not any(row["label"] == chosen for row in rows):  # the baseline's job was skipped
        chosen = rows[0]["label"]
    add_baseline_ratios(rows, chosen)
    hardware = {**best_of(probes), "probes": [probe_summary(probe) for probe in probes]}
    add_floors(rows, hardware)
    report = {
        "schema": SCHEMA,
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "settings": {**asdict(settings), "threads": threads},
        "environment": environment(device, threads),
        "hardware": hardware,
        "baseline": chosen,
        "results": rows,
        "skipped": skipped,
    }
    report["plot"] = write_plot(report, plot_path) if plot_path else None
    if markdown_path:
        Path(markdown_path).write_text(to_markdown(report))
    if json_path:
        Path(json_path).write_text(json.dumps(report, indent=2) + "\n")
    return report


# ----------------------------------------------------------------------------------------- report


def _speedup(row: dict, key: str) -> str:
    ratio = row["vs_baseline"]
    if ratio is None:
        return "-"
    return "baseline" if row["label"] == ratio["baseline"] else f"{ratio[key]:.2f}x"


def _gb(value) -> str:
    return "-" if value is None else f"{value / 1e9:.2f}"


def _s(seconds: float) -> str:
    return f"{seconds:.3g}"


def to_markdown(report: dict) -> str:
    """The results as one markdown table, with the environment and the measured floors above it."""
    env, hw, settings = report["environment"], report["hardware"], report["settings"]
    versions = env["versions"]
    device = env["gpu"]["name"] if "gpu" in env else f"{env['cpu']['model']} ({', '.join(env['cpu']['simd']) or 'no AVX'})"
    peaks = ", ".join(f"{name} {p['gflops_best']:.0f}" for name, p in hw["matmul"].items() if "_" not in name)
    first = report["results"][0]
    lines = [
        f"### pgexport bench, {report['date']}",
        "",
        f"- Device: {env['device']}: {device}; {env['threads']} threads of {env['cpu']['usable_cpus']} usable CPUs.",
        f"- Versions: torch {versions.get('torch')}, transformers {versions.get('transformers')}, "
        f"onnxruntime {versions.get('onnxruntime')}, numpy {versions.get('numpy')}.",
        f"- Measured in this run (best of {len(hw['probes'])} probes: one before each target, one at the end): copy "
        f"bandwidth {hw['copy_bandwidth']['gbps_best']:.1f} GB/s (read + write bytes); matmul peak GFLOP/s: {peaks}.",
        f"- Prompt: {first['image_tokens']} image + {settings['prompt_tokens']} text tokens; {settings['new_tokens']} new "
        f"tokens (greedy, no eos stop); {settings['warmup']} warm-up + {settings['runs']} timed runs; medians (p50).",
        f"- Speedup = the baseline's median / this row's median, same batch and resolution, same run. "
        f"Baseline: `{report['baseline']}`.",
        "- x floor = measured / floor. Decode floor: (decoder weight bytes + KV cache bytes) / copy bandwidth. "
        "Prefill floor: 2 x decoder params x prompt tokens / matmul peak of the arithmetic the row's MatMuls use "
        "(int8 for int8 and for q4 at accuracy_level 4; fp32 where no peak of that kind was measured). "
        "Below 1: the probes got less of the shared machine than that target did.",
        "",
        "| target | engine | dtype | res | batch | load s | vision s | TTFT s | per token s p50 / p90 / p99 | tok/s "
        "| peak RSS GB | decode x floor | prefill x floor | TTFT speedup | per-token speedup |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in report["results"]:
        token, floor = row["per_token_s"], row["floor"]
        resolution = f"{row['resolution']}{'*' if row['latency_only'] else ''}"
        memory = _gb(row["peak_rss_bytes"]) + (f" (GPU {_gb(row['peak_gpu_bytes'])})" if row["peak_gpu_bytes"] else "")
        lines.append(
            f"| {row['target']} | {row['engine']} | {row['dtype']} | {resolution} | {row['batch']} | {_s(row['load_s'])} "
            f"| {_s(row['vision_s']['p50'])} | {_s(row['ttft_s']['p50'])} | {_s(token['p50'])} / {_s(token['p90'])} / "
            f"{_s(token['p99'])} | {row['tokens_per_s']:.3g} | {memory} | {floor['decode_x_floor']:.2f} "
            f"| {floor['prefill_x_floor']:.2f} | {_speedup(row, 'ttft_speedup')} | {_speedup(row, 'per_token_speedup')} |"
        )
    if any(row["latency_only"] for row in report["results"]):
        lines += ["", f"\\* {LATENCY_ONLY}: SigLIP position embeddings interpolated from the native resolution."]
    lines.append("")
    seen = {}
    for row in report["results"]:
        seen.setdefault(row["label"], row["probe_before"])
    probes = "; ".join(f"{label}: {p['copy_gbps']:.1f} GB/s, fp32 {p['fp32_gflops']:.0f} GFLOP/s" for label, p in seen.items())
    lines.append(f"- What the machine gave just before each target (other jobs share it): {probes}.")
    for skip in report["skipped"]:
        what = " ".join(str(skip[k]) for k in ("target", "dtype", "engine", "resolution") if k in skip)
        lines.append(f"- skipped {what}: {skip['reason']}")
    plot = report.get("plot") or {}
    if plot.get("skipped"):
        lines.append(f"- plot skipped: {plot['skipped']}")
    return "\n".join(lines) + "\n"


def write_plot(report: dict, path: str | Path) -> dict:
    """Latency vs batch (TTFT and per output token), one line per target and resolution; a PNG."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        from matplotlib import pyplot
    except ImportError:
        return {"path": None, "skipped": "matplotlib is not installed (pip install 'pgexport[bench]')"}
    figure, axes = pyplot.subplots(1, 2, figsize=(11, 4.2))
    series = {}
    for row in report["results"]:
        series.setdefault(row["label"], []).append(row)
    for label, rows in series.items():
        rows = sorted(rows, key=lambda r: r["batch"])
        batches = [r["batch"] for r in rows]
        axes[0].plot(batches, [r["ttft_s"]["p50"] for r in rows], marker="o", label=label)
        axes[1].plot(batches, [r["per_token_s"]["p50"] for r in rows], marker="o", label=label)
    for axis, title in zip(axes, ("time to first token (p50)", "per output token (p50)")):
        axis.set(title=title, xlabel="batch", ylabel="seconds", yscale="log")
        axis.set_xticks(sorted({r["batch"] for r in report["results"]}))
        axis.grid(True, alpha=0.3)
    axes[1].legend(fontsize=7)
    figure.suptitle(f"pgexport bench: {report['environment']['device']}, {report['environment']['threads']} threads")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    pyplot.close(figure)
    return {"path": str(path), "skipped": None}
