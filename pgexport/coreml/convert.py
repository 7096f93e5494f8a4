"""The Core ML spine: checkpoint -> vision_encoder.mlpackage + stateful decoder.mlpackage, compressed,
described, with the files an app needs beside them. Reads like its stage list (`to_coreml`)."""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import functools
import importlib
import json
import resource
import shutil
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch

import pgexport
from pgexport.config import COMPRESSIONS, STATEFUL_TARGETS, TARGETS, CoremlConfig, make
from pgexport.contract import (
    COREML_DECODER,
    COREML_RANGE_DIMS,
    COREML_SEG_DECODER,
    COREML_VISION,
    IMAGE,
    KEY_CACHE,
    PACKAGES,
    VALUE_CACHE,
    PackageSpec,
)
from pgexport.card import coreml_card, license_note, write_card
from pgexport.coreml import harmless_coremltools_logs_dropped
from pgexport.errors import BadInputError, GateFailedError, UnsupportedError, import_optional

CONTEXT_AFTER_IMAGE = 512  # default --max-context: the image tokens plus this many prompt + answer tokens
FORMAT = "pgexport-coreml/1"
NUMPY_TYPES = {"float16": np.float16, "float32": np.float32, "int32": np.int32}  # the contract's tensor dtypes
def check_request(compress: str, target: str) -> None:
    """Refuse an unknown compression or target, and a target without Core ML state, before any work."""
    if compress not in COMPRESSIONS:
        raise BadInputError(f"unknown compression {compress!r}: choose from {', '.join(COMPRESSIONS)}")
    if target not in TARGETS:
        raise BadInputError(f"unknown target {target!r}: choose from {', '.join(TARGETS)}")
    if target not in STATEFUL_TARGETS:
        raise UnsupportedError(
            f"target {target} has no Core ML state: the decoder keeps its KV cache as state, which needs "
            f"{' or '.join(STATEFUL_TARGETS)}"
        )


def check_context(config, max_context: int | None) -> int:
    """The KV cache length: room for the image tokens plus at least one prompt and one answer token,
    and no longer than the model's position table."""
    text = config.text_config
    image_tokens = text.num_image_tokens
    limit = text.max_position_embeddings
    context = max_context if max_context is not None else min(image_tokens + CONTEXT_AFTER_IMAGE, limit)
    if context > limit:
        raise BadInputError(f"--max-context {context} is longer than the model's {limit} positions")
    if context < image_tokens + 2:
        raise BadInputError(
            f"--max-context {context} leaves no room after the {image_tokens} image tokens: give at least {image_tokens + 2}"
        )
    return context


# coremltools' tqdm bars: (module, name of its tqdm there). One per op loop and per MIL pass pipeline,
# about 100 lines per package in a CI log; pgexport's stage bar already says which stage runs.
COREMLTOOLS_TQDM = (
    ("coremltools.converters.mil.frontend.torch.ops", "_tqdm"),
    ("coremltools.converters.mil.mil.passes.pass_pipeline", "tqdm"),
    ("coremltools.optimize.coreml._quantization_passes", "tqdm"),  # --compress int8 / int4
)


@contextlib.contextmanager
def quiet_coremltools():
    """coremltools' noise off for the block: its tqdm bars (COREMLTOOLS_TQDM), its known-harmless log
    lines (pgexport.coreml.HARMLESS_COREMLTOOLS_LOGS), torch's deprecation of the tracer used here,
    and two warnings torch.jit.trace provokes in transformers that do not change the trace. Anything
    else it logs or warns still shows."""
    patched = []
    with harmless_coremltools_logs_dropped(), warnings.catch_warnings():
        # The packages are converted from torch.jit.trace graphs (torch deprecates the tracer in
        # favour of torch.export); moving to torch.export is a change of its own, not news at each run.
        warnings.filterwarnings("ignore", message=r"`torch\.jit\.trace(_method)?` is deprecated", category=DeprecationWarning,
                                module=r"torch\.jit")
        # torch.jit.trace probes every attribute of each submodule (module_has_exports), reading
        # transformers' deprecated `is_gradient_checkpointing` alias on the way.
        warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning,
                                module=r"transformers\.modeling_utils")
        # SigLIP attention: `q_length > 1 and attention_mask is None and is_causal` with is_causal False
        # is False whatever the traced length, so the trace holds for every shape.
        warnings.filterwarnings("ignore", message="Converting a tensor to a Python boolean",
                                category=torch.jit.TracerWarning, module=r"transformers\.integrations\.sdpa_attention")
        try:
            for module_name, name in COREMLTOOLS_TQDM:
                with contextlib.suppress(ImportError):
                    module = importlib.import_module(module_name)
                    original = getattr(module, name, None)
                    if original is not None:  # another coremltools layout: its bars show, nothing breaks
                        setattr(module, name, functools.partial(original, disable=True))
                        patched.append((module, name, original))
            yield
        finally:
            for module, name, original in patched:
                setattr(module, name, original)


def max_rss_gb() -> float:
    """This process's peak resident memory so far (Linux reports KiB, macOS bytes)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return round(peak * (1 if sys.platform == "darwin" else 1024) / 1e9, 2)


def package_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())


def convert_vision_encoder(model, image_processor, target: str):
    """SigLIP + projector with the camera frame as input: an RGB ImageType whose scale and bias are
    the processor's rescale + normalisation, so the app hands over a resized frame as is. Traced in
    fp32 (from a copy when the model is fp16), converted to fp16 compute."""
    import coremltools as ct

    from pgexport.coreml.wrappers import VisionEncoder, pixel_normalisation

    size = model.config.vision_config.image_size
    scale, bias = pixel_normalisation(image_processor)
    vision = copy.deepcopy(VisionEncoder(model)).float().eval()
    with torch.no_grad():
        traced = torch.jit.trace(vision, torch.zeros(1, 3, size, size))
    return ct.convert(
        traced,
        inputs=[ct.ImageType(IMAGE, shape=(1, 3, size, size), scale=scale, bias=bias, color_layout=ct.colorlayout.RGB)],
        outputs=[ct.TensorType(t.name, dtype=NUMPY_TYPES[t.dtype]) for t in COREML_VISION.outputs],
        minimum_deployment_target=getattr(ct.target, target),
        compute_precision=ct.precision.FLOAT16,
        convert_to="mlprogram",
    )


def convert_decoder(model, target: str, max_context: int):
    """The stateful decoder: query length and cache end are ranges (see docs/coreml.md for why)."""
    import coremltools as ct

    from pgexport.coreml.wrappers import StatefulDecoder

    text = model.config.text_config
    image_tokens, hidden = text.num_image_tokens, text.hidden_size
    decoder = StatefulDecoder(model, max_context).eval()
    # A small example (4 new tokens after 2 cached, 2 image rows): every axis above is traced as a
    # shape, and a 3B forward pass in fp16 on CPU runs at ~10 GFLOP/s, so a full prompt would cost minutes.
    example = (
        torch.zeros(1, 4, dtype=torch.int32),
        torch.zeros(1, 2, hidden, dtype=model.dtype),
        torch.zeros(1, 1, 4, 6, dtype=model.dtype),
    )
    with torch.no_grad():
        traced = torch.jit.trace(decoder, example)
    # The contract's dims: one RangeDim per range dim (a dim two inputs share is one symbol), sizes for the rest.
    sizes = {"max_context": max_context, "image_tokens": image_tokens, "hidden_size": hidden}
    dims = {name: ct.RangeDim(1, sizes[bound], default=1, symbol=name) for name, bound in COREML_RANGE_DIMS.items()}
    state = ct.TensorType(shape=decoder.state_shape, dtype=np.float16)
    return ct.convert(
        traced,
        inputs=[ct.TensorType(t.name, shape=tuple(dims.get(d, sizes.get(d, d)) for d in t.dims), dtype=NUMPY_TYPES[t.dtype])
                for t in COREML_DECODER.inputs],
        outputs=[ct.TensorType(t.name, dtype=NUMPY_TYPES[t.dtype]) for t in COREML_DECODER.outputs],
        states=[ct.StateType(wrapped_type=state, name=t.name) for t in COREML_DECODER.states],
        minimum_deployment_target=getattr(ct.target, target),
        compute_precision=ct.precision.FLOAT16,
        convert_to="mlprogram",
    )


def convert_seg_decoder(module, target: str):
    """The segmentation decoder (pgexport.exporters.seg_decoder) with int32 codes [1, 16] in and fp32
    mask logits [1, 64, 64] out, fp16 compute. Traced in fp32; returns (package, trace)."""
    import coremltools as ct

    (codes,) = COREML_SEG_DECODER.inputs
    with torch.no_grad():
        traced = torch.jit.trace(module.float().eval(), torch.zeros(codes.dims, dtype=torch.int32))
    mlmodel = ct.convert(
        traced,
        inputs=[ct.TensorType(codes.name, shape=codes.dims, dtype=NUMPY_TYPES[codes.dtype])],
        outputs=[ct.TensorType(t.name, dtype=NUMPY_TYPES[t.dtype]) for t in COREML_SEG_DECODER.outputs],
        minimum_deployment_target=getattr(ct.target, target),
        compute_precision=ct.precision.FLOAT16,
        convert_to="mlprogram",
    )
    return mlmodel, traced


def seg_wrapper_parity(module, traced) -> dict:
    """The trace coremltools converted (int32 codes, one row per call) against the PyTorch module, on
    every probe row: the wrapper check that runs everywhere (Core ML's own predictions need macOS)."""
    from pgexport.exporters.seg_decoder import compare_masks, probe_codes, reference_logits

    codes = probe_codes(module.codebook_size)
    with torch.no_grad():
        candidate = np.concatenate([traced(torch.from_numpy(row[None].astype(np.int32))).numpy() for row in codes])
    return {"hop": "PyTorch -> traced wrapper (int32 codes, fp32)", **compare_masks(reference_logits(module, codes), candidate)}


def compress_model(mlmodel, compress: str):
    """Weight compression with coremltools.optimize (data-free): int8 per channel, int4 per block of
    32 input channels (needs iOS18), or a 4-bit k-means palette per tensor."""
    if compress == "none":
        return mlmodel
    from coremltools.optimize import coreml as cto

    if compress == "palettize4":
        config = cto.OpPalettizerConfig(mode="kmeans", nbits=4, granularity="per_tensor")
        return cto.palettize_weights(mlmodel, cto.OptimizationConfig(global_config=config))
    granularity = {"int8": dict(dtype="int8", granularity="per_channel"),
                   "int4": dict(dtype="int4", granularity="per_block", block_size=32)}[compress]
    config = cto.OpLinearQuantizerConfig(mode="linear_symmetric", **granularity)
    return cto.linear_quantize_weights(mlmodel, cto.OptimizationConfig(global_config=config))


def describe(mlmodel, package: PackageSpec, fields: dict) -> None:
    """Descriptions (the contract's), license and provenance on a package (shown in Xcode, read
    back by validate)."""
    text = package.describe()
    mlmodel.short_description = text["short"]
    mlmodel.author = f"pgexport {pgexport.__version__}"
    mlmodel.license = fields["license"]
    mlmodel.version = pgexport.__version__
    for name, description in text["inputs"].items():
        mlmodel.input_description[name] = description
    for name, description in text["outputs"].items():
        mlmodel.output_description[name] = description
    metadata = {
        "pgexport.version": pgexport.__version__,
        "pgexport.format": FORMAT,
        "pgexport.package": package.name,
        "pgexport.source": fields["source"]["checkpoint"],
        "pgexport.source_sha256": fields["source"]["sha256"] or "unknown (hub id)",
        "pgexport.compression": fields["options"]["compress"],
        "pgexport.license": fields["license"],
    }
    for key, value in metadata.items():
        mlmodel.user_defined_metadata[key] = str(value)


def prompt_layout(checkpoint, max_context: int, decoder_state_shape: list[int]) -> dict:
    """What an app needs to build inputs: special ids, the prompt layout, the mask convention."""
    from pgexport.coreml.wrappers import BLOCKED, pixel_normalisation

    config, tokenizer = checkpoint.config, checkpoint.processor.tokenizer
    text = config.text_config
    scale, bias = pixel_normalisation(checkpoint.processor.image_processor)
    return {
        "image_size": config.vision_config.image_size,
        "image_resample": "bicubic",
        "pixel_scale": scale,
        "pixel_bias": bias,
        "num_image_tokens": text.num_image_tokens,
        "special_ids": {
            "image": config.image_token_index,
            "bos": tokenizer.bos_token_id,
            "eos": tokenizer.eos_token_id,
            "pad": tokenizer.pad_token_id,
            "newline": tokenizer.convert_tokens_to_ids("\n"),
        },
        "prompt": ["<image> x num_image_tokens", "<bos>", "prefix text", "\\n"],
        "prompt_note": "input_ids of the prefill are exactly the processor's: image tokens first, then bos, the prefix and a newline.",
        "max_context": max_context,
        "state_shape": decoder_state_shape,
        "state_layout": f"[layers, 1, kv_heads, max_context, head_dim] fp16, keys in {KEY_CACHE}, values in {VALUE_CACHE}",
        "mask": {"attend": 0.0, "blocked": BLOCKED, "shape": "[1, 1, q, end]"},
        "prefill": "q = prompt length, end = q, mask all zeros (the prompt attends bidirectionally)",
        "decode": "q = 1, end = tokens so far + 1, mask all zeros (causal: it sees the past and itself)",
        "positions": "1-based cache slots (slot + 1), computed inside the decoder from end and q",
        "sliding_window": getattr(text, "sliding_window", None) if getattr(text, "layer_types", None) else None,
        "vocab_size": text.vocab_size,
    }


def to_coreml(model: str | Path | None = None, output: str | Path = "out-coreml", config: CoremlConfig | None = None, *,
              force: bool = False, allow_pickle: bool = False, progress: bool = True, **options) -> dict:
    """Convert `model` (folder or hub id; default the demo model) to Core ML packages at `output`.

    `config` (or its fields as keywords: `to_coreml(model, out, compress="int4")`) is a
    CoremlConfig, the options of `pgexport coreml`. Stages: check the request -> load -> wrapper
    parity against transformers (fp32 PyTorch) -> convert the vision encoder and the stateful
    decoder (fp16) -> compress -> describe -> save tokenizer, prompt layout and README -> check the
    saved specs -> manifest. Writes into a staging folder renamed into place at the end. Raises
    GateFailedError (packages kept) when parity fails.
    """
    from pgexport.coreml import package_readme
    from pgexport.coreml.spec import check_spec
    from pgexport.load import default_model, load_checkpoint, load_config, seg_decoder_of
    from pgexport.memory import half_releasing_pages, release_freed
    from pgexport.manifest import write_manifest
    from pgexport.output import check_output, staging_folder, temp_files_in
    from pgexport.pipeline import save_model_files, stages
    from pgexport.structured import copy_parsers

    output, config = Path(output), make(CoremlConfig, config, **options)
    config = dataclasses.replace(config, seg_decoder=seg_decoder_of(model, config.seg_decoder))
    compress, target, validate = config.compress, config.target, config.validate
    check_request(compress, target)
    max_context = check_context(load_config(model, allow_pickle=allow_pickle), config.max_context)  # before any work
    seg_decoder = None
    if config.seg_decoder:
        from pgexport.exporters.seg_decoder import describe as describe_seg, load_seg_decoder

        seg_decoder = load_seg_decoder(config.seg_decoder)
    inputs = [model if model is not None else default_model(), config.seg_decoder]
    check_output(output, force, inputs)
    with harmless_coremltools_logs_dropped():  # those it logs when first imported
        ct = import_optional("coremltools", "coreml")
    started = time.perf_counter()
    with (staging_folder(output, force, inputs) as staging, stages(6 + validate + 2 * (compress != "none") + bool(seg_decoder), progress) as advance,
          temp_files_in(staging / ".tmp") as scratch_files, quiet_coremltools()):
        advance("loading checkpoint")
        checkpoint = load_checkpoint(model, allow_pickle=allow_pickle)
        max_context = check_context(checkpoint.config, max_context)
        fields = {
            "format": FORMAT,
            "pgexport_version": pgexport.__version__,
            "source": {"checkpoint": checkpoint.source, "sha256": checkpoint.sha256, "family": checkpoint.family},
            "options": {"compress": compress, "target": target, "max_context": max_context, "validate": validate},
            "license": license_note({"checkpoint": checkpoint.source}),
            "coremltools_version": ct.__version__,
        }
        memory = {"max_rss_gb_after_load": max_rss_gb()}
        parity = {"wrappers": None, "runtime": "not run: Core ML prediction needs macOS (pgexport validate runs it there)"}
        if validate:
            from pgexport.coreml.parity import check_wrappers

            advance("checking the export wrappers against transformers")
            parity["wrappers"] = check_wrappers(checkpoint.model, checkpoint.processor)
        # fp16 weights from here on: 5.9 GB of torch weights held during conversion at 3B, not 11.7.
        half_releasing_pages(checkpoint.model)
        advance("saving tokenizer and prompt layout")
        text = checkpoint.config.text_config
        state_shape = [text.num_hidden_layers, 1, text.num_key_value_heads, max_context, text.head_dim]
        layout = prompt_layout(checkpoint, max_context, state_shape)
        save_model_files(checkpoint, staging)
        (staging / "prompt_layout.json").write_text(json.dumps(layout, indent=2) + "\n")
        packages, uncompressed = {}, staging / ".uncompressed"
        for package in PACKAGES:
            advance(f"converting {package.name}")
            t0 = time.perf_counter()
            if package is COREML_VISION:
                # Traced from an fp32 copy of the vision tower alone: coremltools 9 rejects SigLIP's
                # layer_norm traced in fp16 (fp32 epsilon against fp16 gamma).
                mlmodel = convert_vision_encoder(checkpoint.model, checkpoint.processor.image_processor, target)
            else:
                mlmodel = convert_decoder(checkpoint.model, target, max_context)
            entry = packages[package.name] = {"convert_seconds": round(time.perf_counter() - t0, 1),
                                              "max_rss_gb_after_convert": max_rss_gb()}
            if compress == "none":
                describe(mlmodel, package, fields)
            # Saved as converted, and the converted model (its whole program in memory) let go: the
            # compression reads the saved package. Compressing the converted model in memory held
            # it twice, 16.8 GB at 3B int4 (benchmarks/results/memory_3b.md).
            path = (staging if compress == "none" else uncompressed) / package.filename
            mlmodel.save(str(path))
            entry["fp16_bytes"] = entry["bytes"] = package_bytes(path)
            del mlmodel
        del checkpoint  # the torch weights, before compression
        release_freed()
        for package in PACKAGES if compress != "none" else ():
            entry = packages[package.name]
            advance(f"compressing {package.name} ({compress})")
            t0 = time.perf_counter()
            mlmodel = compress_model(ct.models.MLModel(str(uncompressed / package.filename), skip_model_load=True), compress)
            entry["compress_seconds"] = round(time.perf_counter() - t0, 1)
            entry["max_rss_gb_after_compress"] = max_rss_gb()
            describe(mlmodel, package, fields)
            mlmodel.save(str(staging / package.filename))
            entry["bytes"] = package_bytes(staging / package.filename)
            del mlmodel
            shutil.rmtree(uncompressed / package.filename)
        shutil.rmtree(uncompressed, ignore_errors=True)
        for entry in packages.values():
            entry["ratio"] = round(entry["bytes"] / entry["fp16_bytes"], 4)
        if seg_decoder is not None:
            advance(f"converting {COREML_SEG_DECODER.name}")
            mlmodel, traced = convert_seg_decoder(seg_decoder, target)
            describe(mlmodel, COREML_SEG_DECODER, fields)
            mlmodel.save(str(staging / COREML_SEG_DECODER.filename))
            fields["seg_decoder"] = {**describe_seg(config.seg_decoder, seg_decoder),
                                     "path": str(Path(config.seg_decoder).resolve()),  # validate reads it on macOS
                                     "bytes": package_bytes(staging / COREML_SEG_DECODER.filename),
                                     "wrapper_parity": seg_wrapper_parity(seg_decoder, traced) if validate else None}
            del mlmodel, traced
        advance("checking the saved specs")
        expected = {"target": target, "compress": compress, "max_context": max_context, "state_shape": state_shape,
                    "image_size": layout["image_size"], "num_image_tokens": layout["num_image_tokens"],
                    "hidden_size": text.hidden_size, "vocab_size": text.vocab_size, "seg_decoder": seg_decoder is not None}
        spec = {"expected": expected, "problems": check_spec(staging, expected)}
        advance("writing manifest")
        shutil.rmtree(scratch_files)  # coremltools' temporary packages, all saved or released by now
        fields.update(packages=packages, memory=memory, spec_check=spec, parity=parity,
                      export_seconds=round(time.perf_counter() - started, 2))
        # The model card (front matter, parity, sizes, the Swift loop) from the manifest's own fields,
        # written before the manifest so that manifest.json lists and hashes it.
        copy_parsers(staging, ("swift",))  # paligemma_structured.swift beside the packages: listed and hashed
        write_card(staging, coreml_card(fields, package_readme.render(layout, fields, packages)))
        manifest = write_manifest(staging, **fields)
    failures = (parity["wrappers"] or {}).get("failures", []) + spec["problems"]
    seg_parity = (manifest.get("seg_decoder") or {}).get("wrapper_parity")
    if seg_parity is not None and not seg_parity["passed"]:
        from pgexport.exporters.seg_decoder import parity_failure

        failures.append(parity_failure(seg_parity))
    if failures:
        raise GateFailedError(f"Core ML export checks failed: {failures}")
    return manifest
