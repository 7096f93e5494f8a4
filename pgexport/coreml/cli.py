"""`pgexport coreml`: the CLI face of `pgexport.coreml.convert.to_coreml` (same option names)."""

from __future__ import annotations

import json
from pathlib import Path

import click

from pgexport.coreml import COMPRESSIONS, TARGETS


@click.command("coreml")
@click.argument("model", required=False)
@click.option("-o", "--output", type=click.Path(path_type=Path), default=Path("out-coreml"), show_default=True, help="Folder to create.")
@click.option("--compress", type=click.Choice(COMPRESSIONS), default="none", show_default=True,
              help="Weights: fp16 (none), int8 per channel, int4 per block of 32, or a 4-bit k-means palette.")
@click.option("--target", type=click.Choice(TARGETS), default="iOS18", show_default=True,
              help="Minimum deployment target; the stateful decoder needs iOS18 or macOS15.")
@click.option("--max-context", type=int, help="KV cache length in tokens (default: image tokens + 512).")
@click.option("--validate/--no-validate", default=True, show_default=True, help="Check the export wrappers against transformers first.")
@click.option("--force", is_flag=True, help="Replace an existing output folder (only once the new one is complete).")
@click.option("--allow-pickle", is_flag=True, help="Allow non-safetensors (pickle) weights. Never runs remote code.")
@click.option("--json", "as_json", is_flag=True, help="Print the manifest as JSON.")
def coreml_command(model, output, compress, target, max_context, validate, force, allow_pickle, as_json):
    """Convert MODEL to Core ML: vision_encoder.mlpackage (camera frame in) and decoder.mlpackage
    (KV cache as state), with tokenizer, prompt layout, README (Swift) and manifest.json."""
    from pgexport.coreml.convert import to_coreml

    manifest = to_coreml(model, output, compress=compress, target=target, max_context=max_context, validate=validate,
                         force=force, allow_pickle=allow_pickle, progress=not as_json)
    if as_json:
        click.echo(json.dumps(manifest, indent=2))
        return
    wrappers = manifest["parity"]["wrappers"]
    if wrappers:
        click.echo(f"wrappers vs transformers (fp32): max rel diff {wrappers['max_rel_diff']:.2e}, "
                   f"greedy tokens {'identical' if wrappers['tokens_identical'] else 'differ'}")
    for package, entry in manifest["packages"].items():
        click.echo(f"{package}.mlpackage: {entry['bytes'] / 1e6:.1f} MB ({compress}; fp16 {entry['fp16_bytes'] / 1e6:.1f} MB, x{entry['ratio']:.3f})")
    click.echo(f"runtime parity: {manifest['parity']['runtime']}")
    click.echo(f"wrote {output}")
