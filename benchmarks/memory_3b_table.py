"""Render benchmarks/results/memory_3b.jsonl (benchmarks/memory_3b.sh's measure.py lines) as the
markdown table of benchmarks/results/memory_3b.md: the latest run of each stage, in run order.

    python benchmarks/memory_3b_table.py [--jsonl FILE] [--budget-gb 14] [--update benchmarks/results/memory_3b.md]

--update replaces the table between the file's "<!-- table -->" and "<!-- /table -->" lines.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

RESULTS = Path(__file__).parent / "results" / "memory_3b.jsonl"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--jsonl", type=Path, default=RESULTS)
    parser.add_argument("--budget-gb", type=float, default=14.0)
    parser.add_argument("--update", type=Path, help="Markdown file whose table to replace.")
    args = parser.parse_args()
    table = render(args.jsonl, args.budget_gb)
    if args.update:
        text = args.update.read_text()
        head, rest = text.split("<!-- table -->\n", 1)
        _, tail = rest.split("<!-- /table -->\n", 1)
        args.update.write_text(f"{head}<!-- table -->\n{table}<!-- /table -->\n{tail}")
    else:
        print(table, end="")


def render(jsonl: Path, budget_gb: float) -> str:
    latest: dict[str, dict] = {}
    for line in jsonl.read_text().splitlines():
        if line.strip():
            entry = json.loads(line)
            stage = entry["label"].split(":", 1)[0]
            latest.pop(stage, None)  # re-inserted: the table keeps the order of the latest runs
            latest[stage] = entry
    lines = [f"| stage | what runs | peak RSS | within {budget_gb:g} GB | wall | exit | date | commit |",
             "|---|---|---|---|---|---|---|---|"]
    for stage, entry in latest.items():
        what = entry["label"].split(":", 1)[1].strip()
        fits = "yes" if entry["peak_rss_gb"] <= budget_gb else "**no**"
        lines.append(f"| {stage} | {what} | {entry['peak_rss_gb']:.2f} GB | {fits} | {entry['seconds']:.0f} s "
                     f"| {entry['exit_code']} | {entry['date']} | {entry.get('commit') or '?'} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
