"""The engines a job times: an artifact on ONNX Runtime (the runtime's own decoding loop, timed
through its step hook) and a checkpoint on transformers' `generate`; and the timing of one job,
batch by batch."""

from __future__ import annotations

import gc
import time
from pathlib import Path

import numpy as np

from pgexport.bench.floors import decode_and_prefill_work
from pgexport.bench.measure import (
    Clock,
    StepClock,
    Timing,
    gpu_memory_used,
    make_inputs,
    peak_rss_bytes,
    reset_peak_rss,
    summarize,
)
from pgexport.bench.targets import SEED, Job, Target, quiet_transformers, thread_count
from pgexport.config import BenchConfig
from pgexport.contract import DECODER, INPUT_IDS, PIXEL_VALUES, graph_path
from pgexport.errors import UnsupportedError
from pgexport.memory import release_freed


class OnnxRunner:
    """An artifact on ONNX Runtime: `OnnxPaliGemma.generate_ids`, eos ignored, timed through its step hook."""

    engine = "onnxruntime"

    def __init__(self, target: Target, dtype: str, settings: BenchConfig):
        import onnxruntime as ort

        from pgexport.runtime import OnnxPaliGemma

        providers = ["CPUExecutionProvider"]
        if settings.device == "cuda":
            if "CUDAExecutionProvider" not in ort.get_available_providers():
                raise UnsupportedError("onnxruntime has no CUDA execution provider here (install onnxruntime-gpu)")
            providers = ["CUDAExecutionProvider", "CPUExecutionProvider"]
        self.model = OnnxPaliGemma(target.path, dtype=dtype, providers=providers, threads=thread_count(settings),
                                   prefill_rows=settings.prefill_rows)
        # The decoder file loaded (its precision in this dtype) holds the bytes a step reads; the
        # fp32 one counts the parameters prefill multiplies.
        loaded = graph_path(target.path, DECODER.name, self.model.graph_dtypes[DECODER.name])
        self.weight_bytes, _, self.matmul_precision = graph_weight_stats(loaded)
        _, self.decoder_params, _ = graph_weight_stats(graph_path(target.path, DECODER.name))
        self.kv_itemsize = np.dtype(self.model.float_type).itemsize

    def run(self, inputs: dict, new_tokens: int, clock: Clock) -> Timing:
        """One greedy generation of exactly `new_tokens` tokens per row."""
        stamps = StepClock(clock)
        self.model.generate_ids(**inputs, max_new_tokens=new_tokens, stop_at_eos=False, on_step=stamps)
        return stamps.timing()


class TorchRunner:
    """A checkpoint on transformers' `generate` (greedy). Hooks stamp the clock around the vision
    tower and projector inside generate's prefill, and a logits processor after each forward pass,
    so vision, prefill and every token are timed within one ordinary generate call."""

    def __init__(self, target: Target, dtype: str, settings: BenchConfig, static_cache: bool = False):
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
        tensors[PIXEL_VALUES] = tensors[PIXEL_VALUES].to(self.dtype)
        tensors["token_type_ids"] = self.torch.zeros_like(tensors[INPUT_IDS])  # the whole prompt is the prefix
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


def load_runner(job: Job, settings: BenchConfig):
    if job.engine == "onnxruntime":
        return OnnxRunner(job.target, job.dtype, settings)
    return TorchRunner(job.target, job.dtype, settings, static_cache=job.engine == "pytorch-static-compiled")


def time_batch(runner, job: Job, settings: BenchConfig, batch: int, advance) -> tuple[dict, list[Timing], dict]:
    """Warm-up runs, then `runs` timed generations at one batch size; with the peak memory they took."""
    clock = Clock(settings.device)
    inputs = make_inputs(job.target.config, batch, settings.prompt_tokens, job.resolution, SEED)
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


def run_job(job: Job, settings: BenchConfig, advance) -> list[dict]:
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
        prompt_length = inputs[INPUT_IDS].shape[1]
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
    release_freed()  # at 896 px a 15 GB PyTorch prefill stayed resident under the next target
    return rows


