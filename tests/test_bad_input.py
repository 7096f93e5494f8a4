"""Each bad input: a one-line error, its own exit code, and nothing lost or half-written."""

import json
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner

from pgexport import pipeline
from pgexport.cli import main
from pgexport.errors import BadInputError, BadModelError, OutputError, UnsupportedError


def run(*args):
    result = CliRunner().invoke(main, [str(a) for a in args])
    return result.exit_code, result.stderr if hasattr(result, "stderr") else result.output


def one_line_error(text):
    lines = [line for line in text.strip().splitlines() if line.startswith("error:")]
    return len(lines) == 1


def test_missing_checkpoint(tmp_path):
    code, err = run("onnx", tmp_path / "nope", "-o", tmp_path / "out")
    assert code == BadModelError.exit_code and one_line_error(err), err
    assert not (tmp_path / "out").exists()


def test_not_paligemma(tmp_path):
    folder = tmp_path / "bert"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "bert"}))
    (folder / "model.safetensors").write_bytes(b"")
    code, err = run("onnx", folder, "-o", tmp_path / "out")
    assert code == BadModelError.exit_code and "not a PaliGemma checkpoint" in err


def test_corrupt_weights(tmp_path, checkpoint_factory):
    folder = shutil.copytree(checkpoint_factory("tiny-pg1"), tmp_path / "corrupt")
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    code, err = run("onnx", folder, "-o", tmp_path / "out")
    assert code == BadModelError.exit_code and one_line_error(err), err
    assert not (tmp_path / "out").exists()
    assert not list(tmp_path.glob(".out.partial-*")), "staging folder left behind"


def test_missing_weight_is_fatal(tmp_path, checkpoint_factory):
    from safetensors.torch import load_file, save_file

    folder = shutil.copytree(checkpoint_factory("tiny-pg1"), tmp_path / "partial")
    tensors = load_file(folder / "model.safetensors")
    dropped = next(name for name in tensors if "vision_tower" in name)
    del tensors[dropped]
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(BadModelError, match="uninitialised"):
        pipeline.load_checkpoint(folder)


def test_pickle_refused_without_flag(tmp_path, checkpoint_factory):
    import torch
    from safetensors.torch import load_file

    folder = shutil.copytree(checkpoint_factory("tiny-pg1"), tmp_path / "pickled")
    torch.save(load_file(folder / "model.safetensors"), folder / "pytorch_model.bin")
    (folder / "model.safetensors").unlink()
    with pytest.raises(BadModelError, match="--allow-pickle"):
        pipeline.load_checkpoint(folder)
    assert pipeline.load_checkpoint(folder, allow_pickle=True).family == "PaliGemma 1"


def test_existing_output_refused_and_kept(tmp_path, checkpoint_factory):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    code, err = run("onnx", checkpoint_factory("tiny-pg1"), "-o", out)
    assert code == OutputError.exit_code and "--force" in err
    assert (out / "keep.txt").read_text() == "mine"


@pytest.mark.parametrize("opset", ["11", "30"])
def test_unsupported_opset_before_any_work(tmp_path, checkpoint_factory, monkeypatch, opset):
    def never(*args, **kwargs):
        raise AssertionError("the checkpoint was loaded before the options were checked")

    monkeypatch.setattr(pipeline, "load_checkpoint", never)
    code, err = run("onnx", checkpoint_factory("tiny-pg1"), "-o", tmp_path / "out", "--opset", opset)
    assert code == UnsupportedError.exit_code and f"opset {opset}" in err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("files", [["onnx/a.onnx"], {"onnx/a.onnx": {"sha256": "0" * 64}}, {"a": "b"}, None])
def test_malformed_manifest_is_bad_input(tmp_path, files):
    from PIL import Image

    folder = tmp_path / "art"
    (folder / "onnx").mkdir(parents=True)
    Image.new("RGB", (8, 8)).save(tmp_path / "x.png")
    manifest = folder / "manifest.json"
    manifest.write_text("[1, 2]" if files is None else json.dumps({"format": "pgexport-onnx/1", "files": files}))
    for args in (["verify", folder], ["generate", folder, "--image", tmp_path / "x.png", "--prompt", "hi"],
                 ["quantize", folder, "-o", tmp_path / "q", "--method", "int8"]):
        code, err = run(*args)
        assert code == BadInputError.exit_code and one_line_error(err) and "malformed" in err, (args, err)


def test_verify_refuses_symlinks_out_of_the_artifact(tmp_path, artifact_factory):
    _, artifact, _ = artifact_factory("tiny-pg1")
    folder = shutil.copytree(artifact, tmp_path / "art")
    (tmp_path / "secret.txt").write_text("outside")
    config = folder / "config.json"
    config.unlink()
    config.symlink_to(tmp_path / "secret.txt")
    code, err = run("verify", folder)
    assert code == BadInputError.exit_code and "every file matches" not in err


def test_quantize_without_a_method_is_usage(tmp_path, artifact_factory):
    _, artifact, _ = artifact_factory("tiny-pg1")
    code, err = run("quantize", artifact, "-o", tmp_path / "q")
    assert code == 2 and "nothing to quantize" in err
    assert not (tmp_path / "q").exists()


def test_distill_stays_callable():
    import pgexport

    first = pgexport.distill
    import pgexport.distill.train  # noqa: F401 - binds the subpackage as pgexport.distill

    assert callable(first) and callable(pgexport.distill)


def test_interrupted_export_leaves_nothing_that_looks_complete(tmp_path, checkpoint_factory, monkeypatch):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("previous artifact")
    (out / "manifest.json").write_text(json.dumps({"format": "pgexport-onnx/1"}))  # ours: --force may replace it

    def interrupted(model, folder, opset):  # a graph half written, then Ctrl-C
        (Path(folder) / "vision_encoder.onnx").write_bytes(b"partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(pipeline, "export_graphs", interrupted)
    with pytest.raises(KeyboardInterrupt):
        pipeline.export_onnx(checkpoint_factory("tiny-pg1"), out, force=True, progress=False)
    assert (out / "keep.txt").read_text() == "previous artifact", "--force must not lose the old artifact early"
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt", "manifest.json"]
    assert not list(tmp_path.glob(".out.*")), "staging folder left behind"


def test_unreadable_image(tmp_path, artifact_factory):
    _, artifact, _ = artifact_factory("tiny-pg1")
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not an image")
    code, err = run("generate", artifact, "--image", bad, "--prompt", "caption en")
    assert code == BadInputError.exit_code and "cannot read image" in err


def test_generate_on_a_folder_that_is_not_an_artifact(tmp_path):
    from PIL import Image

    Image.new("RGB", (8, 8)).save(tmp_path / "x.png")
    code, err = run("generate", tmp_path, "--image", tmp_path / "x.png", "--prompt", "hi")
    assert code == BadInputError.exit_code and "not a pgexport ONNX artifact" in err


@pytest.mark.parametrize("command", [[], ["onnx"], ["generate"], ["validate"], ["verify"]])
def test_help_everywhere(command):
    code, _ = run(*command, "--help")
    assert code == 0
