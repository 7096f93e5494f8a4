"""Export-only modules around transformers' PaliGemma, one per ONNX graph.

Each wrapper reuses the checkpoint's own submodules (norms, projections, MLPs, rotary embedding)
and writes out only what transformers hides behind its cache and mask machinery: the attention
with an explicit KV cache and the prefix-LM mask. tests/test_wrappers.py checks them against
`PaliGemmaForConditionalGeneration` token for token.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers.models.gemma.modeling_gemma import apply_rotary_pos_emb


class VisionEncoder(nn.Module):
    """pixel_values -> image_features: SigLIP tower plus projector, ready for the `<image>` slots.

    transformers 5.x applies no 1/sqrt(hidden) here: the Gemma embedding module scales text
    embeddings instead (see paligemma-facts), so features go into the decoder unscaled.
    """

    def __init__(self, model):
        super().__init__()
        self.vision_tower = model.model.vision_tower
        self.projector = model.model.multi_modal_projector

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.projector(self.vision_tower(pixel_values).last_hidden_state)


class EmbedTokens(nn.Module):
    """input_ids -> inputs_embeds, with Gemma's sqrt(hidden) scaling (inside the embedding module)."""

    def __init__(self, model):
        super().__init__()
        self.embed_tokens = model.model.language_model.embed_tokens

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.embed_tokens(input_ids)


def set_attention_settings(module: nn.Module, cfg) -> None:
    """The Gemma / Gemma2 attention constants a hand-written decoder needs, set on `module`."""
    module.head_dim = cfg.head_dim
    module.num_heads = cfg.num_attention_heads
    module.num_kv_heads = cfg.num_key_value_heads
    # Gemma scales queries by head_dim**-0.5, Gemma2 by query_pre_attn_scalar**-0.5.
    module.scaling = getattr(cfg, "query_pre_attn_scalar", cfg.head_dim) ** -0.5
    module.attn_softcap = getattr(cfg, "attn_logit_softcapping", None)
    module.final_softcap = getattr(cfg, "final_logit_softcapping", None)
    layer_types = getattr(cfg, "layer_types", None) or ["full_attention"] * cfg.num_hidden_layers
    window = getattr(cfg, "sliding_window", None)
    module.windows = [window if kind == "sliding_attention" else None for kind in layer_types]


def finish_layer(layer, residual: torch.Tensor, attn_out: torch.Tensor) -> torch.Tensor:
    """A decoder layer after its attention: residual adds, norms and the MLP."""
    if hasattr(layer, "pre_feedforward_layernorm"):  # Gemma2: norms around both sublayers
        hidden = residual + layer.post_attention_layernorm(attn_out)
        return hidden + layer.post_feedforward_layernorm(layer.mlp(layer.pre_feedforward_layernorm(hidden)))
    hidden = residual + attn_out
    return hidden + layer.mlp(layer.post_attention_layernorm(hidden))


class Decoder(nn.Module):
    """One graph for prefill and decode: (inputs_embeds, attention_mask, position_ids, past) ->
    (logits, *present), past and present as [key_0, value_0, key_1, ...].

    Attention pattern, as transformers' generate builds it for PaliGemma:
    - an empty past means the whole input is the prompt (image + prefix text), which attends
      bidirectionally (token_type_ids all 0 -> one block); sliding windows do not apply inside it;
    - otherwise each new token attends causally (and within the sliding window on Gemma2's sliding
      layers) to everything before it;
    - keys where attention_mask is 0 (left padding) are never attended.
    """

    def __init__(self, model):
        super().__init__()
        text = model.model.language_model
        self.config = text.config
        self.layers = text.layers
        self.norm = text.norm
        self.rotary_emb = text.rotary_emb
        self.lm_head = model.lm_head
        set_attention_settings(self, self.config)

    def _masks(self, attention_mask: torch.Tensor, q_len: int, dtype: torch.dtype) -> dict:
        kv_len = attention_mask.shape[1]
        kv_idx = torch.arange(kv_len, device=attention_mask.device)
        q_idx = torch.arange(q_len, device=attention_mask.device) + (kv_len - q_len)  # slots of the new tokens
        causal = kv_idx[None, :] <= q_idx[:, None]
        # The smallest new slot is the past length: a tensor, so the graph has no branch on it.
        prompt = q_idx.min() == 0
        keys = attention_mask[:, None, None, :].bool()
        min_value = torch.finfo(dtype).min
        masks = {}
        for window in set(self.windows):
            allowed = causal if window is None else causal & (kv_idx[None, :] > q_idx[:, None] - window)
            allowed = (allowed | prompt)[None, None] & keys
            zero = torch.zeros((), dtype=dtype)
            masks[window] = torch.where(allowed, zero, torch.full((), min_value, dtype=dtype))
        return masks

    def _attention(self, layer, hidden, cos, sin, past_key, past_value, mask):
        attn = layer.self_attn
        batch, q_len, _ = hidden.shape
        q = attn.q_proj(hidden).view(batch, q_len, self.num_heads, self.head_dim).transpose(1, 2)
        k = attn.k_proj(hidden).view(batch, q_len, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v = attn.v_proj(hidden).view(batch, q_len, self.num_kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rotary_pos_emb(q, k, cos, sin)
        key = torch.cat([past_key, k], dim=2)
        value = torch.cat([past_value, v], dim=2)
        groups = self.num_heads // self.num_kv_heads
        # [b, kv, s, d] -> [b, kv, groups, q, d]: grouped-query attention without repeating K/V.
        q = q.view(batch, self.num_kv_heads, groups, q_len, self.head_dim)
        scores = torch.matmul(q, key.unsqueeze(2).transpose(3, 4)) * self.scaling
        if self.attn_softcap is not None:
            scores = torch.tanh(scores / self.attn_softcap) * self.attn_softcap
        scores = scores + mask.unsqueeze(2)
        probs = torch.softmax(scores.float(), dim=-1).to(q.dtype)
        out = torch.matmul(probs, value.unsqueeze(2))
        out = out.reshape(batch, self.num_heads, q_len, self.head_dim).transpose(1, 2)
        return attn.o_proj(out.reshape(batch, q_len, -1)), key, value

    def forward(self, inputs_embeds, attention_mask, position_ids, past: list[torch.Tensor]):
        masks = self._masks(attention_mask, inputs_embeds.shape[1], inputs_embeds.dtype)
        cos, sin = self.rotary_emb(inputs_embeds, position_ids)
        hidden = inputs_embeds
        presents = []
        for i, layer in enumerate(self.layers):
            residual = hidden
            attn_out, key, value = self._attention(
                layer, layer.input_layernorm(hidden), cos, sin, past[2 * i], past[2 * i + 1], masks[self.windows[i]]
            )
            presents += [key, value]
            hidden = finish_layer(layer, residual, attn_out)
        logits = self.lm_head(self.norm(hidden))
        if self.final_softcap is not None:
            logits = torch.tanh(logits / self.final_softcap) * self.final_softcap
        return (logits, *presents)
