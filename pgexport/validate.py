"""The parity gate: an exported artifact against the PyTorch model it came from.

Hops are labelled so a failure says where it broke: `fp32` is transformers -> exported graphs,
`int8` is transformers -> quantized graphs. For each: logits at prefill and along the
reference's greedy path (teacher-forced, so steps stay comparable), greedy token agreement over
a left-padded batch, and on the demo model the held-out exact match.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from transformers import GenerationConfig

from pgexport.runtime import OnnxPaliGemma, left_pad_positions, open_image

PARITY_NEW_TOKENS = 16


@dataclass(frozen=True)
class Thresholds:
    """A precision's gate. max_rel_diff is max |logit difference| over the reference logit range."""

    max_rel_diff: float | None
    min_cosine: float
    min_token_agreement: float
    max_exact_match_drop: float | None  # in points (0..100)


THRESHOLDS = {
    "fp32": Thresholds(max_rel_diff=1e-4, min_cosine=0.99999, min_token_agreement=1.0, max_exact_match_drop=0.0),
    "fp16": Thresholds(max_rel_diff=1e-2, min_cosine=0.999, min_token_agreement=0.9, max_exact_match_drop=1.0),
    "int8": Thresholds(max_rel_diff=None, min_cosine=0.99, min_token_agreement=0.5, max_exact_match_drop=2.0),
}


def default_samples(n: int = 3):
    """The bundled sample inputs: demo images with prompts of different lengths (so the batch pads)."""
    from pgexport.demo import sample_inputs

    return sample_inputs(n)


def _torch_inputs(inputs: dict) -> dict:
    """Processor arrays as tensors, with token_type_ids: 0 over the whole prompt, as the processor
    gives them (without it transformers would use a causal mask over the prompt)."""
    tensors = {key: torch.from_numpy(np.asarray(value)) for key, value in inputs.items()}
    tensors.setdefault("token_type_ids", torch.zeros_like(tensors["input_ids"]))
    return tensors


def reference_generate(model, inputs: dict, new_tokens: int) -> tuple[np.ndarray, list[np.ndarray]]:
    """transformers' own greedy generate, eos ignored so every row runs `new_tokens` steps."""
    config = GenerationConfig(
        max_new_tokens=new_tokens,
        min_new_tokens=0,
        do_sample=False,
        eos_token_id=None,
        pad_token_id=model.generation_config.pad_token_id,
        bos_token_id=model.generation_config.bos_token_id,
    )
    config.output_logits = True
    config.return_dict_in_generate = True
    with torch.no_grad():
        out = model.generate(**_torch_inputs(inputs), generation_config=config)
    prompt_length = inputs["input_ids"].shape[1]
    return out.sequences[:, prompt_length:].numpy(), [step.float().numpy() for step in out.logits]


def reference_prefill_logits(model, inputs: dict) -> np.ndarray:
    with torch.no_grad():
        return model(**_torch_inputs(inputs)).logits.float().numpy()


def _logit_stats(reference: np.ndarray, candidate: np.ndarray, rows_mask: np.ndarray | None = None) -> dict:
    """max |diff|, the same over the reference's logit range, and the minimum cosine over positions."""
    ref = reference.reshape(-1, reference.shape[-1])
    cand = candidate.reshape(-1, candidate.shape[-1])
    if rows_mask is not None:
        keep = rows_mask.reshape(-1).astype(bool)
        ref, cand = ref[keep], cand[keep]
    max_abs = float(np.abs(ref - cand).max())
    span = float(ref.max() - ref.min()) or 1.0
    cosine = np.sum(ref * cand, -1) / (np.linalg.norm(ref, axis=-1) * np.linalg.norm(cand, axis=-1) + 1e-30)
    return {"max_abs_diff": max_abs, "max_rel_diff": max_abs / span, "min_cosine": float(cosine.min())}


def _agreement(reference: np.ndarray, candidate: np.ndarray) -> float:
    """Mean over rows of the share of steps before the first differing token."""
    shares = []
    for ref_row, cand_row in zip(reference, candidate):
        differ = np.nonzero(ref_row != cand_row)[0]
        shares.append((differ[0] if differ.size else len(ref_row)) / len(ref_row))
    return float(np.mean(shares))


def _prefill_logits(runtime: OnnxPaliGemma, inputs: dict) -> np.ndarray:
    decoder = runtime.sessions["decoder_model_merged"]
    batch = inputs["input_ids"].shape[0]
    embeds = runtime.prefill_embeds(inputs["input_ids"], inputs["pixel_values"])
    mask = inputs["attention_mask"].astype(np.int64)
    past = {i.name: np.zeros((batch, i.shape[1], 0, i.shape[3]), runtime.float_type) for i in runtime.past_inputs}
    feed = {"inputs_embeds": embeds.astype(runtime.float_type), "attention_mask": mask, "position_ids": left_pad_positions(mask)}
    return decoder.run(["logits"], {**feed, **past})[0].astype(np.float32)


def exact_match_of(generate, rows) -> float:
    """Share of rows whose generated answer equals the reference suffix (stripped)."""
    hits = sum(answer.strip() == row.suffix.strip() for answer, row in zip(generate(rows), rows))
    return hits / len(rows)


def check_hop(model, runtime: OnnxPaliGemma, samples, thresholds: Thresholds, eval_rows=None, reference_em=None) -> dict:
    """Compare one artifact precision with the PyTorch model; returns the hop's report."""
    images, prompts = zip(*samples)
    inputs = runtime.preprocess(list(images), list(prompts))
    ref_prefill = reference_prefill_logits(model, inputs)
    prefill = _logit_stats(ref_prefill, _prefill_logits(runtime, inputs), inputs["attention_mask"])
    ref_tokens, ref_logits = reference_generate(model, inputs, PARITY_NEW_TOKENS)
    _, forced_logits = runtime.generate_ids(**inputs, stop_at_eos=False, forced_tokens=ref_tokens, keep_logits=True)
    decode = _logit_stats(np.stack(ref_logits, 1), np.stack(forced_logits, 1))
    tokens, _ = runtime.generate_ids(**inputs, max_new_tokens=PARITY_NEW_TOKENS, stop_at_eos=False)
    report = {
        "dtype": runtime.dtype,
        "thresholds": asdict(thresholds),
        "prefill": prefill,
        "decode": {**decode, "steps": PARITY_NEW_TOKENS},
        "tokens": {
            "batch": len(prompts),
            "left_padded": bool((inputs["attention_mask"] == 0).any()),
            "new_tokens": PARITY_NEW_TOKENS,
            "identical": bool(np.array_equal(tokens, ref_tokens)),
            "agreement": _agreement(ref_tokens, tokens),
        },
    }
    if eval_rows:
        def run_artifact(rows):
            answers = []
            for start in range(0, len(rows), 16):
                chunk = rows[start : start + 16]
                generated = runtime.generate([open_image(r.image) for r in chunk], [r.prefix for r in chunk], max_new_tokens=48)
                answers += [g.text for g in generated]
            return answers

        artifact_em = exact_match_of(run_artifact, eval_rows)
        report["exact_match"] = {
            "rows": len(eval_rows),
            "reference": reference_em,
            "artifact": artifact_em,
            "change_points": round(100 * (artifact_em - reference_em), 2),
        }
    report["failures"] = _failures(report, thresholds)
    report["passed"] = not report["failures"]
    return report


def _failures(report: dict, limits: Thresholds) -> list[str]:
    failures = []
    for stage in ("prefill", "decode"):
        stats = report[stage]
        if limits.max_rel_diff is not None and stats["max_rel_diff"] > limits.max_rel_diff:
            failures.append(f"{stage} logits: max rel diff {stats['max_rel_diff']:.2e} > {limits.max_rel_diff:.0e}")
        if stats["min_cosine"] < limits.min_cosine:
            failures.append(f"{stage} logits: cosine {stats['min_cosine']:.6f} < {limits.min_cosine}")
    if report["tokens"]["agreement"] < limits.min_token_agreement:
        failures.append(f"greedy tokens: agreement {report['tokens']['agreement']:.3f} < {limits.min_token_agreement}")
    em = report.get("exact_match")
    if em and limits.max_exact_match_drop is not None and -em["change_points"] > limits.max_exact_match_drop:
        failures.append(f"exact match: dropped {-em['change_points']:.1f} points > {limits.max_exact_match_drop}")
    return failures


def reference_exact_match(model, processor, rows) -> float:
    """The PyTorch model's held-out exact match (greedy, eos-stopped, batched like the runtime)."""
    processor.tokenizer.padding_side = "left"

    def run(rows):
        answers = []
        for start in range(0, len(rows), 16):
            chunk = rows[start : start + 16]
            inputs = processor(
                images=[open_image(r.image) for r in chunk], text=[r.prefix for r in chunk], return_tensors="pt", padding="longest"
            )
            with torch.no_grad():
                out = model.generate(**inputs, max_new_tokens=48, do_sample=False)
            new = out[:, inputs["input_ids"].shape[1] :]
            answers += [t.strip() for t in processor.tokenizer.batch_decode(new, skip_special_tokens=True)]
        return answers

    return exact_match_of(run, rows)


def validate(artifact: str | Path, model, processor, dtypes=None, samples=None, eval_rows=None) -> dict:
    """Run the gate for each precision in the artifact; returns {"hops": {dtype: report}, "passed": bool}."""
    samples = samples or default_samples()
    dtypes = dtypes or OnnxPaliGemma(artifact).manifest.get("dtypes", ["fp32"])
    reference_em = reference_exact_match(model, processor, eval_rows) if eval_rows else None
    hops = {}
    for dtype in dtypes:
        runtime = OnnxPaliGemma(artifact, dtype=dtype)
        hops[dtype] = check_hop(model, runtime, samples, THRESHOLDS[dtype], eval_rows, reference_em)
    return {"hops": hops, "passed": all(hop["passed"] for hop in hops.values())}


def validate_artifact(artifact: str | Path, reference: str | Path | None = None, *, eval_file=None, allow_pickle=False) -> dict:
    """Rerun the gate of an artifact against a checkpoint (default: the one in its manifest)."""
    from pgexport.load import load_checkpoint
    from pgexport.manifest import read_manifest
    from pgexport.pipeline import eval_rows_for

    manifest = read_manifest(artifact)
    checkpoint = load_checkpoint(reference or manifest["source"]["checkpoint"], allow_pickle=allow_pickle)
    rows = eval_rows_for(checkpoint, eval_file)
    return validate(artifact, checkpoint.model, checkpoint.processor, dtypes=manifest.get("dtypes"), eval_rows=rows)
