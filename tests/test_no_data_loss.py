"""Never lose data: --force replaces only pgexport's own output, inputs are never written to (not
even when a run is killed), staging folders never pass for artifacts. conftest's input guard checks
every test's inputs; here are the cases an attack run found, and SIGKILL in every command."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner
from conftest import InputGuard

from pgexport.cli import main
from pgexport.errors import OutputError
from pgexport.manifest import verify, write_manifest
from pgexport.output import STAGING_MARK, staging_folder

PRESET = "tiny-pg1"


def run(*args, cwd: Path | None = None):
    previous = Path.cwd()
    if cwd is not None:
        os.chdir(cwd)
    try:
        result = CliRunner().invoke(main, [str(a) for a in args])
    finally:
        os.chdir(previous)
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    return result.exit_code, errors


@pytest.fixture
def place(tmp_path, artifact_factory):
    """/p/ckpt (a checkpoint with a user's file beside its weights), /p/art (an artifact),
    /p/notes.txt and /p/sub: what a careless -o must never delete."""
    checkpoint, artifact, _ = artifact_factory(PRESET)
    p = tmp_path / "p"
    shutil.copytree(checkpoint, p / "ckpt")
    (p / "ckpt" / "my-notes.md").write_text("the user's own file\n")
    shutil.copytree(artifact, p / "art")
    (p / "notes.txt").write_text("a sibling\n")
    (p / "sub").mkdir()
    guard = InputGuard()
    guard.add(p)
    yield p
    assert guard.changes(full=True) == []


def recipe_file(folder: Path, checkpoint: Path, output: Path) -> Path:
    path = folder / "recipe.yaml"
    path.write_text(yaml.safe_dump({"checkpoint": str(checkpoint), "output": str(output),
                                    "stages": [{"stage": "onnx"}, {"stage": "verify"}]}))
    return path


@pytest.mark.parametrize("case", [
    "onnx -o checkpoint", "onnx -o parent of checkpoint and cwd", "onnx -o inside checkpoint",
    "quantize -o input", "quantize -o parent of input", "quantize -o inside input",
    "coreml -o checkpoint", "distill -o parent of checkpoint", "build -o parent of checkpoint",
])
def test_output_never_is_holds_or_sits_in_an_input(place, case):
    p = place
    args, cwd = {
        "onnx -o checkpoint": (["onnx", p / "ckpt", "-o", p / "ckpt", "--force"], None),
        "onnx -o parent of checkpoint and cwd": (["onnx", p / "ckpt", "-o", p, "--force"], p / "sub"),
        "onnx -o inside checkpoint": (["onnx", p / "ckpt", "-o", p / "ckpt" / "out"], None),
        "quantize -o input": (["quantize", p / "art", "-o", p / "art", "--method", "q4", "--force"], None),
        "quantize -o parent of input": (["quantize", p / "art", "-o", p, "--method", "q4", "--force"], None),
        "quantize -o inside input": (["quantize", p / "art", "-o", p / "art" / "sub", "--method", "q4"], None),
        "coreml -o checkpoint": (["coreml", p / "ckpt", "-o", p / "ckpt", "--force"], None),
        "distill -o parent of checkpoint": (["distill", p / "ckpt", "-o", p, "--force", "--eval", p / "x.jsonl"], None),
        "build -o parent of checkpoint": (["build", recipe_file(p.parent, p / "ckpt", p), "--force"], None),
    }[case]
    code, errors = run(*args, cwd=cwd)
    assert code == OutputError.exit_code and len(errors) == 1, (code, errors)
    assert "input" in errors[0], errors


def test_output_never_sits_inside_another_artifact(place):
    """An artifact that is not this command's input still must not get a folder inside it: it would
    then fail `pgexport verify` (a build folder, which holds its stages, is the exception)."""
    p = place
    for args in (["onnx", p / "ckpt", "-o", p / "art" / "sub"], ["coreml", p / "ckpt", "-o", p / "art" / "cm"]):
        code, errors = run(*args)
        assert code == OutputError.exit_code and len(errors) == 1, (code, errors)
        assert f"inside the pgexport artifact {p / 'art'}" in errors[0], errors
    assert not (p / "art" / "sub").exists() and not (p / "art" / "cm").exists()


def test_force_never_replaces_cwd_home_or_a_folder_it_did_not_write(place, tmp_path, monkeypatch):
    p = place
    own = shutil.copytree(p / "art", tmp_path / "own")  # pgexport's: replaceable, but not as cwd or home
    (own / "sub").mkdir()
    for args, cwd in ((["-o", "."], own), (["-o", ".."], own / "sub")):
        code, errors = run("quantize", p / "art", *args, "--method", "int8", "--force", cwd=cwd)
        assert code == OutputError.exit_code and "working directory" in errors[0], errors
    monkeypatch.setenv("HOME", str(own))
    code, errors = run("quantize", p / "art", "-o", own, "--method", "int8", "--force")
    assert code == OutputError.exit_code and "home directory" in errors[0], errors
    monkeypatch.undo()

    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "data.bin").write_bytes(b"\0" * 10)
    (foreign / "manifest.json").write_text(json.dumps({"format": "someone-else/1", "files": {}}))
    for folder in (foreign, p / "sub"):
        code, errors = run("quantize", p / "art", "-o", folder, "--method", "int8", "--force")
        assert code == OutputError.exit_code and "not written by pgexport" in errors[0], errors
    assert (foreign / "data.bin").read_bytes() == b"\0" * 10 and (p / "sub").is_dir()
    assert InputGuard.sha256(own) == InputGuard.sha256(p / "art")


def test_force_replaces_its_own_output_with_the_umask(place, tmp_path):
    out = tmp_path / "out"
    for extra in ([], ["--force"]):
        code, errors = run("quantize", place / "art", "-o", out, "--method", "int8", "--no-validate", *extra)
        assert code == 0, errors
        assert verify(out) == []
    assert out.stat().st_mode & 0o777 == 0o777 & ~_umask()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "p"], "no staging or retired folder left"


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_staging_folders_never_verify_and_stale_ones_are_removed(tmp_path):
    out = tmp_path / "out"
    stale = {name: tmp_path / f".out.partial-{name}" for name in ("dead", "alive", "unmarked")}
    for name, folder in stale.items():
        folder.mkdir()
        if name != "unmarked":
            (folder / STAGING_MARK).write_text(f"{_dead_pid() if name == 'dead' else os.getpid()}\n")
    with staging_folder(out, force=False) as staging:
        (staging / "weights.bin").write_bytes(b"1234")
        write_manifest(staging, format="pgexport-test/1")
        assert verify(staging) == [f"extra: {STAGING_MARK}"]  # a staging folder is never an artifact
    assert verify(out) == [] and not (out / STAGING_MARK).exists()
    assert not stale["dead"].exists(), "a killed run's staging folder is removed by the next run"
    assert stale["alive"].is_dir() and stale["unmarked"].is_dir(), "only our own dead runs' folders"


@pytest.fixture(scope="module")
def with_fp16(artifact_factory, tmp_path_factory, input_guard):
    """An artifact that has fp16 graphs already: quantize's links to them once wrote into them."""
    _, artifact, _ = artifact_factory(PRESET)
    out = tmp_path_factory.mktemp("fp16") / "a"
    code, errors = run("quantize", artifact, "-o", out, "--method", "fp16", "--no-validate")
    assert code == 0, errors
    return input_guard.add(out)


@pytest.mark.slow
def test_fp16_of_an_artifact_with_fp16_graphs_leaves_them(with_fp16, tmp_path):
    code, errors = run("quantize", with_fp16, "-o", tmp_path / "b", "--method", "fp16", "--optimize", "--no-validate")
    assert code == 0, errors
    assert verify(tmp_path / "b") == []  # and the input guard finds with_fp16 untouched


def _started(staging_glob: str, inside: str):
    """A trigger: some staging folder matching `staging_glob` holds `inside` (a glob)."""
    def ready(parent: Path) -> bool:
        return any(next(folder.glob(inside), None) for folder in parent.glob(staging_glob))
    return ready


@pytest.mark.slow
def test_sigkill_in_every_command_leaves_inputs_and_old_outputs(tmp_path, artifact_factory, with_fp16):
    """Each command killed (SIGKILL: nothing of ours runs) once it is writing: inputs unchanged,
    no output where there was none, the previous output intact where --force was replacing it."""
    checkpoint, _, _ = artifact_factory(PRESET)
    previous = shutil.copytree(with_fp16, tmp_path / "previous")  # pgexport's own, replaced with --force
    quantize = ["quantize", with_fp16, "--no-validate", "--method"]

    def writing(name: str, inside: str = "onnx/*"):
        """(output, trigger): the trigger fires once the command's staging folder holds `inside`."""
        return tmp_path / name, _started(f".{name}.partial-*", inside)

    cases = {  # args, (output, trigger); quantize's trigger: a graph file the input lacks
        "onnx": (["onnx", checkpoint, "--no-validate"], writing("onnx")),
        "quantize int8": ([*quantize, "int8"], writing("int8", "onnx/*int8.onnx*")),
        "quantize int8-static": ([*quantize, "int8-static"], writing("static", "onnx/*int8_static*")),
        "quantize q4": ([*quantize, "q4"], writing("q4", "onnx/*q4*")),
        "quantize fp16 --force": ([*quantize, "fp16", "--force"], writing("previous", "onnx/tmp*")),
        "coreml": (["coreml", checkpoint, "--max-context", "32", "--no-validate"], writing("coreml", ".tmp")),
        "distill": (["distill", "--decoder-layers", "1"],  # the demo teacher (guarded by conftest)
                    (tmp_path / "student", _started("student.checkpoints", "*"))),
        "build": (["build", recipe_file(tmp_path, checkpoint, tmp_path / "build")],
                  (tmp_path / "build", _started("build", ".onnx.partial-*/onnx"))),
    }
    processes = {
        name: subprocess.Popen([sys.executable, "-m", "pgexport.cli", *map(str, args), "-o", str(output)],
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        for name, (args, (output, _)) in cases.items()
    }
    deadline, pending = time.monotonic() + 300, set(processes)
    try:
        while pending and time.monotonic() < deadline:
            for name in sorted(pending):
                process, trigger = processes[name], cases[name][1][1]
                if trigger(tmp_path):
                    process.send_signal(signal.SIGKILL)
                    process.wait()
                    pending.discard(name)
                else:
                    assert process.poll() is None, f"{name} ended before it wrote: {process.stderr.read()[-800:]}"
            time.sleep(0.02)
    finally:
        for process in processes.values():
            process.kill()
            process.wait()
    assert not pending, f"never started writing: {sorted(pending)}"
    for name, (_, (output, _)) in cases.items():
        assert processes[name].returncode == -signal.SIGKILL, name
        if output == previous:
            assert InputGuard.sha256(previous) == InputGuard.sha256(with_fp16) and verify(previous) == [], name
        elif name != "build":
            assert not output.exists(), f"{name}: a killed run left {output}"
    # conftest's input guard checks the checkpoint and both artifacts after this test.


def test_sigterm_removes_the_staging_folder_at_once(tmp_path, artifact_factory):
    """SIGTERM (a cancelled CI job) while a command writes: exit 143 with one line, and nothing left
    beside the output, where a killed run leaves its staging folder to the next run (17 GB at 3B)."""
    _, artifact, _ = artifact_factory(PRESET)
    output = tmp_path / "q4"
    process = subprocess.Popen([sys.executable, "-m", "pgexport.cli", "quantize", str(artifact), "--method", "q4",
                                "--no-validate", "-o", str(output)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                               text=True)
    trigger, deadline = _started(".q4.partial-*", "onnx/*q4*"), time.monotonic() + 300
    try:
        while not trigger(tmp_path) and time.monotonic() < deadline:
            assert process.poll() is None, f"it ended before it wrote: {process.stderr.read()[-800:]}"
            time.sleep(0.02)
        process.send_signal(signal.SIGTERM)
        _, errors = process.communicate(timeout=120)
    finally:
        process.kill()
    assert process.returncode == 128 + signal.SIGTERM, errors
    assert errors.strip().splitlines()[-1] == "terminated: nothing was written at the output path", errors
    assert sorted(p.name for p in tmp_path.iterdir()) == [], "a staging folder or an output was left"


def test_a_second_build_of_the_same_folder_exits_5_naming_the_holder(place, tmp_path):
    from pgexport.output import build_lock

    out = tmp_path / "build"
    out.mkdir()
    (out / "stages").mkdir()
    with build_lock(out):
        code, errors = run("build", recipe_file(tmp_path, place / "ckpt", out))
    assert code == OutputError.exit_code and f"pid {os.getpid()}" in errors[0], errors


@pytest.mark.parametrize("number, name", [(28, "ENOSPC"), (30, "EROFS")])
def test_a_full_or_read_only_disk_is_exit_5(place, tmp_path, monkeypatch, number, name):
    import errno

    from pgexport import pipeline

    assert getattr(errno, name) == number

    def fails(model, folder, opset):
        raise OSError(number, os.strerror(number), str(folder / "vision_encoder.onnx"))

    monkeypatch.setattr(pipeline, "export_graphs", fails)
    code, errors = run("onnx", place / "ckpt", "-o", tmp_path / "out", "--no-validate")
    assert code == OutputError.exit_code and os.strerror(number) in errors[0], errors
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.partial-*"))
