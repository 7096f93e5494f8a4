"""Static int8 (QDQ, calibrated with neural-compressor) and accuracy-aware tuning on the demo model:
the quantized graphs run in onnxruntime and keep the fp32 graphs' answers; tuning meets its target
by falling nodes back to fp32 and says which; bad calibration sources fail before any work."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from pgexport.demo import EVAL_FILE, load_split
from pgexport.demo.task import KIND_PREFIXES
from pgexport.errors import BadInputError, GateFailedError, UnsupportedError
from pgexport.manifest import read_manifest, write_manifest
from pgexport.runtime import OnnxPaliGemma, open_image
from pgexport.metrics import exact_match, max_rel_diff, row_cosines, score_answers
from pgexport.validate import EVAL_MAX_NEW_TOKENS

pytest.importorskip("neural_compressor", reason="static int8 needs the quantize extra (neural-compressor)")

from pgexport.quantize.calibration import calibration_feeds  # noqa: E402
from pgexport.quantize.static import quantize_static_int8  # noqa: E402
from pgexport.quantize.tune import tune_static_int8  # noqa: E402

GRAPHS = ("vision_encoder", "decoder_model_merged")
CALIBRATION_ROWS = 32  # the default


@pytest.fixture(scope="module")
def demo(demo_onnx):
    """The demo model's artifact (conftest's --int8 export; this file quantizes its fp32 graphs)."""
    return demo_onnx


@pytest.fixture(scope="module")
def static_graphs(demo, tmp_path_factory):
    """Both graphs quantized to static int8 on the default calibration data (the demo task)."""
    folder = tmp_path_factory.mktemp("static-graphs")
    infos = {}
    for graph in GRAPHS:
        feeds = calibration_feeds(demo, graph, limit=CALIBRATION_ROWS)
        infos[graph] = quantize_static_int8(_fp32(demo, graph), folder / f"{graph}_int8_static.onnx", feeds, progress=False)
    return folder, infos


def _fp32(artifact: Path, graph: str) -> Path:
    return artifact / "onnx" / f"{graph}.onnx"


def _conv_weight_bytes(path: Path) -> int:
    """Bytes of the fp32 Conv weights of a graph (its Conv nodes' float initializers)."""
    model = onnx.load(str(path))
    floats = {t.name: t for t in model.graph.initializer if t.data_type == onnx.TensorProto.FLOAT}
    return sum(onnx.numpy_helper.to_array(floats[i]).nbytes for n in model.graph.node if n.op_type == "Conv"
               for i in n.input[1:2] if i in floats)


def _with_graphs(artifact: Path, folder: Path, graphs: dict[str, Path]) -> Path:
    """A copy of the artifact whose fp32 graph files are the given ones (so OnnxPaliGemma runs them),
    its manifest rewritten to list them (the runtime refuses graphs the manifest does not describe)."""
    shutil.copytree(artifact, folder)
    for graph, path in graphs.items():
        shutil.copy(path, folder / "onnx" / f"{graph}.onnx")
    fields = {k: v for k, v in read_manifest(folder).items() if k not in ("files", "versions")}
    write_manifest(folder, **fields)
    return folder


def _answers(artifact: Path, rows) -> list[str]:
    runtime, answers = OnnxPaliGemma(artifact, dtype="fp32"), []
    for start in range(0, len(rows), 50):
        chunk = rows[start : start + 50]
        answers += [g.text for g in runtime.generate([open_image(r.image) for r in chunk], [r.prefix for r in chunk], EVAL_MAX_NEW_TOKENS)]
    return answers


def _assert_keeps_answers(before: list[str], after: list[str], rows) -> None:
    """The issue's goal for static int8 on the 200 held-out rows: exact match drops by at most 1
    point; and the caption, color and count answers are 95% the same, the detect and segment
    figures (IoU-based, against the suffixes) within 5 points. (Their answers are 21 to 63 tokens:
    one location bin or mask code that moves changes the answer, not the box; 0.78 and 0.90 of all
    answers were the same in two runs.)"""
    from pgexport.demo.vqvae import numpy_decode

    scores = [score_answers(answers, rows, KIND_PREFIXES, numpy_decode()) for answers in (before, after)]
    assert 100 * (scores[0]["exact_match"] - scores[1]["exact_match"]) <= 1.0, scores
    text = [i for i, row in enumerate(rows) if row.kind in ("caption", "color", "count")]
    assert np.mean([before[i] == after[i] for i in text]) >= 0.95
    for kind in ("detect", "segment"):
        assert scores[0]["per_kind"][kind] - scores[1]["per_kind"][kind] <= 0.05, (kind, scores)


def _min_logits_cosine(reference: list[np.ndarray], candidate: list[np.ndarray]) -> float:
    """The gate's min_cosine: the smallest cosine over every position of every row."""
    return float(min(row_cosines(ref, cand).min() for ref, cand in zip(reference, candidate)))


def _dequantized_inputs(path: Path) -> dict[str, bool]:
    """MatMul/Conv node name -> whether an input comes from DequantizeLinear (runs in int8)."""
    model = onnx.load(str(path))
    dequantized = {o for n in model.graph.node if n.op_type == "DequantizeLinear" for o in n.output}
    # neural-compressor names a quantized node after its source with "_quant" appended.
    return {
        n.name.removesuffix("_quant"): any(i in dequantized for i in n.input)
        for n in model.graph.node if n.op_type in ("MatMul", "Conv")
    }


def _with_external_data(src: Path, folder: Path) -> Path:
    """A copy of the graph with its weights in an external data file, as graphs over 1 GiB are
    exported (the rewritten copies the quantizer makes must find that file)."""
    folder.mkdir()
    model = onnx.load(str(src))
    onnx.save(model, str(folder / src.name), save_as_external_data=True, location=src.name + ".data")
    return folder / src.name


def _int8_weights(path: Path) -> dict[str, np.ndarray]:
    """The graph's int8 initializers (its quantized weights) and their scales, by name."""
    model = onnx.load(str(path))
    weights = {t.name: onnx.numpy_helper.to_array(t) for t in model.graph.initializer if t.data_type == onnx.TensorProto.INT8}
    scales = {f"{n.removesuffix('_quantized')}_scale" for n in weights}
    return weights | {t.name: onnx.numpy_helper.to_array(t) for t in model.graph.initializer if t.name in scales}


def _lm_head(artifact: Path) -> str:
    """The decoder's last MatMul (hidden -> vocabulary logits)."""
    model = onnx.load(str(_fp32(artifact, "decoder_model_merged")))
    return [n.name for n in model.graph.node if n.op_type == "MatMul"][-1]


def test_static_int8_keeps_the_demo_answers(demo, static_graphs, tmp_path):
    folder, infos = static_graphs
    for graph, info in infos.items():
        ops = info["op_types"]
        assert ops.get("QuantizeLinear", 0) > 0 and ops.get("DequantizeLinear", 0) > 0, graph
        assert info["quantized_nodes"] >= 8, (graph, info)  # vision: 2 layers x 6 + projector; decoder: 4 x 7 + head
        # The patch embedding (the one Conv) stays fp32, as it was: 0.2% of the 3B encoder, a third of the demo's.
        conv = _conv_weight_bytes(_fp32(demo, graph))
        assert (graph == "vision_encoder") == (conv > 0)
        assert _conv_weight_bytes(folder / f"{graph}_int8_static.onnx") == conv, graph
        assert info["bytes_after"] - conv < 0.3 * (info["bytes_before"] - conv), (graph, info)
    decoder = folder / "decoder_model_merged_int8_static.onnx"
    assert _dequantized_inputs(decoder)[_lm_head(demo)]
    # The decoder's overridable logits_to_keep (a graph input with a default) survives quantization.
    assert "logits_to_keep" in {i.name for i in ort.InferenceSession(str(decoder)).get_overridable_initializers()}
    # 7-bit weights: onnxruntime's int8 kernels on CPUs without AVX-512 VNNI (AVX2) saturate int16
    # sums of two uint8 x int8 products past 64 (2 x 255 x 64 = 32640); the graphs must not depend
    # on the CPU that made them or runs them (pgexport/quantize/static.py).
    for graph in GRAPHS:
        weights = [w for name, w in _int8_weights(folder / f"{graph}_int8_static.onnx").items() if not name.endswith("_scale")]
        assert weights and max(int(np.abs(w.astype(np.int32)).max()) for w in weights) <= 64, graph

    # Prefill logits and greedy tokens on the gate's left-padded sample batch, against the fp32 graphs.
    candidate = _with_graphs(demo, tmp_path / "static", {g: folder / f"{g}_int8_static.onnx" for g in GRAPHS})
    fp32, static = OnnxPaliGemma(demo, dtype="fp32"), OnnxPaliGemma(candidate, dtype="fp32")
    from pgexport.validate import default_samples

    images, prompts = zip(*default_samples(4))
    inputs = fp32.preprocess(list(images), list(prompts))
    assert (inputs["attention_mask"] == 0).any(), "the batch must be left-padded"
    logits = [
        runtime.sessions["decoder_model_merged"].run(["logits"], runtime.prefill_feed(**inputs))[0]
        for runtime in (fp32, static)
    ]
    keep = inputs["attention_mask"].reshape(-1).astype(bool)
    cosine = _min_logits_cosine([logits[0].reshape(-1, logits[0].shape[-1])[keep]], [logits[1].reshape(-1, logits[1].shape[-1])[keep]])
    assert cosine >= 0.9, cosine
    # The same figure on any x86 CPU: the int8 kernels (QLinearMatMul, fused at the default level)
    # agree with the graph's float semantics (no fusion: QuantizeLinear/DequantizeLinear + fp32
    # MatMul), which do not depend on the CPU. Full-range weights read 0.93 vs 0.99 on AVX2.
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    emulated = ort.InferenceSession(str(decoder), options).run(["logits"], static.prefill_feed(**inputs))[0]
    assert _min_logits_cosine([emulated.reshape(-1, emulated.shape[-1])[keep]], [logits[1].reshape(-1, logits[1].shape[-1])[keep]]) >= 0.999
    tokens = [runtime.generate_ids(**inputs, max_new_tokens=16, stop_at_eos=False)[0] for runtime in (fp32, static)]
    assert np.mean(tokens[0] == tokens[1]) >= 0.9, tokens

    rows = load_split(EVAL_FILE)
    before = _answers(demo, rows)
    assert exact_match(before, [r.suffix for r in rows]) >= 0.55  # 0.61 recorded: boxes and masks are rarely exact to the bin
    _assert_keeps_answers(before, _answers(candidate, rows), rows)


def test_streamed_path_matches_neural_compressor(demo, static_graphs, tmp_path):
    """The bounded-memory path (used above 2 GiB of weights, forced here) quantizes the same
    MatMuls as neural-compressor and keeps the demo's answers."""
    graph = "decoder_model_merged"
    feeds = calibration_feeds(demo, graph, limit=CALIBRATION_ROWS)
    dst = tmp_path / f"{graph}_int8_static.onnx"
    src = _with_external_data(_fp32(demo, graph), tmp_path / "source")
    info = quantize_static_int8(src, dst, feeds, progress=False, streamed=True)
    assert sorted(p.name for p in src.parent.iterdir()) == [src.name, src.name + ".data"]  # the source untouched
    reference = static_graphs[1][graph]
    assert info["streamed"] and info["external_data"] == dst.name + ".data"
    assert info["quantized_nodes"] == reference["quantized_nodes"]
    assert _dequantized_inputs(dst) == _dequantized_inputs(static_graphs[0] / f"{graph}_int8_static.onnx")
    # The same int8 weights and scales, bit for bit (both on 7 bits).
    streamed, reference_weights = _int8_weights(dst), _int8_weights(static_graphs[0] / f"{graph}_int8_static.onnx")
    assert sorted(streamed) == sorted(reference_weights) and len(streamed) >= 2 * info["quantized_nodes"]
    for name, value in streamed.items():
        np.testing.assert_array_equal(value, reference_weights[name], err_msg=name)
    # Weights read one row at a time: the same files, byte for byte.
    rowwise = tmp_path / "rowwise" / dst.name
    quantize_static_int8(src, rowwise, feeds, progress=False, streamed=True, chunk_bytes=1)
    for name in (dst.name, dst.name + ".data"):
        assert (rowwise.parent / name).read_bytes() == (dst.parent / name).read_bytes(), name
    rows = load_split(EVAL_FILE)
    _assert_keeps_answers(_answers(demo, rows), _answers(_streamed_artifact(demo, tmp_path, dst), rows), rows)


def _streamed_artifact(demo: Path, tmp_path: Path, decoder: Path) -> Path:
    folder = _with_graphs(demo, tmp_path / "streamed", {"decoder_model_merged": decoder})
    shutil.copy(decoder.parent / (decoder.name + ".data"), folder / "onnx")  # the .onnx names its data file
    return folder


def test_tuning_falls_back_until_the_target_holds(demo, static_graphs, tmp_path):
    """Metric: the gate's prefill min logits cosine vs the fp32 decoder on held-out rows, target
    halfway from the fully quantized decoder's figure (0.9996 here) to 1, which it misses; tuning
    must fall nodes back to fp32 until it holds."""
    graph = "decoder_model_merged"
    feeds = calibration_feeds(demo, graph, limit=CALIBRATION_ROWS)
    held_out = calibration_feeds(demo, graph, source=EVAL_FILE, limit=8)  # a JSONL source
    reference_session = ort.InferenceSession(str(_fp32(demo, graph)))
    reference = [reference_session.run(["logits"], feed)[0] for feed in held_out]
    calls = []

    def evaluate(path: Path) -> float:
        session = ort.InferenceSession(str(path))
        calls.append(path)
        return _min_logits_cosine(reference, [session.run(["logits"], feed)[0] for feed in held_out])

    untuned = evaluate(static_graphs[0] / f"{graph}_int8_static.onnx")
    target = 1 - (1 - untuned) / 2  # halfway from the untuned graph's figure to 1: it misses it
    assert untuned < target, f"the untuned graph already meets the target ({untuned}): the test proves nothing"

    dst = tmp_path / f"{graph}_int8_static.onnx"
    info = tune_static_int8(_fp32(demo, graph), dst, feeds, evaluate, target, progress=False, max_trials=60)
    assert info["baseline"] > 0.9999
    assert info["metric"] >= target * info["baseline"], info
    assert info["history"][1]["metric"] < target * info["baseline"]  # the first candidate: everything int8
    assert 1 <= info["trials"] <= 60 and info["fell_back"], info
    int8 = _dequantized_inputs(dst)
    assert all(not int8[name] for name in info["fell_back"]), info["fell_back"]
    assert sum(int8.values()) == info["quantized_nodes"] >= 20  # most of the decoder stays int8
    assert info["metric"] == pytest.approx(evaluate(dst))

    # Unreachable within the trials given: a gate failure, the report attached, nothing written.
    missing = tmp_path / "never.onnx"
    with pytest.raises(GateFailedError) as failure:
        tune_static_int8(_fp32(demo, graph), missing, feeds, evaluate, 0.99999, progress=False, max_trials=2)
    # (neural-compressor's trial count leaves out its "apply all recipes" rerun of the first config)
    assert 1 <= failure.value.report["trials"] <= 3 and not missing.exists()


def test_excluded_nodes_stay_fp32(demo, tmp_path):
    graph = "decoder_model_merged"
    feeds = calibration_feeds(demo, graph, limit=4)
    dst = tmp_path / "excluded.onnx"
    head = _lm_head(demo)
    src = _with_external_data(_fp32(demo, graph), tmp_path / "source")  # and logits_to_keep: a rewritten copy
    info = quantize_static_int8(src, dst, feeds, exclude_nodes=[head], progress=False, streamed=False)
    int8 = _dequantized_inputs(dst)
    assert not int8[head] and info["excluded"] == [head] and head in info["fp32_nodes"]
    assert sum(int8.values()) == info["quantized_nodes"] >= 20
    with pytest.raises(BadInputError, match="no node named"):
        quantize_static_int8(_fp32(demo, graph), tmp_path / "x.onnx", feeds, exclude_nodes=["no_such_node"], progress=False)


def test_bad_quantize_inputs_leave_nothing(demo, static_graphs, tmp_path):
    graph = "vision_encoder"
    feeds = calibration_feeds(demo, graph, limit=2)
    dst = tmp_path / "out.onnx"
    already = static_graphs[0] / f"{graph}_int8_static.onnx"
    cases = {
        "already quantized": (already, feeds),
        "no calibration feeds": (_fp32(demo, graph), []),
        "has inputs": (_fp32(demo, graph), [{"input_ids": np.zeros((1, 3), np.int64)}]),
        "no such file": (tmp_path / "missing.onnx", feeds),
    }
    for message, (src, given) in cases.items():
        with pytest.raises(BadInputError, match=message):
            quantize_static_int8(src, dst, given, progress=False)
    with pytest.raises(BadInputError, match="accuracy target"):
        tune_static_int8(_fp32(demo, graph), dst, feeds, lambda path: 1.0, 1.5, progress=False)
    assert not dst.exists() and not list(tmp_path.glob(".nc-workspace*"))


def test_tuning_refuses_a_graph_over_2_gib(demo, tmp_path, monkeypatch):
    """neural-compressor's tuning loop holds the whole graph in one protobuf: a graph past the
    streamed threshold (the 3B decoder) gets exit 7 before any work, nothing written."""
    from pgexport.quantize import static

    graph = "vision_encoder"
    feeds = calibration_feeds(demo, graph, limit=2)
    monkeypatch.setattr(static, "STREAMED_THRESHOLD", 1)
    dst = tmp_path / "out" / "tuned.onnx"
    with pytest.raises(UnsupportedError, match="over 2 GiB") as error:
        tune_static_int8(_fp32(demo, graph), dst, feeds, lambda path: 1.0, 0.99, progress=False)
    assert error.value.exit_code == 7 and not dst.parent.exists()


def test_bad_calibration_sources_fail_before_any_work(demo, tmp_path, monkeypatch):
    def no_session(*args, **kwargs):
        raise AssertionError("a session was opened before the source was checked")

    monkeypatch.setattr(ort, "InferenceSession", no_session)
    empty = tmp_path / "empty"
    empty.mkdir()
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "a.png").write_bytes(b"not a png")
    no_rows = tmp_path / "no_rows.jsonl"
    no_rows.write_text("\n")
    bad_row = tmp_path / "bad_row.jsonl"
    bad_row.write_text('{"image": "a.png"}\n')
    missing_image = tmp_path / "missing_image.jsonl"
    missing_image.write_text('{"image": "nowhere.png", "prefix": "caption en"}\n')
    cases = [
        (empty, "has no images"),
        (broken, "cannot read calibration image"),
        (no_rows, "has no rows"),
        (bad_row, "bad_row.jsonl:1"),
        (missing_image, "cannot read calibration image"),
        (tmp_path / "nowhere", "no such file or folder"),
    ]
    for source, message in cases:
        with pytest.raises(BadInputError, match=message):
            calibration_feeds(demo, "decoder_model_merged", source=source)
    with pytest.raises(BadInputError, match="no calibration for graph"):
        calibration_feeds(demo, "embed_tokens")
    with pytest.raises(BadInputError, match="not a pgexport ONNX artifact"):
        calibration_feeds(tmp_path, "vision_encoder")


def test_calibration_feeds_are_the_runtime_feeds(demo):
    """A folder source: each image asked "caption en"; the decoder feed is the runtime's prefill feed."""
    rows = load_split(EVAL_FILE)[:3]
    folder = Path(rows[0].image).parent
    feeds = calibration_feeds(demo, "decoder_model_merged", source=folder, limit=3)
    vision = calibration_feeds(demo, "vision_encoder", source=folder, limit=3)
    assert len(feeds) == len(vision) == 3
    runtime = OnnxPaliGemma(demo, dtype="fp32")
    first = sorted(p for p in folder.iterdir() if p.suffix == ".png")[0]
    inputs = runtime.preprocess([open_image(first)], ["caption en"])
    expected = runtime.prefill_feed(inputs["input_ids"], inputs["attention_mask"], inputs["pixel_values"])
    assert set(feeds[0]) == set(expected)
    for name, value in expected.items():
        if value.size and np.issubdtype(value.dtype, np.floating):  # the embeddings: the same fp32 graphs in another
            # session, whose threads may split the sums otherwise (last bits: 6.7e-6 of a range of ~10 seen)
            assert max_rel_diff(value, feeds[0][name]) <= 1e-6, name
        else:
            np.testing.assert_array_equal(feeds[0][name], value, err_msg=name)
    np.testing.assert_array_equal(vision[0]["pixel_values"], inputs["pixel_values"].astype(np.float32))
