"""Regenerate the demo model: mask VQ-VAE, tokenizer, held-out eval split, weights, eval results.

    python -m pgexport.demo.train [--out DIR] [--data DIR] [--vision-steps N] [--steps N] [--eval-every N]

The task is pgexport.demo.task's (five prompt kinds over shapes of any size on images of any size).
A demo-size PaliGemma (96 px, 16 px patches: 36 image tokens; SigLIP 3 layers and Gemma 4 layers,
width 192) is trained in two stages, 2427 s on 2 AMD EPYC cores (run 10; the VQ-VAE before it ~4 min):

1. The vision tower alone (VISION_STEPS), with a training-only patch head: for the patch under each
   patch centre it names the shape there (colour and kind, or background), regresses its box, and
   scores four vectors against the decoder's own (tied) location-token embeddings for the box's
   bins. The text loss alone never taught the tower the kinds or the boxes (benchmarks/demo_v2).
2. The whole model (STEPS) on the five prompt kinds (TRAIN_KINDS: detect and segment rows twice as
   often as each text kind), the patch head's loss still added. The loss
   is each row's mean token loss averaged over the batch, location targets spread over neighbouring
   levels (a near miss costs less than a far one). Each batch runs as two groups of rows cut to
   their own longest row, with logits only where labels are: the same loss as one padded batch
   (tests/test_demo_train.py) at about 0.6x the time: 5000 steps fit where 3000 did.

The vision positions start as 2D sin-cos codes and the 1024 location tokens as 1D sin-cos codes of
their bin. The patch head is not saved: the checkpoint is a plain PaliGemma. Deterministic for a
fixed thread count on one kind of CPU: data are pure functions of their seeds (training batches
`train-<step>`, held-out `eval-a` and `eval-b`), the weights of torch's seed. Scores are per kind
(pgexport.metrics.score_answers) on both held-out kinds of image, against what was drawn.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from transformers import (
    GenerationConfig,
    PaliGemmaConfig,
    PaliGemmaForConditionalGeneration,
    PaliGemmaProcessor,
    SiglipImageProcessor,
)

from pgexport.contract import INPUT_IDS
from pgexport.demo import CHECKPOINT_DIR, DATA_DIR, SEG_DECODER_FILE, is_demo, make_split
from pgexport.demo.task import COLORS, KIND_PREFIXES, KINDS, LOC_BINS, SHAPES, STEP, Sample, box_bins, scenes
from pgexport.demo.tokenizer import IMAGE_TOKEN, build_tokenizer
from pgexport.demo.vqvae import numpy_decode
from pgexport.metrics import answer_rows, score_answers

SEED = 0
THREADS = 2
EVAL_ROWS = 200
EVAL_SEED, OTHER_SEED = "eval-a", "eval-b"  # held-out A (drawn like training) and B (drawn otherwise)
IMAGE_SIZE, PATCH, WIDTH, VISION_LAYERS, TEXT_LAYERS = 96, 16, 192, 3, 4
GRID = IMAGE_SIZE // PATCH
BATCH, LR, WARMUP = 32, 1.5e-3, 100
VISION_STEPS, STEPS = 1500, 5000
# training rows' kinds in turn: detect and segment twice (the text kinds were learnt by mid-training
# in runs 7-9, boxes and masks were still rising at the end)
TRAIN_KINDS = KINDS + ("detect", "segment")
LOC_SIGMA = 1.0  # location targets' spread, in levels
AUX, AUX_BOX, AUX_LOC = 1.0, 10.0, 1.0  # the patch head's loss weight, and its box and bins terms inside it
MAX_NEW_TOKENS = 72  # three segmented objects: 3 x (4 + 16 + 1) tokens, 2 separators, <eos>
SHAPE_CLASSES = [(color, kind) for color in COLORS for kind in SHAPES]  # the patch head's classes; 0 is background


def model_config(tokenizer) -> PaliGemmaConfig:
    """PaliGemma 1 layout at demo size; vocab = the demo tokenizer."""
    return PaliGemmaConfig(
        vision_config=dict(model_type="siglip_vision_model", image_size=IMAGE_SIZE, patch_size=PATCH, hidden_size=WIDTH,
                           intermediate_size=4 * WIDTH, num_hidden_layers=VISION_LAYERS, num_attention_heads=4),
        text_config=dict(model_type="gemma", vocab_size=len(tokenizer), hidden_size=WIDTH, intermediate_size=4 * WIDTH,
                         num_hidden_layers=TEXT_LAYERS, num_attention_heads=4, num_key_value_heads=1,
                         head_dim=WIDTH // 4,
                         # Gemma's 0.02 suits widths in the thousands; ~1/sqrt(width) uses the image sooner
                         initializer_range=1 / math.sqrt(WIDTH)),
        image_token_index=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN), projection_dim=WIDTH, hidden_size=WIDTH,
        vocab_size=len(tokenizer))


def build_processor() -> PaliGemmaProcessor:
    """The demo tokenizer with a SigLIP image processor at the demo resolution."""
    image_processor = SiglipImageProcessor(size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}, image_seq_length=GRID * GRID)
    return PaliGemmaProcessor(image_processor=image_processor, tokenizer=build_tokenizer())


def held_out(name: str, seg_codes=None) -> list[Sample]:
    """Held-out "A" (drawn like training) or "B" (drawn otherwise): EVAL_ROWS rows of its seed,
    segment codes from `seg_codes` (default: the shipped VQ-VAE's)."""
    return make_split(EVAL_ROWS, {"A": EVAL_SEED, "B": OTHER_SEED}[name], other=name == "B", seg_codes=seg_codes)


def write_eval_split(folder: Path, rows: list[Sample]) -> Path:
    """The held-out rows as PNGs under folder/images and folder/eval.jsonl; returns the JSONL path."""
    images = folder / "images"
    images.mkdir(parents=True, exist_ok=True)
    lines = []
    for i, sample in enumerate(rows):
        name = f"images/eval_{i:03d}.png"
        sample.image.save(folder / name, optimize=True)
        lines.append(json.dumps({"image": name, "prefix": sample.prefix, "suffix": sample.suffix}))
    path = folder / "eval.jsonl"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def patch_targets(scene) -> tuple[torch.Tensor, ...]:
    """Per patch of the resized image (row-major), from the shape under its centre: its class (0:
    none), its box as fractions of the image (x0, y0, x1, y1) and as the answer's bins (y0, x0, y1, x1)."""
    classes = torch.zeros(GRID * GRID, dtype=torch.long)
    boxes = torch.zeros(GRID * GRID, 4)
    bins = torch.zeros(GRID * GRID, 4, dtype=torch.long)
    for r in range(GRID):
        for c in range(GRID):
            x = min(scene.width - 1, int((c + 0.5) / GRID * scene.width))
            y = min(scene.height - 1, int((r + 0.5) / GRID * scene.height))
            for shape, mask, box in zip(scene.shapes, scene.masks, scene.boxes):
                if mask[y, x]:
                    i = r * GRID + c
                    classes[i] = 1 + SHAPE_CLASSES.index((shape.color, shape.kind))
                    boxes[i] = torch.tensor([box[0] / scene.width, box[1] / scene.height,
                                             box[2] / scene.width, box[3] / scene.height])
                    bins[i] = torch.tensor(box_bins(box, scene.width, scene.height))
    return classes, boxes, bins


class PatchHead(torch.nn.Module):
    """Training-only: the vision tower's patch features -> shape class, box, and the box's bins scored
    against the location-token embeddings. The class loss is the mean over shape patches plus half
    the mean over background ones (background is most patches: with a plain mean the kinds came
    slower), the box loss an L1 in fractions of the image."""

    classes = 1 + len(SHAPE_CLASSES)

    def __init__(self, model, loc_first: int):
        super().__init__()
        self.linear = torch.nn.Linear(WIDTH, self.classes + 4)
        self.loc = torch.nn.Linear(WIDTH, 4 * WIDTH)
        self.table = lambda: model.get_input_embeddings().weight  # not a parameter of the head
        self.loc_first = loc_first
        self.features = None
        model.model.vision_tower.register_forward_hook(lambda module, args, out: setattr(self, "features", out.last_hidden_state))

    def loss(self, rows: list[Sample], features: torch.Tensor | None = None) -> torch.Tensor:
        """The head's loss on `features` of these rows' images (default: the vision tower's last forward's)."""
        features = self.features if features is None else features
        out = self.linear(features)
        classes, boxes, bins = (torch.stack(t) for t in zip(*(patch_targets(r.scene) for r in rows)))
        ce = F.cross_entropy(out[..., :self.classes].reshape(-1, self.classes), classes.reshape(-1),
                             reduction="none").reshape(classes.shape)
        shape = classes > 0
        w = torch.ones(int(shape.sum())) / shape.sum()
        loss = (w * ce[shape]).sum() + 0.5 * ce[~shape].mean()
        box_error = (torch.sigmoid(out[..., -4:])[shape] - boxes[shape]).abs().mean(-1)
        loss = loss + AUX_BOX * (w * box_error).sum()
        table = self.table()[self.loc_first:self.loc_first + LOC_BINS]
        features = features[shape]
        logp = F.log_softmax(self.loc(features).reshape(len(features), 4, -1) @ table.T, -1)
        nll = spread_nll(logp.reshape(-1, LOC_BINS), bins[shape].reshape(-1), LOC_SIGMA)
        return loss + AUX_LOC * (w * nll.reshape(-1, 4).mean(-1)).sum()


def sincos(count: int, dim: int, scale: float) -> torch.Tensor:
    """[count, dim] sin-cos codes of 0..count-1 (angular frequencies from 1 down to about 1/count
    radian a step), times scale."""
    freqs = 1.0 / (count ** (torch.arange(dim // 2) / (dim // 2)))
    angles = torch.arange(count).float()[:, None] * freqs[None, :]
    return torch.cat([torch.sin(angles), torch.cos(angles)], 1) * scale


def init_positions(model, loc_first: int) -> None:
    """Start the vision positions as 2D sin-cos codes (row code, column code) and the 1024 location
    tokens' embeddings as 1D sin-cos codes of their bin, so near positions and bins start near."""
    rows = sincos(GRID, WIDTH // 2, 1.0)
    table = torch.cat([rows[:, None, :].expand(GRID, GRID, -1), rows[None, :, :].expand(GRID, GRID, -1)], -1)
    embed = model.get_input_embeddings().weight
    with torch.no_grad():
        dict(model.model.vision_tower.named_parameters())["embeddings.position_embedding.weight"].copy_(
            table.reshape(GRID * GRID, WIDTH))
        embed[loc_first:loc_first + LOC_BINS] = sincos(LOC_BINS, WIDTH, embed.std().item() * math.sqrt(2))


def spread_nll(logp: torch.Tensor, bins: torch.Tensor, sigma: float, first: int = 0) -> torch.Tensor:
    """-log p of location `bins` [n] under log-probabilities `logp` [n, V] (bin b at column first + b),
    the target spread over levels +-3 with a Gaussian of `sigma` levels (answers use every STEP-th bin)."""
    offsets = torch.arange(-3, 4)
    neighbours = bins[:, None] + STEP * offsets[None, :]
    valid = (neighbours >= 0) & (neighbours < LOC_BINS)
    weights = torch.exp(-0.5 * (offsets.float() / sigma) ** 2)[None, :] * valid
    weights = weights / weights.sum(1, keepdim=True)
    return -(weights * logp.gather(-1, neighbours.clamp(0, LOC_BINS - 1) + first)).sum(1)


def row_losses(model, batch: dict, loc_first: int) -> torch.Tensor:
    """Each row's mean token loss [rows], location targets spread (spread_nll). Logits are computed
    only where a label is (the suffix), not over the image, prefix and padding."""
    labels = batch.pop("labels")
    target = labels[:, 1:]
    keep = target != -100
    # the logit at position t predicts token t + 1; a boolean mask flattens them row by row
    logits = model(**batch, logits_to_keep=F.pad(keep, (0, 1))).logits
    logp = F.log_softmax(logits.float(), -1)
    wanted = target[keep]
    nll = -logp.gather(-1, wanted[:, None])[:, 0]
    is_loc = (wanted >= loc_first) & (wanted < loc_first + LOC_BINS)
    if is_loc.any():
        nll = nll.clone()
        nll[is_loc] = spread_nll(logp[is_loc], wanted[is_loc] - loc_first, LOC_SIGMA, loc_first)
    sums = torch.zeros(len(labels), dtype=nll.dtype).index_add(0, keep.nonzero()[:, 0], nll)
    return sums / keep.sum(1).clamp(min=1)


def length_groups(lengths: torch.Tensor) -> list[torch.Tensor]:
    """Row indices in two groups, short and long, split where the padded tokens are fewest (a batch
    pads to its longest row: a segment answer is twice a caption's length)."""
    order = lengths.argsort(stable=True)
    ordered = lengths[order]
    n = len(order)
    cost = [k * int(ordered[k - 1]) + (n - k) * int(ordered[-1]) for k in range(1, n)]
    if not cost or min(cost) >= n * int(ordered[-1]):
        return [order]
    k = 1 + cost.index(min(cost))
    return [order[:k], order[k:]]


def whole_model_loss(model, head, batch: dict, rows: list[Sample], loc_first: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The text loss (mean over rows of row_losses) and the patch head's loss on one batch, run as
    length_groups each cut to its own longest row (right padding: the cut drops only padding)."""
    lengths = batch["attention_mask"].sum(1)
    losses, features, order = [], [], []
    for rows_of in length_groups(lengths):
        width = int(lengths[rows_of].max())
        part = {name: value[rows_of] if value.dim() != 2 else value[rows_of, :width] for name, value in batch.items()}
        losses.append(row_losses(model, part, loc_first))
        features.append(head.features)
        order.append(rows_of)
    back = torch.cat(order).argsort()
    return torch.cat(losses).mean(), head.loss(rows, torch.cat(features)[back])


def training_batch(processor, rows: list[Sample]) -> dict:
    """Processor inputs with suffix labels, right-padded."""
    processor.tokenizer.padding_side = "right"
    return dict(processor(images=[r.image for r in rows], text=[IMAGE_TOKEN + r.prefix for r in rows],
                          suffix=[r.suffix for r in rows], padding="longest", return_tensors="pt"))


def schedule(steps: int):
    """Linear warm-up, then cosine decay to 5% of the peak."""
    def factor(step: int) -> float:
        if step < WARMUP:
            return (step + 1) / WARMUP
        return 0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * (step - WARMUP) / max(1, steps - WARMUP)))
    return factor


def update(loss: torch.Tensor, params: list, optimizer, scheduler) -> float:
    """One optimizer step on `loss` (gradients clipped to norm 1); returns the loss."""
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return loss.item()


@torch.no_grad()
def generate_answers(model, processor, samples: list[Sample], batch_size: int = 32) -> list[str]:
    """Greedy answers (left-padded batches, stop at <eos>), decoded without special tokens."""
    processor.tokenizer.padding_side = "left"

    def answer(chunk: list[Sample]) -> list[str]:
        inputs = processor(images=[s.open_image() for s in chunk], text=[IMAGE_TOKEN + s.prefix for s in chunk],
                           padding="longest", return_tensors="pt")
        out = model.generate(**inputs, max_new_tokens=MAX_NEW_TOKENS, do_sample=False)
        return processor.tokenizer.batch_decode(out[:, inputs[INPUT_IDS].shape[1]:], skip_special_tokens=True)

    return answer_rows(answer, samples, batch_size)


def evaluate(model, processor, samples: list[Sample], decoder) -> dict:
    """Per-kind figures over `samples` (score_answers: exact match; detect and segment by IoU)."""
    was_training = model.training
    model.eval()
    try:
        return score_answers(generate_answers(model, processor, samples), samples, KIND_PREFIXES, numpy_decode(decoder))
    finally:
        model.train(was_training)


def train(out: Path = CHECKPOINT_DIR, data: Path = DATA_DIR, steps: int = STEPS, vision_steps: int = VISION_STEPS,
          eval_every: int = 0, log=print) -> dict:
    """Regenerate everything (the VQ-VAE first when SEG_DECODER_FILE is missing), save the checkpoint
    to `out`, return the eval results. With `eval_every`, also log the figures on 50 held-out rows
    every that many whole-model steps."""
    from pgexport.demo import vqvae

    torch.set_num_threads(THREADS)
    if not SEG_DECODER_FILE.is_file():
        vqvae.save(SEG_DECODER_FILE, *vqvae.train(log=log))
    torch.manual_seed(SEED)
    # Loaded after the seed, as the kept recipe always did: building its modules draws from torch's
    # generator, so the model's initial weights depend on it coming first.
    encoder, decoder = vqvae.load(SEG_DECODER_FILE)

    def codes(scene):  # segment answers' codes, from this VQ-VAE (not a second copy of it)
        return vqvae.scene_codes(scene, (encoder, decoder))

    processor = build_processor()
    tokenizer = processor.tokenizer
    model = PaliGemmaForConditionalGeneration(model_config(tokenizer))
    model.generation_config = GenerationConfig(bos_token_id=2, eos_token_id=1, pad_token_id=0, do_sample=False,
                                               max_new_tokens=MAX_NEW_TOKENS)
    loc_first = tokenizer.convert_tokens_to_ids("<loc0000>")
    held_a, held_b = held_out("A", codes), held_out("B", codes)
    write_eval_split(Path(data), held_a)
    init_positions(model, loc_first)
    head = PatchHead(model, loc_first)
    model.train()
    started = time.perf_counter()

    vision = model.model.vision_tower
    params = list(vision.parameters()) + list(head.parameters())
    # the loc embeddings the head scores against learn too (no decay: most rows get no gradient)
    optimizer = torch.optim.AdamW([{"params": params}, {"params": [head.table()], "weight_decay": 0.0}],
                                  lr=LR, betas=(0.9, 0.98), weight_decay=0.01)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule(vision_steps))
    for step in range(vision_steps):
        rows = [Sample(scene.image, "", "", scene=scene) for scene in scenes(BATCH, f"vision-{step}")]
        vision(processor.image_processor([r.image for r in rows], return_tensors="pt")["pixel_values"])
        loss = update(head.loss(rows), params, optimizer, scheduler)
        if (step + 1) % 250 == 0 or step + 1 == vision_steps:
            log(f"vision step {step + 1}/{vision_steps}: patch loss {loss:.4f} ({time.perf_counter() - started:.0f} s)")

    vision_params = list(vision.parameters())
    in_vision = {id(p) for p in vision_params}
    rest = [p for p in model.parameters() if id(p) not in in_vision] + list(head.parameters())
    params = vision_params + rest
    optimizer = torch.optim.AdamW([{"params": rest}, {"params": vision_params}], lr=LR, betas=(0.9, 0.98), weight_decay=0.01)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule(steps))
    for step in range(steps):
        rows = make_split(BATCH, f"train-{step}", TRAIN_KINDS, seg_codes=codes)
        loss, head_loss = whole_model_loss(model, head, training_batch(processor, rows), rows, loc_first)
        update(loss + AUX * head_loss, params, optimizer, scheduler)
        if (step + 1) % 50 == 0 or step + 1 == steps:
            log(f"step {step + 1}/{steps}: text loss {loss.item():.4f} ({time.perf_counter() - started:.0f} s)")
        if eval_every and (step + 1) % eval_every == 0 and step + 1 < steps:
            paused = time.perf_counter()
            log(f"step {step + 1}: held-out A, 50 rows: {evaluate(model, processor, held_a[:50], decoder)['per_kind']}")
            started += time.perf_counter() - paused  # the timed seconds are training's alone
    train_seconds = time.perf_counter() - started
    model.eval()
    return save(model, processor, Path(out), held_a, held_b, decoder,
                {"vision_steps": vision_steps, "steps": steps, "train_seconds": round(train_seconds)}, log)


def save(model, processor, out: Path, held_a, held_b, decoder, facts: dict, log=print) -> dict:
    """Write the checkpoint (weights, configs, tokenizer, processor) and eval_results.json: the
    figures of each held-out set, scored on the saved weights as loaded back."""
    out.mkdir(parents=True, exist_ok=True)
    # PaliGemma reads SigLIP's patch features, never its pooling head: the head (built by default,
    # untrained) is left out. Weights are stored in fp16 (half the package; real PaliGemma ships
    # bf16) and load as the fp32 model the config names; the figures below are those weights'.
    config = copy.deepcopy(model.config)
    config.vision_config.vision_use_head = False
    plain = PaliGemmaForConditionalGeneration(config)
    plain.load_state_dict({k: v for k, v in model.state_dict().items() if ".vision_tower.head." not in k})
    plain.generation_config = model.generation_config
    plain.save_pretrained(out)
    weights = out / "model.safetensors"
    save_file({name: value.half() for name, value in load_file(weights).items()}, weights, metadata={"format": "pt"})
    plain.generation_config.save_pretrained(out)
    processor = build_processor()  # a fresh one: training's calls left padding settings in its tokenizer.json
    processor.save_pretrained(out)
    processor.image_processor.save_pretrained(out)  # preprocessor_config.json, for transformers.js
    tokenizer = processor.tokenizer
    special = {"bos_token": tokenizer.bos_token, "eos_token": tokenizer.eos_token, "pad_token": tokenizer.pad_token,
               "unk_token": tokenizer.unk_token, "additional_special_tokens": [IMAGE_TOKEN]}
    (out / "special_tokens_map.json").write_text(json.dumps(special, indent=2) + "\n", encoding="utf-8")
    saved = PaliGemmaForConditionalGeneration.from_pretrained(out, dtype=torch.float32).eval()
    results = {**facts}
    for name, rows in (("A", held_a), ("B", held_b)):
        results[name] = evaluate(saved, processor, rows, decoder)
        log(f"held-out {name} ({len(rows)} rows): {results[name]['per_kind']}")
    (out / "eval_results.json").write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    log(f"saved to {out}")
    return results


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description="Regenerate the demo model (VQ-VAE, tokenizer, eval split, weights).")
    parser.add_argument("--out", type=Path, default=CHECKPOINT_DIR, help="checkpoint folder (default: the shipped one)")
    parser.add_argument("--data", type=Path, default=None,
                        help="eval split folder (default: the shipped one with the default --out, else OUT/data)")
    parser.add_argument("--vision-steps", type=int, default=VISION_STEPS, help=f"vision-stage steps (default {VISION_STEPS})")
    parser.add_argument("--steps", type=int, default=STEPS, help=f"whole-model steps (default {STEPS})")
    parser.add_argument("--eval-every", type=int, default=0, metavar="N", help="log held-out figures every N steps")
    args = parser.parse_args(argv)
    data = args.data or (DATA_DIR if is_demo(args.out) else args.out / "data")
    train(args.out, data, args.steps, args.vision_steps, args.eval_every, log=lambda line: print(line, flush=True))


if __name__ == "__main__":
    main()
