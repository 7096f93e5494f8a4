"""Latency benchmarks: ONNX Runtime artifacts and PyTorch checkpoints on the same inputs, in one run.

    bench(targets, BenchConfig(...)) -> report   (`pgexport bench TARGET...`: the same options, pgexport.config)

Stages: measure the hardware (copy bandwidth, matmul peaks) -> for each (target, dtype,
resolution): load -> for each batch: warm up, then time `runs` greedy generations -> derive
percentiles, tokens/s, physical floors, ratios to the baseline -> write JSON, markdown, plot.

    targets.py   targets, the jobs planned from them, resized checkpoints
    runners.py   ONNX Runtime (the runtime's own loop, through its step hook) and PyTorch; one job timed
    measure.py   clock, step hook, percentiles, peak memory, inputs
    hardware.py  copy bandwidth, matmul peaks, environment
    floors.py    physical floors and ratios to the baseline
    report.py    markdown and plot

A target is an artifact folder (ONNX Runtime, each dtype it has) or a checkpoint folder
(transformers' PaliGemmaForConditionalGeneration: eager; on CUDA also the static-cache path that
transformers compiles). Inputs are arrays made here from the model's config (seeded random
pixels, the image tokens, `prompt_tokens` text tokens), so the processor is never timed.
Generation never stops at eos: every run makes exactly `new_tokens` tokens per row.
"""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path

from pgexport.bench.floors import add_baseline_ratios, add_floors
from pgexport.bench.hardware import best_of, environment, probe_hardware, probe_summary, torch_threads
from pgexport.bench.measure import Clock, make_inputs
from pgexport.bench.report import SCHEMA, to_markdown, write_plot
from pgexport.bench.runners import OnnxRunner, TorchRunner, graph_weight_stats, run_job
from pgexport.bench.targets import SEED, plan_jobs, resize_checkpoint, resolve_target, thread_count
from pgexport.config import BenchConfig, make, options_of
from pgexport.errors import BadInputError, UnsupportedError

# What benchmarks/*.py and the tests import from the package, besides `bench` itself.
__all__ = ["Clock", "OnnxRunner", "TorchRunner", "bench", "graph_weight_stats", "make_inputs",
           "resize_checkpoint", "resolve_target", "to_markdown"]


def bench(
    targets: list[str | Path],
    config: BenchConfig | None = None,
    *,
    json_path: str | Path | None = None,
    markdown_path: str | Path | None = None,
    plot_path: str | Path | None = None,
    progress: bool = True,
    **options,
) -> dict:
    """Benchmark each target on the same inputs and return the report (see the module docstring).

    `config` (or its fields as keywords: `bench(targets, batches=(1,), runs=5)`) is a BenchConfig,
    the options of `pgexport bench`. `baseline` is a target as given or a row label (default: the
    first target's first job); every row gets its speedup over the baseline at the same batch and
    resolution. Writes the report as JSON, markdown and a latency-vs-batch PNG (needs matplotlib:
    `pgexport[bench]`) where asked. Raises BadInputError (exit 4) for a folder that is neither an
    artifact nor a checkpoint.
    """
    settings = make(BenchConfig, config, **{key: tuple(value) if isinstance(value, list) else value
                                            for key, value in options.items()})
    device, baseline = settings.device, settings.baseline
    if not targets:
        raise BadInputError("give at least one target (an artifact or a checkpoint folder)")
    resolved = [resolve_target(target) for target in targets]
    if device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise UnsupportedError("--device cuda: torch sees no CUDA device here")
    from pgexport.pipeline import stages

    threads = thread_count(settings)
    with tempfile.TemporaryDirectory(prefix="pgexport-bench-") as workdir, torch_threads(threads):
        jobs, skipped = plan_jobs(resolved, settings, Path(workdir))
        labels = [job.label for job in jobs]
        if not jobs:  # every (target, dtype) skipped: say why, not that the baseline is missing
            reasons = "; ".join(f"{row.get('target', row.get('label', '?'))}: {row['reason']}" for row in skipped)
            raise BadInputError(f"nothing to measure: {reasons}")
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
                    Path(json_path).write_text(json.dumps({"schema": SCHEMA, "partial": True, "settings": options_of(settings),
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
        "settings": {**options_of(settings), "seed": SEED, "threads": threads},
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


