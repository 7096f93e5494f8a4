"""The I/O contract of pgexport's artifacts, declared once: graph and package names, their file
names per precision, and every input and output with its dims. The exporter, the runtime, bench,
the quantizers, calibration and the Core ML checks read it; no other module spells a graph or
tensor name. Torch-free, so a runtime that only has onnxruntime can import it.

    onnx/vision_encoder{suffix}.onnx        pixel_values -> image_features (projector included)
    onnx/embed_tokens{suffix}.onnx          input_ids -> inputs_embeds
    onnx/decoder_model_merged{suffix}.onnx  inputs_embeds, attention_mask, position_ids,
                                            past_key_values.{i}.key/value [, logits_to_keep]
                                            -> logits, present.{i}.key/value

The layout Optimum and transformers.js consume (paligemma-facts.md); `suffix` is transformers.js's
per-precision file-name suffix. `logits_to_keep` (int64 scalar, transformers' argument of that name)
is an overridable initializer: consumers that do not feed it get logits for every position.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

# transformers.js file-name suffix of each precision (see paligemma-facts.md).
DTYPE_SUFFIX = {"fp32": "", "fp16": "_fp16", "int8": "_int8", "int8-static": "_int8_static", "q4": "_q4"}
PAST, PRESENT = "past_key_values", "present"  # cache tensors: {PAST}.{layer}.key / .value
KV_KINDS = ("key", "value")
LOGITS_TO_KEEP = "logits_to_keep"
# The tensors code feeds or reads by name (the processor's keys for the first three are the same).
PIXEL_VALUES, INPUT_IDS, ATTENTION_MASK = "pixel_values", "input_ids", "attention_mask"
IMAGE_FEATURES, INPUTS_EMBEDS, POSITION_IDS, LOGITS = "image_features", "inputs_embeds", "position_ids", "logits"
# The dims that vary between calls (the exported graphs' dynamic axes); every other named dim is
# fixed by the model's config (hidden_size, vocab_size, image_tokens, the image's height and width).
DYNAMIC_DIMS = ("batch_size", "sequence_length", "total_sequence_length", "past_sequence_length", "logits_length")


@dataclass(frozen=True)
class Tensor:
    """One input or output: its name, dims (a str is a symbolic axis, an int a fixed size) and type."""

    name: str
    dims: tuple[str | int, ...]
    dtype: str = "float32"
    doc: str = ""


@dataclass(frozen=True)
class GraphSpec:
    """One ONNX graph: `name` is the file stem, `option` the CLI/recipe key that sets its precision.
    `inputs`/`outputs` leave out the per-layer cache tensors, which `input_names(layers)` adds."""

    name: str
    option: str
    inputs: tuple[Tensor, ...]
    outputs: tuple[Tensor, ...]
    cache: bool = False  # past_key_values in, present out, one key and one value per layer
    optional_inputs: tuple[Tensor, ...] = ()  # initializers a caller may override (logits_to_keep)

    def filename(self, precision: str = "fp32") -> str:
        return f"{self.name}{DTYPE_SUFFIX[precision]}.onnx"

    def input_names(self, layers: int = 0) -> list[str]:
        return [t.name for t in self.inputs] + (kv_names(PAST, layers) if self.cache else [])

    def output_names(self, layers: int = 0) -> list[str]:
        return [t.name for t in self.outputs] + (kv_names(PRESENT, layers) if self.cache else [])

    def dynamic_axes(self, layers: int = 0) -> dict[str, dict[int, str]]:
        """name -> {axis: name} of every dynamic dim (DYNAMIC_DIMS), cache tensors included."""
        axes = {t.name: {i: d for i, d in enumerate(t.dims) if d in DYNAMIC_DIMS} for t in (*self.inputs, *self.outputs)}
        axes.update({name: {0: "batch_size", 2: "past_sequence_length"} for name in kv_names(PAST, layers)})
        axes.update({name: {0: "batch_size", 2: "total_sequence_length"} for name in kv_names(PRESENT, layers)})
        return {name: dims for name, dims in axes.items() if dims}


def kv_names(prefix: str, layers: int) -> list[str]:
    """past_key_values.{i}.key/value or present.{i}.key/value, in layer order."""
    return [f"{prefix}.{i}.{kind}" for i in range(layers) for kind in KV_KINDS]


VISION = GraphSpec(
    "vision_encoder", "vision",
    inputs=(Tensor(PIXEL_VALUES, ("batch_size", 3, "height", "width"), doc="SigLIP-normalized RGB"),),
    outputs=(Tensor(IMAGE_FEATURES, ("batch_size", "image_tokens", "hidden_size"), doc="projected, unscaled"),),
)
EMBED = GraphSpec(
    "embed_tokens", "embed",
    inputs=(Tensor(INPUT_IDS, ("batch_size", "sequence_length"), "int64"),),
    outputs=(Tensor(INPUTS_EMBEDS, ("batch_size", "sequence_length", "hidden_size"), doc="scaled by sqrt(hidden)"),),
)
DECODER = GraphSpec(
    "decoder_model_merged", "decoder",
    inputs=(
        Tensor(INPUTS_EMBEDS, ("batch_size", "sequence_length", "hidden_size")),
        Tensor(ATTENTION_MASK, ("batch_size", "total_sequence_length"), "int64"),
        Tensor(POSITION_IDS, ("batch_size", "sequence_length"), "int64", doc="1-based"),
    ),
    outputs=(Tensor(LOGITS, ("batch_size", "logits_length", "vocab_size"), doc="sequence_length, or logits_to_keep"),),
    cache=True,
    optional_inputs=(Tensor(LOGITS_TO_KEEP, (), "int64", doc="0: every position"),),
)
GRAPHS = (VISION, EMBED, DECODER)
GRAPH_NAMES = tuple(spec.name for spec in GRAPHS)
BY_OPTION = {spec.option: spec for spec in GRAPHS}  # CLI / recipe key -> graph

# PaliGemma's segmentation decoder (big_vision's VQ-VAE decoder; pgexport.exporters.seg_decoder): a
# `segment` answer's 16 <segNNN> codes -> mask logits over the box, > 0 inside. A fourth graph, written
# when the export is given the decoder's weights (--seg-decoder vae-oid.npz); fp32 in every variant
# (about 1M weights), so not one of GRAPHS.
SEG_CODES, SEG_MASK_SIZE = 16, 64
CODES, MASK_LOGITS = "codes", "mask_logits"
SEG_DECODER = GraphSpec(
    "seg_decoder", "seg_decoder",
    inputs=(Tensor(CODES, ("batch_size", SEG_CODES), "int64", doc="the answer's <segNNN> numbers, in order"),),
    outputs=(Tensor(MASK_LOGITS, ("batch_size", SEG_MASK_SIZE, SEG_MASK_SIZE), doc="over the box; > 0 inside the mask"),),
)


# File formats of a graph: ONNX, and (with --ort-format) ONNX Runtime's flatbuffer format, which
# reduced-size builds (ONNX Runtime Mobile) load: onnx/<graph><suffix>.ort beside each .onnx, plus
# the operators every .ort graph uses, the input of a reduced-operator build (pgexport.exporters.ort_format).
GRAPH_FORMATS = ("onnx", "ort")
ORT_OPERATORS_CONFIG = "onnx/required_operators.config"


def graph_path(folder: str | Path, graph: str, precision: str = "fp32", graph_format: str = "onnx") -> Path:
    """Where an artifact keeps `graph` (a name in GRAPH_NAMES) at `precision`, in `graph_format`."""
    return Path(folder) / "onnx" / f"{graph}{DTYPE_SUFFIX[precision]}.{graph_format}"


# ---- Core ML packages: one-image, stateful decoder (pgexport.coreml) ----
# The decoder's varying dims, each from 1 up to the size of another dim: query length and cache end
# up to the cache's max_context, image rows up to image_tokens (prefill; decoding passes one row).
# Every other named dim is fixed by the model and the conversion's options.
COREML_RANGE_DIMS = {"query_length": "max_context", "cache_end": "max_context", "image_rows": "image_tokens"}


@dataclass(frozen=True)
class PackageSpec:
    """One Core ML package: inputs, outputs and states, with the docs the manifest carries."""

    name: str
    short: str
    inputs: tuple[Tensor, ...]
    outputs: tuple[Tensor, ...]
    states: tuple[Tensor, ...] = ()
    compressed: bool = True  # --compress applies to its weights (else fp16 whatever --compress)

    @property
    def filename(self) -> str:
        return f"{self.name}.mlpackage"

    def describe(self) -> dict:
        """The contract as the package's metadata, manifest.json and the package README show it."""
        entry = {"short": self.short, "inputs": {t.name: t.doc for t in self.inputs}, "outputs": {t.name: t.doc for t in self.outputs}}
        return entry


IMAGE = "image"  # the Core ML vision encoder's input: a camera frame (ImageType), not pixel values
KEY_CACHE, VALUE_CACHE = "key_cache", "value_cache"  # the Core ML decoder's states: every layer's cache
COREML_VISION = PackageSpec(
    "vision_encoder",
    "PaliGemma image encoder (SigLIP + projector): camera frame -> features for the <image> slots.",
    inputs=(Tensor(IMAGE, (1, 3, "image_size", "image_size"), "image",
                   doc="RGB frame resized to the model's square size; SigLIP normalisation is applied inside."),),
    outputs=(Tensor(IMAGE_FEATURES, (1, "image_tokens", "hidden_size"), "float16",
                    doc="[1, image tokens, hidden]: pass to the decoder at prefill (unscaled, in order)."),),
)
COREML_DECODER = PackageSpec(
    "decoder",
    "PaliGemma decoder (Gemma) with its KV cache as Core ML state: prefill and decode in one function.",
    inputs=(
        Tensor(INPUT_IDS, (1, "query_length"), "int32",
               doc="[1, q] int32 token ids of this call (the prompt at prefill, the last token when decoding)."),
        Tensor(IMAGE_FEATURES, (1, "image_rows", "hidden_size"), "float16",
               doc="[1, n, hidden] the vision encoder's output at prefill; any one row when decoding."),
        Tensor(ATTENTION_MASK, (1, 1, "query_length", "cache_end"), "float16",
               doc="[1, 1, q, end] additive: 0 attend, -1e4 blocked; end = tokens in the cache after this call."),
    ),
    outputs=(Tensor(LOGITS, (1, 1, "vocab_size"), "float16", doc="[1, 1, vocab] next-token logits of the last query position."),),
    states=(
        Tensor(KEY_CACHE, ("layers", 1, "kv_heads", "max_context", "head_dim"), "float16"),
        Tensor(VALUE_CACHE, ("layers", 1, "kv_heads", "max_context", "head_dim"), "float16"),
    ),
)
COREML_SEG_DECODER = PackageSpec(
    "seg_decoder",
    "PaliGemma segmentation decoder (VQ-VAE): a segment answer's 16 <segNNN> codes -> 64 x 64 mask logits over its box.",
    inputs=(Tensor(CODES, (1, SEG_CODES), "int32", doc="[1, 16] int32: the numbers of the answer's 16 <segNNN> tokens, in order."),),
    outputs=(Tensor(MASK_LOGITS, (1, SEG_MASK_SIZE, SEG_MASK_SIZE), "float32",
                    doc="[1, 64, 64] mask logits over the box (rows top to bottom): resize to the box, > 0 is inside."),),
    compressed=False,
)
PACKAGES = (COREML_VISION, COREML_DECODER)
