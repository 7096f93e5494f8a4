"""Every stage's options, declared once: one dataclass per stage, with each option's default,
help text, allowed values and range in its field. The CLI (`cli_options` makes a command's click
options from it), the Python API (`export_onnx(model, out, int8=True)` builds an ExportConfig from
its keywords) and recipes (`{stage: onnx, int8: true}` is a serialized ExportConfig) all read these;
a default lives here and nowhere else (tests/test_stage_options.py checks the three agree).

Options of one invocation rather than of the stage (the output folder, `force`, `allow_pickle`,
`--json`, progress) stay parameters of the functions and commands.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

from pgexport.errors import BadInputError, UnsupportedError

COMPRESSIONS = ("none", "int8", "int4", "palettize4")  # Core ML weights
TARGETS = ("iOS18", "macOS15", "iOS17")
STATEFUL_TARGETS = ("iOS18", "macOS15")  # Core ML state (ct.StateType) starts with iOS18 / macOS15
MIN_OPSET, MAX_OPSET, DEFAULT_OPSET = 18, 23, 18  # what the exporter supports (pgexport.exporters.onnx)

PRECISIONS = ("fp32", "fp16", "int8", "int8-static", "q4")  # a variant is named after its last
EMBED_PRECISIONS = ("fp32", "fp16", "int8", "q4")  # a Gather: nothing to calibrate
# What a whole-artifact method means per graph (by its option name, contract.GraphSpec.option). int8,
# q4 and fp16 take every graph: int8's 8-bit token table (GatherBlockQuantized) is the package a user
# ships (0.26x fp32 at 3B, every answer kept; transformers.js loads it token for token), and
# `--embed fp32` keeps the fp32 table (the --int8 of earlier releases). int8-static leaves the table
# in fp32: a Gather has nothing to calibrate.
METHODS = {
    "int8": {"vision": "int8", "embed": "int8", "decoder": "int8"},
    "int8-static": {"vision": "int8-static", "decoder": "int8-static"},
    "q4": {"vision": "q4", "embed": "q4", "decoder": "q4"},
    "fp16": {"vision": "fp16", "embed": "fp16", "decoder": "fp16"},
}
INT4_METHODS = ("rtn", "hqq")


def check_opset(opset) -> int:
    """The opset, if the exporter supports it; UnsupportedError (exit 7) otherwise."""
    if not isinstance(opset, int) or isinstance(opset, bool) or not MIN_OPSET <= opset <= MAX_OPSET:
        raise UnsupportedError(f"opset {opset} is not supported: choose {MIN_OPSET}..{MAX_OPSET}")
    return opset


# Options that name a file a stage reads (a checkpoint for `reference`): inputs the output must keep
# apart from, and what a build's cache key hashes.
INPUT_OPTIONS = ("eval_file", "calibration", "train", "reference", "seg_decoder")


def option(default, help: str, *, choices=None, bounds=None, flag: str | None = None, comma: bool = False,
           cli: bool = True, power_of_two: bool = False):
    """A config field: `bounds` (least, most) inclusive, either may be None; `flag` the CLI spelling
    when it is not --field-name; `comma` a list given as one comma-separated CLI value (a repeated
    option otherwise); `cli=False` for options only Python and recipes set; `power_of_two` for an
    int that must be one (checked with the bounds: the CLI refuses both alike)."""
    metadata = {"help": help, "choices": choices, "bounds": bounds, "flag": flag, "comma": comma, "cli": cli,
                "power_of_two": power_of_two}
    return field(default=default, metadata=metadata)


def check(config) -> None:
    """Every set field within its choices and bounds; raises BadInputError naming the option."""
    for f in dataclasses.fields(config):
        value, meta = getattr(config, f.name), f.metadata
        values = value if isinstance(value, (tuple, list)) else (value,)
        for item in values:
            if item is None:
                continue
            if meta.get("choices") and item not in meta["choices"]:
                raise BadInputError(f"unknown {f.name.replace('_', ' ')} {item!r}: choose from {', '.join(map(str, meta['choices']))}")
            if meta.get("bounds") and not in_bounds(item, meta["bounds"]):
                raise BadInputError(f"{f.name.replace('_', ' ')} {item!r} is out of range {shown_bounds(meta['bounds'])}")
            if meta.get("power_of_two") and not is_power_of_two(item):
                raise BadInputError(f"{f.name.replace('_', ' ')} {item!r}: must be a power of two")


def is_power_of_two(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0 and not value & (value - 1)


def in_bounds(value, bounds) -> bool:
    """A number (not a bool, not NaN) within (least, most), inclusive; None ends are open."""
    least, most = bounds
    if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value):
        return False
    return (least is None or value >= least) and (most is None or value <= most)


def shown_bounds(bounds) -> str:
    least, most = bounds
    return f"{'' if least is None else f'{least:g}'}..{'' if most is None else f'{most:g}'}"


def make(cls, config=None, **options):
    """`config`, or a `cls` from keyword options (a TypeError names an unknown one), checked."""
    if config is None:
        config = cls(**options)
    elif options:
        config = dataclasses.replace(config, **options)
    if not isinstance(config, cls):
        raise TypeError(f"expected a {cls.__name__}, got {type(config).__name__}")
    check(config)
    return config


def options_of(config) -> dict:
    """The options as a plain dict (lists for tuples; fields a stage fills in itself left out):
    what manifests and recipes record."""
    return {f.name: list(value) if isinstance(value := getattr(config, f.name), tuple) else value
            for f in dataclasses.fields(config) if not f.metadata.get("internal")}


def option_fields(cls) -> list[dataclasses.Field]:
    """The options of a config class, in the order --help and errors list them: its own fields
    first, then inherited ones (fields a stage fills in itself left out)."""
    own = list(cls.__dict__.get("__annotations__", {}))
    fields = [f for f in dataclasses.fields(cls) if not f.metadata.get("internal")]
    return sorted(fields, key=lambda f: (f.name not in own, own.index(f.name) if f.name in own else 0))


# ---- the stages ----

def methods_of(config) -> list[str]:
    """The whole-artifact methods an ExportConfig (its --int8/--int4/--fp16 flags) or a QuantizeConfig
    (its `methods` field) asks for."""
    return config.methods() if callable(config.methods) else list(config.methods)


def check_used(config) -> None:
    """Refuse an option the request would ignore: calibration and an accuracy target are read by
    int8-static only, an eval file by the parity gate only (BadInputError, exit 4)."""
    precisions = ({p for m in methods_of(config) for p in METHODS.get(m, {}).values()}
                  | set(filter(None, config.graphs().values())))
    static = "int8-static" in precisions
    for name, value, flag in (("calibration", config.calibration, "--calibration"),
                              ("accuracy_target", config.accuracy_target, "--accuracy-target")):
        if value is not None and not static:
            raise BadInputError(f"{flag} is read by int8-static only, which this request does not make: "
                                "add --method int8-static (or --vision/--decoder int8-static), or drop it")
    if config.eval_file is not None and not config.validate:
        raise BadInputError("--eval-file feeds the parity gate, which --no-validate turns off: drop one of them")


@dataclass(frozen=True)
class GraphPrecisions:
    """One precision per graph on top of the whole-artifact methods (or alone: one mixed variant)."""

    vision: str | None = option(None, "vision_encoder precision (overrides the method's).", choices=PRECISIONS)
    decoder: str | None = option(None, "decoder_model_merged precision.", choices=PRECISIONS)
    embed: str | None = option(None, "embed_tokens (the token table) precision: int8 / q4 = GatherBlockQuantized 8 / 4-bit.",
                               choices=EMBED_PRECISIONS)

    def graphs(self) -> dict[str, str | None]:
        return {"vision": self.vision, "decoder": self.decoder, "embed": self.embed}


@dataclass(frozen=True)
class QuantizeOptions:
    """How graphs are quantized (recorded in the manifest)."""

    int4_method: str = option("rtn", "q4 MatMulNBits weights: round to nearest, or HQQ (error-fitted zero points).",
                              choices=INT4_METHODS)
    block_size: int = option(32, "q4 / embedding block size (power of two, >= 16).", bounds=(16, 1 << 16), power_of_two=True)
    # 4: int8 compute, onnxruntime's fast CPU path (benchmarks/results/bench_3b-q4acc4_cpu.md); the demo's answers are unchanged.
    accuracy_level: int | None = option(4, "q4 MatMulNBits accuracy_level (4: int8 compute, fastest on CPU; 0: the input's type).",
                                        bounds=(0, 4))
    calibration: str | None = option(None, "int8-static: folder of images or JSONL of {image, prefix} (default: demo samples).")
    accuracy_target: float | None = option(None, "int8-static: tune until this share of fp32's token agreement holds (e.g. 0.99).",
                                           bounds=(1e-9, 1))
    optimize: bool = option(False, "Fuse norms and GELU (onnxruntime transformer fusions) before quantizing, parity-checked.")

    def __post_init__(self):
        check(self)  # choices, bounds and powers of two, however the config is made

    def quantize_options(self) -> QuantizeOptions:
        """Only the how-to-quantize fields (what the manifest records under `quantize`)."""
        return QuantizeOptions(**{f.name: getattr(self, f.name) for f in dataclasses.fields(QuantizeOptions)})


@dataclass(frozen=True)
class ExportConfig(QuantizeOptions, GraphPrecisions):
    """`pgexport onnx` / `export_onnx`: checkpoint -> ONNX artifact (fp32, plus any quantized variants)."""

    int8: bool = option(False, "Also write an int8 variant: dynamic int8 vision and decoder graphs (onnxruntime) and an "
                               "8-bit token table (--embed fp32 keeps it fp32), validated too.")
    int4: bool = option(False, "Also write a q4 variant: 4-bit MatMulNBits graphs and a 4-bit token table, validated too.")
    fp16: bool = option(False, "Also write an fp16 variant (fp32 islands where Gemma overflows), validated too.")
    opset: int = option(DEFAULT_OPSET, f"ONNX opset ({MIN_OPSET}..{MAX_OPSET}).")
    validate: bool = option(True, "Run the parity gate against PyTorch.")
    eval_file: str | None = option(None, "JSONL of held-out rows for the exact-match check.")
    ort_format: bool = option(False, "Also write every graph in the ORT format (onnx/*.ort, for ONNX Runtime Mobile) and "
                                     "onnx/required_operators.config (the ops a reduced build needs).")
    seg_decoder: str | None = option(None, "PaliGemma's segmentation decoder weights (big_vision's vae-oid.npz): also write "
                                           "onnx/seg_decoder.onnx, which turns a segment answer's codes into masks.")

    def __post_init__(self):
        super().__post_init__()
        check_opset(self.opset)
        check_used(self)

    def methods(self) -> list[str]:
        return [name for name, wanted in (("int8", self.int8), ("q4", self.int4), ("fp16", self.fp16)) if wanted]


@dataclass(frozen=True)
class QuantizeConfig(QuantizeOptions, GraphPrecisions):
    """`pgexport quantize` / `quantize_artifact`: an artifact's fp32 graphs -> a new artifact with variants."""

    methods: tuple[str, ...] = option((), "Whole-artifact method; repeat for several variants. int8, q4, fp16: every graph (int8-static: vision + decoder).",
                                      choices=tuple(METHODS), flag="--method")
    reference: str | None = option(None, "Checkpoint the gate compares with (default: the manifest's source).")
    validate: bool = option(True, "Run the parity gate against PyTorch.")
    eval_file: str | None = option(None, "JSONL of held-out rows for the exact-match check.")
    ort_format: bool = option(False, "Also write every graph (the input's too) in the ORT format (onnx/*.ort, for ONNX "
                                     "Runtime Mobile) and onnx/required_operators.config.")

    def __post_init__(self):
        super().__post_init__()
        check_used(self)


@dataclass(frozen=True)
class CoremlConfig:
    """`pgexport coreml` / `to_coreml`: checkpoint -> Core ML packages."""

    compress: str = option("none", "Weights: fp16 (none), int8 per channel, int4 per block of 32, or a 4-bit k-means palette.",
                           choices=COMPRESSIONS)
    target: str = option("iOS18", "Minimum deployment target; the stateful decoder needs iOS18 or macOS15.", choices=TARGETS)
    max_context: int | None = option(None, "KV cache length in tokens (default: image tokens + 512).", bounds=(1, 1 << 20))
    validate: bool = option(True, "Check the export wrappers against transformers first.")
    seg_decoder: str | None = option(None, "PaliGemma's segmentation decoder weights (big_vision's vae-oid.npz): also write "
                                           "seg_decoder.mlpackage (fp16 whatever --compress), which turns a segment answer's codes into masks.")


@dataclass(frozen=True)
class ValidateConfig:
    """`pgexport validate` / `validate_artifact`: an artifact's parity against the PyTorch model."""

    reference: str | None = option(None, "Checkpoint to compare with (default: the manifest's source).")
    eval_file: str | None = option(None, "JSONL of held-out rows for the exact-match check.")


@dataclass(frozen=True)
class BenchConfig:
    """`pgexport bench` / `bench`: latency of artifacts and checkpoints on this machine."""

    device: str = option("cpu", "Where to run: cpu, or cuda (torch checkpoints; onnxruntime's CUDA provider when installed).",
                         choices=("cpu", "cuda"))
    dtypes: tuple[str, ...] | None = option(
        None, "Comma list (artifact: fp32,int8; checkpoint: fp32,bf16,fp16). Default: every artifact dtype; fp32 (cpu) or bf16 (cuda) for a checkpoint.",
        flag="--dtype", comma=True)
    batches: tuple[int, ...] = option((1, 4), "Comma list of batch sizes.", flag="--batch", comma=True, bounds=(1, 64))
    resolutions: tuple[int, ...] | None = option(
        None, "Comma list of px; other than a checkpoint's native size: latency-only variants (interpolated position embeddings).",
        comma=True, bounds=(14, 4096))
    prompt_tokens: int = option(10, "Text tokens after the image tokens.", bounds=(1, 4096))
    new_tokens: int = option(16, "Tokens generated per row (greedy, no eos stop).", bounds=(2, 4096))
    warmup: int = option(1, "Untimed runs per batch size.", bounds=(0, 100))
    runs: int = option(3, "Timed runs per batch size.", bounds=(1, 1000))
    threads: int | None = option(None, "CPU threads for onnxruntime and torch (default: every usable CPU).", bounds=(1, 1024))
    prefill_rows: int = option(0, "onnxruntime targets: prefill this many rows per decoder call (0: the whole batch); bounds the prefill's memory.",
                               bounds=(0, 64))
    baseline: str | None = option(None, "Target (as given) or row label the speedups are against (default: the first target).")

    def __post_init__(self):
        if self.batches is not None and len(set(self.batches)) < len(self.batches):
            raise BadInputError(f"batches: {list(self.batches)} repeats a batch size")


@dataclass(frozen=True)
class VerifyConfig:
    """`pgexport verify` / `manifest.verify`: every file against manifest.json. No options."""


def internal(default_factory):
    """A field the stage fills in itself (not an option of the CLI, the API or recipes)."""
    return field(default_factory=default_factory, metadata={"internal": True, "cli": False})


@dataclass
class DistillConfig:
    """`pgexport distill` / `distill`: teacher checkpoint -> smaller student checkpoint. Every option
    that shapes the student or its training (written into report.json, and checked on --resume)."""

    train: str | None = option(None, "Training JSONL ({image, prefix, suffix} rows). Default: the demo task, generated on the fly.")
    eval_file: str | None = option(None, "Held-out JSONL for the exact match (default for the demo teacher: its eval split).",
                                   flag="--eval")
    decoder_layers: int | None = option(None, "Student decoder layers (default: half the teacher's), from every k-th teacher layer.",
                                        bounds=(1, 1024))
    vision_layers: int | None = option(None, "Student vision layers (default: the teacher's).", bounds=(1, 1024))
    layer_map: list[int] | None = option(None, "Teacher decoder layer of each student layer, e.g. 0,3 (overrides every k-th).",
                                         comma=True, bounds=(0, 1023))
    vision_layer_map: list[int] | None = option(None, "Teacher vision layer of each student vision layer.", comma=True,
                                                bounds=(0, 1023))
    epochs: int = option(1, "Passes over the training rows.", bounds=(1, 10_000))
    lr: float = option(5e-4, "Peak learning rate (AdamW, warmup then cosine).", bounds=(0, 10))
    batch_size: int = option(32, "Rows per process per micro-batch.", bounds=(1, 65_536))
    grad_accum: int = option(1, "Micro-batches per optimizer step.", bounds=(1, 65_536))
    temperature: float = option(2.0, "Softmax temperature of the teacher (KL) term.", bounds=(1e-6, 100))
    alpha: float = option(0.5, "Weight of the teacher (KL) term; 0 trains on labels only.", bounds=(0, 1))
    hidden_weight: float = option(0.0, "Weight of the hidden-state MSE term.", bounds=(0, 1e6))
    train_rows: int = option(6400, "Generated demo-task rows per epoch (without --train).", bounds=(1, 10**8))
    warmup: float = option(0.05, "Share of the optimizer steps with a linear LR warmup (then cosine to 5%).", bounds=(0, 1),
                           flag="--warmup-share")
    seed: int = option(0, "Random seed (data order, student init, dropout).")
    save_every: int = option(0, "Checkpoint every N optimizer steps (0: each epoch's end).", bounds=(0, 10**9))
    mixed_precision: str = option("auto", "auto: bf16 on CUDA when supported, else fp32.", choices=("auto", "no", "bf16", "fp16"))
    latency_runs: int = option(5, "Timed generate runs per model for the report.", bounds=(1, 1000))
    sources: dict = internal(dict)  # filled in: teacher, train and eval sources

    def resolved_precision(self) -> str:
        if self.mixed_precision != "auto":
            return self.mixed_precision
        import torch

        return "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "no"
