"""manifest.json: what an artifact folder holds and how it was made (where outputs go: pgexport.output)."""

from __future__ import annotations

import contextlib
import hashlib
import json
import platform
from importlib import metadata
from pathlib import Path

from pgexport.errors import BadInputError
from pgexport.output import MANIFEST, STAGING_MARK

VERSIONED = ("pgexport", "torch", "transformers", "onnx", "onnxruntime", "onnxscript", "numpy")


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def file_entries(folder: Path) -> dict[str, dict]:
    """Every file under `folder` except its own manifest and a staging mark (nested manifests are
    listed): relative path -> {sha256, bytes}."""
    entries = {}
    for path in sorted(Path(folder).rglob("*")):
        if path.is_file() and path != Path(folder) / MANIFEST and path != Path(folder) / STAGING_MARK:
            entries[path.relative_to(folder).as_posix()] = {"sha256": sha256_file(path), "bytes": path.stat().st_size}
    return entries


def versions() -> dict[str, str]:
    found = {"python": platform.python_version()}
    for name in VERSIONED:
        with contextlib.suppress(metadata.PackageNotFoundError):
            found[name] = metadata.version(name)
    return found


def write_manifest(folder: Path, **fields) -> dict:
    """Write manifest.json with `fields`, the tool versions and every file's hash and size."""
    manifest = {**fields, "versions": versions(), "files": file_entries(folder)}
    (Path(folder) / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=False) + "\n")
    return manifest


def read_manifest(folder: Path) -> dict:
    """The manifest of a pgexport folder; BadInputError when it is missing or malformed."""
    path = Path(folder) / MANIFEST
    if not Path(folder).is_dir():
        raise BadInputError(f"{folder}: no such folder (expected a pgexport folder with its {MANIFEST})")
    if not path.is_file():
        raise BadInputError(f"{folder}: no {MANIFEST}; not a pgexport artifact")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise BadInputError(f"{path}: unreadable ({str(error)[:120]})") from error
    if not isinstance(manifest, dict):
        raise BadInputError(f"{path}: malformed (not a JSON object)")
    files = manifest.get("files", {})
    if not isinstance(files, dict) or not all(
        isinstance(entry, dict) and isinstance(entry.get("bytes"), int) and isinstance(entry.get("sha256"), str)
        for entry in files.values()
    ):
        raise BadInputError(f"{path}: malformed \"files\" (expected {{name: {{sha256, bytes}}}})")
    return manifest


def file_problems(folder: Path, manifest: dict, names=None, sha256: bool = False) -> list[str]:
    """For files about to be read: each of `names` (default: every file the manifest lists) is
    listed, present and of the recorded size (cheap), and with `sha256` of the recorded hash."""
    files = manifest.get("files", {})
    problems = []
    for name in sorted(files if names is None else names):
        path = Path(folder) / name
        if name not in files:
            problems.append(f"not in {MANIFEST}: {name}")
        elif not path.is_file():
            problems.append(f"missing: {name}")
        elif path.stat().st_size != files[name]["bytes"]:
            problems.append(f"size differs: {name} ({path.stat().st_size} bytes, manifest {files[name]['bytes']})")
        elif sha256 and sha256_file(path) != files[name]["sha256"]:
            problems.append(f"sha256 differs: {name}")
    return problems


def require_files(folder: Path, manifest: dict, names=None, sha256: bool = False) -> None:
    """file_problems, raised as one BadInputError line that sends the user to `pgexport verify`."""
    problems = file_problems(folder, manifest, names, sha256=sha256)
    if problems:
        more = f" (and {len(problems) - 3} more)" if len(problems) > 3 else ""
        raise BadInputError(f"{folder}: {'; '.join(problems[:3])}{more}: the artifact was changed or damaged "
                            f"(run `pgexport verify {folder}`)")


def verify(folder: Path) -> list[str]:
    """Problems with an artifact against its manifest: altered, truncated, missing or extra files.

    Returns [] when every file's size and sha256 match and nothing else is there.
    """
    folder = Path(folder)
    expected = read_manifest(folder).get("files", {})
    problems = []
    inside = folder.resolve()
    for path in sorted(folder.rglob("*")):
        if path.is_symlink() and inside not in path.resolve().parents:
            problems.append(f"symlink out of the folder: {path.relative_to(folder).as_posix()}")
    if problems:
        return problems  # never hash what lies outside the artifact
    present = {p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file() and p != folder / MANIFEST}
    for name in sorted(set(expected) - present):
        problems.append(f"missing: {name}")
    for name in sorted(present - set(expected)):
        problems.append(f"extra: {name}")
    for name in sorted(set(expected) & present):
        path, entry = folder / name, expected[name]
        if path.stat().st_size != entry["bytes"]:
            problems.append(f"size differs: {name} ({path.stat().st_size} bytes, manifest {entry['bytes']})")
        elif sha256_file(path) != entry["sha256"]:
            problems.append(f"sha256 differs: {name}")
    return problems
