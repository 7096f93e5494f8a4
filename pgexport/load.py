"""Load a PaliGemma checkpoint (local folder or hub id) and refuse anything that would export wrong.

Everything that can be checked cheaply is checked before anything expensive: where the model is
(no 30 s of hub retries for a mistyped folder), config.json's sizes (no model built from a config
that describes a trillion parameters), pickle weight files, then the tokenizer and processor, and
only then the weights.
"""

from __future__ import annotations

import hashlib
import json
import pickle
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from huggingface_hub import constants, get_session, try_to_load_from_cache
from huggingface_hub.errors import StrictDataclassError
from safetensors import SafetensorError
from transformers import AutoConfig, AutoProcessor, PaliGemmaForConditionalGeneration
from transformers.utils import cached_file

from pgexport.errors import BadModelError

SUPPORTED_DECODERS = {"gemma": "PaliGemma 1", "gemma2": "PaliGemma 2"}
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt")
HUB_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,95}/[A-Za-z0-9][A-Za-z0-9_.-]{0,95}")  # owner/name
HUB_PROBE_SECONDS = 3.0

# config.json field -> allowed range of its integer value, checked on the JSON before transformers
# builds anything (a Gemma2 config alone builds a list num_hidden_layers long). Every range is far
# above every real PaliGemma; the largest, PaliGemma 2 28B, has a text tower of hidden 4608,
# intermediate 36864, 46 layers, 32 heads of 128, a 257216-token vocabulary, and SigLIP So400m at
# 896 px (hidden 1152, intermediate 4304, 27 layers, 16 heads, 14 px patches).
CONFIG_RANGES = {
    **dict.fromkeys(["vocab_size", "text_config.vocab_size", "text_config.max_position_embeddings"], (1, 1 << 20)),
    "image_token_index": (0, 1 << 20),
    **dict.fromkeys(["hidden_size", "projection_dim", "text_config.hidden_size", "vision_config.hidden_size",
                     "vision_config.projection_dim"], (1, 1 << 16)),
    **dict.fromkeys(["text_config.intermediate_size", "vision_config.intermediate_size"], (1, 1 << 18)),
    **dict.fromkeys(["text_config.num_hidden_layers", "text_config.num_attention_heads", "text_config.num_key_value_heads",
                     "vision_config.num_hidden_layers", "vision_config.num_attention_heads"], (1, 1024)),
    **dict.fromkeys(["text_config.head_dim", "vision_config.image_size", "vision_config.patch_size"], (1, 4096)),
    "vision_config.num_channels": (3, 3),  # the processor makes RGB images
}
MAX_IMAGE_TOKENS = 16384  # PaliGemma at 896 px has 4096
MAX_PARAMETERS = 40e9  # PaliGemma 2 28B, the largest, has 2.8e10


@dataclass
class Checkpoint:
    """A loaded checkpoint: the model in eval mode, its processor, and where it came from."""

    model: PaliGemmaForConditionalGeneration
    processor: object
    source: str
    sha256: str | None  # of the weight files, for a local folder
    family: str  # "PaliGemma 1" or "PaliGemma 2"

    @property
    def config(self):
        return self.model.config


def default_model() -> str:
    """The demo checkpoint shipped inside the package: what commands use when no model is given."""
    from pgexport.demo import CHECKPOINT_DIR

    return str(CHECKPOINT_DIR)


def seg_decoder_of(model: str | Path | None, given: str | None) -> str | None:
    """--seg-decoder's file: the one given, else the demo model's own (its segment answers then come
    back as masks), else None."""
    from pgexport.demo import SEG_DECODER_FILE, is_demo

    if given is None and (model is None or is_demo(model)):
        return str(SEG_DECODER_FILE)
    return given


def checkpoint_sha256(folder: Path) -> str:
    """One hash over the folder's weight files (names and bytes), in name order."""
    digest = hashlib.sha256()
    for path in sorted(p for p in Path(folder).iterdir() if p.suffix in WEIGHT_SUFFIXES):
        digest.update(path.name.encode())
        with open(path, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def check_config(config) -> str:
    """Return the PaliGemma family of `config`, or raise BadModelError naming what is wrong."""
    if getattr(config, "model_type", None) != "paligemma":
        raise BadModelError(f"not a PaliGemma checkpoint: model_type is {getattr(config, 'model_type', None)!r}")
    decoder = config.text_config.model_type
    if decoder not in SUPPORTED_DECODERS:
        raise BadModelError(f"unsupported PaliGemma decoder {decoder!r}: expected one of {sorted(SUPPORTED_DECODERS)}")
    if config.vision_config.model_type != "siglip_vision_model":
        raise BadModelError(f"unsupported vision tower {config.vision_config.model_type!r}: expected SigLIP")
    return SUPPORTED_DECODERS[decoder]


def hub_reachable(timeout: float = HUB_PROBE_SECONDS) -> bool:
    """Whether the hub answers at all within `timeout` seconds (huggingface_hub retries an
    unreachable hub for about 30 s per file before it gives up)."""
    try:
        get_session().head(constants.ENDPOINT, timeout=timeout)
    except Exception:  # noqa: BLE001 - DNS, refused, timeout, proxy: every failure means "not reachable"
        return False
    return True


def locate(source: str) -> bool:
    """Decide where `source` is before anything slow; return whether to read files from disk only.

    A local folder; a hub id (`owner/name`) when the hub answers, or from the hub cache when
    HF_HUB_OFFLINE is set or the hub cannot be reached. Anything else is a folder that does not
    exist: a string that is no `owner/name` (a leading '.', '/' or '~', a trailing '/', more than
    one '/') or whose parent folder exists here is a path, never sent to the hub.
    """
    path = Path(source)
    if path.exists():
        return True
    if not HUB_ID.fullmatch(source) or path.parent.is_dir():
        raise BadModelError(f"{source}: no such checkpoint folder")
    offline = constants.is_offline_mode()
    if not offline and hub_reachable():
        return False
    if isinstance(try_to_load_from_cache(source, "config.json"), str):
        return True
    why = "HF_HUB_OFFLINE is set" if offline else f"{constants.ENDPOINT} cannot be reached"
    raise BadModelError(f"{source}: no such checkpoint folder, nor a hub id in the local cache ({why})")


def _one_line(error: BaseException) -> str:
    """An upstream error's message on one line of at most 200 characters."""
    text = " ".join(str(error).split()) or type(error).__name__
    return text if len(text) <= 200 else text[:197] + "..."


def _check_pickle(path: Path) -> None:
    """A pickle weight file must unpickle under weights_only and hold name -> tensor (storages are not read)."""
    try:
        state = torch.load(path, map_location="meta", weights_only=True)
    except (pickle.UnpicklingError, EOFError, RuntimeError, OSError) as error:
        raise BadModelError(
            f"{path}: corrupt, or holds objects other than tensors (torch.load with weights_only=True: "
            f"{type(error).__name__})"
        ) from error
    if not isinstance(state, dict) or not all(
        isinstance(key, str) and isinstance(value, torch.Tensor) for key, value in state.items()
    ):
        raise BadModelError(f"{path}: does not hold a state dict (weight names -> tensors)")


def _check_folder(folder: Path, allow_pickle: bool) -> int:
    """The local checks that need no config; returns the weight files' total size in bytes."""
    if not folder.is_dir():
        raise BadModelError(f"{folder}: not a checkpoint folder")
    if not (folder / "config.json").is_file():
        raise BadModelError(f"{folder}: no config.json")
    files = [p for p in folder.iterdir() if p.suffix in WEIGHT_SUFFIXES]
    if not files:
        raise BadModelError(f"{folder}: no weight files (*.safetensors)")
    if not any(p.suffix == ".safetensors" for p in files):
        if not allow_pickle:
            names = ", ".join(sorted(p.name for p in files))
            raise BadModelError(f"{folder}: only pickle weights ({names}); pass --allow-pickle to load them")
        for path in sorted(folder.glob("pytorch_model*.bin")):  # the files transformers loads
            _check_pickle(path)
    return sum(p.stat().st_size for p in files)


def check_config_json(data) -> None:
    """Every CONFIG_RANGES field that config.json sets is an integer in its range."""
    if not isinstance(data, dict):
        raise BadModelError("config.json: expected a JSON object")
    if data.get("model_type") != "paligemma":  # before transformers builds another model's config
        raise BadModelError(f"not a PaliGemma checkpoint: model_type is {data.get('model_type')!r}")
    for name, (least, most) in CONFIG_RANGES.items():
        section, _, key = name.rpartition(".")
        fields = data.get(section, {}) if section else data
        if not isinstance(fields, dict):
            raise BadModelError(f"config.json {section}: expected a JSON object")
        if key not in fields:
            continue
        value = fields[key]
        if not isinstance(value, int) or isinstance(value, bool):
            raise BadModelError(f"config.json {name}: expected an integer, got {json.dumps(value)[:80]}")
        if not least <= value <= most:
            raise BadModelError(f"config.json {name}: {value} is out of range {least}..{most}")


def parameter_counts(config) -> dict[str, int]:
    """A lower bound on the parameters config describes (its big matrices), by the field that scales each part."""
    text, vision = config.text_config, config.vision_config
    attention = text.head_dim * (2 * text.num_attention_heads + 2 * text.num_key_value_heads)
    patches = (vision.image_size // vision.patch_size) ** 2
    return {
        "text_config.vocab_size": text.vocab_size * text.hidden_size,
        "text_config.num_hidden_layers": text.num_hidden_layers * text.hidden_size * (attention + 3 * text.intermediate_size),
        "vision_config.num_hidden_layers": vision.num_hidden_layers * vision.hidden_size * (
            4 * vision.hidden_size + 2 * vision.intermediate_size
        ),
        "vision_config.image_size": (patches + vision.num_channels * vision.patch_size**2) * vision.hidden_size,
        "projection_dim": vision.hidden_size * config.projection_dim,
    }


def check_sizes(config, weight_bytes: int | None = None) -> None:
    """Refuse a config whose sizes cannot belong together, or describe more parameters than
    MAX_PARAMETERS or than `weight_bytes` of weight files can hold (2 bytes each in bf16)."""
    text, vision = config.text_config, config.vision_config
    image_tokens = (vision.image_size // vision.patch_size) ** 2
    rules = [
        (vision.hidden_size % vision.num_attention_heads == 0, "vision_config.hidden_size",
         f"{vision.hidden_size} is not divisible by num_attention_heads ({vision.num_attention_heads})"),
        (text.num_attention_heads % text.num_key_value_heads == 0, "text_config.num_key_value_heads",
         f"{text.num_key_value_heads} does not divide num_attention_heads ({text.num_attention_heads})"),
        (1 <= image_tokens <= MAX_IMAGE_TOKENS, "vision_config.image_size",
         f"{vision.image_size} px in {vision.patch_size} px patches makes {image_tokens} image tokens; allowed: 1..{MAX_IMAGE_TOKENS}"),
        (config.projection_dim == text.hidden_size, "projection_dim",
         f"{config.projection_dim} differs from text_config.hidden_size ({text.hidden_size})"),
    ]
    for ok, name, problem in rules:
        if not ok:
            raise BadModelError(f"config.json {name}: {problem}")
    counts = parameter_counts(config)
    total, largest = sum(counts.values()), max(counts, key=counts.get)
    described = f"config.json describes {total:.3g} parameters, {counts[largest]:.3g} of them from {largest}"
    if total > MAX_PARAMETERS:
        raise BadModelError(f"{described}; the bound is {MAX_PARAMETERS:.3g} (the largest PaliGemma has 2.8e+10)")
    if weight_bytes is not None and total > weight_bytes / 2:
        raise BadModelError(
            f"{described}, but its weight files ({weight_bytes} bytes) hold at most {weight_bytes / 2:.3g} in bf16"
        )


def _read_config(source: str, local_files_only: bool, allow_pickle: bool):
    """A local folder's files checked, then config.json as JSON, then as a transformers config:
    PaliGemma 1 or 2, every size sane."""
    weight_bytes = _check_folder(Path(source), allow_pickle) if Path(source).exists() else None
    try:
        path = cached_file(source, "config.json", local_files_only=local_files_only)
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:  # ValueError: JSONDecodeError, UnicodeDecodeError, a bad hub id
        raise BadModelError(f"{source}: cannot read config: {_one_line(error)}") from error
    try:
        check_config_json(data)
        config = AutoConfig.from_pretrained(source, trust_remote_code=False, local_files_only=local_files_only)
        check_config(config)
        check_sizes(config, weight_bytes)
    except (OSError, ValueError, StrictDataclassError) as error:
        raise BadModelError(f"{source}: cannot read config: {_one_line(error)}") from error
    except BadModelError as error:
        raise BadModelError(f"{source}: {error}") from None
    return config


def load_config(model: str | Path | None = None, *, allow_pickle: bool = False):
    """The checkpoint's checked config alone (seconds, no weights): what load_checkpoint checks
    first, for option checks that must come before loading. Raises BadModelError with one line."""
    source = str(model) if model is not None else default_model()
    return _read_config(source, locate(source), allow_pickle)


def load_checkpoint(model: str | Path | None = None, *, allow_pickle: bool = False) -> Checkpoint:
    """Load a PaliGemma 1 or 2 checkpoint in fp32 on CPU, with its processor.

    `model` is a local folder or a hub id, `owner/name` (resolved by transformers' from_pretrained,
    from the hub cache when the hub is offline or unreachable; this project's machines cannot reach
    the hub, but the path is the ordinary one). A string that is no `owner/name`, or whose parent
    folder exists, is a local path. Never runs remote code; refuses pickle weights unless
    `allow_pickle`. Checks config.json's sizes before building the model. Raises BadModelError
    with one line.
    """
    source = str(model) if model is not None else default_model()
    local_files_only = locate(source)
    family = check_config(_read_config(source, local_files_only, allow_pickle))
    try:
        processor = AutoProcessor.from_pretrained(source, trust_remote_code=False, local_files_only=local_files_only)
    except Exception as error:  # noqa: BLE001 - tokenizers raises bare Exception for a malformed tokenizer.json
        raise BadModelError(
            f"{source}: malformed tokenizer or processor files ({type(error).__name__}: {_one_line(error)})"
        ) from error
    try:
        loaded, info = PaliGemmaForConditionalGeneration.from_pretrained(
            source,
            dtype=torch.float32,
            trust_remote_code=False,
            local_files_only=local_files_only,
            use_safetensors=None if allow_pickle else True,
            ignore_mismatched_sizes=True,  # reported below, with names and shapes
            output_loading_info=True,
        )
    except (OSError, ValueError, RuntimeError, SafetensorError) as error:
        raise BadModelError(f"{source}: cannot load: {_one_line(error)}") from error
    except (pickle.UnpicklingError, EOFError) as error:
        raise BadModelError(f"{source}: cannot load: a pickle weight file is corrupt or holds more than tensors") from error
    # transformers only warns about weights it had to initialise: for an exporter that is fatal.
    if info.get("mismatched_keys"):
        key, found, expected = sorted(info["mismatched_keys"])[0]
        more = len(info["mismatched_keys"]) - 1
        raise BadModelError(
            f"{source}: weight {key} has shape {list(found)} in the weight files, but config.json makes it "
            f"{list(expected)}" + (f" (and {more} more mismatched)" if more else "")
        )
    problems = {key: info.get(key) for key in ("missing_keys", "error_msgs") if info.get(key)}
    if problems:
        detail = "; ".join(f"{key}: {sorted(map(str, value))[:3]}" for key, value in problems.items())
        raise BadModelError(f"{source}: weights left uninitialised ({detail})")
    return Checkpoint(
        model=loaded.eval(),
        processor=processor,
        source=source,
        sha256=checkpoint_sha256(Path(source)) if Path(source).is_dir() else None,
        family=family,
    )
