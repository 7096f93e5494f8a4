"""The tables and the console pgexport's commands print: parity, sizes; their width in a CI log."""

from __future__ import annotations

import os

from rich.console import Console
from rich.table import Table

console = Console()

# The width tables are printed at when stdout is not a terminal (a CI log, a pipe, a file): enough
# for every row on one line. rich would cut them to 80 columns there (or to the width of a terminal
# on stdin or stderr), wrapping every cell.
LOG_WIDTH = 1000


def output_width(stream) -> int | None:
    """The width for rich on `stream`: None (rich decides: COLUMNS, else the terminal's width) when
    COLUMNS is set or `stream` is a terminal, else LOG_WIDTH."""
    if os.environ.get("COLUMNS", "").isdigit():
        return None
    try:
        on_terminal = stream.isatty()
    except (AttributeError, ValueError):  # no isatty, or closed
        on_terminal = False
    return None if on_terminal else LOG_WIDTH


def parity_table(parity: dict) -> Table:
    """One row per precision: the figures the gate decided on (lossy precisions are gated on the
    decode cosine, which starts at the last prompt position; see validate.Thresholds)."""
    table = Table(title="Parity against the PyTorch model")
    for column in ("dtype", "prefill max|d|/range", "decode max|d|/range", "prefill min cos", "decode min cos",
                   "greedy tokens", "exact match", "gate"):
        table.add_column(column)
    for dtype, hop in parity["hops"].items():
        tokens = hop["tokens"]
        em = hop.get("exact_match")
        table.add_row(
            dtype,
            f"{hop['prefill']['max_rel_diff']:.2e}",
            f"{hop['decode']['max_rel_diff']:.2e}",
            f"{hop['prefill']['min_cosine']:.6f}",
            f"{hop['decode']['min_cosine']:.6f}",
            f"{'identical' if tokens['identical'] else 'differ'} ({tokens['agreement']:.0%} of {tokens['new_tokens']} x {tokens['batch']})",
            f"{em['artifact']:.1%} ({em['change_points']:+.1f} pts)" if em else "-",
            "[green]pass[/]" if hop["passed"] else "[red]FAIL[/]: " + "; ".join(hop["failures"]),
        )
    return table


def per_kind_lines(parity: dict) -> list[str]:
    """One line a precision whose gate scored held-out rows per prompt kind: each kind's figure,
    the PyTorch model's -> the artifact's (exact match; detect: boxes found at IoU >= 0.5;
    segment: mean mask IoU)."""
    lines = []
    for dtype, hop in parity["hops"].items():
        kinds = (hop.get("exact_match") or {}).get("per_kind")
        if kinds:
            pairs = ", ".join(f"{kind} {kinds['reference'][kind]:.3f} -> {kinds['artifact'][kind]:.3f}" for kind in kinds["reference"])
            lines.append(f"{dtype} per prompt kind (PyTorch -> artifact): {pairs}")
    return lines


def print_parity(out: Console, parity: dict) -> None:
    """The parity table, then each precision's per-kind line (one line each, never wrapped)."""
    out.print(parity_table(parity))
    for line in per_kind_lines(parity):
        out.print(line, soft_wrap=True, markup=False, highlight=False)


def seg_parity_line(record: dict) -> str:
    """One line on the segmentation decoder of a manifest's "seg_decoder" record."""
    parity = record.get("parity")
    head = f"seg decoder ({record['source']}, {record['codebook_size']} codes): "
    if parity is None:
        return head + "parity not checked (--no-validate)"
    return head + (f"{parity['hop']}, max |d| {parity['max_abs_diff']:.3g} ({parity['max_rel_diff']:.2g} of the largest "
                   f"logit, bound {parity['bound_rel']:g}), mask IoU {parity['mask_iou']:.6f} over {parity['rows']} code rows: "
                   + ("pass" if parity["passed"] else "FAIL"))


def print_sizes(console, sizes: dict) -> None:
    from pgexport.contract import GRAPH_NAMES

    table = Table(title="Size (MB)")
    for column in ("variant", *GRAPH_NAMES, "total", "x fp32"):
        table.add_column(column)
    for name, entry in sizes.items():
        precisions = entry.get("precisions", {})
        cells = [f"{entry['graphs'][g] / 1e6:.1f}" + (f" {precisions[g]}" if precisions.get(g, "fp32") != "fp32" else "") for g in GRAPH_NAMES]
        table.add_row(name, *cells, f"{entry['total'] / 1e6:.1f}", f"{entry['ratio']:.3f}")
    console.print(table)
