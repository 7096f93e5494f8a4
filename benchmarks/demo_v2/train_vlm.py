"""Demo v2 prototype (issue 16, part 3): a demo-size PaliGemma trained on scenes.py's free-layout
shapes with PaliGemma's five prompt kinds, scored per task on the two held-out kinds of image.

    .venv/bin/python benchmarks/demo_v2/vqvae.py 600          # first: the mask VQ-VAE ($DEMO_V2_WORK/vq.pt, demo-seg.npz)
    .venv/bin/python benchmarks/demo_v2/train_vlm.py [--steps N] [--eval-every N] [--out DIR]

Prompts and answers (answers list shapes left to right; boxes on a 64-level grid of the 1024 bins):

    caption en              -> red circle and blue square
    what color is the circle?  -> red                     (asked of a kind that occurs once)
    how many shapes?        -> 2
    detect circle ; square  -> <loc..>x4 circle ; <loc..>x4 square
    segment circle          -> <loc..>x4 <seg..>x16 circle

Metrics on held-out A (drawn like training) and B (scenes.random_scene(other=True): larger images,
other aspect ratios, supersampled edges, gradient backgrounds): exact match for caption / color /
count; for detect the share of true boxes matched (same label, one to one, best first) at IoU >= 0.5;
for segment the mean mask IoU over true objects (0 for one not found), the predicted codes decoded by
the VQ-VAE's decoder and pasted into the predicted box (pgexport.structured.paste_mask).

Training, in two stages (the defaults are the kept recipe; about an hour on 2 cores):
1. --vision-steps: the vision tower alone with a training-only patch head (--aux) that names the shape
   (colour and kind) under each patch centre, or background, and regresses that shape's box. This is
   where the kinds and boxes are learnt: a step costs a quarter of a whole-model step, and the text
   loss alone taught the tower neither (runs 1-6 in the README).
2. --steps: the whole model on the five prompt kinds, the patch head's loss still added (weight --aux).
The loss is each row's mean token loss averaged over the batch (long segment answers would otherwise
dominate); location targets are spread over neighbouring levels (--loc-sigma, in levels; 0 = one-hot)
so that a near miss costs less than a far one. The vision positions start as 2D sin-cos codes and the
1024 location tokens as 1D sin-cos codes of their bin (--no-sincos: random). The patch head is not
part of the saved model, which stays a plain PaliGemma.
Results: benchmarks/demo_v2/README.md."""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from transformers import GenerationConfig, PaliGemmaConfig, PaliGemmaForConditionalGeneration, PaliGemmaProcessor
from transformers import SiglipImageProcessor

sys.path.insert(0, str(Path(__file__).parent))
from scenes import COLORS, LOC_BINS, SHAPES, STEP, box_bins, loc_tokens, mask_crop, random_scene  # noqa: E402
from vqvae import WORK, Encoder, encode  # noqa: E402

from pgexport.demo.task import question as text_question  # noqa: E402
from pgexport.demo.tokenizer import IMAGE_TOKEN, build_tokenizer  # noqa: E402
from pgexport.exporters.seg_decoder import load_seg_decoder  # noqa: E402
from pgexport.structured import parse_detections, paste_mask  # noqa: E402

KINDS = ("caption", "color", "count", "detect", "segment")
WORDS = (["caption", "en", "what", "color", "is", "the", "how", "many", "shapes", "detect", "segment", "and", ";", "?"]
         + list(SHAPES) + list(COLORS) + [str(n) for n in range(10)])
MAX_NEW_TOKENS = 72  # 3 segmented objects: 3 x (4 + 16 + 1) tokens, 2 separators, <eos>


class Tasks:
    """Questions about scenes; segment answers need the VQ-VAE encoder for their 16 codes."""

    def __init__(self, work: Path):
        state = torch.load(work / "vq.pt")
        self.encoder = Encoder()
        self.encoder.load_state_dict(state["encoder"])
        self.encoder.eval()
        self.decoder = load_seg_decoder(work / "demo-seg.npz").eval()

    def codes(self, scene) -> list[str]:
        crops = np.stack([mask_crop(mask, box) for mask, box in zip(scene.masks, scene.boxes)])
        rows = encode(self.encoder, self.decoder.codebook, crops)
        return ["".join(f"<seg{c:03d}>" for c in row) for row in rows]

    def question(self, scene, kind: str, rng: random.Random) -> tuple[str, str] | None:
        shapes = scene.shapes
        if kind in ("caption", "color", "count"):  # v1's questions: they read only colour, kind and order
            return text_question(shapes, kind, rng)
        locs = [loc_tokens(box_bins(box, scene.width, scene.height)) for box in scene.boxes]
        present = sorted({s.kind for s in shapes})
        if kind == "detect":
            asked = rng.sample(present, rng.randint(1, min(2, len(present))))
            answer = " ; ".join(f"{loc} {s.kind}" for s, loc in zip(shapes, locs) if s.kind in asked)
            return "detect " + " ; ".join(asked), answer
        if kind == "segment":
            name = rng.choice(present)
            codes = self.codes(scene)
            return f"segment {name}", " ; ".join(f"{loc}{code} {name}" for s, loc, code in zip(shapes, locs, codes)
                                                 if s.kind == name)
        raise ValueError(kind)

    def split(self, n: int, seed: str, other: bool = False, kinds=KINDS) -> list[dict]:
        """n rows {kind, scene, prefix, suffix}, the kinds in turn; deterministic for `seed`."""
        rng = random.Random(seed)
        rows = []
        while len(rows) < n:
            kind = kinds[len(rows) % len(kinds)]
            scene = random_scene(rng, other=other)
            qa = self.question(scene, kind, rng)
            if qa is not None:
                rows.append({"kind": kind, "scene": scene, "prefix": qa[0], "suffix": qa[1]})
        return rows


SHAPE_CLASSES = [(color, kind) for color in COLORS for kind in SHAPES]  # class 0 is the background


def patch_targets(scene, grid: int, overlap: bool = False) -> tuple[torch.Tensor, ...]:
    """Per patch of the resized image (row-major): the class of its shape (0: none), that shape's box
    as fractions of the image (x0, y0, x1, y1; zeros on background) and as the answer's four location
    bins (y0, x0, y1, x1), and the patch's weight. A patch's shape is the one under its centre, weight
    1; or, with `overlap`, the one covering most of the patch, weighted by the share it covers (so
    every shape has patches, however it sits on the grid)."""
    classes = torch.zeros(grid * grid, dtype=torch.long)
    boxes = torch.zeros(grid * grid, 4)
    bins = torch.zeros(grid * grid, 4, dtype=torch.long)
    weights = torch.zeros(grid * grid)
    xs = [round(c * scene.width / grid) for c in range(grid + 1)]
    ys = [round(r * scene.height / grid) for r in range(grid + 1)]
    for r in range(grid):
        for c in range(grid):
            x = min(scene.width - 1, int((c + 0.5) / grid * scene.width))
            y = min(scene.height - 1, int((r + 0.5) / grid * scene.height))
            best, share = None, 0.0
            for shape, mask, box in zip(scene.shapes, scene.masks, scene.boxes):
                if overlap:
                    covered = float(mask[ys[r]:ys[r + 1], xs[c]:xs[c + 1]].mean())
                    if covered > share:
                        best, share = (shape, box), covered
                elif mask[y, x]:
                    best, share = (shape, box), 1.0
            if best is not None:
                (shape, box), i = best, r * grid + c
                classes[i] = 1 + SHAPE_CLASSES.index((shape.color, shape.kind))
                boxes[i] = torch.tensor([box[0] / scene.width, box[1] / scene.height,
                                         box[2] / scene.width, box[3] / scene.height])
                bins[i] = torch.tensor(box_bins(box, scene.width, scene.height))
                weights[i] = share
    return classes, boxes, bins, weights


class PatchHead(torch.nn.Module):
    """Training-only: the vision tower's patch features -> shape class and box (see --aux). The class
    loss is the mean over shape patches plus half the mean over background ones (background is most
    patches; with a plain mean the probe's class read 0.62 at step 400 instead of 0.76), the box loss
    an L1 on the shape's box in fractions of the image, both over the patches patch_targets gives a
    shape (weighted by their share with --aux-overlap)."""

    classes = 1 + len(SHAPE_CLASSES)

    def __init__(self, model, width: int, box_weight: float, loc_weight: float = 0.0, loc_first: int = 0,
                 sigma: float = 1.0, overlap: bool = False):
        super().__init__()
        self.overlap = overlap
        self.linear = torch.nn.Linear(width, self.classes + 4)
        self.box_weight, self.loc_weight, self.sigma = box_weight, loc_weight, sigma
        # --aux-loc: four vectors per patch scored against the decoder's own (tied) location-token
        # embeddings, so the tower learns features from which the answer's bins are a linear read
        self.loc = torch.nn.Linear(width, 4 * width) if loc_weight > 0 else None
        self.table = lambda: model.get_input_embeddings().weight  # not a parameter of the head
        self.loc_first = loc_first
        self.features = None
        model.model.vision_tower.register_forward_hook(lambda module, args, out: setattr(self, "features", out.last_hidden_state))

    def loss(self, rows: list[dict], grid: int) -> torch.Tensor:
        out = self.linear(self.features)
        targets = (patch_targets(r["scene"], grid, self.overlap) for r in rows)
        classes, boxes, bins, weights = (torch.stack(t) for t in zip(*targets))
        ce = F.cross_entropy(out[..., :self.classes].reshape(-1, self.classes), classes.reshape(-1),
                             reduction="none").reshape(classes.shape)
        shape = classes > 0
        w = weights[shape] / weights[shape].sum()  # 1/n each without --aux-overlap
        loss = (w * ce[shape]).sum() + 0.5 * ce[~shape].mean()
        box_error = (torch.sigmoid(out[..., -4:])[shape] - boxes[shape]).abs().mean(-1)
        loss = loss + self.box_weight * (w * box_error).sum()
        if self.loc is not None:
            nll = spread_nll(self.loc_logp(self.features[shape]).reshape(-1, LOC_BINS), bins[shape].reshape(-1), self.sigma)
            loss = loss + self.loc_weight * (w * nll.reshape(-1, 4).mean(-1)).sum()
        return loss

    def loc_logp(self, features: torch.Tensor) -> torch.Tensor:
        """[n, 4, LOC_BINS] log-probabilities of the four bins from n patch features."""
        table = self.table()[self.loc_first:self.loc_first + LOC_BINS]
        return F.log_softmax(self.loc(features).reshape(len(features), 4, -1) @ table.T, -1)

    @torch.no_grad()
    def probe(self, model, processor, rows: list[dict], grid: int) -> dict:
        """What the vision tower alone sees in held-out scenes: per shape, whether the majority class
        of the patches it covers is its colour and kind, and the IoU of their mean box. (Until 4b88438
        a shape's patches were all those of its class, so two shapes of one colour and kind in a
        scene were scored as one: about 11% of shapes, found at IoU >= 0.5 14% of the time.)"""
        pixels = processor.image_processor([r["scene"].image for r in rows], return_tensors="pt")["pixel_values"]
        out = self.linear(model.model.vision_tower(pixels).last_hidden_state)  # the hook keeps self.features
        predicted, found = out[..., :self.classes].argmax(-1), torch.sigmoid(out[..., -4:])
        right, ious, loc_ious = [], [], []
        for i, row in enumerate(rows):
            classes, boxes, bins, _ = patch_targets(row["scene"], grid, self.overlap)
            scene = row["scene"]
            for shape, box in zip(scene.shapes, scene.boxes):  # its patches: its class and its box (two shapes may share a class)
                c = 1 + SHAPE_CLASSES.index((shape.color, shape.kind))
                mine = (bins == torch.tensor(box_bins(box, scene.width, scene.height))).all(-1)
                where = ((classes == c) & mine).nonzero()[:, 0]
                if len(where):
                    right.append(float(torch.mode(predicted[i, where]).values.item() == c))
                    ious.append(box_iou(found[i, where].mean(0).tolist(), boxes[where[0]].tolist()))
                    if self.loc is not None:  # the bins the loc head's summed log-probabilities pick, as a box
                        y0, x0, y1, x1 = self.loc_logp(self.features[i, where]).sum(0).argmax(-1).tolist()
                        ty0, tx0, ty1, tx1 = bins[where[0]].tolist()
                        loc_ious.append(box_iou((x0, y0, x1 + 1, y1 + 1), (tx0, ty0, tx1 + 1, ty1 + 1)))
        probe = {"shapes": len(right), "class": round(float(np.mean(right)), 3), "box_iou": round(float(np.mean(ious)), 3),
                 "box_iou>=0.5": round(float(np.mean(np.array(ious) >= 0.5)), 3)}
        if loc_ious:
            probe.update(loc_iou=round(float(np.mean(loc_ious)), 3), **{"loc_iou>=0.5": round(float(np.mean(np.array(loc_ious) >= 0.5)), 3)})
        return probe


def sincos(count: int, dim: int, scale: float) -> torch.Tensor:
    """[count, dim] sin-cos codes of 0..count-1 (angular frequencies from 1 down to about 1/count radian a
    step), times scale."""
    freqs = 1.0 / (count ** (torch.arange(dim // 2) / (dim // 2)))
    angles = torch.arange(count).float()[:, None] * freqs[None, :]
    return torch.cat([torch.sin(angles), torch.cos(angles)], 1) * scale


def init_positions(model, grid: int, width: int, loc_first: int) -> None:
    """Start the vision tower's position embeddings as 2D sin-cos codes (row code, column code) and
    the 1024 location tokens' embeddings as 1D sin-cos codes of their bin, so near positions and near
    bins start near; both stay trainable."""
    rows = sincos(grid, width // 2, 1.0)
    table = torch.cat([rows[:, None, :].expand(grid, grid, -1), rows[None, :, :].expand(grid, grid, -1)], -1)
    embed = model.get_input_embeddings().weight
    with torch.no_grad():
        dict(model.model.vision_tower.named_parameters())["embeddings.position_embedding.weight"].copy_(
            table.reshape(grid * grid, width))
        embed[loc_first:loc_first + LOC_BINS] = sincos(LOC_BINS, width, embed.std().item() * math.sqrt(2))


def build(args, tokenizer) -> tuple[PaliGemmaForConditionalGeneration, PaliGemmaProcessor]:
    tokens = (args.image_size // args.patch) ** 2
    width = args.width
    config = PaliGemmaConfig(
        vision_config=dict(model_type="siglip_vision_model", image_size=args.image_size, patch_size=args.patch,
                           hidden_size=width, intermediate_size=4 * width, num_hidden_layers=args.vision_layers,
                           num_attention_heads=4),
        text_config=dict(model_type="gemma", vocab_size=len(tokenizer), hidden_size=width, intermediate_size=4 * width,
                         num_hidden_layers=args.text_layers, num_attention_heads=4, num_key_value_heads=1,
                         head_dim=width // 4, initializer_range=1 / math.sqrt(width)),
        image_token_index=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN), projection_dim=width, hidden_size=width,
        vocab_size=len(tokenizer))
    model = PaliGemmaForConditionalGeneration(config)
    model.generation_config = GenerationConfig(bos_token_id=2, eos_token_id=1, pad_token_id=0, do_sample=False,
                                               max_new_tokens=MAX_NEW_TOKENS)
    image_processor = SiglipImageProcessor(size={"height": args.image_size, "width": args.image_size},
                                           image_seq_length=tokens)
    return model, PaliGemmaProcessor(image_processor=image_processor, tokenizer=tokenizer)


def spread_nll(logp: torch.Tensor, bins: torch.Tensor, sigma: float, first: int = 0) -> torch.Tensor:
    """-log p of location `bins` [n] under log-probabilities `logp` [n, V] (bin b at column first + b),
    the target spread over levels +-3 with a Gaussian of `sigma` levels (answers use every STEP-th bin)."""
    offsets = torch.arange(-3, 4)
    neighbours = bins[:, None] + STEP * offsets[None, :]
    valid = (neighbours >= 0) & (neighbours < LOC_BINS)
    weights = torch.exp(-0.5 * (offsets.float() / sigma) ** 2)[None, :] * valid
    weights = weights / weights.sum(1, keepdim=True)
    return -(weights * logp.gather(-1, neighbours.clamp(0, LOC_BINS - 1) + first)).sum(1)


def loss_of(model, batch, loc_first: int, sigma: float) -> torch.Tensor:
    """Mean over rows of each row's mean token loss; location targets spread over levels +-3 with a
    Gaussian of `sigma` levels (answers use every STEP-th bin)."""
    labels = batch.pop("labels")
    logits = model(**batch).logits[:, :-1].float()
    target = labels[:, 1:]
    keep = target != -100
    logp = F.log_softmax(logits, -1)
    safe = target.clamp(min=0)
    nll = -logp.gather(-1, safe[..., None])[..., 0]
    if sigma > 0:
        is_loc = keep & (target >= loc_first) & (target < loc_first + LOC_BINS)
        if is_loc.any():
            nll = nll.clone()
            nll[is_loc] = spread_nll(logp[is_loc], target[is_loc] - loc_first, sigma, loc_first)
    per_row = (nll * keep).sum(1) / keep.sum(1).clamp(min=1)
    return per_row.mean()


def batch_of(processor, rows: list[dict]) -> dict:
    processor.tokenizer.padding_side = "right"
    return dict(processor(images=[r["scene"].image for r in rows], text=[IMAGE_TOKEN + r["prefix"] for r in rows],
                          suffix=[r["suffix"] for r in rows], padding="longest", return_tensors="pt"))


@torch.no_grad()
def answers(model, processor, rows: list[dict], batch_size: int = 32) -> list[str]:
    model.eval()
    processor.tokenizer.padding_side = "left"
    out = []
    for i in range(0, len(rows), batch_size):
        chunk = rows[i:i + batch_size]
        inputs = processor(images=[r["scene"].image for r in chunk], text=[IMAGE_TOKEN + r["prefix"] for r in chunk],
                           padding="longest", return_tensors="pt")
        ids = model.generate(**inputs, max_new_tokens=MAX_NEW_TOKENS, do_sample=False)
        out += processor.tokenizer.batch_decode(ids[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
    model.train()
    return [a.strip() for a in out]


def box_iou(a, b) -> float:
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def match(truth: list[tuple[str, tuple, int]], found: list) -> list[tuple[int, object | None]]:
    """Each true object (label, pixel box, index) paired with a found Box of its label, one to one,
    best IoU first; None when none is left."""
    pairs = sorted(((box_iou(t[1], (f.x0, f.y0, f.x1, f.y1)), ti, fi) for ti, t in enumerate(truth)
                    for fi, f in enumerate(found) if f.label == t[0]), reverse=True)
    taken_t, taken_f, out = set(), set(), {}
    for _, ti, fi in pairs:
        if ti not in taken_t and fi not in taken_f:
            taken_t.add(ti), taken_f.add(fi)
            out[ti] = found[fi]
    return [(truth[i][2], out.get(i)) for i in range(len(truth))]


def score(tasks: Tasks, rows: list[dict], predicted: list[str]) -> dict:
    per = {kind: [] for kind in KINDS}
    for row, answer in zip(rows, predicted):
        kind, scene = row["kind"], row["scene"]
        if kind in ("caption", "color", "count"):
            per[kind].append(float(answer == row["suffix"]))
            continue
        asked = row["prefix"].split(" ", 1)[1].split(" ; ")
        truth = [(s.kind, box, i) for i, (s, box) in enumerate(zip(scene.shapes, scene.boxes)) if s.kind in asked]
        found = parse_detections(answer, scene.width, scene.height)
        for index, box in match(truth, found):
            if kind == "detect":
                per[kind].append(float(box is not None and box_iou(scene.boxes[index], (box.x0, box.y0, box.x1, box.y1)) >= 0.5))
            elif box is None or not box.codes:
                per[kind].append(0.0)
            else:
                with torch.no_grad():
                    logits = tasks.decoder(torch.tensor([box.codes]))[0].numpy()
                mask = paste_mask(logits, box, scene.width, scene.height)
                true = scene.masks[index]
                per[kind].append(float((mask & true).sum() / max(1, (mask | true).sum())))
    return {kind: round(float(np.mean(v)), 4) if v else None for kind, v in per.items()}


def scenes(n: int, seed: str) -> list:
    rng = random.Random(seed)
    return [random_scene(rng) for _ in range(n)]


def schedule(warmup: int, steps: int):
    """Linear warm-up, then cosine decay to 5% of the peak."""
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))
    return factor


def update(loss: torch.Tensor, params: list, optimizer, scheduler) -> float:
    """One optimizer step on `loss` (gradients clipped to norm 1); returns the loss."""
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return loss.item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=2800)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--lr", type=float, default=1.5e-3)
    parser.add_argument("--warmup", type=int, default=100)
    parser.add_argument("--image-size", type=int, default=96)
    parser.add_argument("--patch", type=int, default=16)
    parser.add_argument("--width", type=int, default=192)
    parser.add_argument("--vision-layers", type=int, default=3)
    parser.add_argument("--text-layers", type=int, default=4)
    parser.add_argument("--loc-sigma", type=float, default=1.0, help="location target spread in levels (0: one-hot)")
    parser.add_argument("--aux", type=float, default=1.0, help="weight of the training-only patch head's loss (0: none)")
    parser.add_argument("--aux-box", type=float, default=10.0, help="weight of the patch head's box loss inside it")
    parser.add_argument("--aux-loc", type=float, default=0.0,
                        help="weight of the patch head's location-bin loss through the decoder's loc embeddings (0: none)")
    parser.add_argument("--vision-steps", type=int, default=3000,
                        help="steps of the vision tower and patch head alone before the whole model (needs --aux)")
    parser.add_argument("--aux-overlap", action="store_true",
                        help="patch head targets on every patch a shape overlaps, weighted by the overlap (default: centres)")
    parser.add_argument("--vision-lr", type=float, default=1.5e-3)
    parser.add_argument("--vision-lr-scale", type=float, default=1.0,
                        help="the vision tower's learning rate in the whole-model stage, as a fraction of --lr")
    parser.add_argument("--no-sincos", action="store_true", help="random, not sin-cos, initial positions and loc embeddings")
    parser.add_argument("--eval-every", type=int, default=700)
    parser.add_argument("--eval-rows", type=int, default=200, help="rows per held-out set in the final score")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=WORK / "vlm")
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    tasks = Tasks(WORK)
    tokenizer = build_tokenizer(WORDS)
    model, processor = build(args, tokenizer)
    loc_first = tokenizer.convert_tokens_to_ids("<loc0000>")
    print(f"{sum(p.numel() for p in model.parameters()) / 1e6:.2f} M parameters, "
          f"{(args.image_size // args.patch) ** 2} image tokens; {json.dumps(vars(args), default=str)}", flush=True)
    held_a = tasks.split(args.eval_rows, "demo-v2-eval-a")
    held_b = tasks.split(args.eval_rows, "demo-v2-eval-b", other=True)
    grid = args.image_size // args.patch
    if not args.no_sincos:
        init_positions(model, grid, args.width, loc_first)
    head = PatchHead(model, args.width, args.aux_box, args.aux_loc, loc_first, args.loc_sigma, args.aux_overlap) if args.aux > 0 else None
    model.train()
    started, log = time.perf_counter(), {"vision": [], "vlm": []}
    if head is not None and args.vision_steps:
        vision = model.model.vision_tower
        params = list(vision.parameters()) + list(head.parameters())
        groups = [{"params": params}]
        if head.loc is not None:  # the loc embeddings the head scores against learn too (no decay: most rows get no gradient)
            groups.append({"params": [head.table()], "weight_decay": 0.0})
        optimizer = torch.optim.AdamW(groups, lr=args.vision_lr, betas=(0.9, 0.98), weight_decay=0.01)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule(args.warmup, args.vision_steps))
        losses = []
        for step in range(args.vision_steps):
            rows = [{"scene": scene} for scene in scenes(args.batch, f"demo-v2-vision-{step}")]
            vision(processor.image_processor([r["scene"].image for r in rows], return_tensors="pt")["pixel_values"])
            losses.append(update(head.loss(rows, grid), params, optimizer, scheduler))
            if (step + 1) % 250 == 0 or step + 1 == args.vision_steps:
                paused = time.perf_counter()
                probe = head.probe(model, processor, held_a[:100], grid)
                log["vision"].append({"step": step + 1, "loss": round(float(np.mean(losses[-250:])), 4), **probe})
                started += time.perf_counter() - paused
                print(f"vision step {step + 1} loss {np.mean(losses[-250:]):.4f} {time.perf_counter() - started:.0f} s; "
                      f"held-out A: {probe}", flush=True)

    vision_params = list(model.model.vision_tower.parameters())
    in_vision = {id(p) for p in vision_params}
    rest = [p for p in model.parameters() if id(p) not in in_vision] + (list(head.parameters()) if head else [])
    params = vision_params + rest
    optimizer = torch.optim.AdamW([{"params": rest}, {"params": vision_params, "lr": args.lr * args.vision_lr_scale}],
                                  lr=args.lr, betas=(0.9, 0.98), weight_decay=0.01)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule(args.warmup, args.steps))
    losses = []
    for step in range(args.steps):
        rows = tasks.split(args.batch, f"demo-v2-train-{step}")
        loss = loss_of(model, batch_of(processor, rows), loc_first, args.loc_sigma)
        update(loss + args.aux * head.loss(rows, grid) if head is not None else loss, params, optimizer, scheduler)
        losses.append(loss.item())  # the text loss alone
        if (step + 1) % 50 == 0:
            print(f"step {step + 1} loss {np.mean(losses[-50:]):.4f} {time.perf_counter() - started:.0f} s", flush=True)
        if args.eval_every and (step + 1) % args.eval_every == 0 and step + 1 < args.steps:
            paused = time.perf_counter()
            sample = held_a[:50]
            scores = score(tasks, sample, answers(model, processor, sample))
            probe = head.probe(model, processor, held_a[:100], grid) if head else None
            log["vlm"].append({"step": step + 1, "loss": round(float(np.mean(losses[-50:])), 4), "A50": scores, "probe": probe})
            started += time.perf_counter() - paused
            print(f"step {step + 1} held-out A ({len(sample)} rows): {scores}; vision probe {probe}", flush=True)
    seconds = time.perf_counter() - started
    results = {"steps": args.steps, "train_seconds": round(seconds), "args": {k: str(v) for k, v in vars(args).items()},
               "log": log}
    for name, rows in (("A", held_a), ("B", held_b)):
        predicted = answers(model, processor, rows)
        results[name] = score(tasks, rows, predicted)
        results[f"{name}_examples"] = [{"prefix": r["prefix"], "truth": r["suffix"], "answer": a}
                                       for r, a in list(zip(rows, predicted))[:10]]
    args.out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(args.out)
    if head is not None:  # not part of the model; kept for probing what the tower learnt
        torch.save(head.state_dict(), args.out / "patch_head.pt")
    processor.save_pretrained(args.out)
    (args.out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps({k: results[k] for k in ("steps", "train_seconds", "A", "B")}), flush=True)


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
