"""What makes a build's stages cached and atomic: cache keys, completion markers, and the cleanup
of what a killed run left.

A stage's key hashes its kind, its options, its input and the tool versions; its marker
(`stages/<name>.json`) is written only after its folder is renamed into place, so a run killed at
any point never leaves a stage marked finished.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

from pgexport.errors import OutputError
from pgexport.manifest import MANIFEST, read_manifest, sha256_file, verify
from pgexport.output import written_by_pgexport

MARKERS = "stages"


def content_sha256(folder: Path) -> str:
    """One hash over every file of a folder (relative names and bytes): config and tokenizer included."""
    digest = hashlib.sha256()
    for path in sorted(p for p in Path(folder).rglob("*") if p.is_file()):
        digest.update(path.relative_to(folder).as_posix().encode() + b"\0")
        digest.update(sha256_file(path).encode())
    return digest.hexdigest()


def json_sha256(data) -> str:
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()


def path_sha256(path: str | Path | None) -> str | None:
    """The content hash of a file or folder a stage reads (None for none; a hub id by name)."""
    if path is None:
        return None
    path = Path(path)
    if path.is_file():
        return sha256_file(path)
    if path.is_dir():
        return content_sha256(path)
    return f"name:{path}"


def stage_output_sha256(folder: Path) -> str:
    """A finished stage's output, by its manifest's file hashes (verified before it is trusted)."""
    return json_sha256(read_manifest(folder)["files"])


def stage_key(kind: str, options: dict, input_hash: str, tool_versions: dict, variants: dict | None = None) -> str:
    """The cache key: what the stage is, with which options (and the variants they make), on which
    input, by which tools."""
    return json_sha256({"stage": kind, "options": options, "variants": variants, "input": input_hash,
                        "versions": tool_versions})


def marker(out: Path, name: str) -> Path:
    return out / MARKERS / f"{name}.json"


def write_json_atomic(path: Path, data: dict) -> None:
    temporary = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    temporary.write_text(json.dumps(data, indent=2) + "\n")
    os.replace(temporary, path)


def finished(out: Path, name: str, key: str) -> dict | None:
    """The stage's marker if its key matches and its folder verifies against the recorded manifest."""
    path = marker(out, name)
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text())
    except json.JSONDecodeError:
        return None
    folder = out / name
    if not isinstance(record, dict) or record.get("key") != key or not (folder / MANIFEST).is_file():
        return None
    if sha256_file(folder / MANIFEST) != record.get("manifest_sha256") or verify(folder):
        return None
    return record


def claim(out: Path) -> None:
    """Refuse a folder that is not a build (an empty one becomes one)."""
    if out.is_symlink() or (out.exists() and not out.is_dir()):
        raise OutputError(f"{out} exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not (out / MARKERS).is_dir():
        raise OutputError(f"{out} is not a pgexport build folder (no {MARKERS}/); remove it or choose another output")
    (out / MARKERS).mkdir(parents=True, exist_ok=True)  # first: from here on `out` is a build folder


def clean(out: Path) -> None:
    """Under the build lock: remove what a killed run left (partials, temp files, a distill run's
    checkpoints, the manifest)."""
    from pgexport.distill.train import RUN_MARK

    leftovers = [*out.glob(".*.partial-*"), *out.glob(".*.old-*"), *out.glob(f".{MANIFEST}.tmp-*"),
                 *(out / MARKERS).glob(".*.tmp-*"),
                 *(work for work in out.glob("*.checkpoints") if (work / RUN_MARK).is_file())]
    for leftover in leftovers:
        if leftover.is_dir():
            shutil.rmtree(leftover)
        else:
            leftover.unlink()
    (out / MANIFEST).unlink(missing_ok=True)  # the build is complete again only when it is rewritten


def prune(out: Path, names: set[str]) -> list[str]:
    """Remove the outputs and markers of stages the recipe no longer has."""
    removed = []
    for path in (out / MARKERS).glob("*.json"):
        if path.stem not in names:
            stale = out / path.stem
            if stale.is_dir() and not stale.is_symlink() and written_by_pgexport(stale):
                shutil.rmtree(stale)
            path.unlink()  # last, so a killed prune is redone by the next run
            removed.append(path.stem)
    return removed


def machine() -> dict:
    """What a latency depends on besides the artifact: a bench result is cached for this machine only."""
    import platform

    return {"platform": platform.platform(), "processor": platform.processor(), "machine": platform.machine(),
            "cpus": os.cpu_count(), "usable_cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
            "node": platform.node()}


def options_of_stage(stage) -> dict:
    """The options a stage's key and marker record: its config, and what it reads."""
    from pgexport.config import options_of

    reads = {"input": stage.input} if stage.input is not None else {}
    if stage.artifacts:
        reads["artifacts"] = list(stage.artifacts)
    return {**reads, **options_of(stage.config)}


def variants_of_stage(stage) -> dict | None:
    """For onnx and quantize stages, the graph precisions their options make: part of the key, since
    what an option means per graph can change (`--int8` took the token table in issue 15), and a
    folder made under another meaning must be rebuilt. None for other stages."""
    from pgexport.config import methods_of
    from pgexport.quantize.artifact import plan_variants

    if not hasattr(stage.config, "graphs"):
        return None
    return plan_variants(methods_of(stage.config), stage.config.graphs())
