"""Calibration data for static quantization: the fp32 inputs one graph of an artifact sees.

    calibration_feeds(artifact, graph, source=None, limit=32) -> [{input name: array}, ...]

`source` is a folder of images (each asked "caption en"), a JSONL file of {"image", "prefix"}
rows (image paths relative to the file; other fields ignored, so an eval split works), or None:
`limit` samples freshly drawn from the demo task (pgexport/demo/task.py) with a seed of their
own, so calibration sees neither the held-out eval split nor the training batches.

One feed per (image, prompt), batch 1, so prompts of different lengths need no padding:
- "vision_encoder": {"pixel_values"} from the artifact's processor;
- "decoder_model_merged": the prefill feed (image features in the `<image>` slots, mask,
  1-based positions, empty past) that the runtime gives the decoder, computed with the
  artifact's fp32 vision and embedding graphs (`OnnxPaliGemma.prefill_feed`).

The whole source is read and checked first: an empty folder, an unreadable image or a bad row
raises BadInputError before any graph is opened. The decoder itself is never opened here: for
the 3B shapes that would hold a 10 GB fp32 session only to read its input names.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx

from pgexport.contract import DECODER, EMBED, PAST, VISION, graph_path
from pgexport.errors import BadInputError
from pgexport.processor import Processor
from pgexport.runtime import OnnxPaliGemma, open_image
from pgexport.sessions import open_session

CALIBRATION_GRAPHS = (VISION.name, DECODER.name)
DEFAULT_PROMPT = "caption en"
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")
# The demo task's seeds: eval is -1, training steps 0, 1, 2, ...; calibration draws its own.
DEMO_CALIBRATION_SEED = -2


def calibration_feeds(
    artifact: str | Path, graph: str, source: str | Path | None = None, limit: int = 32
) -> list[dict[str, np.ndarray]]:
    """fp32 input feeds for `graph` of the artifact at `artifact`, from `source` (see the module docstring)."""
    if graph not in CALIBRATION_GRAPHS:
        raise BadInputError(f"no calibration for graph {graph!r}: choose from {', '.join(CALIBRATION_GRAPHS)}")
    if limit < 1:
        raise BadInputError(f"calibration limit must be at least 1, got {limit}")
    artifact = Path(artifact)
    # No manifest asked for: quantize calibrates on the artifact it is still staging (no manifest yet).
    if not (artifact / "config.json").is_file() or not (artifact / "onnx").is_dir():
        raise BadInputError(f"{artifact}: not a pgexport ONNX artifact (no config.json or onnx/)")
    if source is None:
        pairs = _demo_pairs(limit)
    else:
        pairs = [(open_image(image), prompt) for image, prompt in _source_rows(Path(source))[:limit]]
    runtime = PrefillFeeds(artifact, with_graphs=graph == DECODER.name)
    pixels = VISION.inputs[0].name
    feeds = []
    for image, prompt in pairs:
        inputs = runtime.preprocess([image], [prompt])
        if graph == VISION.name:
            feeds.append({pixels: inputs[pixels].astype(np.float32)})
        else:
            feeds.append(runtime.prefill_feed(**inputs))
    return feeds


def _demo_pairs(limit: int):
    from pgexport.demo import make_split

    return [(sample.open_image(), sample.prefix) for sample in make_split(limit, DEMO_CALIBRATION_SEED)]


def _source_rows(source: Path) -> list[tuple[Path, str]]:
    """(image path, prompt) rows of a folder or JSONL source; every image is checked to open."""
    from PIL import Image

    if source.is_dir():
        try:
            rows = [(p, DEFAULT_PROMPT) for p in sorted(source.iterdir()) if p.suffix.lower() in IMAGE_SUFFIXES]
        except OSError as error:
            raise BadInputError(f"cannot read calibration folder {source}: {error}") from error
        if not rows:
            raise BadInputError(f"calibration folder {source} has no images ({', '.join(IMAGE_SUFFIXES)})")
    elif source.is_file():
        rows = _jsonl_rows(source)
    else:
        raise BadInputError(f"calibration source {source}: no such file or folder")
    for path, _ in rows:
        try:
            with Image.open(path) as image:
                image.verify()
        except (OSError, ValueError, SyntaxError) as error:
            raise BadInputError(f"cannot read calibration image {path}: {error}") from error
    return rows


def _jsonl_rows(path: Path) -> list[tuple[Path, str]]:
    from pgexport.demo import jsonl_objects

    rows = []
    for number, row in jsonl_objects(path, "calibration file"):
        if not isinstance(row.get("image"), str) or not isinstance(row.get("prefix"), str):
            raise BadInputError(f'{path}:{number}: expected {{"image": str, "prefix": str}}')
        rows.append((path.parent / row["image"], row["prefix"]))
    if not rows:
        raise BadInputError(f"calibration file {path} has no rows")
    return rows


class _Input:
    """What prefill_feed reads of a decoder input: its name and shape."""

    def __init__(self, value: onnx.ValueInfoProto):
        self.name = value.name
        self.shape = [d.dim_value if d.HasField("dim_value") else d.dim_param for d in value.type.tensor_type.shape.dim]


class PrefillFeeds(OnnxPaliGemma):
    """OnnxPaliGemma's preprocessing and prefill feed without a decoder session: the processor and,
    for decoder feeds, the fp32 vision and embedding sessions; the decoder's input names and shapes
    are read from its graph without its weights."""

    low_memory = False  # its vision session stays open (no decoder is loaded beside it)

    def __init__(self, folder: Path, with_graphs: bool):
        self.folder = folder
        self.config = json.loads((folder / "config.json").read_text())
        self.processor = Processor(folder)
        self.image_token_id = self.config.get("image_token_index", self.processor.image_token_id)
        self.float_type = self.pixel_type = np.float32  # fp32 graphs
        self.sessions, self.past_inputs = {}, []
        if with_graphs:
            for graph in (VISION.name, EMBED.name):
                path = str(graph_path(folder, graph, "fp32"))
                self.sessions[graph] = open_session(path, low_memory=True)
            decoder = onnx.load(str(graph_path(folder, DECODER.name, "fp32")), load_external_data=False)
            self.past_inputs = [_Input(i) for i in decoder.graph.input if i.name.startswith(PAST + ".")]
