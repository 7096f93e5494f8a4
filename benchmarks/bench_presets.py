"""Random-weight checkpoints for the bench suite: `pgexport.random_model`'s presets plus a mid-size one.

    python benchmarks/bench_presets.py PRESET OUTPUT [--resolution PX]

mid-pg1-224 is PaliGemma-3B scaled down about 8x (SigLIP 576 wide x 12 layers, Gemma 1024 wide x
9 layers, 8 heads of 128, one KV head, 64k vocabulary): the same graph shapes and op mix, a
benchmark that runs in minutes on 2 cores. With --resolution, the checkpoint is then resized
with `pgexport.bench.resize_checkpoint` (latency-only: interpolated position embeddings).
"""

import argparse
import tempfile
from pathlib import Path

from pgexport.bench import resize_checkpoint
from pgexport.random_model import PRESETS, random_checkpoint

BENCH_PRESETS = {
    "mid-pg1-224": (
        dict(hidden_size=576, intermediate_size=2304, num_hidden_layers=12, num_attention_heads=8, patch_size=14),
        dict(model_type="gemma", hidden_size=1024, intermediate_size=8192, num_hidden_layers=9, num_attention_heads=8,
             num_key_value_heads=1, head_dim=128),
        224,
        65536,
    ),
}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("preset", choices=sorted({*PRESETS, *BENCH_PRESETS}))
    parser.add_argument("output", type=Path)
    parser.add_argument("--resolution", type=int)
    args = parser.parse_args()
    PRESETS.update(BENCH_PRESETS)  # random_checkpoint looks presets up by name in this dict
    if args.resolution is None:
        print(random_checkpoint(args.preset, args.output))
        return
    with tempfile.TemporaryDirectory() as native:
        random_checkpoint(args.preset, Path(native) / "checkpoint")
        print(resize_checkpoint(Path(native) / "checkpoint", args.output, args.resolution))


if __name__ == "__main__":
    main()
