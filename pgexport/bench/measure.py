"""Clocks and measurements one timed generation needs: a clock that waits for the GPU, the step
hook that reads it inside the runtime's loop, percentiles, peak memory, and the inputs (arrays
made from the model's config, so the processor is never timed)."""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

from pgexport.contract import ATTENTION_MASK, INPUT_IDS, PIXEL_VALUES
from pgexport.memory import release_freed
from pgexport.runtime import STEP_START, STEP_TOKEN, STEP_VISION


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
    release_freed()  # give freed heap back first, so the reset starts low
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


class StepClock:
    """`OnnxPaliGemma.generate_ids`'s step hook: the clock read at each event of the loop."""

    def __init__(self, clock: Clock):
        self.clock, self.stamps = clock, {STEP_START: [], STEP_VISION: [], STEP_TOKEN: []}

    def __call__(self, event: str) -> None:
        self.stamps[event].append(self.clock())

    def timing(self) -> Timing:
        """Vision: the encoder alone; prefill: from its features to the first token (embedding,
        merge, decoder, argmax); each step: from one token to the next."""
        (start,), (vision,), tokens = self.stamps[STEP_START], self.stamps[STEP_VISION], self.stamps[STEP_TOKEN]
        return Timing(vision - start, tokens[0] - vision, tokens[0] - start, [b - a for a, b in zip(tokens, tokens[1:])])


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
    return {INPUT_IDS: input_ids, ATTENTION_MASK: np.ones_like(input_ids), PIXEL_VALUES: pixels}


def gpu_memory_used() -> int:
    import torch

    free, total = torch.cuda.mem_get_info()
    return total - free
