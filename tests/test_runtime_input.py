"""`pgexport generate` on inputs it must refuse or normalise: altered graph files, 16-bit and float
images, prompts and answers past the model's context, image bombs, a dtype the artifact lacks, a
Core ML folder. Each refusal is one line and its exit code, before any session runs on bad input."""

import json
import logging
import shutil
import struct
import zlib
from pathlib import Path

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from PIL import Image

from pgexport.cli import main
from pgexport.demo import EVAL_FILE, load_split
from pgexport.errors import BadInputError, UnsupportedError
from pgexport.manifest import file_entries
from pgexport.runtime import MAX_IMAGE_PIXELS, OnnxPaliGemma, open_image, to_rgb

DECODER = "onnx/decoder_model_merged.onnx"


@pytest.fixture(scope="session")
def demo(demo_artifact):
    """The demo model exported with --int8 (conftest; shared with test_demo_artifact)."""
    return demo_artifact[0]


@pytest.fixture(scope="session")
def demo_model(demo):
    return OnnxPaliGemma(demo, dtype="fp32")


@pytest.fixture(scope="session")
def row():
    return load_split(EVAL_FILE)[0]


def generate(*args):
    """(exit code, stdout, the `error:` lines on stderr) of `pgexport generate ARGS`."""
    result = CliRunner().invoke(main, ["generate", *map(str, args)])
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    return result.exit_code, result.stdout, errors


def tokens(artifact, image, prompt, *options):
    code, out, errors = generate(artifact, "--image", image, "--prompt", prompt, "--json", *options)
    assert code == 0, errors
    return json.loads(out)["tokens"]


def copy_artifact(demo, tmp_path):
    return shutil.copytree(demo, tmp_path / "copy")


def write_png(path, width, height, rows, bit_depth=8, channels=1):
    """A PNG from an iterable of rows (bytes, big-endian samples), compressed as it streams: PIL
    cannot write 16-bit RGB, and a 12000 x 12000 image must not be held whole."""
    color_type = {1: 0, 2: 4, 3: 2, 4: 6}[channels]
    compressor, idat = zlib.compressobj(), []
    for row in rows:
        idat.append(compressor.compress(b"\x00" + row))
    idat.append(compressor.flush())

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, bit_depth, color_type, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", b"".join(idat)) + chunk(b"IEND", b""))
    return path


def write_png16(path, array8):
    """`array8` (uint8, [h, w] or [h, w, c]) as a 16-bit PNG of value * 257 (0..255 -> 0..65535)."""
    wide = (array8.astype(np.uint16) * 257).astype(">u2")
    channels = 1 if wide.ndim == 2 else wide.shape[2]
    return write_png(path, wide.shape[1], wide.shape[0], (r.tobytes() for r in wide), 16, channels)


# 1. graph files against manifest.json ------------------------------------------------------------

def test_swapped_decoder_is_refused_by_its_size(demo, row, tmp_path):
    artifact = copy_artifact(demo, tmp_path)
    shutil.copyfile(artifact / "onnx/decoder_model_merged_int8.onnx", artifact / DECODER)  # runs, answers differently
    code, _, errors = generate(artifact, "--dtype", "fp32", "--image", row.image, "--prompt", row.prefix)
    assert code == BadInputError.exit_code and len(errors) == 1, errors
    assert DECODER in errors[0] and "pgexport verify" in errors[0]
    assert tokens(artifact, row.image, row.prefix, "--dtype", "int8")  # the int8 graphs are intact


def test_same_size_change_needs_check(demo, row, tmp_path):
    artifact = copy_artifact(demo, tmp_path)
    graph = onnx.load(str(artifact / DECODER))
    weights = max(graph.graph.initializer, key=lambda t: len(t.raw_data)).raw_data
    data = bytearray((artifact / DECODER).read_bytes())
    data[data.find(weights) + 1000] ^= 0x40  # one byte of the largest weight: a valid graph, same size
    (artifact / DECODER).write_bytes(bytes(data))
    assert tokens(artifact, row.image, row.prefix, "--dtype", "fp32")  # sizes match: it runs
    code, _, errors = generate(artifact, "--dtype", "fp32", "--check", "--image", row.image, "--prompt", row.prefix)
    assert code == BadInputError.exit_code and len(errors) == 1, errors
    assert f"sha256 differs: {DECODER}" in errors[0] and "pgexport verify" in errors[0]
    with pytest.raises(BadInputError, match="sha256"):
        OnnxPaliGemma(artifact, dtype="fp32", check=True)
    OnnxPaliGemma(demo, dtype="fp32", check=True)  # the untouched artifact passes


def test_external_data_file_is_checked(demo, row, tmp_path):
    artifact = copy_artifact(demo, tmp_path)
    graph = onnx.load(str(artifact / DECODER))
    onnx.save_model(graph, str(artifact / DECODER), save_as_external_data=True, location="decoder_model_merged.onnx.data")
    manifest = json.loads((artifact / "manifest.json").read_text())
    manifest["files"] = file_entries(artifact)
    (artifact / "manifest.json").write_text(json.dumps(manifest))
    assert tokens(artifact, row.image, row.prefix, "--dtype", "fp32", "--check") == tokens(
        demo, row.image, row.prefix, "--dtype", "fp32")
    with open(artifact / (DECODER + ".data"), "ab") as handle:
        handle.write(b"\0")
    code, _, errors = generate(artifact, "--dtype", "fp32", "--image", row.image, "--prompt", row.prefix)
    assert code == BadInputError.exit_code and len(errors) == 1, errors
    assert f"size differs: {DECODER}.data" in errors[0]


def test_a_folder_without_manifest_opens_its_fp32_graphs(demo, demo_model, row, tmp_path):
    """An export's staging folder before its manifest is written (what calibration and fp16 open):
    the fp32 graphs run, unchecked, and answer as the artifact does; any other dtype is refused."""
    artifact = copy_artifact(demo, tmp_path)
    (artifact / "manifest.json").unlink()
    for path in (artifact / "onnx").glob("*_int8.onnx*"):
        path.unlink()
    bare = OnnxPaliGemma(artifact)
    assert bare.dtype == "fp32" and set(bare.graph_dtypes.values()) == {"fp32"}
    inputs = demo_model.preprocess([open_image(row.image)], [row.prefix])
    expected, _ = demo_model.generate_ids(**inputs, max_new_tokens=8, stop_at_eos=False)
    assert np.array_equal(bare.generate_ids(**inputs, max_new_tokens=8, stop_at_eos=False)[0], expected)
    with pytest.raises(BadInputError, match="only its fp32 graphs"):
        OnnxPaliGemma(artifact, dtype="int8")
    shutil.rmtree(artifact / "onnx")
    with pytest.raises(BadInputError, match="not a pgexport ONNX artifact"):
        OnnxPaliGemma(artifact, dtype="fp32")


# 2. high bit depth images ------------------------------------------------------------------------

def test_16_bit_and_float_images_match_their_8_bit_source(demo, demo_model, row, tmp_path):
    rgb8 = np.asarray(open_image(row.image))
    gray8 = np.asarray(Image.fromarray(rgb8).convert("L"))
    Image.fromarray(gray8).save(tmp_path / "gray8.png")
    write_png16(tmp_path / "gray16.png", gray8)
    write_png16(tmp_path / "rgb16.png", rgb8)
    assert Image.open(tmp_path / "gray16.png").mode == "I;16"
    assert Image.open(tmp_path / "rgb16.png").mode == "RGB"  # PIL keeps each 16-bit value's high byte
    float01 = Image.fromarray(gray8.astype(np.float32) / 255)
    float255 = Image.fromarray(gray8.astype(np.float32))
    gray16b = Image.fromarray((gray8.astype(np.uint16) * 257).astype(">u2"))
    gray32 = Image.fromarray(gray8.astype(np.int32) * 257)
    assert (float01.mode, gray16b.mode, gray32.mode) == ("F", "I;16B", "I")

    # Exact, not within 1/255: value * 257 / 257 rounds back to the value, and 255 * (v / 255) too.
    for name, image in [("gray16", open_image(tmp_path / "gray16.png")), ("float 0..1", to_rgb(float01)),
                        ("float 0..255", to_rgb(float255)), ("I;16B", to_rgb(gray16b)), ("I", to_rgb(gray32))]:
        assert np.array_equal(np.asarray(image), np.asarray(open_image(tmp_path / "gray8.png"))), name
    assert np.array_equal(np.asarray(open_image(tmp_path / "rgb16.png")), rgb8)

    pixels = {name: demo_model.preprocess([image], [row.prefix])["pixel_values"]
              for name, image in [("gray8", Image.fromarray(gray8)), ("gray16", Image.open(tmp_path / "gray16.png")),
                                  ("float", float01)]}
    assert np.array_equal(pixels["gray16"], pixels["gray8"]) and np.array_equal(pixels["float"], pixels["gray8"])

    assert tokens(demo, tmp_path / "gray16.png", row.prefix) == tokens(demo, tmp_path / "gray8.png", row.prefix)
    assert tokens(demo, tmp_path / "rgb16.png", row.prefix) == tokens(demo, row.image, row.prefix)


# 3. the model's context ---------------------------------------------------------------------------

def test_prompt_longer_than_the_context_is_refused(demo, demo_model, row):
    prompt = "red " * 16500
    assert demo_model.preprocess([open_image(row.image)], [prompt])["input_ids"].shape[1] > demo_model.context == 8192
    code, _, errors = generate(demo, "--image", row.image, "--prompt", prompt)
    assert code == BadInputError.exit_code and len(errors) == 1, errors
    assert "context of 8192" in errors[0]


def test_max_new_tokens_is_capped_to_the_context(demo, demo_model, row, caplog, monkeypatch):
    inputs = demo_model.preprocess([open_image(row.image)], [row.prefix])
    prompt_tokens = inputs["input_ids"].shape[1]
    with caplog.at_level(logging.WARNING, logger="pgexport.runtime"):
        capped = tokens(demo, row.image, row.prefix, "--max-new-tokens", 1_000_000_000)
    assert capped == tokens(demo, row.image, row.prefix, "--max-new-tokens", 48)  # it stops at eos either way
    assert f"max_new_tokens 1000000000 capped to {8192 - prompt_tokens}" in caplog.text

    monkeypatch.setattr(demo_model, "context", prompt_tokens + 3)
    new, _ = demo_model.generate_ids(**inputs, max_new_tokens=50, stop_at_eos=False)
    assert new.shape == (1, 3)


@pytest.mark.parametrize("count", [0, -1])
def test_max_new_tokens_must_be_positive(demo, demo_model, row, count):
    code, _, _ = generate(demo, "--image", row.image, "--prompt", row.prefix, "--max-new-tokens", count)
    assert code == 2  # click's usage error
    with pytest.raises(BadInputError, match="max_new_tokens"):
        demo_model.generate([open_image(row.image)], [row.prefix], max_new_tokens=count)


# 4. image bombs and broken images ------------------------------------------------------------------

@pytest.mark.parametrize("width, height", [(9000, 8000), (12000, 12000), (20000, 10000)])
def test_huge_images_are_refused_from_their_header(demo, tmp_path, width, height):
    # 72 MP: over our limit only; 144 MP: PIL warns; 200 MP: PIL raises DecompressionBombError.
    path = write_png(tmp_path / "huge.png", width, height, (bytes(width) for _ in range(height)))
    assert path.stat().st_size < 300_000 and width * height > MAX_IMAGE_PIXELS
    code, _, errors = generate(demo, "--image", path, "--prompt", "caption en")
    assert code == BadInputError.exit_code and len(errors) == 1, errors
    assert f"image {path}" in errors[0]


@pytest.mark.parametrize("damage", ["truncated", "flipped", "empty"])
def test_broken_images_are_refused(demo, row, tmp_path, damage):
    data = Path(row.image).read_bytes()
    broken = {"truncated": data[: len(data) // 2], "flipped": data[:-20] + bytes([data[-20] ^ 0xFF]) + data[-19:],
              "empty": b""}[damage]
    (tmp_path / "broken.png").write_bytes(broken)
    code, _, errors = generate(demo, "--image", tmp_path / "broken.png", "--prompt", "caption en")
    assert code == BadInputError.exit_code and len(errors) == 1 and "cannot read image" in errors[0], errors


# 5. a dtype the artifact does not have -----------------------------------------------------------------

@pytest.mark.parametrize("dtype", ["q4", "fp16"])
def test_missing_dtype_is_refused(demo, row, dtype):
    code, _, errors = generate(demo, "--dtype", dtype, "--image", row.image, "--prompt", row.prefix)
    assert code == BadInputError.exit_code and len(errors) == 1, errors
    assert f"no {dtype} graphs" in errors[0] and "fp32, int8" in errors[0]
    with pytest.raises(BadInputError, match="fp32, int8"):
        OnnxPaliGemma(demo, dtype=dtype)


def test_missing_graph_of_a_per_graph_map_is_refused(demo):
    with pytest.raises(BadInputError, match="embed_tokens_q4.onnx"):
        OnnxPaliGemma(demo, dtype={"embed_tokens": "q4"})


# 6. a Core ML artifact ------------------------------------------------------------------------------------

def test_coreml_artifact_is_named_as_such(row, tmp_path):
    folder = tmp_path / "coreml"
    (folder / "decoder.mlpackage").mkdir(parents=True)
    (folder / "manifest.json").write_text(json.dumps({"format": "pgexport-coreml/1", "files": {}}))
    code, _, errors = generate(folder, "--image", row.image, "--prompt", row.prefix)
    assert code == UnsupportedError.exit_code and len(errors) == 1, errors
    assert "Core ML artifact" in errors[0] and "no manifest.json" not in errors[0]
