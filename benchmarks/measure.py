"""Run a command, report its wall time and peak RSS (the largest of the process tree, via
/proc sampling, plus the kernel's max RSS of waited-for children) as one JSON line.

    python benchmarks/measure.py --label NAME --json results.jsonl [--trace rss.tsv] -- COMMAND...

--trace writes one "seconds<TAB>GB" line per sample (every 0.2 s), to see which phase of a
command holds the peak.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path


def tree_rss(pid: int) -> int:
    """Sum of RSS bytes of `pid` and its descendants (anonymous + file-backed)."""
    total, stack = 0, [pid]
    while stack:
        current = stack.pop()
        try:
            with open(f"/proc/{current}/status") as status:
                for line in status:
                    if line.startswith("VmRSS:"):
                        total += int(line.split()[1]) * 1024
            with open(f"/proc/{current}/task/{current}/children") as children:
                stack += [int(child) for child in children.read().split()]
        except (FileNotFoundError, ProcessLookupError):
            continue
    return total


def _commit() -> str | None:
    """The checkout's commit (with "+" when it has changes), so a figure names the code it measured."""
    root = Path(__file__).resolve().parent.parent
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True, check=True)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root, capture_output=True, text=True)
    except (OSError, subprocess.CalledProcessError):
        return None
    return head.stdout.strip() + ("+" if dirty.stdout.strip() else "")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--label", required=True)
    parser.add_argument("--json", type=Path, help="Append the result to this JSON-lines file.")
    parser.add_argument("--trace", type=Path, help="Write the RSS of every sample to this TSV file.")
    parser.add_argument("command", nargs=argparse.REMAINDER)
    args = parser.parse_args()
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    commit = _commit()  # before the command: the code it runs
    started = time.perf_counter()
    process = subprocess.Popen(command)
    peak = 0
    trace = open(args.trace, "w") if args.trace else None
    while process.poll() is None:
        rss = tree_rss(process.pid)
        peak = max(peak, rss)
        if trace:
            trace.write(f"{time.perf_counter() - started:.1f}\t{rss / 1e9:.2f}\n")
            trace.flush()
        time.sleep(0.2)
    if trace:
        trace.close()
    seconds = time.perf_counter() - started
    kernel_peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
    result = {
        "label": args.label,
        "command": " ".join(command),
        "exit_code": process.returncode,
        "seconds": round(seconds, 1),
        "peak_rss_gb": round(max(peak, kernel_peak) / 1e9, 2),
        "cpu": os.cpu_count(),
        "date": time.strftime("%Y-%m-%d"),
        "commit": commit,
    }
    line = json.dumps(result)
    print(line, file=sys.stderr)
    if args.json:
        with open(args.json, "a") as handle:
            handle.write(line + "\n")
    return process.returncode


if __name__ == "__main__":
    sys.exit(main())
