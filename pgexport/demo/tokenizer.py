"""The demo model's tokenizer, in PaliGemma's special-token layout.

ids: `<pad>`=0 `<eos>`=1 `<bos>`=2 `<unk>`=3, then the task's words, then `<loc0000>`..`<loc1023>`,
`<seg000>`..`<seg127>`, and `<image>` last (real PaliGemma: 256000 Gemma tokens, the same 1152
location/segmentation tokens, `<image>`=257152).

It is a Unigram model over whole words, normalised like Gemma's: spaces become "▁", no dummy
prefix, so a word has two pieces ("red" at the start of a text, "▁red" after a space), and the
decoder turns "▁" back into spaces. Unigram (not WordLevel) because transformers.js implements
Unigram and BPE but has no WordLevel model; Gemma-style normalisation (not a Metaspace
pre-tokenizer) because it splits text the same way whatever precedes it (`<bos>`, a `<loc>`
token), in both libraries. Single characters stay in the vocabulary, at a much lower score, so an
unknown word still encodes.
"""

from __future__ import annotations

import string

from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, processors
from transformers import PreTrainedTokenizerFast

from pgexport.demo.task import WORDS

SPECIAL_TOKENS = ["<pad>", "<eos>", "<bos>", "<unk>"]
LOC_TOKENS = [f"<loc{i:04d}>" for i in range(1024)]
SEG_TOKENS = [f"<seg{i:03d}>" for i in range(128)]
IMAGE_TOKEN = "<image>"
SPACE = "\u2581"  # "▁", SentencePiece's space
WORD_SCORE, CHAR_SCORE = -1.0, -10.0


def _pieces(words: tuple[str, ...] | list[str]) -> list[tuple[str, float]]:
    pieces = [(token, 0.0) for token in SPECIAL_TOKENS]
    for word in words:
        pieces += [(word, WORD_SCORE), (SPACE + word, WORD_SCORE)]
    pieces += [("\n", WORD_SCORE), (SPACE, CHAR_SCORE)]
    known = {piece for piece, _ in pieces}
    pieces += [(char, CHAR_SCORE) for char in string.ascii_lowercase + string.digits + ".,:;!?'-" if char not in known]
    pieces += [(token, 0.0) for token in LOC_TOKENS + SEG_TOKENS + [IMAGE_TOKEN]]
    return pieces


def build_tokenizer(words: tuple[str, ...] | list[str] = tuple(WORDS)) -> PreTrainedTokenizerFast:
    """The demo tokenizer (deterministic) with one piece per word of `words` (default: the demo
    task's), wrapped for transformers; save it with `save_pretrained`."""
    backend = Tokenizer(models.Unigram(_pieces(words), unk_id=SPECIAL_TOKENS.index("<unk>"), byte_fallback=False))
    backend.normalizer = normalizers.Replace(" ", SPACE)
    backend.decoder = decoders.Replace(SPACE, " ")
    # PaliGemma's processor writes <bos> into the prompt itself; the suffix (text pair) gets type id 1.
    backend.post_processor = processors.TemplateProcessing(single="$A:0", pair="$A:0 $B:1", special_tokens=[])
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS + [IMAGE_TOKEN]])
    backend.add_tokens([AddedToken(t, special=False, normalized=False) for t in LOC_TOKENS + SEG_TOKENS])
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token="<pad>",
        eos_token="<eos>",
        bos_token="<bos>",
        unk_token="<unk>",
        extra_special_tokens={"image_token": IMAGE_TOKEN},
        add_bos_token=False,
        add_eos_token=False,
        clean_up_tokenization_spaces=False,
    )
