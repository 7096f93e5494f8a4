"""`pgexport build`: a recipe -> every artifact variant it names, in one folder, with cached stages,
gates and a verified top-level manifest.

    OUT/
      manifest.json              written last: every file (sha256, bytes, producing stage); each stage's
                                 options, cache key and tool versions; parity; gates; reproducibility
      <stage name>/              a stage's output folder with its own manifest.json (an artifact, a
                                 student checkpoint, a parity or bench report)
      stages/<stage name>.json   completion marker: the stage's cache key and its output manifest's sha256

Atomic stages: a stage writes into a staging folder renamed into place, its old marker is removed
before it starts and its new marker written after the rename, so a run killed at any point never
leaves a stage marked finished, and the build is complete only once manifest.json exists.
Cache: a stage is skipped when its marker's key (stage kind, options, input hash, tool versions)
matches and its folder still verifies; `force` redoes it. (pgexport.build.cache)
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

from rich.console import Console

from pgexport.build.cache import (
    claim, clean, content_sha256, finished, marker, options_of_stage, prune, stage_key, variants_of_stage,
    write_json_atomic,
)
from pgexport.build.report import build_manifest, gate_label, summary_tables
from pgexport.build.runners import RUNNERS, checkpoint_of, input_hash
from pgexport.config import INPUT_OPTIONS
from pgexport.errors import BadInputError, GateFailedError
from pgexport.manifest import MANIFEST, sha256_file, verify, versions
from pgexport.output import build_lock, check_inputs_apart
from pgexport.recipe import Recipe, Stage, load_recipe

__all__ = ["BuildGateFailed", "build", "summary_tables"]


class BuildGateFailed(GateFailedError):
    """A gate of the recipe failed: everything is written and verified, the summary says which gate."""

    def __init__(self, message: str, summary: dict):
        super().__init__(message)
        self.summary = summary


def build(recipe: str | Path | dict | Recipe, output: str | Path | None = None, force: bool = False,
          progress: bool = True) -> dict:
    """Build every stage of `recipe` (YAML path, dict or Recipe) into `output` (default: the recipe's).

    Stages run in recipe order; a finished one is skipped (same key, files unchanged) unless `force`.
    Then the gates are checked, manifest.json is written and, with a verify stage, every file is
    checked against it. Returns the summary; raises RecipeError (exit 4) before any work on a bad
    recipe, BuildGateFailed (exit 6, summary attached) when a gate fails.
    """
    recipe_file = recipe if isinstance(recipe, (str, Path)) else None
    recipe = load_recipe(recipe)
    out = Path(output if output is not None else recipe.output)
    recipe = dataclasses.replace(recipe, output=str(out))  # the manifest records where it was built
    named_files = [getattr(stage.config, key, None) for stage in recipe.stages
                   for key in INPUT_OPTIONS]
    check_inputs_apart(out, [recipe_file, checkpoint_of(recipe), *named_files])
    claim(out)
    with build_lock(out):
        clean(out)
        return _build(recipe, out, force, progress)


def _build(recipe: Recipe, out: Path, force: bool, progress: bool) -> dict:
    console = Console(stderr=True, quiet=not progress, highlight=False)
    checkpoint = checkpoint_of(recipe)
    source = {"checkpoint": checkpoint,
              "content_sha256": content_sha256(Path(checkpoint)) if Path(checkpoint).is_dir() else None}
    source_hash = source["content_sha256"] or f"hub:{checkpoint}"  # a hub id is keyed by name only

    records, ran = {}, []  # stage name -> marker record; one summary row per stage
    for index, stage in enumerate(recipe.stages, start=1):
        if stage.kind == "verify":
            continue  # checks the finished folder, below
        started = time.perf_counter()
        inputs = input_hash(recipe, stage, out, source_hash)
        key = stage_key(stage.kind, options_of_stage(stage), inputs, versions(), variants_of_stage(stage))
        records[stage.name] = None if force else finished(out, stage.name, key)
        console.print(f"[{index}/{len(recipe.stages)}] {stage.name} ({stage.kind}): "
                      + ("cached" if records[stage.name] else "running"), markup=False)
        status = "cached"
        if records[stage.name] is None:
            status = "ran"
            records[stage.name] = run_stage(recipe, stage, out, key, inputs, progress)
        ran.append({"name": stage.name, "stage": stage.kind, "status": status, "key": key,
                    "seconds": round(time.perf_counter() - started, 2)})
    pruned = prune(out, set(records))

    manifest = build_manifest(recipe, out, source, records)
    write_json_atomic(out / MANIFEST, manifest)  # the build is complete
    summary = {
        "output": str(out), "passed": manifest["gates"]["passed"], "stages": ran, "pruned": pruned,
        "gates": manifest["gates"], "reproducible": manifest["reproducibility"]["identical"],
        "files": len(manifest["files"]), "bytes": sum(entry["bytes"] for entry in manifest["files"].values()),
    }
    check = next((stage for stage in recipe.stages if stage.kind == "verify"), None)
    if check is not None:
        started, problems = time.perf_counter(), verify(out)
        console.print(f"[{len(recipe.stages)}/{len(recipe.stages)}] {check.name} (verify): "
                      + (f"{len(problems)} problem(s)" if problems else f"{summary['files']} files match"), markup=False)
        ran.append({"name": check.name, "stage": "verify", "status": "failed" if problems else "verified",
                    "seconds": round(time.perf_counter() - started, 2), "problems": problems})
        if problems:
            raise BadInputError(f"{out}: {len(problems)} file(s) do not match manifest.json: {'; '.join(problems[:5])}")
    if not summary["passed"]:
        failed = [f"{gate_label(c)}: {'; '.join(c['failures'])}" for c in manifest["gates"]["checks"] if not c["passed"]]
        raise BuildGateFailed(f"gate failed: {' | '.join(failed)}", summary)
    return summary


def run_stage(recipe: Recipe, stage: Stage, out: Path, key: str, inputs: str, progress: bool) -> dict:
    """Run one stage into `out/<name>` (unmarked first, marked finished last); returns its marker record."""
    started = time.perf_counter()
    folder = out / stage.name
    marker(out, stage.name).unlink(missing_ok=True)
    RUNNERS[stage.kind](recipe, stage, folder, out, progress)
    record = {
        "stage": stage.kind, "name": stage.name, "key": key, "input": inputs, "options": options_of_stage(stage),
        "versions": versions(), "manifest_sha256": sha256_file(folder / MANIFEST),
        "seconds": round(time.perf_counter() - started, 2),
    }
    write_json_atomic(marker(out, stage.name), record)  # last: the stage is finished
    return record
