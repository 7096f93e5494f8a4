"""PaliGemma's detection syntax as boxes (issue 16, part 1): the parser (pgexport/structured.py) on
hand-derived cases, the same cases through its JavaScript twin in Node, the runtime's
`Generation.boxes` on the demo artifact, `pgexport generate --json --draw`, and the parsers copied
into artifacts (listed in the manifest, verified).

A bin is bin / 1024 of the side, the end bins too (structured.py's docstring says why), x scaled by
the original image's width and y by its height.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from click.testing import CliRunner
from PIL import Image

from pgexport.card import coreml_card, onnx_card
from pgexport.cli import main
from pgexport.demo import CHECKPOINT_DIR, EVAL_FILE, load_split
from pgexport.manifest import read_manifest, verify
from pgexport.processor import Processor
from pgexport.structured import (
    DETECTION,
    JS_FILE,
    JS_SOURCE,
    SWIFT_FILE,
    SWIFT_SOURCE,
    Box,
    copy_parsers,
    parse_detections,
    pixel_span,
)

NODE, SWIFTC = shutil.which("node"), shutil.which("swiftc")
SEGS = "".join(f"<seg{i:03d}>" for i in range(16))

# (text, width, height, [(label, x0, y0, x1, y1, bins y0 x0 y1 x1)]), each coordinate derived by hand.
CASES = [
    # The demo's answer for a circle in row 1, column 0 of its 4 x 4 grid on a 64 x 64 image:
    # y0 = 256/1024*64 = 16, x0 = 0, y1 = 511/1024*64 = 31.9375, x1 = 255/1024*64 = 15.9375.
    ("<loc0256><loc0000><loc0511><loc0255> circle", 64, 64, [("circle", 0, 16, 15.9375, 31.9375, (256, 0, 511, 255))]),
    # Two objects on a 640 x 480 image (x by 640, y by 480):
    # circle: x0 0, y0 256/1024*480 = 120, x1 255/1024*640 = 159.375, y1 511/1024*480 = 239.53125;
    # square: x0 768/1024*640 = 480, y0 0, x1 1023/1024*640 = 639.375, y1 255/1024*480 = 119.53125.
    ("<loc0256><loc0000><loc0511><loc0255> circle ; <loc0000><loc0768><loc0255><loc1023> square", 640, 480,
     [("circle", 0, 120, 159.375, 239.53125, (256, 0, 511, 255)),
      ("square", 480, 0, 639.375, 119.53125, (0, 768, 255, 1023))]),
    # Spaces, a tab and a newline between the tokens, a two-word label, a dangling separator; 200 x 100:
    # x0 512/1024*200 = 100, y0 512/1024*100 = 50, x1 767/1024*200 = 149.8046875, y1 767/1024*100 = 74.90234375.
    (" <loc0512> <loc0512>\n<loc0767>\t<loc0767>   red circle  ;  ", 200, 100,
     [("red circle", 100, 50, 149.8046875, 74.90234375, (512, 512, 767, 767))]),
    # No label; 1024 x 512: x1 = 1023/1024*1024 = 1023, y1 = 1023/1024*512 = 511.5.
    ("<loc0000><loc0000><loc1023><loc1023>", 1024, 512, [("", 0, 0, 1023, 511.5, (0, 0, 1023, 1023))]),
    # A label missing before the next object; at 1024 x 1024 a bin is a pixel.
    ("<loc0000><loc0000><loc0512><loc0512> ; <loc0512><loc0512><loc1023><loc1023> b", 1024, 1024,
     [("", 0, 0, 512, 512, (0, 0, 512, 512)), ("b", 512, 512, 1023, 1023, (512, 512, 1023, 1023))]),
    # Trailing garbage: a cut-off second object; 2048 x 1024: x0 200*2 = 400, x1 400*2 = 800, y as is.
    ("<loc0100><loc0200><loc0300><loc0400> cat ; <loc0001><loc0002", 2048, 1024,
     [("cat", 400, 100, 800, 300, (100, 200, 300, 400))]),
    # Three location tokens are not a box; the full object after them is (1024 x 1024: bins are pixels).
    ("<loc0100><loc0200><loc0300> dog ; <loc0010><loc0020><loc0030><loc0040> cat", 1024, 1024,
     [("cat", 20, 10, 40, 30, (10, 20, 30, 40))]),
    ("<loc0100><loc0200><loc0300> dog", 1024, 1024, []),
    # Not PaliGemma's bins (1024 and up), and boxes with no extent (y1 < y0; y1 == y0).
    ("<loc1024><loc0000><loc1100><loc0100> x", 1024, 1024, []),
    ("<loc0500><loc0100><loc0400><loc0200> upside ; <loc0100><loc0100><loc0100><loc0200> flat", 1024, 1024, []),
    # A segment answer: 16 mask tokens after the box are skipped; 100 x 100: 256/1024*100 = 25, 768/1024*100 = 75.
    (f"<loc0256><loc0256><loc0768><loc0768>{SEGS} person", 100, 100, [("person", 25, 25, 75, 75, (256, 256, 768, 768))]),
    # Text before the object is skipped; x0 = 512, x1 = 1023, y1 = 512 (1024 x 1024).
    ("I see <loc0000><loc0512><loc0512><loc1023> sky", 1024, 1024, [("sky", 512, 0, 1023, 512, (0, 512, 512, 1023))]),
    # Five tokens in a row: a box of the first four, no label (a "<" follows), then a lone token.
    ("<loc0001><loc0002><loc0003><loc0004><loc0005> x", 1024, 1024, [("", 2, 1, 4, 3, (1, 2, 3, 4))]),
    # A trailing newline and a non-ASCII label.
    ("<loc0000><loc0000><loc0512><loc0512> café\n", 1024, 1024, [("café", 0, 0, 512, 512, (0, 0, 512, 512))]),
    # The demo's two-triangle answer (64 x 64): the second is row 3: y0 768/1024*64 = 48, y1 1023/1024*64 = 63.9375.
    ("<loc0000><loc0000><loc0255><loc0255> triangle ; <loc0768><loc0000><loc1023><loc0255> triangle", 64, 64,
     [("triangle", 0, 0, 15.9375, 15.9375, (0, 0, 255, 255)), ("triangle", 0, 48, 15.9375, 63.9375, (768, 0, 1023, 255))]),
    ("red circle and blue square", 64, 64, []),
    ("", 64, 64, []),
    # Segment answers whose codes do not make a mask (15 codes; a number over 127): boxes still.
    (f"<loc0256><loc0256><loc0768><loc0768>{SEGS[:-8]} a ; <loc0000><loc0000><loc0512><loc0512><seg200>{SEGS[8:]} b",
     1024, 1024, [("a", 256, 256, 768, 768, (256, 256, 768, 768)), ("b", 0, 0, 512, 512, (0, 0, 512, 512))]),
]
# The codes each case's boxes keep: a segment answer's 16 numbers when there are 16, each under 128.
CODES = {10: [tuple(range(16))], 17: [(), ()]}


def as_tuples(boxes: list[Box]) -> list[tuple]:
    return [(b.label, b.x0, b.y0, b.x1, b.y1, b.bins) for b in boxes]


@pytest.mark.parametrize("index", range(len(CASES)))
def test_parser_keeps_a_segment_answers_codes(index):
    text, width, height, expected = CASES[index]
    assert [b.codes for b in parse_detections(text, width, height)] == CODES.get(index, [()] * len(expected))


def cases_json() -> list[dict]:
    """CASES with what the Python parser returns, as the JavaScript test and the macOS workflow's
    Swift check (tests/swift/main.swift) read them."""
    return [{"text": text, "width": width, "height": height,
             "boxes": [{"label": b.label, "x0": b.x0, "y0": b.y0, "x1": b.x1, "y1": b.y1, "bins": list(b.bins),
                        "codes": list(b.codes)}
                       for b in parse_detections(text, width, height)]} for text, width, height, _ in CASES]


@pytest.mark.parametrize("text, width, height, expected", CASES, ids=[f"case{i}" for i in range(len(CASES))])
def test_parser_gives_the_hand_derived_boxes(text, width, height, expected):
    assert as_tuples(parse_detections(text, width, height)) == expected


def test_box_json_and_bad_sizes():
    box = parse_detections("<loc0256><loc0000><loc0511><loc0255> circle", 640, 480)[0]
    assert box.score is None
    assert box.as_json() == {"label": "circle", "box": [0, 120, 159.375, 239.53125], "bins": [256, 0, 511, 255]}
    for width, height in ((0, 10), (10, -1), (float("nan"), 10), (10, float("inf"))):
        with pytest.raises(ValueError):
            parse_detections("<loc0000><loc0000><loc0001><loc0001> x", width, height)


def run_js(script: Path, cases: list[dict]) -> list[list[dict]]:
    """parseDetections of `script` (an ES module file) on each case, in Node."""
    runner = ("import { readFileSync } from 'node:fs';"
              "const source = readFileSync(process.argv[1], 'utf8');"
              "const { parseDetections } = await import('data:text/javascript;base64,' + Buffer.from(source).toString('base64'));"
              "const cases = JSON.parse(readFileSync(0, 'utf8'));"
              "console.log(JSON.stringify(cases.map((c) => parseDetections(c.text, c.width, c.height))));")
    result = subprocess.run([NODE, "--input-type=module", "-e", runner, str(script)], input=json.dumps(cases),
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


@pytest.mark.skipif(NODE is None, reason="the JavaScript parser runs in Node.js: `node` is not on PATH")
def test_javascript_parser_equals_the_python_one(demo_onnx):
    """The artifact's copy (the same bytes as the package's) on every case: the same boxes, to the bit."""
    shipped = demo_onnx / JS_FILE
    assert shipped.read_bytes() == JS_SOURCE.read_bytes()
    cases = cases_json()
    for case, boxes in zip(cases, run_js(shipped, cases), strict=True):
        assert [{key: box[key] for key in ("label", "x0", "y0", "x1", "y1", "bins", "codes")} for box in boxes] == case["boxes"], case
        assert all(box["score"] is None for box in boxes)


def pattern_literal(path: Path, regex: str) -> str:
    found = re.search(regex, path.read_text(encoding="utf-8"))
    assert found, f"no pattern literal in {path.name}"
    return found.group(1)


def test_the_three_parsers_share_one_pattern():
    """Swift cannot run here (no swiftc on Linux CI); its pattern is at least the Python one, character for character."""
    assert pattern_literal(JS_SOURCE, r"const DETECTION = /(.+)/g;") == DETECTION.pattern
    assert pattern_literal(SWIFT_SOURCE, r'pattern: #"(.+)"#') == DETECTION.pattern


@pytest.mark.skipif(SWIFTC is None, reason="no swiftc on PATH (Linux: no Swift toolchain here); "
                                           ".github/workflows/coreml-macos.yml compiles and runs it on macOS")
def test_swift_parser_equals_the_python_one(tmp_path):
    cases = tmp_path / "cases.json"
    cases.write_text(json.dumps(cases_json()))
    binary = tmp_path / "structured-check"
    build = subprocess.run([SWIFTC, str(SWIFT_SOURCE), str(Path(__file__).parent / "swift" / "main.swift"), "-o", str(binary)],
                           capture_output=True, text=True, timeout=600)
    assert build.returncode == 0, build.stderr
    run = subprocess.run([str(binary), str(cases)], capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stdout + run.stderr


def special_locations_processor(tmp_path: Path) -> Processor:
    """The demo's processor files with every `<locNNNN>` marked special, as some tokenizers have them."""
    for name in ("preprocessor_config.json", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(CHECKPOINT_DIR / name, tmp_path / name)
    tokenizer = json.loads((CHECKPOINT_DIR / "tokenizer.json").read_text())
    for token in tokenizer["added_tokens"]:
        if token["content"].startswith("<loc"):
            token["special"] = True
    (tmp_path / "tokenizer.json").write_text(json.dumps(tokenizer))
    return Processor(tmp_path)


def test_answers_keep_location_tokens_even_when_special(tmp_path):
    """The runtime decodes answers with decode_answer: eos and pad go, `<loc>` stays. With the demo's
    tokenizer (locations not special) that is decode(skip_special_tokens=True); with locations special,
    skipping would lose the boxes."""
    plain = Processor(CHECKPOINT_DIR)
    ids = plain.tokenizer.encode("<loc0000><loc0000><loc0255><loc0255> triangle", add_special_tokens=False).ids
    ids += [plain.eos_token_id, plain.pad_token_id]
    expected = "<loc0000><loc0000><loc0255><loc0255> triangle"
    assert plain.decode_answer(ids) == plain.decode(ids, skip_special_tokens=True) == expected
    special = special_locations_processor(tmp_path)
    assert special.decode(ids, skip_special_tokens=True) == " triangle"
    assert special.decode_answer(ids) == expected


@pytest.fixture(scope="module")
def detect_rows():
    """The eval split's detect rows (one or two kinds asked)."""
    rows = [row for row in load_split(EVAL_FILE) if row.prefix.startswith("detect")]
    assert len(rows) >= 10
    return rows


def test_demo_artifact_boxes_are_its_answers_boxes(demo_onnx, detect_rows):
    """Every detect row of the eval split, one batch on the demo's default (int8) variant: the boxes
    are the parser's reading of the answer text in the original image's pixels, and they find the
    rows' true boxes (the suffixes') about as the PyTorch model finds the drawn ones (0.82 of them
    on all 200 held-out rows; 0.7 here, where one object of the ~70 is 1.4 points)."""
    from pgexport.metrics import object_scores
    from pgexport.runtime import OnnxPaliGemma

    runtime = OnnxPaliGemma(demo_onnx)
    results = runtime.generate([row.open_image() for row in detect_rows], [row.prefix for row in detect_rows], 32)
    for row, result in zip(detect_rows, results, strict=True):
        assert result.boxes == parse_detections(result.text, *row.open_image().size), (row.image, result.text)
    found = [s for row, result in zip(detect_rows, results) for s in object_scores(result.text, row)]
    assert len(found) >= 50 and sum(found) / len(found) >= 0.7, (sum(found), len(found))


def wide_image(folder: Path, name: str = "eval_003.png") -> Path:
    """An eval image (a detect row) stretched to 384 x 256, saved as a PNG."""
    path = folder / f"wide-{name}"
    Image.open(EVAL_FILE.parent / "images" / name).resize((384, 256), Image.NEAREST).save(path)
    return path


def test_boxes_are_in_the_original_images_pixels(demo_onnx, tmp_path):
    """An eval image stretched to 384 x 256: the boxes are the bins times 384 / 1024 across and
    256 / 1024 down (the processor squeezes the whole image into the model's square)."""
    from pgexport.runtime import OnnxPaliGemma

    row = load_split(EVAL_FILE)[3]
    result = OnnxPaliGemma(demo_onnx).generate([Image.open(wide_image(tmp_path))], [row.prefix])[0]
    assert result.boxes and [b.label for b in result.boxes] == [b.label for b in parse_detections(row.suffix, 1, 1)]
    for box in result.boxes:
        y0, x0, y1, x1 = box.bins
        assert (box.x0, box.y0, box.x1, box.y1) == (x0 * 384 / 1024, y0 * 256 / 1024, x1 * 384 / 1024, y1 * 256 / 1024)


def test_generate_json_and_draw(demo_onnx, tmp_path):
    from pgexport.runtime import OnnxPaliGemma

    image = wide_image(tmp_path)
    prompt = load_split(EVAL_FILE)[3].prefix
    out = tmp_path / "drawn" / "boxes.png"
    out.parent.mkdir()
    result = CliRunner().invoke(main, ["generate", str(demo_onnx), "--image", str(image), "--prompt", prompt,
                                       "--json", "--draw", str(out)])
    assert result.exit_code == 0, result.output
    row = json.loads(result.stdout)
    expected = OnnxPaliGemma(demo_onnx).generate([Image.open(image)], [prompt])[0].boxes
    assert expected and row["boxes"] == [box.as_json() for box in expected]
    assert sorted(p.name for p in out.parent.iterdir()) == ["boxes.png"]  # the named file, nothing else
    original, drawn = Image.open(image).convert("RGB"), Image.open(out).convert("RGB")
    assert drawn.size == original.size == (384, 256)
    spans = [(*pixel_span(b["box"][0], b["box"][2], 384), *pixel_span(b["box"][1], b["box"][3], 256)) for b in row["boxes"]]

    def on_an_outline(x, y):
        return any((x in (l, r) and t <= y <= b) or (y in (t, b) and l <= x <= r) for l, r, t, b in spans)

    for left, right, top, bottom in spans:
        edge = [(x, y) for x in range(left, right + 1) for y in (top, bottom)]
        edge += [(x, y) for y in range(top, bottom + 1) for x in (left, right)]
        assert all(drawn.getpixel(p) != original.getpixel(p) for p in edge)
        centre = ((left + right) // 2, (top + bottom) // 2)
        if not on_an_outline(*centre):
            assert drawn.getpixel(centre) == original.getpixel(centre)  # outlines only


def test_draw_several_images_and_refusals(demo_onnx, tmp_path):
    first, second = wide_image(tmp_path), wide_image(tmp_path, "eval_019.png")
    before = {path: path.read_bytes() for path in (first, second)}

    def generate(images, *args):
        images = [arg for image in images for arg in ("--image", str(image))]
        return CliRunner().invoke(main, ["generate", str(demo_onnx), *images, "--prompt", "detect triangle", *map(str, args)])

    result = generate([first, second], "--draw", tmp_path / "out.png")
    assert result.exit_code == 0, result.output
    assert (tmp_path / "out-0.png").is_file() and (tmp_path / "out-1.png").is_file() and not (tmp_path / "out.png").exists()
    assert Image.open(tmp_path / "out-1.png").size == (384, 256)
    # The input image itself, a file inside the artifact, a folder that does not exist, no image suffix: exit 5.
    for target in (first, demo_onnx / "boxes.png", tmp_path / "missing" / "boxes.png", tmp_path / "boxes.txt2"):
        result = generate([first], "--draw", target)
        assert result.exit_code == 5, (target, result.output)
        assert result.stdout == "" and "--draw" in result.stderr  # refused before any work
    # A hard link to an input is replaced by a new file, never written through.
    os.link(first, tmp_path / "link.png")
    assert generate([first], "--draw", tmp_path / "link.png").exit_code == 0
    assert (tmp_path / "link.png").stat().st_ino != first.stat().st_ino
    assert {path: path.read_bytes() for path in (first, second)} == before
    assert verify(demo_onnx) == []


def test_artifact_carries_the_parser_and_verifies(demo_onnx):
    manifest = read_manifest(demo_onnx)
    assert JS_FILE in manifest["files"]
    assert CliRunner().invoke(main, ["verify", str(demo_onnx)]).exit_code == 0
    fields = {key: value for key, value in manifest.items() if key not in ("files", "versions")}
    assert JS_FILE in onnx_card(fields) and JS_FILE in (demo_onnx / "README.md").read_text()
    coreml = coreml_card({"source": manifest["source"], "options": {"compress": "none", "target": "iOS18", "max_context": 64},
                          "packages": {}, "parity": None}, "")
    assert SWIFT_FILE in coreml and "parseDetections(" in coreml


def test_copy_parsers_never_writes_through_a_link(tmp_path):
    """quantize hard-links the input artifact's files: the parsers are replaced as new files."""
    source, folder = tmp_path / "input.js", tmp_path / "artifact"
    folder.mkdir()
    source.write_text("// the input's copy\n")
    os.link(source, folder / JS_FILE)
    written = copy_parsers(folder, ("js", "swift"))
    assert [p.name for p in written] == [JS_FILE, SWIFT_FILE]
    assert source.read_text() == "// the input's copy\n"
    assert (folder / JS_FILE).read_bytes() == JS_SOURCE.read_bytes()
    assert (folder / SWIFT_FILE).read_bytes() == SWIFT_SOURCE.read_bytes()
    assert sorted(p.name for p in folder.iterdir()) == [JS_FILE, SWIFT_FILE]
