"""The export wrappers against transformers' own generate, in PyTorch (no ONNX involved)."""

import numpy as np
import pytest
import torch

from pgexport.exporters.wrappers import Decoder, EmbedTokens, VisionEncoder
from pgexport.load import load_checkpoint
from pgexport.validate import default_samples, reference_generate

NEW_TOKENS = 12


def wrapper_greedy(model, inputs, steps):
    """Greedy decoding through the three wrappers, as the ONNX runtime does it."""
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    image_id = model.config.image_token_index
    embeds = EmbedTokens(model)(torch.where(ids == image_id, 0, ids))
    features = VisionEncoder(model)(inputs["pixel_values"])
    embeds = embeds.masked_scatter((ids == image_id)[..., None], features)
    text = model.config.text_config
    past = [torch.zeros(ids.shape[0], text.num_key_value_heads, 0, text.head_dim) for _ in range(2 * text.num_hidden_layers)]
    positions = mask.cumsum(-1).masked_fill(mask == 0, 1)
    decoder = Decoder(model)
    tokens, logits = [], []
    for _ in range(steps):
        out = decoder(embeds, mask, positions, past)
        step_logits = out[0][:, -1]
        logits.append(step_logits)
        tokens.append(step_logits.argmax(-1))
        past = list(out[1:])
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
        positions = mask.sum(-1, keepdim=True)
        embeds = EmbedTokens(model)(tokens[-1][:, None])
    return torch.stack(tokens, 1), torch.stack(logits, 1)


@pytest.mark.parametrize("preset", ["tiny-pg1", "tiny-pg1-mqa4", "tiny-pg2"])
def test_wrappers_match_transformers_generate(preset, checkpoint_factory):
    checkpoint = load_checkpoint(checkpoint_factory(preset))
    images, prompts = zip(*default_samples(3))
    processor = checkpoint.processor
    processor.tokenizer.padding_side = "left"
    inputs = processor(images=list(images), text=list(prompts), return_tensors="pt", padding="longest")
    inputs = {k: inputs[k] for k in ("input_ids", "attention_mask", "pixel_values")}
    assert (inputs["attention_mask"] == 0).any(), "the sample batch must be left-padded"
    ref_tokens, ref_logits = reference_generate(checkpoint.model, {k: v.numpy() for k, v in inputs.items()}, NEW_TOKENS)
    with torch.no_grad():
        tokens, logits = wrapper_greedy(checkpoint.model, inputs, NEW_TOKENS)
    assert tokens.numpy().tolist() == ref_tokens.tolist()
    assert (logits - torch.from_numpy(np.stack(ref_logits, 1))).abs().max().item() < 1e-5


def test_gemma2_window_is_exercised(checkpoint_factory):
    """The parity run must be longer than the sliding window, or the window is never tested."""
    checkpoint = load_checkpoint(checkpoint_factory("tiny-pg2"))
    text = checkpoint.config.text_config
    assert "sliding_attention" in text.layer_types
    assert text.num_image_tokens + NEW_TOKENS > 2 * text.sliding_window
