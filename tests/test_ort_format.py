"""--ort-format (ONNX Runtime Mobile): every graph also as .ort plus onnx/required_operators.config,
listed in the manifest; the .ort graphs answer exactly as the .onnx ones; `generate --graph-format ort`."""

from __future__ import annotations

import json
import shutil

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from click.testing import CliRunner

from pgexport.cli import main
from pgexport.contract import ORT_OPERATORS_CONFIG, graph_path
from pgexport.demo import sample_inputs
from pgexport.errors import BadInputError, UnsupportedError
from pgexport.exporters import ort_format
from pgexport.manifest import read_manifest, verify
from pgexport.runtime import OnnxPaliGemma

IMAGE = "pgexport/demo/data/images/eval_001.png"


@pytest.fixture(scope="module")
def ort_artifact(tmp_path_factory, input_guard):
    """The demo model exported with --int8 --ort-format (no gate: the .onnx graphs' parity is
    test_export_parity's; here the .ort graphs are compared with the .onnx ones)."""
    out = tmp_path_factory.mktemp("ort") / "out"
    result = CliRunner().invoke(main, ["onnx", "--int8", "--ort-format", "--no-validate", "-o", str(out)])
    assert result.exit_code == 0, result.output
    return input_guard.add(out)


def session(path, **options):
    settings = ort.SessionOptions()
    settings.log_severity_level = 3
    return ort.InferenceSession(str(path), settings, providers=["CPUExecutionProvider"], **options)


def test_every_graph_has_an_ort_file_in_the_manifest(ort_artifact):
    manifest = read_manifest(ort_artifact)
    graphs = sorted(p.relative_to(ort_artifact).as_posix() for p in (ort_artifact / "onnx").glob("*.onnx"))
    assert len(graphs) == 7  # fp32 and int8 vision, embed, decoder; the demo's seg decoder (fp32 only)
    expected = {name.removesuffix(".onnx") + ".ort" for name in graphs}
    assert expected | {ORT_OPERATORS_CONFIG} <= set(manifest["files"])
    assert set(manifest["ort_format"]["graphs"]) == expected
    assert manifest["ort_format"]["optimization_style"] == "Fixed"
    assert manifest["options"]["ort_format"] is True
    for name, entry in manifest["ort_format"]["graphs"].items():
        assert entry["ort_bytes"] == manifest["files"][name]["bytes"] > 0
    assert verify(ort_artifact) == []
    result = CliRunner().invoke(main, ["verify", str(ort_artifact)])
    assert result.exit_code == 0, result.output
    # The config names the artifact's files, not the staging folder they were made in.
    sources = [line[4:] for line in (ort_artifact / ORT_OPERATORS_CONFIG).read_text().splitlines() if line.startswith("# - ")]
    assert sources == sorted(expected)
    # The model card lists each .ort with its manifest sizes.
    card = (ort_artifact / "README.md").read_text()
    for name, entry in manifest["ort_format"]["graphs"].items():
        assert f"| `{name}` | {entry['onnx_bytes'] / 1e6:.3f} | {entry['ort_bytes'] / 1e6:.3f} |" in card
    assert "--graph-format ort" in card and ORT_OPERATORS_CONFIG in card


def test_operator_config_lists_the_ops_the_graphs_use(ort_artifact, tmp_path):
    """The config's ops are those of the graphs as onnxruntime optimizes them for the conversion
    (level all, without the x86-only NCHWc layout), saved as ONNX here to count independently."""
    listed = ort_format.operators((ort_artifact / ORT_OPERATORS_CONFIG).read_text())
    used: dict[str, set[str]] = {}
    for graph in sorted((ort_artifact / "onnx").glob("*.onnx")):
        settings = ort.SessionOptions()
        settings.log_severity_level = 3
        settings.optimized_model_filepath = str(tmp_path / graph.name)
        ort.InferenceSession(str(graph), settings, providers=["CPUExecutionProvider"], disabled_optimizers=["NchwcTransformer"])
        for node in onnx.load(tmp_path / graph.name).graph.node:
            used.setdefault(node.domain or "ai.onnx", set()).add(node.op_type)
    assert listed == used
    assert "MatMul" in listed["ai.onnx"]
    assert "DynamicQuantizeLinear" in listed["ai.onnx"] or "DynamicQuantizeMatMul" in listed["com.microsoft"]  # int8


@pytest.mark.parametrize("dtype", ["fp32", "int8"])
def test_ort_graphs_generate_the_onnx_tokens(ort_artifact, dtype):
    """Same greedy tokens as the .onnx graphs, on a padded batch; and the same logits as the .onnx
    graphs run without the NCHWc layout transformer (x86 only, left out of the conversion): the
    .ort file is the graph onnxruntime runs, saved."""
    samples = sample_inputs(4)
    onnx_runtime = OnnxPaliGemma(ort_artifact, dtype=dtype)
    ort_runtime = OnnxPaliGemma(ort_artifact, dtype=dtype, graph_format="ort", check=True)
    assert ort_runtime.graph_dtypes == onnx_runtime.graph_dtypes
    inputs = onnx_runtime.preprocess([image for image, _ in samples], [prompt for _, prompt in samples])
    expected, _ = onnx_runtime.generate_ids(**inputs, max_new_tokens=12, stop_at_eos=False)
    tokens, logits = ort_runtime.generate_ids(**inputs, max_new_tokens=12, stop_at_eos=False, keep_logits=True)
    np.testing.assert_array_equal(tokens, expected)
    for graph, precision in onnx_runtime.graph_dtypes.items():
        onnx_runtime.sessions[graph] = session(graph_path(ort_artifact, graph, precision),
                                               disabled_optimizers=["NchwcTransformer"])
    _, same_graph_logits = onnx_runtime.generate_ids(**inputs, max_new_tokens=12, stop_at_eos=False, keep_logits=True)
    np.testing.assert_allclose(np.stack(logits), np.stack(same_graph_logits), rtol=0, atol=1e-5)


def test_generate_command_runs_the_ort_graphs(ort_artifact):
    answers = {}
    for graph_format in ("onnx", "ort"):
        result = CliRunner().invoke(main, ["generate", str(ort_artifact), "--image", IMAGE, "--prompt", "what color is the circle?",
                                           "--dtype", "int8", "--graph-format", graph_format, "--json"])
        assert result.exit_code == 0, result.output
        answers[graph_format] = json.loads(result.output)
    assert answers["ort"] == answers["onnx"]


def test_ort_graphs_are_checked_and_required(ort_artifact, tmp_path):
    """No .ort graphs: exit 4 naming --ort-format; a truncated .ort: exit 4, like a truncated .onnx."""
    bare = tmp_path / "bare"
    shutil.copytree(ort_artifact, bare)
    for path in (bare / "onnx").glob("*.ort"):
        path.unlink()
    with pytest.raises(BadInputError, match="--ort-format"):
        OnnxPaliGemma(bare, graph_format="ort")
    result = CliRunner().invoke(main, ["generate", str(bare), "--image", IMAGE, "--prompt", "caption en", "--graph-format", "ort"])
    assert result.exit_code == 4, result.output
    assert "no ORT format graphs" in result.output
    damaged = tmp_path / "damaged"
    shutil.copytree(ort_artifact, damaged)
    decoder = damaged / "onnx" / "decoder_model_merged_int8.ort"
    decoder.write_bytes(decoder.read_bytes()[:-10])
    with pytest.raises(BadInputError, match="size differs: onnx/decoder_model_merged_int8.ort"):
        OnnxPaliGemma(damaged, dtype="int8", graph_format="ort")
    OnnxPaliGemma(damaged, dtype="fp32", graph_format="ort")  # the other graphs still load
    with pytest.raises(BadInputError, match="unknown graph format"):
        OnnxPaliGemma(ort_artifact, graph_format="tflite")


def test_quantize_writes_or_leaves_out_ort_graphs(ort_artifact, tmp_path):
    """quantize --ort-format converts every graph (the input's anew, never through its links) and
    its config lists the new ops; without it the input's .ort files are left out (they would not
    cover the new variant)."""
    from pgexport.pipeline import quantize_artifact

    with_ort = quantize_artifact(ort_artifact, tmp_path / "q4", methods=["q4"], ort_format=True, validate=False, progress=False)
    assert {"onnx/decoder_model_merged_q4.ort", "onnx/embed_tokens_q4.ort", "onnx/vision_encoder.ort"} <= set(with_ort["files"])
    assert len(with_ort["ort_format"]["graphs"]) == 10  # fp32, int8 and q4 of each of the three graphs; the seg decoder
    assert "MatMulNBits" in ort_format.operators((tmp_path / "q4" / ORT_OPERATORS_CONFIG).read_text())["com.microsoft"]
    assert verify(tmp_path / "q4") == []
    without = quantize_artifact(ort_artifact, tmp_path / "plain", methods=["q4"], validate=False, progress=False)
    assert "ort_format" not in without
    assert not [name for name in without["files"] if name.endswith(".ort") or name == ORT_OPERATORS_CONFIG]
    assert verify(tmp_path / "plain") == []


def test_converter_errors_are_one_line(tmp_path, monkeypatch):
    (tmp_path / "onnx").mkdir()
    (tmp_path / "onnx" / "broken.onnx").write_bytes(b"not a graph")
    with pytest.raises(UnsupportedError, match=r"could not convert onnx/broken\.onnx") as caught:
        ort_format.convert(tmp_path)
    assert "\n" not in str(caught.value)
    monkeypatch.setattr(ort_format, "MAX_ORT_BYTES", 5)
    with pytest.raises(UnsupportedError, match="at most 2 GiB"):
        ort_format.check_fits(tmp_path)
