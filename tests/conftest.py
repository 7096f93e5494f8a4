"""Shared fixtures: random-weight checkpoints of several shapes and their exported artifacts,
built once per session (each export takes seconds), and the guard that no test's command writes
into its inputs."""

from __future__ import annotations

import hashlib
from pathlib import Path
from types import SimpleNamespace

import pytest

from pgexport.random_model import random_checkpoint


def pytest_configure(config):
    """Under `pytest -n N` (make test) each of the N processes gets its share of the CPUs for torch,
    so N processes do not each run a thread per core on the same cores."""
    import os

    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if workers > 1:
        import torch

        torch.set_num_threads(max(1, len(os.sched_getaffinity(0)) // workers))


class InputGuard:
    """The folders commands read as inputs (checkpoints, artifacts), as they were when made: every
    file's sha256 and (inode, size, mtime), and the list of entries. `changes()` lists what differs:
    a file written in place (even with the same bytes), replaced, removed, or a new entry."""

    def __init__(self):
        self.folders: dict[Path, dict] = {}

    @staticmethod
    def _scan(folder: Path) -> dict:
        entries = {}
        for path in sorted(folder.rglob("*")):
            stat = path.lstat()
            entries[path.relative_to(folder).as_posix()] = (stat.st_ino, stat.st_size, stat.st_mtime_ns) \
                if path.is_file() else "dir"
        return entries

    @staticmethod
    def sha256(folder: Path) -> dict[str, str]:
        return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
                for p in sorted(folder.rglob("*")) if p.is_file()}

    def add(self, folder) -> Path:
        folder = Path(folder)
        self.folders[folder] = {"entries": self._scan(folder), "sha256": self.sha256(folder)}
        return folder

    def changes(self, full: bool = False) -> list[str]:
        found = []
        for folder, before in self.folders.items():
            now = self._scan(folder) if folder.is_dir() else {}
            for name in sorted(set(before["entries"]) | set(now)):
                if before["entries"].get(name) != now.get(name):
                    found.append(f"{folder / name}: {before['entries'].get(name)} -> {now.get(name)}")
            if full and folder.is_dir() and self.sha256(folder) != before["sha256"]:
                found.append(f"{folder}: file contents changed")
        return found


@pytest.fixture(scope="session")
def input_guard():
    from pgexport.demo import CHECKPOINT_DIR

    guard = InputGuard()
    guard.add(CHECKPOINT_DIR)  # every command without MODEL reads it
    yield guard
    assert not guard.changes(full=True), "an input was written to"


@pytest.fixture(autouse=True)
def inputs_untouched(input_guard):
    """After every test: no command wrote into, replaced or added to a guarded input folder."""
    yield
    changes = input_guard.changes()
    assert not changes, f"inputs written to: {changes[:5]}"


@pytest.fixture(scope="session")
def shared(tmp_path_factory):
    """(name, make) -> a folder `make(folder)` fills once for the whole run: in the first pytest
    process that asks, while `make test`'s other processes wait on its lock and then read the same
    folder (an export takes the best part of a minute on 2 cores; each process made its own)."""
    import os
    import shutil

    from filelock import FileLock

    root = tmp_path_factory.getbasetemp()
    root = (root.parent if os.environ.get("PYTEST_XDIST_WORKER") else root) / "shared"
    root.mkdir(exist_ok=True)

    def get(name: str, make) -> Path:
        folder, made = root / name, root / f"{name}.made"
        with FileLock(str(root / f"{name}.lock")):
            if not made.is_file():
                shutil.rmtree(folder, ignore_errors=True)  # what a process that failed in `make` left
                folder.mkdir()
                make(folder)
                made.write_text("")
        return folder

    return get


@pytest.fixture(scope="session")
def seg_npz(shared, input_guard) -> Path:
    """A segmentation decoder file with vae-oid.npz's structure and shapes, random weights (the real
    one cannot be downloaded here), written once (an input: the guard checks it)."""
    from pgexport.exporters.seg_decoder import write_random_npz

    return input_guard.add(shared("seg", lambda folder: write_random_npz(folder / "vae-oid.npz"))) / "vae-oid.npz"


@pytest.fixture(scope="session")
def demo_run(shared, input_guard, seg_npz):
    """`pgexport onnx --int8 --seg-decoder vae-oid.npz` of the demo model, gate on, once: (artifact
    folder, what the command printed: `.output` and `.stderr` as click's result has them). Every
    test that needs the demo's graphs reads this folder (an input: the guard checks it)."""
    from click.testing import CliRunner

    from pgexport.cli import main

    def make(folder: Path) -> None:
        command = ["onnx", "--int8", "--seg-decoder", str(seg_npz), "-o", str(folder / "out")]
        result = CliRunner().invoke(main, command)
        assert result.exit_code == 0, result.output
        (folder / "output.txt").write_text(result.output)
        (folder / "stderr.txt").write_text(result.stderr)

    folder = shared("demo", make)
    printed = SimpleNamespace(output=(folder / "output.txt").read_text(), stderr=(folder / "stderr.txt").read_text())
    return input_guard.add(folder / "out"), printed


@pytest.fixture(scope="session")
def demo_artifact(demo_run):
    """The demo's --int8 artifact and what the command printed."""
    return demo_run[0], demo_run[1].output


@pytest.fixture(scope="session")
def demo_onnx(demo_run) -> Path:
    """The demo's --int8 artifact folder (fp32 and int8 graphs)."""
    return demo_run[0]


@pytest.fixture(scope="session")
def checkpoint_factory(shared, input_guard):
    made = {}

    def make(preset: str):
        if preset not in made:
            folder = shared(preset, lambda folder: random_checkpoint(preset, folder / "checkpoint"))
            made[preset] = input_guard.add(folder / "checkpoint")
        return made[preset]

    return make


@pytest.fixture(scope="session")
def artifact_factory(shared, checkpoint_factory, input_guard):
    """preset -> (checkpoint folder, artifact folder, manifest), exported with the gate on."""
    from pgexport.manifest import read_manifest
    from pgexport.pipeline import export_onnx

    made = {}

    def make(preset: str, int8: bool = False):
        key = (preset, int8)
        if key not in made:
            checkpoint = checkpoint_factory(preset)
            name = f"{preset}-artifact{'-int8' if int8 else ''}"
            output = shared(name, lambda folder: export_onnx(checkpoint, folder / "out", int8=int8, progress=False)) / "out"
            made[key] = (checkpoint, input_guard.add(output), read_manifest(output))
        return made[key]

    return make
