"""`pgexport build`: a recipe builds, a rerun skips every stage, verify catches a changed byte, a
failed gate exits 6 and a bad recipe exits 4 naming the key (a killed build: test_build_killed.py).
Tiny random checkpoint."""

import json
import shutil
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from pgexport.build import build
from pgexport.cli import main
from pgexport.config import ExportConfig, options_of
from pgexport.errors import BadInputError, GateFailedError
from pgexport.manifest import read_manifest, verify
from pgexport.recipe import RecipeError, load_recipe

EXAMPLES = Path(__file__).resolve().parent.parent / "examples" / "recipes"
BENCH = {"stage": "bench", "batches": [1], "warmup": 1, "runs": 1, "new_tokens": 4}  # seconds on a tiny model


@pytest.fixture(scope="module")
def recipe(checkpoint_factory):
    return {
        "checkpoint": str(checkpoint_factory("tiny-pg1")),
        "stages": [{"stage": "onnx", "int8": True, "validate": False}, {"stage": "validate"}, {"stage": "verify"}],
        "gates": {"max_total_bytes": 100_000_000, "parity": {"int8": {"min_token_agreement": 0.25}}},
    }


@pytest.fixture(scope="module")
def built(recipe, tmp_path_factory):
    out = tmp_path_factory.mktemp("build") / "out"
    return out, build(recipe, out, progress=False)


def statuses(summary):
    return {stage["name"]: stage["status"] for stage in summary["stages"]}


def write_recipe(path: Path, recipe: dict) -> Path:
    path.write_text(yaml.safe_dump(recipe))
    return path


def test_example_recipes_are_valid():
    recipes = sorted(EXAMPLES.glob("*.yaml"))
    assert recipes
    for path in recipes:
        load_recipe(path)


def test_recipe_builds(built):
    out, summary = built
    assert summary["passed"] and summary["reproducible"]
    assert statuses(summary) == {"onnx": "ran", "validate": "ran", "verify": "verified"}
    assert verify(out) == []
    manifest = read_manifest(out)
    assert manifest["format"] == "pgexport-build/1"
    graph = manifest["files"]["onnx/onnx/decoder_model_merged_int8.onnx"]
    assert graph["stage"] == "onnx" and len(graph["sha256"]) == 64 and graph["bytes"] > 0
    assert manifest["stages"]["onnx"]["options"] == options_of(ExportConfig(int8=True, validate=False))
    assert manifest["stages"]["onnx"]["versions"]["onnxruntime"]
    assert set(manifest["parity"]["onnx"]["hops"]) == {"fp32", "int8"}
    assert manifest["parity"]["onnx"]["hops"]["int8"]["thresholds"]["min_token_agreement"] == 0.25
    assert manifest["artifacts"]["onnx"]["dtypes"] == ["fp32", "int8"]
    assert not (out / "stages" / "verify.json").exists(), "verify is a check, never cached"


def test_second_run_skips_every_stage(built, recipe):
    out, first = built
    result = CliRunner().invoke(main, ["build", str(write_recipe(out.parent / "r.yaml", recipe)), "-o", str(out), "--json"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert statuses(summary) == {"onnx": "cached", "validate": "cached", "verify": "verified"}
    assert [s["key"] for s in summary["stages"][:2]] == [s["key"] for s in first["stages"][:2]]


@pytest.mark.slow
def test_force_redoes_every_stage_with_identical_onnx_bytes(built, recipe, tmp_path):
    out, _ = built
    copy = shutil.copytree(out, tmp_path / "out")
    summary = build(recipe, copy, force=True, progress=False)
    assert statuses(summary) == {"onnx": "ran", "validate": "ran", "verify": "verified"}
    before, after = read_manifest(out)["files"], read_manifest(copy)["files"]
    graphs = [name for name in before if name.endswith(".onnx")]
    assert len(graphs) == 6  # fp32 and int8 (the token table too) of the three graphs
    assert {name: before[name]["sha256"] for name in graphs} == {name: after[name]["sha256"] for name in graphs}


def test_stages_read_the_stage_they_name(tmp_path):
    """quantize reads the nearest export unless told; an export of a student is validated against
    the student; graphs of two exports are compared only when they come from the same checkpoint."""
    from pgexport.build.report import reproducibility
    from pgexport.build.runners import checkpoint_of, reference_of

    recipe = load_recipe({"stages": [
        {"stage": "onnx"}, {"stage": "quantize", "name": "q4", "methods": ["q4"]},
        {"stage": "quantize", "name": "int8", "methods": ["int8"]}, {"stage": "distill", "name": "student"}, {"stage": "onnx", "name": "student-onnx", "input": "student"},
        {"stage": "quantize", "name": "student-q4", "methods": ["q4"]}, {"stage": "onnx", "name": "again"},
    ]})
    assert [s.input for s in recipe.stages] == [None, "onnx", "onnx", None, "student", "student-onnx", None]
    out = tmp_path / "out"
    assert reference_of(recipe, "q4", out) == checkpoint_of(recipe)
    assert reference_of(recipe, "student-q4", out) == out / "student"
    graph = {"sha256": "a" * 64, "bytes": 1}
    files = {"onnx/onnx/embed_tokens.onnx": graph, "again/onnx/embed_tokens.onnx": graph,
             "student-onnx/onnx/embed_tokens.onnx": {**graph, "sha256": "b" * 64}}
    report = reproducibility(recipe, files, {})
    assert report["identical"] and list(report["compared"]) == ["onnx/embed_tokens.onnx"]
    assert report["compared"]["onnx/embed_tokens.onnx"]["files"] == ["onnx/onnx/embed_tokens.onnx",
                                                                     "again/onnx/embed_tokens.onnx"]


def test_a_stage_dropped_from_the_recipe_is_pruned_and_said(built, recipe, tmp_path):
    out, _ = built
    copy = shutil.copytree(out, tmp_path / "out")
    fewer = {**recipe, "stages": [recipe["stages"][0], {"stage": "verify"}], "gates": {"max_total_bytes": 100_000_000}}
    result = CliRunner().invoke(main, ["build", str(write_recipe(tmp_path / "r.yaml", fewer)), "-o", str(copy)])
    assert result.exit_code == 0, result.output
    assert "removed the folders of stages the recipe no longer names: validate" in result.stdout
    assert not (copy / "validate").exists() and (copy / "onnx").is_dir() and verify(copy) == []


def test_changed_byte_is_caught(built, recipe, tmp_path):
    out, _ = built
    copy = shutil.copytree(out, tmp_path / "out")
    graph = copy / "onnx" / "onnx" / "decoder_model_merged.onnx"
    data = bytearray(graph.read_bytes())
    data[len(data) // 2] ^= 1
    graph.write_bytes(bytes(data))
    nested = copy / "onnx" / "manifest.json"
    nested.write_text(nested.read_text().replace('"fp32"', '"fp64"', 1))
    (copy / "stages" / "extra.txt").write_text("x")
    (copy / "validate" / "parity.json").unlink()
    assert verify(copy) == [
        "missing: validate/parity.json",
        "extra: stages/extra.txt",
        "sha256 differs: onnx/manifest.json",
        "sha256 differs: onnx/onnx/decoder_model_merged.onnx",
    ]
    result = CliRunner().invoke(main, ["verify", str(copy)])
    assert result.exit_code == BadInputError.exit_code and "sha256 differs: onnx/onnx/decoder_model_merged.onnx" in result.output

    # The cache does not trust an altered stage: the rerun redoes it (and only it), and the build
    # verifies again. The export's files are put back; the validate stage's report stays missing.
    (copy / "stages" / "extra.txt").unlink()
    shutil.copy2(out / "onnx" / "onnx" / "decoder_model_merged.onnx", graph)
    shutil.copy2(out / "onnx" / "manifest.json", nested)
    summary = build(recipe, copy, progress=False)
    assert statuses(summary) == {"onnx": "cached", "validate": "ran", "verify": "verified"}
    assert verify(copy) == []


@pytest.mark.parametrize("gates, failed", [
    ({"max_total_bytes": 1}, "max_total_bytes"),
    ({"parity": {"int8": {"min_cosine": 1.0}}}, "parity onnx/int8"),
])
def test_failed_gate_exits_6(built, recipe, tmp_path, gates, failed):
    out, _ = built
    copy = shutil.copytree(out, tmp_path / "out")
    path = write_recipe(tmp_path / "r.yaml", {**recipe, "gates": gates})
    result = CliRunner().invoke(main, ["build", str(path), "-o", str(copy), "--json"])
    assert result.exit_code == GateFailedError.exit_code == 6, result.output
    assert failed in result.stderr
    summary = json.loads(result.stdout)
    assert not summary["passed"] and statuses(summary)["verify"] == "verified"
    assert not read_manifest(copy)["gates"]["passed"]
    assert statuses(summary)["onnx"] == "cached", "gates do not invalidate the export"


def test_bench_stage_and_latency_gate(built, recipe, tmp_path):
    out, _ = built
    copy = shutil.copytree(out, tmp_path / "out")
    stages = recipe["stages"][:-1] + [BENCH, recipe["stages"][-1]]
    gates = {**recipe["gates"], "max_per_token_ms": 60_000}
    summary = build({**recipe, "stages": stages, "gates": gates}, copy, progress=False)
    assert statuses(summary) == {"onnx": "cached", "validate": "cached", "bench": "ran", "verify": "verified"}
    rows = read_manifest(copy)["bench"]["onnx"]
    assert {(row["dtype"], row["batch"]) for row in rows} == {("fp32", 1), ("int8", 1)}
    assert all(row["per_token_ms"] > 0 for row in rows)

    gates = {**recipe["gates"], "max_per_token_ms": 1e-6}
    path = write_recipe(tmp_path / "r.yaml", {**recipe, "stages": stages, "gates": gates})
    result = CliRunner().invoke(main, ["build", str(path), "-o", str(copy), "--json"])
    assert result.exit_code == 6 and "max_per_token_ms onnx/int8 batch 1" in result.stderr, result.output
    assert statuses(json.loads(result.stdout))["bench"] == "cached", "a gate does not rerun the bench"


@pytest.mark.parametrize("change, message", [
    ({"stages": [{"stage": "quantise"}]},
     "stages[0].stage: unknown stage 'quantise'; allowed: onnx, quantize, coreml, distill, validate, bench, verify"),
    ({"stages": [{"stage": "onnx", "int9": True}]}, "stages[0]: unknown key 'int9' (did you mean 'int8'?); allowed: name, "
                                                    "input, int8, int4, fp16, opset, validate, eval_file, ort_format, seg_decoder, vision"),
    ({"stages": [{"stage": "quantize", "method": ["q4"]}]}, "stages[0]: unknown key 'method' (did you mean 'methods'?)"),
    ({"stages": [{"stage": "validate", "eval-file": "x.jsonl"}]}, "stages[0]: unknown key 'eval-file' (did you mean 'eval_file'?)"),
    ({"stages": [{"stage": "onnx", "int8": "yes"}]}, "stages[0].int8: expected true or false, got 'yes'"),
    ({"stages": [{"stage": "onnx", "opset": 99}]}, "stages[0]: opset 99 is not supported: choose 18..23"),
    ({"stages": [{"stage": "onnx"}, {"stage": "quantize", "input": "nope", "methods": ["q4"]}]},
     "stages[1].input: 'nope' is not an ONNX artifact stage before it; allowed: ['onnx']"),
    ({"stages": [{"stage": "onnx", "input": "onnx2"}]}, "stages[0].input: 'onnx2' is not a distill stage before it"),
    ({"stages": [{"stage": "onnx"}, {"stage": "quantize", "methods": ["q5"]}]}, "stages[1]: unknown methods 'q5'"),
    ({"stages": [{"stage": "onnx"}, {"stage": "quantize", "methods": ["q4"], "block_size": 24}]},
     "stages[1]: block size 24: must be a power of two"),
    ({"stages": [{"stage": "onnx"}, {"stage": "quantize", "methods": ["q4"], "block_size": 8}]},
     "stages[1]: block size 8 is out of range 16..65536"),
    ({"stages": [{"stage": "coreml", "compress": "int3"}]}, "stages[0]: unknown compress 'int3'"),
    ({"stages": [{"stage": "verify"}, {"stage": "onnx"}]}, "stages[0]: verify checks the finished build folder"),
    ({"stages": [{"stage": "onnx"}, {"stage": "onnx"}]}, "stages[1].name: 'onnx' is used twice"),
    ({"stages": [{"stage": "validate"}]}, "stages[0]: validate needs an artifact stage (onnx, quantize) before it"),
    ({"gates": {"max_latency_ms": 50}}, "gates: unknown key 'max_latency_ms' (did you mean 'max_per_token_ms'?); "
                                        "allowed: max_total_bytes, parity, max_ttft_ms, max_per_token_ms"),
    ({"gates": {"max_ttft_ms": 50}}, "gates.max_ttft_ms: no bench stage measures it; add {stage: bench} to stages"),
    ({"stages": [{"stage": "onnx"}, {**BENCH, "batches": [0]}]}, "stages[1].batches: [0] is out of range 1..64"),
    ({"gates": {"parity": {"fp8": {"min_cosine": 0.9}}}}, "gates.parity.fp8: unknown dtype; allowed: fp32, fp16, int8, int8-static, q4"),
    ({"gates": {"parity": {"int8": {"min_cosine": "high"}}}}, "gates.parity.int8.min_cosine: expected a number"),
    ({"output": None}, "output: expected a string"),
])
def test_bad_recipe_names_the_key(recipe, tmp_path, change, message):
    path = write_recipe(tmp_path / "r.yaml", {**recipe, **change})
    result = CliRunner().invoke(main, ["build", str(path), "-o", str(tmp_path / "out")])
    assert result.exit_code == RecipeError.exit_code == 4, result.output
    assert message in result.stderr and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert not (tmp_path / "out").exists(), "nothing is written before the recipe is valid"


def test_unreadable_recipe(tmp_path):
    (tmp_path / "r.yaml").write_text("stages: [onnx\n")
    result = CliRunner().invoke(main, ["build", str(tmp_path / "r.yaml")])
    assert result.exit_code == 4 and "not valid YAML" in result.stderr
    (tmp_path / "empty.yaml").write_text("# nothing yet\n")
    result = CliRunner().invoke(main, ["build", str(tmp_path / "empty.yaml"), "-o", str(tmp_path / "out")])
    assert result.exit_code == 4 and "the recipe is empty" in result.stderr and not (tmp_path / "out").exists()
    result = CliRunner().invoke(main, ["build", str(tmp_path / "missing.yaml")])
    assert result.exit_code == 4 and "cannot read recipe" in result.stderr


def test_refuses_a_folder_that_is_not_a_build(recipe, tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "notes.txt").write_text("mine")
    result = CliRunner().invoke(main, ["build", str(write_recipe(tmp_path / "r.yaml", recipe)), "-o", str(tmp_path / "out")])
    assert result.exit_code == 5 and "not a pgexport build folder" in result.stderr
    assert (tmp_path / "out" / "notes.txt").read_text() == "mine"


def test_summary_tables_put_each_limit_beside_its_value():
    """A parity gate without a relative-difference limit still lines its limits up with its values,
    and a build with no gate prints no empty Gates table."""
    from pgexport.build import summary_tables

    stage = {"name": "onnx", "stage": "onnx", "status": "ran", "seconds": 1.0}
    check = {"gate": "parity", "artifact": "onnx", "dtype": "int8", "passed": True, "failures": [],
             "thresholds": {"max_rel_diff": None, "min_cosine": 0.99, "min_token_agreement": 0.5, "max_exact_match_drop": 2.0},
             "values": {"max_rel_diff": 0.0148, "min_cosine": 0.994303, "token_agreement": 1.0, "exact_match_drop": 0.0}}
    tables = summary_tables({"output": "out", "stages": [stage], "gates": {"checks": [check]}})
    limits, values = (list(column.cells)[0].split("\n") for column in tables[1].columns[1:3])
    assert [line.split()[0].split("<")[0].split(">")[0] for line in limits] == ["rel", "cos", "tokens", "em"]
    assert [line.split()[0] for line in values] == ["rel", "cos", "tokens", "em"]
    assert limits[0] == "rel -" and values[0] == "rel 1.5e-02"
    assert len(summary_tables({"output": "out", "stages": [stage], "gates": {"checks": []}})) == 1
