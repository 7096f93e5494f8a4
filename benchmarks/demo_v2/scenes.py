"""Demo v2 prototype (issue 16, part 3): scenes of shapes of free size and position on images of
any size and aspect, with each shape's mask and tight box; answers' boxes on a 64-level grid of
PaliGemma's 1024 bins. `random_scene(other=True)` draws the second held-out kind (larger images,
4x supersampled edges, gradient backgrounds). Results: benchmarks/demo_v2/README.md."""
from __future__ import annotations

import math
import random
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

COLORS = {"red": (220, 40, 40), "green": (40, 160, 60), "blue": (40, 80, 220), "yellow": (230, 190, 20)}
SHAPES = ("circle", "square", "triangle")
LOC_BINS = 1024
LEVELS = 64  # answers use every 16th bin: 64 levels per axis
STEP = LOC_BINS // LEVELS
MAX_SHAPES = 3


@dataclass(frozen=True)
class Shape:
    kind: str
    color: str
    box: tuple[float, float, float, float]  # x0, y0, x1, y1 of the drawn square in pixels (floats)


@dataclass
class Scene:
    width: int
    height: int
    shapes: list[Shape]
    image: Image.Image
    masks: list[np.ndarray]  # bool [h, w] per shape
    boxes: list[tuple[int, int, int, int]]  # tight pixel boxes x0, y0, x1, y1 (x1, y1 exclusive)


def layout(rng: random.Random, width: int, height: int, count: int, min_frac=0.22, max_frac=0.45) -> list[Shape]:
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


def polygon(kind: str, box, scale: float):
    x0, y0, x1, y1 = (v * scale for v in box)
    if kind == "triangle":
        return [((x0 + x1) / 2, y0), (x0, y1), (x1, y1)]
    return None


def draw_shape(draw: ImageDraw.ImageDraw, kind: str, box, scale: float, fill):
    x0, y0, x1, y1 = (v * scale for v in box)
    if kind == "circle":
        draw.ellipse((x0, y0, x1, y1), fill=fill)
    elif kind == "square":
        draw.rectangle((x0, y0, x1, y1), fill=fill)
    else:
        draw.polygon(polygon(kind, box, scale), fill=fill)


def background(rng: random.Random, width: int, height: int, style: str) -> Image.Image:
    level = rng.randint(80, 180)
    tint = [max(0, min(255, level + rng.randint(-12, 12))) for _ in range(3)]
    if style == "flat":
        base = np.full((height, width, 3), tint, np.float32)
    elif style == "noise":
        base = np.full((height, width, 3), tint, np.float32) + np.random.default_rng(rng.randrange(1 << 30)).normal(0, rng.uniform(2, 10), (height, width, 1))
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
    image = background(rng, width, height, style)
    masks, boxes = [], []
    for shape in shapes:
        layer = Image.new("L", (width * supersample, height * supersample), 0)
        draw_shape(ImageDraw.Draw(layer), shape.kind, shape.box, supersample, 255)
        if supersample > 1:
            layer = layer.resize((width, height), Image.Resampling.BOX)
        alpha = np.asarray(layer)
        mask = alpha >= 128
        ys, xs = np.nonzero(mask)
        boxes.append((int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1))
        masks.append(mask)
        image.paste(Image.new("RGB", (width, height), COLORS[shape.color]), (0, 0), layer)
    return Scene(width, height, shapes, image, masks, boxes)


def random_scene(rng: random.Random, max_shapes: int = MAX_SHAPES, other: bool = False) -> Scene:
    """Training / held-out A: 40..160 px sides, aspect up to 2, aliased or 3x supersampled, flat or
    noisy backgrounds. Other (held-out B): 180..400 px, aspect up to 2.5, 4x supersampled, gradient."""
    while True:
        if other:
            width, height = rng.randint(180, 400), rng.randint(180, 400)
            limit = 2.5
        else:
            width, height = rng.randint(40, 160), rng.randint(40, 160)
            limit = 2.0
        if max(width, height) / min(width, height) <= limit:
            break
    count = rng.randint(1, max_shapes)
    shapes = layout(rng, width, height, count)
    if other:
        return render(rng, width, height, shapes, 4, "gradient")
    return render(rng, width, height, shapes, rng.choice((1, 3)), rng.choice(("flat", "noise")))


def box_bins(box, width: int, height: int) -> tuple[int, int, int, int]:
    """y0 x0 y1 x1 bins of a pixel box (x1, y1 exclusive), on the 64-level grid."""
    x0, y0, x1, y1 = box

    def start(v, size):
        return min(LOC_BINS - STEP, STEP * round(v / size * LEVELS))

    def end(v, size, first):
        return max(first + STEP - 1, min(LOC_BINS - 1, STEP * round(v / size * LEVELS) - 1))

    by0, bx0 = start(y0, height), start(x0, width)
    return by0, bx0, end(y1, height, by0), end(x1, width, bx0)


def loc_tokens(bins) -> str:
    return "".join(f"<loc{b:04d}>" for b in bins)


def mask_crop(mask: np.ndarray, box, size: int = 64) -> np.ndarray:
    x0, y0, x1, y1 = box
    crop = Image.fromarray((mask[y0:y1, x0:x1] * 255).astype(np.uint8))
    return np.asarray(crop.resize((size, size), Image.Resampling.BILINEAR)) >= 128
