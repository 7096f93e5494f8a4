"""`distill`: teacher checkpoint -> smaller student checkpoint, under Hugging Face accelerate.

Stages: check everything (teacher, layer maps, data, output) -> student from teacher layers ->
held-out exact match of both at the start -> train (teacher logits as soft targets, labels as
hard ones; checkpoint every `save_every` steps and at each epoch's end, eval each epoch) ->
final eval, parameter counts, CPU latency -> student checkpoint + report.json/report.md.

Run as is, it trains on one process. `accelerate launch -m pgexport.distill ...` (or torchrun)
runs the same code data-parallel: each process takes its slice of the global batch, accelerate
averages gradients (DDP, or FSDP from an accelerate config), and the loss normalisation in
`loss.py` makes N processes of batch B train exactly like one process of batch N*B.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import time
from dataclasses import asdict
from pathlib import Path

import torch

from pgexport.card import student_card, write_card
from pgexport.config import DistillConfig, make
from pgexport.distill.data import DemoTaskRows, FileRows, collate
from pgexport.distill.loss import distill_loss, hidden_pairs
from pgexport.distill.report import evaluate, latency_ms, write_report
from pgexport.distill.student import init_student, layer_map, parameter_count
from pgexport.errors import BadInputError, OutputError
from pgexport.load import Checkpoint, default_model, load_checkpoint
from pgexport.manifest import write_manifest
from pgexport.output import check_inputs_apart, check_output, staging_folder

FORMAT = "pgexport-distill/1"  # the student folder's manifest.json
PROGRESS = "progress.json"
RUN_MARK = ".pgexport-distill-run"  # in the checkpoints folder: --force may restart (remove) it


def lr_factor(step: int, steps: int, warmup: float) -> float:
    """Linear warmup over `warmup` of the steps, then cosine decay to 5% of the peak."""
    warm = max(1, round(warmup * steps))
    if step < warm:
        return (step + 1) / warm
    return 0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * (step - warm) / max(1, steps - warm)))


def work_folder(output: Path) -> Path:
    """Checkpoints and progress of a run, beside its output (removed once the student is written)."""
    return output.with_name(output.name + ".checkpoints")


def _write_json(path: Path, data: dict) -> None:
    temporary = path.with_suffix(".tmp")
    temporary.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
    os.replace(temporary, path)  # a crash leaves the previous progress.json intact


def demo_decode(teacher: Checkpoint):
    """The demo's segmentation decoder as score_answers' `decode` when the teacher is the demo model
    (its students answer in its codes), else None: segment rows then get no figure."""
    from pgexport.demo import is_demo
    from pgexport.demo.vqvae import numpy_decode

    return numpy_decode() if is_demo(teacher.source) else None


class Run:
    """One distillation run's moving parts (the loop below reads like its stages)."""

    def __init__(self, accelerator, config: DistillConfig, teacher: Checkpoint, train, eval_rows, work: Path):
        self.accelerator, self.config, self.teacher, self.train, self.eval_rows, self.work = (
            accelerator, config, teacher, train, eval_rows, work)
        self.decode = demo_decode(teacher)  # segment answers' masks, for the held-out figures
        self.world = accelerator.num_processes
        self.rows_per_step = config.batch_size * self.world * config.grad_accum
        self.steps_per_epoch = len(train) // self.rows_per_step
        self.total_steps = self.steps_per_epoch * config.epochs

    def batch(self, order: list[int], epoch: int, micro: int) -> dict:
        """This process's slice of global micro-batch `micro` of the epoch."""
        size = self.config.batch_size
        start = micro * size * self.world + self.accelerator.process_index * size
        samples = [self.train.get(epoch, i) for i in order[start : start + size]]
        batch = collate(self.teacher.processor, samples)
        return {key: value.to(self.accelerator.device) for key, value in batch.items()}

    def step_tokens(self, batches: list[dict]) -> torch.Tensor:
        """Suffix tokens of the whole optimizer step (every micro-batch, every process) per process:
        dividing each micro-batch's summed loss by it makes accumulation and data parallelism exact."""
        local = sum((batch["labels"][:, 1:] != -100).sum() for batch in batches).float()
        return (self.accelerator.reduce(local, "sum") / self.world).clamp(min=1)

    def loss(self, student, batch: dict, tokens: torch.Tensor) -> dict:
        config, accelerator = self.config, self.accelerator
        labels = batch.pop("labels")
        want_hidden = config.hidden_weight > 0
        with accelerator.autocast():
            teacher_out = None
            if config.alpha > 0 or want_hidden:
                with torch.no_grad():
                    teacher_out = self.teacher.model(**batch, use_cache=False, output_hidden_states=want_hidden)
            out = student(**batch, use_cache=False, output_hidden_states=want_hidden)
        hidden = []
        if want_hidden:
            pairs = hidden_pairs(config.layer_map, self.teacher.config.text_config.num_hidden_layers)
            hidden = [(out.hidden_states[s], teacher_out.hidden_states[t]) for s, t in pairs]
        return distill_loss(
            out.logits, labels, teacher_out.logits if teacher_out is not None else None,
            temperature=config.temperature, alpha=config.alpha, hidden_weight=config.hidden_weight,
            hidden=hidden, tokens=tokens,
        )

    def save(self, step: int, state: dict) -> None:
        """accelerate's state (weights, optimizer, RNG of every process) + progress.json, atomically."""
        accelerator = self.accelerator
        target = self.work / f"state-{step:07d}"
        accelerator.save_state(str(target), safe_serialization=False)  # tied embedding: one tensor, two names
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            _write_json(self.work / PROGRESS, {**state, "step": step, "state": target.name})
            for old in self.work.glob("state-*"):
                if old != target:
                    shutil.rmtree(old, ignore_errors=True)
        accelerator.wait_for_everyone()


def _check_resume(work: Path, config: DistillConfig, resume: bool, force: bool) -> dict | None:
    """The saved progress to resume from, or None to start afresh; refuses to mix runs."""
    progress_file = work / PROGRESS
    if resume:
        if not progress_file.is_file():
            raise BadInputError(f"nothing to resume: no {progress_file}")
        progress = json.loads(progress_file.read_text(encoding="utf-8"))
        if progress["config"] != asdict(config):
            differ = sorted(k for k, v in asdict(config).items() if progress["config"].get(k) != v)
            raise BadInputError(f"--resume with different options than the saved run ({', '.join(differ)})")
        return progress
    if work.exists() and not force:
        raise OutputError(f"{work} holds an unfinished run: pass --resume to continue it or --force to restart")
    if work.exists() and not _run_folder(work):
        raise OutputError(f"{work} exists and is not a pgexport distillation run; --force does not replace it")
    return None


def _run_folder(work: Path) -> bool:
    """A checkpoint folder a distill run made (its mark or progress file), or an empty one."""
    return work.is_dir() and not work.is_symlink() and (
        (work / RUN_MARK).is_file() or (work / PROGRESS).is_file() or not any(work.iterdir()))


def _progress_bar(enabled: bool):
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    columns = [TextColumn("distilling"), BarColumn(), MofNCompleteColumn(), TextColumn("loss {task.fields[loss]}"),
               TextColumn("{task.fields[speed]} samples/s"), TimeElapsedColumn(), TimeRemainingColumn()]
    return Progress(*columns, console=Console(stderr=True), disable=not enabled)


def distill(teacher: str | Path | None = None, output: str | Path = "student", config: DistillConfig | None = None, *,
            resume: bool = False, force: bool = False, stop_after: int | None = None, progress: bool = True,
            **options) -> dict:
    """Distill `teacher` (default: the demo model) into a smaller PaliGemma saved at `output`.

    `config` (or its fields as keywords) is a DistillConfig, the options of `pgexport distill`.
    `train`: JSONL split; None trains on the demo task generated on the fly. `eval_file`: held-out
    JSONL (default for the demo teacher: its eval split). Checkpoints go to `<output>.checkpoints`;
    `resume` continues from there (same options required). `stop_after` ends the run after that
    many optimizer steps in all, checkpointed, to be resumed later. Returns the report (with
    `stopped_at` set when stopped early). Bad input raises before any training.
    """
    from accelerate import Accelerator
    from accelerate.utils import set_seed

    from pgexport.demo import EVAL_FILE, is_demo, load_split

    config = DistillConfig(**asdict(make(DistillConfig, config, **options)))  # a copy: `sources` is filled in
    train, eval_file, output = config.train, config.eval_file, Path(output)
    # Without CUDA, cpu=True is what makes accelerate treat a torchrun / `accelerate launch` group of
    # processes as one data-parallel CPU job (gloo) rather than N independent runs.
    accelerator = Accelerator(mixed_precision=config.resolved_precision(), cpu=not torch.cuda.is_available())
    main = accelerator.is_main_process
    inputs = [teacher if teacher is not None else default_model(), train, eval_file]
    check_output(output, force, inputs)
    check_inputs_apart(work_folder(output), inputs)

    # Everything that can be wrong is checked before training starts.
    teacher = load_checkpoint(teacher)
    text_layers = teacher.config.text_config.num_hidden_layers
    vision_layers = teacher.config.vision_config.num_hidden_layers
    default_decoder = None if config.layer_map is not None else config.decoder_layers or max(1, text_layers // 2)
    config.layer_map = layer_map("decoder", text_layers, default_decoder, config.layer_map)
    config.vision_layer_map = layer_map("vision", vision_layers, config.vision_layers, config.vision_layer_map)
    config.decoder_layers, config.vision_layers = len(config.layer_map), len(config.vision_layer_map)
    train_rows = FileRows(train, config.seed) if train is not None else DemoTaskRows(config.train_rows, config.seed)
    if eval_file is None and not is_demo(teacher.source):
        raise BadInputError("--eval is required (held-out rows for the exact match) unless the teacher is the demo model")
    eval_path = Path(eval_file) if eval_file is not None else EVAL_FILE
    eval_rows = load_split(eval_path)
    config.sources = {"teacher": teacher.source, "teacher_sha256": teacher.sha256, "train": train_rows.path,
                      "eval": str(eval_path)}
    work = work_folder(output)
    run = Run(accelerator, config, teacher, train_rows, eval_rows, work)
    if run.steps_per_epoch < 1:
        raise BadInputError(f"train split has {len(train_rows)} rows; one optimizer step needs {run.rows_per_step} "
                            f"(batch size x processes x grad accum)")
    saved = _check_resume(work, config, resume, force)

    set_seed(config.seed)
    teacher.model.requires_grad_(False).eval().to(accelerator.device)
    student = init_student(teacher.model, config.layer_map, config.vision_layer_map)
    if hasattr(student.model.vision_tower, "head"):  # SigLIP's pooling head: PaliGemma never uses it
        student.model.vision_tower.head.requires_grad_(False)
    trainable = [p for p in student.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=config.lr, betas=(0.9, 0.98), weight_decay=0.0)
    student, optimizer = accelerator.prepare(student, optimizer)

    if saved:
        accelerator.load_state(str(work / saved["state"]))
        state = {key: saved[key] for key in ("config", "start", "history")}
        step = saved["step"]
    else:
        if main and work.exists():
            shutil.rmtree(work)
        accelerator.wait_for_everyone()
        work.mkdir(parents=True, exist_ok=True)
        if main:
            (work / RUN_MARK).write_text(f"{output.name}\n")
        start = {}
        if main:
            start = {"teacher": evaluate(teacher.model, teacher.processor, eval_rows, run.decode),
                     "student": evaluate(accelerator.unwrap_model(student), teacher.processor, eval_rows, run.decode)}
        state = {"config": asdict(config), "start": start, "history": []}
        step = 0

    started = time.perf_counter()
    last = {}
    with _progress_bar(progress and main) as bar:
        task = bar.add_task("distill", total=run.total_steps, completed=step, loss="-", speed="-")
        while step < run.total_steps and (stop_after is None or step < stop_after):
            epoch, in_epoch = divmod(step, run.steps_per_epoch)
            order = train_rows.epoch(epoch)
            for group in optimizer.param_groups:
                group["lr"] = config.lr * lr_factor(step, run.total_steps, config.warmup)
            tick = time.perf_counter()
            student.train()
            batches = [run.batch(order, epoch, in_epoch * config.grad_accum + m) for m in range(config.grad_accum)]
            tokens = run.step_tokens(batches)
            totals = dict.fromkeys(("loss", "kl", "ce", "hidden"), 0.0)
            for micro, batch in enumerate(batches):
                # gradients are averaged across processes only on the last micro-batch of a step
                sync = micro == len(batches) - 1
                with contextlib.nullcontext() if sync else accelerator.no_sync(student):
                    terms = run.loss(student, batch, tokens)
                    accelerator.backward(terms["loss"])
                totals = {key: totals[key] + terms[key].detach().float() for key in totals}
            accelerator.clip_grad_norm_(trainable, 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            last = {key: round(accelerator.reduce(value, "mean").item(), 6) for key, value in totals.items()}
            bar.update(task, advance=1, loss=f"{last['loss']:.4f}",
                       speed=f"{run.rows_per_step / (time.perf_counter() - tick):.1f}")
            epoch_done = step % run.steps_per_epoch == 0
            if epoch_done and main:
                result = evaluate(accelerator.unwrap_model(student), teacher.processor, eval_rows, run.decode)
                state["history"].append({"epoch": epoch + 1, "step": step, **last, **result})
                bar.console.print(f"epoch {epoch + 1}: step {step}, loss {last['loss']:.4f}, "
                                  f"held-out exact match {result['exact_match']:.3f}")
            if epoch_done or (config.save_every and step % config.save_every == 0) or step == stop_after:
                run.save(step, state)
    train_seconds = time.perf_counter() - started

    if step < run.total_steps:
        stopped = {"stopped_at": step, "total_steps": run.total_steps, "last": last, "checkpoints": str(work)}
        return stopped if main else {}
    report = {}
    if main:
        model = accelerator.unwrap_model(student).eval()
        report = finish(run, model, state, output, force, last, step, train_seconds)
        shutil.rmtree(work, ignore_errors=True)
    accelerator.wait_for_everyone()
    return report


def ends_worse(start: float, final: float) -> str | None:
    """The warning for a student whose held-out exact match fell during training (None if it did not)."""
    if final < start:
        return f"the student ends worse than it started: held-out exact match {final:.3f} < {start:.3f} at the start"
    return None


def finish(run: Run, model, state: dict, output: Path, force: bool, last: dict, steps: int, train_seconds: float) -> dict:
    """Final eval, sizes and CPU latency; write the student checkpoint and its report atomically."""
    from pgexport.pipeline import save_model_files

    config, teacher = run.config, run.teacher
    model.to("cpu")
    teacher.model.to("cpu")
    history = state["history"]
    final = history[-1] if history and history[-1]["step"] == steps else evaluate(model, teacher.processor, run.eval_rows, run.decode)
    start_student, start_teacher = state["start"]["student"], state["start"]["teacher"]
    report = {
        "teacher": {"source": teacher.source, "exact_match": start_teacher["exact_match"],
                    "per_kind": start_teacher.get("per_kind"),
                    "parameters": parameter_count(teacher.model),
                    "decoder_layers": teacher.config.text_config.num_hidden_layers,
                    "vision_layers": teacher.config.vision_config.num_hidden_layers,
                    "latency_ms": latency_ms(teacher.model, teacher.processor, config.latency_runs)},
        "student": {"exact_match": final["exact_match"], "exact_match_at_start": start_student["exact_match"],
                    "per_kind": final.get("per_kind"),
                    "parameters": parameter_count(model), "decoder_layers": config.decoder_layers,
                    "vision_layers": config.vision_layers,
                    "latency_ms": latency_ms(model, teacher.processor, config.latency_runs)},
        "eval_rows": len(run.eval_rows),
        "steps": steps, "processes": run.world, "train_seconds": round(train_seconds, 1), "final_loss": last,
        "history": state["history"], "config": asdict(config),
    }
    report["student"]["kept_share"] = (report["student"]["exact_match"] / report["teacher"]["exact_match"]
                                       if report["teacher"]["exact_match"] else None)
    report["warning"] = ends_worse(start_student["exact_match"], final["exact_match"])
    if report["warning"]:
        print(f"warning: {report['warning']}")
    with staging_folder(output, force) as staging:
        model.save_pretrained(staging)
        save_model_files(Checkpoint(model, teacher.processor, "distilled", None, teacher.family), staging)
        write_report(report, staging)
        fields = {"format": FORMAT, "source": {"teacher": teacher.source, "sha256": teacher.sha256},
                  "options": asdict(config)}
        write_card(staging, student_card(fields, report))  # before the manifest: listed and hashed
        write_manifest(staging, **fields)
    return report

