"""`pgexport distill`: the command line of `pgexport.distill.train.distill` (same option names)."""

from __future__ import annotations

import json
from pathlib import Path

import click


def _layers(text: str | None, name: str) -> list[int] | None:
    if text is None:
        return None
    try:
        return [int(item) for item in text.split(",") if item.strip()]
    except ValueError:
        raise click.BadParameter(f"{text!r}: expected comma-separated layer indices", param_hint=name) from None


@click.command("distill")
@click.argument("teacher", required=False)
@click.option("--train", "train", type=click.Path(path_type=Path), help="Training JSONL ({image, prefix, suffix} rows). Default: the demo task, generated on the fly.")
@click.option("--eval", "eval_file", type=click.Path(path_type=Path), help="Held-out JSONL for the exact match (default for the demo teacher: its eval split).")
@click.option("-o", "--output", type=click.Path(path_type=Path), default=Path("student"), show_default=True, help="Student checkpoint folder to create.")
@click.option("--decoder-layers", type=click.IntRange(1), help="Student decoder layers (default: half the teacher's), from every k-th teacher layer.")
@click.option("--vision-layers", type=click.IntRange(1), help="Student vision layers (default: the teacher's).")
@click.option("--layer-map", help="Teacher decoder layer of each student layer, e.g. 0,3 (overrides every k-th).")
@click.option("--vision-layer-map", help="Teacher vision layer of each student vision layer.")
@click.option("--epochs", type=click.IntRange(1), default=1, show_default=True)
@click.option("--lr", type=float, default=5e-4, show_default=True, help="Peak learning rate (AdamW, warmup then cosine).")
@click.option("--batch-size", type=click.IntRange(1), default=32, show_default=True, help="Rows per process per micro-batch.")
@click.option("--grad-accum", type=click.IntRange(1), default=1, show_default=True, help="Micro-batches per optimizer step.")
@click.option("--temperature", type=click.FloatRange(min=0, min_open=True), default=2.0, show_default=True)
@click.option("--alpha", type=click.FloatRange(0, 1), default=0.5, show_default=True, help="Weight of the teacher (KL) term; 0 trains on labels only.")
@click.option("--hidden-weight", type=click.FloatRange(min=0), default=0.0, show_default=True, help="Weight of the hidden-state MSE term.")
@click.option("--train-rows", type=click.IntRange(1), default=6400, show_default=True, help="Generated demo-task rows per epoch (without --train).")
@click.option("--save-every", type=click.IntRange(0), default=0, show_default=True, help="Checkpoint every N optimizer steps (0: each epoch's end).")
@click.option("--stop-after", type=click.IntRange(1), help="Stop (checkpointed) after N optimizer steps in all; continue with --resume.")
@click.option("--mixed-precision", type=click.Choice(["auto", "no", "bf16", "fp16"]), default="auto", show_default=True, help="auto: bf16 on CUDA when supported, else fp32.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--latency-runs", type=click.IntRange(1), default=5, show_default=True, help="Timed generate runs per model for the report.")
@click.option("--resume", is_flag=True, help="Continue the run saved in OUTPUT.checkpoints (same options).")
@click.option("--force", is_flag=True, help="Replace an existing output / restart an unfinished run.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
def distill_command(teacher, train, eval_file, output, decoder_layers, vision_layers, layer_map, vision_layer_map, epochs,
                    lr, batch_size, grad_accum, temperature, alpha, hidden_weight, train_rows, save_every, stop_after,
                    mixed_precision, seed, latency_runs, resume, force, as_json):
    """Distill TEACHER (default: the demo model) into a smaller PaliGemma student at OUTPUT.

    Runs data-parallel unchanged under `accelerate launch -m pgexport.distill ...`. Writes a
    transformers checkpoint (exportable with `pgexport onnx`) with report.json and report.md.
    """
    from pgexport.distill.report import to_markdown
    from pgexport.distill.train import DistillConfig, distill

    config = DistillConfig(
        decoder_layers=decoder_layers, vision_layers=vision_layers, layer_map=_layers(layer_map, "--layer-map"),
        vision_layer_map=_layers(vision_layer_map, "--vision-layer-map"), epochs=epochs, lr=lr, batch_size=batch_size,
        grad_accum=grad_accum, temperature=temperature, alpha=alpha, hidden_weight=hidden_weight, train_rows=train_rows,
        seed=seed, save_every=save_every, mixed_precision=mixed_precision, latency_runs=latency_runs,
    )
    report = distill(teacher, output, train, eval_file, config, resume=resume, force=force, stop_after=stop_after,
                     progress=not as_json)
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
