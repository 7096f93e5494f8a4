"""The torch-free runtime: pgexport.processor makes the inputs transformers' PaliGemmaProcessor makes,
and `pgexport generate` / `verify` run with torch, transformers and the other exporter modules unimportable.

Bounds. Pixel values against SigLIP's PIL backend: exact. Both resize with the same PIL call, then
rescale in float64, cast to float32 and normalise with the same element-wise IEEE operations (each
correctly rounded whatever the SIMD width), so any difference is a bug. Against transformers' default
torchvision backend: at most one 8-bit level per resampling pass (2 levels, x 2/255 after the
(x - 0.5) / 0.5 normalisation), since torchvision's uint8 antialiased bicubic reproduces PIL's
fixed-point filter but could round an intermediate value differently. It is exact on every image here.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pgexport.demo import CHECKPOINT_DIR, sample_inputs
from pgexport.processor import Processor
from pgexport.runtime import to_rgb

TORCHVISION_BOUND = 2 * 2 / 255  # two 8-bit levels, normalised by std 0.5
PROMPTS = ["caption en", "what color is the circle?", "", "detect circle ; square", "how many shapes?  \t",
           "count <loc0001> <seg042>", "red\nblue", "émoji ✓ 形"]


def _images() -> list[Image.Image]:
    rng = np.random.default_rng(0)
    noise = lambda h, w, c=3: rng.integers(0, 256, (h, w, c) if c else (h, w), dtype=np.uint8)  # noqa: E731
    demo = sample_inputs(1)[0][0]
    return [
        demo,                                               # the model's size: no resampling
        Image.fromarray(noise(100, 37)),                    # tall, upsampled in width
        Image.fromarray(noise(480, 640)),                   # landscape, downsampled
        Image.fromarray(noise(17, 300)),                    # extreme aspect ratio
        Image.fromarray(noise(64, 64, 4)),                  # alpha
        Image.fromarray(noise(50, 90, None)),              # gray
        demo.resize((300, 200), Image.BILINEAR).convert("P", palette=Image.ADAPTIVE),  # palette
        Image.fromarray(noise(40, 40, None).astype(np.uint16) * 257),  # 16-bit gray
        demo.convert("CMYK"),
    ]


def _processor_folder(tmp_path: Path, size: int, bos_in_tokenizer: bool) -> Path:
    """The demo's processor files saved at another input size; with `bos_in_tokenizer`, a tokenizer
    that adds bos itself (as Gemma's does), which PaliGemmaProcessor turns off."""
    from tokenizers import Tokenizer, processors
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(CHECKPOINT_DIR)
    processor.image_processor.size = {"height": size, "width": size}
    processor.image_processor.image_seq_length = processor.image_seq_length = (size // 16) ** 2
    folder = tmp_path / f"processor-{size}-{bos_in_tokenizer}"
    processor.save_pretrained(folder)
    if bos_in_tokenizer:
        tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
        tokenizer.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", 2)])
        tokenizer.save(str(folder / "tokenizer.json"))
        config = json.loads((folder / "tokenizer_config.json").read_text())
        (folder / "tokenizer_config.json").write_text(json.dumps({**config, "add_bos_token": True}))
    return folder


@pytest.fixture(scope="module", params=[(64, False), (224, True), (96, False)], ids=["demo-64", "224-bos", "96"])
def processors(request, tmp_path_factory):
    """(ours, transformers' default processor, transformers' with SigLIP's PIL image backend)."""
    from transformers import AutoProcessor, PaliGemmaProcessor
    from transformers.models.siglip.image_processing_pil_siglip import SiglipImageProcessorPil

    size, bos = request.param
    folder = Path(CHECKPOINT_DIR) if size == 64 else _processor_folder(tmp_path_factory.mktemp("proc"), size, bos)
    default = AutoProcessor.from_pretrained(folder)
    default.tokenizer.padding_side = "left"
    image_processor = SiglipImageProcessorPil.from_pretrained(folder)
    pil = PaliGemmaProcessor(image_processor=image_processor, tokenizer=AutoProcessor.from_pretrained(folder).tokenizer)
    return Processor(folder), default, pil


def test_pixel_values_equal_transformers(processors):
    ours, default, pil = processors
    for image in _images():
        image = to_rgb(image)  # what the runtime does first (16-bit gray scaled, not clipped)
        values = ours([image], ["caption en"])["pixel_values"]
        reference = pil(images=[image], text=["<image>caption en"], return_tensors="np")["pixel_values"]
        assert values.dtype == np.float32 and values.shape == reference.shape
        assert np.array_equal(values, reference), f"{image.size}: {np.abs(values - reference).max()} from SigLIP's PIL backend"
        torchvision = default(images=[image], text=["<image>caption en"], return_tensors="np")["pixel_values"]
        assert np.abs(values - torchvision).max() <= TORCHVISION_BOUND, f"{image.size} vs the torchvision backend"


def test_raw_modes_convert_like_transformers(processors):
    """RGBA, gray, palette and CMYK images given as they are: transformers converts them to RGB itself."""
    ours, _, pil = processors
    for image in _images()[4:7] + _images()[8:]:
        values = ours([to_rgb(image)], ["x"])["pixel_values"]
        assert np.array_equal(values, pil(images=[image], text=["<image>x"], return_tensors="np")["pixel_values"]), image.mode


def test_ids_and_mask_equal_transformers(processors):
    ours, default, _ = processors
    images = [to_rgb(image) for image in _images()[: len(PROMPTS)]]
    images += images[: len(PROMPTS) - len(images)]
    inputs = ours(images, PROMPTS)
    reference = default(images=images, text=["<image>" + p for p in PROMPTS], return_tensors="np", padding="longest")
    assert inputs["input_ids"].dtype == np.int64 and inputs["attention_mask"].dtype == np.int64
    assert np.array_equal(inputs["input_ids"], reference["input_ids"])
    assert np.array_equal(inputs["attention_mask"], reference["attention_mask"])
    row = ours.prompt_ids("caption en")
    assert row[: ours.image_seq_length] == [ours.image_token_id] * ours.image_seq_length
    assert row[ours.image_seq_length] == ours.bos_token_id


def test_decode_equals_transformers(processors):
    ours, default, _ = processors
    vocab = len(ours.tokenizer.get_vocab(with_added_tokens=True))
    rng = np.random.default_rng(1)
    for ids in [list(range(60)), rng.integers(0, min(vocab, 1400), 40).tolist(), [1, 1, 0]]:
        assert ours.decode(ids) == default.tokenizer.decode(ids, skip_special_tokens=True)
        assert ours.decode(ids, skip_special_tokens=False) == default.tokenizer.decode(ids, skip_special_tokens=False)
    assert (ours.eos_token_id, ours.pad_token_id) == (default.tokenizer.eos_token_id, default.tokenizer.pad_token_id)


# ---------------------------------------------------------------------------------------------
# The commands that run an artifact, with the exporter's modules made unimportable.

BLOCKER = """
import sys
class Block:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {"torch", "transformers", "onnx", "onnxscript", "safetensors", "accelerate", "yaml"}:
            raise ImportError(f"blocked for this test: {name}", name=name)
sys.meta_path.insert(0, Block())
sys.argv = ["pgexport", *sys.argv[1:]]
from pgexport.cli import main
main()
"""


def _run_blocked(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", BLOCKER, *args], capture_output=True, text=True, timeout=300)


def test_generate_and_verify_import_no_exporter_module(demo_onnx, tmp_path):
    from pgexport.runtime import OnnxPaliGemma

    image, prompt = sample_inputs(1)[0]
    path = tmp_path / "image.png"
    image.save(path)
    expected = OnnxPaliGemma(demo_onnx, dtype="int8").generate([image], [prompt])[0]
    result = _run_blocked("generate", str(demo_onnx), "--image", str(path), "--prompt", prompt, "--dtype", "int8", "--json")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["tokens"] == expected.tokens
    result = _run_blocked("verify", str(demo_onnx))
    assert result.returncode == 0 and "every file matches" in result.stdout, result.stderr
    # An exporter command says which extra to install, exit 7 (not an internal error).
    result = _run_blocked("onnx", "-o", str(tmp_path / "out"))
    assert result.returncode == 7, result.stderr
    assert "pip install 'pgexport[export]'" in result.stderr and not (tmp_path / "out").exists()
