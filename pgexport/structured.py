"""PaliGemma's detection answers as boxes: one parser, the same in Python (here), JavaScript
(structured.js) and Swift (structured.swift), the last two copied into every artifact.

Syntax. An answer to `detect a ; b` is objects joined by `;`, each four location tokens and a label:

    <loc0256><loc0000><loc0511><loc0255> circle ; <loc0000><loc0768><loc0255><loc1023> square

The tokens are y0 x0 y1 x1 (top, left, bottom, right), each a bin in 0..1023 of the model's square
input. Read tolerantly, as Google's reference parser does: text before an object is skipped, spaces
may sit between the tokens, up to 16 `<segNNN>` tokens may follow them (a `segment` answer's mask
codes: the box keeps them as `codes` when there are exactly 16, each under 128), the label is the
text up to the next `;` or `<` with spaces, tabs and newlines trimmed ("" when missing). Not a box:
fewer than four location tokens in a row, a number over 1023, or a box with no extent (y1 <= y0 or
x1 <= x0, as big_vision's evaluator rejects). Five location tokens in a row are a box of the first
four (and no label) followed by a lone token.

Coordinates. A bin is bin / 1024 of the side, for the end bins too: Google's PaliGemma reference
parser (big_vision's PaliGemma demo, `extract_objs`, which Roboflow's supervision and most ports
copy) divides every bin by 1024; big_vision's own segmentation evaluator divides by 1023, and a bin's
far edge would be (bin + 1) / 1024; the three differ by at most 1/1024 of the side. So a box that
the demo task writes as a grid cell's first and last bins (`<loc0256>`..`<loc0511>` for pixels 16..31
of 64) reads as 16.0 .. 31.9375. The processor resizes the whole image to the square input without
keeping its aspect, so x scales by the original image's width and y by its height: the boxes are in
the original image's pixels.

Masks. A `segment` answer's 16 codes go through the segmentation decoder (onnx/seg_decoder.onnx,
pgexport.exporters.seg_decoder) to 64 x 64 logits over the box; `paste_mask` resizes them to the box
in the original image's pixels (bilinear, PIL) and keeps the pixels over 0, as big_vision's
segmentation evaluator does (it maps bins with / 1023; here the box is the parser's, / 1024).

Torch-free: the runtime (`Generation.boxes`) and `pgexport generate --json/--draw` use it.
"""

from __future__ import annotations

import math
import os
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from pgexport.errors import OutputError
from pgexport.output import check_inputs_apart

LOC_BINS = 1024
# Four location tokens (spaces between them allowed), up to 16 segmentation tokens, the label.
# The same pattern, character for character, is in structured.js and structured.swift.
DETECTION = re.compile(r"<loc([0-9]{4})>[ \t\r\n]*<loc([0-9]{4})>[ \t\r\n]*<loc([0-9]{4})>[ \t\r\n]*<loc([0-9]{4})>"
                       r"((?:[ \t\r\n]*<seg[0-9]{3}>){0,16})([^;<]*)")
SEG = re.compile(r"<seg([0-9]{3})>")
SEG_CODES, SEG_BOOK = 16, 128  # a mask is exactly 16 codes, each < 128 (<seg000>..<seg127>)
SPACES = " \t\r\n"
# The parsers copied into every artifact folder (written before its manifest: listed and hashed).
JS_SOURCE = Path(__file__).with_name("structured.js")
SWIFT_SOURCE = Path(__file__).with_name("structured.swift")
JS_FILE, SWIFT_FILE = "paligemma_structured.js", "paligemma_structured.swift"
# Outline colours, in turn: none of them is the demo task's background or shape colours.
PALETTE = ((255, 0, 255), (0, 255, 255), (255, 140, 0), (0, 255, 0), (255, 255, 255), (0, 0, 0))
MASK_OPACITY = 0.5  # a mask's fill over the image in --draw


@dataclass(frozen=True)
class Box:
    """One detected object: its label and its box in the original image's pixels (x right, y down;
    x0, y0 the top-left corner, x1, y1 the bottom-right one), with the bins the model wrote
    (y0, x0, y1, x1). `score` is for callers that rate boxes; the parser leaves it None."""

    label: str
    x0: float
    y0: float
    x1: float
    y1: float
    bins: tuple[int, int, int, int]
    score: float | None = None
    codes: tuple[int, ...] = ()  # a segment answer's 16 mask codes (<segNNN> numbers), else ()

    def as_json(self) -> dict:
        """{"label", "box": [x0, y0, x1, y1] in pixels, "bins": [y0, x0, y1, x1]} (and "score",
        "codes" when set)."""
        found = {"label": self.label, "box": [self.x0, self.y0, self.x1, self.y1], "bins": list(self.bins)}
        if self.score is not None:
            found["score"] = self.score
        if self.codes:
            found["codes"] = list(self.codes)
        return found


def parse_detections(text: str, width: float, height: float) -> list[Box]:
    """The boxes of a detection answer (see the module docstring), in pixels of an original image
    `width` x `height`. Text with no box gives []."""
    if not (width > 0 and height > 0 and math.isfinite(width) and math.isfinite(height)):
        raise ValueError(f"image size {width} x {height}: give positive finite numbers")
    boxes = []
    for match in DETECTION.finditer(text):
        bins = tuple(int(value) for value in match.groups()[:4])
        y0, x0, y1, x1 = bins
        if max(bins) >= LOC_BINS or y1 <= y0 or x1 <= x0:
            continue
        codes = tuple(int(code) for code in SEG.findall(match.group(5)))
        if len(codes) != SEG_CODES or max(codes) >= SEG_BOOK:
            codes = ()
        boxes.append(Box(label=match.group(6).strip(SPACES), x0=x0 / LOC_BINS * width, y0=y0 / LOC_BINS * height,
                         x1=x1 / LOC_BINS * width, y1=y1 / LOC_BINS * height, bins=bins, codes=codes))
    return boxes


@dataclass(frozen=True)
class Mask:
    """A segmented object: its box (with the 16 codes) and the mask, a bool array [height, width] of
    the original image (True inside)."""

    box: Box
    mask: np.ndarray = field(repr=False, compare=False)

    @property
    def label(self) -> str:
        return self.box.label

    def as_json(self) -> dict:
        """The box's JSON, the mask's pixel count and the mask as COCO's uncompressed RLE
        ({"size": [height, width], "counts": [...]}: run lengths down the columns, zeros first),
        which pycocotools and most annotation tools read."""
        return {**self.box.as_json(), "area": int(self.mask.sum()), "rle": rle_encode(self.mask)}


def paste_mask(logits: np.ndarray, box: Box, width: int, height: int) -> np.ndarray:
    """The decoder's [64, 64] logits over `box` as a bool mask of the whole `width` x `height` image:
    resized (bilinear) to the box's whole pixels (int of its corners, as big_vision's evaluator
    takes them), True where over 0. A box under one pixel wide or high gives an empty mask."""
    full = np.zeros((height, width), dtype=bool)
    left, top = min(int(box.x0), width), min(int(box.y0), height)
    right, bottom = min(int(box.x1), width), min(int(box.y1), height)
    if right <= left or bottom <= top:
        return full
    size = (right - left, bottom - top)
    resized = Image.fromarray(np.asarray(logits, dtype=np.float32)).resize(size, Image.Resampling.BILINEAR)
    full[top:bottom, left:right] = np.asarray(resized) > 0
    return full


def rle_encode(mask: np.ndarray) -> dict:
    """COCO's uncompressed RLE of a bool [height, width] mask: alternating run lengths of False and
    True in column-major order, starting with False (0 when the first pixel is True)."""
    flat = np.asarray(mask, dtype=bool).ravel(order="F")
    changes = np.flatnonzero(flat[1:] != flat[:-1]) + 1
    edges = np.concatenate([[0], changes, [flat.size]])
    counts = np.diff(edges).tolist()
    if flat.size and flat[0]:
        counts = [0, *counts]
    return {"size": list(mask.shape), "counts": counts}


def rle_decode(rle: dict) -> np.ndarray:
    """The bool mask of `rle_encode`'s output."""
    height, width = rle["size"]
    values = np.zeros(height * width, dtype=bool)
    position, inside = 0, False
    for count in rle["counts"]:
        values[position:position + count] = inside
        position, inside = position + count, not inside
    return values.reshape((height, width), order="F")


def pixel_span(start: float, end: float, size: int) -> tuple[int, int]:
    """The first and last pixel a [start, end) span covers, inside 0..size-1."""
    first = min(max(math.floor(start), 0), size - 1)
    return first, min(max(math.ceil(end) - 1, first), size - 1)


def draw_boxes(image: Image.Image, boxes: list[Box], masks: list[Mask] = ()) -> Image.Image:
    """A copy of `image` (RGB) with each mask filled at MASK_OPACITY in its box's colour, then each
    box's outline and label drawn (PIL's default font), colours taken in turn from PALETTE. Lines
    are 1 pixel wide up to 320 pixels, thicker beyond."""
    drawn = image.convert("RGB")  # a copy, even of an RGB image
    for found in masks:
        index = boxes.index(found.box) if found.box in boxes else 0
        tint = Image.new("RGB", drawn.size, PALETTE[index % len(PALETTE)])
        where = Image.fromarray((found.mask * round(255 * MASK_OPACITY)).astype(np.uint8))
        drawn.paste(tint, (0, 0), where)
    draw = ImageDraw.Draw(drawn)
    font = ImageFont.load_default()
    width, height = drawn.size
    line = max(1, round(min(width, height) / 320))
    for index, box in enumerate(boxes):
        color = PALETTE[index % len(PALETTE)]
        left, right = pixel_span(box.x0, box.x1, width)
        top, bottom = pixel_span(box.y0, box.y1, height)
        draw.rectangle((left, top, right, bottom), outline=color, width=line)
        if box.label:
            text_left, text_top, text_right, text_bottom = draw.textbbox((0, 0), box.label, font=font)
            size_x, size_y = text_right - text_left + 2, text_bottom - text_top + 2
            y = top - size_y if top >= size_y else top  # above the box when there is room, else inside it
            x = min(left, max(width - size_x, 0))
            draw.rectangle((x, y, x + size_x - 1, y + size_y - 1), fill=color)
            ink = (0, 0, 0) if sum(color) > 380 else (255, 255, 255)
            draw.text((x + 1 - text_left, y + 1 - text_top), box.label, fill=ink, font=font)
    return drawn


def drawing_paths(target: str | Path, count: int, inputs=()) -> list[Path]:
    """Where `--draw TARGET` writes for `count` images: TARGET itself for one; for several, TARGET's
    name with -0, -1, ... before its suffix (out.png -> out-0.png, out-1.png). Checked before any
    work: a format PIL writes (from the suffix), an existing folder to write into, and no path that
    is or lies inside an input (OutputError, exit 5). An existing file there is replaced."""
    target = Path(target)
    if target.suffix.lower() not in Image.registered_extensions():
        raise OutputError(f"--draw {target}: name an image file PIL can write (.png, .jpg, ...)")
    paths = [target] if count == 1 else [target.with_name(f"{target.stem}-{i}{target.suffix}") for i in range(count)]
    for path in paths:
        for given in inputs:
            if given is not None and Path(given).exists() and path.resolve() == Path(given).resolve():
                raise OutputError(f"--draw {path} is the input {given}: name another file")
        try:
            check_inputs_apart(path, inputs)
        except OutputError as error:
            raise OutputError(f"--draw: {error}") from None
        if path.is_dir():
            raise OutputError(f"--draw {path} is a folder: name an image file")
        if not path.parent.is_dir():
            raise OutputError(f"--draw {path}: no folder {path.parent} to write it into")
    return paths


def save_drawing(image: Image.Image, path: str | Path) -> Path:
    """Save as a new file renamed onto `path`: a file there (or a hard link to another) is replaced,
    never written through."""
    path = Path(path)
    temporary = path.with_name(f".{path.name}.tmp-{os.getpid()}{path.suffix}")
    try:
        image.save(temporary, format=Image.registered_extensions()[path.suffix.lower()])
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)
    return path


def copy_parsers(folder: str | Path, kinds: tuple[str, ...] = ("js",)) -> list[Path]:
    """Copy the JavaScript ("js") and/or Swift ("swift") parser into an artifact folder as new files
    (JS_FILE, SWIFT_FILE): one hard-linked from an input artifact is replaced, never written through."""
    sources = {"js": (JS_SOURCE, JS_FILE), "swift": (SWIFT_SOURCE, SWIFT_FILE)}
    written = []
    for kind in kinds:
        source, name = sources[kind]
        target = Path(folder) / name
        temporary = target.with_name(f".{name}.tmp")
        shutil.copyfile(source, temporary)
        os.replace(temporary, target)
        written.append(target)
    return written


__all__ = ["Box", "JS_FILE", "LOC_BINS", "Mask", "SWIFT_FILE", "copy_parsers", "draw_boxes", "drawing_paths",
           "parse_detections", "paste_mask", "rle_decode", "rle_encode", "save_drawing"]
