"""The distillation loss, on suffix tokens only.

    loss = alpha * T^2 * KL(softmax(teacher / T) || softmax(student / T))
         + (1 - alpha) * CE(student, labels)
         + hidden_weight * MSE(student hidden states, teacher hidden states)

Positions are those whose next token is a label (the processor's `labels`, -100 on image, prefix
and padding), shifted as in causal LM training: logits at t predict token t + 1. The T^2 factor
keeps the soft term's gradients the same size whatever the temperature (Hinton et al. 2015).
alpha = 0 is plain label training (the teacher is not needed).

Every term is a sum over the batch's suffix tokens divided by `tokens`. The training loop passes
the suffix-token count of the whole optimizer step (all micro-batches of all processes) over the
number of processes, so that gradients summed over micro-batches and averaged across processes
equal the one-process, one-batch gradient of the same rows: accumulation and DDP change nothing.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE = -100


def suffix_mask(labels: torch.Tensor) -> torch.Tensor:
    """[batch, seq - 1] booleans: positions whose next token is a label."""
    return labels[:, 1:] != IGNORE


def hidden_pairs(decoder_map: list[int], teacher_layers: int) -> list[tuple[int, int]]:
    """(student, teacher) indices into `hidden_states` (entry i is the input of layer i, the last one
    the final-normed output): each student layer's output against its teacher layer's output, and
    the final hidden states against each other."""
    pairs = [(i + 1, decoder_map[i] + 1) for i in range(len(decoder_map) - 1) if decoder_map[i] + 1 < teacher_layers]
    return pairs + [(len(decoder_map), teacher_layers)]


def distill_loss(
    student_logits: torch.Tensor,
    labels: torch.Tensor,
    teacher_logits: torch.Tensor | None = None,
    *,
    temperature: float = 2.0,
    alpha: float = 0.5,
    hidden_weight: float = 0.0,
    hidden: list[tuple[torch.Tensor, torch.Tensor]] = (),
    tokens: torch.Tensor | float | None = None,
) -> dict[str, torch.Tensor]:
    """Loss terms over suffix tokens: {"loss", "kl", "ce", "hidden", "tokens"} (kl before its T^2 and alpha).

    `hidden` holds (student, teacher) hidden-state pairs [batch, seq, hidden]; `tokens` the count to
    divide by (default: this batch's suffix tokens).
    """
    mask = suffix_mask(labels)
    local = mask.sum()
    tokens = local.clamp(min=1) if tokens is None else tokens
    student = student_logits[:, :-1][mask].float()
    ce = F.cross_entropy(student, labels[:, 1:][mask], reduction="sum") / tokens
    zero = student.new_zeros(())
    kl = zero
    if alpha > 0 and teacher_logits is None:
        raise ValueError("alpha > 0 needs the teacher's logits")
    if teacher_logits is not None:
        teacher = teacher_logits[:, :-1][mask].float()
        kl = F.kl_div(F.log_softmax(student / temperature, -1), F.log_softmax(teacher / temperature, -1),
                      log_target=True, reduction="sum") / tokens
    mse = zero
    if hidden_weight > 0 and hidden:
        mse = sum(((s[:, :-1][mask].float() - t[:, :-1][mask].float()) ** 2).mean(-1).sum() for s, t in hidden)
        mse = mse / len(hidden) / tokens
    loss = alpha * temperature**2 * kl + (1 - alpha) * ce + hidden_weight * mse
    return {"loss": loss, "kl": kl.detach(), "ce": ce.detach(), "hidden": mse.detach(), "tokens": local}
