"""Generate with an exported artifact on ONNX Runtime: processor -> vision -> features into the
`<image>` slots -> decoder loop with a KV cache. Greedy, batched, left-padded."""

from __future__ import annotations

import json
import logging
import warnings
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Callable

import numpy as np
from PIL import Image

from pgexport.contract import (
    ATTENTION_MASK,
    DECODER,
    DTYPE_SUFFIX,
    EMBED,
    GRAPH_FORMATS,
    GRAPH_NAMES,
    INPUT_IDS,
    INPUTS_EMBEDS,
    LOGITS_TO_KEEP,
    PAST,
    PIXEL_VALUES,
    POSITION_IDS,
    SEG_DECODER,
    VISION,
    graph_path,
)
from pgexport.errors import BadInputError, UnsupportedError
from pgexport.manifest import MANIFEST, read_manifest, require_files
from pgexport.processor import Processor
from pgexport.sessions import Sessions, open_session
from pgexport.structured import Box, Mask, parse_detections, paste_mask

log = logging.getLogger(__name__)

# transformers' default max_position_embeddings of GemmaConfig and Gemma2Config, which a saved
# config.json omits (it writes only what differs from the default).
GEMMA_CONTEXT = 8192
_ORT_FLOAT = {"tensor(float)": np.float32, "tensor(float16)": np.float16}
# Decoded pixels an image may have, read from its header before decoding: a 12000 x 12000 PNG is a
# 17 KB file that decodes to 432 MB of RGB and more in the processor. (PIL's own bomb limit is 89M.)
MAX_IMAGE_PIXELS = 64_000_000
# Modes PIL gives 16-bit gray (a 16-bit PNG is "I;16"; older PIL and some TIFFs give "I"):
# `convert("RGB")` clips them at 255, which makes nearly every pixel white.
_GRAY16_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")


# Events of `OnnxPaliGemma.generate_ids`'s step hook, in the order they come.
STEP_START, STEP_VISION, STEP_TOKEN = "start", "vision", "token"
StepHook = Callable[[str], None]


@dataclass
class Generation:
    """One row's result: new token ids (eos included when reached), their decoded text (`<loc>` and
    `<seg>` tokens kept, other special tokens left out), the boxes of a detection answer in the
    original image's pixels (pgexport.structured; [] when the text holds none) and the masks of a
    segment answer (those boxes with 16 codes, decoded when the artifact has onnx/seg_decoder.onnx)."""

    tokens: list[int]
    text: str
    logits: list[np.ndarray] = field(default_factory=list, repr=False)
    boxes: list[Box] = field(default_factory=list)
    masks: list[Mask] = field(default_factory=list)


def to_rgb(image: Image.Image, name: str = "image") -> Image.Image:
    """An image as 8-bit RGB, refusing one over MAX_IMAGE_PIXELS before it is decoded.

    16-bit gray (value / 257, rounded) and float images (0..1 when every value is in that range,
    else 0..255: PIL's scale for "F") are scaled to 8 bits; `convert("RGB")` would clip them.
    PIL itself opens a 16-bit RGB(A) PNG as 8-bit, keeping each value's high byte.
    Transparent pixels are composited over white, as transformers' processor does.
    """
    width, height = image.size
    if width * height > MAX_IMAGE_PIXELS:
        raise BadInputError(f"{name} is {width} x {height} pixels, over the limit of {MAX_IMAGE_PIXELS // 10**6} megapixels")
    if image.mode in _GRAY16_MODES:
        image = _gray8(np.asarray(image, dtype=np.float64) / 257)
    elif image.mode == "F":
        values = np.nan_to_num(np.asarray(image, dtype=np.float64))
        image = _gray8(values * 255 if 0 <= values.min() and values.max() <= 1 else values)
    if "A" in image.getbands() or image.info.get("transparency") is not None:
        # As transformers' convert_to_rgb: transparency over white (convert("RGB") would drop alpha).
        image = Image.alpha_composite(Image.new("RGBA", image.size, (255, 255, 255, 255)), image.convert("RGBA"))
    return image.convert("RGB")


def _gray8(values: np.ndarray) -> Image.Image:
    return Image.fromarray(np.clip(np.rint(values), 0, 255).astype(np.uint8))


def open_image(path: str | Path) -> Image.Image:
    """Open an image as 8-bit RGB (see `to_rgb`), or raise BadInputError with one line when it is
    unreadable, truncated or over MAX_IMAGE_PIXELS (checked from its header, before decoding)."""
    try:
        # PIL warns from the header at 89M pixels and raises at twice that; to_rgb's limit is lower.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as image:
                return to_rgb(image, f"image {path}")
    except (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError) as error:
        raise BadInputError(f"cannot read image {path}: {error}") from error


def left_pad_positions(attention_mask: np.ndarray) -> np.ndarray:
    """PaliGemma's 1-based positions: cumsum of the mask; pads get 1 (they are never attended)."""
    positions = np.cumsum(attention_mask, axis=-1)
    return np.where(attention_mask == 0, 1, positions).astype(np.int64)


def prepare_inputs(processor, images: list[Image.Image], prompts: list[str]) -> dict[str, np.ndarray]:
    """transformers' processor output for a batch: input_ids, attention_mask (left-padded),
    pixel_values (the reference side: validate, Core ML parity; the runtime has its own)."""
    processor.tokenizer.padding_side = "left"
    images = [to_rgb(image) for image in images]
    # One "<image>" per prompt: the processor expands it to the image's tokens and adds bos and "\n".
    text = [processor.image_token + prompt for prompt in prompts]
    inputs = processor(images=images, text=text, return_tensors="np", padding="longest")
    return {key: inputs[key] for key in (INPUT_IDS, ATTENTION_MASK, PIXEL_VALUES)}


def check_graph_files(folder: Path, manifest: dict, graph_files: list[Path], sha256: bool = False) -> None:
    """Each graph file, and its external data (`<graph>.onnx.data`, any `<graph>.onnx*`), against
    manifest.json's "files": listed, present, the same size, and with `sha256` the same hash.
    A manifest without "files" is not checked."""
    files = manifest.get("files")
    if files is None:
        return
    names = set()
    for graph_file in graph_files:
        prefix = graph_file.relative_to(folder).as_posix()
        names |= {path.relative_to(folder).as_posix() for path in graph_file.parent.glob(graph_file.name + "*")}
        names |= {name for name in files if name.startswith(prefix)}
    require_files(folder, manifest, names, sha256=sha256)


class OnnxPaliGemma:
    """An artifact folder loaded into ONNX Runtime sessions.

    `dtype` picks the variant: a name the manifest maps per graph (its "variants", e.g. "q4" ->
    int8 vision, q4 decoder and table), a precision for every graph ("fp32", "int8", ...), or such
    a map itself (graph name -> precision, transformers.js's per-graph dtype). A name
    must be one of the manifest's "dtypes"; a graph with no file of its precision (the embedding
    table of an --int8 artifact, say) then runs in fp32. A map's files must all be there.

    Before any session is created, each graph file to load (and its external data) is checked
    against manifest.json: its size always, its sha256 too with `check` (reads every byte).
    A folder without manifest.json (an export's staging folder, before its manifest is written:
    calibration and fp16 conversion run its graphs) opens in fp32 only, with no file check.

    `graph_format` "ort" loads each graph's ONNX Runtime format file (onnx/<graph><suffix>.ort,
    written by --ort-format) instead of its .onnx, checked against the manifest the same way.

    The segmentation decoder (onnx/seg_decoder.onnx, written by --seg-decoder) loads with the other
    graphs when the folder has it, in the same format and checked the same way; `masks` runs it.

    `prefill_rows` > 0 runs the prompt through the decoder that many rows at a time (the KV
    caches are joined along the batch): the same outputs, with the prefill's activations held for
    those rows only (a batch of 4 at 896 px is a 16k-token prefill). Decoding stays batched.

    `low_memory` opens the sessions without a CPU arena, and without prepacked weights unless a
    graph is q4 (whose kernel computes otherwise without them; see `open_session`),
    each on first use, and closes the vision encoder's after every run: its weights and the
    decoder's are then never loaded together when the caller computes the prompt's embeddings
    first (`prefill_embeds`) and passes them to `generate_ids`, as the parity gate does. On CPU
    ONNX Runtime holds fp16 weights at fp32 size, so a 3B fp16 artifact's three sessions take
    13.8 GB (benchmarks/results/memory_3b.md).
    """

    def __init__(self, folder: str | Path, dtype: str | dict | None = None, providers: list[str] | None = None,
                 threads: int = 0, prefill_rows: int = 0, check: bool = False, graph_format: str = "onnx",
                 low_memory: bool = False):
        self.folder = Path(folder)
        if prefill_rows < 0:
            raise BadInputError(f"prefill_rows {prefill_rows}: give 0 (the whole batch) or a positive row count")
        self.prefill_rows = prefill_rows
        self.manifest = self._read_manifest(dtype)
        kind = self.manifest.get("format", "pgexport-onnx/1")
        if kind.startswith("pgexport-coreml/"):
            # Exit 7, not 4: the folder is a sound artifact; what pgexport cannot do is run Core ML
            # packages (that needs Core ML, on macOS).
            raise UnsupportedError(f"{folder} is a Core ML artifact ({kind}), which `pgexport generate` cannot run: "
                                   "run it with Core ML on macOS (see its README.md), or export ONNX with `pgexport onnx`")
        if not kind.startswith("pgexport-onnx/"):
            raise BadInputError(f"{folder}: not a pgexport ONNX artifact (its manifest.json is a {kind} one)")
        if not (self.folder / "onnx").is_dir():
            raise BadInputError(f"{folder}: not a pgexport ONNX artifact (no onnx/ folder)")
        if graph_format not in GRAPH_FORMATS:
            raise BadInputError(f"unknown graph format {graph_format!r}: choose from {', '.join(GRAPH_FORMATS)}")
        self.graph_format = graph_format
        self.dtype, self.graph_dtypes, paths = self._graph_files(dtype)
        seg_path = graph_path(self.folder, SEG_DECODER.name, "fp32", graph_format)
        if graph_path(self.folder, SEG_DECODER.name).is_file() or seg_path.is_file():
            if not seg_path.is_file():
                raise BadInputError(f"{self.folder}: missing {seg_path.relative_to(self.folder)}")
            paths[SEG_DECODER.name] = seg_path
        check_graph_files(self.folder, self.manifest, list(paths.values()), sha256=check)
        self.config = json.loads((self.folder / "config.json").read_text())
        self.processor = Processor(self.folder)
        self.image_token_id = self.config.get("image_token_index", self.processor.image_token_id)
        # Positions the decoder has: config.json leaves out what equals the Gemma / Gemma2 default.
        self.context = self.config.get("text_config", {}).get("max_position_embeddings", GEMMA_CONTEXT)
        self.eos_token_id = self.processor.eos_token_id
        self.pad_token_id = self.processor.pad_token_id
        self.low_memory = low_memory
        # The decoder opens first: the transient of its prepacking (the LM head's packed copy beside
        # its mapped original, 2.1 GB at 3B) then comes before the other graphs are loaded. Vision
        # and token table first, the 3B fp32 bench peaked at 14.17 GB (benchmarks/results/memory_3b.md).
        paths = dict(sorted(paths.items(), key=lambda item: item[0] != DECODER.name))
        # q4 graphs keep their packed weights even in low memory (see open_session). The function
        # must not hold `self`: the cycle would keep a gate's sessions alive into the next hop.
        q4 = {graph for graph, precision in self.graph_dtypes.items() if precision == "q4"}
        self.sessions = Sessions(paths, lambda graph, path: open_session(
            path, threads, providers, low_memory, prepack=not low_memory or graph in q4), eager=not low_memory)

    @cached_property
    def past_inputs(self) -> list:
        return [i for i in self.sessions[DECODER.name].get_inputs() if i.name.startswith(f"{PAST}.")]

    @cached_property
    def float_type(self) -> type:
        """The decoder's float type: its embeddings and KV cache."""
        return _ORT_FLOAT[self.sessions[DECODER.name].get_inputs()[0].type]

    @cached_property
    def pixel_type(self) -> type:
        return _ORT_FLOAT[self.sessions[VISION.name].get_inputs()[0].type]

    def _read_manifest(self, dtype: str | dict | None) -> dict:
        """manifest.json, or {} for a folder of fp32 graphs without one (only `dtype` fp32 then)."""
        if (self.folder / MANIFEST).is_file():
            return read_manifest(self.folder)
        if not (self.folder / "onnx").is_dir():
            raise BadInputError(f"{self.folder}: not a pgexport ONNX artifact (no {MANIFEST})")
        if dtype not in (None, "fp32"):
            raise BadInputError(f"{self.folder} has no {MANIFEST}: only its fp32 graphs can run, not {dtype!r}")
        return {}

    def _graph_files(self, dtype: str | dict | None) -> tuple[str, dict[str, str], dict[str, Path]]:
        """(dtype's name, graph -> precision, graph -> file) for what `dtype` loads."""
        dtype = dtype or self.manifest.get("default_dtype", "fp32")
        dtypes, variants = self.manifest.get("dtypes", ["fp32"]), self.manifest.get("variants", {})
        if isinstance(dtype, str) and dtype not in dtypes:
            raise BadInputError(f"{self.folder} has no {dtype} graphs: its dtypes are {', '.join(dtypes)}")
        if isinstance(dtype, dict):
            name, graph_dtypes = "custom", dict(dtype)
        elif dtype in variants:
            name, graph_dtypes = dtype, dict(variants[dtype])
        else:
            name, graph_dtypes = dtype, {graph: dtype for graph in GRAPH_NAMES}
        for graph, precision in graph_dtypes.items():
            if precision not in DTYPE_SUFFIX or graph not in GRAPH_NAMES:
                raise BadInputError(f"unknown dtype {precision!r} for {graph}: choose from {', '.join(DTYPE_SUFFIX)}")
        as_ort = self.graph_format == "ort"
        if as_ort and not any((self.folder / "onnx").glob("*.ort")):
            raise BadInputError(f"{self.folder} has no ORT format graphs (onnx/*.ort): export it with --ort-format")
        precisions, paths = {}, {}
        for graph in GRAPH_NAMES:
            precision = graph_dtypes.get(graph, "fp32")
            # A precision with no file in either format runs in fp32; one with an .onnx but no .ort is missing.
            if name != "custom" and not any(graph_path(self.folder, graph, precision, f).is_file() for f in GRAPH_FORMATS):
                precision = "fp32"
            path = graph_path(self.folder, graph, precision, self.graph_format)
            if not path.is_file():
                hint = " (the ORT format graphs are written by --ort-format)" if as_ort else ""
                raise BadInputError(f"{self.folder}: missing {path.relative_to(self.folder)}{hint}")
            precisions[graph], paths[graph] = precision, path
        return name, precisions, paths

    @property
    def has_seg_decoder(self) -> bool:
        return SEG_DECODER.name in self.sessions.paths

    def masks(self, boxes: list[Box], width: int, height: int) -> list[Mask]:
        """The masks of the boxes that carry 16 codes, in the original `width` x `height` image
        (pgexport.structured.paste_mask); [] when none does or the artifact has no seg decoder."""
        coded = [box for box in boxes if box.codes]
        if not coded or not self.has_seg_decoder:
            return []
        codes = np.array([box.codes for box in coded], dtype=np.int64)
        logits = self.sessions[SEG_DECODER.name].run(None, {SEG_DECODER.inputs[0].name: codes})[0]
        return [Mask(box, paste_mask(grid, box, width, height)) for box, grid in zip(coded, logits)]

    def preprocess(self, images: list[Image.Image], prompts: list[str]) -> dict[str, np.ndarray]:
        """input_ids, attention_mask (left-padded) and pixel_values, as PaliGemmaProcessor makes them
        (pgexport.processor, without torch or transformers)."""
        return self.processor([to_rgb(image) for image in images], prompts)

    def prefill_embeds(self, input_ids: np.ndarray, pixel_values: np.ndarray, on_step: StepHook | None = None) -> np.ndarray:
        """Token embeddings with the image features written into the `<image>` slots. `on_step`
        (see `generate_ids`) hears STEP_START before the vision encoder and STEP_VISION after it."""
        if on_step:
            on_step(STEP_START)
        features = self.sessions[VISION.name].run(None, {PIXEL_VALUES: pixel_values.astype(self.pixel_type)})[0]
        if self.low_memory:
            self.sessions.release(VISION.name)
        if on_step:
            on_step(STEP_VISION)
        slots = input_ids == self.image_token_id
        embeds = self.sessions[EMBED.name].run(None, {INPUT_IDS: np.where(slots, 0, input_ids)})[0]
        if slots.sum() != features.shape[0] * features.shape[1]:
            raise BadInputError(f"{slots.sum()} <image> tokens for {features.shape[0]} x {features.shape[1]} image features")
        embeds[slots] = features.reshape(-1, features.shape[-1]).astype(embeds.dtype)
        return embeds

    def prefill_feed(self, input_ids: np.ndarray, attention_mask: np.ndarray, pixel_values: np.ndarray,
                     on_step: StepHook | None = None, embeds: np.ndarray | None = None) -> dict:
        """The decoder's inputs for the prompt: embeddings with image features, mask, 1-based
        positions and an empty past. `embeds`: the prompt's `prefill_embeds`, computed already
        (the vision encoder then does not run)."""
        if embeds is None:
            embeds = self.prefill_embeds(input_ids, pixel_values, on_step)
        elif on_step:
            on_step(STEP_START)
            on_step(STEP_VISION)
        mask = attention_mask.astype(np.int64)
        past = {
            i.name: np.zeros((input_ids.shape[0], i.shape[1], 0, i.shape[3]), dtype=self.float_type)
            for i in self.past_inputs
        }
        return {INPUTS_EMBEDS: embeds.astype(self.float_type), ATTENTION_MASK: mask,
                POSITION_IDS: left_pad_positions(mask), **past}

    def run_prefill(self, feed: dict) -> list[np.ndarray]:
        """The decoder on a prompt feed (empty past), `prefill_rows` rows per call."""
        decoder = self.sessions[DECODER.name]
        batch = feed[INPUTS_EMBEDS].shape[0]
        rows = self.prefill_rows or batch
        if rows >= batch:
            return decoder.run(None, feed)
        parts = [decoder.run(None, {k: v[start:start + rows] if v.ndim else v for k, v in feed.items()})
                 for start in range(0, batch, rows)]
        return [np.concatenate(outputs, axis=0) for outputs in zip(*parts)]

    def new_token_budget(self, prompt_tokens: int, max_new_tokens: int) -> int:
        """How many tokens to generate after a prompt of `prompt_tokens` (image tokens included):
        `max_new_tokens`, capped so that prompt and answer fit the context."""
        if max_new_tokens < 1:
            raise BadInputError(f"max_new_tokens {max_new_tokens}: give a positive number")
        room = self.context - prompt_tokens
        if room < 1:
            raise BadInputError(f"the prompt is {prompt_tokens} tokens (image tokens included), which leaves no room in "
                                f"the model's context of {self.context}: shorten it")
        if max_new_tokens > room:
            log.warning(f"max_new_tokens {max_new_tokens} capped to {room}: the {prompt_tokens}-token prompt "
                        f"leaves that many of the model's {self.context}-token context")
        return min(max_new_tokens, room)

    def generate_ids(
        self,
        input_ids: np.ndarray,
        attention_mask: np.ndarray,
        pixel_values: np.ndarray,
        max_new_tokens: int = 32,
        stop_at_eos: bool = True,
        forced_tokens: np.ndarray | None = None,
        keep_logits: bool = False,
        on_step: StepHook | None = None,
        embeds: np.ndarray | None = None,
    ) -> tuple[np.ndarray, list[np.ndarray]]:
        """Greedy decoding. Returns new tokens [batch, steps] (pad after a row's eos) and, when
        `keep_logits`, the last-position logits of every step. `forced_tokens` [batch, steps] feeds
        given tokens instead of the argmax (to compare logits along a reference's path).

        `on_step(event)` hears the loop's progress, so a caller can time it (pgexport.bench does):
        STEP_START before the vision encoder, STEP_VISION once the image features are out, and
        STEP_TOKEN each time a token is chosen, the prefill's first, then one per decode step.

        A prompt that fills the model's context (`self.context` positions) is refused before
        anything runs; `max_new_tokens` is capped to the positions the prompt leaves, with a
        logged warning.

        `embeds`: the prompt's `prefill_embeds`, computed already (see `prefill_feed`)."""
        if forced_tokens is None:
            max_new_tokens = self.new_token_budget(input_ids.shape[1], max_new_tokens)
        batch = input_ids.shape[0]
        decoder = self.sessions[DECODER.name]
        feed = self.prefill_feed(input_ids, attention_mask, pixel_values, on_step, embeds)
        if any(i.name == LOGITS_TO_KEEP for i in decoder.get_overridable_initializers()):
            feed[LOGITS_TO_KEEP] = np.array(1, dtype=np.int64)  # the LM head on the last prompt position only
        mask = feed[ATTENTION_MASK]
        steps = forced_tokens.shape[1] if forced_tokens is not None else max_new_tokens
        tokens, all_logits = [], []
        finished = np.zeros(batch, dtype=bool)
        for step in range(steps):
            outputs = self.run_prefill(feed) if step == 0 else decoder.run(None, feed)
            logits = outputs[0][:, -1].astype(np.float32)
            if keep_logits:
                all_logits.append(logits)
            chosen = forced_tokens[:, step] if forced_tokens is not None else logits.argmax(-1)
            if on_step:
                on_step(STEP_TOKEN)
            chosen = np.where(finished, self.pad_token_id, chosen)
            tokens.append(chosen)
            if stop_at_eos:
                finished |= chosen == self.eos_token_id
            if step == steps - 1 or finished.all():
                break
            mask = np.concatenate([mask, np.ones((batch, 1), dtype=np.int64)], axis=1)
            embeds = self.sessions[EMBED.name].run(None, {INPUT_IDS: chosen[:, None].astype(np.int64)})[0]
            feed = {
                INPUTS_EMBEDS: embeds.astype(self.float_type),
                ATTENTION_MASK: mask,
                POSITION_IDS: mask.sum(-1, keepdims=True).astype(np.int64),
                **{i.name: value for i, value in zip(self.past_inputs, outputs[1:])},
            }
        return np.stack(tokens, axis=1), all_logits

    def generate(self, images: list[Image.Image], prompts: list[str], max_new_tokens: int = 32) -> list[Generation]:
        """Answer each (image, prompt) pair; stops at eos or after `max_new_tokens`."""
        if len(images) != len(prompts):
            raise BadInputError(f"{len(images)} images for {len(prompts)} prompts")
        inputs = self.preprocess(images, prompts)
        new_tokens, _ = self.generate_ids(**inputs, max_new_tokens=max_new_tokens)
        results = []
        for row, (width, height) in zip(new_tokens.tolist(), [image.size for image in images]):
            if self.eos_token_id in row:
                row = row[: row.index(self.eos_token_id) + 1]
            text = self.processor.decode_answer(row).strip()
            boxes = parse_detections(text, width, height)
            results.append(Generation(tokens=row, text=text, boxes=boxes, masks=self.masks(boxes, width, height)))
        return results
