"""The demo model's synthetic task: coloured shapes of any size and position on images of any size
and aspect, asked about with PaliGemma's five prompt kinds.

A scene is 1..MAX_SHAPES shapes (circle, square or triangle in one of four colours; 22-45% of the
short side; never touching; centres at least a tenth of the width apart, so left-to-right order is
unambiguous) on an image of 40..160 px a side with aspect up to 2, drawn aliased or 3x supersampled
on a flat or noisy grey. `other=True` draws the second held-out kind, made differently: 180..400 px,
aspect up to 2.5, 4x supersampled, on a gradient between two greys. The processor resizes every
image to the model's square input, as PaliGemma's does. Each shape keeps its drawn mask and tight
pixel box (Scene), so answers are scored against what was drawn.

    caption en                  -> red circle and blue square                  (shapes left to right)
    what color is the circle?   -> red                                         (of a kind that occurs once)
    how many shapes?            -> 2
    detect circle ; square      -> <loc..>x4 circle ; <loc..>x4 square         (one or two kinds asked)
    segment circle              -> <loc..>x4 <seg..>x16 circle                 (every circle, ' ; '-joined)

Boxes are PaliGemma's y0 x0 y1 x1 over 1024 bins; answers use every 16th bin (64 levels a side), so a
box is learnable to about 1.5% of the side. A segment answer's 16 codes are the demo VQ-VAE's
(pgexport.demo.vqvae) for the shape's mask cropped to its box; its decoder, in vae-oid.npz's
structure, ships beside the checkpoint (SEG_DECODER_FILE) and exports as onnx/seg_decoder.onnx.
Everything is a pure function of the seed.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

COLORS = {"red": (220, 40, 40), "green": (40, 160, 60), "blue": (40, 80, 220), "yellow": (230, 190, 20)}
SHAPES = ("circle", "square", "triangle")
MAX_SHAPES = 3
LOC_BINS = 1024
LEVELS = 64  # answers use every 16th bin: 64 levels per axis
STEP = LOC_BINS // LEVELS
MASK_SIZE = 64  # the VQ-VAE's crops, as PaliGemma's decoder's masks
SEG_DECODER_FILE = Path(__file__).with_name("seg_decoder.npz")  # the shipped VQ-VAE (pgexport.demo.vqvae)
KINDS = ("caption", "color", "count", "detect", "segment")
# How each kind's prompt starts: what the per-kind scores read a row's kind from.
KIND_PREFIXES = {"caption": "caption", "color": "what color", "count": "how many", "detect": "detect",
                 "segment": "segment"}

# Every word a prompt or an answer uses; the demo tokenizer has one token per word.
WORDS = (
    ["caption", "en", "what", "color", "is", "the", "how", "many", "shapes", "detect", "segment", "and", ";", "?"]
    + list(SHAPES) + list(COLORS) + [str(n) for n in range(10)]
)


@dataclass(frozen=True)
class Shape:
    kind: str
    color: str
    box: tuple[float, float, float, float]  # x0, y0, x1, y1 of the square it is drawn in, pixels (floats)


@dataclass
class Scene:
    """A drawn scene: the image, and per shape (left to right) its mask and tight pixel box."""

    width: int
    height: int
    shapes: list[Shape]
    image: Image.Image
    masks: list[np.ndarray]  # bool [height, width] per shape
    boxes: list[tuple[int, int, int, int]]  # tight pixel boxes x0, y0, x1, y1 (x1, y1 exclusive)


@dataclass(frozen=True)
class Sample:
    """One example: an image (a path, or a PIL image when generated in memory), a prompt and its
    answer; `scene` (generated samples only) is what was drawn, for scoring against the drawing."""

    image: str | Path | Image.Image
    prefix: str
    suffix: str
    scene: Scene | None = field(default=None, compare=False, repr=False)

    def open_image(self) -> Image.Image:
        """The image as an 8-bit RGB PIL image (16-bit and float images scaled, see runtime.open_image)."""
        from pgexport.runtime import open_image, to_rgb

        return to_rgb(self.image) if isinstance(self.image, Image.Image) else open_image(self.image)

    @property
    def kind(self) -> str | None:
        """The question kind its prompt asks (KIND_PREFIXES), or None."""
        return next((kind for kind, start in KIND_PREFIXES.items() if self.prefix.startswith(start)), None)


def layout(rng: random.Random, width: int, height: int, count: int, min_frac=0.22, max_frac=0.45) -> list[Shape]:
    """Up to `count` shapes placed at random (200 tries), apart from each other, left to right."""
    short = min(width, height)
    shapes: list[Shape] = []
    for _ in range(200):
        if len(shapes) == count:
            break
        side = rng.uniform(min_frac, max_frac) * short
        x0 = rng.uniform(1, width - side - 1)
        y0 = rng.uniform(1, height - side - 1)
        box = (x0, y0, x0 + side, y0 + side)
        cx = x0 + side / 2
        ok = all(box[0] > s.box[2] + 2 or box[2] < s.box[0] - 2 or box[1] > s.box[3] + 2 or box[3] < s.box[1] - 2
                 for s in shapes)
        ok = ok and all(abs(cx - (s.box[0] + s.box[2]) / 2) > 0.1 * width for s in shapes)
        if ok:
            shapes.append(Shape(rng.choice(SHAPES), rng.choice(list(COLORS)), box))
    return sorted(shapes, key=lambda s: s.box[0] + s.box[2])


def draw_shape(draw: ImageDraw.ImageDraw, kind: str, box, scale: float, fill) -> None:
    x0, y0, x1, y1 = (v * scale for v in box)
    if kind == "circle":
        draw.ellipse((x0, y0, x1, y1), fill=fill)
    elif kind == "square":
        draw.rectangle((x0, y0, x1, y1), fill=fill)
    else:
        draw.polygon([((x0 + x1) / 2, y0), (x0, y1), (x1, y1)], fill=fill)


def background(rng: random.Random, width: int, height: int, style: str) -> Image.Image:
    """A grey: flat, with Gaussian noise, or a gradient between two greys at a random angle."""
    level = rng.randint(80, 180)
    tint = [max(0, min(255, level + rng.randint(-12, 12))) for _ in range(3)]
    if style == "flat":
        base = np.full((height, width, 3), tint, np.float32)
    elif style == "noise":
        noise = np.random.default_rng(rng.randrange(1 << 30)).normal(0, rng.uniform(2, 10), (height, width, 1))
        base = np.full((height, width, 3), tint, np.float32) + noise
    else:  # gradient
        level2 = rng.randint(70, 190)
        other = [max(0, min(255, level2 + rng.randint(-20, 20))) for _ in range(3)]
        angle = rng.uniform(0, 2 * math.pi)
        yy, xx = np.mgrid[0:height, 0:width]
        t = (np.cos(angle) * xx / width + np.sin(angle) * yy / height)
        t = (t - t.min()) / max(t.max() - t.min(), 1e-6)
        base = np.array(tint, np.float32) * (1 - t[..., None]) + np.array(other, np.float32) * t[..., None]
    return Image.fromarray(np.clip(base, 0, 255).astype(np.uint8))


def render(rng: random.Random, width: int, height: int, shapes: list[Shape], supersample: int, style: str) -> Scene:
    """Draw the shapes (each at `supersample` x, then box-filtered down) over a background; a shape's
    mask is where its coverage is at least half."""
    image = background(rng, width, height, style)
    masks, boxes = [], []
    for shape in shapes:
        layer = Image.new("L", (width * supersample, height * supersample), 0)
        draw_shape(ImageDraw.Draw(layer), shape.kind, shape.box, supersample, 255)
        if supersample > 1:
            layer = layer.resize((width, height), Image.Resampling.BOX)
        mask = np.asarray(layer) >= 128
        ys, xs = np.nonzero(mask)
        boxes.append((int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1))
        masks.append(mask)
        image.paste(Image.new("RGB", (width, height), COLORS[shape.color]), (0, 0), layer)
    return Scene(width, height, shapes, image, masks, boxes)


def random_scene(rng: random.Random, max_shapes: int = MAX_SHAPES, other: bool = False) -> Scene:
    """Training and held-out A: 40..160 px sides, aspect up to 2, aliased or 3x supersampled, flat or
    noisy backgrounds. `other` (held-out B): 180..400 px, aspect up to 2.5, 4x supersampled, gradient."""
    while True:
        if other:
            width, height = rng.randint(180, 400), rng.randint(180, 400)
            limit = 2.5
        else:
            width, height = rng.randint(40, 160), rng.randint(40, 160)
            limit = 2.0
        if max(width, height) / min(width, height) <= limit:
            break
    shapes = layout(rng, width, height, rng.randint(1, max_shapes))
    if other:
        return render(rng, width, height, shapes, 4, "gradient")
    return render(rng, width, height, shapes, rng.choice((1, 3)), rng.choice(("flat", "noise")))


def box_bins(box, width: int, height: int) -> tuple[int, int, int, int]:
    """A pixel box (x0, y0, x1, y1; x1, y1 exclusive) as the answer's y0 x0 y1 x1 bins on the
    64-level grid: a start is the nearest level's first bin, an end the last bin before the nearest
    level (at least one level past the start)."""
    x0, y0, x1, y1 = box

    def start(v, size):
        return min(LOC_BINS - STEP, STEP * round(v / size * LEVELS))

    def end(v, size, first):
        return max(first + STEP - 1, min(LOC_BINS - 1, STEP * round(v / size * LEVELS) - 1))

    by0, bx0 = start(y0, height), start(x0, width)
    return by0, bx0, end(y1, height, by0), end(x1, width, bx0)


def loc_tokens(bins) -> str:
    return "".join(f"<loc{b:04d}>" for b in bins)


def mask_crop(mask: np.ndarray, box, size: int = MASK_SIZE) -> np.ndarray:
    """The mask inside its box, resized (bilinear) to size x size, as bool."""
    x0, y0, x1, y1 = box
    crop = Image.fromarray((mask[y0:y1, x0:x1] * 255).astype(np.uint8))
    return np.asarray(crop.resize((size, size), Image.Resampling.BILINEAR)) >= 128


def question(scene: Scene, kind: str, rng: random.Random, seg_codes=None) -> tuple[str, str] | None:
    """(prefix, suffix) of one kind about the scene, or None when the scene cannot answer it (a color
    question needs a kind that occurs once). `seg_codes(scene)` gives each shape's 16 codes as
    `<segNNN>` text (default: the shipped VQ-VAE's, pgexport.demo.vqvae.scene_codes)."""
    shapes = scene.shapes
    if kind == "caption":
        return "caption en", " and ".join(f"{s.color} {s.kind}" for s in shapes)
    if kind == "count":
        return "how many shapes?", str(len(shapes))
    if kind == "color":
        unique = [s for s in shapes if sum(t.kind == s.kind for t in shapes) == 1]
        if not unique:
            return None
        shape = rng.choice(unique)
        return f"what color is the {shape.kind}?", shape.color
    locs = [loc_tokens(box_bins(box, scene.width, scene.height)) for box in scene.boxes]
    present = sorted({s.kind for s in shapes})
    if kind == "detect":
        asked = rng.sample(present, rng.randint(1, min(2, len(present))))
        answer = " ; ".join(f"{loc} {s.kind}" for s, loc in zip(shapes, locs) if s.kind in asked)
        return "detect " + " ; ".join(asked), answer
    if kind == "segment":
        if seg_codes is None:
            raise ValueError("segment answers need seg_codes (pgexport.demo.make_split passes the shipped VQ-VAE's)")
        name = rng.choice(present)
        codes = seg_codes(scene)
        return f"segment {name}", " ; ".join(f"{loc}{code} {name}" for s, loc, code in zip(shapes, locs, codes)
                                             if s.kind == name)
    raise ValueError(f"unknown question kind {kind!r}")


def sample_key(sample: Sample) -> tuple[bytes, str]:
    """What makes two samples the same question: image pixels and prompt. Generated training rows
    skip any sample whose key is in the eval split, so held-out rows stay unseen."""
    return sample.open_image().tobytes(), sample.prefix


def make_split(n: int, seed: int | str, kinds: tuple[str, ...] = KINDS, other: bool = False,
               seg_codes=None) -> list[Sample]:
    """`n` samples (PIL images, with their scenes), deterministic for `seed`: `kinds` in turn, a fresh
    scene each until one can answer its kind; `other` draws held-out B's kind of image. Segment
    answers need `seg_codes` (pgexport.demo.make_split passes the shipped VQ-VAE's)."""
    rng = random.Random(f"demo-v2-{seed}")
    samples: list[Sample] = []
    while len(samples) < n:
        kind = kinds[len(samples) % len(kinds)]
        scene = random_scene(rng, other=other)
        qa = question(scene, kind, rng, seg_codes)
        if qa is not None:
            samples.append(Sample(scene.image, *qa, scene=scene))
    return samples


def scenes(n: int, seed: int | str) -> list[Scene]:
    """`n` scenes of the training kind, deterministic for `seed` (the vision stage's batches)."""
    rng = random.Random(f"demo-v2-{seed}")
    return [random_scene(rng) for _ in range(n)]
