"""The demo trainer's whole-model step: run as two length groups, logits only where labels are, it
computes the same losses as one padded batch with every logit (the simple form it replaced)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers import PaliGemmaForConditionalGeneration

from pgexport.demo import make_split
from pgexport.demo.task import LOC_BINS
from pgexport.demo.train import (
    LOC_SIGMA,
    PatchHead,
    build_processor,
    init_positions,
    length_groups,
    model_config,
    spread_nll,
    training_batch,
    whole_model_loss,
)


def padded_batch_losses(model, head, batch: dict, rows, loc_first: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The reference: the whole batch padded to its longest row, logits at every position."""
    labels = batch.pop("labels")
    logp = F.log_softmax(model(**batch).logits[:, :-1].float(), -1)
    target = labels[:, 1:]
    keep = target != -100
    nll = -logp.gather(-1, target.clamp(min=0)[..., None])[..., 0]
    is_loc = keep & (target >= loc_first) & (target < loc_first + LOC_BINS)
    nll = nll.clone()
    nll[is_loc] = spread_nll(logp[is_loc], target[is_loc] - loc_first, LOC_SIGMA, loc_first)
    return ((nll * keep).sum(1) / keep.sum(1)).mean(), head.loss(rows)


def test_length_groups_split_where_padding_is_least():
    lengths = torch.tensor([85, 43, 62, 43, 44, 85, 46, 43])
    short, long = length_groups(lengths)
    assert sorted(torch.cat([short, long]).tolist()) == list(range(8))
    # padded tokens of the sorted lengths' split points: one group 8 x 85 = 680; 3 | 5: 3 x 43 + 5 x 85 = 554;
    # 4 | 4: 516; 5 | 3: 5 x 46 + 3 x 85 = 485, the least; 6 | 2: 6 x 62 + 2 x 85 = 542; 7 | 1: 680
    assert sorted(lengths[long].tolist()) == [62, 85, 85]
    assert len(length_groups(torch.tensor([50, 50, 50]))) == 1  # nothing to gain: one group


def test_whole_model_loss_equals_the_padded_batch():
    torch.manual_seed(0)
    processor = build_processor()
    model = PaliGemmaForConditionalGeneration(model_config(processor.tokenizer)).train()
    loc_first = processor.tokenizer.convert_tokens_to_ids("<loc0000>")
    init_positions(model, loc_first)
    head = PatchHead(model, loc_first)
    rows = make_split(10, "train-test")  # every kind twice: short text answers and long segment ones
    batch = training_batch(processor, rows)
    assert len(length_groups(batch["attention_mask"].sum(1))) == 2

    text, patch = whole_model_loss(model, head, dict(batch), rows, loc_first)
    (text + patch).backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    ref_text, ref_patch = padded_batch_losses(model, head, dict(batch), rows, loc_first)
    (ref_text + ref_patch).backward()

    # The same sums of the same fp32 terms (~7 each, ~50 a row) in another order and other matmul
    # shapes: rounding of ~1e-7 relative a term, far below 1e-5.
    assert abs(text.item() - ref_text.item()) <= 1e-5 * ref_text.item()
    assert abs(patch.item() - ref_patch.item()) <= 1e-5 * ref_patch.item()
    compared = 0
    for name, p in model.named_parameters():
        if "k_proj.bias" in name:  # softmax ignores a bias shared by every key: its gradient is rounding alone
            continue
        if p.grad is not None:
            assert name in grads
            scale = p.grad.abs().max().item()
            assert (grads[name] - p.grad).abs().max().item() <= 1e-4 * scale + 1e-9, name
            compared += 1
    assert compared > 50
