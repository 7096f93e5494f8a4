"""manifest.json: what an artifact folder holds and how it was made, and the atomic-write helpers."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import platform
import shutil
import tempfile
from importlib import metadata
from pathlib import Path

from pgexport.errors import BadInputError, OutputExistsError

MANIFEST = "manifest.json"
VERSIONED = ("pgexport", "torch", "transformers", "onnx", "onnxruntime", "onnxscript", "numpy")


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def file_entries(folder: Path) -> dict[str, dict]:
    """Every file under `folder` except its own manifest (nested ones are listed): relative path -> {sha256, bytes}."""
    entries = {}
    for path in sorted(Path(folder).rglob("*")):
        if path.is_file() and path != Path(folder) / MANIFEST:
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
    path = Path(folder) / MANIFEST
    if not path.is_file():
        raise BadInputError(f"{folder}: no {MANIFEST}; not a pgexport artifact")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise BadInputError(f"{path}: unreadable ({error})") from error


def verify(folder: Path) -> list[str]:
    """Problems with an artifact against its manifest: altered, truncated, missing or extra files.

    Returns [] when every file's size and sha256 match and nothing else is there.
    """
    folder = Path(folder)
    expected = read_manifest(folder).get("files", {})
    problems = []
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


def check_output(output: Path, force: bool) -> None:
    """Refuse an existing output folder unless `force`, before any work starts."""
    if output.exists() and not force:
        raise OutputExistsError(f"{output} exists; pass --force to replace it")
    if output.exists() and not output.is_dir():
        raise OutputExistsError(f"{output} exists and is not a folder")


@contextlib.contextmanager
def staging_folder(output: Path, force: bool):
    """Yield a temporary folder beside `output`; move it into place only when the block succeeds.

    An interrupted run leaves at most a `.<name>.partial-*` folder, never something at `output`
    that looks complete. With `force`, an existing output is replaced only after the new one is
    finished, so a failure keeps the old artifact.
    """
    output = Path(output)
    check_output(output, force)
    output.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{output.name}.partial-", dir=output.parent))
    try:
        yield staging
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    if output.exists():
        retired = output.with_name(f".{output.name}.old-{os.getpid()}")
        output.rename(retired)
        staging.rename(output)
        shutil.rmtree(retired, ignore_errors=True)
    else:
        staging.rename(output)
