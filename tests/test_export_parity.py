"""fp32 exports of random-weight PaliGemma 1 and 2 shapes against transformers, through ONNX Runtime."""

import json

import numpy as np
import onnx
import pytest

from pgexport.demo import sample_inputs
from pgexport.manifest import sha256_file
from pgexport.runtime import OnnxPaliGemma

PRESETS = ["tiny-pg1", "tiny-pg1-mqa4", "tiny-pg2", "tiny-pg2-448"]


@pytest.mark.slow
@pytest.mark.parametrize("preset", PRESETS)
def test_fp32_export_generates_like_transformers(preset, artifact_factory):
    _, _, manifest = artifact_factory(preset)
    hop = manifest["parity"]["hops"]["fp32"]
    assert hop["tokens"]["left_padded"] and hop["tokens"]["batch"] >= 2
    assert hop["tokens"]["new_tokens"] >= 16
    assert hop["tokens"]["identical"], hop["tokens"]
    assert hop["prefill"]["max_rel_diff"] <= 1e-4, hop["prefill"]
    assert hop["decode"]["max_rel_diff"] <= 1e-4, hop["decode"]
    assert hop["prefill"]["min_cosine"] > 0.99999


def test_decoder_contract(artifact_factory):
    checkpoint, artifact, _ = artifact_factory("tiny-pg2")
    config = json.loads((checkpoint / "config.json").read_text())["text_config"]
    graph = onnx.load(artifact / "onnx" / "decoder_model_merged.onnx", load_external_data=False).graph
    inputs = {i.name: [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim] for i in graph.input}
    outputs = {o.name: [d.dim_param or d.dim_value for d in o.type.tensor_type.shape.dim] for o in graph.output}
    layers, kv, head = config["num_hidden_layers"], config["num_key_value_heads"], config["head_dim"]
    assert list(inputs)[:3] == ["inputs_embeds", "attention_mask", "position_ids"]
    assert inputs["attention_mask"] == ["batch_size", "total_sequence_length"]
    assert inputs["past_key_values.0.key"] == ["batch_size", kv, "past_sequence_length", head]
    assert len([n for n in inputs if n.startswith("past_key_values.")]) == 2 * layers
    assert outputs["logits"] == ["batch_size", "logits_length", config["vocab_size"]]
    assert inputs["logits_to_keep"] == []  # a scalar, overridable: its initializer's 0 keeps every position
    assert onnx.numpy_helper.to_array(next(t for t in graph.initializer if t.name == "logits_to_keep")) == 0
    assert outputs[f"present.{layers - 1}.value"] == ["batch_size", kv, "total_sequence_length", head]
    ops = {node.op_type for node in graph.node}
    assert "Tanh" in ops, "Gemma2 soft-capping must be in the graph"


def test_artifact_is_self_contained(artifact_factory):
    _, artifact, manifest = artifact_factory("tiny-pg1")
    for name in ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json", "processor_config.json",
                 "preprocessor_config.json", "onnx/vision_encoder.onnx", "onnx/embed_tokens.onnx",
                 "onnx/decoder_model_merged.onnx"):
        assert name in manifest["files"], name
    for name, entry in manifest["files"].items():
        assert sha256_file(artifact / name) == entry["sha256"]
        assert (artifact / name).stat().st_size == entry["bytes"]
    assert manifest["source"]["sha256"] and len(manifest["source"]["sha256"]) == 64
    assert manifest["versions"]["transformers"] == "5.24.0"


def test_verify_catches_a_changed_byte(artifact_factory, tmp_path):
    import shutil

    from click.testing import CliRunner

    from pgexport.cli import main
    from pgexport.errors import BadInputError

    _, artifact, _ = artifact_factory("tiny-pg1")
    copy = shutil.copytree(artifact, tmp_path / "copy")
    assert CliRunner().invoke(main, ["verify", str(copy)]).exit_code == 0
    graph = copy / "onnx" / "embed_tokens.onnx"
    data = bytearray(graph.read_bytes())
    data[-10] ^= 0xFF
    graph.write_bytes(bytes(data))
    (copy / "stray.txt").write_text("x")
    result = CliRunner().invoke(main, ["verify", str(copy)])
    assert result.exit_code == BadInputError.exit_code
    assert "sha256 differs: onnx/embed_tokens.onnx" in result.output and "extra: stray.txt" in result.output


@pytest.mark.parametrize("preset", ["tiny-pg1", "tiny-pg2"])  # tiny-pg2: the head sits under a soft-cap
def test_logits_to_keep(artifact_factory, preset):
    _, artifact, _ = artifact_factory(preset)
    runtime = OnnxPaliGemma(artifact)
    images, prompts = zip(*sample_inputs(3))
    feed = runtime.prefill_feed(**runtime.preprocess(list(images), list(prompts)))
    decoder = runtime.sessions["decoder_model_merged"]
    full = decoder.run(["logits"], feed)[0]
    assert full.shape[1] == feed["inputs_embeds"].shape[1]
    for keep in (1, 3):
        last = decoder.run(["logits"], {**feed, "logits_to_keep": np.array(keep, dtype=np.int64)})[0]
        assert last.shape[1] == keep
        np.testing.assert_array_equal(last, full[:, -keep:])


def test_export_releases_the_model_tensors(tmp_path, checkpoint_factory):
    """Once a graph is saved nothing of the exporter holds the model's parameters, so `del` frees
    them before the parity gate's sessions load (at 3B, onnxscript's rewrite rules kept the last
    graph they matched, and with it 6 GB of weights: pgexport.exporters.onnx._forget_matched_graphs).
    One graph, the vision encoder's, shows it: without that function 50 of tiny-pg1's 70 parameters
    stay alive."""
    import gc
    import weakref

    from pgexport.exporters.onnx import export_graph, graph_exports
    from pgexport.load import load_checkpoint

    model = load_checkpoint(checkpoint_factory("tiny-pg1")).model
    parameters = [weakref.ref(p) for p in model.parameters()]
    spec = next(spec for spec in graph_exports(model.config) if spec.filename == "vision_encoder.onnx")
    export_graph(model, spec, tmp_path)
    del model
    gc.collect()
    assert len(parameters) > 50 and sum(p() is not None for p in parameters) == 0


def test_gate_never_holds_vision_and_decoder_together(demo_onnx):
    """The parity gate's low-memory runtime opens each session on first use and closes the vision
    encoder's after its run; the gate computes the prompt's embeddings first, so the vision and
    decoder weights are never loaded together (a 3B fp16 artifact's three sessions take 13.8 GB
    on CPU). The report is the one the all-sessions-open runtime gives (tokens, verdict; logit
    figures to the last bits), with the reference's logits read from disk (validate.logits_on_disk)
    as the commands hold them."""
    from pgexport.load import load_checkpoint
    from pgexport.sessions import Sessions
    from pgexport.validate import THRESHOLDS, check_hop, logits_on_disk, reference_outputs

    checkpoint = load_checkpoint()
    reference = reference_outputs(checkpoint.model, checkpoint.processor)
    together = []
    opened = []

    class Recording(Sessions):
        def __missing__(self, graph):
            opened.append(graph)
            session = super().__missing__(graph)
            together.append(set(self))
            return session

    eager = {dtype: check_hop(OnnxPaliGemma(demo_onnx, dtype=dtype), reference, THRESHOLDS[dtype])
             for dtype in ("fp32", "int8")}
    with logits_on_disk(reference):  # as the export and quantize commands hold it while they quantize
        assert isinstance(reference.prefill_logits, np.memmap) and isinstance(reference.step_logits, np.memmap)
        for dtype in ("fp32", "int8"):
            runtime = OnnxPaliGemma(demo_onnx, dtype=dtype, low_memory=True)
            runtime.sessions = Recording(runtime.sessions.paths, runtime.sessions._open, eager=False)
            lazy = check_hop(runtime, reference, THRESHOLDS[dtype])
            assert lazy["passed"] and lazy["tokens"] == eager[dtype]["tokens"]
            assert lazy.get("exact_match") == eager[dtype].get("exact_match")
            # fp32 weights prepacked (eager) or read in place (low_memory) split the sums otherwise:
            # last-bit differences (1e-6 of the range for fp32 MatMuls), widened by int8's rounding
            for stage in ("prefill", "decode"):
                assert lazy[stage]["max_rel_diff"] == pytest.approx(eager[dtype][stage]["max_rel_diff"], abs=1e-3)
                assert lazy[stage]["min_cosine"] == pytest.approx(eager[dtype][stage]["min_cosine"], abs=1e-4)
    assert opened.count("vision_encoder") == 2 and "decoder_model_merged" in opened
    assert not any({"vision_encoder", "decoder_model_merged"} <= open_now for open_now in together)


@pytest.mark.parametrize("low_memory", [True, False])
def test_a_runtime_is_freed_when_dropped(demo_onnx, low_memory):
    """No reference cycle holds a runtime: the gate's hops run one after another, and a 3B fp32
    hop's sessions (11.5 GB) held into the int8 hop took `pgexport validate` to 15.2 GB."""
    import weakref

    runtime = OnnxPaliGemma(demo_onnx, dtype="int8", low_memory=low_memory)
    images, prompts = zip(*sample_inputs(1))
    inputs = runtime.preprocess(list(images), list(prompts))
    runtime.generate_ids(**inputs, max_new_tokens=2)
    alive = weakref.ref(runtime)
    del runtime
    assert alive() is None


def test_a_replaced_graph_stays_replaced_in_a_low_memory_runtime(demo_onnx):
    """The accuracy tuner swaps one graph for a candidate file (`Sessions.replace`); a low-memory
    runtime closes the vision encoder's session after each run, and must reopen the candidate,
    not the artifact's own file."""
    from pgexport.contract import graph_path

    images, prompts = zip(*sample_inputs(2))
    runtime = OnnxPaliGemma(demo_onnx, dtype="fp32", low_memory=True)
    inputs = runtime.preprocess(list(images), list(prompts))
    fp32 = runtime.prefill_embeds(inputs["input_ids"], inputs["pixel_values"])
    runtime.sessions.replace("vision_encoder", graph_path(demo_onnx, "vision_encoder", "int8"))
    first, second = (runtime.prefill_embeds(inputs["input_ids"], inputs["pixel_values"]) for _ in range(2))
    expected = OnnxPaliGemma(demo_onnx, dtype={"vision_encoder": "int8"}).prefill_embeds(inputs["input_ids"],
                                                                                         inputs["pixel_values"])
    np.testing.assert_array_equal(first, expected)
    np.testing.assert_array_equal(second, expected)
    assert not np.array_equal(fp32, expected)
