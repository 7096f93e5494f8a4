"""`pgexport validate` on a Core ML artifact.

Everywhere: every file against manifest.json, and the saved specs (inputs, outputs, states, target,
stateful and compression ops). On macOS, where Core ML can predict: hop 2 of the parity chain, the
packages against transformers on the same prompts (greedy tokens through prefill + a decode loop on
the package's state, logits cosine and difference). Elsewhere the report says plainly that runtime
parity was skipped, and why.
"""

from __future__ import annotations

import platform
from pathlib import Path

import numpy as np

from pgexport.contract import (
    ATTENTION_MASK,
    CODES,
    COREML_DECODER,
    COREML_SEG_DECODER,
    COREML_VISION,
    IMAGE,
    IMAGE_FEATURES,
    INPUT_IDS,
    LOGITS,
    MASK_LOGITS,
)
from pgexport.coreml.parity import decode_mask, prefill_mask
from pgexport.metrics import logit_stats, token_agreement

RUNTIME_NEW_TOKENS = 8
# fp16 packages: same greedy tokens as transformers on most of the way, near-identical logits;
# compressed packages are graded on logits only (the demo model's int8/int4 tokens may drift).
MIN_COSINE = {"none": 0.995, "int8": 0.99, "int4": 0.95, "palettize4": 0.95}
MIN_TOKEN_AGREEMENT = {"none": 0.5}
# seg_decoder.mlpackage computes in fp16 (unit roundoff 4.9e-4): its weights and every layer's output
# are rounded to fp16, about 10 layers deep, each output a sum of up to 1152 products. 2e-2 of the
# largest |logit| leaves 4x room over 10 layers of (weights + output) rounding at sqrt(1152) u each;
# not measured here (Core ML predicts on macOS only).
SEG_FP16_REL = 2e-2


def runtime_unavailable() -> str | None:
    """Why Core ML cannot run predictions here, or None when it can."""
    if platform.system() != "Darwin":
        return f"Core ML prediction needs macOS (this is {platform.system()}); runtime parity was skipped"
    try:
        from coremltools import libcoremlpython  # noqa: F401  - present only in macOS wheels
    except ImportError as error:
        return f"coremltools has no Core ML runtime binding ({error}); runtime parity was skipped"
    return None


def coreml_generate(vision, decoder, image, input_ids: np.ndarray, image_size: int, new_tokens: int):
    """Greedy decoding on the Core ML packages (macOS) -> (tokens, per-step logits [steps, vocab]).

    `vision` and `decoder` need only coremltools' `predict` (and `make_state` for the decoder)."""
    from pgexport.runtime import to_rgb

    frame = to_rgb(image).resize((image_size, image_size), resample=3)  # bicubic, as the processor resizes
    features = np.asarray(vision.predict({IMAGE: frame})[IMAGE_FEATURES]).astype(np.float16)
    state = decoder.make_state()
    ids = input_ids.astype(np.int32)
    end = ids.shape[1]
    feed = {INPUT_IDS: ids, IMAGE_FEATURES: features, ATTENTION_MASK: prefill_mask(end).numpy().astype(np.float16)}
    logits = decoder.predict(feed, state=state)[LOGITS]
    tokens, steps = [], []
    for _ in range(new_tokens):
        steps.append(np.asarray(logits)[0, -1].astype(np.float32))
        tokens.append(int(steps[-1].argmax()))
        end += 1
        feed = {INPUT_IDS: np.array([[tokens[-1]]], dtype=np.int32), IMAGE_FEATURES: features[:, :1],
                ATTENTION_MASK: decode_mask(end).numpy().astype(np.float16)}
        logits = decoder.predict(feed, state=state)[LOGITS]
    return np.array(tokens), np.stack(steps)


def compare_runtime(checkpoint, vision, decoder, compress: str, samples=None) -> dict:
    """Greedy tokens and logits of `vision` + `decoder` against transformers on the sample prompts."""
    from pgexport.runtime import prepare_inputs
    from pgexport.validate import default_samples, reference_generate

    size = checkpoint.config.vision_config.image_size
    rows = []
    for image, prompt in samples or default_samples(3):
        inputs = prepare_inputs(checkpoint.processor, [image], [prompt])
        ref_tokens, ref_logits = reference_generate(checkpoint.model, inputs, RUNTIME_NEW_TOKENS)
        tokens, logits = coreml_generate(vision, decoder, image, inputs[INPUT_IDS], size, RUNTIME_NEW_TOKENS)
        stats = logit_stats(np.stack([step[0] for step in ref_logits]), logits)
        rows.append({
            "prompt": prompt,
            "max_rel_diff": stats["max_rel_diff"],
            "min_cosine": stats["min_cosine"],
            "token_agreement": token_agreement(ref_tokens[0], tokens),
        })
    report = {
        "hop": f"transformers -> Core ML packages ({compress}, fp16 compute)",
        "rows": rows,
        "min_cosine": min(r["min_cosine"] for r in rows),
        "token_agreement": float(np.mean([r["token_agreement"] for r in rows])),
    }
    failures = []
    if report["min_cosine"] < MIN_COSINE[compress]:
        failures.append(f"logits cosine {report['min_cosine']:.4f} < {MIN_COSINE[compress]}")
    if compress in MIN_TOKEN_AGREEMENT and report["token_agreement"] < MIN_TOKEN_AGREEMENT[compress]:
        failures.append(f"greedy token agreement {report['token_agreement']:.2f} < {MIN_TOKEN_AGREEMENT[compress]}")
    report["failures"], report["passed"] = failures, not failures
    return report


def runtime_parity(artifact: Path, manifest: dict, reference: str | None, allow_pickle: bool) -> dict:
    """The packages on the Core ML runtime against transformers (macOS only)."""
    import coremltools as ct

    from pgexport.load import load_checkpoint

    checkpoint = load_checkpoint(reference or manifest["source"]["checkpoint"], allow_pickle=allow_pickle)
    vision = ct.models.MLModel(str(artifact / COREML_VISION.filename))
    decoder = ct.models.MLModel(str(artifact / COREML_DECODER.filename))
    return compare_runtime(checkpoint, vision, decoder, manifest["options"]["compress"])


def seg_runtime_parity(artifact: Path, manifest: dict) -> dict | None:
    """seg_decoder.mlpackage on Core ML against the PyTorch decoder of the weights it was converted
    from (the manifest's path, if that file is still there with the same sha256): macOS only."""
    import coremltools as ct

    from pgexport.exporters.seg_decoder import compare_masks, load_seg_decoder, probe_codes, reference_logits
    from pgexport.manifest import sha256_file

    record = manifest.get("seg_decoder")
    if not record:
        return None
    source = Path(record.get("path", ""))
    if not source.is_file():
        return {"skipped": f"the seg decoder's weights {source} are not there to compare with"}
    if sha256_file(source) != record["sha256"]:
        return {"skipped": f"{source} has changed since the conversion (another sha256)"}
    module = load_seg_decoder(source)
    package = ct.models.MLModel(str(artifact / COREML_SEG_DECODER.filename))
    codes = probe_codes(module.codebook_size)
    candidate = np.concatenate([np.asarray(package.predict({CODES: row[None].astype(np.int32)})[MASK_LOGITS]) for row in codes])
    return {"hop": "PyTorch -> Core ML seg decoder (fp16 compute)",
            **compare_masks(reference_logits(module, codes), candidate.astype(np.float32), bound=SEG_FP16_REL)}


def validate_coreml(artifact: str | Path, reference: str | Path | None = None, *, allow_pickle: bool = False) -> dict:
    """Check a Core ML artifact: files, specs, and (on macOS) runtime parity against transformers."""
    from pgexport.coreml.spec import check_spec
    from pgexport.manifest import read_manifest, verify

    artifact = Path(artifact)
    manifest = read_manifest(artifact)
    report = {"format": manifest["format"], "files": verify(artifact), "spec": check_spec(artifact, manifest["spec_check"]["expected"])}
    skipped = runtime_unavailable()
    report["runtime"] = {"skipped": skipped} if skipped else runtime_parity(artifact, manifest, reference, allow_pickle)
    if manifest.get("seg_decoder"):
        report["seg_decoder"] = {"skipped": skipped} if skipped else seg_runtime_parity(artifact, manifest)
    report["passed"] = (not report["files"] and not report["spec"] and report["runtime"].get("passed", True)
                        and (report.get("seg_decoder") or {}).get("passed", True))
    return report


def report_lines(report: dict) -> list[str]:
    """The report as a few plain lines for the terminal."""
    lines = [f"files: {'every file matches manifest.json' if not report['files'] else '; '.join(report['files'])}",
             f"spec: {'inputs, outputs, states, target and ops as expected' if not report['spec'] else '; '.join(report['spec'])}"]
    runtime = report["runtime"]
    if "skipped" in runtime:
        lines.append(f"runtime parity: SKIPPED: {runtime['skipped']}")
    else:
        lines.append(f"runtime parity ({runtime['hop']}): min cosine {runtime['min_cosine']:.5f}, "
                     f"greedy token agreement {runtime['token_agreement']:.0%}: "
                     + ("pass" if runtime["passed"] else "FAIL: " + "; ".join(runtime["failures"])))
    seg = report.get("seg_decoder")
    if seg is not None and "skipped" in seg:
        lines.append(f"seg decoder parity: SKIPPED: {seg['skipped']}")
    elif seg is not None:
        lines.append(f"seg decoder parity ({seg['hop']}): max |d| {seg['max_rel_diff']:.2g} of the largest logit "
                     f"(bound {seg['bound_rel']:g}), mask IoU {seg['mask_iou']:.6f}: " + ("pass" if seg["passed"] else "FAIL"))
    return lines
