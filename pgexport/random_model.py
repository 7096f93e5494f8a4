"""Random-weight PaliGemma checkpoints of named shapes, for tests and benchmarks (no hub needed).

They carry the demo model's tokenizer (PaliGemma's special-token layout) with a processor sized
to their resolution, so every pgexport command runs on them as on a real checkpoint.
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoProcessor, PaliGemmaConfig, PaliGemmaForConditionalGeneration

_SIGLIP_SO400M = dict(hidden_size=1152, intermediate_size=4304, num_hidden_layers=27, num_attention_heads=16, patch_size=14)
_GEMMA_2B = dict(
    model_type="gemma", hidden_size=2048, intermediate_size=16384, num_hidden_layers=18,
    num_attention_heads=8, num_key_value_heads=1, head_dim=256,
)
_GEMMA2_2B = dict(
    model_type="gemma2", hidden_size=2304, intermediate_size=9216, num_hidden_layers=26, num_attention_heads=8,
    num_key_value_heads=4, head_dim=256, query_pre_attn_scalar=256, sliding_window=4096,
    attn_logit_softcapping=50.0, final_logit_softcapping=30.0,
)
_TINY_VISION = dict(hidden_size=24, intermediate_size=40, num_hidden_layers=2, num_attention_heads=2, patch_size=8)

# name -> (vision config, text config, image size, vocab size (None: the tokenizer's))
PRESETS = {
    "tiny-pg1": (_TINY_VISION, dict(model_type="gemma", hidden_size=36, intermediate_size=50, num_hidden_layers=2,
                                    num_attention_heads=4, num_key_value_heads=1, head_dim=18), 32, None),
    "tiny-pg1-mqa4": (_TINY_VISION, dict(model_type="gemma", hidden_size=40, intermediate_size=64, num_hidden_layers=3,
                                         num_attention_heads=4, num_key_value_heads=4, head_dim=10), 48, None),
    "tiny-pg2": (_TINY_VISION, dict(model_type="gemma2", hidden_size=36, intermediate_size=50, num_hidden_layers=3,
                                    num_attention_heads=4, num_key_value_heads=2, head_dim=18, query_pre_attn_scalar=18,
                                    sliding_window=6, attn_logit_softcapping=50.0, final_logit_softcapping=30.0), 32, None),
    "tiny-pg2-448": (_TINY_VISION, dict(model_type="gemma2", hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                        num_attention_heads=2, num_key_value_heads=2, head_dim=14, query_pre_attn_scalar=14,
                                        sliding_window=8, attn_logit_softcapping=50.0, final_logit_softcapping=30.0), 48, None),
    "pg1-3b-224": (_SIGLIP_SO400M, _GEMMA_2B, 224, 257216),
    "pg1-3b-448": (_SIGLIP_SO400M, _GEMMA_2B, 448, 257216),
    "pg1-3b-896": (_SIGLIP_SO400M, _GEMMA_2B, 896, 257216),
    "pg2-3b-224": (_SIGLIP_SO400M, _GEMMA2_2B, 224, 257216),
}


DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def random_checkpoint(preset: str, output: str | Path, seed: int = 0, dtype: str = "fp32") -> Path:
    """Write a random-weight checkpoint of `preset` shapes (safetensors + processor) to `output`.

    `dtype` "bf16" halves the files (a GPU benchmark loads bf16 anyway); the weights are the fp32
    draw rounded."""
    from pgexport.demo import CHECKPOINT_DIR

    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}: choose from {', '.join(PRESETS)}")
    vision, text, image_size, vocab_size = PRESETS[preset]
    processor = AutoProcessor.from_pretrained(CHECKPOINT_DIR)
    tokenizer = processor.tokenizer
    vocab_size = vocab_size or len(tokenizer)
    config = PaliGemmaConfig(
        vision_config=dict(model_type="siglip_vision_model", image_size=image_size, **vision),
        text_config=dict(**text, vocab_size=vocab_size),
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
        projection_dim=text["hidden_size"],
        hidden_size=text["hidden_size"],
        vocab_size=vocab_size,
    )
    torch.manual_seed(seed)
    model = PaliGemmaForConditionalGeneration(config).eval().to(DTYPES[dtype])
    output = Path(output)
    model.save_pretrained(output)
    model.generation_config.save_pretrained(output)
    image_processor = processor.image_processor
    image_processor.size = {"height": image_size, "width": image_size}
    image_processor.image_seq_length = config.text_config.num_image_tokens
    processor.image_seq_length = image_processor.image_seq_length
    processor.save_pretrained(output)
    return output


def main(argv=None):
    """python -m pgexport.random_model PRESET OUTPUT [--seed N] [--dtype fp32|bf16]"""
    import argparse

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("preset", choices=sorted(PRESETS))
    parser.add_argument("output", type=Path)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    args = parser.parse_args(argv)
    print(random_checkpoint(args.preset, args.output, args.seed, args.dtype))


if __name__ == "__main__":
    main()
