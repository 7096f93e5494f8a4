"""An outside client runs our artifact: transformers.js 4.3.1 (Node, onnxruntime-node on CPU) loads
the exported folder as-is and generates the same greedy tokens as transformers in PyTorch.

Needs Node.js and npm; the pinned npm package is installed into tests/js/node_modules on first use
(`npm ci --ignore-scripts`: onnxruntime-node's postinstall would download CUDA binaries; the CPU
binaries ship inside the package). `tests/js/generate.mjs` is the client.
"""

from __future__ import annotations

import functools
import json
import shutil
import subprocess
from pathlib import Path

import pytest
from PIL import Image

JS_DIR = Path(__file__).parent / "js"
TRANSFORMERS_JS_VERSION = "4.3.1"
NEW_TOKENS = 12
NODE, NPM = shutil.which("node"), shutil.which("npm")

pytestmark = [
    pytest.mark.node,
    pytest.mark.skipif(not (NODE and NPM), reason="transformers.js check needs Node.js and npm on PATH"),
]


def _installed_version() -> str | None:
    package = JS_DIR / "node_modules" / "@huggingface" / "transformers" / "package.json"
    return json.loads(package.read_text())["version"] if package.is_file() else None


@pytest.fixture(scope="session")
def transformers_js():
    """Install the pinned npm packages once (skipped when already there); returns the runner."""
    if _installed_version() != TRANSFORMERS_JS_VERSION:
        install = subprocess.run(
            [NPM, "ci", "--ignore-scripts", "--no-audit", "--no-fund"], cwd=JS_DIR, capture_output=True, text=True, timeout=900
        )
        if install.returncode != 0:
            pytest.skip(f"npm ci in tests/js failed (npm registry unreachable?): {install.stderr.strip()[-500:]}")
    assert _installed_version() == TRANSFORMERS_JS_VERSION
    return run_transformers_js


def run_transformers_js(artifact: Path, image: Path, prompt: str, new_tokens: int, dtype: str = "fp32", stop_at_eos: bool = False) -> dict:
    """tests/js/generate.mjs on one (image, prompt): {"tokens", "text", "input_ids", ...}."""
    command = [NODE, "generate.mjs", str(artifact), str(image), prompt, str(new_tokens), "--dtype", dtype]
    if stop_at_eos:
        command.append("--stop-at-eos")
    result = subprocess.run(command, cwd=JS_DIR, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, f"transformers.js failed on {artifact}:\n{result.stderr[-3000:]}"
    return json.loads(result.stdout.strip().splitlines()[-1])


def model_sized_image(image: Image.Image, artifact: Path, folder: Path, name: str) -> Path:
    """Save `image` as PNG at the model's input size: both processors then skip resizing, so their
    pixel values agree exactly (PIL's and sharp's bicubic resamplers differ slightly)."""
    size = json.loads((artifact / "preprocessor_config.json").read_text())["size"]
    path = folder / f"{name}.png"
    image.convert("RGB").resize((size["width"], size["height"]), Image.BICUBIC).save(path)
    return path


@functools.lru_cache(maxsize=2)
def _checkpoint(folder: Path):
    from pgexport.load import load_checkpoint

    return load_checkpoint(folder)


@functools.lru_cache(maxsize=2)
def _runtime(artifact: Path, dtype: str):
    from pgexport.runtime import OnnxPaliGemma

    return OnnxPaliGemma(artifact, dtype=dtype)


def torch_greedy(checkpoint: Path, image: Path, prompt: str, new_tokens: int, stop_at_eos: bool = False) -> dict:
    """transformers' own greedy generate on the checkpoint, fed as the parity gate feeds it
    (processor inputs for "<image>" + prompt, token_type_ids 0 over the prompt).

    eos is disabled with `eos_token_id=[]`: transformers 5.24 fills a None eos_token_id from the
    model's generation config, so None would still stop at eos."""
    import torch
    from transformers import GenerationConfig

    from pgexport.runtime import open_image, prepare_inputs
    from pgexport.validate import _torch_inputs

    loaded = _checkpoint(Path(checkpoint))
    model = loaded.model
    inputs = prepare_inputs(loaded.processor, [open_image(image)], [prompt])
    config = GenerationConfig(
        max_new_tokens=new_tokens,
        do_sample=False,
        eos_token_id=model.generation_config.eos_token_id if stop_at_eos else [],
        pad_token_id=model.generation_config.pad_token_id,
        bos_token_id=model.generation_config.bos_token_id,
    )
    with torch.no_grad():
        sequences = model.generate(**_torch_inputs(inputs), generation_config=config)
    tokens = sequences[0, inputs["input_ids"].shape[1] :].tolist()
    return {"tokens": tokens, "input_ids": inputs["input_ids"][0].tolist()}


def ort_greedy(artifact: Path, dtype: str, image: Path, prompt: str, new_tokens: int) -> dict:
    """pgexport's own ONNX Runtime generation of the artifact (eos ignored)."""
    from pgexport.runtime import open_image

    runtime = _runtime(Path(artifact), dtype)
    inputs = runtime.preprocess([open_image(image)], [prompt])
    tokens, _ = runtime.generate_ids(**inputs, max_new_tokens=new_tokens, stop_at_eos=False)
    return {"tokens": tokens[0].tolist(), "input_ids": inputs["input_ids"][0].tolist()}


def assert_same_generation(js: dict, reference: dict, label: str, minimum: int = 8) -> None:
    assert js["input_ids"] == reference["input_ids"], f"{label}: the processors tokenise the prompt differently"
    assert js["tokens"] == reference["tokens"], f"{label}: transformers.js {js['tokens']} != reference {reference['tokens']}"
    assert len(js["tokens"]) >= minimum, f"{label}: only {len(js['tokens'])} new tokens compared"


def forced_logits(artifact: Path, dtype: str, image: Path, prompt: str, tokens: list[int]):
    """Our runtime's logits [steps, vocab] at each step of `tokens`, fed whatever it would choose."""
    import numpy as np

    from pgexport.runtime import open_image

    runtime = _runtime(Path(artifact), dtype)
    inputs = runtime.preprocess([open_image(image)], [prompt])
    _, logits = runtime.generate_ids(**inputs, stop_at_eos=False, forced_tokens=np.array([tokens]), keep_logits=True)
    return np.concatenate(logits)


def assert_int8_like_ours(js: dict, artifact: Path, image: Path, prompt: str, label: str) -> None:
    """int8 tokens from another ONNX Runtime build: ours, or where they part, near-ties for ours.

    Dynamic int8 kernels round differently across builds (WASM, VNNI, AMX), so two builds can pick
    different tokens where two logits nearly tie. Bound: with f our fp32 logits, a ours at int8
    and b the other build's, |a - f| <= n (measured: max over the vocabulary at that step) and
    assuming the other build's int8 error is no larger, |b - f| <= n. Its choice t has b_t >= b_k,
    so a_top - a_t <= 4n. Every one of its tokens is checked along its own path (teacher-forced)."""
    reference = ort_greedy(artifact, "int8", image, prompt, len(js["tokens"]))
    assert js["input_ids"] == reference["input_ids"], f"{label}: the processors tokenise the prompt differently"
    assert len(js["tokens"]) >= 8, f"{label}: only {len(js['tokens'])} new tokens compared"
    if js["tokens"] == reference["tokens"]:
        return
    int8 = forced_logits(artifact, "int8", image, prompt, js["tokens"])
    fp32 = forced_logits(artifact, "fp32", image, prompt, js["tokens"])
    for step, token in enumerate(js["tokens"]):
        margin = float(int8[step].max() - int8[step][token])
        noise = float(abs(int8[step] - fp32[step]).max())
        assert margin <= 4 * noise, (f"{label}: step {step}: its token {token} trails ours by {margin:.3f} "
                                     f"(int8 noise {noise:.3f}); tokens {js['tokens']} != ours {reference['tokens']}")


# ---------------------------------------------------------------------------------------------
# The demo model: fp32 against PyTorch, int8 against pgexport's own ONNX Runtime int8 result.


@pytest.fixture(scope="module")
def demo_js_artifact(tmp_path_factory, demo_onnx):
    """The demo model exported with --int8 (conftest's, shared with the other tests), and
    its sample inputs: `sample_inputs(3)` plus the held-out row with the longest answer (so that
    a run stopped at eos still compares >= 8 real tokens)."""
    from pgexport.demo import CHECKPOINT_DIR, EVAL_FILE, load_split, sample_inputs

    out = demo_onnx
    tokenizer = _checkpoint(Path(CHECKPOINT_DIR)).processor.tokenizer
    longest = max(load_split(EVAL_FILE), key=lambda row: len(tokenizer(row.suffix)["input_ids"]))
    pairs = sample_inputs(3) + [(longest.open_image(), longest.prefix)]
    images = tmp_path_factory.mktemp("demo-js-images")
    samples = [(model_sized_image(image, out, images, f"sample{i}"), prompt) for i, (image, prompt) in enumerate(pairs)]
    return Path(CHECKPOINT_DIR), out, samples


def test_demo_fp32_generates_like_pytorch(transformers_js, demo_js_artifact):
    """eos off on both sides: NEW_TOKENS tokens each, compared one for one."""
    checkpoint, artifact, samples = demo_js_artifact
    for image, prompt in samples:
        js = transformers_js(artifact, image, prompt, NEW_TOKENS)
        assert js["model_class"] == "PaliGemmaForConditionalGeneration"
        assert set(js["dtype"].values()) == {"fp32"}
        assert_same_generation(js, torch_greedy(checkpoint, image, prompt, NEW_TOKENS), f"demo fp32 {prompt!r}")


def test_demo_fp32_stops_at_eos_like_pytorch(transformers_js, demo_js_artifact):
    """eos on (the generation config's): both stop at the same eos with the same answer."""
    checkpoint, artifact, samples = demo_js_artifact
    eos = json.loads((artifact / "generation_config.json").read_text())["eos_token_id"]
    lengths = []
    for image, prompt in samples:
        js = transformers_js(artifact, image, prompt, 48, stop_at_eos=True)
        reference = torch_greedy(checkpoint, image, prompt, 48, stop_at_eos=True)
        assert js["tokens"] == reference["tokens"], f"demo fp32 {prompt!r}, eos on"
        assert js["tokens"][-1] == eos, f"{prompt!r}: no eos within 48 tokens"
        lengths.append(len(js["tokens"]))
    assert max(lengths) >= 8, lengths


def test_demo_int8_generates_like_our_runtime(transformers_js, demo_js_artifact):
    _, artifact, samples = demo_js_artifact
    for image, prompt in samples:
        js = transformers_js(artifact, image, prompt, NEW_TOKENS, dtype="int8")
        assert js["dtype"] == {"vision_encoder": "int8", "embed_tokens": "int8", "decoder_model_merged": "int8"}
        assert_int8_like_ours(js, artifact, image, prompt, f"demo int8 {prompt!r}")


def test_auto_processor_resolves_paligemma(transformers_js, demo_js_artifact):
    """transformers.js's AutoProcessor reads only preprocessor_config.json: without its
    `processor_class` it returns a bare image processor with no tokenizer (src/models/auto/processing_auto.js)."""
    _, artifact, samples = demo_js_artifact
    js = transformers_js(artifact, samples[0][0], samples[0][1], 1)
    if "processor_class" not in json.loads((artifact / "preprocessor_config.json").read_text()):
        pytest.xfail(
            "preprocessor_config.json has no processor_class: transformers.js AutoProcessor gives "
            f"{js['auto_processor_class']} (generate.mjs falls back to PaliGemmaProcessor.from_pretrained)"
        )
    assert js["auto_processor_class"] == "PaliGemmaProcessor"


# ---------------------------------------------------------------------------------------------
# PaliGemma 2 (Gemma2 decoder: soft-capping, sliding window) with random weights.


def test_random_paligemma2_generates_like_pytorch(transformers_js, artifact_factory, tmp_path):
    from pgexport.demo import sample_inputs

    checkpoint, artifact, _ = artifact_factory("tiny-pg2")
    image_pil, prompt = sample_inputs(1)[0]
    image = model_sized_image(image_pil, artifact, tmp_path, "pg2")
    js = transformers_js(artifact, image, prompt, NEW_TOKENS)
    assert_same_generation(js, torch_greedy(checkpoint, image, prompt, NEW_TOKENS), f"tiny-pg2 {prompt!r}")


TOKENIZE_JS = """
import { AutoTokenizer, env } from "@huggingface/transformers";
import fs from "node:fs";
import path from "node:path";
const [folder, casesFile] = process.argv.slice(1);
env.allowRemoteModels = false;
env.localModelPath = path.dirname(folder) + path.sep;
const tokenizer = await AutoTokenizer.from_pretrained(path.basename(folder));
const cases = JSON.parse(fs.readFileSync(casesFile, "utf8"));
console.log(JSON.stringify({
  encoded: cases.texts.map((text) => Array.from(tokenizer.encode(text))),
  decoded: cases.ids.map((ids) => tokenizer.decode(ids, { skip_special_tokens: true })),
}));
"""


def test_transformers_js_tokenizes_like_python(transformers_js, tmp_path):
    from transformers import AutoProcessor

    from pgexport.demo import CHECKPOINT_DIR, EVAL_FILE, load_split

    processor = AutoProcessor.from_pretrained(CHECKPOINT_DIR)
    tokenizer = processor.tokenizer
    rows = load_split(EVAL_FILE)[:24]
    prompt = processor.image_token * processor.image_seq_length + tokenizer.bos_token
    texts = [prompt + r.prefix + "\n" for r in rows] + [r.suffix for r in rows] + ["what color is the octagon?", "red  circle ; x"]
    ids = [tokenizer.encode(text) for text in texts]
    cases = tmp_path / "cases.json"
    cases.write_text(json.dumps({"texts": texts, "ids": ids}))
    result = subprocess.run([NODE, "--input-type=module", "-e", TOKENIZE_JS, str(CHECKPOINT_DIR), str(cases)],
                            cwd=JS_DIR, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    js = json.loads(result.stdout.strip().splitlines()[-1])
    assert js["encoded"] == ids
    assert js["decoded"] == [tokenizer.decode(i, skip_special_tokens=True) for i in ids]
    assert js["decoded"][len(rows) : 2 * len(rows)] == [r.suffix for r in rows]
