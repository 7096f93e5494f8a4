"""PaliGemma's processor without torch or transformers: what `pgexport generate` needs to turn an
image and a prompt into the graphs' inputs, and tokens back into text, from an artifact folder's
preprocessor_config.json, tokenizer.json and tokenizer_config.json (numpy, PIL and `tokenizers`).

It follows transformers 5.24's PaliGemmaProcessor with SigLIP's PIL image backend step by step:
- image: RGB, resized to the configured size with PIL (bicubic unless `resample` says otherwise),
  rescaled in float64 (x 1/255) then float32, normalised (x - mean) / std, channels first;
- prompt: `"<image>" x image_seq_length + "<bos>" + prompt + "\\n"`, tokenised with no special
  tokens added (the processor turns the tokenizer's bos/eos off), padded on the left.
transformers' default SigLIP processor resizes with torchvision instead of PIL; both implement the
same antialiased bicubic filter in 8 bits and differ by at most a level here and there (the bound
and why: tests/test_processor.py). An image already at the model's size is not resampled by either.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image
from tokenizers import AddedToken, Tokenizer

from pgexport.contract import ATTENTION_MASK, INPUT_IDS, PIXEL_VALUES
from pgexport.errors import BadInputError

IMAGE_TOKEN = "<image>"
# The detection and segmentation tokens PaliGemmaProcessor adds when a tokenizer lacks them.
EXTRA_TOKENS = [f"<loc{i:04d}>" for i in range(1024)] + [f"<seg{i:03d}>" for i in range(128)]
PREPROCESSOR_CONFIG, PROCESSOR_CONFIG = "preprocessor_config.json", "processor_config.json"
TOKENIZER, TOKENIZER_CONFIG = "tokenizer.json", "tokenizer_config.json"


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise BadInputError(f"cannot read {path}: {error}") from error


def _token(config: dict, key: str, default: str) -> str:
    """A special token's text from tokenizer_config.json (a string, or an AddedToken dict)."""
    value = config.get(key) or default
    return value["content"] if isinstance(value, dict) else value


class Processor:
    """PaliGemma's inputs from images and prompts, read from a folder (see the module docstring)."""

    def __init__(self, folder: str | Path):
        folder = Path(folder)
        if (folder / PREPROCESSOR_CONFIG).is_file():
            image_config = _read_json(folder / PREPROCESSOR_CONFIG)
        elif (folder / PROCESSOR_CONFIG).is_file():
            image_config = _read_json(folder / PROCESSOR_CONFIG).get("image_processor", {})
        else:
            raise BadInputError(f"{folder}: no {PREPROCESSOR_CONFIG} (the image processor's settings)")
        if not (folder / TOKENIZER).is_file():
            raise BadInputError(f"{folder}: no {TOKENIZER}")
        size = image_config.get("size", {})
        if "height" not in size or "width" not in size:
            raise BadInputError(f"{folder}/{PREPROCESSOR_CONFIG}: size {size} is not {{height, width}}")
        self.size = (int(size["width"]), int(size["height"]))
        self.resample = Image.Resampling(image_config.get("resample", Image.Resampling.BICUBIC))
        self.do_resize = image_config.get("do_resize", True)
        self.rescale_factor = image_config.get("rescale_factor", 1 / 255) if image_config.get("do_rescale", True) else None
        self.mean, self.std = (np.array(image_config.get(key, [0.5] * 3), dtype=np.float32) for key in ("image_mean", "image_std"))
        self.do_normalize = image_config.get("do_normalize", True)
        if "image_seq_length" not in image_config:
            raise BadInputError(f"{folder}/{PREPROCESSOR_CONFIG} lacks image_seq_length (image tokens per image)")
        self.image_seq_length = int(image_config["image_seq_length"])

        config = _read_json(folder / TOKENIZER_CONFIG) if (folder / TOKENIZER_CONFIG).is_file() else {}
        try:
            self.tokenizer = Tokenizer.from_file(str(folder / TOKENIZER))
        except Exception as error:  # noqa: BLE001 - tokenizers raises its own Exception type for a bad file
            raise BadInputError(f"cannot read {folder / TOKENIZER}: {error}") from error
        self.tokenizer.no_padding()
        self.tokenizer.no_truncation()
        vocab = self.tokenizer.get_vocab(with_added_tokens=True)
        missing = [token for token in EXTRA_TOKENS if token not in vocab]
        if missing:
            self.tokenizer.add_tokens([AddedToken(token, normalized=False) for token in missing])
        kept = set(EXTRA_TOKENS)  # the special tokens an answer's text leaves out (decode_answer), found once
        self.unspoken_ids = {i for i, token in self.tokenizer.get_added_tokens_decoder().items()
                             if token.special and token.content not in kept}
        self.clean_up_spaces = config.get("clean_up_tokenization_spaces", False)
        self.image_token = _token(config, "image_token", IMAGE_TOKEN)
        names = {"bos": "<bos>", "eos": "<eos>", "pad": "<pad>"}
        ids = {name: self.tokenizer.token_to_id(_token(config, f"{name}_token", default)) for name, default in names.items()}
        self.image_token_id = self.tokenizer.token_to_id(self.image_token)
        if None in ids.values() or self.image_token_id is None:
            absent = [name for name, value in {**ids, "image": self.image_token_id}.items() if value is None]
            raise BadInputError(f"{folder}/{TOKENIZER} lacks PaliGemma's {', '.join(absent)} token(s)")
        self.bos_token = _token(config, "bos_token", names["bos"])
        self.bos_token_id, self.eos_token_id, self.pad_token_id = ids["bos"], ids["eos"], ids["pad"]

    def pixel_values(self, images: list[Image.Image]) -> np.ndarray:
        """[batch, 3, height, width] float32 for RGB images."""
        rows = []
        for image in images:
            if self.do_resize and image.size != self.size:
                image = image.resize(self.size, resample=self.resample)
            values = np.asarray(image.convert("RGB"))
            if self.rescale_factor is not None:
                values = (values.astype(np.float64) * self.rescale_factor).astype(np.float32)
            else:
                values = values.astype(np.float32)
            if self.do_normalize:
                values = (values - self.mean) / self.std
            rows.append(values.transpose(2, 0, 1))
        return np.stack(rows).astype(np.float32)

    def prompt_ids(self, prompt: str) -> list[int]:
        """One prompt's ids: image tokens, bos, the prompt and "\\n" (PaliGemma's prefix)."""
        text = self.image_token * self.image_seq_length + self.bos_token + prompt + "\n"
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def __call__(self, images: list[Image.Image], prompts: list[str]) -> dict[str, np.ndarray]:
        """input_ids and attention_mask (int64, left-padded with pad) and pixel_values."""
        if len(images) != len(prompts):
            raise BadInputError(f"{len(images)} images for {len(prompts)} prompts")
        rows = [self.prompt_ids(prompt) for prompt in prompts]
        width = max(len(row) for row in rows)
        input_ids = np.full((len(rows), width), self.pad_token_id, dtype=np.int64)
        attention_mask = np.zeros((len(rows), width), dtype=np.int64)
        for i, row in enumerate(rows):
            input_ids[i, width - len(row):] = row
            attention_mask[i, width - len(row):] = 1
        return {INPUT_IDS: input_ids, ATTENTION_MASK: attention_mask, PIXEL_VALUES: self.pixel_values(images)}

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        text = self.tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)
        return clean_up_tokenization(text) if self.clean_up_spaces else text

    def decode_answer(self, ids: list[int]) -> str:
        """An answer's text: special tokens (eos, pad, ...) left out, but `<locNNNN>` and `<segNNN>`
        kept even where a tokenizer marks them special, since they are what detect and segment
        prompts answer. (The demo's tokenizer and transformers' PaliGemmaProcessor add them as
        plain tokens: there this is `decode(ids, skip_special_tokens=True)`.)"""
        return self.decode([i for i in ids if i not in self.unspoken_ids], skip_special_tokens=False)


def clean_up_tokenization(text: str) -> str:
    """transformers' `clean_up_tokenization` (spaces before punctuation and English contractions),
    used when tokenizer_config.json sets clean_up_tokenization_spaces."""
    for before, after in ((" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"), (" n't", "n't"),
                          (" 'm", "'m"), (" 's", "'s"), (" 've", "'ve"), (" 're", "'re")):
        text = text.replace(before, after)
    return text
