"""The demo model shipped inside the package: a small PaliGemma (SigLIP + linear projector + Gemma)
trained by `python -m pgexport.demo.train` on the synthetic coloured-shapes task of `task.py`.

    CHECKPOINT_DIR   the checkpoint (safetensors, config, generation config, tokenizer, processor, eval_results.json)
    SEG_DECODER_FILE its segmentation decoder (the mask VQ-VAE of vqvae.py), in vae-oid.npz's structure
    EVAL_FILE        its held-out eval split: JSONL rows {"image": "images/x.png", "prefix": ..., "suffix": ...}
    load_split(path) such a JSONL as Samples (image paths resolved against the file's folder)
    make_split(n, seed) n generated Samples of the demo task (segment codes from the shipped VQ-VAE)
    is_demo(source)  whether a model source (a folder) is this checkpoint
    sample_inputs(n) a few bundled (image, prompt) pairs whose prompts differ in length
"""

from __future__ import annotations

import json
from pathlib import Path

from PIL import Image

from pgexport.demo import task
from pgexport.demo.task import SEG_DECODER_FILE, Sample
from pgexport.errors import BadInputError

HERE = Path(__file__).resolve().parent
CHECKPOINT_DIR = HERE / "checkpoint"
DATA_DIR = HERE / "data"
EVAL_FILE = DATA_DIR / "eval.jsonl"

__all__ = ["CHECKPOINT_DIR", "EVAL_FILE", "SEG_DECODER_FILE", "Sample", "is_demo", "load_split", "make_split",
           "sample_inputs"]


def is_demo(source: str | Path | None) -> bool:
    """Whether `source` (a model folder or hub id; None and "" are not) is the shipped demo checkpoint."""
    return bool(source) and Path(source).resolve() == CHECKPOINT_DIR


def make_split(n: int, seed: int | str, kinds: tuple[str, ...] = task.KINDS, other: bool = False,
               seg_codes=None) -> list[Sample]:
    """task.make_split, segment answers' codes from the shipped VQ-VAE unless `seg_codes` is given."""
    if seg_codes is None and "segment" in kinds:
        from pgexport.demo.vqvae import scene_codes as seg_codes
    return task.make_split(n, seed, kinds, other, seg_codes)


def jsonl_objects(path: Path, what: str) -> list[tuple[int, dict]]:
    """(line number, object) of every non-blank line of a JSONL file; an unreadable file or a line
    that is not a JSON object raises BadInputError naming the file (as `what`) or the line."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as error:
        raise BadInputError(f"cannot read {what} {path}: {error}") from error
    objects = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as error:
            raise BadInputError(f"{path}:{number}: not a JSON object: {error.msg}") from error
        if not isinstance(row, dict):
            raise BadInputError(f"{path}:{number}: expected a JSON object, got {type(row).__name__}")
        objects.append((number, row))
    return objects


def load_split(path: str | Path, what: str = "eval file") -> list[Sample]:
    """Read a JSONL split: one {"image", "prefix", "suffix"} object a line (blank lines skipped), the
    image path relative to the file. A bad row raises BadInputError naming its line number; an
    unreadable file names it as `what` ("eval file", "train file")."""
    path = Path(path)
    samples = []
    for number, row in jsonl_objects(path, what):
        missing = [key for key in ("image", "prefix", "suffix") if not isinstance(row.get(key), str)]
        if missing:
            raise BadInputError(f"{path}:{number}: missing or non-string field(s): {', '.join(missing)}")
        image = path.parent / row["image"]
        if not image.is_file():
            raise BadInputError(f"{path}:{number}: image not found: {image}")
        samples.append(Sample(str(image), row["prefix"], row["suffix"]))
    if not samples:
        raise BadInputError(f"{path}: no rows")
    return samples


def sample_inputs(n: int = 3) -> list[tuple[Image.Image, str]]:
    """`n` (RGB image, prompt) pairs from the bundled eval split: first one prompt of each length in
    words (shortest first), so that any batch of two or more needs padding, then further rows."""
    rows = load_split(EVAL_FILE)
    chosen, lengths = [], set()
    for row in sorted(rows, key=lambda r: len(r.prefix.split())):  # stable: file order within a length
        if len(row.prefix.split()) not in lengths:
            lengths.add(len(row.prefix.split()))
            chosen.append(row)
    chosen += [row for row in rows if row not in chosen]
    return [(row.open_image(), row.prefix) for row in chosen[:n]]
