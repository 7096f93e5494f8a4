"""How much does `pgexport bench`'s per-step clock cost the PyTorch paths?

The bench stamps the clock (a device synchronize on CUDA) after every decode step, which stops the
host from queueing the next step while the GPU still runs this one. This script times plain
`generate` calls with no hook at all, N+1 new tokens minus 1 new token, so the difference is N
decode steps exactly as a user would run them, and prints that next to the stamped figure.

    python benchmarks/step_timer_check.py CHECKPOINT [--device cuda] [--new-tokens 64] [--runs 5]
"""

from __future__ import annotations

import argparse
import statistics

from pgexport.bench import Clock, TorchRunner, make_inputs, resolve_target
from pgexport.config import BenchConfig


def plain_generate_seconds(runner: TorchRunner, inputs: dict, new_tokens: int, clock: Clock) -> float:
    tensors = runner.tensors(inputs)
    start = clock()
    runner.generate(tensors, new_tokens)  # no logits processor: nothing stamped between steps
    return clock() - start


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--batch", type=int, default=1)
    args = parser.parse_args()
    target = resolve_target(args.checkpoint)
    dtype = "bf16" if args.device == "cuda" else "fp32"
    settings = BenchConfig(device=args.device, dtypes=None, batches=(args.batch,), resolutions=None, prompt_tokens=10,
                           new_tokens=args.new_tokens, warmup=2, runs=args.runs, threads=None)
    inputs = make_inputs(target.config, args.batch, 10, target.native_resolution)
    clock = Clock(args.device)
    print("| path | stamped per token s (bench) | plain generate per token s | stamped / plain |")
    print("|---|---|---|---|")
    for static in (False, True) if args.device == "cuda" else (False,):
        runner = TorchRunner(target, dtype, settings, static_cache=static)
        for _ in range(2):  # warm-up: every cache length below compiled and captured
            runner.run(inputs, args.new_tokens, clock)
            plain_generate_seconds(runner, inputs, args.new_tokens + 1, clock)
            plain_generate_seconds(runner, inputs, 1, clock)
        stamped = statistics.median(step for _ in range(args.runs)
                                    for step in runner.run(inputs, args.new_tokens, clock).steps)
        plain = statistics.median(
            (plain_generate_seconds(runner, inputs, args.new_tokens + 1, clock)
             - plain_generate_seconds(runner, inputs, 1, clock)) / args.new_tokens
            for _ in range(args.runs))
        print(f"| {runner.engine} batch {args.batch} | {stamped:.5f} | {plain:.5f} | {stamped / plain:.2f} |")
        del runner


if __name__ == "__main__":
    main()
