"""pgexport.metrics on small hand-made inputs whose figures can be worked out by hand."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pytest

from pgexport.demo.task import KIND_PREFIXES
from pgexport.metrics import (
    answer_rows,
    exact_match,
    held_out_score,
    LogitStats,
    logit_stats,
    max_rel_diff,
    object_scores,
    row_cosines,
    score_answers,
    token_agreement,
)


@dataclass(frozen=True)
class Row:
    prefix: str
    suffix: str


def test_exact_match_strips_whitespace_but_keeps_case():
    assert exact_match([" red ", "2", "blue"], ["red", "3", "blue"]) == pytest.approx(2 / 3)
    assert exact_match(["Red", "red\n"], ["red", "  red"]) == 0.5  # case counts, surrounding whitespace does not
    assert exact_match(["red  circle"], ["red circle"]) == 0.0  # inner whitespace counts
    assert exact_match([], []) == 0.0


@pytest.mark.parametrize("predictions, references", [(["a"], []), (["a", "b"], ["a"]), ([], ["a"])])
def test_exact_match_refuses_unequal_lengths(predictions, references):
    with pytest.raises(ValueError, match="predictions for"):
        exact_match(predictions, references)


def test_score_answers_per_kind_in_kind_order():
    rows = [Row("how many shapes?", "2"), Row("caption en", "red circle"), Row("how many shapes?", "1"),
            Row("detect circle", "<loc0000> circle")]
    answers = ["2", "red circle", "3", "circle"]
    score = score_answers(answers, rows, KIND_PREFIXES)
    assert score == {"exact_match": 0.5, "rows": 4, "per_kind": {"caption": 1.0, "count": 0.5, "detect": 0.0}}
    assert list(score["per_kind"]) == ["caption", "count", "detect"]  # KIND_PREFIXES' order, present kinds only
    assert score_answers(answers, rows) == {"exact_match": 0.5, "rows": 4}
    # one prompt of no known kind: no per-kind breakdown at all
    assert "per_kind" not in score_answers(answers, [*rows[:3], Row("describe", "x")], KIND_PREFIXES)


def test_detect_figure_is_the_share_of_true_boxes_found_at_iou_half():
    truth = "<loc0000><loc0000><loc0511><loc0511> circle ; <loc0512><loc0512><loc1023><loc1023> circle"
    row = Row("detect circle", truth)
    assert object_scores(truth, row) == [1.0, 1.0]
    # the second box starts at x bin 768: 255 of the true 511 bins wide, IoU 255/511 < 0.5
    half = "<loc0000><loc0000><loc0511><loc0511> circle ; <loc0512><loc0768><loc1023><loc1023> circle"
    assert object_scores(half, row) == [1.0, 0.0]
    # one to one: a found box counts for one true box only; a wrong label finds nothing
    assert object_scores("<loc0000><loc0000><loc0511><loc0511> circle", row) == [1.0, 0.0]
    assert object_scores("<loc0000><loc0000><loc0511><loc0511> square", row) == [0.0, 0.0]
    score = score_answers([half], [row], KIND_PREFIXES)
    assert score == {"exact_match": 0.0, "rows": 1, "per_kind": {"detect": 0.5}}


def test_segment_figure_is_the_mask_iou_through_the_decoder():
    """A decoder whose code 0 fills the box and any other code leaves it empty, on a 64 x 64 image:
    the truth's box <loc0000>..<loc0511> pastes over pixels 0..30 (int of 31.94) each way."""
    from PIL import Image

    from pgexport.demo.task import Sample

    def decode(codes):
        return np.where(codes[:, :1, None] == 0, 1.0, -1.0) * np.ones((len(codes), 64, 64))

    full, empty = "<seg000>" * 16, "<seg001>" * 16
    row = Sample(Image.new("RGB", (64, 64)), "segment circle", f"<loc0000><loc0000><loc0511><loc0511>{full} circle")
    assert object_scores(row.suffix, row, decode) == [1.0]
    assert object_scores(f"<loc0000><loc0000><loc0511><loc0511>{empty} circle", row, decode) == [0.0]
    assert object_scores("<loc0000><loc0000><loc0511><loc0511> circle", row, decode) == [0.0]  # no codes: no mask
    taller = f"<loc0000><loc0000><loc1023><loc0511>{full} circle"  # rows 0..62, columns 0..30
    assert object_scores(taller, row, decode) == [pytest.approx(31 / 63)]
    assert score_answers([taller], [row], KIND_PREFIXES, decode)["per_kind"] == {"segment": pytest.approx(31 / 63)}
    assert "segment" not in score_answers([taller], [row], KIND_PREFIXES)["per_kind"]  # no decoder, no figure


def test_held_out_score_batches_and_keeps_row_order():
    rows = [Row("how many shapes?", str(n)) for n in range(7)]
    calls = []

    def answer(chunk):
        calls.append(len(chunk))
        return [row.suffix if int(row.suffix) % 2 == 0 else "wrong" for row in chunk]

    assert answer_rows(answer, rows, 3) == ["0", "wrong", "2", "wrong", "4", "wrong", "6"]
    assert calls == [3, 3, 1]
    assert held_out_score(answer, rows, 4, KIND_PREFIXES) == {"exact_match": 4 / 7, "rows": 7, "per_kind": {"count": 4 / 7}}
    with pytest.raises(ValueError):  # an answer function that loses a row is an error, not a miss
        held_out_score(lambda chunk: ["0"], rows, 4)


def test_token_agreement_counts_up_to_the_first_mismatch():
    reference = np.array([[5, 6, 7, 8], [5, 6, 7, 8], [1, 2, 3, 4]])
    tokens = np.array([[5, 6, 7, 8], [5, 9, 7, 8], [0, 2, 3, 4]])  # identical; differs at step 1; at step 0
    assert token_agreement(reference, tokens) == pytest.approx((1 + 0.25 + 0) / 3)
    assert token_agreement(reference[1], tokens[1]) == 0.25  # one row as a flat array
    assert token_agreement([1, 2, 3, 4], [1, 2, 3, 0]) == 0.75  # later matches after a miss do not count


def test_row_cosines_of_known_vectors():
    reference = np.array([[1.0, 0.0], [1.0, 1.0], [3.0, 4.0], [1.0, 2.0]])
    candidate = np.array([[0.0, 2.0], [2.0, 2.0], [-3.0, -4.0], [2.0, 1.0]])
    np.testing.assert_allclose(row_cosines(reference, candidate), [0.0, 1.0, -1.0, 0.8], atol=1e-12)
    zero, ones = np.zeros((1, 3)), np.ones((1, 3))
    assert row_cosines(zero, ones)[0] == 0.0 == row_cosines(ones, zero)[0]  # zero against non-zero: 0, not nan
    assert row_cosines(zero, zero)[0] == 1.0  # two zero rows are the same row
    assert row_cosines(np.ones((2, 3, 4)), np.ones((2, 3, 4))).shape == (6,)  # leading axes flattened


def test_max_rel_diff_over_the_reference_range():
    reference = np.array([[0.0, 10.0], [-10.0, 5.0]])  # range 20
    candidate = reference + np.array([[0.0, 1.0], [-3.0, 0.5]])
    assert max_rel_diff(reference, candidate) == pytest.approx(3 / 20)
    assert max_rel_diff(np.full((2, 2), 4.0), np.full((2, 2), 4.5)) == 0.5  # constant reference: plain |diff|


def test_logit_stats_with_and_without_a_keep_mask():
    reference = np.array([[[1.0, 0.0, 0.0], [0.0, 4.0, 0.0]], [[3.0, 4.0, 0.0], [0.0, 0.0, 1.0]]])  # [2, 2, 3], range 4
    candidate = reference.copy()
    candidate[0, 0] = [0.0, 1.0, 0.0]  # orthogonal to its reference row, |diff| 1
    candidate[1, 0] = [3.0, 4.0, 2.0]  # cosine 25 / (5 * sqrt(29)), |diff| 2
    stats = logit_stats(reference, candidate)
    assert stats == {"max_abs_diff": 2.0, "max_rel_diff": 0.5, "min_cosine": pytest.approx(0.0, abs=1e-12)}
    keep = np.array([[0, 1], [1, 1]])  # the orthogonal row left out, as padding is
    kept = logit_stats(reference, candidate, keep)
    assert kept["max_abs_diff"] == 2.0 and kept["max_rel_diff"] == 0.5
    assert kept["min_cosine"] == pytest.approx(25 / (5 * math.sqrt(29)))
    assert logit_stats(reference, reference, keep) == {"max_abs_diff": 0.0, "max_rel_diff": 0.0, "min_cosine": pytest.approx(1.0)}


def test_logit_stats_in_parts_equal_the_whole_arrays():
    """The gate adds a 3B prefill one row at a time, each read 64 positions at a time: the figures
    are those of the whole arrays, bit for bit (max, min and per-row cosines do not depend on the
    split), the span over the whole reference included; a NaN anywhere stays NaN."""
    rng = np.random.default_rng(0)
    reference = rng.normal(size=(3, 150, 40)).astype(np.float32)
    candidate = reference + rng.normal(size=reference.shape).astype(np.float32) * 1e-3
    keep = (rng.random((3, 150)) > 0.2).astype(np.int64)
    whole = logit_stats(reference, candidate, keep)
    for rows_per_chunk in (1, 7, 64, 1000):
        parts = LogitStats(rows_per_chunk)
        for row in range(3):
            parts.add(reference[row], candidate[row], keep[row])
        assert parts.result() == whole
    broken = candidate.copy()
    broken[2, 149, 0] = np.nan
    parts = LogitStats(7)
    for row in range(3):
        parts.add(reference[row], broken[row])
    assert all(math.isnan(value) for value in parts.result().values())


def test_a_nan_figure_fails_the_gate():
    """A graph that overflowed gives NaN logits: every comparison with NaN is False, so the gate is
    written to fail on it rather than pass."""
    from pgexport.validate import THRESHOLDS, gate_failures

    nan = float("nan")
    report = {"prefill": {"max_rel_diff": nan, "min_cosine": nan}, "decode": {"max_rel_diff": nan, "min_cosine": nan},
              "tokens": {"agreement": 1.0}}
    assert len(gate_failures(report, THRESHOLDS["fp32"])) == 4  # both stages: rel diff and cosine
    assert [f.split(":")[0] for f in gate_failures(report, THRESHOLDS["q4"])] == ["decode logits"]
    fine = {"prefill": {"max_rel_diff": 0.0, "min_cosine": 1.0}, "decode": {"max_rel_diff": 0.0, "min_cosine": 1.0},
            "tokens": {"agreement": 1.0}}
    assert gate_failures(fine, THRESHOLDS["fp32"]) == []
