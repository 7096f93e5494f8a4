"""What a finished build reports: its gates (parity, latency, size), its files, the top-level
manifest, reproducibility across stages, and the tables `pgexport build` prints."""

from __future__ import annotations

import json
from pathlib import Path

from rich.table import Table

import pgexport
from pgexport.build.cache import MARKERS, marker
from pgexport.manifest import MANIFEST, read_manifest, sha256_file, versions
from pgexport.recipe import ARTIFACTS, Recipe

FORMAT = "pgexport-build/1"


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
        if "coreml" in report:  # a Core ML artifact: file, spec and (on macOS) runtime checks
            failures = report["coreml"].get("failures", [])
            checks.append({"gate": "coreml", "artifact": artifact, "dtype": report["coreml"].get("compress", "-"),
                           "limit": "all checks", "value": "passed" if report["passed"] else "failed",
                           "passed": report["passed"], "failures": failures or ([] if report["passed"] else ["failed"])})
            continue
        for dtype, hop in report.get("hops", {}).items():
            em = hop.get("exact_match")
            values = {
                "max_rel_diff": max(hop["prefill"]["max_rel_diff"], hop["decode"]["max_rel_diff"]),
                # the cosine the gate decides on: every position for exact precisions, the positions
                # generation reads for lossy ones (validate.Thresholds)
                "min_cosine": (min(hop["prefill"]["min_cosine"], hop["decode"]["min_cosine"])
                               if hop["thresholds"]["max_rel_diff"] is not None else hop["decode"]["min_cosine"]),
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
        if stage.kind == "onnx":
            for name in files:
                if name.startswith(f"{stage.name}/onnx/"):
                    groups.setdefault((stage.input, stage.config.opset, name.split("/", 1)[1]), []).append(name)
    compared = {}
    for (_, opset, graph), names in sorted(groups.items(), key=lambda item: str(item[0])):
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
                "of this build from the same checkpoint are compared below",
        "compared": compared,
        "identical": all(entry["identical"] for entry in compared.values()),
    }


def build_files(out: Path, names: list[str]) -> dict:
    """Every file of the build, from each stage's (just verified) manifest, plus manifests and markers."""
    files = {}
    for name in names:
        for relative, entry in read_manifest(out / name)["files"].items():
            files[f"{name}/{relative}"] = {**entry, "stage": name}
        manifest = out / name / MANIFEST
        files[f"{name}/{MANIFEST}"] = {"sha256": sha256_file(manifest), "bytes": manifest.stat().st_size, "stage": name}
        path = marker(out, name)
        files[f"{MARKERS}/{name}.json"] = {"sha256": sha256_file(path), "bytes": path.stat().st_size, "stage": name}
    return dict(sorted(files.items()))


def build_manifest(recipe: Recipe, out: Path, source: dict, records: dict) -> dict:
    """The top-level manifest: files with their producing stage, stages, parity, gates, reproducibility."""
    files = build_files(out, list(records))
    parity, latency = {}, {}
    for name, record in records.items():
        if record["stage"] == "validate":
            parity.update(json.loads((out / name / "parity.json").read_text()))
        if record["stage"] == "bench":
            latency.update(bench_results(out / name))
    checks = gate_checks(recipe, parity, latency, sum(entry["bytes"] for entry in files.values()))
    artifacts = [stage.name for stage in recipe.stages if stage.kind in ARTIFACTS]
    return {
        "format": FORMAT,
        "pgexport_version": pgexport.__version__,
        "recipe": recipe.to_dict(),
        "source": source,
        "versions": versions(),
        "stages": {name: {k: v for k, v in record.items() if k != "seconds"} for name, record in records.items()},
        "artifacts": {name: {"stage": records[name]["stage"], "dtypes": read_manifest(out / name).get("dtypes"),
                             "bytes": sum(e["bytes"] for f, e in files.items() if f.startswith(f"{name}/"))}
                      for name in artifacts},
        "parity": parity,
        "bench": latency,
        "gates": {"passed": all(check["passed"] for check in checks), "checks": checks},
        "reproducibility": reproducibility(recipe, files, records),
        "files": files,
    }


def gate_label(check: dict) -> str:
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
            # One line per measure in both columns, so that a limit sits beside its value ("-": no limit).
            lines = [(f"rel<={limit['max_rel_diff']:.0e}" if limit["max_rel_diff"] is not None else "rel -",
                      f"rel {value['max_rel_diff']:.1e}"),
                     (f"cos>={limit['min_cosine']}", f"cos {value['min_cosine']:.6f}"),
                     (f"tokens>={limit['min_token_agreement']:.0%}", f"tokens {value['token_agreement']:.0%}")]
            if value["exact_match_drop"] is not None:
                lines.append((f"em drop<={limit['max_exact_match_drop']}" if limit["max_exact_match_drop"] is not None
                              else "em drop -", f"em drop {value['exact_match_drop'] + 0.0:.1f}"))
            gates.add_row(gate_label(check), "\n".join(a for a, _ in lines), "\n".join(b for _, b in lines), result)
        else:
            gates.add_row(gate_label(check), str(check["limit"]), str(check["value"]), result)
    return [stages, gates] if summary["gates"]["checks"] else [stages]
