"""The report as markdown (one table, the environment and floors above it) and as a plot."""

from __future__ import annotations

from pathlib import Path

from pgexport.bench.targets import LATENCY_ONLY

SCHEMA = "pgexport-bench/1"

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
