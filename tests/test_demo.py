"""The shipped demo model: checkpoint, tokenizer layout, held-out quality, task generator, split loader."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoProcessor, PaliGemmaForConditionalGeneration

from pgexport.demo import CHECKPOINT_DIR, EVAL_FILE, load_split, sample_inputs
from pgexport.demo.task import Shape, box_tokens, make_split
from pgexport.errors import BadInputError
from pgexport.metrics import exact_match


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


def test_held_out_exact_match(demo):
    from pgexport.demo.train import generate_answers

    model, processor = demo
    rows = load_split(EVAL_FILE)[:32]
    answers = generate_answers(model, processor, rows, batch_size=16)
    score = exact_match(answers, [r.suffix for r in rows])
    assert score >= 0.9, list(zip(answers, [r.suffix for r in rows]))
    recorded = json.loads((CHECKPOINT_DIR / "eval_results.json").read_text())  # the issue asks >= 0.90 held out
    assert recorded["exact_match"] >= 0.9 and recorded["rows"] == len(load_split(EVAL_FILE))


def test_generator_is_deterministic():
    first, again, other = make_split(12, seed=3), make_split(12, seed=3), make_split(12, seed=4)
    as_tuples = lambda split: [(s.image.tobytes(), s.prefix, s.suffix) for s in split]  # noqa: E731
    assert as_tuples(first) == as_tuples(again)
    assert as_tuples(first) != as_tuples(other)
    assert {s.prefix.split()[0] for s in first} == {"caption", "what", "how", "detect"}


def test_shipped_eval_split_is_the_generated_one():
    from pgexport.demo.train import EVAL_ROWS, EVAL_SEED

    rows, generated = load_split(EVAL_FILE), make_split(EVAL_ROWS, EVAL_SEED)
    assert [(r.prefix, r.suffix) for r in rows] == [(g.prefix, g.suffix) for g in generated]
    assert all(r.open_image().tobytes() == g.image.tobytes() for r, g in zip(rows[:20], generated))


def test_boxes_follow_paligemma_format():
    assert box_tokens(Shape(1, 0, "red", "circle")) == "<loc0256><loc0000><loc0511><loc0255>"
    assert box_tokens(Shape(3, 3, "red", "circle")) == "<loc0768><loc0768><loc1023><loc1023>"


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
