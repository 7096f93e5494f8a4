"""Errors a user can act on. Each class carries the CLI exit code documented in the README."""

from __future__ import annotations

EXIT_OK = 0
EXIT_INTERNAL = 1
EXIT_USAGE = 2  # click's own code for a bad option or argument


class PgExportError(Exception):
    """Base class: the message is one line, shown to the user as is."""

    exit_code = EXIT_INTERNAL


class BadModelError(PgExportError):
    """Missing, unreadable, corrupt or non-PaliGemma checkpoint."""

    exit_code = 3


class BadInputError(PgExportError):
    """An input other than the model: an image, a data file, an artifact folder."""

    exit_code = 4


class OutputError(PgExportError):
    """The output cannot be written: it exists (and --force was not given), it is not pgexport's
    to replace, it is or holds an input, or the disk is read-only or full."""

    exit_code = 5


class GateFailedError(PgExportError):
    """The parity gate failed: the artifact was written, with its report, but must not ship."""

    exit_code = 6

    def __init__(self, message: str, report: dict | None = None):
        super().__init__(message)
        self.report = report


class UnsupportedError(PgExportError):
    """A valid request that pgexport cannot carry out (opset, method, architecture option)."""

    exit_code = 7


def import_optional(module: str, extra: str):
    """Import an optional dependency, or raise UnsupportedError naming the extra that installs it."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as error:
        raise UnsupportedError(f"{module} is not installed: pip install 'pgexport[{extra}]' ({error})") from error


# Top-level modules of the `export` extra (pyproject.toml): the base install runs artifacts only.
EXPORT_MODULES = ("torch", "transformers", "onnx", "onnxscript", "safetensors", "yaml", "accelerate")


def missing_export_extra(error: ImportError) -> UnsupportedError | None:
    """The exit-7 error for a command run without the exporter's dependencies, or None when the
    missing module is not one of them (then it is a bug)."""
    module = (getattr(error, "name", None) or "").split(".")[0]
    if module not in EXPORT_MODULES:
        return None
    return UnsupportedError(f"{module} is not installed: this command needs the exporter, pip install 'pgexport[export]' "
                            "(the base install runs artifacts only: generate, verify)")
