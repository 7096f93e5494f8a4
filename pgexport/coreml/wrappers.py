"""Export-only modules for Core ML: transformers' PaliGemma does not convert (`masked_scatter` and
`diff` have no Core ML op, and its cache is a Python object, not state).

Both wrappers reuse the checkpoint's own submodules and are traced as they are: what the tests
run in PyTorch is what coremltools converts. Batch 1 (one camera frame, one prompt), as on a phone.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers.models.gemma.modeling_gemma import apply_rotary_pos_emb

from pgexport.contract import KEY_CACHE, VALUE_CACHE
from pgexport.exporters.wrappers import VisionEncoder, finish_layer, set_attention_settings

# Additive mask value for a blocked key: finite in fp16 (an all-blocked row gives a uniform softmax,
# not NaN) and far enough below Gemma2's soft-capped scores (|s| <= 50) that exp() underflows to 0.
BLOCKED = -1e4

__all__ = ["BLOCKED", "StatefulDecoder", "VisionEncoder", "pixel_normalisation"]


def pixel_normalisation(image_processor) -> tuple[float, list[float]]:
    """(scale, per-channel bias) such that pixel_values = scale * pixel[0..255] + bias, as SigLIP's
    processor computes it (rescale, then (x - mean) / std). Core ML's ImageType takes one scale for
    every channel, so the std must be the same on all three."""
    from pgexport.errors import UnsupportedError

    std, mean = list(image_processor.image_std), list(image_processor.image_mean)
    if len(set(std)) != 1:
        raise UnsupportedError(f"image_std {std} differs per channel: Core ML's ImageType has one scale")
    rescale = image_processor.rescale_factor if image_processor.do_rescale else 1.0
    if not image_processor.do_normalize:
        return rescale, [0.0, 0.0, 0.0]
    return rescale / std[0], [-m / s for m, s in zip(mean, std)]


class StatefulDecoder(nn.Module):
    """(input_ids [1, q], image_features [1, n, hidden], attention_mask [1, 1, q, end]) -> logits [1, 1, vocab]
    of the last query token; the KV cache lives in two buffers (Core ML states) updated in place.

    - The token embedding is inside: its table is tied to the LM head, so the package stores it once.
    - `<image>` tokens take the image features in order (the k-th `<image>` gets row k), unscaled,
      as transformers' masked_scatter places them; other tokens take Gemma's scaled embedding.
    - `end` (the mask's last axis) is the cache length after this call: the new keys go to slots
      [end - q, end), positions are 1-based slots (slot + 1), and attention reads slots [0, end).
    - attention_mask is additive (0 attend, BLOCKED not) and carries the prefix-LM pattern: zeros over
      the whole prompt at prefill (bidirectional), zeros over the past for each decoded token.
    - Gemma2's sliding layers also block keys outside the window, except inside a prefill (a call
      with an empty past), where the whole prompt attends bidirectionally, as in transformers.
    """

    def __init__(self, model, max_context: int):
        super().__init__()
        text = model.model.language_model
        cfg = text.config
        self.embed_tokens = text.embed_tokens
        self.layers = text.layers
        self.norm = text.norm
        self.rotary_emb = text.rotary_emb
        self.lm_head = model.lm_head
        self.image_token_id = model.config.image_token_index
        set_attention_settings(self, cfg)
        dtype = text.embed_tokens.weight.dtype
        shape = (cfg.num_hidden_layers, 1, self.num_kv_heads, max_context, self.head_dim)
        # Buffers named as the package's states: coremltools turns each into the state of that name.
        self.register_buffer(KEY_CACHE, torch.zeros(shape, dtype=dtype))
        self.register_buffer(VALUE_CACHE, torch.zeros(shape, dtype=dtype))

    @property
    def state_shape(self) -> tuple[int, ...]:
        return tuple(self.key_cache.shape)

    def reset(self) -> None:
        self.key_cache.zero_()
        self.value_cache.zero_()

    def _embed(self, input_ids, image_features):
        is_image = input_ids == self.image_token_id
        text = self.embed_tokens(torch.where(is_image, torch.zeros_like(input_ids), input_ids))
        # The k-th <image> token of this call takes feature row k (clamped: rows where is_image is
        # false are discarded by the where below, and a decode call may pass a single dummy row).
        slot = (torch.cumsum(is_image.to(torch.int32), dim=1) - 1).clamp(0, image_features.shape[1] - 1)
        image = torch.index_select(image_features, 1, slot[0]).to(text.dtype)
        return torch.where(is_image[..., None], image, text)

    def _window_masks(self, mask, q_len):
        end = mask.shape[-1]
        kv_idx = torch.arange(end)
        q_idx = torch.arange(q_len) + (end - q_len)
        prefill = q_idx.min() == 0  # a tensor, so the traced graph has no branch on it
        masks = {}
        for window in set(self.windows):
            if window is None:
                masks[window] = mask
            else:
                outside = (kv_idx[None, :] <= q_idx[:, None] - window) & ~prefill
                masks[window] = mask + torch.where(outside, BLOCKED, 0.0).to(mask.dtype)
        return masks

    def _attention(self, index, layer, hidden, cos, sin, mask, end):
        attn = layer.self_attn
        q_len = hidden.shape[1]
        q = attn.q_proj(hidden).view(1, q_len, self.num_heads, self.head_dim).transpose(1, 2)
        k = attn.k_proj(hidden).view(1, q_len, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v = attn.v_proj(hidden).view(1, q_len, self.num_kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rotary_pos_emb(q, k, cos, sin)
        # In-place slice updates of the state: coremltools turns these into slice_update + write_state.
        self.key_cache[index : index + 1, :, :, end - q_len : end, :] = k[None].to(self.key_cache.dtype)
        self.value_cache[index : index + 1, :, :, end - q_len : end, :] = v[None].to(self.value_cache.dtype)
        key = self.key_cache[index, 0, :, :end, :].to(q.dtype)  # [kv, end, d]
        value = self.value_cache[index, 0, :, :end, :].to(q.dtype)
        groups = self.num_heads // self.num_kv_heads
        # Head h reads KV head h // groups: [kv, groups * q, d] against [kv, end, d], no repeated K/V.
        q = q.reshape(self.num_kv_heads, groups * q_len, self.head_dim)
        scores = torch.matmul(q, key.transpose(1, 2)) * self.scaling
        if self.attn_softcap is not None:
            scores = torch.tanh(scores / self.attn_softcap) * self.attn_softcap
        scores = scores.view(self.num_kv_heads, groups, q_len, -1) + mask[0]
        probs = torch.softmax(scores.float(), dim=-1).to(q.dtype).view(self.num_kv_heads, groups * q_len, -1)
        out = torch.matmul(probs, value).view(self.num_heads, q_len, self.head_dim).transpose(0, 1)
        return attn.o_proj(out.reshape(1, q_len, self.num_heads * self.head_dim))

    def forward(self, input_ids, image_features, attention_mask):
        q_len, end = input_ids.shape[1], attention_mask.shape[-1]
        hidden = self._embed(input_ids, image_features)
        positions = (torch.arange(q_len) + (end - q_len + 1))[None]
        cos, sin = self.rotary_emb(hidden, positions)
        masks = self._window_masks(attention_mask.to(hidden.dtype), q_len)
        for i, layer in enumerate(self.layers):
            residual = hidden
            attn_out = self._attention(i, layer, layer.input_layernorm(hidden), cos, sin, masks[self.windows[i]], end)
            hidden = finish_layer(layer, residual, attn_out)
        logits = self.lm_head(self.norm(hidden[:, -1:]))
        if self.final_softcap is not None:
            logits = torch.tanh(logits / self.final_softcap) * self.final_softcap
        return logits
