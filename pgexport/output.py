"""Where pgexport writes, and what it may replace: output checks, staging folders, build locks.

The rules (README "Never lose data"):
- an input (checkpoint, artifact, recipe, data file) is never written to, and no output may be
  the input, contain it, or sit inside it;
- `force` replaces only a folder pgexport wrote itself (a manifest.json whose "format" starts with
  "pgexport-"), never the working directory, the home directory or a folder holding either;
- everything is written into a staging folder beside the output and renamed into place once
  complete. A staging folder holds a STAGING_MARK file until then: it never verifies as an
  artifact, and the next run beside it removes it once the process that made it is gone.
Every refusal is an OutputError (exit 5) raised before any work.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import secrets
import shutil
from pathlib import Path

from pgexport.errors import OutputError

MANIFEST = "manifest.json"
STAGING_MARK = ".pgexport-staging"  # in a staging folder until it is renamed into place: "<pid>"
OWN_FORMAT_PREFIX = "pgexport-"
BUILD_FORMAT_PREFIX = "pgexport-build/"  # a build folder holds its stages' artifacts (pgexport.build)


def _resolved(path: str | Path) -> Path:
    return Path(path).expanduser().resolve()


def _within(path: Path, folder: Path) -> bool:
    """`path` is `folder` or somewhere inside it (both resolved)."""
    return path == folder or folder in path.parents


def written_by_pgexport(folder: Path) -> bool:
    """A folder pgexport made: its manifest.json (a plain file) names a pgexport format."""
    manifest = Path(folder) / MANIFEST
    if not manifest.is_file() or manifest.is_symlink():
        return False
    try:
        data = json.loads(manifest.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return False
    return isinstance(data, dict) and str(data.get("format", "")).startswith(OWN_FORMAT_PREFIX)


def check_inputs_apart(output: str | Path, inputs=()) -> None:
    """Refuse an output that is an input, holds one, or lies inside one (writing there changes the input)."""
    out = _resolved(output)
    for given in inputs:
        if given is None or not Path(given).exists():
            continue  # a hub id, or a default that is not a path
        source = _resolved(given)
        if _within(source, out):
            what = "is" if source == out else "contains"
            raise OutputError(f"{output} {what} the input {given}: choose another output folder")
        if _within(out, source):
            raise OutputError(f"{output} is inside the input {given}: choose an output folder outside it")


def check_not_inside_an_artifact(output: str | Path) -> None:
    """Refuse an output inside a folder pgexport wrote (an artifact): the new files would make that
    artifact fail `pgexport verify`. A build folder holds its stages' folders, so it is allowed."""
    for parent in _resolved(output).parents:
        if written_by_pgexport(parent):
            manifest = json.loads((parent / MANIFEST).read_text(encoding="utf-8"))
            if not str(manifest.get("format", "")).startswith(BUILD_FORMAT_PREFIX):
                raise OutputError(f"{output} is inside the pgexport artifact {parent}, which would then fail "
                                  "`pgexport verify`: choose an output folder outside it")


def check_output(output: str | Path, force: bool, inputs=()) -> None:
    """Everything that could make writing `output` lose data, checked before any work starts.

    `inputs`: the command's local input paths (files or folders). An existing output is replaced
    only with `force`, and only when pgexport wrote it and it is not the working or home directory
    nor holds them."""
    output = Path(output)
    check_inputs_apart(output, inputs)
    check_not_inside_an_artifact(output)
    if not output.exists() and not output.is_symlink():
        return
    if not force:
        raise OutputError(f"{output} exists; pass --force to replace it")
    if output.is_symlink() or not output.is_dir():
        raise OutputError(f"{output} exists and is not a folder pgexport wrote; --force does not replace it")
    out = _resolved(output)
    for name, place in (("the working directory", Path.cwd()), ("your home directory", Path.home())):
        if _within(_resolved(place), out):
            raise OutputError(f"{output} is or holds {name}; --force never replaces it: choose another output folder")
    if not written_by_pgexport(output):
        raise OutputError(f"{output} was not written by pgexport (no pgexport {MANIFEST}); --force replaces only "
                          "pgexport's own output folders: remove it yourself or choose another folder")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _owner_pid(folder: Path) -> int | None:
    try:
        return int((folder / STAGING_MARK).read_text().strip())
    except (OSError, ValueError):
        return None


def remove_stale_staging(parent: Path, name: str) -> list[Path]:
    """Remove the staging and retired folders of `name` that a killed pgexport left in `parent`:
    only folders with our mark whose process is gone."""
    removed = []
    for leftover in sorted([*parent.glob(f".{name}.partial-*"), *parent.glob(f".{name}.old-*")]):
        pid = _owner_pid(leftover)
        if leftover.is_dir() and not leftover.is_symlink() and pid is not None and not _alive(pid):
            shutil.rmtree(leftover, ignore_errors=True)
            removed.append(leftover)
    return removed


def _new_folder(parent: Path, prefix: str) -> Path:
    """A fresh folder made with the process umask (mkdtemp would force mode 0700), marked ours."""
    for _ in range(100):
        folder = parent / f"{prefix}{secrets.token_hex(4)}"
        try:
            folder.mkdir()
        except FileExistsError:
            continue
        (folder / STAGING_MARK).write_text(f"{os.getpid()}\n")
        return folder
    raise FileExistsError(errno.EEXIST, "no free staging folder name", str(parent))


@contextlib.contextmanager
def staging_folder(output: str | Path, force: bool, inputs=()):
    """Yield a new folder beside `output`; rename it into place only when the block succeeds.

    Checks first (check_output). An interrupted run leaves at most a marked `.<name>.partial-*`
    folder, which never verifies and is removed by the next run; a failure keeps the old output."""
    output = Path(output)
    check_output(output, force, inputs)
    output.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_staging(output.parent, output.name)
    staging = _new_folder(output.parent, f".{output.name}.partial-")
    try:
        yield staging
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    (staging / STAGING_MARK).unlink()
    if not output.exists():
        staging.rename(output)
        return
    retired = output.with_name(f".{output.name}.old-{os.getpid()}-{secrets.token_hex(2)}")
    output.rename(retired)
    (retired / STAGING_MARK).write_text(f"{os.getpid()}\n")  # a kill now leaves it to the next run
    staging.rename(output)
    shutil.rmtree(retired, ignore_errors=True)


@contextlib.contextmanager
def temp_files_in(folder: Path):
    """Python's temporary files (coremltools makes its packages there) go to `folder`, a new folder
    inside a staging folder, so a killed run leaves none in the system temp directory; removed
    when the block ends."""
    import tempfile

    folder.mkdir()
    previous, tempfile.tempdir = tempfile.tempdir, str(folder)
    try:
        yield folder
    finally:
        tempfile.tempdir = previous
        shutil.rmtree(folder, ignore_errors=True)


@contextlib.contextmanager
def build_lock(folder: Path):
    """Hold an exclusive lock on a build folder; another holder is an OutputError naming its pid."""
    import fcntl

    handle = os.open(folder, os.O_RDONLY)
    try:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _flock_holder(folder)
            raise OutputError(f"{folder} is being built by another pgexport"
                              + (f" (pid {holder})" if holder else "") + "; wait for it to finish") from None
        yield
    finally:
        os.close(handle)


def _flock_holder(folder: Path) -> int | None:
    """The pid holding a flock on `folder`, from /proc/locks (Linux), or None."""
    stat = os.stat(folder)
    device = f"{os.major(stat.st_dev):02x}:{os.minor(stat.st_dev):02x}:{stat.st_ino}"
    with contextlib.suppress(OSError):
        for line in Path("/proc/locks").read_text().splitlines():
            fields = line.split()
            if len(fields) > 5 and fields[1] == "FLOCK" and fields[5] == device:
                return int(fields[4])
    return None
