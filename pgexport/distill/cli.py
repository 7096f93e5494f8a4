"""`pgexport distill`: the command line of `pgexport.distill.train.distill`; its options are DistillConfig's fields."""

from __future__ import annotations

import json

import click

from pgexport.cli_options import cli_options, config_from, reads_checkpoint
from pgexport.config import DistillConfig


@click.command("distill")
@reads_checkpoint("student", "Student checkpoint folder to create.", name="teacher")
@cli_options(DistillConfig)
@click.option("--stop-after", type=click.IntRange(1), help="Stop (checkpointed) after N optimizer steps in all; continue with --resume.")
@click.option("--resume", is_flag=True, help="Continue the run saved in OUTPUT.checkpoints (same options).")
@click.option("--force", is_flag=True, help="Replace an existing output / restart an unfinished run.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
def distill_command(teacher, output, stop_after, resume, force, as_json, **options):
    """Distill TEACHER (default: the demo model) into a smaller PaliGemma student at OUTPUT.

    Runs data-parallel unchanged under `accelerate launch -m pgexport.distill ...`. Writes a
    transformers checkpoint (exportable with `pgexport onnx`) with report.json and report.md.
    """
    from pgexport.distill.report import to_markdown
    from pgexport.distill.train import distill

    report = distill(teacher, output, config_from(DistillConfig, options), resume=resume, force=force,
                     stop_after=stop_after, progress=not as_json)
    if not report:  # not the main process of a data-parallel run
        return
    if as_json:
        click.echo(json.dumps(report, indent=2))
    elif "stopped_at" in report:
        click.echo(f"stopped after step {report['stopped_at']} of {report['total_steps']}; "
                   f"continue with --resume ({report['checkpoints']})")
    else:
        click.echo(to_markdown(report))
        click.echo(f"wrote {output}")
