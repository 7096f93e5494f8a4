"""The spine: checkpoint -> validated ONNX Runtime artifact. Reads like its stage list."""

from __future__ import annotations

import contextlib
import os
import shutil
import time
from dataclasses import asdict, replace
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

import pgexport
from pgexport.card import license_note, onnx_card, write_card
from pgexport.errors import BadInputError, GateFailedError
from pgexport.config import ExportConfig, QuantizeConfig, make, methods_of, options_of
from pgexport.contract import GRAPH_NAMES, graph_path
from pgexport.exporters import ort_format
from pgexport.exporters.onnx import export_graphs
from pgexport.exporters.seg_decoder import load_seg_decoder
from pgexport.load import Checkpoint, default_model, load_checkpoint, seg_decoder_of
from pgexport.manifest import MANIFEST, read_manifest, require_files, sha256_file, write_manifest
from pgexport.memory import release_freed
from pgexport.output import check_output, staging_folder
from pgexport.quantize.artifact import plan_variants, quantize_variants, size_report
from pgexport.structured import copy_parsers

@contextlib.contextmanager
def stages(total: int, enabled: bool = True, console: Console | None = None):
    """A progress bar over named stages; yields `advance(description)`."""
    progress = Progress(
        TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"), TimeElapsedColumn(),
        console=console or Console(stderr=True), disable=not enabled, transient=False,
    )
    with progress:
        task = progress.add_task("starting", total=total)
        started = [False]

        def advance(description: str):
            if started[0]:
                progress.advance(task)
            started[0] = True
            progress.update(task, description=description)

        yield advance
        progress.update(task, completed=total, description="done")


def save_model_files(checkpoint: Checkpoint, folder: Path) -> None:
    """config, generation config, tokenizer and processor files: what makes the folder self-contained."""
    checkpoint.model.config.save_pretrained(folder)
    checkpoint.model.generation_config.save_pretrained(folder)
    checkpoint.processor.tokenizer.padding_side = "left"  # batches are left-padded (written to tokenizer_config)
    checkpoint.processor.save_pretrained(folder)
    # transformers 5 nests the image processor in processor_config.json; transformers.js and older
    # transformers read preprocessor_config.json, and transformers.js picks the processor class there.
    image_processor = checkpoint.processor.image_processor
    image_processor.processor_class = "PaliGemmaProcessor"
    image_processor.save_pretrained(folder)


def _raise_if_failed(parity: dict | None) -> None:
    if parity is not None and not parity["passed"]:
        failed = {dtype: hop["failures"] for dtype, hop in parity["hops"].items() if hop["failures"]}
        raise GateFailedError(f"parity gate failed: {failed}", report=parity)


def export_onnx(model: str | Path | None = None, output: str | Path = "out", config: ExportConfig | None = None, *,
                force: bool = False, allow_pickle: bool = False, progress: bool = True, **options) -> dict:
    """Export `model` (folder or hub id; default the demo model) to an ONNX artifact at `output`.

    `config` (or its fields as keywords: `export_onnx(model, out, int8=True)`) is an ExportConfig,
    the options of `pgexport onnx`. Stages: load -> export fp32 graphs -> save model files ->
    PyTorch reference -> quantize -> validate against PyTorch -> manifest. int8 / int4 / fp16 each
    add a variant (int8: vision and decoder; q4 and fp16: every graph); vision / decoder / embed set
    graphs' precisions on top (or alone, one variant). Writes into a staging folder renamed into
    place at the end. Returns the manifest; raises GateFailedError (artifact kept, report inside)
    when a parity gate fails.
    """
    from pgexport.validate import eval_rows_for, logits_on_disk, reference_outputs, validate as run_gate

    output, config = Path(output), make(ExportConfig, config, **options)
    config = replace(config, seg_decoder=seg_decoder_of(model, config.seg_decoder))
    variants = plan_variants(methods_of(config), config.graphs())
    inputs = [model if model is not None else default_model(), config.eval_file, config.calibration, config.seg_decoder]
    dtypes = ["fp32", *variants]
    seg_decoder = load_seg_decoder(config.seg_decoder) if config.seg_decoder else None  # a bad file fails here
    started = time.perf_counter()
    with (staging_folder(output, force, inputs) as staging,
          stages(4 + bool(variants) + config.ort_format + 2 * config.validate, progress) as advance,
          contextlib.ExitStack() as scratch):
        advance("loading checkpoint")
        checkpoint = load_checkpoint(model, allow_pickle=allow_pickle)
        advance("exporting ONNX graphs")
        (staging / "onnx").mkdir()
        export_graphs(checkpoint.model, staging / "onnx", config.opset)
        if seg_decoder is not None:
            seg_fields = seg_decoder_fields(seg_decoder, config.seg_decoder, staging, config.opset, config.validate)
        if config.ort_format:
            ort_format.check_fits(staging)  # a graph over 2 GiB fails here, before quantizing
        advance("saving config, tokenizer and processor")
        save_model_files(checkpoint, staging)
        fields = {
            "format": "pgexport-onnx/1",
            "pgexport_version": pgexport.__version__,
            "source": {"checkpoint": checkpoint.source, "sha256": checkpoint.sha256, "family": checkpoint.family},
            "options": options_of(config),
            "dtypes": dtypes,
            "default_dtype": dtypes[-1],
            "variants": variants,
            "license": license_note({"checkpoint": checkpoint.source}),
        }
        if seg_decoder is not None:
            fields["seg_decoder"] = seg_fields
        if config.validate:
            advance("running the PyTorch reference")
            reference = scratch.enter_context(logits_on_disk(reference_outputs(
                checkpoint.model, checkpoint.processor, eval_rows=eval_rows_for(checkpoint, config.eval_file)
            )))
        del checkpoint  # frees the PyTorch weights before the ONNX sessions load (gc: the cycles the reference run left)
        release_freed()
        if variants:
            advance(f"quantizing ({', '.join(variants)})")
            fields["quantization"] = quantize_variants(staging, variants, config, progress=False)
            fields["sizes"] = size_report(staging, variants)
        if config.ort_format:
            advance("writing ORT format graphs")
            fields["ort_format"] = ort_format.convert(staging)  # before the manifest: listed and hashed
        write_manifest(staging, **fields, parity=None)  # the runtime reads dtypes from it
        parity = None
        if config.validate:
            advance("validating against PyTorch")
            parity = run_gate(staging, reference, dtypes)
        advance("writing manifest")
        fields["export_seconds"] = round(time.perf_counter() - started, 2)
        copy_parsers(staging)  # paligemma_structured.js: before the manifest, listed and hashed
        write_card(staging, onnx_card({**fields, "parity": parity}))  # before the manifest: listed and hashed
        manifest = write_manifest(staging, **fields, parity=parity)
    _raise_if_failed(parity)
    _raise_if_seg_failed(manifest)
    return manifest


def seg_decoder_fields(module, source, staging: Path, opset: int, validate: bool) -> dict:
    """Export the segmentation decoder to onnx/seg_decoder.onnx; its manifest record, with its parity
    against the PyTorch module when `validate`."""
    from pgexport.exporters.seg_decoder import describe, export_seg_decoder, onnx_parity

    path = export_seg_decoder(module, staging / "onnx", opset)
    return {**describe(source, module), "parity": onnx_parity(module, path) if validate else None}


def _raise_if_seg_failed(manifest: dict) -> None:
    from pgexport.exporters.seg_decoder import parity_failure

    parity = (manifest.get("seg_decoder") or {}).get("parity")
    if parity is not None and not parity["passed"]:
        raise GateFailedError(parity_failure(parity))


def _link_or_copy(source: Path, target: Path) -> None:
    """Hard link when the file system allows (a 3B artifact is 14 GB), else copy. Safe for the
    input: the files a run writes are never linked (quantize_artifact leaves them out), and every
    writer makes a new file (quantize.artifact.fresh_target) rather than writing into one."""
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(source, target)
    except OSError:
        shutil.copy2(source, target)


def quantize_artifact(artifact: str | Path, output: str | Path, config: QuantizeConfig | None = None, *,
                      force: bool = False, allow_pickle: bool = False, progress: bool = True, **options) -> dict:
    """Quantize an existing artifact's fp32 graphs into a new artifact at `output`.

    `config` (or its fields as keywords: `quantize_artifact(a, out, methods=["q4"])`) is a
    QuantizeConfig, the options of `pgexport quantize`. Stages: check the plan and the input ->
    link the input's files into a staging folder -> PyTorch reference (the manifest's source
    checkpoint, or `reference`) -> quantize each graph the variants need -> validate the new
    variants -> manifest (with a size report) -> rename into place. The input is never written to.
    """
    from pgexport.validate import checkpoint_reference, logits_on_disk, validate as run_gate

    artifact, output, config = Path(artifact), Path(output), make(QuantizeConfig, config, **options)
    variants = plan_variants(methods_of(config), config.graphs())
    if not variants:
        raise BadInputError("nothing to quantize: give --method or a per-graph precision (--vision, --decoder, --embed)")
    source_manifest = read_manifest(artifact)
    for graph in GRAPH_NAMES:
        if not graph_path(artifact, graph, "fp32").is_file():
            raise BadInputError(f"{artifact}: missing the fp32 graph onnx/{graph}.onnx")
    source_checkpoint = (source_manifest.get("source") or {}).get("checkpoint")
    reference = config.reference or source_checkpoint
    inputs = [artifact, reference, config.eval_file, config.calibration]
    check_output(output, force, inputs)
    require_files(artifact, source_manifest)
    _check_sources(artifact, variants)
    if config.ort_format:
        ort_format.check_fits(artifact)  # its graphs are converted too
    dtypes = list(dict.fromkeys([*source_manifest.get("dtypes", ["fp32"]), *variants]))
    # Made anew in the output, so never links to the input's (.ort files and their config: anew with
    # --ort-format, else left out, since they would not cover the new variants).
    remade = _graph_files(artifact, variants) | ort_format.ort_files(source_manifest)
    started = time.perf_counter()
    with (staging_folder(output, force, inputs) as staging,
          stages(4 + config.ort_format + config.validate, progress) as advance, contextlib.ExitStack() as scratch):
        advance("linking the input artifact")
        for name in sorted(set(source_manifest.get("files", {})) - remade):
            _link_or_copy(artifact / name, staging / name)
        reference_run = evaluate = None
        if config.validate:
            advance("running the PyTorch reference")
            reference_run = scratch.enter_context(logits_on_disk(checkpoint_reference(reference, config.eval_file, allow_pickle)))
            evaluate = _tuning_metric(staging, reference_run)
        advance(f"quantizing ({', '.join(variants)})")
        made = quantize_variants(staging, variants, config, progress=progress, evaluate=evaluate)
        fields = {key: value for key, value in source_manifest.items()
                  if key not in ("versions", "files", "parity", "export_seconds")}
        fields.update(
            dtypes=dtypes,
            default_dtype=dtypes[-1],
            variants={**source_manifest.get("variants", {}), **variants},
            quantization={**source_manifest.get("quantization", {}), **made},
            quantize_options={"methods": list(config.methods), "graphs": config.graphs(),
                              **asdict(config.quantize_options())},
            quantized_from={"artifact": str(artifact), "sha256_manifest": sha256_file(artifact / MANIFEST)},
            sizes=size_report(staging, {**source_manifest.get("variants", {}), **variants}),
        )
        fields.pop("ort_format", None)  # the input's .ort files were not linked
        if config.ort_format:
            advance("writing ORT format graphs")
            fields["ort_format"] = ort_format.convert(staging)
        write_manifest(staging, **fields, parity=None)
        parity = None
        if config.validate:
            advance("validating against PyTorch")
            parity = run_gate(staging, reference_run, list(variants))
        advance("writing manifest")
        fields["quantize_seconds"] = round(time.perf_counter() - started, 2)
        copy_parsers(staging)  # a new file too, not the input's linked one
        write_card(staging, onnx_card({**fields, "parity": parity}))  # a new file, not the input's linked README
        manifest = write_manifest(staging, **fields, parity=parity)
    _raise_if_failed(parity)
    return manifest


def _graph_files(artifact: Path, variants: dict) -> set[str]:
    """The files (graph and external data, relative) the variants' graphs are written to."""
    names = set()
    for graphs in variants.values():
        for graph, precision in graphs.items():
            path = graph_path(artifact, graph, precision).relative_to(artifact).as_posix()
            names |= {path, f"{path}.data"}
    return names


def _check_sources(artifact: Path, variants: dict) -> None:
    """Fail before any work when a graph to quantize is not a float graph (int4 on an int8 graph,
    say): reads each graph's structure only, not its weights."""
    from pgexport.quantize.rewrite import load_float_graph

    for graph in sorted({graph for graphs in variants.values() for graph in graphs}):
        load_float_graph(graph_path(artifact, graph, "fp32"))




def _tuning_metric(folder: Path, reference):
    """The metric accuracy-aware tuning keeps, for the artifact whose `graph` is swapped for a
    candidate file (the other graphs fp32): the smaller of greedy token agreement with the
    PyTorch reference and the gate's logit cosine for lossy precisions (worst of the positions
    generation reads, along the reference's path). Both are 1.0 for a perfect graph, so a
    relative target of 0.99 asks what the int8 gate asks (cosine 0.99)."""
    import numpy as np

    from pgexport.runtime import OnnxPaliGemma
    from pgexport.metrics import logit_stats, token_agreement
    from pgexport.validate import PARITY_NEW_TOKENS

    def evaluate(graph: str, candidate: Path) -> float:
        runtime = OnnxPaliGemma(folder, dtype="fp32", low_memory=True)
        runtime.sessions.replace(graph, candidate)  # a path, not a session: the vision's reopens after each run
        inputs = reference.inputs
        tokens, _ = runtime.generate_ids(**inputs, max_new_tokens=PARITY_NEW_TOKENS, stop_at_eos=False)
        _, forced = runtime.generate_ids(**inputs, stop_at_eos=False, forced_tokens=reference.tokens, keep_logits=True)
        cosine = logit_stats(reference.step_logits, np.stack(forced, 1))["min_cosine"]
        return min(token_agreement(reference.tokens, tokens), cosine)

    return evaluate
