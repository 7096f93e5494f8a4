"""`pgexport quantize`: the command over `pgexport.pipeline.quantize_artifact`, and the options it
shares with `pgexport onnx` (per-graph precisions, int4 method, block size, calibration)."""

from __future__ import annotations

import json
from pathlib import Path

import click

PRECISIONS = ["fp32", "fp16", "int8", "int8-static", "q4"]


def quantize_options(command):
    """The options `onnx` and `quantize` share, in the order --help lists them."""
    for option in reversed([
        click.option("--vision", type=click.Choice(PRECISIONS), help="vision_encoder precision (overrides the method's)."),
        click.option("--decoder", type=click.Choice(PRECISIONS), help="decoder_model_merged precision."),
        click.option("--embed", type=click.Choice(["fp32", "fp16", "int8", "q4"]), help="embed_tokens (the token table) precision: int8 / q4 = GatherBlockQuantized 8 / 4-bit."),
        click.option("--int4-method", type=click.Choice(["rtn", "hqq"]), default="rtn", show_default=True, help="q4 MatMulNBits weights: round to nearest, or HQQ (error-fitted zero points)."),
        click.option("--block-size", type=int, default=32, show_default=True, help="q4 / embedding block size (power of two, >= 16)."),
        click.option("--accuracy-level", type=click.IntRange(0, 4), default=4, show_default=True,
                     help="q4 MatMulNBits accuracy_level (4: int8 compute, fastest on CPU; 0: the input's type)."),
        click.option("--calibration", type=click.Path(path_type=Path), help="int8-static: folder of images or JSONL of {image, prefix} (default: demo samples)."),
        click.option("--accuracy-target", type=float, help="int8-static: tune until this share of fp32's token agreement holds (e.g. 0.99)."),
        click.option("--optimize", is_flag=True, help="Fuse norms and GELU (onnxruntime transformer fusions) before quantizing, parity-checked."),
    ]):
        command = option(command)
    return command


def options_from(int4_method, block_size, accuracy_level, calibration, accuracy_target, optimize):
    from pgexport.quantize.artifact import QuantizeOptions

    return QuantizeOptions(int4_method=int4_method, block_size=block_size, accuracy_level=accuracy_level,
                           calibration=str(calibration) if calibration else None, accuracy_target=accuracy_target,
                           optimize=optimize)


def print_sizes(console, sizes: dict) -> None:
    from rich.table import Table

    from pgexport.runtime import GRAPHS

    table = Table(title="Size (MB)")
    for column in ("variant", *GRAPHS, "total", "x fp32"):
        table.add_column(column)
    for name, entry in sizes.items():
        precisions = entry.get("precisions", {})
        cells = [f"{entry['graphs'][g] / 1e6:.1f}" + (f" {precisions[g]}" if precisions.get(g, "fp32") != "fp32" else "") for g in GRAPHS]
        table.add_row(name, *cells, f"{entry['total'] / 1e6:.1f}", f"{entry['ratio']:.3f}")
    console.print(table)


@click.command("quantize")
@click.argument("artifact", type=click.Path(path_type=Path))
@click.option("-o", "--output", type=click.Path(path_type=Path), required=True, help="New artifact folder (the input is left untouched).")
@click.option("--method", "methods", multiple=True, type=click.Choice(["int8", "int8-static", "q4", "fp16"]), help="Whole-artifact method; repeat for several variants. int8: vision + decoder; q4, fp16: every graph.")
@quantize_options
@click.option("--reference", help="Checkpoint the gate compares with (default: the manifest's source).")
@click.option("--validate/--no-validate", default=True, show_default=True, help="Run the parity gate against PyTorch.")
@click.option("--eval-file", type=click.Path(path_type=Path), help="JSONL of held-out rows for the exact-match check.")
@click.option("--force", is_flag=True, help="Replace an existing output folder (only once the new one is complete).")
@click.option("--allow-pickle", is_flag=True, help="Allow non-safetensors (pickle) weights in the reference.")
@click.option("--json", "as_json", is_flag=True, help="Print the manifest as JSON instead of tables.")
def quantize_command(artifact, output, methods, vision, decoder, embed, int4_method, block_size, accuracy_level,
                     calibration, accuracy_target, optimize, reference, validate, eval_file, force, allow_pickle, as_json):
    """Quantize the fp32 graphs of ARTIFACT into a new artifact, validated against PyTorch (exit 6 when the gate fails)."""
    from pgexport.cli import console, parity_table
    from pgexport.pipeline import quantize_artifact

    if not methods and not (vision or decoder or embed):
        raise click.UsageError("nothing to quantize: give --method, or a precision with --vision, --decoder or --embed")
    manifest = quantize_artifact(
        artifact, output, methods=list(methods), graphs={"vision": vision, "decoder": decoder, "embed": embed},
        quantize=options_from(int4_method, block_size, accuracy_level, calibration, accuracy_target, optimize),
        reference=reference, validate=validate, eval_file=eval_file, force=force, allow_pickle=allow_pickle,
        progress=not as_json,
    )
    if as_json:
        click.echo(json.dumps(manifest, indent=2))
        return
    if manifest["parity"]:
        console.print(parity_table(manifest["parity"]))
    print_sizes(console, manifest["sizes"])
    console.print(f"wrote {output}")
