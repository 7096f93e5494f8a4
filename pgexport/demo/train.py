"""Regenerate the demo model: tokenizer, held-out eval split, weights, eval results.

    python -m pgexport.demo.train [--out DIR] [--data DIR] [--steps N] [--eval-every N]

Deterministic: the tokenizer and the data are pure functions of fixed seeds, the weights of
torch's seed and a fixed thread count. Training batches are drawn fresh each step (seed = step)
and any sample identical to a held-out one (same image pixels and prompt) is dropped, so the eval
split stays unseen. The loss is PaliGemma's: the processor's `suffix` labels, prefix masked out.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch
from transformers import (
    GenerationConfig,
    PaliGemmaConfig,
    PaliGemmaForConditionalGeneration,
    PaliGemmaProcessor,
    SiglipImageProcessor,
)

from pgexport.contract import INPUT_IDS
from pgexport.demo import CHECKPOINT_DIR, DATA_DIR, load_split
from pgexport.demo.task import CELL, IMAGE_SIZE, KIND_PREFIXES, MAX_SHAPES, Sample, make_split, sample_key
from pgexport.demo.tokenizer import IMAGE_TOKEN, build_tokenizer
from pgexport.metrics import answer_rows, score_answers

SEED = 0
THREADS = 2
EVAL_SEED = -1  # training batches use seeds 0, 1, 2, ... (one per step)
EVAL_ROWS = 200
STEPS = 3000
BATCH = 64
LR = 2e-3
WARMUP = 100
CURRICULUM_STEPS = 200  # scenes of 1 shape, then up to 2, then up to MAX_SHAPES
MAX_NEW_TOKENS = 24  # the longest answer (3 boxes) is 20 tokens with <eos>

VISION = dict(hidden_size=128, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4, patch_size=CELL)
TEXT = dict(hidden_size=128, intermediate_size=512, num_hidden_layers=4, num_attention_heads=4,
            num_key_value_heads=1, head_dim=32,
            # Gemma's 0.02 suits hidden sizes in the thousands; at 128 the decoder sits on a long
            # plateau where answers ignore the image. ~1/sqrt(hidden) starts using the image quickly.
            initializer_range=0.08)


def model_config(tokenizer) -> PaliGemmaConfig:
    """PaliGemma 1 layout at demo size: one image patch per grid cell, vocab = the demo tokenizer."""
    vocab_size = len(tokenizer)
    return PaliGemmaConfig(
        vision_config=dict(model_type="siglip_vision_model", image_size=IMAGE_SIZE, **VISION),
        text_config=dict(model_type="gemma", vocab_size=vocab_size, **TEXT),
        image_token_index=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
        projection_dim=TEXT["hidden_size"],
        hidden_size=TEXT["hidden_size"],
        vocab_size=vocab_size,
    )


def build_processor() -> PaliGemmaProcessor:
    """The demo tokenizer with a SigLIP image processor at the demo resolution."""
    image_seq_length = (IMAGE_SIZE // CELL) ** 2
    image_processor = SiglipImageProcessor(size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}, image_seq_length=image_seq_length)
    return PaliGemmaProcessor(image_processor=image_processor, tokenizer=build_tokenizer())


def write_eval_split(folder: Path) -> Path:
    """The held-out split as PNGs under folder/images and folder/eval.jsonl; returns the JSONL path."""
    images = folder / "images"
    images.mkdir(parents=True, exist_ok=True)
    lines = []
    for i, sample in enumerate(make_split(EVAL_ROWS, EVAL_SEED)):
        name = f"images/eval_{i:03d}.png"
        sample.image.save(folder / name)
        lines.append(json.dumps({"image": name, "prefix": sample.prefix, "suffix": sample.suffix}))
    path = folder / "eval.jsonl"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def curriculum(step: int) -> dict:
    """make_split options for `step`. Single-shape scenes first teach what a shape's patch looks like;
    `detect` waits for two shapes, since on one shape it would learn to box every shape whatever
    the class asked for (a habit that later training does not undo)."""
    if step < CURRICULUM_STEPS:
        return dict(max_shapes=1, kinds=("caption", "color", "count"))
    return dict(max_shapes=min(MAX_SHAPES, 1 + step // CURRICULUM_STEPS))


def training_batch(processor, step: int, held_out: set) -> dict:
    """Processor inputs with suffix labels for step `step`'s fresh samples, held-out ones dropped."""
    samples = [s for s in make_split(BATCH, seed=step, **curriculum(step)) if sample_key(s) not in held_out]
    processor.tokenizer.padding_side = "right"
    return processor(
        images=[s.image for s in samples],
        text=[IMAGE_TOKEN + s.prefix for s in samples],
        suffix=[s.suffix for s in samples],
        padding="longest",
        return_tensors="pt",
    )


@torch.no_grad()
def generate_answers(model, processor, samples: list[Sample], batch_size: int = 32) -> list[str]:
    """Greedy answers (left-padded batches, stop at <eos>), decoded without special tokens."""
    processor.tokenizer.padding_side = "left"

    def answer(chunk: list[Sample]) -> list[str]:
        inputs = processor(
            images=[s.open_image() for s in chunk],
            text=[IMAGE_TOKEN + s.prefix for s in chunk],
            padding="longest",
            return_tensors="pt",
        )
        out = model.generate(**inputs, max_new_tokens=MAX_NEW_TOKENS, do_sample=False)
        return processor.tokenizer.batch_decode(out[:, inputs[INPUT_IDS].shape[1] :], skip_special_tokens=True)

    return answer_rows(answer, samples, batch_size)


def evaluate(model, processor, samples: list[Sample]) -> dict:
    """Exact match over `samples` (demo-task rows), overall and per question kind."""
    model.eval()
    return score_answers(generate_answers(model, processor, samples), samples, KIND_PREFIXES)


def _lr_factor(step: int, steps: int) -> float:
    """Linear warmup, then cosine decay to 5% of the peak."""
    if step < WARMUP:
        return (step + 1) / WARMUP
    progress = (step - WARMUP) / max(1, steps - WARMUP)
    return 0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * progress))


def train(out: Path = CHECKPOINT_DIR, data: Path = DATA_DIR, steps: int = STEPS, eval_every: int = 0,
          progress: bool = True) -> dict:
    """Regenerate tokenizer, eval split and weights; save the checkpoint to `out`; return eval results.
    With `eval_every`, also print the exact match on 64 held-out rows every that many steps."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    torch.set_num_threads(THREADS)
    torch.manual_seed(SEED)
    processor = build_processor()
    eval_rows = load_split(write_eval_split(Path(data)))
    held_out = {sample_key(s) for s in make_split(EVAL_ROWS, EVAL_SEED)}
    model = PaliGemmaForConditionalGeneration(model_config(processor.tokenizer))
    model.generation_config = GenerationConfig(
        bos_token_id=2, eos_token_id=1, pad_token_id=0, do_sample=False, max_new_tokens=MAX_NEW_TOKENS
    )
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR, betas=(0.9, 0.98), weight_decay=0.01)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: _lr_factor(step, steps))

    model.train()
    started = time.perf_counter()
    columns = [TextColumn("training"), BarColumn(), MofNCompleteColumn(), TextColumn("loss {task.fields[loss]}"),
               TimeElapsedColumn(), TimeRemainingColumn()]
    with Progress(*columns, disable=not progress) as bar:
        task = bar.add_task("train", total=steps, loss="-")
        for step in range(steps):
            loss = model(**training_batch(processor, step, held_out)).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            bar.update(task, advance=1, loss=f"{loss.item():.4f}")
            if eval_every and (step + 1) % eval_every == 0 and step + 1 < steps:
                bar.console.print(f"step {step + 1}: {evaluate(model, processor, eval_rows[:64])}")
                model.train()
    train_seconds = time.perf_counter() - started

    results = {**evaluate(model, processor, eval_rows), "steps": steps, "final_loss": round(loss.item(), 6)}
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    model.generation_config.save_pretrained(out)
    processor.save_pretrained(out)
    processor.image_processor.save_pretrained(out)  # preprocessor_config.json, for transformers.js
    tokenizer = processor.tokenizer
    special = {"bos_token": tokenizer.bos_token, "eos_token": tokenizer.eos_token, "pad_token": tokenizer.pad_token,
               "unk_token": tokenizer.unk_token, "additional_special_tokens": [IMAGE_TOKEN]}
    (out / "special_tokens_map.json").write_text(json.dumps(special, indent=2) + "\n", encoding="utf-8")
    (out / "eval_results.json").write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    print(f"trained {steps} steps in {train_seconds:.0f} s; held-out exact match {results['exact_match']:.3f} "
          f"({results['rows']} rows) {results['per_kind']}")
    print(f"saved to {out}")
    return results


def main(argv=None) -> None:
    """Command line: python -m pgexport.demo.train [--out DIR] [--data DIR] [--steps N] [--eval-every N]"""
    parser = argparse.ArgumentParser(description="Regenerate the demo model (tokenizer, eval split, weights).")
    parser.add_argument("--out", type=Path, default=CHECKPOINT_DIR, help="checkpoint folder (default: the shipped one)")
    parser.add_argument("--data", type=Path, default=None,
                        help="eval split folder (default: the shipped one with the default --out, else OUT/data)")
    parser.add_argument("--steps", type=int, default=STEPS, help=f"training steps (default {STEPS})")
    parser.add_argument("--eval-every", type=int, default=0, metavar="N", help="print held-out exact match every N steps")
    args = parser.parse_args(argv)
    data = args.data or (DATA_DIR if args.out.resolve() == CHECKPOINT_DIR else args.out / "data")
    train(args.out, data, args.steps, args.eval_every)


if __name__ == "__main__":
    main()
