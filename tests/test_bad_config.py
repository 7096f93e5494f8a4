"""Corrupt configs, mistyped paths, broken weight and tokenizer files, hostile recipes: each is one
error line with its exit code, found before any expensive work (no model built, no hub retries,
no gigabyte-sized message)."""

import json
import os
import shutil
import subprocess
import sys
import time
import tracemalloc

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

from pgexport import load
from pgexport.cli import main
from pgexport.errors import BadModelError
from pgexport.recipe import STAGES, Gates, ParityGate, Recipe, RecipeError, load_recipe, stage


def run(*args):
    """(exit code, the one `error:` line) of a CLI call; fails unless exactly one error line."""
    result = CliRunner().invoke(main, [str(a) for a in args])
    errors = [line for line in result.stderr.splitlines() if line.startswith(("error:", "internal error:"))]
    assert len(errors) == 1, result.stderr
    return result.exit_code, errors[0]


class Forbidden:
    """Stands in for a transformers class that must not be reached: the CLI would exit 1."""

    @staticmethod
    def from_pretrained(*args, **kwargs):
        raise AssertionError(f"from_pretrained{args} reached: the check came too late")


@pytest.fixture
def forbid(monkeypatch):
    def forbid(*names):
        for name in names:
            monkeypatch.setattr(load, name, Forbidden)

    return forbid


def copy_with(source, folder, **changes):
    """A copy of checkpoint `source` whose config.json has `changes` ("text_config.num_hidden_layers": 3)."""
    folder = shutil.copytree(source, folder)
    config = json.loads((folder / "config.json").read_text())
    for name, value in changes.items():
        *sections, key = name.split(".")
        node = config
        for section in sections:
            node = node[section]
        node[key] = value
    (folder / "config.json").write_text(json.dumps(config))
    return folder


# ---- 1. config sizes: bounded before transformers builds anything ----

@pytest.mark.parametrize("preset, field, value, message", [
    ("tiny-pg1", "text_config.num_hidden_layers", 1_000_000, "text_config.num_hidden_layers: 1000000 is out of range 1..1024"),
    ("tiny-pg2", "text_config.num_hidden_layers", 10**9, "text_config.num_hidden_layers: 1000000000 is out of range 1..1024"),
    ("tiny-pg1", "vision_config.num_hidden_layers", 1_000_000, "vision_config.num_hidden_layers: 1000000 is out of range"),
    ("tiny-pg1", "text_config.intermediate_size", 10**9, "text_config.intermediate_size: 1000000000 is out of range"),
    ("tiny-pg1", "vision_config.intermediate_size", 10**9, "vision_config.intermediate_size: 1000000000 is out of range"),
    ("tiny-pg1", "text_config.num_attention_heads", 10**6, "text_config.num_attention_heads: 1000000 is out of range"),
    ("tiny-pg1", "text_config.vocab_size", 10**9, "text_config.vocab_size: 1000000000 is out of range"),
    ("tiny-pg1", "vision_config.image_size", 10**6, "vision_config.image_size: 1000000 is out of range 1..4096"),
    ("tiny-pg1", "vision_config.patch_size", 0, "vision_config.patch_size: 0 is out of range 1..4096"),
    ("tiny-pg1", "text_config.max_position_embeddings", 10**12, "text_config.max_position_embeddings: 1000000000000 is out"),
    ("tiny-pg1", "text_config.num_hidden_layers", -1, "text_config.num_hidden_layers: -1 is out of range 1..1024"),
    ("tiny-pg1", "text_config.num_hidden_layers", 2.5, "text_config.num_hidden_layers: expected an integer, got 2.5"),
    ("tiny-pg1", "text_config.head_dim", "18", 'text_config.head_dim: expected an integer, got "18"'),
    ("tiny-pg1", "text_config.num_key_value_heads", True, "text_config.num_key_value_heads: expected an integer, got true"),
    ("tiny-pg1", "text_config", 5, "config.json text_config: expected a JSON object"),
])
def test_config_sizes_are_bounded_before_anything_is_built(checkpoint_factory, tmp_path, forbid, preset, field, value, message):
    forbid("AutoConfig", "AutoProcessor", "PaliGemmaForConditionalGeneration")
    folder = copy_with(checkpoint_factory(preset), tmp_path / "bad", **{field: value})
    code, error = run("onnx", folder, "-o", tmp_path / "out")
    assert code == BadModelError.exit_code and message in error, error
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("changes, message", [
    ({"vision_config.num_attention_heads": 5}, "vision_config.hidden_size: 24 is not divisible by num_attention_heads (5)"),
    ({"text_config.num_key_value_heads": 3}, "text_config.num_key_value_heads: 3 does not divide num_attention_heads (4)"),
    ({"vision_config.image_size": 4000}, "vision_config.image_size: 4000 px in 8 px patches makes 250000 image tokens"),
    ({"projection_dim": 24, "vision_config.projection_dim": 24}, "projection_dim: 24 differs from text_config.hidden_size (36)"),
    # In range alone, but far more parameters than the weight files hold: a corrupt config.
    ({"text_config.num_hidden_layers": 1000}, "from text_config.num_hidden_layers, but its weight files"),
    ({"vision_config.num_hidden_layers": 1000}, "from vision_config.num_hidden_layers, but its weight files"),
])
def test_config_sizes_that_cannot_belong_together(checkpoint_factory, tmp_path, forbid, changes, message):
    forbid("AutoProcessor", "PaliGemmaForConditionalGeneration")
    folder = copy_with(checkpoint_factory("tiny-pg1"), tmp_path / "bad", **changes)
    code, error = run("onnx", folder, "-o", tmp_path / "out")
    assert code == BadModelError.exit_code and message in error, error


def test_parameter_bound_without_weight_files():
    """A hub checkpoint has no local files to compare with: the absolute bound still applies."""
    from transformers import PaliGemmaConfig

    config = PaliGemmaConfig(
        text_config=dict(model_type="gemma", hidden_size=16384, intermediate_size=65536, num_hidden_layers=256,
                         num_attention_heads=64, num_key_value_heads=8, head_dim=256, vocab_size=257216),
        image_token_index=257152,
        projection_dim=16384,
    )
    with pytest.raises(BadModelError, match=r"from text_config.num_hidden_layers; the bound is 4e\+10"):
        load.check_sizes(config)
    real_28b = PaliGemmaConfig(
        text_config=dict(model_type="gemma2", hidden_size=4608, intermediate_size=36864, num_hidden_layers=46,
                         num_attention_heads=32, num_key_value_heads=16, head_dim=128, vocab_size=257216),
        vision_config=dict(model_type="siglip_vision_model", image_size=896, hidden_size=1152, intermediate_size=4304,
                           num_hidden_layers=27, num_attention_heads=16, patch_size=14),
        image_token_index=257152,
        projection_dim=4608,
    )
    load.check_sizes(real_28b)
    assert 27e9 < sum(load.parameter_counts(real_28b).values()) < 29e9


def test_estimate_is_a_lower_bound(checkpoint_factory):
    """The weight-file bound must never refuse a real checkpoint: the estimate undercounts."""
    for preset in ("tiny-pg1", "tiny-pg2"):
        checkpoint = load.load_checkpoint(checkpoint_factory(preset))
        actual = sum(p.numel() for p in checkpoint.model.parameters())
        assert 0.5 * actual < sum(load.parameter_counts(checkpoint.config).values()) <= actual


# ---- 2. a mistyped folder is not tried on the hub for 30 s ----

@pytest.mark.parametrize("name", ["./nope", "nope/", "a/b/c", "~/nope", "nope", "models/x", "with space/x"])
def test_path_like_strings_are_folders(tmp_path, monkeypatch, forbid, name):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "models").mkdir()  # so models/x is a path here, not a hub id
    monkeypatch.setattr(load, "hub_reachable", lambda: pytest.fail("probed the hub for a path"))
    forbid("AutoConfig", "AutoProcessor", "PaliGemmaForConditionalGeneration")
    code, error = run("onnx", name, "-o", tmp_path / "out")
    assert code == BadModelError.exit_code and error == f"error: {name}: no such checkpoint folder"


def test_hub_id_fails_fast_on_a_machine_without_the_hub(tmp_path, monkeypatch):
    """`nope/x` is valid hub-id syntax: the hub is probed (a few seconds at most) instead of ~30 s of retries."""
    monkeypatch.chdir(tmp_path)
    started = time.monotonic()
    code, error = run("onnx", "nope/x", "-o", tmp_path / "out")
    assert time.monotonic() - started < 15, "hang guard, not a performance figure"
    assert code == BadModelError.exit_code and error.startswith("error: nope/x: "), error


def test_unreachable_hub_is_named(tmp_path, monkeypatch, forbid):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(load, "hub_reachable", lambda: False)
    forbid("AutoConfig", "AutoProcessor", "PaliGemmaForConditionalGeneration")
    code, error = run("onnx", "nope/x", "-o", tmp_path / "out")
    assert code == BadModelError.exit_code
    assert error == "error: nope/x: no such checkpoint folder, nor a hub id in the local cache (https://huggingface.co cannot be reached)"


def test_offline_hub_is_not_probed(tmp_path, monkeypatch, forbid):
    from huggingface_hub import constants

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(load, "hub_reachable", lambda: pytest.fail("probed the hub while offline"))
    forbid("AutoConfig", "AutoProcessor", "PaliGemmaForConditionalGeneration")
    code, error = run("onnx", "nope/x", "-o", tmp_path / "out")
    assert code == BadModelError.exit_code and error.endswith("(HF_HUB_OFFLINE is set)"), error


def test_hub_id_loads_from_the_cache(checkpoint_factory, tmp_path):
    """The hub path itself: `owner/name` resolves through the hub cache (offline here)."""
    snapshot = tmp_path / "hub" / "models--someone--tiny" / "snapshots" / "abc123"
    shutil.copytree(checkpoint_factory("tiny-pg1"), snapshot)
    (snapshot.parent.parent / "refs").mkdir()
    (snapshot.parent.parent / "refs" / "main").write_text("abc123")
    env = {**os.environ, "HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HUB_OFFLINE": "1"}
    code = "from pgexport.load import load_checkpoint; c = load_checkpoint('someone/tiny'); print(c.family, c.source)"
    result = subprocess.run([sys.executable, "-c", code], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip().splitlines()[-1] == "PaliGemma 1 someone/tiny"


# ---- 3. broken weight and tokenizer files: exit 3, one line ----

def _pickled(tmp_path, checkpoint, content: bytes):
    folder = shutil.copytree(checkpoint, tmp_path / "pickled")
    (folder / "model.safetensors").unlink()
    (folder / "pytorch_model.bin").write_bytes(content)
    return folder


def _saved(obj) -> bytes:
    import io

    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


@pytest.mark.parametrize("content, message", [
    (b"not a pickle at all", "pytorch_model.bin: corrupt, or holds objects other than tensors"),
    (b"", "pytorch_model.bin: corrupt, or holds objects other than tensors"),
    (b"\x80\x02cnosuchmodule\nThing\nq\x00)\x81q\x01.", "pytorch_model.bin: corrupt, or holds objects other than tensors"),
    (_saved([1, 2]), "pytorch_model.bin: does not hold a state dict"),
    (_saved({"weight": 1}), "pytorch_model.bin: does not hold a state dict"),
])
def test_bad_pickle_weights(checkpoint_factory, tmp_path, forbid, content, message):
    forbid("AutoConfig", "AutoProcessor", "PaliGemmaForConditionalGeneration")
    folder = _pickled(tmp_path, checkpoint_factory("tiny-pg1"), content)
    code, error = run("onnx", folder, "-o", tmp_path / "out", "--allow-pickle")
    assert code == BadModelError.exit_code and message in error, error


def test_truncated_pickle_weights(checkpoint_factory, tmp_path, forbid):
    forbid("AutoConfig", "AutoProcessor", "PaliGemmaForConditionalGeneration")
    good = _saved(load_file(checkpoint_factory("tiny-pg1") / "model.safetensors"))
    folder = _pickled(tmp_path, checkpoint_factory("tiny-pg1"), good[: len(good) // 2])
    code, error = run("onnx", folder, "-o", tmp_path / "out", "--allow-pickle")
    assert code == BadModelError.exit_code and "corrupt, or holds objects other than tensors" in error, error


@pytest.mark.parametrize("content", ["{}", "[]", '"x"', '{"added_tokens": 5}', '{"added_tokens": [], "model": {}}'])
def test_malformed_tokenizer(checkpoint_factory, tmp_path, forbid, content):
    forbid("PaliGemmaForConditionalGeneration")  # the processor is loaded, and refused, before the weights
    folder = shutil.copytree(checkpoint_factory("tiny-pg1"), tmp_path / "tok")
    (folder / "tokenizer.json").write_text(content)
    code, error = run("onnx", folder, "-o", tmp_path / "out")
    assert code == BadModelError.exit_code and "malformed tokenizer or processor files" in error, error


def test_wrong_shape_weight_is_named(checkpoint_factory, tmp_path):
    folder = shutil.copytree(checkpoint_factory("tiny-pg1"), tmp_path / "shape")
    tensors = load_file(folder / "model.safetensors")
    name = next(key for key in tensors if key.endswith("layers.0.mlp.up_proj.weight"))
    tensors[name] = torch.zeros(7, tensors[name].shape[1])
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    code, error = run("onnx", folder, "-o", tmp_path / "out")
    assert code == BadModelError.exit_code, error
    assert "layers.0.mlp.up_proj.weight has shape [7, 36] in the weight files, but config.json makes it [50, 36]" in error
    assert "report" not in error


# ---- 4. hostile recipes: no alias expansion, no value repr'd whole ----

def billion_laughs(key: str = "checkpoint", levels: int = 9) -> str:
    lines = [f"{key}:", "  a: &a [lol,lol,lol,lol,lol,lol,lol,lol,lol]"]
    names = "abcdefghij"[:levels]
    lines += [f"  {name}: &{name} [{','.join([f'*{prev}'] * 9)}]" for prev, name in zip(names, names[1:])]
    return "\n".join(lines) + "\n"


@pytest.mark.parametrize("key", ["checkpoint", "stages", "gates"])
def test_yaml_alias_bomb(tmp_path, key):
    path = tmp_path / "bomb.yaml"
    path.write_text(billion_laughs(key))
    assert path.stat().st_size < 450  # 9**9 = 387 million leaves once expanded
    tracemalloc.start()
    try:
        code, error = run("build", path, "-o", tmp_path / "out")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert code == RecipeError.exit_code
    assert error == f"error: {path}: line 2: YAML anchors and aliases (&name, *name) are not allowed in a recipe"
    assert peak < 50e6, f"{peak / 1e6:.0f} MB traced"
    assert not (tmp_path / "out").exists()


def test_large_values_are_shortened_in_errors(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("checkpoint: [" + ", ".join(["x" * 50] * 10_000) + "]\n")
    code, error = run("build", path)
    assert code == RecipeError.exit_code and "checkpoint: expected a string, got ['xxx" in error
    message = error.split(f"{path}: ", 1)[1]  # after the recipe's path, however long the temp folder's is
    assert len(message) < 130, len(message)


def test_deep_nesting_is_refused(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("checkpoint: " + "[" * 5000 + "]" * 5000 + "\n")
    code, error = run("build", path)
    assert code == RecipeError.exit_code and "nested more than 16 levels deep" in error, error


# ---- 5. every recipe number has a range ----

BASE = "stages: [{stage: onnx}, {stage: validate}, {stage: bench%s}, {stage: verify}]\n"


@pytest.mark.parametrize("bench, gates, message", [
    (", batches: [1000000000]", "", "stages[2].batches: [1000000000] is out of range 1..64"),
    (", batches: [1, 1]", "", "stages[2]: batches: [1, 1] repeats a batch size"),
    (", runs: 1000000000000", "", "stages[2].runs: 1000000000000 is out of range 1..1000"),
    (", warmup: 1000000", "", "stages[2].warmup: 1000000 is out of range 0..100"),
    (", new_tokens: 1000000000", "", "stages[2].new_tokens: 1000000000 is out of range 2..4096"),
    (", prompt_tokens: 0", "", "stages[2].prompt_tokens: 0 is out of range 1..4096"),
    (", threads: 100000", "", "stages[2].threads: 100000 is out of range 1..1024"),
    (", runs: .inf", "", "stages[2].runs: expected an integer, got inf"),
    (", runs: true", "", "stages[2].runs: expected an integer, got True"),
    ("", "gates: {max_per_token_ms: .nan}", "gates.max_per_token_ms: nan is out of range 0..3.6e+06"),
    ("", "gates: {max_ttft_ms: .inf}", "gates.max_ttft_ms: inf is out of range 0..3.6e+06"),
    ("", "gates: {max_ttft_ms: -1}", "gates.max_ttft_ms: -1.0 is out of range 0..3.6e+06"),
    ("", "gates: {max_total_bytes: 0}", "gates.max_total_bytes: 0 is out of range 1..1e+13"),
    ("", "gates: {parity: {int8: {min_cosine: .nan}}}", "gates.parity.int8.min_cosine: nan is out of range -1..1"),
    ("", "gates: {parity: {int8: {min_token_agreement: -0.5}}}", "gates.parity.int8.min_token_agreement: -0.5 is out"),
    ("", "gates: {parity: {int8: {max_exact_match_drop: .inf}}}", "gates.parity.int8.max_exact_match_drop: inf is out"),
    ("", "gates: {parity: {int8: {max_rel_diff: yes}}}", "gates.parity.int8.max_rel_diff: expected a number, got True"),
])
def test_recipe_numbers_are_bounded(tmp_path, bench, gates, message):
    path = tmp_path / "r.yaml"
    path.write_text(BASE % bench + gates + "\n")
    code, error = run("build", path, "-o", tmp_path / "out")
    assert code == RecipeError.exit_code and error.startswith(f"error: {path}: {message}"), error
    assert not (tmp_path / "out").exists()


def test_python_recipes_are_bounded_too():
    stages = (stage("onnx"), stage("bench", runs=10**12))
    with pytest.raises(RecipeError, match=r"stages\[1\].runs: 1000000000000 is out of range 1..1000"):
        load_recipe(Recipe(stages=stages))
    nan_gate = Gates(parity={"int8": ParityGate(min_cosine=float("nan"))})
    with pytest.raises(RecipeError, match="gates.parity.int8.min_cosine: nan is out of range"):
        load_recipe(Recipe(gates=nan_gate))


def test_every_number_field_has_a_range():
    """Every number a stage, the CLI or a recipe takes has bounds in its field (pgexport.config)."""
    import dataclasses
    import typing

    numeric = {int, float, int | None, float | None, tuple[int, ...], tuple[int, ...] | None, list[int] | None}
    classes = [*STAGES.values(), Gates, ParityGate]
    unbounded = {f"{cls.__name__}.{f.name}" for cls in classes for f in dataclasses.fields(cls)
                 if typing.get_type_hints(cls)[f.name] in numeric and not f.metadata.get("bounds")}
    # opset: what the exporter supports (ExportConfig checks it, exit 7); any seed is a seed.
    assert unbounded == {"ExportConfig.opset", "DistillConfig.seed"}


@pytest.mark.parametrize("cls, options, message", [
    ("ExportConfig", {"int8": True, "calibration": "images/"}, "--calibration is read by int8-static only"),
    ("QuantizeConfig", {"methods": ("q4",), "accuracy_target": 0.99}, "--accuracy-target is read by int8-static only"),
    ("ExportConfig", {"validate": False, "eval_file": "rows.jsonl"}, "--eval-file feeds the parity gate"),
    ("QuantizeConfig", {"methods": ("int8",), "validate": False, "eval_file": "rows.jsonl"}, "--eval-file feeds the parity gate"),
])
def test_an_option_the_request_would_ignore_is_refused(cls, options, message):
    import pgexport.config as config
    from pgexport.errors import BadInputError

    with pytest.raises(BadInputError, match=message):
        getattr(config, cls)(**options)
    kept = {key: value for key, value in options.items() if key not in ("calibration", "accuracy_target", "eval_file")}
    getattr(config, cls)(**kept)  # the same request without it is fine
    getattr(config, cls)(**{**options, "vision": "int8-static", "validate": True})  # used: int8-static, the gate on
