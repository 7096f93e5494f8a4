"""What the CLI prints reads well in a CI log (stdout not a terminal) as in a terminal: tables keep
every row on one line, third-party progress bars and known-harmless warnings stay out of stderr,
pgexport's own progress stays in."""

from __future__ import annotations

import importlib.util
import logging
import warnings
from pathlib import Path

import pytest
from click.testing import CliRunner

from pgexport import pipeline
from pgexport.cli import main
from pgexport.tables import LOG_WIDTH
from pgexport.errors import GateFailedError


def hop(dtype, prefill_cos, decode_cos, agreement=1.0, exact_match=None, failures=()):
    return {
        "dtype": dtype,
        "prefill": {"max_abs_diff": 0.3, "max_rel_diff": 0.23011787, "min_cosine": prefill_cos},
        "decode": {"max_abs_diff": 0.03, "max_rel_diff": 0.02519366, "min_cosine": decode_cos, "steps": 16},
        "tokens": {"batch": 3, "left_padded": True, "new_tokens": 16, "identical": agreement == 1.0, "agreement": agreement},
        "exact_match": exact_match,
        "failures": list(failures),
        "passed": not failures,
    }


PARITY = {"hops": {
    "fp32": hop("fp32", 0.99999982, 0.99999988, exact_match={"artifact": 0.984, "change_points": 0.0}),
    "int8": hop("int8", 0.68461668, 0.99766654, exact_match={"artifact": 0.969, "change_points": -1.6}),
    "q4": hop("q4", 0.51234567, 0.97123456, agreement=0.6875,
              failures=["decode min cosine 0.971235 < 0.99", "greedy token agreement 0.69 < 0.75"]),
}, "passed": False}

SIZES = {
    "fp32": {"graphs": {"vision_encoder": 289535, "embed_tokens": 183642, "decoder_model_merged": 425112},
             "total": 898289, "ratio": 1.0},
    "int8": {"graphs": {"vision_encoder": 239434, "embed_tokens": 183642, "decoder_model_merged": 212880},
             "precisions": {"vision_encoder": "int8", "embed_tokens": "fp32", "decoder_model_merged": "int8"},
             "total": 635956, "ratio": 0.708},
}


def tables(text: str) -> list[list[str]]:
    """Each rich table in `text` (heavy-head box): its lines from the top border to the bottom one."""
    found, current = [], None
    for line in text.splitlines():
        if line.startswith("┏"):
            current = []
        if current is not None:
            current.append(line)
        if line.startswith("└"):
            found.append(current)
            current = None
    return found


def assert_one_line_per_row(table: list[str], rows: int) -> None:
    """The header on one line, one line per row, every line as wide: no cell wrapped or cut."""
    assert sum(line.startswith("┃") for line in table) == 1, "\n".join(table)
    assert sum(line.startswith("│") for line in table) == rows, "\n".join(table)
    assert len({len(line) for line in table}) == 1, "\n".join(table)
    assert not any("…" in line for line in table), "\n".join(table)


def run_onnx(monkeypatch, tmp_path, result=None, error=None):
    def export_onnx(*args, **kwargs):
        if error is not None:
            raise error
        return result

    monkeypatch.setattr(pipeline, "export_onnx", export_onnx)
    return CliRunner().invoke(main, ["onnx", "-o", str(tmp_path / "out")])


def test_tables_keep_every_row_on_one_line_off_a_terminal(monkeypatch, tmp_path):
    """CliRunner's stdout is not a terminal, as in CI: rich alone would squeeze both tables to 80 columns."""
    monkeypatch.delenv("COLUMNS", raising=False)
    manifest = {"parity": {**PARITY, "hops": {k: v for k, v in PARITY["hops"].items() if k != "q4"}, "passed": True},
                "sizes": SIZES, "files": {"config.json": {"bytes": 1437}}}
    result = run_onnx(monkeypatch, tmp_path, result=manifest)
    assert result.exit_code == 0, result.output
    parity, sizes = tables(result.stdout)
    assert_one_line_per_row(parity, rows=2)
    assert_one_line_per_row(sizes, rows=2)
    assert len(parity[0]) > 80  # 8 columns: what the 80-column squeeze used to wrap
    for cell in ("prefill max|d|/range", "decode min cos", "identical (100% of 16 x 3)", "96.9% (-1.6 pts)",
                 "decoder_model_merged", "0.2 int8"):
        assert cell in result.stdout
    assert max(len(line) for line in result.stdout.splitlines()) < LOG_WIDTH


def test_a_failed_gate_prints_its_whole_table(monkeypatch, tmp_path):
    """Exit 6, and the failing row's reasons on that row's one line."""
    monkeypatch.delenv("COLUMNS", raising=False)
    result = run_onnx(monkeypatch, tmp_path, error=GateFailedError("parity gate failed", report=PARITY))
    assert result.exit_code == GateFailedError.exit_code, result.output
    (parity,) = tables(result.stdout)
    assert_one_line_per_row(parity, rows=3)
    failing = [line for line in parity if line.startswith("│ q4")]
    assert len(failing) == 1 and "FAIL: decode min cosine 0.971235 < 0.99; greedy token agreement 0.69 < 0.75" in failing[0]
    assert len(parity[0]) > 120
    assert "error: parity gate failed" in result.stderr


def test_columns_still_decides_the_width(monkeypatch, tmp_path):
    monkeypatch.setenv("COLUMNS", "80")
    result = run_onnx(monkeypatch, tmp_path, error=GateFailedError("parity gate failed", report=PARITY))
    assert result.exit_code == GateFailedError.exit_code, result.output
    (parity,) = tables(result.stdout)
    assert max(len(line) for line in parity) == 80  # rich fits the table to COLUMNS, wrapping its cells
    assert sum(line.startswith("│") for line in parity) > 3


def third_party_progress(text: str) -> list[str]:
    """tqdm lines ("Loading weights:  50%|###  | 35/70 [00:00<00:00, 5094.94it/s]"), \r-separated too."""
    lines = text.replace("\r", "\n").splitlines()
    return [line for line in lines if "it/s]" in line or "ops/s]" in line or "passes/s]" in line
            or "Loading weights" in line or "Writing model shards" in line]


def test_onnx_prints_no_third_party_progress_bar(demo_run):
    """transformers draws 'Loading weights' (and 'Writing model shards') tqdm bars in every command;
    pgexport's own stage bar (rich, stderr) stays. The session's `pgexport onnx --int8` of the demo."""
    _, result = demo_run
    assert third_party_progress(result.stderr) == [], result.stderr
    assert "done" in result.stderr and "7/7" in result.stderr  # pgexport's own progress
    assert len([line for line in result.stderr.splitlines() if line.strip()]) == 1, result.stderr


def test_coreml_prints_no_coremltools_bars_or_known_harmless_warnings(tmp_path, caplog):
    """coremltools draws a tqdm bar per op loop, per pass pipeline and per compression pass (~100 lines
    per package), logs lines such as 'Torch var key_cache is added again' (and, for int4, that the
    3-channel patch embedding stays fp16), and torch.jit.trace warns twice on transformers' code;
    none of it reaches the output, and pgexport's stage bar does."""
    if importlib.util.find_spec("coremltools") is None:  # not imported here: its import logs are part of the test
        pytest.skip("coremltools is not installed (pgexport[coreml])")
    from pgexport.coreml import HARMLESS_COREMLTOOLS_LOGS

    with caplog.at_level(logging.WARNING), warnings.catch_warnings(record=True) as caught:
        # Every time, even when an earlier test already saw them: the two warnings the trace provokes.
        warnings.filterwarnings("always", message="`is_gradient_checkpointing` is deprecated")
        warnings.filterwarnings("always", message="Converting a tensor to a Python boolean", module=r"transformers\.")
        # The demo model: its sizes are multiples of int4's block of 32 (the tiny presets' are not)
        result = CliRunner().invoke(main, ["coreml", "-o", str(tmp_path / "out"), "--max-context", "48",
                                           "--no-validate", "--compress", "int4"])
    assert result.exit_code == 0, result.output
    assert third_party_progress(result.stderr) == [], result.stderr[:2000]
    # load, layout, 2 conversions, 2 compressions, the demo's own seg decoder, spec check, manifest
    assert "done" in result.stderr and "9/9" in result.stderr
    # (through the "coremltools" logger, and the root logger some of its modules use: int4's block-size note)
    harmless = [r.getMessage() for r in caplog.records if any(text in r.getMessage() for text in HARMLESS_COREMLTOOLS_LOGS)]
    assert harmless == []
    # (torch's own TracerWarnings, from torch.nn.functional, are torch's to hide: it ignores them itself.)
    traced = [f"{w.filename}:{w.lineno}: {w.category.__name__}: {w.message}" for w in caught
              if "transformers" in Path(w.filename).parts
              and ("is_gradient_checkpointing" in str(w.message) or "Converting a tensor to a Python boolean" in str(w.message))]
    assert traced == []
