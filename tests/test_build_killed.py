"""`pgexport build` killed (SIGKILL) in a stage of every kind, then resumed: a killed stage is never
marked finished and the resumed build verifies. A file of its own so the test suite's processes can
run it beside test_build.py."""

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
from test_build import BENCH, statuses, write_recipe

from pgexport.build import build
from pgexport.manifest import read_manifest, verify
from pgexport.recipe import STAGES, load_recipe


@pytest.fixture(scope="module")
def every_kind(checkpoint_factory, tmp_path_factory):
    """One stage of every kind, sized to take seconds on a tiny checkpoint (the student trains on 8
    rows of the demo split and is scored on 4 others)."""
    from pgexport.demo import EVAL_FILE

    folder = tmp_path_factory.mktemp("rows")
    rows = [json.loads(line) for line in EVAL_FILE.read_text().splitlines()[:12]]
    for row in rows:
        row["image"] = str(EVAL_FILE.parent / row["image"])
    for name, part in (("train.jsonl", rows[:8]), ("eval.jsonl", rows[8:])):
        (folder / name).write_text("".join(json.dumps(row) + "\n" for row in part))
    return {
        "checkpoint": str(checkpoint_factory("tiny-pg1")),
        "stages": [
            {"stage": "onnx", "validate": False},
            {"stage": "quantize", "name": "q4", "methods": ["q4"], "validate": False},
            {"stage": "coreml", "max_context": 32, "validate": False},
            {"stage": "distill", "name": "student", "train": str(folder / "train.jsonl"),
             "eval_file": str(folder / "eval.jsonl"), "batch_size": 4, "latency_runs": 1},
            {"stage": "validate", "artifacts": ["onnx", "q4", "coreml"]},
            {**BENCH, "artifacts": ["q4"]},
            {"stage": "verify"},
        ],
        "gates": {"parity": {"q4": {"min_token_agreement": 0.0, "min_cosine": 0.5, "max_exact_match_drop": 100}}},
    }


def _kill_during(path: Path, out: Path, name: str, kind: str) -> None:
    """Run the build in a process and SIGKILL it while stage `name` runs: once its staging folder
    (or a distill run's checkpoints) exists, or, for stages that write only at their end, a moment
    after it started."""
    command = [sys.executable, "-m", "pgexport.cli", "build", str(path), "-o", str(out)]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        for line in process.stderr:
            if f"{name} ({kind}): running" in line:
                break
        else:
            pytest.fail(f"the build ended before {name} started")
        deadline = time.monotonic() + (1.0 if kind in ("validate", "bench") else 300)
        while time.monotonic() < deadline:
            if list(out.glob(f".{name}.partial-*")) or (out / f"{name}.checkpoints").is_dir():
                break
            assert process.poll() is None, f"the build ended while {name} ran"
            time.sleep(0.02)
    finally:
        process.kill()  # SIGKILL: no cleanup runs
        process.wait()
        process.stderr.close()


@pytest.mark.slow
def test_killed_at_every_stage_kind_then_rerun_ends_verified(every_kind, tmp_path):
    """SIGKILL in a stage of each kind in turn, each time resuming the build the last kill left:
    a killed stage is never marked finished, the build is never complete, the finished ones stay
    cached, and the last run verifies."""
    out = tmp_path / "out"
    path = write_recipe(tmp_path / "r.yaml", every_kind)
    finished = []
    for stage in every_kind["stages"][:-1]:
        name = stage.get("name", stage["stage"])
        _kill_during(path, out, name, stage["stage"])
        assert not (out / "stages" / f"{name}.json").exists(), f"{name} marked finished after a kill in it"
        assert not (out / "manifest.json").exists()
        for done in finished:
            assert (out / "stages" / f"{done}.json").exists() and verify(out / done) == [], done
        finished.append(name)

    summary = build(every_kind, out, progress=False)
    assert statuses(summary) == {**{name: "cached" for name in finished[:-1]}, finished[-1]: "ran", "verify": "verified"}
    assert not list(out.glob(".*")) and not list(out.glob("*.checkpoints")), "leftovers removed"
    assert verify(out) == []
    manifest = read_manifest(out)
    assert {manifest["stages"][name]["stage"] for name in finished} == set(STAGES) - {"verify"}
    assert set(manifest["parity"]) == {"onnx", "q4", "coreml"}
    assert (out / "student" / "model.safetensors").is_file()
    rerun = build(every_kind, out, progress=False)
    assert set(statuses(rerun).values()) == {"cached", "verified"}


def test_every_stage_kind_is_exercised(every_kind):
    assert {stage.kind for stage in load_recipe(every_kind).stages} == set(STAGES)
