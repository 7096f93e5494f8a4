"""Core ML export (`pgexport coreml`): the export wrappers against transformers, the state logic,
the saved specs, compression, bad inputs, and `pgexport validate` on a Core ML artifact.

Core ML prediction needs macOS: on Linux the runtime hop is skipped with its reason, everything
else (what coremltools traces, what it saved) is checked here."""

import json
import os
import shutil

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from pgexport.cli import main
from pgexport.coreml.parity import MAX_REL_DIFF, check_wrappers, decode_mask, prefill_mask, wrapper_generate
from pgexport.coreml.validate import runtime_unavailable
from pgexport.coreml.wrappers import StatefulDecoder, VisionEncoder, pixel_normalisation
from pgexport.load import load_checkpoint
from pgexport.runtime import prepare_inputs
from pgexport.validate import default_samples, reference_generate

pytest.importorskip("coremltools")


@pytest.fixture(scope="module")
def demo():
    return load_checkpoint(None)


@pytest.mark.parametrize("preset", ["demo", "tiny-pg1", "tiny-pg2"])
def test_wrappers_match_transformers(preset, demo, checkpoint_factory):
    checkpoint = demo if preset == "demo" else load_checkpoint(checkpoint_factory(preset))
    report = check_wrappers(checkpoint.model, checkpoint.processor)
    assert report["max_rel_diff"] <= MAX_REL_DIFF, report
    assert report["tokens_identical"], report
    assert report["passed"] and len(report["rows"]) == 3
    assert len({row["prompt_tokens"] for row in report["rows"]}) > 1  # prompts of different lengths


def test_gemma2_window_is_exercised_through_the_state(checkpoint_factory):
    """tiny-pg2 decodes past its sliding window: without the window, the wrapper stops matching."""
    checkpoint = load_checkpoint(checkpoint_factory("tiny-pg2"))
    model, (image, prompt) = checkpoint.model, default_samples(1)[0]
    window = model.config.text_config.sliding_window
    inputs = prepare_inputs(checkpoint.processor, [image], [prompt])
    assert inputs["input_ids"].shape[1] > window  # the prompt itself spans more than the window
    ref_tokens, ref_logits = reference_generate(model, inputs, 8)
    decoder, vision = StatefulDecoder(model, 64).eval(), VisionEncoder(model).eval()
    tokens, logits = wrapper_generate(decoder, vision, inputs["input_ids"], inputs["pixel_values"], 8)
    reference = np.stack([step[0] for step in ref_logits])
    assert tokens.tolist() == ref_tokens[0].tolist()
    assert np.abs(logits - reference).max() < 1e-4 * np.ptp(reference)
    decoder.windows = [None] * len(decoder.windows)
    _, no_window = wrapper_generate(decoder, vision, inputs["input_ids"], inputs["pixel_values"], 8)
    assert np.abs(no_window - reference).max() > 1e-3 * np.ptp(reference)


def test_state_is_written_in_place_by_slices(demo):
    """Prefill fills slots [0, prompt), each decode step fills exactly one more slot, nothing beyond."""
    model, (image, prompt) = demo.model, default_samples(1)[0]
    inputs = prepare_inputs(demo.processor, [image], [prompt])
    decoder = StatefulDecoder(model, 48).eval()
    features = VisionEncoder(model)(torch.from_numpy(inputs["pixel_values"])).detach()
    ids = torch.from_numpy(inputs["input_ids"]).int()
    prompt_length = ids.shape[1]
    filled = lambda: (decoder.key_cache.abs().sum(dim=(0, 1, 2, 4)) > 0).nonzero().flatten().tolist()  # noqa: E731
    with torch.no_grad():
        first = decoder(ids, features, prefill_mask(prompt_length))
        assert filled() == list(range(prompt_length))
        token = torch.tensor([[int(first[0, -1].argmax())]], dtype=torch.int32)
        second = decoder(token, features[:, :1], decode_mask(prompt_length + 1))
        assert filled() == list(range(prompt_length + 1))
        before = decoder.value_cache[:, :, :, :prompt_length].clone()
        assert torch.equal(before, decoder.value_cache[:, :, :, :prompt_length])
        decoder.reset()  # the same decode call on an empty cache: the state is what carries the prompt
        alone = decoder(token, features[:, :1], decode_mask(prompt_length + 1))
    assert not torch.allclose(second, alone, atol=1e-3)


def test_pixel_normalisation_reproduces_the_processor(demo):
    """ImageType computes scale * pixel + bias on the resized frame: that must be SigLIP's preprocessing."""
    image, prompt = default_samples(1)[0]
    size = demo.config.vision_config.image_size
    pixel_values = prepare_inputs(demo.processor, [image], [prompt])["pixel_values"][0]
    scale, bias = pixel_normalisation(demo.processor.image_processor)
    frame = np.asarray(image.resize((size, size), resample=3), dtype=np.float32).transpose(2, 0, 1)
    baked = scale * frame + np.asarray(bias, dtype=np.float32)[:, None, None]
    assert np.abs(baked - pixel_values).max() < 1e-5


@pytest.fixture(scope="module")
def int4_artifact(tmp_path_factory, seg_npz):
    """The demo model converted with int4 compression and a seg decoder (wrapper gates on), once for the module."""
    from pgexport.coreml.convert import to_coreml

    output = tmp_path_factory.mktemp("coreml") / "demo-int4"
    manifest = to_coreml(None, output, compress="int4", max_context=64, seg_decoder=seg_npz, progress=False)
    return output, manifest


def test_conversion_writes_checked_packages(int4_artifact):
    from pgexport.coreml.spec import check_spec, load_spec, program_ops
    from pgexport.manifest import verify

    output, manifest = int4_artifact
    assert manifest["format"] == "pgexport-coreml/1"
    assert manifest["spec_check"]["problems"] == []
    assert verify(output) == []
    for name in ("tokenizer.json", "tokenizer_config.json", "prompt_layout.json", "README.md", "config.json", "paligemma_structured.swift"):
        assert (output / name).is_file(), name
    layout = json.loads((output / "prompt_layout.json").read_text())
    assert layout["special_ids"]["image"] == 1252 and layout["num_image_tokens"] == 36 and layout["max_context"] == 64
    assert "makeState()" in (output / "README.md").read_text()
    decoder = load_spec(output / "decoder.mlpackage")
    assert decoder.specificationVersion >= 9  # iOS18
    assert [s.name for s in decoder.description.state] == ["key_cache", "value_cache"]
    assert list(decoder.description.state[0].type.stateType.arrayType.shape) == [4, 1, 1, 64, 48]  # layers, batch, kv heads, context, head dim
    ops = program_ops(decoder)
    assert ops["slice_update"] >= 8 and ops["write_state"] >= 8 and ops["read_state"] >= 2
    assert ops["constexpr_blockwise_shift_scale"] > 0
    metadata = decoder.description.metadata
    assert metadata.userDefined["pgexport.source_sha256"] == manifest["source"]["sha256"]
    assert metadata.license == manifest["license"] and decoder.description.input[0].shortDescription
    # int4 per block: well under half of the fp16 package; the tied embedding is stored once.
    for entry in manifest["packages"].values():
        assert entry["bytes"] < 0.5 * entry["fp16_bytes"]
    # The seg decoder's package: checked spec, its wrapper gated, its record in the manifest and card.
    seg = manifest["seg_decoder"]
    assert manifest["spec_check"]["expected"]["seg_decoder"] is True and (output / "seg_decoder.mlpackage").is_dir()
    assert seg["wrapper_parity"]["passed"] and seg["wrapper_parity"]["mask_iou_clear"] == 1.0
    assert seg["bytes"] < 3e6  # 1.1M weights in fp16
    assert "seg_decoder.mlpackage" in (output / "README.md").read_text()
    # The spec check is not a rubber stamp: a wrong expectation is reported.
    wrong = {**manifest["spec_check"]["expected"], "max_context": 65, "state_shape": [4, 1, 1, 65, 32], "compress": "palettize4"}
    problems = check_spec(output, wrong)
    for expected in ("input input_ids shape ranges", "state key_cache", "no constexpr_lut_to_dense"):
        assert any(expected in problem for problem in problems), (expected, problems)


def test_conversion_writes_a_model_card(int4_artifact):
    """README.md is a Hub model card (front matter, figures from the manifest, the Swift loop), listed
    in manifest.json (tests/test_model_card.py)."""
    from test_model_card import check_coreml_card

    check_coreml_card(int4_artifact[0])


def test_validate_on_linux_says_runtime_parity_was_skipped(int4_artifact, tmp_path):
    if runtime_unavailable() is None:
        pytest.skip("Core ML runtime present: see test_runtime_parity_on_macos")
    output, _ = int4_artifact
    result = CliRunner().invoke(main, ["validate", str(output)])
    assert result.exit_code == 0, result.output
    assert "runtime parity: SKIPPED" in result.output and "macOS" in result.output
    assert "seg decoder parity: SKIPPED" in result.output
    assert "every file matches" in result.output
    broken = tmp_path / "broken"
    shutil.copytree(output, broken)
    (broken / "prompt_layout.json").write_text("{}")
    result = CliRunner().invoke(main, ["validate", str(broken)])
    assert result.exit_code == 6 and "size differs: prompt_layout.json" in result.output


@pytest.mark.skipif(runtime_unavailable() is not None, reason=str(runtime_unavailable()))
def test_runtime_parity_on_macos(int4_artifact):
    from pgexport.coreml.validate import validate_coreml

    report = validate_coreml(int4_artifact[0])
    assert report["runtime"]["passed"], report["runtime"]
    assert report["seg_decoder"]["passed"], report["seg_decoder"]


@pytest.mark.parametrize(
    "args, code, message",
    [
        (["--target", "iOS17"], 7, "needs iOS18 or macOS15"),
        (["--compress", "int3"], 2, "Invalid value for '--compress'"),
        (["--max-context", "100000"], 4, "longer than the model's 8192 positions"),
        (["--max-context", "10"], 4, "leaves no room after the 36 image tokens"),
    ],
)
def test_bad_input_fails_before_any_work(args, code, message, tmp_path):
    output = tmp_path / "out"
    result = CliRunner().invoke(main, ["coreml", "-o", str(output), *args])
    assert result.exit_code == code, result.output
    assert message in result.output
    assert list(tmp_path.iterdir()) == []  # nothing written, not even a staging folder


def test_library_rejects_unknown_compression_and_existing_output(tmp_path):
    from pgexport.coreml.convert import to_coreml
    from pgexport.errors import BadInputError, OutputError

    with pytest.raises(BadInputError, match="unknown compress 'int3'"):
        to_coreml(None, tmp_path / "a", compress="int3")
    (tmp_path / "b").mkdir()
    with pytest.raises(OutputError):
        to_coreml(None, tmp_path / "b")


def test_fp16_wrappers_keep_the_demo_answers(demo):
    """A proxy for the fp16 packages that runs here: the same wrappers in fp16 PyTorch (weights,
    activations and cache) give the demo model's greedy tokens, logits within 2e-3 of the range."""
    import copy

    half = copy.deepcopy(demo.model).half()
    decoder, vision = StatefulDecoder(half, 64).eval(), VisionEncoder(half).eval()
    for image, prompt in default_samples(3):
        inputs = prepare_inputs(demo.processor, [image], [prompt])
        ref_tokens, ref_logits = reference_generate(demo.model, inputs, 8)
        reference = np.stack([step[0] for step in ref_logits])
        pixels = inputs["pixel_values"].astype(np.float16)
        tokens, logits = wrapper_generate(decoder, vision, inputs["input_ids"], pixels, 8)
        assert tokens.tolist() == ref_tokens[0].tolist()
        assert np.abs(logits - reference).max() < 2e-3 * np.ptp(reference)


class _TorchVision:
    """The vision wrapper behind coremltools' predict interface, with ImageType's scale and bias."""

    def __init__(self, model, image_processor):
        self.vision, self.normalisation = VisionEncoder(model).eval(), pixel_normalisation(image_processor)

    def predict(self, feed):
        scale, bias = self.normalisation
        frame = np.asarray(feed["image"], dtype=np.float32).transpose(2, 0, 1)[None]
        pixels = scale * frame + np.asarray(bias, dtype=np.float32)[:, None, None]
        with torch.no_grad():
            return {"image_features": self.vision(torch.from_numpy(pixels)).numpy()}


class _TorchDecoder:
    """The stateful decoder wrapper behind coremltools' make_state / predict(feed, state=...)."""

    def __init__(self, model):
        self.model = model

    def make_state(self):
        return StatefulDecoder(self.model, 64).eval()

    def predict(self, feed, state):
        tensors = {k: torch.from_numpy(np.asarray(v)) for k, v in feed.items()}
        with torch.no_grad():
            logits = state(tensors["input_ids"], tensors["image_features"].float(), tensors["attention_mask"].float())
        return {"logits": logits.numpy()}


def test_runtime_parity_loop_with_the_wrappers_in_place_of_core_ml(demo):
    """The macOS comparison (frame resize, fp16 feeds, state passing, greedy loop) run end to end here,
    with the PyTorch wrappers standing in for the packages: it must pass its own gate."""
    from pgexport.coreml.validate import compare_runtime

    report = compare_runtime(demo, _TorchVision(demo.model, demo.processor.image_processor), _TorchDecoder(demo.model), "none")
    assert report["passed"], report
    assert report["token_agreement"] == 1.0 and report["min_cosine"] > 0.9999


@pytest.mark.slow
def test_gemma2_converts_with_palettization(checkpoint_factory, tmp_path):
    """PaliGemma 2 (soft-caps, sliding window, 2 KV heads) through conversion and 4-bit palettization."""
    from pgexport.coreml.convert import to_coreml
    from pgexport.coreml.spec import load_spec, program_ops

    manifest = to_coreml(checkpoint_factory("tiny-pg2"), tmp_path / "pg2", compress="palettize4", max_context=48,
                         validate=False, progress=False)
    assert manifest["spec_check"]["problems"] == []
    decoder = load_spec(tmp_path / "pg2" / "decoder.mlpackage")
    assert list(decoder.description.state[1].type.stateType.arrayType.shape) == [3, 1, 2, 48, 18]
    ops = program_ops(decoder)
    assert ops["constexpr_lut_to_dense"] > 0 and ops["tanh"] >= 4  # 3 attention soft-caps + the final one
    assert json.loads((tmp_path / "pg2" / "prompt_layout.json").read_text())["sliding_window"] == 6


def _mapping_rss_kb(address: int) -> int:
    """Resident kB of the mapping of this process that holds `address` (/proc/self/smaps)."""
    inside = False
    for line in open("/proc/self/smaps"):
        fields = line.split()
        if "-" in fields[0] and len(fields) >= 5:  # a mapping's header line
            start, end = (int(bound, 16) for bound in fields[0].split("-"))
            inside = start <= address < end
        elif inside and fields[0] == "Rss:":
            return int(fields[1])
    raise AssertionError(f"no mapping holds {address:#x}")


@pytest.mark.skipif(not __import__("sys").platform.startswith("linux"), reason="MADV_PAGEOUT is Linux's")
@pytest.mark.parametrize("releasing", [True, False])
def test_halving_hands_back_the_mapped_fp32_pages(tmp_path, releasing):
    """`pgexport coreml` halves the loaded model with memory.half_releasing_pages: the same fp16
    weights as `.half()`, ties kept, and each fp32 weight's mapped pages handed back as it goes (at
    3B `.half()` held the 11.6 GB mapping beside the 5.9 GB of fp16 copies). The weights are views
    of a private, writable mapping of their file, as transformers loads safetensors; 32 MB each,
    since the page cache holds a file in folios of up to a few MB and the kernel pages out only
    folios wholly inside a weight (the demo's weights are under 1 MB). Plain `.half()`
    (releasing=False) keeps every page: the check can fail."""
    import mmap

    from pgexport.memory import half_releasing_pages

    rows, count = 2048, 4  # 2048 x 4096 fp32: 32 MB per weight
    values = torch.randn(count, rows, 4096, generator=torch.Generator().manual_seed(0))
    path = tmp_path / "weights.bin"
    path.write_bytes(values.numpy().tobytes())
    with open(path, "rb") as file:
        os.fsync(file.fileno())  # written back: the kernel does not page out dirty pages
        mapping = mmap.mmap(file.fileno(), 0, flags=mmap.MAP_PRIVATE, prot=mmap.PROT_READ | mmap.PROT_WRITE)
    flat = torch.frombuffer(mapping, dtype=torch.float32)
    model = torch.nn.Sequential(*(torch.nn.Linear(4096, rows, bias=False) for _ in range(count)))
    for number, layer in enumerate(model):
        layer.weight = torch.nn.Parameter(flat[number * rows * 4096:(number + 1) * rows * 4096].view(rows, 4096),
                                          requires_grad=False)
    model.append(torch.nn.Linear(4096, rows, bias=False))
    model[-1].weight = model[0].weight  # tied, as PaliGemma's LM head and token table
    assert float(sum(layer.weight.sum() for layer in model[:count])) == pytest.approx(float(values.sum()), rel=1e-3)
    before = _mapping_rss_kb(flat.data_ptr())
    (half_releasing_pages if releasing else torch.nn.Module.half)(model)
    after = _mapping_rss_kb(flat.data_ptr())
    for number in range(count):
        assert torch.equal(model[number].weight, values[number].half())
    assert model[-1].weight is model[0].weight
    assert before * 1024 >= 0.99 * values.numel() * 4
    if releasing:
        assert after <= 0.15 * before, (before, after)
    else:
        assert after == before
    del flat
    mapping.close()
