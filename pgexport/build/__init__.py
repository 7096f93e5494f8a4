"""`pgexport build`: a recipe -> every artifact variant it names, in one folder, with cached stages,
gates and a verified top-level manifest.

    OUT/
      manifest.json              written last: every file (sha256, bytes, producing stage); each stage's
                                 options, cache key and tool versions; parity; gates; reproducibility
      <stage name>/              a stage's output folder with its own manifest.json (an artifact for `onnx`)
      stages/<stage name>.json   completion marker: the stage's cache key and its output manifest's sha256

Atomic stages: a stage writes into a staging folder renamed into place, its old marker is removed
before it starts and its new marker written after the rename, so a run killed at any point never
leaves a stage marked finished, and the build is complete only once manifest.json exists.
Cache: a stage is skipped when its marker's key (stage kind, options, input hash, tool versions)
matches and its folder still verifies; `force` redoes it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

import pgexport
from pgexport.errors import BadInputError, GateFailedError, OutputError
from pgexport.manifest import MANIFEST, read_manifest, sha256_file, verify, versions, write_manifest
from pgexport.output import build_lock, check_inputs_apart, staging_folder, written_by_pgexport
from pgexport.recipe import (
    ARTIFACT_STAGES, CHECK_STAGES, BenchStage, OnnxStage, Recipe, ValidateStage, VerifyStage, kind_of, load_recipe,
)

FORMAT = "pgexport-build/1"
MARKERS = "stages"


class BuildGateFailed(GateFailedError):
    """A gate of the recipe failed: everything is written and verified, the summary says which gate."""

    def __init__(self, message: str, summary: dict):
        super().__init__(message)
        self.summary = summary


def content_sha256(folder: Path) -> str:
    """One hash over every file of a folder (relative names and bytes): config and tokenizer included."""
    digest = hashlib.sha256()
    for path in sorted(p for p in Path(folder).rglob("*") if p.is_file()):
        digest.update(path.relative_to(folder).as_posix().encode() + b"\0")
        digest.update(sha256_file(path).encode())
    return digest.hexdigest()


def json_sha256(data) -> str:
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()


def stage_key(stage, input_hash: str, tool_versions: dict) -> str:
    """The cache key: what the stage is, with which options, on which input, by which tools."""
    options = {k: v for k, v in dataclasses.asdict(stage).items() if k != "name"}
    return json_sha256({"stage": kind_of(stage), "options": options, "input": input_hash, "versions": tool_versions})


def thresholds_for(recipe: Recipe) -> dict:
    """dtype -> pgexport.validate.Thresholds: the project defaults with the recipe's overrides."""
    from pgexport.validate import THRESHOLDS

    resolved = {}
    for dtype, default in THRESHOLDS.items():
        overrides = recipe.gates.parity.get(dtype)
        given = {k: v for k, v in dataclasses.asdict(overrides).items() if v is not None} if overrides else {}
        resolved[dtype] = dataclasses.replace(default, **given)
    return resolved


def checkpoint_of(recipe: Recipe) -> str:
    from pgexport.load import default_model

    return recipe.checkpoint or default_model()


def eval_file_of(recipe: Recipe, stage: ValidateStage) -> Path | None:
    """The held-out rows validate uses: the stage's file, or the demo split for the demo model."""
    from pgexport.demo import CHECKPOINT_DIR, EVAL_FILE

    if stage.eval_file:
        return Path(stage.eval_file)
    return EVAL_FILE if Path(checkpoint_of(recipe)).resolve() == CHECKPOINT_DIR.resolve() else None


# ---- the stages: output folder given, artifact (or report) in it ----

def run_onnx(stage: OnnxStage, recipe: Recipe, folder: Path, progress: bool) -> None:
    """Export fp32 (and int8) graphs; the parity gate runs in the validate stage, with the recipe's gates."""
    from pgexport.pipeline import export_onnx

    export_onnx(
        checkpoint_of(recipe), folder, int8=stage.int8, opset=stage.opset, validate=False, force=True,
        allow_pickle=recipe.allow_pickle, progress=progress,
    )


def run_validate(stage: ValidateStage, recipe: Recipe, folder: Path, artifacts: dict[str, Path]) -> None:
    """Parity of every artifact and dtype against one PyTorch reference -> parity.json (+ manifest.json)."""
    from pgexport.load import load_checkpoint
    from pgexport.pipeline import eval_rows_for
    from pgexport.runtime import OnnxPaliGemma
    from pgexport.validate import check_hop, reference_outputs

    thresholds = thresholds_for(recipe)
    checkpoint = load_checkpoint(checkpoint_of(recipe), allow_pickle=recipe.allow_pickle)
    eval_rows = eval_rows_for(checkpoint, eval_file_of(recipe, stage))
    reference = reference_outputs(checkpoint.model, checkpoint.processor, eval_rows=eval_rows)
    del checkpoint  # frees the PyTorch weights before the ONNX sessions load
    report = {}
    for name, path in artifacts.items():
        hops = {
            dtype: check_hop(OnnxPaliGemma(path, dtype=dtype), reference, thresholds[dtype])
            for dtype in read_manifest(path)["dtypes"]
        }
        report[name] = {"hops": hops, "passed": all(hop["passed"] for hop in hops.values())}
    with staging_folder(folder, force=True) as staging:
        (staging / "parity.json").write_text(json.dumps(report, indent=2) + "\n")
        write_manifest(staging, format="pgexport-parity/1", artifacts=list(artifacts),
                       passed=all(r["passed"] for r in report.values()))


def run_bench(stage: BenchStage, folder: Path, artifacts: dict[str, Path], progress: bool) -> None:
    """Latency of every artifact and dtype on this machine -> bench.json, bench.md (+ manifest.json)."""
    from pgexport.bench import bench

    with staging_folder(folder, force=True) as staging:
        report = bench(
            [str(path) for path in artifacts.values()], batches=list(stage.batches), prompt_tokens=stage.prompt_tokens,
            new_tokens=stage.new_tokens, warmup=stage.warmup, runs=stage.runs, threads=stage.threads,
            json_path=staging / "bench.json", markdown_path=staging / "bench.md", progress=progress,
        )
        write_manifest(staging, format="pgexport-bench/1", artifacts=list(artifacts), environment=report["environment"])


def machine() -> dict:
    """What a latency depends on besides the artifact: a bench result is cached for this machine only."""
    import platform

    return {"platform": platform.platform(), "processor": platform.processor(), "machine": platform.machine(),
            "cpus": os.cpu_count(), "usable_cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
            "node": platform.node()}


# ---- cache and markers ----

def _marker(out: Path, name: str) -> Path:
    return out / MARKERS / f"{name}.json"


def _write_json_atomic(path: Path, data: dict) -> None:
    temporary = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    temporary.write_text(json.dumps(data, indent=2) + "\n")
    os.replace(temporary, path)


def _finished(out: Path, name: str, key: str) -> dict | None:
    """The stage's marker if its key matches and its folder verifies against the recorded manifest."""
    marker = _marker(out, name)
    if not marker.is_file():
        return None
    try:
        record = json.loads(marker.read_text())
    except json.JSONDecodeError:
        return None
    folder = out / name
    if not isinstance(record, dict) or record.get("key") != key or not (folder / MANIFEST).is_file():
        return None
    if sha256_file(folder / MANIFEST) != record.get("manifest_sha256") or verify(folder):
        return None
    return record


def _claim(out: Path) -> None:
    """Refuse a folder that is not a build (an empty one becomes one)."""
    if out.is_symlink() or (out.exists() and not out.is_dir()):
        raise OutputError(f"{out} exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not (out / MARKERS).is_dir():
        raise OutputError(f"{out} is not a pgexport build folder (no {MARKERS}/); remove it or choose another output")
    (out / MARKERS).mkdir(parents=True, exist_ok=True)  # first: from here on `out` is a build folder


def _clean(out: Path) -> None:
    """Under the build lock: remove what a killed run left (partials, temp files, manifest)."""
    for leftover in [*out.glob(".*.partial-*"), *out.glob(".*.old-*"), *out.glob(f".{MANIFEST}.tmp-*"),
                     *(out / MARKERS).glob(".*.tmp-*")]:
        if leftover.is_dir():
            shutil.rmtree(leftover)
        else:
            leftover.unlink()
    (out / MANIFEST).unlink(missing_ok=True)  # the build is complete again only when it is rewritten


def _prune(out: Path, names: set[str]) -> list[str]:
    """Remove the outputs and markers of stages the recipe no longer has."""
    removed = []
    for marker in (out / MARKERS).glob("*.json"):
        if marker.stem not in names:
            stale = out / marker.stem
            if stale.is_dir() and not stale.is_symlink() and written_by_pgexport(stale):
                shutil.rmtree(stale)
            marker.unlink()  # last, so a killed prune is redone by the next run
            removed.append(marker.stem)
    return removed


# ---- gates, files, reproducibility ----

def bench_results(folder: Path) -> dict:
    """artifact name -> one row per (dtype, batch): the medians a latency gate reads, from bench.json."""
    report = json.loads((folder / "bench.json").read_text())
    results = {}
    for row in report["results"]:
        results.setdefault(Path(row["target"]).name, []).append({
            "dtype": row["dtype"], "batch": row["batch"], "new_tokens": row["new_tokens"],
            "ttft_ms": 1000 * row["ttft_s"]["p50"], "per_token_ms": 1000 * row["per_token_s"]["p50"],
            "tokens_per_s": row["tokens_per_s"], "peak_rss_bytes": row["peak_rss_bytes"],
        })
    return results


def gate_checks(recipe: Recipe, parity: dict, latency: dict, total_bytes: int) -> list[dict]:
    checks = []
    for artifact, report in parity.items():
        for dtype, hop in report["hops"].items():
            em = hop.get("exact_match")
            values = {
                "max_rel_diff": max(hop["prefill"]["max_rel_diff"], hop["decode"]["max_rel_diff"]),
                "min_cosine": min(hop["prefill"]["min_cosine"], hop["decode"]["min_cosine"]),
                "token_agreement": hop["tokens"]["agreement"],
                "exact_match_drop": -em["change_points"] if em else None,
            }
            checks.append({"gate": "parity", "artifact": artifact, "dtype": dtype, "thresholds": hop["thresholds"],
                           "values": values, "passed": hop["passed"], "failures": hop["failures"]})
    for gate, figure in (("max_ttft_ms", "ttft_ms"), ("max_per_token_ms", "per_token_ms")):
        limit = getattr(recipe.gates, gate)
        if limit is None:
            continue
        for artifact, rows in latency.items():
            for row in rows:
                passed = row[figure] <= limit
                checks.append({"gate": gate, "artifact": artifact, "dtype": row["dtype"], "batch": row["batch"],
                               "limit": limit, "value": round(row[figure], 3), "passed": passed,
                               "failures": [] if passed else [f"{row[figure]:.2f} ms > {limit} ms"]})
    limit = recipe.gates.max_total_bytes
    if limit is not None:
        passed = total_bytes <= limit
        checks.append({"gate": "max_total_bytes", "limit": limit, "value": total_bytes, "passed": passed,
                       "failures": [] if passed else [f"{total_bytes} bytes > {limit}"]})
    return checks


def reproducibility(recipe: Recipe, files: dict, records: dict) -> dict:
    """The same graph exported by two stages from the same checkpoint and opset must be byte-identical."""
    groups: dict[tuple, list[str]] = {}
    for stage in recipe.stages:
        if isinstance(stage, OnnxStage):
            for name in files:
                if name.startswith(f"{stage.name}/onnx/"):
                    groups.setdefault((stage.opset, name.split("/", 1)[1]), []).append(name)
    compared = {}
    for (opset, graph), names in sorted(groups.items()):
        if len(names) < 2:
            continue
        hashes = {files[name]["sha256"] for name in names}
        entry = {"files": names, "identical": len(hashes) == 1}
        if len(hashes) > 1:
            tools = {json.dumps(records[name.split("/", 1)[0]]["versions"], sort_keys=True) for name in names}
            entry["why"] = ("exported by different tool versions (see each stage's versions)" if len(tools) > 1 else
                            "same checkpoint, opset and tool versions: the exporter was not deterministic here")
        compared[graph] = entry
    return {
        "note": "ONNX export is deterministic: two clean runs give byte-identical .onnx files "
                "(checked across processes for torch 2.13 / onnxscript 0.7.2); graphs exported by two stages "
                "of this build are compared below",
        "compared": compared,
        "identical": all(entry["identical"] for entry in compared.values()),
    }


def _build_files(out: Path, names: list[str]) -> dict:
    """Every file of the build, from each stage's (just verified) manifest, plus manifests and markers."""
    files = {}
    for name in names:
        for relative, entry in read_manifest(out / name)["files"].items():
            files[f"{name}/{relative}"] = {**entry, "stage": name}
        manifest = out / name / MANIFEST
        files[f"{name}/{MANIFEST}"] = {"sha256": sha256_file(manifest), "bytes": manifest.stat().st_size, "stage": name}
        marker = _marker(out, name)
        files[f"{MARKERS}/{name}.json"] = {"sha256": sha256_file(marker), "bytes": marker.stat().st_size, "stage": name}
    return dict(sorted(files.items()))


# ---- the spine ----

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
    check_inputs_apart(out, [recipe_file, checkpoint_of(recipe),
                             *(getattr(stage, "eval_file", None) for stage in recipe.stages)])
    _claim(out)
    with build_lock(out):
        _clean(out)
        return _build(recipe, out, force, progress)


def _build(recipe: Recipe, out: Path, force: bool, progress: bool) -> dict:
    console = Console(stderr=True, quiet=not progress, highlight=False)
    checkpoint = checkpoint_of(recipe)
    source = {"checkpoint": checkpoint,
              "content_sha256": content_sha256(Path(checkpoint)) if Path(checkpoint).is_dir() else None}

    records, ran = {}, []  # stage name -> marker record; one summary row per stage
    for index, stage in enumerate(recipe.stages, start=1):
        if isinstance(stage, VerifyStage):
            continue  # checks the finished folder, below
        started = time.perf_counter()
        key, input_hash = stage_key_in(recipe, stage, source, out)
        records[stage.name] = None if force else _finished(out, stage.name, key)
        console.print(f"[{index}/{len(recipe.stages)}] {stage.name} ({kind_of(stage)}): "
                      + ("cached" if records[stage.name] else "running"), markup=False)
        status = "cached"
        if records[stage.name] is None:
            status = "ran"
            records[stage.name] = run_stage(recipe, stage, out, key, input_hash, progress)
        ran.append({"name": stage.name, "stage": kind_of(stage), "status": status, "key": key,
                    "seconds": round(time.perf_counter() - started, 2)})
    pruned = _prune(out, set(records))

    manifest = build_manifest(recipe, out, source, records)
    _write_json_atomic(out / MANIFEST, manifest)  # the build is complete
    summary = {
        "output": str(out), "passed": manifest["gates"]["passed"], "stages": ran, "pruned": pruned,
        "gates": manifest["gates"], "reproducible": manifest["reproducibility"]["identical"],
        "files": len(manifest["files"]), "bytes": sum(entry["bytes"] for entry in manifest["files"].values()),
    }
    check = next((stage for stage in recipe.stages if isinstance(stage, VerifyStage)), None)
    if check is not None:
        started, problems = time.perf_counter(), verify(out)
        console.print(f"[{len(recipe.stages)}/{len(recipe.stages)}] {check.name} (verify): "
                      + (f"{len(problems)} problem(s)" if problems else f"{summary['files']} files match"), markup=False)
        ran.append({"name": check.name, "stage": "verify", "status": "failed" if problems else "verified",
                    "seconds": round(time.perf_counter() - started, 2), "problems": problems})
        if problems:
            raise BadInputError(f"{out}: {len(problems)} file(s) do not match manifest.json: {'; '.join(problems[:5])}")
    if not summary["passed"]:
        failed = [f"{_gate_label(c)}: {'; '.join(c['failures'])}" for c in manifest["gates"]["checks"] if not c["passed"]]
        raise BuildGateFailed(f"gate failed: {' | '.join(failed)}", summary)
    return summary


def stage_key_in(recipe: Recipe, stage, source: dict, out: Path) -> tuple[str, str]:
    """(cache key, input hash) of a stage: its input is the checkpoint, or the files of the artifacts it checks."""
    source_hash = source["content_sha256"] or f"hub:{source['checkpoint']}"  # a hub id is keyed by name only
    if isinstance(stage, OnnxStage):
        input_hash = source_hash
    else:
        inputs = {"artifacts": {name: json_sha256(read_manifest(out / name)["files"]) for name in artifacts_of(recipe, stage)}}
        if isinstance(stage, ValidateStage):
            eval_file = eval_file_of(recipe, stage)
            inputs["checkpoint"] = source_hash
            inputs["eval_file"] = sha256_file(eval_file) if eval_file and eval_file.is_file() else None
            inputs["thresholds"] = {dtype: dataclasses.asdict(t) for dtype, t in thresholds_for(recipe).items()}
        if isinstance(stage, BenchStage):
            inputs["machine"] = machine()
        input_hash = json_sha256(inputs)
    return stage_key(stage, input_hash, versions()), input_hash


def artifacts_of(recipe: Recipe, stage: ValidateStage | BenchStage) -> list[str]:
    """The artifact stages a validate or bench stage measures: those it names, or every one before it."""
    if stage.artifacts:
        return list(stage.artifacts)
    before = recipe.stages[: recipe.stages.index(stage)]
    return [s.name for s in before if isinstance(s, ARTIFACT_STAGES)]


def run_stage(recipe: Recipe, stage, out: Path, key: str, input_hash: str, progress: bool) -> dict:
    """Run one stage into `out/<name>` (unmarked first, marked finished last); returns its marker record."""
    started = time.perf_counter()
    folder = out / stage.name
    _marker(out, stage.name).unlink(missing_ok=True)
    if isinstance(stage, OnnxStage):
        run_onnx(stage, recipe, folder, progress)
    elif isinstance(stage, ValidateStage):
        run_validate(stage, recipe, folder, {name: out / name for name in artifacts_of(recipe, stage)})
    elif isinstance(stage, BenchStage):
        run_bench(stage, folder, {name: out / name for name in artifacts_of(recipe, stage)}, progress)
    else:
        raise NotImplementedError(f"pgexport.build has no runner for stage {kind_of(stage)!r}")
    record = {
        "stage": kind_of(stage), "name": stage.name, "key": key, "input": input_hash,
        "options": {k: v for k, v in dataclasses.asdict(stage).items() if k != "name"},
        "versions": versions(), "manifest_sha256": sha256_file(folder / MANIFEST),
        "seconds": round(time.perf_counter() - started, 2),
    }
    _write_json_atomic(_marker(out, stage.name), record)  # last: the stage is finished
    return record


def build_manifest(recipe: Recipe, out: Path, source: dict, records: dict) -> dict:
    """The top-level manifest: files with their producing stage, stages, parity, gates, reproducibility."""
    files = _build_files(out, list(records))
    parity, latency = {}, {}
    for name, record in records.items():
        if record["stage"] == "validate":
            parity.update(json.loads((out / name / "parity.json").read_text()))
        if record["stage"] == "bench":
            latency.update(bench_results(out / name))
    checks = gate_checks(recipe, parity, latency, sum(entry["bytes"] for entry in files.values()))
    artifacts = [stage.name for stage in recipe.stages if isinstance(stage, ARTIFACT_STAGES)]
    return {
        "format": FORMAT,
        "pgexport_version": pgexport.__version__,
        "recipe": recipe.to_dict(),
        "source": source,
        "versions": versions(),
        "stages": {name: {k: v for k, v in record.items() if k != "seconds"} for name, record in records.items()},
        "artifacts": {name: {"stage": records[name]["stage"], "dtypes": read_manifest(out / name)["dtypes"],
                             "bytes": sum(e["bytes"] for f, e in files.items() if f.startswith(f"{name}/"))}
                      for name in artifacts},
        "parity": parity,
        "bench": latency,
        "gates": {"passed": all(check["passed"] for check in checks), "checks": checks},
        "reproducibility": reproducibility(recipe, files, records),
        "files": files,
    }


def _gate_label(check: dict) -> str:
    if "artifact" not in check:
        return check["gate"]
    batch = f" batch {check['batch']}" if "batch" in check else ""
    return f"{check['gate']} {check['artifact']}/{check['dtype']}{batch}"


def summary_tables(summary: dict) -> list[Table]:
    """The human view of a build: one row per stage, one per gate."""
    stages = Table(title=f"Build {summary['output']}")
    for column in ("stage", "kind", "status", "seconds"):
        stages.add_column(column)
    for stage in summary["stages"]:
        colour = {"ran": "yellow", "cached": "cyan", "verified": "green", "failed": "red"}[stage["status"]]
        stages.add_row(stage["name"], stage["stage"], f"[{colour}]{stage['status']}[/]", f"{stage['seconds']:.1f}")
    gates = Table(title="Gates")
    for column in ("gate", "limit", "value", "result"):
        gates.add_column(column)
    for check in summary["gates"]["checks"]:
        result = "[green]pass[/]" if check["passed"] else "[red]FAIL[/]: " + "; ".join(check["failures"])
        if check["gate"] == "parity":
            limit, value = check["thresholds"], check["values"]
            limits = [f"rel<={limit['max_rel_diff']:.0e}" if limit["max_rel_diff"] is not None else None,
                      f"cos>={limit['min_cosine']}", f"tokens>={limit['min_token_agreement']:.0%}",
                      f"em drop<={limit['max_exact_match_drop']}" if limit["max_exact_match_drop"] is not None else None]
            values = [f"rel {value['max_rel_diff']:.1e}", f"cos {value['min_cosine']:.6f}",
                      f"tokens {value['token_agreement']:.0%}",
                      f"em drop {value['exact_match_drop'] + 0.0:.1f}" if value["exact_match_drop"] is not None else None]
            gates.add_row(_gate_label(check), "\n".join(filter(None, limits)),
                          "\n".join(filter(None, values)), result)
        else:
            gates.add_row(_gate_label(check), str(check["limit"]), str(check["value"]), result)
    return [stages, gates]
