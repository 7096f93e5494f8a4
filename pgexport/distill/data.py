"""Training rows for distillation: a JSONL split, or the demo task generated on the fly.

Rows are addressed by (epoch, index), a pure function of the seed, so a resumed run and every
process of a data-parallel run see exactly the rows an uninterrupted one-process run would.
"""

from __future__ import annotations

import random
from pathlib import Path

import torch

from pgexport.demo import load_split, make_split
from pgexport.demo.task import KINDS, Sample, sample_key
from pgexport.errors import BadInputError

DEMO_SEED_BASE = 1_000_000  # apart from the teacher's seeds ("train-<step>", "vision-<step>", "eval-a", "eval-b")


class FileRows:
    """A JSONL split ({"image", "prefix", "suffix"} a line; bad rows raise with their line number),
    reshuffled each epoch."""

    def __init__(self, path: str | Path, seed: int = 0):
        self.path = str(path)
        self.rows = load_split(path, "train file")
        self.seed = seed

    def __len__(self) -> int:
        return len(self.rows)

    def epoch(self, epoch: int) -> list[int]:
        order = list(range(len(self.rows)))
        random.Random(f"{self.seed}-{epoch}").shuffle(order)
        return order

    def get(self, epoch: int, index: int) -> Sample:
        return self.rows[index]


class DemoTaskRows:
    """`rows` fresh demo-task samples per epoch (make_split's full distribution), none identical to
    a held-out one (same pixels and prompt), so the eval split stays unseen."""

    def __init__(self, rows: int, seed: int = 0):
        from pgexport.demo.train import EVAL_ROWS, EVAL_SEED

        if rows < 1:
            raise BadInputError(f"the generated demo split needs at least one row, got {rows}")
        self.path = f"demo task, {rows} generated rows per epoch"
        self.rows, self.seed = rows, seed
        self.held_out = {sample_key(s) for s in make_split(EVAL_ROWS, EVAL_SEED)}

    def __len__(self) -> int:
        return self.rows

    def epoch(self, epoch: int) -> list[int]:
        return list(range(self.rows))

    def get(self, epoch: int, index: int) -> Sample:
        seed = DEMO_SEED_BASE + self.seed * 1_000_003 + epoch * self.rows + index
        for retry in range(100):
            # make_split cycles question kinds by position: one row at a time, the index picks it
            (sample,) = make_split(1, seed=f"{seed}-{retry}" if retry else seed, kinds=(KINDS[index % len(KINDS)],))
            if sample_key(sample) not in self.held_out:
                return sample
        raise RuntimeError(f"could not draw a sample outside the eval split (seed {seed})")


def collate(processor, samples: list[Sample]) -> dict[str, torch.Tensor]:
    """Processor inputs with suffix labels (-100 on image, prefix and padding), right-padded."""
    processor.tokenizer.padding_side = "right"
    return dict(processor(
        images=[s.open_image() for s in samples],
        text=[processor.image_token + s.prefix for s in samples],
        suffix=[s.suffix for s in samples],
        padding="longest",
        return_tensors="pt",
    ))
