"""Physical floors and ratios: what a decode step must read and prefill must compute, each row as
a multiple of the best measured bandwidth and matmul peak, and speedups over the baseline."""

from __future__ import annotations

from pgexport.bench.targets import Job
from pgexport.config import BenchConfig

def kv_cache_bytes(config: dict, batch: int, context: float, itemsize: int) -> int:
    """Bytes of keys and values a decode step reads at `context` past positions."""
    text = config["text_config"]
    head_dim = text.get("head_dim") or text["hidden_size"] // text["num_attention_heads"]
    per_position = 2 * text["num_hidden_layers"] * text["num_key_value_heads"] * head_dim * itemsize
    return int(batch * context * per_position)


def decode_and_prefill_work(runner, job: Job, settings: BenchConfig, batch: int, prompt_length: int) -> dict:
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


