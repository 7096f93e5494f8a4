"""`pgexport` command line: each command calls the library function of the same name and options."""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import signal
import sys
from pathlib import Path
from typing import NoReturn

import click

from pgexport import __version__
from pgexport.errors import EXIT_INTERNAL, BadInputError, GateFailedError, OutputError, PgExportError, missing_export_extra
from pgexport.cli_options import cli_options, config_from, reads_checkpoint, run_options
from pgexport.config import BenchConfig, ExportConfig, ValidateConfig
from pgexport.contract import GRAPH_FORMATS
from pgexport.tables import console, output_width, print_parity, print_sizes, seg_parity_line

def quiet_third_party() -> None:
    """Keep libraries' chatter out of pgexport's output: transformers' tqdm bars ('Loading weights',
    'Writing model shards'; huggingface_hub's download bars go with them, pgexport's stage bar says
    'loading checkpoint' meanwhile) and its warnings (pgexport reports what matters itself: a missing
    weight is an error, not a warning), and the log lines of coremltools known to be harmless
    (pgexport.coreml.HARMLESS_COREMLTOOLS_LOGS; its bars are off during conversion). pgexport's own
    progress (rich, on stderr) and errors stay.

    transformers is not imported for this (commands that run an artifact never import it): the
    environment variables it and huggingface_hub read at import do the same, unless the user set them."""
    from pgexport.coreml import COREMLTOOLS_LOGGERS, HARMLESS_COREMLTOOLS_FILTER

    if "transformers" in sys.modules:  # already imported (the CLI called from Python): set it directly
        from transformers.utils import logging as transformers_logging

        transformers_logging.set_verbosity_error()
        transformers_logging.disable_progress_bar()
    else:
        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    for name in COREMLTOOLS_LOGGERS:
        logging.getLogger(name).addFilter(HARMLESS_COREMLTOOLS_FILTER)


def os_error_exit(error: OSError) -> int | None:
    """The exit code of an OSError that is the machine's, not a bug: a full or read-only disk, or
    an output folder we may not write is 5; an input we may not read is 4. None: a bug (1)."""
    if error.errno in (errno.ENOSPC, errno.EDQUOT, errno.EROFS):
        return OutputError.exit_code
    if error.errno in (errno.EACCES, errno.EPERM):
        unreadable = error.filename and os.path.exists(error.filename) and not os.access(error.filename, os.R_OK)
        return BadInputError.exit_code if unreadable else OutputError.exit_code
    return None


class Terminated(KeyboardInterrupt):
    """SIGTERM (a cancelled CI job, `kill`), raised where the command is: it unwinds like Ctrl-C, so
    the staging folder and temporary files go at once, not at the next run."""


@contextlib.contextmanager
def terminate_as_interrupt():
    """SIGTERM raises Terminated for the block (the main thread only: elsewhere signals stay as they are)."""
    def terminated(signum, frame):
        raise Terminated()

    try:
        previous = signal.signal(signal.SIGTERM, terminated)
    except ValueError:  # not the main thread
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


class Command(click.Group):
    """Turns PgExportError into its one-line message and exit code; other errors are internal."""

    def invoke(self, ctx):
        try:
            with terminate_as_interrupt():
                return super().invoke(ctx)
        except GateFailedError as error:
            if error.report:
                print_parity(console, error.report)
            click.echo(f"error: {error}", err=True)
            sys.exit(error.exit_code)
        except PgExportError as error:
            click.echo(f"error: {error}", err=True)
            sys.exit(error.exit_code)
        except (click.exceptions.Exit, click.ClickException, click.Abort, SystemExit):
            raise
        except ImportError as error:  # the exporter's modules in a runtime-only install: exit 7, else a bug
            unsupported = missing_export_extra(error) or internal_error(error)
            click.echo(f"error: {unsupported}", err=True)
            sys.exit(unsupported.exit_code)
        except KeyboardInterrupt as interrupt:
            terminated = isinstance(interrupt, Terminated)
            click.echo(f"{'terminated' if terminated else 'interrupted'}: nothing was written at the output path",
                       err=True)
            sys.exit(128 + (signal.SIGTERM if terminated else signal.SIGINT))
        except OSError as error:
            code = os_error_exit(error) or internal_error(error)
            # The disk or the permissions, not pgexport: the staging folder is gone, the old output untouched.
            click.echo(f"error: {error.filename or 'the output'}: {error.strerror}", err=True)
            sys.exit(code)
        except Exception as error:  # noqa: BLE001 - the last line of defence, with its own exit code
            internal_error(error)


def internal_error(error: BaseException) -> NoReturn:
    """Exit 1 with the error's one line: a bug in pgexport."""
    click.echo(f"internal error: {type(error).__name__}: {error}", err=True)
    sys.exit(EXIT_INTERNAL)


@click.group(cls=Command, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="pgexport")
def main():
    """PaliGemma checkpoints to validated edge artifacts (ONNX Runtime, Core ML).

    MODEL is a local checkpoint folder or a hub id; omitted, the demo model shipped in the package.
    """
    quiet_third_party()
    console.width = output_width(console.file)  # here: stdout is the one this command writes to


@main.command("onnx")
@reads_checkpoint("out", "Artifact folder to create.")
@cli_options(ExportConfig)
@run_options()
def onnx_command(model, output, force, allow_pickle, as_json, **options):
    """Export MODEL to ONNX (vision_encoder, embed_tokens, decoder_model_merged) and validate it.

    --int8 / --int4 / --fp16 add quantized variants; --vision / --decoder / --embed set one graph's
    precision on top of them (or alone make one mixed variant), e.g. --vision int8 --decoder q4 --embed q4.
    """
    from pgexport.pipeline import export_onnx

    manifest = export_onnx(model, output, config_from(ExportConfig, options), force=force, allow_pickle=allow_pickle,
                           progress=not as_json)
    if as_json:
        click.echo(json.dumps(manifest, indent=2))
        return
    if manifest["parity"]:
        print_parity(console, manifest["parity"])
    if manifest.get("seg_decoder"):
        click.echo(seg_parity_line(manifest["seg_decoder"]))  # one line, never wrapped
    if manifest.get("sizes"):
        print_sizes(console, manifest["sizes"])
    total = sum(entry["bytes"] for entry in manifest["files"].values())
    console.print(f"wrote {output} ({len(manifest['files'])} files, {total / 1e6:.1f} MB)")


@main.command("generate")
@click.argument("artifact", type=click.Path(path_type=Path))
@click.option("--image", "images", multiple=True, required=True, type=click.Path(path_type=Path), help="Image file; repeat for a batch.")
@click.option("--prompt", "prompts", multiple=True, required=True, help="Prompt; one, or one per --image.")
@click.option("--max-new-tokens", type=click.IntRange(1), default=32, show_default=True,
              help="At most this many tokens per answer; capped (a line on stderr says so) to what the model's context leaves after the prompt.")
@click.option("--dtype", help="Precision or variant among the manifest's dtypes (fp32, int8, q4, ...; default: the artifact's).")
@click.option("--check", is_flag=True, help="Also check the sha256 of each graph file loaded against manifest.json (sizes are always checked).")
@click.option("--graph-format", type=click.Choice(GRAPH_FORMATS), default="onnx", show_default=True,
              help="Run the .onnx graphs, or the ORT format ones (.ort, ONNX Runtime Mobile's) an --ort-format export wrote.")
@click.option("--json", "as_json", is_flag=True, help="Print text, token ids, boxes (a detect answer's, in the image's pixels) "
                                                      "and masks (a segment answer's, as COCO RLE; needs a seg decoder) as JSON.")
@click.option("--draw", type=click.Path(path_type=Path),
              help="Write each image with its answer's boxes and masks drawn: one --image to DRAW; several to DRAW-0, DRAW-1, ... "
                   "(out.png -> out-0.png, out-1.png). A file there is replaced; an input never is (exit 5).")
def generate_command(artifact, images, prompts, max_new_tokens, dtype, check, graph_format, as_json, draw):
    """Answer prompts about images with an exported ARTIFACT on ONNX Runtime (greedy).

    A prompt (image tokens included) that leaves no room in the model's context is refused (exit 4).
    """
    from pgexport.errors import BadInputError
    from pgexport.runtime import OnnxPaliGemma, open_image
    from pgexport.structured import draw_boxes, drawing_paths, save_drawing

    if len(prompts) == 1:
        prompts = prompts * len(images)
    if len(prompts) != len(images):
        raise BadInputError(f"{len(prompts)} prompts for {len(images)} images: give one prompt, or one per image")
    drawings = drawing_paths(draw, len(images), [*images, artifact]) if draw else []  # before any work
    loaded = [open_image(path) for path in images]
    runtime = OnnxPaliGemma(artifact, dtype=dtype, check=check, graph_format=graph_format)
    results = runtime.generate(loaded, list(prompts), max_new_tokens=max_new_tokens)
    if as_json:
        rows = [{"image": str(i), "prompt": p, "text": r.text, "tokens": r.tokens, "boxes": [b.as_json() for b in r.boxes],
                 "masks": [m.as_json() for m in r.masks]} for i, p, r in zip(images, prompts, results)]
        click.echo(json.dumps(rows if len(rows) > 1 else rows[0], indent=2))
    else:
        for result in results:
            click.echo(result.text)
    if not runtime.has_seg_decoder and any(box.codes for result in results for box in result.boxes):
        click.echo(f"note: an answer has mask codes, but {artifact} has no seg decoder to turn them into masks: "
                   "export with --seg-decoder vae-oid.npz", err=True)
    for path, image, result in zip(drawings, loaded, results):
        save_drawing(draw_boxes(image, result.boxes, result.masks), path)
        click.echo(f"drew {len(result.boxes)} box(es) and {len(result.masks)} mask(s) on {path}", err=True)


@main.command("validate")
@click.argument("artifact", type=click.Path(path_type=Path))
@cli_options(ValidateConfig)
@click.option("--allow-pickle", is_flag=True, help="Allow non-safetensors (pickle) weights in the reference.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
def validate_command(artifact, allow_pickle, as_json, **options):
    """Rerun the parity gate of ARTIFACT against the PyTorch model; exit 6 when it fails."""
    from pgexport.manifest import read_manifest

    if read_manifest(artifact).get("format", "").startswith("pgexport-coreml/"):
        from pgexport.coreml.validate import report_lines, validate_coreml

        config = config_from(ValidateConfig, options)
        report = validate_coreml(artifact, config.reference, allow_pickle=allow_pickle)
        click.echo(json.dumps(report, indent=2) if as_json else "\n".join(report_lines(report)))
        if not report["passed"]:
            raise GateFailedError("Core ML artifact checks failed")
        return
    from pgexport.validate import validate_artifact

    report = validate_artifact(artifact, config_from(ValidateConfig, options), allow_pickle=allow_pickle)
    if as_json:
        click.echo(json.dumps(report, indent=2))
    else:
        print_parity(console, report)
    if not report["passed"]:
        raise GateFailedError("parity gate failed")


@main.command("verify")
@click.argument("artifact", type=click.Path(path_type=Path))
def verify_command(artifact):
    """Check every file of ARTIFACT against manifest.json (hash, size, nothing missing or extra); exit 4 if not."""
    from pgexport.errors import BadInputError
    from pgexport.manifest import verify

    problems = verify(artifact)
    for problem in problems:
        click.echo(problem)
    if problems:
        raise BadInputError(f"{artifact}: {len(problems)} file(s) do not match manifest.json")
    click.echo(f"{artifact}: every file matches manifest.json")


@main.command("build")
@click.argument("recipe", type=click.Path(path_type=Path))
@click.option("-o", "--output", type=click.Path(path_type=Path), help="Build folder (default: the recipe's `output`).")
@click.option("--force", is_flag=True, help="Redo every stage, even those a previous run finished.")
@click.option("--json", "as_json", is_flag=True, help="Print the build summary as JSON instead of tables.")
def build_command(recipe, output, force, as_json):
    """Build every artifact RECIPE (YAML) names: cached stages, gates, a verified manifest.json.

    Exit codes: 0 built and verified; 6 a gate failed (all written, manifest.json says which);
    3 bad model; 4 bad recipe (the message names the key) or a file does not verify;
    5 the output is not a build folder; 1 internal error.
    """
    from pgexport.build import BuildGateFailed, build, summary_tables

    def show(summary):
        if as_json:
            click.echo(json.dumps(summary, indent=2))
            return
        for table in summary_tables(summary):
            console.print(table)
        if summary.get("pruned"):
            console.print(f"removed the folders of stages the recipe no longer names: {', '.join(summary['pruned'])}")
        console.print(f"wrote {summary['output']} ({summary['files']} files, {summary['bytes'] / 1e6:.1f} MB)")

    try:
        summary = build(recipe, output, force=force, progress=not as_json)
    except BuildGateFailed as error:
        show(error.summary)
        raise
    show(summary)


@main.command("bench")
@click.argument("targets", nargs=-1, required=True)
@cli_options(BenchConfig)
@click.option("--json", "json_path", type=click.Path(path_type=Path), help="Write the full report (environment, floors, results) here.")
@click.option("--markdown", "markdown_path", type=click.Path(path_type=Path), help="Write the markdown table here.")
@click.option("--plot", "plot_path", type=click.Path(path_type=Path), help="Write a latency-vs-batch PNG here (needs matplotlib).")
def bench_command(targets, json_path, markdown_path, plot_path, **options):
    """Time TARGETs (artifact or checkpoint folders) on the same inputs: load, vision, time to first
    token, per-output-token latency, tokens/s, peak memory, each against its physical floor."""
    from pgexport.bench import bench, to_markdown

    report = bench(list(targets), config_from(BenchConfig, options), json_path=json_path, markdown_path=markdown_path,
                   plot_path=plot_path)
    click.echo(to_markdown(report))
    if report["plot"] and report["plot"]["skipped"]:
        click.echo(f"plot skipped: {report['plot']['skipped']}", err=True)


# Commands of the later stages live beside their code; each keeps its heavy imports inside.
from pgexport.coreml.cli import coreml_command  # noqa: E402
from pgexport.distill.cli import distill_command  # noqa: E402
from pgexport.quantize.cli import quantize_command  # noqa: E402

for command in (quantize_command, coreml_command, distill_command):
    main.add_command(command)

if __name__ == "__main__":
    main()
