"""The spine: checkpoint -> validated ONNX Runtime artifact. Reads like its stage list."""

from __future__ import annotations

import contextlib
import time
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

import pgexport
from pgexport.errors import GateFailedError
from pgexport.exporters.onnx import DEFAULT_OPSET, export_graphs
from pgexport.load import Checkpoint, load_checkpoint
from pgexport.manifest import staging_folder, write_manifest
from pgexport.runtime import graph_path

# Graphs --int8 quantizes: the embedding table is a Gather, which dynamic int8 does not cover.
INT8_GRAPHS = ("vision_encoder", "decoder_model_merged")
LICENSE_NOTE = "Gemma weights are subject to the Gemma Terms of Use (https://ai.google.dev/gemma/terms)."


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


def eval_rows_for(checkpoint: Checkpoint, eval_file: str | Path | None):
    """Held-out rows for the exact-match check: the given file, or the demo split for the demo model."""
    from pgexport.demo import CHECKPOINT_DIR, EVAL_FILE, load_split

    if eval_file is not None:
        return load_split(eval_file)
    if Path(checkpoint.source).resolve() == Path(CHECKPOINT_DIR).resolve():
        return load_split(EVAL_FILE)
    return None


def export_onnx(
    model: str | Path | None = None,
    output: str | Path = "out",
    *,
    int8: bool = False,
    opset: int = DEFAULT_OPSET,
    validate: bool = True,
    eval_file: str | Path | None = None,
    force: bool = False,
    allow_pickle: bool = False,
    progress: bool = True,
) -> dict:
    """Export `model` (folder or hub id; default the demo model) to an ONNX artifact at `output`.

    Stages: load -> export fp32 graphs -> quantize (int8) -> save model files -> validate against
    PyTorch -> manifest. Writes into a staging folder renamed into place at the end. Returns the
    manifest; raises GateFailedError (artifact kept, report inside) when a parity gate fails.
    """
    from pgexport.validate import reference_outputs, validate as run_gate

    output = Path(output)
    options = {"int8": int8, "opset": opset, "validate": validate}
    dtypes = ["fp32"] + (["int8"] if int8 else [])
    started = time.perf_counter()
    with staging_folder(output, force) as staging, stages(4 + int8 + 2 * validate, progress) as advance:
        advance("loading checkpoint")
        checkpoint = load_checkpoint(model, allow_pickle=allow_pickle)
        advance("exporting ONNX graphs")
        (staging / "onnx").mkdir()
        export_graphs(checkpoint.model, staging / "onnx", opset)
        advance("saving config, tokenizer and processor")
        save_model_files(checkpoint, staging)
        fields = {
            "format": "pgexport-onnx/1",
            "pgexport_version": pgexport.__version__,
            "source": {"checkpoint": checkpoint.source, "sha256": checkpoint.sha256, "family": checkpoint.family},
            "options": options,
            "dtypes": dtypes,
            "default_dtype": dtypes[-1],
            "license": LICENSE_NOTE,
        }
        if validate:
            advance("running the PyTorch reference")
            reference = reference_outputs(
                checkpoint.model, checkpoint.processor, eval_rows=eval_rows_for(checkpoint, eval_file)
            )
        del checkpoint  # frees the PyTorch weights before the ONNX sessions load
        if int8:
            from pgexport.quantize.int8 import quantize_dynamic_int8

            advance("quantizing to int8")
            for graph in INT8_GRAPHS:
                quantize_dynamic_int8(graph_path(staging, graph, "fp32"), graph_path(staging, graph, "int8"), progress=False)
        write_manifest(staging, **fields, parity=None)  # the runtime reads dtypes from it
        parity = None
        if validate:
            advance("validating against PyTorch")
            parity = run_gate(staging, reference, dtypes)
        advance("writing manifest")
        fields["export_seconds"] = round(time.perf_counter() - started, 2)
        manifest = write_manifest(staging, **fields, parity=parity)
    if parity is not None and not parity["passed"]:
        failed = {dtype: hop["failures"] for dtype, hop in parity["hops"].items() if hop["failures"]}
        raise GateFailedError(f"parity gate failed: {failed}", report=parity)
    return manifest
