"""The demo model's synthetic task: coloured shapes on a coarse grid, asked about in PaliGemma's prompt styles.

An image is IMAGE_SIZE pixels square on a mid-grey background, cut into a GRID x GRID board of
patch-sized cells; 1..MAX_SHAPES cells hold a shape (a circle, square or triangle in one of four
colours). Every sample is one (image, prefix, suffix):

    caption en                   -> red circle and blue square      (shapes in reading order)
    what color is the circle?    -> red                             (asked only of a shape that occurs once)
    how many shapes?             -> 2
    detect circle                -> <loc0256><loc0000><loc0511><loc0255> circle   (all circles, " ; "-joined)

Boxes are PaliGemma's y0 x0 y1 x1, each quantised into 1024 bins; a shape's box is its grid cell, so every
box is one of GRID possible spans per axis and an exact answer is learnable. Everything is a pure function
of the seed.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageDraw

IMAGE_SIZE = 64
GRID = 4
CELL = IMAGE_SIZE // GRID
LOC_BINS = 1024
MAX_SHAPES = 3
BACKGROUND = (128, 128, 128)  # mid-grey: ~0 after SigLIP normalisation, so empty patches carry only position
COLORS = {"red": (220, 40, 40), "green": (40, 160, 60), "blue": (40, 80, 220), "yellow": (230, 190, 20)}
SHAPES = ("circle", "square", "triangle")
KINDS = ("caption", "color", "count", "detect")
# How each kind's prompt starts: what the per-kind exact match reads a row's kind from.
KIND_PREFIXES = {"caption": "caption", "color": "what color", "count": "how many", "detect": "detect"}

# Every word a prompt or an answer uses; the demo tokenizer has one token per word.
WORDS = (
    ["caption", "en", "what", "color", "is", "the", "how", "many", "shapes", "detect", "and", ";", "?"]
    + list(SHAPES) + list(COLORS) + [str(n) for n in range(10)]
)


@dataclass(frozen=True)
class Sample:
    """One example: an image (a path, or a PIL image when generated in memory), a prompt and its answer."""

    image: str | Path | Image.Image
    prefix: str
    suffix: str

    def open_image(self) -> Image.Image:
        """The image as an 8-bit RGB PIL image (16-bit and float images scaled, see runtime.open_image)."""
        from pgexport.runtime import open_image, to_rgb

        return to_rgb(self.image) if isinstance(self.image, Image.Image) else open_image(self.image)


@dataclass(frozen=True)
class Shape:
    row: int
    col: int
    color: str
    kind: str


def box_tokens(shape: Shape) -> str:
    """The shape's grid cell as PaliGemma's `<loc y0><loc x0><loc y1><loc x1>` (bin = pixel * 1024 // size)."""
    y0, x0 = shape.row * CELL, shape.col * CELL
    bins = [p * LOC_BINS // IMAGE_SIZE for p in (y0, x0)]
    bins += [(p + CELL) * LOC_BINS // IMAGE_SIZE - 1 for p in (y0, x0)]
    return "".join(f"<loc{b:04d}>" for b in bins)


def random_scene(rng: random.Random, max_shapes: int = MAX_SHAPES) -> list[Shape]:
    """1..max_shapes shapes in distinct cells, in reading order (row, then column)."""
    cells = rng.sample(range(GRID * GRID), rng.randint(1, max_shapes))
    return [Shape(c // GRID, c % GRID, rng.choice(list(COLORS)), rng.choice(SHAPES)) for c in sorted(cells)]


def render(scene: list[Shape], rng: random.Random) -> Image.Image:
    """Draw the scene; each shape's size and centre jitter a little inside its cell."""
    image = Image.new("RGB", (IMAGE_SIZE, IMAGE_SIZE), BACKGROUND)
    draw = ImageDraw.Draw(image)
    for shape in scene:
        half = rng.randint(CELL // 2 - 4, CELL // 2 - 2)  # with the +-1 jitter, the shape stays inside its cell
        cy = shape.row * CELL + CELL // 2 + rng.randint(-1, 1)
        cx = shape.col * CELL + CELL // 2 + rng.randint(-1, 1)
        box = (cx - half, cy - half, cx + half, cy + half)
        fill = COLORS[shape.color]
        if shape.kind == "circle":
            draw.ellipse(box, fill=fill)
        elif shape.kind == "square":
            draw.rectangle((cx - half + 1, cy - half + 1, cx + half - 1, cy + half - 1), fill=fill)
        else:
            draw.polygon([(cx, cy - half), (cx - half, cy + half), (cx + half, cy + half)], fill=fill)
    return image


def question(scene: list[Shape], kind: str, rng: random.Random) -> tuple[str, str] | None:
    """(prefix, suffix) of one kind about the scene, or None when the scene cannot answer it."""
    if kind == "caption":
        return "caption en", " and ".join(f"{s.color} {s.kind}" for s in scene)
    if kind == "count":
        return "how many shapes?", str(len(scene))
    if kind == "color":
        unique = [s for s in scene if sum(t.kind == s.kind for t in scene) == 1]
        if not unique:
            return None
        shape = rng.choice(unique)
        return f"what color is the {shape.kind}?", shape.color
    if kind == "detect":
        name = rng.choice(sorted({s.kind for s in scene}))
        return f"detect {name}", " ; ".join(f"{box_tokens(s)} {name}" for s in scene if s.kind == name)
    raise ValueError(f"unknown question kind {kind!r}")


def sample_key(sample: Sample) -> tuple[bytes, str]:
    """What makes two samples the same question: image pixels and prompt. Training draws skip any
    sample whose key is in the eval split, so held-out rows stay unseen."""
    return sample.open_image().tobytes(), sample.prefix


def make_sample(rng: random.Random, kind: str, max_shapes: int = MAX_SHAPES) -> Sample:
    """One sample of `kind`, drawing scenes until one can answer it."""
    while True:
        scene = random_scene(rng, max_shapes)
        qa = question(scene, kind, rng)
        if qa is not None:
            return Sample(render(scene, rng), *qa)


def make_split(n: int, seed: int, max_shapes: int = MAX_SHAPES, kinds: tuple[str, ...] = KINDS) -> list[Sample]:
    """`n` samples (PIL images), deterministic for `seed`: `kinds` in turn, scenes of 1..max_shapes
    shapes (the defaults make the eval split; training starts on easier ones)."""
    rng = random.Random(f"pgexport-demo-{seed}")
    return [make_sample(rng, kinds[i % len(kinds)], max_shapes) for i in range(n)]
