"""What a distillation run reports: held-out exact match, parameter counts, CPU latency, as
report.json and report.md in the student folder."""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path

import torch

from pgexport.contract import INPUT_IDS
from pgexport.demo.task import KIND_PREFIXES, Sample
from pgexport.metrics import held_out_score
from pgexport.runtime import prepare_inputs
from pgexport.validate import EVAL_MAX_NEW_TOKENS  # as the parity gate's exact-match check

EVAL_BATCH = 32
LATENCY_NEW_TOKENS = 16


def _tensors(model, processor, samples) -> dict:
    inputs = prepare_inputs(processor, [s.open_image() for s in samples], [s.prefix for s in samples])
    device = next(model.parameters()).device
    tensors = {key: torch.from_numpy(value).to(device) for key, value in inputs.items()}
    # the whole prompt is prefix (bidirectional); without token_type_ids transformers masks it causally
    tensors["token_type_ids"] = torch.zeros_like(tensors[INPUT_IDS])
    return tensors


@torch.no_grad()
def answer_batch(model, processor, samples, max_new_tokens: int = EVAL_MAX_NEW_TOKENS) -> list[str]:
    """Greedy answers to one left-padded batch (stop at eos), decoded without special tokens."""
    inputs = _tensors(model, processor, samples)
    out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
    return processor.tokenizer.batch_decode(out[:, inputs[INPUT_IDS].shape[1] :], skip_special_tokens=True)


def evaluate(model, processor, samples, decode=None) -> dict:
    """Held-out exact match, overall and (on demo-task prompts) each kind's figure (score_answers;
    segment's needs `decode`)."""
    was_training = model.training
    model.eval()
    result = held_out_score(lambda chunk: answer_batch(model, processor, chunk), samples, EVAL_BATCH, KIND_PREFIXES,
                            decode)
    model.train(was_training)
    return result


@torch.no_grad()
def latency_ms(model, processor, runs: int = 5) -> float:
    """Median wall time (ms) of a batch-1 greedy generate of LATENCY_NEW_TOKENS tokens on the bundled
    sample input, after one untimed run, on the model's device."""
    from pgexport.demo import sample_inputs

    image, prompt = sample_inputs(1)[0]
    inputs = _tensors(model, processor, [Sample(image, prompt, "")])
    model.eval()
    times = []
    for run in range(runs + 1):
        started = time.perf_counter()
        model.generate(**inputs, max_new_tokens=LATENCY_NEW_TOKENS, min_new_tokens=LATENCY_NEW_TOKENS, do_sample=False)
        if run:
            times.append(1000 * (time.perf_counter() - started))
    return round(statistics.median(times), 2)


def to_markdown(report: dict) -> str:
    teacher, student = report["teacher"], report["student"]
    kept = f"{student['kept_share']:.1%}" if student["kept_share"] is not None else "-"
    lines = [
        "# Distillation report", "",
        f"Held-out exact match on {report['eval_rows']} rows; latency: PyTorch greedy generate of "
        f"{LATENCY_NEW_TOKENS} tokens, batch 1, CPU, median.", "",
        "| model | decoder layers | vision layers | parameters | exact match | latency (ms) |",
        "|---|---|---|---|---|---|",
        f"| teacher | {teacher['decoder_layers']} | {teacher['vision_layers']} | {teacher['parameters']:,} | "
        f"{teacher['exact_match']:.3f} | {teacher['latency_ms']:.1f} |",
        f"| student | {student['decoder_layers']} | {student['vision_layers']} | {student['parameters']:,} | "
        f"{student['exact_match']:.3f} (start {student['exact_match_at_start']:.3f}; {kept} of the teacher's) | "
        f"{student['latency_ms']:.1f} |",
        "",
        f"{report['steps']} optimizer steps on {report['processes']} process(es) in {report['train_seconds']} s; "
        f"alpha {report['config']['alpha']}, temperature {report['config']['temperature']}, "
        f"decoder layer map {report['config']['layer_map']}.",
    ]
    kinds = teacher.get("per_kind") or {}
    if kinds and student.get("per_kind"):
        lines += ["", "Each prompt kind (exact match; detect: boxes found at IoU >= 0.5; segment: mean mask IoU):", "",
                  "| model | " + " | ".join(kinds) + " |", "|---|" + "---|" * len(kinds)]
        for name, figures in (("teacher", kinds), ("student", student["per_kind"])):
            lines.append(f"| {name} | " + " | ".join(f"{figures[kind]:.3f}" for kind in kinds) + " |")
    if report["warning"]:
        lines += ["", f"**Warning:** {report['warning']}"]
    return "\n".join(lines) + "\n"


def write_report(report: dict, folder: Path) -> None:
    (Path(folder) / "report.json").write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    (Path(folder) / "report.md").write_text(to_markdown(report), encoding="utf-8")
