"""Shared fixtures: random-weight checkpoints of several shapes and their exported artifacts,
built once per session (each export takes seconds)."""

from __future__ import annotations

import pytest

from pgexport.random_model import random_checkpoint


@pytest.fixture(scope="session")
def checkpoint_factory(tmp_path_factory):
    made = {}

    def make(preset: str):
        if preset not in made:
            made[preset] = random_checkpoint(preset, tmp_path_factory.mktemp(preset) / "checkpoint")
        return made[preset]

    return make


@pytest.fixture(scope="session")
def artifact_factory(tmp_path_factory, checkpoint_factory):
    """preset -> (checkpoint folder, artifact folder, manifest), exported with the gate on."""
    from pgexport.pipeline import export_onnx

    made = {}

    def make(preset: str, int8: bool = False):
        key = (preset, int8)
        if key not in made:
            checkpoint = checkpoint_factory(preset)
            output = tmp_path_factory.mktemp(f"{preset}-artifact") / "out"
            manifest = export_onnx(checkpoint, output, int8=int8, progress=False)
            made[key] = (checkpoint, output, manifest)
        return made[key]

    return make
