"""`pgexport quantize`: the command over `pgexport.pipeline.quantize_artifact`; its options are
QuantizeConfig's fields (pgexport.config)."""

from __future__ import annotations

import json
from pathlib import Path

import click

from pgexport.cli_options import cli_options, config_from, run_options
from pgexport.config import QuantizeConfig

@click.command("quantize")
@click.argument("artifact", type=click.Path(path_type=Path))
@click.option("-o", "--output", type=click.Path(path_type=Path), required=True, help="New artifact folder (the input is left untouched).")
@cli_options(QuantizeConfig)
@run_options(pickle="weights in the reference")
def quantize_command(artifact, output, force, allow_pickle, as_json, **options):
    """Quantize the fp32 graphs of ARTIFACT into a new artifact, validated against PyTorch (exit 6 when the gate fails)."""
    from pgexport.tables import console, print_parity, print_sizes
    from pgexport.pipeline import quantize_artifact

    config = config_from(QuantizeConfig, options)
    if not config.methods and not any(config.graphs().values()):
        raise click.UsageError("nothing to quantize: give --method, or a precision with --vision, --decoder or --embed")
    manifest = quantize_artifact(artifact, output, config, force=force, allow_pickle=allow_pickle, progress=not as_json)
    if as_json:
        click.echo(json.dumps(manifest, indent=2))
        return
    if manifest["parity"]:
        print_parity(console, manifest["parity"])
    print_sizes(console, manifest["sizes"])
    console.print(f"wrote {output}")
