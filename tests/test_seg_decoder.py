"""PaliGemma's segmentation decoder (issue 16, part 2): big_vision's VQ-VAE decoder read from an npz
with vae-oid.npz's structure (tests write one with the real shapes and random weights: the real file
cannot be downloaded here), exported as onnx/seg_decoder.onnx and seg_decoder.mlpackage, gated
against the PyTorch module; masks pasted into the box, as COCO RLE in `generate --json`, drawn by
`--draw`.

That the PyTorch module reads the weights as big_vision's Flax decoder does (transposed convs,
padding, the 4 x 4 grid's order) is checked against Flax itself in
benchmarks/seg_decoder_flax_check.py (jax and flax are no dependencies of the suite); the figures
are in benchmarks/results/seg_decoder.md.
"""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from pgexport.cli import main
from pgexport.contract import COREML_SEG_DECODER, SEG_DECODER, graph_path
from pgexport.exporters.seg_decoder import (
    MAX_REL_DIFF,
    compare_masks,
    load_seg_decoder,
    probe_codes,
    reference_logits,
)
from pgexport.manifest import read_manifest, sha256_file, verify
from pgexport.runtime import OnnxPaliGemma
from pgexport.structured import MASK_OPACITY, PALETTE, Box, draw_boxes, parse_detections, paste_mask, rle_decode, rle_encode

CODES = [5, 17, 33, 64, 127, 0, 90, 12, 45, 101, 3, 77, 56, 119, 8, 64]
SEGMENT = "<loc0256><loc0128><loc0768><loc0640>" + "".join(f"<seg{c:03d}>" for c in CODES) + " circle"


def test_export_writes_a_gated_seg_decoder(demo_onnx, seg_npz):
    """The demo export with --seg-decoder: the graph is listed and hashed, the record names the
    file's sha256 and shapes, and the gate measured it against the PyTorch module."""
    manifest = read_manifest(demo_onnx)
    record = manifest["seg_decoder"]
    assert record["sha256"] == sha256_file(seg_npz) and record["source"] == "vae-oid.npz"
    assert (record["codebook_size"], record["embedding_dim"]) == (128, 512)
    assert record["parameters"] == 1_123_457  # 512*128+128 + 2*(2*(9*128*128+128) + 128*128+128) + transposed + last
    parity = record["parity"]
    assert parity["passed"] and parity["rows"] == 8 + 32  # every code once (8 rows of 16), then 32 random rows
    assert parity["max_rel_diff"] <= MAX_REL_DIFF and parity["mask_iou_clear"] == 1.0
    assert 0.1 < parity["max_abs_logit"] < 10  # the test file's logits span both sides of 0
    assert f"onnx/{SEG_DECODER.filename()}" in manifest["files"]
    assert record["sha256"][:16] in (demo_onnx / "README.md").read_text()  # the card's Masks section
    assert verify(demo_onnx) == []


def test_export_prints_the_seg_decoder_line(demo_artifact):
    _, output = demo_artifact
    line = next(line for line in output.splitlines() if line.startswith("seg decoder"))
    assert "vae-oid.npz, 128 codes" in line and line.endswith("pass"), line


def test_runtime_masks_equal_the_pytorch_decoder(demo_onnx, seg_npz):
    """Generation.masks' path: the answer's codes through onnx/seg_decoder.onnx, pasted into its box,
    equal to the PyTorch decoder's logits pasted the same way, on every pixel whose logit is further
    from 0 than the gate's bound."""
    runtime = OnnxPaliGemma(demo_onnx)
    assert runtime.has_seg_decoder
    width, height = 320, 200
    boxes = parse_detections(SEGMENT + " ; <loc0000><loc0000><loc0100><loc0100> square", width, height)
    assert [b.codes for b in boxes] == [tuple(CODES), ()]
    (mask,) = runtime.masks(boxes, width, height)
    assert mask.box == boxes[0] and mask.label == "circle" and mask.mask.shape == (height, width)
    # Box: x 128/1024*320 = 40 .. 640/1024*320 = 200, y 256/1024*200 = 50 .. 768/1024*200 = 150.
    outside = mask.mask.copy()
    outside[50:150, 40:200] = False
    assert not outside.any()
    reference = reference_logits(load_seg_decoder(seg_npz), np.array([CODES]))[0]
    expected = paste_mask(reference, boxes[0], width, height)
    # Pixels whose pasted reference logit is within the bound of 0 may flip (none did here).
    pasted = np.zeros((height, width), np.float32)
    pasted[50:150, 40:200] = np.asarray(Image.fromarray(reference).resize((160, 100), Image.Resampling.BILINEAR))
    clear = np.abs(pasted) > MAX_REL_DIFF * np.abs(reference).max()
    assert (mask.mask == expected)[clear].all()
    assert 0 < mask.mask.sum() < 160 * 100  # a mask, not the whole box nor nothing


def test_onnx_parity_on_fixed_rows_and_batch_sizes(demo_onnx, seg_npz):
    """Any batch size (the graph's batch dim is dynamic); rows run alone equal rows run together."""
    module = load_seg_decoder(seg_npz)
    codes = probe_codes(module.codebook_size, rows=5, seed=3)
    session = OnnxPaliGemma(demo_onnx).sessions[SEG_DECODER.name]
    together = session.run(None, {"codes": codes})[0]
    alone = np.concatenate([session.run(None, {"codes": row[None]})[0] for row in codes])
    assert together.shape == (len(codes), 64, 64)
    assert compare_masks(reference_logits(module, codes), together)["passed"]
    assert compare_masks(alone, together)["passed"]


def test_paste_mask_geometry_derived_by_hand():
    """Logits +1 on the left half of the 64 columns, -1 on the right, into a box of 160 x 100 pixels
    at (40, 50): PIL's bilinear resize samples column c at (c + 0.5) * 64/160 - 0.5, so column 79
    reads 31.3 (0.7 * 1 + 0.3 * -1 = 0.4 > 0, inside) and column 80 reads 31.7 (-0.4, outside):
    80 columns x 100 rows, at x 40..119 and y 50..149."""
    logits = np.where(np.arange(64)[None, :] < 32, 1.0, -1.0).repeat(64, axis=0).astype(np.float32)
    box = Box("x", 40.0, 50.0, 200.0, 150.0, (256, 128, 768, 640))
    mask = paste_mask(logits, box, 320, 200)
    assert mask.sum() == 80 * 100
    assert mask[50:150, 40:120].all()
    # A box under a pixel wide gives an empty mask; one past the image's edge is cut at it.
    assert not paste_mask(logits, Box("x", 10.2, 10.0, 10.9, 20.0, (0, 0, 1, 1)), 320, 200).any()
    assert paste_mask(np.ones((64, 64), np.float32), Box("x", 300.0, 0.0, 400.0, 10.0, (0, 0, 1, 1)), 320, 200).sum() == 20 * 10


def test_rle_is_cocos_uncompressed_format():
    """Column-major runs, False first: [[0, 1], [1, 1]] reads down the columns as 0, 1, 1, 1."""
    assert rle_encode(np.array([[0, 1], [1, 1]], bool)) == {"size": [2, 2], "counts": [1, 3]}
    assert rle_encode(np.array([[1, 0], [1, 0]], bool)) == {"size": [2, 2], "counts": [0, 2, 2]}
    assert rle_encode(np.zeros((2, 3), bool)) == {"size": [2, 3], "counts": [6]}
    rng = np.random.default_rng(0)
    for shape in ((1, 1), (7, 5), (64, 33)):
        mask = rng.random(shape) > 0.5
        encoded = rle_encode(mask)
        assert sum(encoded["counts"]) == mask.size and (rle_decode(encoded) == mask).all()


def test_draw_fills_each_mask_in_its_boxs_colour():
    image = Image.new("RGB", (400, 200), (100, 100, 100))
    # Boxes: "a" x 0..200, y 0..100; "circle" x 50..250, y 50..150 (its label drawn above it).
    boxes = parse_detections("<loc0000><loc0000><loc0512><loc0512> a ; " + SEGMENT, 400, 200)
    mask = np.zeros((200, 400), bool)
    mask[120:140, 100:200] = True
    from pgexport.structured import Mask

    drawn = np.asarray(draw_boxes(image, boxes, [Mask(boxes[1], mask)]))
    colour = np.array(PALETTE[1])  # the second box's
    alpha = round(255 * MASK_OPACITY) / 255
    expected = np.round(colour * alpha + 100 * (1 - alpha))
    assert np.abs(drawn[130, 150].astype(int) - expected).max() <= 1  # PIL's paste rounds
    assert (drawn[120:140, 100:200] == drawn[130, 150]).all()  # the whole mask, one colour
    assert tuple(drawn[145, 150]) == (100, 100, 100)  # in the box, outside the mask


def test_generate_json_and_draw_carry_masks(demo_onnx, tmp_path):
    """The demo model answers no segment prompt (its v1 knows no <seg> tokens), so the CLI shows
    "masks": [] for its answers; the mask JSON itself is Mask.as_json, checked above and here."""
    image = tmp_path / "in.png"
    Image.new("RGB", (64, 64), (0, 0, 255)).save(image)
    result = CliRunner().invoke(main, ["generate", str(demo_onnx), "--image", str(image), "--prompt",
                                                       "caption en", "--json", "--draw", str(tmp_path / "out.png")])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["masks"] == []
    assert "0 mask(s)" in result.stderr
    runtime = OnnxPaliGemma(demo_onnx)
    (mask,) = runtime.masks(parse_detections(SEGMENT, 64, 48), 64, 48)
    found = mask.as_json()
    assert found["codes"] == CODES and found["area"] == int(mask.mask.sum())
    assert (rle_decode(found["rle"]) == mask.mask).all()


def bad_npz(folder: Path, seg_npz: Path, kind: str) -> Path:
    with np.load(seg_npz) as archive:
        arrays = dict(archive)
    path = folder / f"{kind}.npz"
    if kind == "missing":
        del arrays["decoder.8.weight"]
    elif kind == "shape":
        arrays["decoder.6.weight"] = arrays["decoder.6.weight"][:, :32]
    elif kind == "nan":
        arrays["decoder.0.bias"] = arrays["decoder.0.bias"].copy()
        arrays["decoder.0.bias"][3] = np.nan
    elif kind == "text":
        path.write_text("not an archive")
        return path
    elif kind == "pickle":
        np.savez(path, **{"_vq_vae._embedding": np.array([object()], dtype=object)})
        return path
    np.savez(path, **arrays)
    return path


@pytest.mark.parametrize("kind, message", [
    ("missing", "missing decoder.8.weight"),
    ("shape", "decoder.6.weight has shape [128, 32, 4, 4]; the architecture needs [128, 64, 4, 4]"),
    ("nan", "decoder.0.bias holds NaN or infinite values"),
    ("text", "not a readable .npz file"),
    ("pickle", "not a readable .npz file"),
    ("absent", "no such file"),
])
def test_a_bad_decoder_file_exits_4_before_any_work(tmp_path, seg_npz, kind, message):
    """One line, exit 4, nothing written: checked before the checkpoint is loaded (onnx and coreml)."""
    path = tmp_path / "absent.npz" if kind == "absent" else bad_npz(tmp_path, seg_npz, kind)
    for command in ("onnx", "coreml"):
        out = tmp_path / f"out-{command}"
        result = CliRunner().invoke(main, [command, "--seg-decoder", str(path), "-o", str(out)])
        assert result.exit_code == 4, (command, result.output, result.stderr)
        assert message in result.stderr and len(result.stderr.strip().splitlines()) == 1, result.stderr
        assert not out.exists()


def test_quantize_keeps_the_seg_decoder(demo_onnx, tmp_path):
    """A quantized artifact links the input's seg decoder and keeps its record: masks still decode."""
    from pgexport.pipeline import quantize_artifact

    out = tmp_path / "q"
    manifest = quantize_artifact(demo_onnx, out, methods=["q4"], validate=False, progress=False)
    assert manifest["seg_decoder"] == read_manifest(demo_onnx)["seg_decoder"]
    assert sha256_file(graph_path(out, SEG_DECODER.name)) == sha256_file(graph_path(demo_onnx, SEG_DECODER.name))
    runtime = OnnxPaliGemma(out, dtype="q4")
    assert len(runtime.masks(parse_detections(SEGMENT, 64, 64), 64, 64)) == 1
    assert verify(out) == []



def test_coreml_seg_decoder_package(seg_npz, tmp_path):
    """seg_decoder.mlpackage: converted, described, spec-checked, its wrapper gated against the
    PyTorch module. Its Core ML predictions need macOS (validate runs them there)."""
    pytest.importorskip("coremltools")
    from pgexport.coreml.convert import convert_seg_decoder, seg_wrapper_parity
    from pgexport.coreml.spec import check_seg_decoder, load_spec

    module = load_seg_decoder(seg_npz)
    mlmodel, traced = convert_seg_decoder(module, "iOS18")
    parity = seg_wrapper_parity(module, traced)
    assert parity["passed"] and parity["mask_iou_clear"] == 1.0 and parity["max_rel_diff"] <= MAX_REL_DIFF
    path = tmp_path / COREML_SEG_DECODER.filename
    mlmodel.save(str(path))
    assert check_seg_decoder(load_spec(path), {}) == []
    spec = load_spec(path)
    assert [f.name for f in spec.description.input] == ["codes"]
    assert list(spec.description.input[0].type.multiArrayType.shape) == [1, 16]
    assert zipfile.is_zipfile(seg_npz)  # the input is an npz (a zip), untouched: the guard checks its bytes
