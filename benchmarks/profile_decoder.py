"""Where the decoder's CPU time goes, per op type and per node, from onnxruntime's own profiler.

A reduced-depth decoder with the 3B text shapes (Gemma-2B widths: hidden 2048, MLP 16384, 8 query
heads, 1 KV head, head_dim 256, vocab 257216) but LAYERS decoder layers instead of 18, random
weights, exported and quantized by pgexport itself (`export_onnx(..., int8=True, int4=True,
validate=False)` and `pgexport.quantize.int4.quantize_int4` for the extra q4 settings). The vision
tower is a tiny stand-in (patch 14 at 224 px, so 256 image tokens); only the decoder is profiled,
fed 266 embeddings like a 224 px prompt (256 image + 10 text tokens), batch 1.

Per variant, in a fresh process (after waiting, at most PROFILE_QUIET_WAIT s, for other processes
to go quiet), with intra_op threads = THREADS:
  1. a plain session (no profiling): wall medians of PREFILLS prefills and DECODES decode steps
     (after one warm-up of each);
  2. a profiled session (SessionOptions.enable_profiling), same sequence: 1 warm-up prefill +
     PREFILLS prefills (logits_to_keep = 1, as OnnxPaliGemma.generate_ids feeds it), then 1
     warm-up step + DECODES decode steps (1 token, past 266 and growing). The JSON trace is split
     by run (`model_run` events) and each run's Node events are summed by op type, by node, by
     weight-matmul role and by place (layer i / LM head / rest, see _places);
  3. the CPU other processes used meanwhile (cores' worth, from /proc/stat) is recorded.

  python benchmarks/profile_decoder.py build   [--work DIR] [--layers 3]   # checkpoint, export, variants
  python benchmarks/profile_decoder.py probe                               # copy bandwidth, matmul peaks
  python benchmarks/profile_decoder.py profile [--variants int8,q4_acc4,...] [--tag T]
  python benchmarks/profile_decoder.py interleave [--variants ...] [--rounds N] [--tag T]
  python benchmarks/profile_decoder.py report  --variants int8_T,q4_acc4_T,... [--out FILE]

Variants (VARIANTS): int8, q4_acc4 (the export's own), q4_acc0, q4_acc4_b128, q4_acc4_fused,
int8_fused (the `--optimize` fusions, pgexport.quantize.optimize, before quantizing).
Work files go to $PROFILE_WORK (default /tmp/pg-profile): about 15 GB.

Extrapolation to the 18-layer model: total(18) = 18 x mean per-layer time + head + rest, where
"head" is the LM head matmul (the last weight matmul) and what follows it, and "rest" what runs
before layer 0's first projection. Results: benchmarks/results/q4_profile_intel.md.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
WORK = Path(os.environ.get("PROFILE_WORK", "/tmp/pg-profile"))
PRESET = "pg1-3b-224-reduced"
THREADS = 2
PROMPT = 266  # 256 image tokens + 10 text tokens (224 px, patch 14)
PREFILLS = 3
DECODES = 10
FULL_LAYERS = 18

# name -> (source precision folder of the export, extra q4 settings or None)
VARIANTS = {
    "int8": dict(kind="int8"),
    "q4_acc4": dict(kind="q4", accuracy_level=4, block_size=32),
    "q4_acc0": dict(kind="q4", accuracy_level=0, block_size=32),
    "q4_acc4_b128": dict(kind="q4", accuracy_level=4, block_size=128),
    # `--optimize` (pgexport.quantize.optimize: RMSNorm -> SimplifiedLayerNormalization, tanh GELU
    # -> FastGelu) before the same q4 acc4 quantization
    "q4_acc4_fused": dict(kind="q4", accuracy_level=4, block_size=32, optimize=True),
    "int8_fused": dict(kind="int8", optimize=True),
    "fp32": dict(kind="fp32"),
}


def build(work: Path, layers: int) -> None:
    """Random checkpoint (a preset added here, not in pgexport) -> pgexport export (fp32 + int8 +
    q4 acc4, no validation) -> extra q4 decoders from the fp32 one."""
    from pgexport import random_model
    from pgexport.pipeline import export_onnx
    from pgexport.quantize.int4 import quantize_int4

    vision = dict(hidden_size=24, intermediate_size=40, num_hidden_layers=2, num_attention_heads=2, patch_size=14)
    random_model.PRESETS[PRESET] = (vision, {**random_model._GEMMA_2B, "num_hidden_layers": layers}, 224, 257216)
    ckpt, artifact = work / "checkpoint", work / "artifact"
    work.mkdir(parents=True, exist_ok=True)
    if not (ckpt / "config.json").exists():
        t = time.perf_counter()
        random_model.random_checkpoint(PRESET, ckpt)
        print(f"checkpoint {time.perf_counter() - t:.0f} s", flush=True)
    if not (artifact / "manifest.json").exists():
        t = time.perf_counter()
        export_onnx(ckpt, artifact, int8=True, int4=True, validate=False, accuracy_level=4, block_size=32,
                    int4_method="rtn", force=True, progress=False)
        print(f"export {time.perf_counter() - t:.0f} s", flush=True)
    src = decoder_path(work, "fp32")
    for name, spec in VARIANTS.items():
        if spec["kind"] not in ("q4", "int8") or name == "q4_acc4" or (spec["kind"] == "int8" and not spec.get("optimize")):
            continue
        dst = decoder_path(work, name)
        if dst.exists():
            continue
        dst.parent.mkdir(parents=True, exist_ok=True)
        t = time.perf_counter()
        source = src
        if spec.get("optimize"):
            from pgexport.contract import DECODER
            from pgexport.quantize.optimize import optimize_graph

            source = dst.parent / "fused_fp32.onnx"
            report = optimize_graph(work / "artifact", DECODER.name, src, source)
            print(f"{name}: fusions {report['op_changes']}, max_rel_diff {report['max_rel_diff']:.1e}", flush=True)
        if spec["kind"] == "int8":
            from pgexport.quantize.int8 import quantize_dynamic_int8

            info = quantize_dynamic_int8(source, dst, progress=False)
        else:
            info = quantize_int4(source, dst, method="rtn", block_size=spec["block_size"],
                                 accuracy_level=spec["accuracy_level"], progress=False)
        print(f"{name}: {info['quantized']} quantized matmuls, {time.perf_counter() - t:.0f} s", flush=True)
        if source != src:
            for leftover in (source, source.with_name(source.name + ".data")):
                leftover.unlink(missing_ok=True)


def decoder_path(work: Path, variant: str) -> Path:
    onnx_dir = work / "artifact" / "onnx"
    if variant == "fp32":
        return onnx_dir / "decoder_model_merged.onnx"
    if variant == "int8":
        return onnx_dir / "decoder_model_merged_int8.onnx"
    if variant == "q4_acc4":
        return onnx_dir / "decoder_model_merged_q4.onnx"
    suffix = "int8" if variant.startswith("int8") else "q4"
    return work / "extra" / variant / f"decoder_model_merged_{suffix}.onnx"


# ---------------------------------------------------------------- feeds

def _feeds(session, rng):
    names = [i.name for i in session.get_inputs()]
    past = [i for i in session.get_inputs() if i.name.startswith("past")]
    embeds = (rng.standard_normal((1, PROMPT, 2048)) * 1.0).astype(np.float32)
    prefill = {
        "inputs_embeds": embeds,
        "attention_mask": np.ones((1, PROMPT), np.int64),
        "position_ids": np.arange(1, PROMPT + 1, dtype=np.int64)[None],
        **{i.name: np.zeros((1, i.shape[1], 0, i.shape[3]), np.float32) for i in past},
    }
    if "logits_to_keep" in names or any(i.name == "logits_to_keep" for i in session.get_overridable_initializers()):
        prefill["logits_to_keep"] = np.array(1, np.int64)
    return prefill, [i.name for i in past]


def _decode_feed(outputs, past_names, length, rng):
    return {
        "inputs_embeds": rng.standard_normal((1, 1, 2048)).astype(np.float32),
        "attention_mask": np.ones((1, length + 1), np.int64),
        "position_ids": np.array([[length + 1]], np.int64),
        **dict(zip(past_names, outputs[1:])),
    }


def _session(path: Path, profile_prefix: str | None):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = THREADS
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    if profile_prefix:
        options.enable_profiling = True
        options.profile_file_prefix = profile_prefix
    for key, value in _EXTRA_CONFIG.items():
        options.add_session_config_entry(key, value)
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


_EXTRA_CONFIG: dict[str, str] = {}


def _run_sequence(session, rng, prefills, decodes, timings=None):
    """warm-up prefill, `prefills` prefills, warm-up decode, `decodes` decode steps. Returns labels per run."""
    prefill, past_names = _feeds(session, rng)
    labels = []
    t = timings if timings is not None else {"prefill": [], "decode": []}
    for i in range(1 + prefills):
        start = time.perf_counter()
        outputs = session.run(None, prefill)
        if i:
            t["prefill"].append(time.perf_counter() - start)
        labels.append("warmup_prefill" if i == 0 else "prefill")
    length = PROMPT
    for i in range(1 + decodes):
        feed = _decode_feed(outputs, past_names, length, rng)
        start = time.perf_counter()
        outputs = session.run(None, feed)
        if i:
            t["decode"].append(time.perf_counter() - start)
        labels.append("warmup_decode" if i == 0 else "decode")
        length += 1
    return labels, t


def _cpu_now() -> tuple[float, float, float]:
    """(machine busy CPU-seconds, this process's CPU-seconds, wall clock)."""
    import resource

    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n")[0].split()[1:]]
    hz = os.sysconf("SC_CLK_TCK")
    busy = (sum(fields[:8]) - fields[3] - fields[4]) / hz  # all but idle and iowait
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return busy, usage.ru_utime + usage.ru_stime, time.perf_counter()


def foreign_cores(before, after) -> float:
    """Cores' worth of CPU that other processes used between two _cpu_now() snapshots."""
    return max(0.0, ((after[0] - before[0]) - (after[1] - before[1])) / (after[2] - before[2]))


def wait_for_quiet(limit_s: float = float(os.environ.get("PROFILE_QUIET_WAIT", 300)), window_s: float = 3, threshold: float = 0.1) -> float:
    """Wait (at most limit_s) until other processes use under `threshold` cores over a window.
    Returns the seconds waited."""
    started = time.perf_counter()
    while time.perf_counter() - started < limit_s:
        before = _cpu_now()
        time.sleep(window_s)
        if foreign_cores(before, _cpu_now()) < threshold:
            break
    return time.perf_counter() - started


def probe() -> dict:
    """This machine's copy bandwidth and matmul peaks (pgexport.bench.hardware), 2 threads."""
    from pgexport.bench.hardware import copy_bandwidth, matmul_peaks

    waited = wait_for_quiet()
    before = _cpu_now()
    result = {"copy": copy_bandwidth("cpu", THREADS), "matmul": matmul_peaks("cpu", THREADS)}
    result["foreign_cores"] = foreign_cores(before, _cpu_now())
    result["waited_s"] = waited
    return result


def profile_variant(work: Path, variant: str, tag: str = "") -> dict:
    import onnxruntime as ort

    path = decoder_path(work, variant)
    out_dir = work / "profiles"
    out_dir.mkdir(parents=True, exist_ok=True)
    name = variant + (f"_{tag}" if tag else "")
    rng = np.random.default_rng(0)
    waited = wait_for_quiet()
    load_before = os.getloadavg()
    # 1. plain wall medians (no profiler overhead)
    t0 = time.perf_counter()
    session = _session(path, None)
    load_s = time.perf_counter() - t0
    cpu0 = _cpu_now()
    _, wall = _run_sequence(session, rng, PREFILLS, DECODES)
    foreign_plain = foreign_cores(cpu0, _cpu_now())
    del session
    # 2. profiled session
    session = _session(path, str(out_dir / f"{name}"))
    cpu0 = _cpu_now()
    labels, prof_wall = _run_sequence(session, np.random.default_rng(0), PREFILLS, DECODES)
    foreign_profiled = foreign_cores(cpu0, _cpu_now())
    trace = session.end_profiling()
    del session
    stats = aggregate(trace, labels)
    result = {
        "variant": name,
        "decoder": str(path),
        "session_config": dict(_EXTRA_CONFIG),
        "load_s": load_s,
        "wall": {k: {"median_s": statistics.median(v), "all_s": v} for k, v in wall.items()},
        "profiled_wall": {k: {"median_s": statistics.median(v)} for k, v in prof_wall.items()},
        "trace": trace,
        "ort_version": ort.__version__,
        "loadavg_before_after": [load_before, os.getloadavg()],
        "waited_for_quiet_s": waited,
        "foreign_cores": {"plain": foreign_plain, "profiled": foreign_profiled},
        **stats,
    }
    (out_dir / f"{name}.json").write_text(json.dumps(result, indent=1))
    return result


WEIGHT_MATMULS = {"MatMul", "MatMulNBits", "MatMulInteger", "MatMulIntegerToFloat", "DynamicQuantizeMatMul", "Gemm",
                  "FusedMatMul"}


# Weight matmuls by (K, N) = (last dim of the first input, last dim of the output). q and o share
# a shape (q comes first in a layer: o needs the attention), k and v too, gate and up too (either
# order: they are reported together).
ROLES = ("q_proj", "k/v_proj", "o_proj", "gate/up_proj", "down_proj")
ROLE_SHAPES = {"q_proj": (2048, 2048), "k/v_proj": (2048, 256), "o_proj": (2048, 2048),
               "gate/up_proj": (2048, 16384), "down_proj": (16384, 2048), "lm_head": (2048, 257216)}
ROLE_COUNT = {"q_proj": 1, "k/v_proj": 2, "o_proj": 1, "gate/up_proj": 2, "down_proj": 1, "lm_head": 1}


def _kn(event: dict) -> tuple[int, int]:
    args = event.get("args", {})
    first_in = next(iter(args["input_type_shape"][0].values()))
    first_out = next(iter(args["output_type_shape"][0].values()))
    return int(first_in[-1]), int(first_out[-1])


def interleave(work: Path, variants: list[str], rounds: int = PREFILLS, tag: str = "") -> dict:
    """Plain wall medians with every variant's session loaded at once and the variants taken in
    turn each round (warm-up prefill, 1 timed prefill, warm-up step, DECODES timed decode steps
    each), so that load from other processes
    falls on all of them alike."""
    sessions = {v: _session(decoder_path(work, v), None) for v in variants}
    times = {v: {"prefill": [], "decode": []} for v in variants}
    cpu0 = _cpu_now()
    for _ in range(rounds):
        for v, session in sessions.items():
            t = {"prefill": [], "decode": []}
            _run_sequence(session, np.random.default_rng(0), 1, DECODES, t)
            times[v]["prefill"] += t["prefill"]
            times[v]["decode"] += t["decode"]
    result = {
        "rounds": rounds,
        "foreign_cores": foreign_cores(cpu0, _cpu_now()),
        "medians_s": {v: {k: statistics.median(x) for k, x in t.items()} for v, t in times.items()},
        "all_s": times,
    }
    (work / f"interleave{'_' + tag if tag else ''}.json").write_text(json.dumps(result, indent=1))
    return result


def _places(events: list[dict]) -> list[str]:
    """Each Node event of one run (in execution order) -> (place, role). Weight matmuls are the
    matmul family (fused int8 forms included) with a weight's (K, N) (prepacked weights do not show
    in args.parameter_size): 7 per layer (q, k, v, o, gate, up, down) then the LM head. A node belongs to the segment of the latest weight matmul before it:
    "layerI" runs from layer I's q projection to layer I+1's (so it holds layer I+1's input norm
    and activation quantizer), "head" is the LM head matmul and what follows it, "rest" what comes
    before layer 0's q projection (mask, rotary tables, layer 0's input norm)."""
    shapes = set(ROLE_SHAPES.values())
    weight = [e.get("args", {}).get("op_name") in WEIGHT_MATMULS and _kn(e) in shapes for e in events]
    total = sum(weight)
    if (total - 1) % 7:
        raise RuntimeError(f"{total} weight matmuls: not 7 per layer + head")
    places, roles, seen, square_seen = [], [], 0, 0
    for event, is_weight in zip(events, weight):
        seen += is_weight
        if seen == 0:
            places.append("rest")
        elif seen == total:
            places.append("head")
        else:
            places.append(f"layer{(seen - 1) // 7}")
        role = None
        if is_weight:
            kn = _kn(event)
            if seen == total:
                role = "lm_head"
            elif kn == (2048, 2048):
                role = ("q_proj", "o_proj")[square_seen % 2]
                square_seen += 1
            else:
                role = next(r for r, shape in ROLE_SHAPES.items() if shape == kn and r not in ("q_proj", "o_proj"))
        roles.append(role)
    return list(zip(places, roles))


def aggregate(trace_path: str, labels: list[str]) -> dict:
    events = json.loads(Path(trace_path).read_text())
    runs = sorted((e for e in events if e.get("cat") == "Session" and e.get("name") == "model_run"), key=lambda e: e["ts"])
    if len(runs) != len(labels):
        raise RuntimeError(f"{len(runs)} model_run events for {len(labels)} runs")
    node_events = sorted((e for e in events if e.get("cat") == "Node" and e.get("name", "").endswith("_kernel_time")),
                         key=lambda e: e["ts"])
    per_run = []
    for run in runs:
        lo, hi = run["ts"], run["ts"] + run["dur"]
        run_events = [e for e in node_events if lo <= e["ts"] <= hi]
        per_run.append(list(zip(run_events, _places(run_events))))
    out = {}
    for phase in ("prefill", "decode"):
        idx = [i for i, label in enumerate(labels) if label == phase]
        by_op, by_node, by_place = defaultdict(float), defaultdict(float), defaultdict(float)
        by_place_op = defaultdict(float)
        by_role = defaultdict(float)
        run_total = []
        node_sum = []
        for i in idx:
            s = 0.0
            for e, (place, role) in per_run[i]:
                node = e["name"][: -len("_kernel_time")]
                op = e.get("args", {}).get("op_name", "?")
                ms = e["dur"] / 1000.0
                by_op[op] += ms
                by_node[(node, op)] += ms
                by_place[place] += ms
                by_place_op[(place, op)] += ms
                if role:
                    by_role[role] += ms
                s += ms
            node_sum.append(s)
            run_total.append(runs[i]["dur"] / 1000.0)
        n = len(idx)
        out[phase] = {
            "runs": n,
            "model_run_ms_median": statistics.median(run_total),
            "node_sum_ms_mean": sum(node_sum) / n,
            "by_op_ms": dict(sorted(((k, v / n) for k, v in by_op.items()), key=lambda kv: -kv[1])),
            "by_place_ms": {k: v / n for k, v in sorted(by_place.items())},
            "by_role_ms": {k: v / n for k, v in by_role.items()},  # summed over layers
            "by_place_op_ms": {f"{p}|{o}": v / n for (p, o), v in sorted(by_place_op.items(), key=lambda kv: -kv[1])},
            "top_nodes_ms": [[node, op, v / n] for (node, op), v in sorted(by_node.items(), key=lambda kv: -kv[1])[:40]],
        }
    return out


# ---------------------------------------------------------------- report

def place_split(r: dict, phase: str) -> dict:
    places = r[phase]["by_place_ms"]
    layer_ms = [places[k] for k in sorted(places) if k.startswith("layer")]
    mean_layer = sum(layer_ms) / len(layer_ms)
    head, rest = places.get("head", 0.0), places.get("rest", 0.0)
    return {"layer_ms": layer_ms, "mean_layer": mean_layer, "head": head, "rest": rest,
            "layers": len(layer_ms), "model_18": FULL_LAYERS * mean_layer + head + rest}


def _pct(ms: float, total: float) -> str:
    return f"{ms:.1f} ({100 * ms / total:.0f}%)" if ms >= 0.05 else "-"


def report(work: Path, variants: list[str]) -> str:
    results = {}
    for v in variants:
        p = work / "profiles" / f"{v}.json"
        if p.exists():
            results[v] = json.loads(p.read_text())
    names = list(results)
    lines = []
    add = lines.append
    head_row = "| | " + " | ".join(names) + " |"
    rule = "|---|" + "---|" * len(names)
    for phase, what in (("prefill", f"prefill ({PROMPT} positions, logits_to_keep = 1)"),
                        ("decode", f"one decode step (1 token, past {PROMPT}..{PROMPT + DECODES - 1})")):
        add(f"#### Per op type, {what}: ms per call (share of the summed node time), reduced model")
        add("")
        add(head_row.replace("| |", "| op type |", 1))
        add(rule)
        ops = sorted({op for r in results.values() for op in r[phase]["by_op_ms"]},
                     key=lambda op: -max(r[phase]["by_op_ms"].get(op, 0) for r in results.values()))
        small = {n: 0.0 for n in names}
        for op in ops:
            if max(r[phase]["by_op_ms"].get(op, 0) / r[phase]["node_sum_ms_mean"] for r in results.values()) < 0.005:
                for n, r in results.items():
                    small[n] += r[phase]["by_op_ms"].get(op, 0)
                continue
            add(f"| {op} | " + " | ".join(_pct(r[phase]["by_op_ms"].get(op, 0.0), r[phase]["node_sum_ms_mean"])
                                         for r in results.values()) + " |")
        add("| other ops (each < 0.5% everywhere) | " + " | ".join(
            _pct(small[n], results[n][phase]["node_sum_ms_mean"]) for n in names) + " |")
        add("| **sum of node times** | " + " | ".join(f"**{r[phase]['node_sum_ms_mean']:.1f}**" for r in results.values()) + " |")
        add("| model_run, profiled (median) | " + " | ".join(f"{r[phase]['model_run_ms_median']:.1f}" for r in results.values()) + " |")
        add("| wall median, no profiler | " + " | ".join(f"{1000 * r['wall'][phase]['median_s']:.1f}" for r in results.values()) + " |")
        add("| other processes' CPU during the runs (cores: plain / profiled) | " + " | ".join(
            f"{r['foreign_cores']['plain']:.2f} / {r['foreign_cores']['profiled']:.2f}" if "foreign_cores" in r else "?"
            for r in results.values()) + " |")
        add("")
        add(f"#### Weight matmuls by role, {phase}: ms per call summed over the reduced model's layers "
            + ("(and effective GOP/s = 2·M·K·N / time, M = 266; the LM head M = 1)" if phase == "prefill" else "(and weight GB/s = bytes of the quantized weight / time)"))
        add("")
        add(head_row.replace("| |", "| matmul (K x N) |", 1))
        add(rule)
        for role in (*ROLES, "lm_head"):
            k, n_ = ROLE_SHAPES[role]
            cells = []
            for name, r in results.items():
                ms = r[phase]["by_role_ms"].get(role, 0.0)
                count = ROLE_COUNT[role] * (1 if role == "lm_head" else len(place_split(r, phase)["layer_ms"]))
                m = 1 if (role == "lm_head" or phase == "decode") else PROMPT
                if phase == "prefill":
                    rate = 2 * m * k * n_ * count / (ms / 1000) / 1e9 if ms else 0
                    cells.append(f"{ms:.1f} ({rate:.0f} GOP/s)")
                else:
                    bits = 8 if name.startswith("int8") else (32 if name.startswith("fp32") else 4)
                    block = 128 if "b128" in name else 32
                    wbytes = k * n_ * bits / 8 + (k * n_ / block * 4.5 if bits == 4 else 4 * n_)
                    rate = wbytes * count / (ms / 1000) / 1e9 if ms else 0
                    cells.append(f"{ms:.2f} ({rate:.0f} GB/s)")
            add(f"| {role} ({k} x {n_}) | " + " | ".join(cells) + " |")
        add("")
        add(f"#### Where the {phase} time goes by place, and the 18-layer extrapolation (ms)")
        add("")
        add(head_row.replace("| |", "| place |", 1))
        add(rule)
        splits = {n: place_split(r, phase) for n, r in results.items()}
        layers = max(sp["layers"] for sp in splits.values())
        for i in range(layers):
            add(f"| layer segment {i} | " + " | ".join(f"{sp['layer_ms'][i]:.1f}" for sp in splits.values()) + " |")
        add("| mean per layer | " + " | ".join(f"{sp['mean_layer']:.1f}" for sp in splits.values()) + " |")
        add("| LM head (2048 x 257216) | " + " | ".join(f"{sp['head']:.1f}" for sp in splits.values()) + " |")
        add("| rest (mask, rotary tables, first norm) | " + " | ".join(f"{sp['rest']:.1f}" for sp in splits.values()) + " |")
        add("| **extrapolated 18 layers: 18 x mean + head + rest** | " + " | ".join(
            f"**{sp['model_18']:.0f}**" for sp in splits.values()) + " |")
        add("| LM head share of the 18-layer total | " + " | ".join(
            f"{100 * sp['head'] / sp['model_18']:.0f}%" for sp in splits.values()) + " |")
        add("")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", choices=["build", "probe", "profile", "one", "interleave", "report"])
    parser.add_argument("--work", type=Path, default=WORK)
    parser.add_argument("--layers", type=int, default=3)
    parser.add_argument("--variants", default="int8,q4_acc0,q4_acc4,q4_acc4_b128")
    parser.add_argument("--tag", default="")
    parser.add_argument("--rounds", type=int, default=PREFILLS, help="interleave: rounds")
    parser.add_argument("--config", action="append", default=[], help="session config entry KEY=VALUE")
    parser.add_argument("--out", type=Path, default=None, help="write the report's tables here too")
    args = parser.parse_args(argv)
    for entry in args.config:
        key, value = entry.split("=", 1)
        _EXTRA_CONFIG[key] = value
    variants = args.variants.split(",")
    if args.command == "build":
        build(args.work, args.layers)
    elif args.command == "probe":
        result = probe()
        args.work.mkdir(parents=True, exist_ok=True)
        (args.work / "probe.json").write_text(json.dumps(result, indent=1))
        print(json.dumps(result, indent=1))
    elif args.command == "interleave":
        result = interleave(args.work, variants, args.rounds, args.tag)
        print(json.dumps({k: result[k] for k in ("rounds", "foreign_cores", "medians_s")}, indent=1))
    elif args.command == "one":  # one variant in this process
        r = profile_variant(args.work, variants[0], args.tag)
        print(json.dumps({k: r[k] for k in ("variant", "load_s", "wall", "profiled_wall")}, indent=1))
    elif args.command == "profile":  # each variant in its own process (clean arena, no cross-talk)
        for v in variants:
            cmd = [sys.executable, __file__, "one", "--work", str(args.work), "--variants", v]
            if args.tag:
                cmd += ["--tag", args.tag]
            for entry in args.config:
                cmd += ["--config", entry]
            print("+", " ".join(cmd), flush=True)
            subprocess.run(cmd, check=True)
    else:
        text = report(args.work, variants)
        print(text)
        if args.out:
            args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
