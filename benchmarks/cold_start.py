"""Cold start of `pgexport generate`: the whole process, from exec to exit, side by side with another
command (by default the same call through an older checkout of pgexport), alternating A B A B so that
drift of a shared machine hits both alike. Prints medians, min-max and the ratio pair by pair.

    python benchmarks/cold_start.py ARTIFACT [--runs 10] [--old-checkout /path/to/old/pgexport/repo]

ARTIFACT: an exported folder (e.g. `pgexport onnx --int8 -o out/demo`). With --old-checkout, B is the
same command run by that checkout's code (its `pgexport` package first on sys.path) with this
interpreter: what the command cost before, on the same machine, in the same minutes.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

IMAGE = Path(__file__).resolve().parents[1] / "pgexport" / "demo" / "data" / "images" / "eval_000.png"
RUN_CLI = "import sys; sys.path.insert(0, sys.argv.pop(1)); sys.argv[0] = 'pgexport'; from pgexport.cli import main; main()"


def cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").exists() else []:
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def timed(command: list[str]) -> float:
    started = time.perf_counter()
    result = subprocess.run(command, capture_output=True, text=True)
    elapsed = time.perf_counter() - started
    if result.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed ({result.returncode}):\n{result.stderr[-2000:]}")
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("artifact", type=Path)
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--old-checkout", type=Path, help="a checkout of pgexport to compare with (B)")
    args = parser.parse_args()
    generate = ["generate", str(args.artifact), "--image", str(IMAGE), "--prompt", "caption en"]
    here = Path(__file__).resolve().parents[1]
    commands = {"A (this checkout)": [sys.executable, "-c", RUN_CLI, str(here), *generate]}
    if args.old_checkout:
        commands["B (old checkout)"] = [sys.executable, "-c", RUN_CLI, str(args.old_checkout.resolve()), *generate]
    for command in commands.values():
        timed(command)  # warm-up: the page cache holds the files for every counted run
    times = {name: [] for name in commands}
    for _ in range(args.runs):
        for name, command in commands.items():
            times[name].append(timed(command))
    print(f"CPU: {cpu_model()}, {len(__import__('os').sched_getaffinity(0))} cores; {args.runs} runs each after a warm-up")
    for name, values in times.items():
        print(f"{name}: median {statistics.median(values):.2f} s (min {min(values):.2f}, max {max(values):.2f})")
    if len(times) == 2:
        a, b = times.values()
        ratios = [x / y for x, y in zip(a, b)]
        print(f"A/B pair by pair: median {statistics.median(ratios):.3f} (min {min(ratios):.3f}, max {max(ratios):.3f})")


if __name__ == "__main__":
    main()
