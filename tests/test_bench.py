"""`pgexport bench` on the demo artifact and the demo checkpoint at tiny settings: the report's
shape and arithmetic, never its timings (the machine is shared; no threshold is asserted)."""

import json
import math

import numpy as np
import pytest
from click.testing import CliRunner

from pgexport.bench import bench, to_markdown
from pgexport.cli import main
from pgexport.errors import BadInputError

TINY = {"batches": [1, 2], "new_tokens": 4, "warmup": 1, "runs": 2}
TINY_ARGS = ["--batch", "1,2", "--new-tokens", "4", "--warmup", "1", "--runs", "2"]
STATS = ("vision_s", "prefill_s", "ttft_s", "per_token_s")


@pytest.fixture(scope="module")
def cli_run(demo_onnx, tmp_path_factory):
    """One CLI run: the artifact (fp32 and int8) first, so it is the baseline, then the checkpoint."""
    from pgexport.demo import CHECKPOINT_DIR

    folder = tmp_path_factory.mktemp("bench-out")
    paths = {"json": folder / "bench.json", "markdown": folder / "bench.md", "plot": folder / "bench.png"}
    args = ["bench", str(demo_onnx), str(CHECKPOINT_DIR), *TINY_ARGS, "--dtype", "fp32,int8"]
    for option, path in paths.items():
        args += [f"--{option}", str(path)]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    return json.loads(paths["json"].read_text()), paths, result.output


def test_one_row_per_target_dtype_and_batch(cli_run, demo_onnx):
    report, _, _ = cli_run
    rows = {(r["kind"], r["engine"], r["dtype"], r["batch"]) for r in report["results"]}
    expected = {(kind, engine, dtype, batch) for batch in (1, 2) for kind, engine, dtype in (
        ("artifact", "onnxruntime", "fp32"), ("artifact", "onnxruntime", "int8"), ("checkpoint", "pytorch-eager", "fp32"))}
    assert rows == expected and len(report["results"]) == 6
    assert report["baseline"] == f"{demo_onnx} [onnxruntime fp32]"
    assert report["skipped"] == []


def test_every_figure_present_positive_and_ordered(cli_run):
    report, _, _ = cli_run
    for row in report["results"]:
        for key in STATS:
            stats = row[key]
            assert all(stats[k] > 0 for k in ("p50", "p90", "p99", "mean", "min", "max")), (row["label"], key, stats)
            assert stats["min"] <= stats["p50"] <= stats["p90"] <= stats["p99"] <= stats["max"], (row["label"], key)
        assert row["ttft_s"]["n"] == TINY["runs"]
        assert row["per_token_s"]["n"] == TINY["runs"] * (TINY["new_tokens"] - 1)
        assert row["load_s"] > 0 and row["tokens_per_s"] > 0 and row["e2e_tokens_per_s"] > 0
        assert math.isclose(row["tokens_per_s"], row["batch"] / row["per_token_s"]["p50"])
        assert row["peak_rss_bytes"] > 0 and row["load_peak_rss_bytes"] > 0
        assert row["peak_gpu_bytes"] is None  # CPU run
        assert row["latency_only"] is None
        assert row["prompt_tokens"] == row["image_tokens"] + report["settings"]["prompt_tokens"]


def test_floors_present_and_consistent(cli_run):
    report, _, _ = cli_run
    bandwidth = report["hardware"]["copy_bandwidth"]["gbps_best"]
    assert bandwidth > 0 and report["hardware"]["matmul"]["fp32"]["gflops_best"] > 0
    assert report["hardware"]["matmul"]["int8"]["gflops_best"] > 0
    probes = report["hardware"]["probes"]
    assert len(probes) == 3 + 1  # one before each (target, dtype), one at the end
    assert math.isclose(bandwidth, max(probe["copy_gbps"] for probe in probes))
    assert all(row["probe_before"]["copy_gbps"] > 0 for row in report["results"])
    by_label = {}
    for row in report["results"]:
        floor = row["floor"]
        for key in ("decoder_weight_bytes", "kv_cache_bytes", "decode_floor_s", "decoder_params", "prefill_flops",
                    "prefill_floor_s", "decode_x_floor", "prefill_x_floor", "decode_gbps"):
            assert floor[key] > 0, (row["label"], key)
        assert math.isclose(floor["decode_floor_s"], floor["decode_bytes"] / (bandwidth * 1e9))
        assert math.isclose(floor["decode_x_floor"], row["per_token_s"]["p50"] / floor["decode_floor_s"])
        assert math.isclose(floor["prefill_flops"], 2 * floor["decoder_params"] * row["batch"] * row["prompt_tokens"])
        assert math.isclose(floor["prefill_x_floor"], row["prefill_s"]["p50"] / floor["prefill_floor_s"])
        by_label.setdefault(row["label"], []).append(row)
    # int8 decoder weights are read as int8: under half the fp32 bytes; the KV cache grows with the batch.
    fp32, int8 = (next(r for r in report["results"] if r["engine"] == "onnxruntime" and r["dtype"] == d) for d in ("fp32", "int8"))
    assert int8["floor"]["decoder_weight_bytes"] < 0.5 * fp32["floor"]["decoder_weight_bytes"]
    # prefill's floor is over the peak of the arithmetic the MatMuls use, read from the graph
    assert (fp32["floor"]["matmul_peak"], int8["floor"]["matmul_peak"]) == ("fp32", "int8")
    for rows in by_label.values():
        one, two = sorted(rows, key=lambda r: r["batch"])
        assert two["floor"]["kv_cache_bytes"] == 2 * one["floor"]["kv_cache_bytes"]


def test_ratios_to_the_baseline_come_from_the_medians(cli_run):
    report, _, _ = cli_run
    rows = report["results"]
    for row in rows:
        base = next(r for r in rows if r["label"] == report["baseline"] and r["batch"] == row["batch"])
        ratio = row["vs_baseline"]
        assert ratio["baseline"] == report["baseline"]
        assert math.isclose(ratio["per_token_speedup"], base["per_token_s"]["p50"] / row["per_token_s"]["p50"])
        assert math.isclose(ratio["ttft_speedup"], base["ttft_s"]["p50"] / row["ttft_s"]["p50"])
        if row is base:
            assert ratio["per_token_speedup"] == 1.0 and ratio["ttft_speedup"] == 1.0


def test_environment_is_recorded(cli_run):
    env = cli_run[0]["environment"]
    assert env["cpu"]["model"] and env["cpu"]["flags"] and env["threads"] >= 1
    assert {"torch", "transformers", "onnxruntime", "numpy"} <= set(env["versions"])
    assert "CPUExecutionProvider" in env["onnxruntime_providers"]


def test_markdown_table_has_a_row_per_result(cli_run):
    report, paths, printed = cli_run
    markdown = paths["markdown"].read_text()
    assert markdown == to_markdown(report) and markdown.strip() in printed
    table = [line for line in markdown.splitlines() if line.startswith("| ")]
    header, rows = table[0], table[1:]
    assert "TTFT speedup" in header and "decode x floor" in header and "prefill x floor" in header
    assert len(rows) == len(report["results"])
    for line, row in zip(rows, report["results"]):
        cells = [cell.strip() for cell in line.strip("|").split("|")]
        assert cells[:5] == [row["target"], row["engine"], row["dtype"], str(row["resolution"]), str(row["batch"])]
        expected = "baseline" if row["label"] == report["baseline"] else f"{row['vs_baseline']['per_token_speedup']:.2f}x"
        assert cells[-1] == expected
    assert f"{report['hardware']['copy_bandwidth']['gbps_best']:.1f} GB/s" in markdown


def test_plot_is_written(cli_run):
    pytest.importorskip("matplotlib", reason="matplotlib not installed (the optional `bench` extra): the plot is skipped")
    report, paths, _ = cli_run
    assert report["plot"] == {"path": str(paths["plot"]), "skipped": None}
    assert paths["plot"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_resolution_variant_is_labelled_latency_only():
    from pgexport.demo import CHECKPOINT_DIR

    native = json.loads((CHECKPOINT_DIR / "config.json").read_text())["vision_config"]
    larger = 2 * native["image_size"]
    report = bench([CHECKPOINT_DIR], resolutions=[native["image_size"], larger], batches=[1], new_tokens=2, warmup=0,
                   runs=1, progress=False)
    native_row, variant = report["results"]
    assert native_row["latency_only"] is None and variant["latency_only"].startswith("latency-only (untrained at this size)")
    assert variant["resolution"] == larger
    assert variant["image_tokens"] == 4 * native_row["image_tokens"]
    assert "| 1 |" in to_markdown(report) and f"{larger}*" in to_markdown(report)


@pytest.mark.parametrize("kind", ["empty folder", "file", "missing"])
def test_a_bad_target_exits_4(tmp_path, kind):
    target = tmp_path / "target"
    if kind == "empty folder":
        target.mkdir()
    elif kind == "file":
        target.write_text("not a model")
    result = CliRunner().invoke(main, ["bench", str(target), *TINY_ARGS])
    assert result.exit_code == BadInputError.exit_code == 4, result.output
    assert "error:" in result.output
    with pytest.raises(BadInputError):
        bench([target], **TINY, progress=False)


def test_an_unknown_baseline_is_refused_before_anything_runs(demo_onnx):
    result = CliRunner().invoke(main, ["bench", str(demo_onnx), "--baseline", "no-such-target", *TINY_ARGS])
    assert result.exit_code == 4 and "baseline 'no-such-target'" in result.output


def test_a_dtype_no_target_has_says_so(demo_onnx):
    result = CliRunner().invoke(main, ["bench", str(demo_onnx), "--dtype", "q4"])
    assert result.exit_code == 4, result.output
    assert "nothing to measure" in result.output and "no q4 graphs (has fp32, int8)" in result.output


@pytest.mark.parametrize("level, arithmetic", [(4, "int8"), (0, "fp32")])
def test_q4_arithmetic_follows_accuracy_level(tmp_path, level, arithmetic):
    """MatMulNBits at accuracy_level 4 quantizes its activations (int8 arithmetic, int8 peak);
    at 0 it computes in the input's type."""
    import numpy as np
    from onnx import TensorProto, helper, numpy_helper, save

    from pgexport.bench import graph_weight_stats

    weights = numpy_helper.from_array(np.zeros((8, 1, 16), np.uint8), "w")
    scales = numpy_helper.from_array(np.ones((8,), np.float32), "s")
    node = helper.make_node("MatMulNBits", ["x", "w", "s"], ["y"], domain="com.microsoft", K=32, N=8, bits=4,
                            block_size=32, accuracy_level=level)
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 32])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 8])], [weights, scales])
    save(helper.make_model(graph), str(tmp_path / "g.onnx"))
    assert graph_weight_stats(tmp_path / "g.onnx") == (8 * 16 + 8 * 4, 8, arithmetic)


def test_bench_times_the_runtime_loop_through_its_step_hook(demo_onnx):
    """The hook hears vision start and end, then one token per step; with or without it, the
    loop gives the same tokens; bench's Timing reads those stamps."""
    from pgexport.bench import Clock, OnnxRunner, make_inputs, resolve_target
    from pgexport.config import BenchConfig
    from pgexport.runtime import STEP_START, STEP_TOKEN, STEP_VISION

    target = resolve_target(demo_onnx)
    runner = OnnxRunner(target, "fp32", BenchConfig(batches=(2,)))
    inputs = make_inputs(target.config, 2, 5, target.native_resolution)
    events = []
    hooked, _ = runner.model.generate_ids(**inputs, max_new_tokens=5, stop_at_eos=False, on_step=events.append)
    assert events == [STEP_START, STEP_VISION] + [STEP_TOKEN] * 5
    plain, _ = runner.model.generate_ids(**inputs, max_new_tokens=5, stop_at_eos=False)
    assert np.array_equal(hooked, plain) and hooked.shape == (2, 5)
    timing = runner.run(inputs, 5, Clock("cpu"))
    assert len(timing.steps) == 4 and min(timing.steps) > 0
    assert 0 < timing.vision < timing.ttft and math.isclose(timing.ttft, timing.vision + timing.prefill)


def test_prefill_in_row_chunks_gives_the_batched_outputs(demo_onnx):
    """prefill_rows=1: the prompt goes through the decoder one row at a time, the KV caches are
    joined, and decoding goes on batched: same tokens, logits equal to float rounding."""
    from pgexport.runtime import OnnxPaliGemma
    from pgexport.validate import default_samples

    images, prompts = zip(*default_samples())
    whole = OnnxPaliGemma(demo_onnx, dtype="fp32")
    inputs = whole.preprocess(list(images), list(prompts))
    assert inputs["attention_mask"].min() == 0  # the rows are left-padded: the mask is sliced with them
    tokens, logits = whole.generate_ids(**inputs, max_new_tokens=6, stop_at_eos=False, keep_logits=True)
    chunked = OnnxPaliGemma(demo_onnx, dtype="fp32", prefill_rows=1)
    tokens_1, logits_1 = chunked.generate_ids(**inputs, max_new_tokens=6, stop_at_eos=False, keep_logits=True)
    assert np.array_equal(tokens, tokens_1)
    assert max(float(np.abs(a - b).max()) for a, b in zip(logits, logits_1)) < 1e-4
    with pytest.raises(BadInputError, match="prefill_rows"):
        OnnxPaliGemma(demo_onnx, dtype="fp32", prefill_rows=-1)
