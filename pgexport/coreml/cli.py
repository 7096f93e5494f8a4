"""`pgexport coreml`: the CLI face of `pgexport.coreml.convert.to_coreml`; its options are CoremlConfig's fields."""

from __future__ import annotations

import json

import click

from pgexport.cli_options import cli_options, config_from, reads_checkpoint, run_options
from pgexport.config import CoremlConfig


@click.command("coreml")
@reads_checkpoint("out-coreml", "Folder to create.")
@cli_options(CoremlConfig)
@run_options()
def coreml_command(model, output, force, allow_pickle, as_json, **options):
    """Convert MODEL to Core ML: vision_encoder.mlpackage (camera frame in) and decoder.mlpackage
    (KV cache as state), with tokenizer, prompt layout, README (Swift) and manifest.json; with
    --seg-decoder also seg_decoder.mlpackage (a segment answer's codes -> mask logits)."""
    from pgexport.coreml.convert import to_coreml

    config = config_from(CoremlConfig, options)
    manifest = to_coreml(model, output, config, force=force, allow_pickle=allow_pickle, progress=not as_json)
    if as_json:
        click.echo(json.dumps(manifest, indent=2))
        return
    wrappers = manifest["parity"]["wrappers"]
    if wrappers:
        click.echo(f"wrappers vs transformers (fp32): max rel diff {wrappers['max_rel_diff']:.2e}, "
                   f"greedy tokens {'identical' if wrappers['tokens_identical'] else 'differ'}")
    for package, entry in manifest["packages"].items():
        click.echo(f"{package}.mlpackage: {entry['bytes'] / 1e6:.1f} MB ({config.compress}; fp16 {entry['fp16_bytes'] / 1e6:.1f} MB, x{entry['ratio']:.3f})")
    seg = manifest.get("seg_decoder")
    if seg:
        parity = seg["wrapper_parity"]
        checked = (f"wrapper vs PyTorch: max |d| {parity['max_rel_diff']:.2g} of the largest logit, mask IoU {parity['mask_iou']:.6f}"
                   if parity else "wrapper not checked (--no-validate)")
        click.echo(f"seg_decoder.mlpackage: {seg['bytes'] / 1e6:.1f} MB (fp16; {seg['codebook_size']} codes); {checked}")
    click.echo(f"runtime parity: {manifest['parity']['runtime']}")
    click.echo(f"wrote {output}")
