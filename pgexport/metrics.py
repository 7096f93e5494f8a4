"""Every figure a parity check or an evaluation reports, computed in one place.

    exact_match(predictions, references)   share of answers equal to their reference (both stripped)
    score_answers(answers, rows, kinds)    exact match over held-out rows, and each question kind's figure
    object_scores(answer, row, decode)     a detect / segment answer's figure per true object
    box_iou(a, b)                          intersection over union of two (x0, y0, x1, y1) boxes
    held_out_score(answer, rows, batch)    the same, generating the answers batch by batch
    token_agreement(reference, tokens)     greedy-token agreement: share of steps before the first mismatch
    row_cosines(reference, candidate)      cosine of each row (last axis) of two arrays
    max_rel_diff(reference, candidate)     max |difference| over the reference's value range
    logit_stats(reference, candidate)      max_abs_diff, max_rel_diff and min_cosine of two logit arrays
    LogitStats                             the same, accumulated over parts (a batch's rows)

The parity gate (validate), the Core ML hops, the fp16 and optimization passes, distillation, the
demo trainer and build all read their figures from here, so one figure means one computation
wherever it is reported. Plain NumPy and Python: nothing here loads a model.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence

import numpy as np


def exact_match(predictions: list[str], references: list[str]) -> float:
    """Share (0..1) of predictions equal to their reference, both stripped of surrounding
    whitespace (case counts). Unequal lengths raise ValueError (a lost or extra answer is a bug,
    not a miss); no references scores 0.0."""
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions for {len(references)} references")
    if not references:
        return 0.0
    return sum(p.strip() == r.strip() for p, r in zip(predictions, references)) / len(references)


def score_answers(answers: list[str], rows: Sequence, kinds: dict[str, str] | None = None, decode=None) -> dict:
    """Exact match of `answers` against the rows' suffixes: {"exact_match", "rows"}, plus "per_kind"
    when `kinds` ({kind: prompt start}, e.g. the demo task's KIND_PREFIXES) names a kind for every
    row's prefix: each kind's figure, in `kinds`' order, those present only. A kind's figure is its
    exact match, except `detect`: the share of true objects found at box IoU >= 0.5, and `segment`:
    the mean mask IoU over true objects, which needs `decode` (segmentation codes [n, 16] -> mask
    logits [n, 64, 64]) and is left out without it. See object_scores for what "true" is."""
    references = [row.suffix for row in rows]
    result = {"exact_match": exact_match(answers, references), "rows": len(rows)}
    if kinds is not None:
        of_row = [next((k for k, start in kinds.items() if row.prefix.startswith(start)), None) for row in rows]
        if None not in of_row:
            per_kind = {}
            for kind in (k for k in kinds if k in of_row):
                chosen = [(a, r) for a, r, k in zip(answers, rows, of_row) if k == kind]
                if kind in STRUCTURED and (kind == "detect" or decode is not None):
                    scores = [s for a, r in chosen for s in object_scores(a, r, decode)]
                    per_kind[kind] = float(np.mean(scores)) if scores else 0.0
                elif kind not in STRUCTURED:
                    per_kind[kind] = exact_match([a for a, _ in chosen], [r.suffix for _, r in chosen])
            result["per_kind"] = per_kind
    return result


STRUCTURED = ("detect", "segment")  # the prompt kinds whose answers are boxes (and masks)


def box_iou(a, b) -> float:
    """Intersection over union of two boxes (x0, y0, x1, y1); 0 when the union is empty."""
    inter = max(0.0, min(a[2], b[2]) - max(a[0], b[0])) * max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def _truth(row, decode) -> tuple[int, int, list[tuple[str, tuple, np.ndarray | None]]]:
    """(width, height, [(label, pixel box, mask or None)]) of a detect / segment row's true objects."""
    from pgexport.structured import parse_detections, paste_mask

    scene = getattr(row, "scene", None)
    if scene is not None:  # a generated row: what was drawn
        asked = row.prefix.split(" ", 1)[1].split(" ; ")
        objects = [(s.kind, box, mask) for s, box, mask in zip(scene.shapes, scene.boxes, scene.masks) if s.kind in asked]
        return scene.width, scene.height, objects
    # IoU is the same in bins as in pixels (each axis scales alike), so only masks need the image's size
    width, height = row.open_image().size if row.prefix.startswith("segment") else (1024, 1024)
    objects = []
    for box in parse_detections(row.suffix, width, height):
        mask = paste_mask(decode(np.array([box.codes]))[0], box, width, height) if box.codes and decode else None
        objects.append((box.label, (box.x0, box.y0, box.x1, box.y1), mask))
    return width, height, objects


def object_scores(answer: str, row, decode=None) -> list[float]:
    """A detect or segment answer's figure for each true object of its row: the objects drawn (a
    generated row's `scene`), else those of its reference answer (the suffix; a segment reference's
    mask is its codes decoded into its box). Found objects are paired with true ones of the same
    label, one to one, best box IoU first. detect: 1.0 when the pair's IoU >= 0.5, else 0.0;
    segment: the IoU of the pair's masks (0.0 for an object not found or found without 16 codes)."""
    from pgexport.structured import parse_detections, paste_mask

    width, height, truth = _truth(row, decode)
    found = parse_detections(answer, width, height)
    pairs = sorted(((box_iou(t[1], (f.x0, f.y0, f.x1, f.y1)), ti, fi) for ti, t in enumerate(truth)
                    for fi, f in enumerate(found) if f.label == t[0]), reverse=True)
    paired: dict[int, object] = {}
    for _, ti, fi in pairs:
        if ti not in paired and fi not in paired.values():
            paired[ti] = fi
    scores = []
    for ti, (_, box, mask) in enumerate(truth):
        hit = found[paired[ti]] if ti in paired else None
        if not row.prefix.startswith("segment"):
            scores.append(float(hit is not None and box_iou(box, (hit.x0, hit.y0, hit.x1, hit.y1)) >= 0.5))
        elif hit is None or not hit.codes or mask is None:
            scores.append(0.0)
        else:
            predicted = paste_mask(decode(np.array([hit.codes]))[0], hit, width, height)
            scores.append(float((predicted & mask).sum() / max(1, (predicted | mask).sum())))
    return scores


def batches(rows: Sequence, size: int) -> Iterator[Sequence]:
    """Consecutive slices of `rows`, `size` at a time (the last may be shorter)."""
    for start in range(0, len(rows), size):
        yield rows[start : start + size]


def answer_rows(answer: Callable[[Sequence], list[str]], rows: Sequence, batch_size: int) -> list[str]:
    """The answers of `answer` (a batch of rows -> their answers) over every row, `batch_size` rows
    a call. The batch size is the caller's: left-padded batches of another size change the
    numerics, so each check keeps the one its figures were measured with."""
    result = []
    for chunk in batches(rows, batch_size):
        result += answer(chunk)
    return result


def held_out_score(answer: Callable[[Sequence], list[str]], rows: Sequence, batch_size: int,
                   kinds: dict[str, str] | None = None, decode=None) -> dict:
    """Exact match of a model over held-out rows: `answer` maps a batch of rows to the model's
    answers; returns score_answers' report."""
    return score_answers(answer_rows(answer, rows, batch_size), rows, kinds, decode)


def token_agreement(reference_tokens, tokens) -> float:
    """Greedy-token agreement: per row, the share of steps before the first token that differs
    from the reference (1.0 when none does), averaged over rows. Arrays are [steps] or
    [rows, steps]. Counting up to the first mismatch, not all matches, because after one wrong
    token a greedy decode follows another path and later matches are chance."""
    shares = []
    for ref_row, row in zip(np.atleast_2d(np.asarray(reference_tokens)), np.atleast_2d(np.asarray(tokens))):
        differ = np.nonzero(ref_row != row)[0]
        shares.append((differ[0] if differ.size else len(ref_row)) / len(ref_row))
    return float(np.mean(shares))


def row_cosines(reference: np.ndarray, candidate: np.ndarray) -> np.ndarray:
    """Cosine similarity of each row (over the last axis) of two arrays of the same shape, as a
    flat array of rows. Two zero rows are identical (1.0); a zero row against a non-zero one
    scores 0. NaN stays NaN (finiteness is a separate check where it matters)."""
    ref = np.asarray(reference).reshape(-1, np.shape(reference)[-1])
    cand = np.asarray(candidate).reshape(-1, np.shape(candidate)[-1])
    ref_norm, cand_norm = np.linalg.norm(ref, axis=-1), np.linalg.norm(cand, axis=-1)
    cosine = np.sum(ref * cand, -1) / np.maximum(ref_norm * cand_norm, 1e-30)
    return np.where((ref_norm == 0) & (cand_norm == 0), 1.0, cosine)


def max_rel_diff(reference: np.ndarray, candidate: np.ndarray) -> float:
    """max |reference - candidate| over the reference's value range (max - min; 1 when constant):
    a tolerance that means the same for logits of any scale."""
    span = float(np.max(reference) - np.min(reference)) or 1.0
    return float(np.abs(np.asarray(reference) - np.asarray(candidate)).max()) / span


class LogitStats:
    """`logit_stats` accumulated over parts of the arrays (`add` each, then `result`): the gate
    compares a 3B prefill one row at a time, since one batch's logits are 0.8 GB per array
    (3 x 268 positions x 257,216). Each part is read `rows_per_chunk` positions at a time too;
    the whole-array temporaries (kept rows, differences, products) came to 5 GB more."""

    def __init__(self, rows_per_chunk: int = 64):
        self.rows_per_chunk = rows_per_chunk
        self.stats = None  # [max |diff|, reference min, reference max, min cosine], in the arrays' dtype

    def add(self, reference: np.ndarray, candidate: np.ndarray, keep: np.ndarray | None = None) -> None:
        ref = reference.reshape(-1, reference.shape[-1])
        cand = candidate.reshape(-1, candidate.shape[-1])
        rows = np.arange(len(ref)) if keep is None else np.flatnonzero(keep.reshape(-1))
        for start in range(0, len(rows), self.rows_per_chunk):
            take = rows[start:start + self.rows_per_chunk]
            r, c = ref[take], cand[take]
            chunk = [np.abs(r - c).max(), r.min(), r.max(), row_cosines(r, c).min()]
            # np.maximum / np.minimum keep a NaN, as the whole array's max would.
            self.stats = chunk if self.stats is None else [
                np.maximum(self.stats[0], chunk[0]), np.minimum(self.stats[1], chunk[1]),
                np.maximum(self.stats[2], chunk[2]), np.minimum(self.stats[3], chunk[3])]

    def result(self) -> dict:
        max_abs, low, high, cosine = self.stats
        span = float(high - low) or 1.0
        return {"max_abs_diff": float(max_abs), "max_rel_diff": float(max_abs) / span, "min_cosine": float(cosine)}


def logit_stats(reference: np.ndarray, candidate: np.ndarray, keep: np.ndarray | None = None) -> dict:
    """max |diff|, the same over the reference's logit range, and the minimum cosine over positions.

    Both arrays are [..., vocab]; `keep` (shaped like their leading axes, e.g. an attention mask)
    selects the positions compared, so padding does not count."""
    stats = LogitStats()
    stats.add(reference, candidate, keep)
    return stats.result()
