"""The shipped demo model: checkpoint, tokenizer layout, held-out quality, task generator, split loader."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoProcessor, PaliGemmaForConditionalGeneration

import numpy as np

from pgexport.demo import CHECKPOINT_DIR, EVAL_FILE, load_split, make_split, sample_inputs
from pgexport.demo.task import KIND_PREFIXES, KINDS, box_bins, loc_tokens
from pgexport.demo.train import EVAL_ROWS, EVAL_SEED, OTHER_SEED
from pgexport.errors import BadInputError
from pgexport.metrics import object_scores, score_answers
from pgexport.structured import parse_detections


@pytest.fixture(scope="module")
def demo():
    torch.set_num_threads(2)
    model = PaliGemmaForConditionalGeneration.from_pretrained(CHECKPOINT_DIR).eval()
    processor = AutoProcessor.from_pretrained(CHECKPOINT_DIR)
    return model, processor


def test_special_token_layout(demo):
    model, processor = demo
    tokenizer = processor.tokenizer
    assert (tokenizer.pad_token_id, tokenizer.eos_token_id, tokenizer.bos_token_id, tokenizer.unk_token_id) == (0, 1, 2, 3)
    assert tokenizer.convert_ids_to_tokens([0, 1, 2, 3]) == ["<pad>", "<eos>", "<bos>", "<unk>"]
    image_id = len(tokenizer) - 1
    assert tokenizer.convert_tokens_to_ids("<image>") == image_id == model.config.image_token_index
    assert model.config.text_config.vocab_size == len(tokenizer)
    first_loc = image_id - 1024 - 128
    assert tokenizer.convert_tokens_to_ids([f"<loc{i:04d}>" for i in range(1024)]) == list(range(first_loc, first_loc + 1024))
    assert tokenizer.convert_tokens_to_ids([f"<seg{i:03d}>" for i in range(128)]) == list(range(first_loc + 1024, image_id))
    assert len(tokenizer.encode("\n", add_special_tokens=False)) == 1
    generation = model.generation_config
    assert (generation.eos_token_id, generation.pad_token_id, generation.bos_token_id) == (1, 0, 2)
    assert model.config.text_config.num_key_value_heads == 1


def test_processor_prompt_and_round_trip(demo):
    _, processor = demo
    tokenizer = processor.tokenizer
    image, prefix = sample_inputs(1)[0]
    ids = processor(images=[image], text=["<image>" + prefix], return_tensors="np")["input_ids"][0].tolist()
    n_image = processor.image_seq_length
    assert ids[:n_image] == [len(tokenizer) - 1] * n_image and ids[n_image] == 2
    assert tokenizer.decode(ids[n_image + 1 :]) == prefix + "\n"
    for row in load_split(EVAL_FILE)[:40]:
        encoded = tokenizer.encode(row.suffix, add_special_tokens=False)
        assert 3 not in encoded, row.suffix  # no <unk>
        assert tokenizer.decode(encoded + [1], skip_special_tokens=True) == row.suffix


# The targets, per kind: exact match for the text kinds, the share of boxes at IoU >= 0.5 for
# detect, the mean mask IoU for segment; held-out B (drawn otherwise) within 5 points of them.
TARGETS = {"caption": 0.95, "color": 0.95, "count": 0.95, "detect": 0.90, "segment": 0.75}  # issue 16's


def test_recorded_held_out_figures():
    recorded = json.loads((CHECKPOINT_DIR / "eval_results.json").read_text())
    for held_out, slack in (("A", 0.0), ("B", 0.05)):
        assert recorded[held_out]["rows"] == EVAL_ROWS
        for kind, target in TARGETS.items():
            assert recorded[held_out]["per_kind"][kind] >= target - slack, (held_out, kind, recorded[held_out])


def test_answers_on_held_out_rows(demo):
    """The shipped weights answer the first 40 generated held-out rows (8 of each kind) as recorded:
    scored against the drawn scenes, each kind within 0.2 of its target (8 rows a kind: one miss is
    0.125 of a text kind)."""
    from pgexport.demo.train import generate_answers
    from pgexport.demo.vqvae import numpy_decode

    model, processor = demo
    rows = make_split(40, EVAL_SEED)
    answers = generate_answers(model, processor, rows, batch_size=20)
    per_kind = score_answers(answers, rows, KIND_PREFIXES, numpy_decode())["per_kind"]
    assert all(per_kind[kind] >= target - 0.2 for kind, target in TARGETS.items()), per_kind


def test_generator_is_deterministic():
    first, again, other = make_split(10, seed=3), make_split(10, seed=3), make_split(10, seed=4)
    as_tuples = lambda split: [(s.image.tobytes(), s.prefix, s.suffix) for s in split]  # noqa: E731
    assert as_tuples(first) == as_tuples(again)
    assert as_tuples(first) != as_tuples(other)
    assert [s.kind for s in first] == list(KINDS) * 2


def test_shipped_eval_split_is_the_generated_one():
    rows, generated = load_split(EVAL_FILE), make_split(EVAL_ROWS, EVAL_SEED)
    assert [(r.prefix, r.suffix) for r in rows] == [(g.prefix, g.suffix) for g in generated]
    assert all(r.open_image().tobytes() == g.image.tobytes() for r, g in zip(rows[:20], generated))


def test_boxes_follow_paligemma_format():
    # y0 x0 y1 x1 on the 64-level grid of the 1024 bins: a start is its level's first bin, an end the
    # last bin before its level; the image is 64 wide and 128 high
    assert box_bins((16, 32, 48, 64), 64, 128) == (256, 256, 511, 767)
    assert box_bins((0, 0, 64, 128), 64, 128) == (0, 0, 1023, 1023)
    (box,) = parse_detections(loc_tokens(box_bins((16, 32, 48, 64), 64, 128)) + " circle", 64, 128)
    assert (box.x0, box.y0, box.label) == (16, 32, "circle") and (48 - box.x1, 64 - box.y1) == (1 / 16, 1 / 8)


def test_segment_answers_decode_to_the_drawn_masks():
    """A generated segment answer's own box and codes, through the shipped decoder, give back the
    drawn mask: the VQ-VAE's reconstruction (0.988 mean IoU on its crops) less what the 64-level
    box costs; 0.8 leaves room for the smallest shapes (about 9 px a side)."""
    from pgexport.demo.vqvae import numpy_decode

    rows = make_split(12, "segment-check", kinds=("segment",))
    scores = [s for row in rows for s in object_scores(row.suffix, row, numpy_decode())]
    assert len(scores) >= 12 and min(scores) >= 0.8 and np.mean(scores) >= 0.9, scores


def test_other_held_out_kind_is_drawn_otherwise():
    a, b = make_split(20, EVAL_SEED), make_split(20, OTHER_SEED, other=True)
    assert max(max(s.image.size) for s in a) <= 160 < min(max(s.image.size) for s in b)
    assert all(s.image.mode == "RGB" and len(s.scene.masks) == len(s.scene.shapes) for s in a + b)


def test_sample_inputs_pad_a_batch():
    samples = sample_inputs(3)
    assert len(samples) == 3
    assert len({len(prompt.split()) for _, prompt in samples}) == 3
    assert all(image.mode == "RGB" for image, _ in samples)


@pytest.mark.parametrize(
    "bad_line, message",
    [("{not json", "not a JSON object"), ('{"image": "x.png", "prefix": "caption en"}', "suffix"),
     ('{"image": "missing.png", "prefix": "a", "suffix": "b"}', "image not found")],
)
def test_bad_row_reports_its_line(tmp_path, bad_line, message):
    good = load_split(EVAL_FILE)[0]
    (tmp_path / "x.png").write_bytes(Path(good.image).read_bytes())
    path = tmp_path / "rows.jsonl"
    path.write_text(json.dumps({"image": "x.png", "prefix": good.prefix, "suffix": good.suffix}) + "\n\n" + bad_line + "\n")
    with pytest.raises(BadInputError, match=rf"rows\.jsonl:3: .*{message}"):
        load_split(path)


# transformers.js (Node) must split and join text exactly as the Python tokenizer does. Uses the
# npm install that tests/test_transformersjs.py makes in tests/js (skipped when it is not there).
