"""One runner per stage kind: the stage's config and what it reads in, its folder out. Each calls
the library function of its CLI command (export_onnx, quantize_artifact, to_coreml, distill,
validate, bench) with the stage's config, so a recipe stage behaves as the command does."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from pgexport.build.cache import json_sha256, machine, path_sha256, stage_output_sha256
from pgexport.config import INPUT_OPTIONS
from pgexport.manifest import read_manifest, write_manifest
from pgexport.output import staging_folder
from pgexport.recipe import ONNX_ARTIFACTS, Recipe, Stage


def checkpoint_of(recipe: Recipe) -> str:
    from pgexport.load import default_model

    return recipe.checkpoint or default_model()


def source_of(recipe: Recipe, stage: Stage, out: Path) -> str | Path:
    """What a checkpoint reader or quantize reads: an earlier stage's folder, or the recipe's checkpoint."""
    return out / stage.input if stage.input is not None else checkpoint_of(recipe)


def reference_of(recipe: Recipe, name: str, out: Path) -> str | Path:
    """The checkpoint an artifact stage's output came from (the root of its `input` chain): what
    validate compares it with."""
    stage = recipe.named(name)
    while stage.kind == "quantize":
        stage = recipe.named(stage.input)
    return source_of(recipe, stage, out)


def artifacts_of(recipe: Recipe, stage: Stage) -> list[str]:
    """The stages a validate or bench stage measures: those it names, or every ONNX artifact before it."""
    if stage.artifacts:
        return list(stage.artifacts)
    before = recipe.stages[: recipe.stages.index(stage)]
    return [s.name for s in before if s.kind in ONNX_ARTIFACTS]


def thresholds_for(recipe: Recipe) -> dict:
    """dtype -> pgexport.validate.Thresholds: the project defaults with the recipe's overrides."""
    from pgexport.validate import THRESHOLDS

    resolved = {}
    for dtype, default in THRESHOLDS.items():
        overrides = recipe.gates.parity.get(dtype)
        given = {k: v for k, v in dataclasses.asdict(overrides).items() if v is not None} if overrides else {}
        resolved[dtype] = dataclasses.replace(default, **given)
    return resolved


def input_hash(recipe: Recipe, stage: Stage, out: Path, source_hash: str) -> str:
    """What the stage reads, hashed: the checkpoint or earlier stage folder, the files its options
    name (eval, calibration, train), the artifacts it measures, and for bench this machine."""
    inputs = {}
    if stage.kind in ("onnx", "coreml", "distill", "quantize"):
        inputs["source"] = stage_output_sha256(out / stage.input) if stage.input is not None else source_hash
    for key in INPUT_OPTIONS:
        if getattr(stage.config, key, None):
            inputs[key] = path_sha256(getattr(stage.config, key))
    if stage.kind in ("validate", "bench"):
        names = artifacts_of(recipe, stage)
        inputs["artifacts"] = {name: stage_output_sha256(out / name) for name in names}
    if stage.kind == "validate":
        references = {str(reference_of(recipe, name, out)) for name in artifacts_of(recipe, stage)}
        inputs["references"] = {ref: (stage_output_sha256(Path(ref)) if Path(ref).parent == out else source_hash)
                                for ref in sorted(references)}
        inputs["thresholds"] = {dtype: dataclasses.asdict(t) for dtype, t in thresholds_for(recipe).items()}
    if stage.kind == "bench":
        inputs["machine"] = machine()
    return json_sha256(inputs)


# ---- the runners: output folder given, artifact (or report) in it ----

def run_onnx(recipe: Recipe, stage: Stage, folder: Path, out: Path, progress: bool) -> None:
    from pgexport.pipeline import export_onnx

    export_onnx(source_of(recipe, stage, out), folder, stage.config, force=True, allow_pickle=recipe.allow_pickle,
                progress=progress)


def run_quantize(recipe: Recipe, stage: Stage, folder: Path, out: Path, progress: bool) -> None:
    from pgexport.pipeline import quantize_artifact

    quantize_artifact(out / stage.input, folder, stage.config, force=True, allow_pickle=recipe.allow_pickle,
                      progress=progress)


def run_coreml(recipe: Recipe, stage: Stage, folder: Path, out: Path, progress: bool) -> None:
    from pgexport.coreml.convert import to_coreml

    to_coreml(source_of(recipe, stage, out), folder, stage.config, force=True, allow_pickle=recipe.allow_pickle,
              progress=progress)


def run_distill(recipe: Recipe, stage: Stage, folder: Path, out: Path, progress: bool) -> None:
    from pgexport.distill.train import distill

    distill(source_of(recipe, stage, out), folder, stage.config, force=True, progress=progress)


def run_validate(recipe: Recipe, stage: Stage, folder: Path, out: Path, progress: bool) -> None:
    """Parity of every artifact and dtype against its checkpoint -> parity.json (+ manifest.json).
    Each reference checkpoint runs once, freed before the ONNX sessions load."""
    from pgexport.validate import checkpoint_reference, validate

    thresholds, report, by_reference = thresholds_for(recipe), {}, {}
    for name in artifacts_of(recipe, stage):
        if recipe.named(name).kind == "coreml":
            from pgexport.coreml.validate import validate_coreml

            coreml = validate_coreml(out / name, stage.config.reference, allow_pickle=recipe.allow_pickle)
            report[name] = {"coreml": coreml, "passed": coreml["passed"]}
            continue
        by_reference.setdefault(str(stage.config.reference or reference_of(recipe, name, out)), []).append(name)
    for reference, names in by_reference.items():
        outputs = checkpoint_reference(reference, stage.config.eval_file, recipe.allow_pickle)
        for name in names:
            report[name] = validate(out / name, outputs, read_manifest(out / name)["dtypes"], thresholds)
    with staging_folder(folder, force=True) as staging:
        (staging / "parity.json").write_text(json.dumps(report, indent=2) + "\n")
        write_manifest(staging, format="pgexport-parity/1", artifacts=list(report),
                       passed=all(r["passed"] for r in report.values()))


def run_bench(recipe: Recipe, stage: Stage, folder: Path, out: Path, progress: bool) -> None:
    """Latency of every artifact and dtype on this machine -> bench.json, bench.md (+ manifest.json)."""
    from pgexport.bench import bench

    artifacts = [str(out / name) for name in artifacts_of(recipe, stage)]
    with staging_folder(folder, force=True) as staging:
        report = bench(artifacts, stage.config, json_path=staging / "bench.json",
                       markdown_path=staging / "bench.md", progress=progress)
        write_manifest(staging, format="pgexport-bench/1", artifacts=artifacts_of(recipe, stage),
                       environment=report["environment"])


RUNNERS = {"onnx": run_onnx, "quantize": run_quantize, "coreml": run_coreml, "distill": run_distill,
           "validate": run_validate, "bench": run_bench}
