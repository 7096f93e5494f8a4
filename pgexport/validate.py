"""The parity gate: an exported artifact against the PyTorch model it came from.

The PyTorch side is computed once (`reference_outputs`), so the model can be freed before the
ONNX sessions load (a 3B model and its fp32 graphs do not fit in 24 GB together). Each hop is
labelled by the artifact precision it checks (`fp32`: transformers -> exported graphs, `int8`:
transformers -> quantized graphs). Per hop: logits at prefill and along the reference's greedy
path (teacher-forced, so steps stay comparable), greedy token agreement over a left-padded batch,
and, given held-out rows, the exact-match change. All failures are collected before deciding.
"""

from __future__ import annotations

import contextlib
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from pgexport.contract import ATTENTION_MASK, DECODER, INPUT_IDS, LOGITS, PIXEL_VALUES, SEG_DECODER
from pgexport.demo.task import KIND_PREFIXES
from pgexport.config import ValidateConfig, make
from pgexport.metrics import LogitStats, answer_rows, exact_match, logit_stats, score_answers, token_agreement
from pgexport.memory import release_freed
from pgexport.runtime import OnnxPaliGemma, open_image, prepare_inputs

PARITY_NEW_TOKENS = 16
EVAL_BATCH = 16
EVAL_MAX_NEW_TOKENS = 72  # the demo's longest answer: three segmented objects (3 x 21 tokens, 2 separators, <eos>)


@dataclass(frozen=True)
class Thresholds:
    """A precision's gate. max_rel_diff is max |logit difference| over the reference logit range.

    Exact precisions (max_rel_diff set: fp32) must match at every prompt position. For lossy ones
    min_cosine applies to the logits generation reads: each row's last prompt position and every
    step after it (the "decode" stats, which start at the prefill's last position). Prompt
    positions before the last (<bos>, image tokens, the prefix) carry logits nothing reads and
    PaliGemma never trains (its loss is on the suffix): <bos>, Gemma's attention sink with its
    outsized activations, drops to cosine 0.97 under static int8 and image tokens to 0.88 under
    4-bit weights on the demo model while every answer is unchanged. Their cosine is reported.
    """

    max_rel_diff: float | None
    min_cosine: float
    min_token_agreement: float
    max_exact_match_drop: float | None  # in points (0..100)


THRESHOLDS = {
    "fp32": Thresholds(max_rel_diff=1e-4, min_cosine=0.99999, min_token_agreement=1.0, max_exact_match_drop=0.0),
    "fp16": Thresholds(max_rel_diff=None, min_cosine=0.999, min_token_agreement=0.75, max_exact_match_drop=1.0),
    "int8": Thresholds(max_rel_diff=None, min_cosine=0.99, min_token_agreement=0.5, max_exact_match_drop=2.0),
    "int8-static": Thresholds(max_rel_diff=None, min_cosine=0.99, min_token_agreement=0.5, max_exact_match_drop=2.0),
    "q4": Thresholds(max_rel_diff=None, min_cosine=0.98, min_token_agreement=0.5, max_exact_match_drop=3.0),
}


@dataclass
class Reference:
    """What the PyTorch model produced on the gate's inputs."""

    inputs: dict  # processor arrays of the left-padded sample batch
    prefill_logits: np.ndarray  # [batch, prompt, vocab]
    tokens: np.ndarray  # greedy new tokens [batch, PARITY_NEW_TOKENS], eos ignored
    step_logits: np.ndarray  # [batch, PARITY_NEW_TOKENS, vocab]
    eval_rows: list | None = None
    exact_match: float | None = None
    eval_answers: list[str] | None = None  # its answers to eval_rows, scored per kind beside the artifact's


def default_samples(n: int = 3):
    """The bundled sample inputs: demo images with prompts of different lengths (so the batch pads)."""
    from pgexport.demo import sample_inputs

    return sample_inputs(n)


def _torch_inputs(inputs: dict) -> dict:
    """Processor arrays as tensors, with token_type_ids 0 over the whole prompt, as the processor
    gives them (without it transformers would use a causal mask over the prompt)."""
    tensors = {key: torch.from_numpy(np.asarray(value)) for key, value in inputs.items()}
    tensors.setdefault("token_type_ids", torch.zeros_like(tensors[INPUT_IDS]))
    return tensors


@contextlib.contextmanager
def _eos_disabled(model, disabled: bool):
    """generate() fills an unset eos_token_id from the model's generation config, so ignoring eos
    means clearing it there for the call; always restored."""
    saved = model.generation_config.eos_token_id
    if disabled:
        model.generation_config.eos_token_id = None
    try:
        yield
    finally:
        model.generation_config.eos_token_id = saved


def reference_generate(model, inputs: dict, new_tokens: int, stop_at_eos: bool = False):
    """transformers' own greedy generate -> (new tokens [batch, steps], per-step logits)."""
    with _eos_disabled(model, not stop_at_eos), torch.no_grad():
        out = model.generate(
            **_torch_inputs(inputs),
            max_new_tokens=new_tokens,
            do_sample=False,
            output_logits=True,
            return_dict_in_generate=True,
        )
    prompt_length = inputs[INPUT_IDS].shape[1]
    return out.sequences[:, prompt_length:].numpy(), [step.float().numpy() for step in out.logits]


def eval_rows_for(checkpoint, eval_file: str | Path | None):
    """Held-out rows for the exact-match check: the given file, or the demo split for the demo
    model (None otherwise: the gate then has no exact-match figure)."""
    from pgexport.demo import EVAL_FILE, is_demo, load_split

    if eval_file is not None:
        return load_split(eval_file)
    if is_demo(checkpoint.source):
        return load_split(EVAL_FILE)
    return None


def reference_outputs(model, processor, samples=None, eval_rows=None) -> Reference:
    """Run the PyTorch model once on everything the gate compares."""
    images, prompts = zip(*(samples or default_samples()))
    inputs = prepare_inputs(processor, list(images), list(prompts))
    with torch.no_grad():
        prefill = model(**_torch_inputs(inputs)).logits.float().numpy()
    tokens, step_logits = reference_generate(model, inputs, PARITY_NEW_TOKENS)
    reference = Reference(inputs, prefill, tokens, np.stack(step_logits, 1), eval_rows)
    if eval_rows:

        def answer(chunk) -> list[str]:
            batch = prepare_inputs(processor, [open_image(r.image) for r in chunk], [r.prefix for r in chunk])
            new, _ = reference_generate(model, batch, EVAL_MAX_NEW_TOKENS, stop_at_eos=True)
            return processor.tokenizer.batch_decode(new, skip_special_tokens=True)

        reference.eval_answers = answer_rows(answer, eval_rows, EVAL_BATCH)
        reference.exact_match = exact_match(reference.eval_answers, [row.suffix for row in eval_rows])
    return reference


def checkpoint_reference(source: str | Path | None, eval_file: str | Path | None = None, allow_pickle: bool = False) -> Reference:
    """`reference_outputs` of the checkpoint at `source` (None: the demo model), with its model
    freed before this returns, so the ONNX sessions that follow never load beside it."""
    from pgexport.load import load_checkpoint

    checkpoint = load_checkpoint(source, allow_pickle=allow_pickle)
    reference = reference_outputs(checkpoint.model, checkpoint.processor, eval_rows=eval_rows_for(checkpoint, eval_file))
    del checkpoint
    release_freed()  # the PyTorch weights, and the cycles the reference run left
    return reference


@contextlib.contextmanager
def logits_on_disk(reference: Reference):
    """The reference's logit arrays (0.9 GB at 3B) moved to .npy files in a temporary folder and
    read back memory-mapped for the block: quantization, which runs between the reference and the
    gate, then has that memory too (the fp16 probe's peak was 13.9 GB with them resident), and
    the gate pages in the rows it compares. Same values; the folder is removed when the block ends."""
    import tempfile

    with tempfile.TemporaryDirectory(prefix="pgexport-reference-") as folder:
        for name in ("prefill_logits", "step_logits"):
            path = Path(folder) / f"{name}.npy"
            np.save(path, getattr(reference, name))
            setattr(reference, name, np.load(path, mmap_mode="r"))  # stays readable once unlinked (POSIX)
        yield reference


def prefill_stats(runtime: OnnxPaliGemma, reference: Reference, embeds: np.ndarray | None = None) -> dict:
    """logit_stats of the artifact's prefill logits (every prompt position) against the reference's,
    the decoder run one row at a time: a 3B batch's logits are 0.8 GB, which a 16 GB runner cannot
    hold beside the reference's and the fp32 graphs (benchmarks/results/memory_3b.md).
    `embeds`: the prompt's embeddings from `runtime.prefill_embeds`, when computed already."""
    inputs = reference.inputs
    feed = runtime.prefill_feed(inputs[INPUT_IDS], inputs[ATTENTION_MASK], inputs[PIXEL_VALUES], embeds=embeds)
    stats = LogitStats()
    for row in range(inputs[INPUT_IDS].shape[0]):
        logits = runtime.sessions[DECODER.name].run([LOGITS], {k: v[row:row + 1] if v.ndim else v for k, v in feed.items()})[0]
        stats.add(reference.prefill_logits[row], logits.astype(np.float32, copy=False), inputs[ATTENTION_MASK][row])
        del logits
    return stats.result()


def check_hop(runtime: OnnxPaliGemma, reference: Reference, thresholds: Thresholds) -> dict:
    """Compare one artifact precision with the reference; returns the hop's report.

    The prompt's embeddings (vision encoder and token table) are computed once, before the decoder
    runs, so a `low_memory` runtime never holds the vision and decoder weights together."""
    inputs = reference.inputs
    embeds = runtime.prefill_embeds(inputs[INPUT_IDS], inputs[PIXEL_VALUES])
    prefill = prefill_stats(runtime, reference, embeds)
    _, forced = runtime.generate_ids(**inputs, stop_at_eos=False, forced_tokens=reference.tokens, keep_logits=True,
                                     embeds=embeds)
    tokens, _ = runtime.generate_ids(**inputs, max_new_tokens=PARITY_NEW_TOKENS, stop_at_eos=False, embeds=embeds)
    report = {
        "dtype": runtime.dtype,
        "thresholds": asdict(thresholds),
        "prefill": prefill,
        "decode": {**logit_stats(reference.step_logits, np.stack(forced, 1)), "steps": PARITY_NEW_TOKENS},
        "tokens": {
            "batch": int(inputs[INPUT_IDS].shape[0]),
            "left_padded": bool((inputs[ATTENTION_MASK] == 0).any()),
            "new_tokens": PARITY_NEW_TOKENS,
            "identical": bool(np.array_equal(tokens, reference.tokens)),
            "agreement": token_agreement(reference.tokens, tokens),
        },
    }
    if reference.eval_rows:
        rows = reference.eval_rows

        def answer(chunk) -> list[str]:
            generated = runtime.generate([open_image(r.image) for r in chunk], [r.prefix for r in chunk], EVAL_MAX_NEW_TOKENS)
            return [g.text for g in generated]

        answers = answer_rows(answer, rows, EVAL_BATCH)
        artifact_em = exact_match(answers, [row.suffix for row in rows])
        report["exact_match"] = {
            "rows": len(rows),
            "reference": reference.exact_match,
            "artifact": artifact_em,
            "change_points": round(100 * (artifact_em - reference.exact_match), 2),
        }
        # Each prompt kind's figure (on demo-task prompts: detect and segment by IoU against the
        # suffixes, segment's masks through the artifact's own fp32 seg decoder), reference and artifact.
        decode = seg_decode(runtime) if runtime.has_seg_decoder else None
        kinds = [score_answers(a, rows, KIND_PREFIXES, decode).get("per_kind") if a is not None else None
                 for a in (reference.eval_answers, answers)]
        if kinds[0] is not None:
            report["exact_match"]["per_kind"] = {"reference": kinds[0], "artifact": kinds[1]}
    report["failures"] = gate_failures(report, thresholds)
    report["passed"] = not report["failures"]
    return report


def seg_decode(runtime):
    """codes [n, 16] -> mask logits [n, 64, 64] through the artifact's seg decoder (score_answers' `decode`)."""
    session = runtime.sessions[SEG_DECODER.name]
    return lambda codes: session.run(None, {SEG_DECODER.inputs[0].name: np.asarray(codes, dtype=np.int64)})[0]


def gate_failures(report: dict, limits: Thresholds) -> list[str]:
    """Every limit missed. Written as `not value <= limit`, so a NaN (a graph that overflowed) fails."""
    failures = []
    for stage in ("prefill", "decode") if limits.max_rel_diff is not None else ("decode",):
        stats = report[stage]
        if limits.max_rel_diff is not None and not stats["max_rel_diff"] <= limits.max_rel_diff:
            failures.append(f"{stage} logits: max rel diff {stats['max_rel_diff']:.2e} > {limits.max_rel_diff:.0e}")
        if not stats["min_cosine"] >= limits.min_cosine:
            failures.append(f"{stage} logits: cosine {stats['min_cosine']:.6f} < {limits.min_cosine}")
    if report["tokens"]["agreement"] < limits.min_token_agreement:
        failures.append(f"greedy tokens: agreement {report['tokens']['agreement']:.3f} < {limits.min_token_agreement}")
    em = report.get("exact_match")
    if em and limits.max_exact_match_drop is not None and -em["change_points"] > limits.max_exact_match_drop:
        failures.append(f"exact match: dropped {-em['change_points']:.1f} points > {limits.max_exact_match_drop}")
    return failures


def validate(artifact: str | Path, reference: Reference, dtypes: list[str], thresholds: dict | None = None) -> dict:
    """Run the gate for each precision (`thresholds`: dtype -> Thresholds, default THRESHOLDS);
    returns {"hops": {dtype: report}, "passed": bool}."""
    thresholds = thresholds or THRESHOLDS
    hops = {dtype: check_hop(OnnxPaliGemma(artifact, dtype=dtype, low_memory=True), reference, thresholds[dtype])
            for dtype in dtypes}
    return {"hops": hops, "passed": all(hop["passed"] for hop in hops.values())}


def validate_artifact(artifact: str | Path, config: ValidateConfig | None = None, *, allow_pickle: bool = False,
                      **options) -> dict:
    """Rerun the gate of an artifact against a checkpoint (default: the one in its manifest).

    `config` (or its fields as keywords: `validate_artifact(out, reference=..., eval_file=...)`) is a
    ValidateConfig, the options of `pgexport validate`."""
    from pgexport.manifest import read_manifest

    config = make(ValidateConfig, config, **options)
    manifest = read_manifest(artifact)
    reference = checkpoint_reference(config.reference or manifest["source"]["checkpoint"], config.eval_file, allow_pickle)
    return validate(artifact, reference, manifest.get("dtypes", ["fp32"]))
