"""Hop 1 of the Core ML parity chain, runnable anywhere: the export wrappers (exactly the modules
coremltools traces) against transformers' own generate, in fp32 PyTorch.

One prompt at a time (batch 1, as the packages take it): prefill through the wrapper's state, then
a greedy decode loop that feeds each token back, so every step exercises the in-place cache update,
the mask/end convention and the 1-based positions. Hop 2 (the packages on the Core ML runtime)
needs macOS: see pgexport.coreml.validate.
"""

from __future__ import annotations

import numpy as np
import torch

from pgexport.contract import INPUT_IDS, PIXEL_VALUES
from pgexport.coreml.wrappers import BLOCKED, StatefulDecoder, VisionEncoder
from pgexport.metrics import logit_stats
from pgexport.runtime import prepare_inputs

# fp32 wrappers must match transformers as the ONNX fp32 gate does: logits within 1e-4 of the
# reference's logit range, greedy tokens identical.
MAX_REL_DIFF = 1e-4
PARITY_NEW_TOKENS = 8


def prefill_mask(prompt_length: int) -> torch.Tensor:
    """The prefix-LM mask of a prefill: every prompt token attends to every prompt token."""
    return torch.zeros(1, 1, prompt_length, prompt_length)


def decode_mask(end: int) -> torch.Tensor:
    """A decoded token attends to the whole cache up to and including itself."""
    return torch.zeros(1, 1, 1, end)


def wrapper_generate(decoder: StatefulDecoder, vision: VisionEncoder, input_ids, pixel_values, new_tokens: int):
    """Greedy decoding through the wrappers as an app drives the packages -> (tokens, per-step logits [steps, vocab])."""
    decoder.reset()
    with torch.no_grad():
        features = vision(torch.as_tensor(pixel_values))
        ids = torch.as_tensor(input_ids).to(torch.int32)
        end = ids.shape[1]
        logits = decoder(ids, features, prefill_mask(end))
        tokens, steps = [], []
        for _ in range(new_tokens):
            steps.append(logits[0, -1].float().numpy())
            tokens.append(int(logits[0, -1].argmax()))
            end += 1
            # Decode calls need no image rows: one dummy row satisfies the input's shape.
            logits = decoder(torch.tensor([[tokens[-1]]], dtype=torch.int32), features[:, :1], decode_mask(end))
    return np.array(tokens), np.stack(steps)


def check_wrappers(model, processor, samples=None, new_tokens: int = PARITY_NEW_TOKENS) -> dict:
    """Compare the wrappers with transformers' greedy generate on each sample; returns the report
    {"rows": [...], "max_rel_diff", "tokens_identical", "passed", "failures"}."""
    from pgexport.validate import default_samples, reference_generate

    samples = samples or default_samples(3)
    prompt_max = max(len(processor.tokenizer(p).input_ids) for _, p in samples)
    context = model.config.text_config.num_image_tokens + prompt_max + new_tokens + 2
    decoder, vision = StatefulDecoder(model, context).eval(), VisionEncoder(model).eval()
    rows = []
    for image, prompt in samples:
        inputs = prepare_inputs(processor, [image], [prompt])
        ref_tokens, ref_logits = reference_generate(model, inputs, new_tokens)
        tokens, logits = wrapper_generate(decoder, vision, inputs[INPUT_IDS], inputs[PIXEL_VALUES], new_tokens)
        stats = logit_stats(np.stack([step[0] for step in ref_logits]), logits)
        rows.append({
            "prompt": prompt,
            "prompt_tokens": int(inputs[INPUT_IDS].shape[1]),
            "max_abs_diff": stats["max_abs_diff"],
            "max_rel_diff": stats["max_rel_diff"],
            "tokens_identical": bool(np.array_equal(tokens, ref_tokens[0])),
            "tokens": tokens.tolist(),
        })
    report = {
        "hop": "transformers -> export wrappers (fp32 PyTorch)",
        "new_tokens": new_tokens,
        "rows": rows,
        "max_rel_diff": max(row["max_rel_diff"] for row in rows),
        "tokens_identical": all(row["tokens_identical"] for row in rows),
        "mask_blocked_value": BLOCKED,
    }
    report["failures"] = [
        *([f"logits: max rel diff {report['max_rel_diff']:.2e} > {MAX_REL_DIFF:.0e}"] if report["max_rel_diff"] > MAX_REL_DIFF else []),
        *(["greedy tokens differ"] if not report["tokens_identical"] else []),
    ]
    report["passed"] = not report["failures"]
    return report
