"""Load a PaliGemma checkpoint (local folder or hub id) and refuse anything that would export wrong."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from transformers import AutoConfig, AutoProcessor, PaliGemmaForConditionalGeneration

from pgexport.errors import BadModelError

SUPPORTED_DECODERS = {"gemma": "PaliGemma 1", "gemma2": "PaliGemma 2"}
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt")


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


def _local_weights_check(folder: Path, allow_pickle: bool) -> None:
    files = [p.name for p in folder.iterdir() if p.suffix in WEIGHT_SUFFIXES]
    if not files:
        raise BadModelError(f"{folder}: no weight files (*.safetensors)")
    if not any(name.endswith(".safetensors") for name in files) and not allow_pickle:
        raise BadModelError(f"{folder}: only pickle weights ({', '.join(sorted(files))}); pass --allow-pickle to load them")


def load_checkpoint(model: str | Path | None = None, *, allow_pickle: bool = False) -> Checkpoint:
    """Load a PaliGemma 1 or 2 checkpoint in fp32 on CPU, with its processor.

    `model` is a local folder or a hub id (resolved by transformers' from_pretrained; this
    project's machines cannot reach the hub, but the path is the ordinary one). Never runs remote
    code; refuses pickle weights unless `allow_pickle`. Raises BadModelError with one line.
    """
    source = str(model) if model is not None else default_model()
    local = Path(source)
    if local.exists():
        if not local.is_dir():
            raise BadModelError(f"{source}: not a checkpoint folder")
        if not (local / "config.json").is_file():
            raise BadModelError(f"{source}: no config.json")
        _local_weights_check(local, allow_pickle)
    elif source.startswith((".", "/", "~")) or source.count("/") > 1:
        raise BadModelError(f"{source}: no such checkpoint folder")
    try:
        config = AutoConfig.from_pretrained(source, trust_remote_code=False)
    except (OSError, ValueError, json.JSONDecodeError) as error:
        raise BadModelError(f"{source}: cannot read config: {str(error).splitlines()[0]}") from error
    family = check_config(config)

    try:
        loaded, info = PaliGemmaForConditionalGeneration.from_pretrained(
            source,
            dtype=torch.float32,
            trust_remote_code=False,
            use_safetensors=None if allow_pickle else True,
            output_loading_info=True,
        )
        processor = AutoProcessor.from_pretrained(source, trust_remote_code=False)
    except (OSError, ValueError, RuntimeError, json.JSONDecodeError, SafetensorError) as error:
        raise BadModelError(f"{source}: cannot load: {str(error).strip().splitlines()[0]}") from error
    # transformers only warns about weights it had to initialise: for an exporter that is fatal.
    problems = {key: info.get(key) for key in ("missing_keys", "mismatched_keys", "error_msgs") if info.get(key)}
    if problems:
        detail = "; ".join(f"{key}: {sorted(map(str, value))[:3]}" for key, value in problems.items())
        raise BadModelError(f"{source}: weights left uninitialised or mismatched ({detail})")
    return Checkpoint(
        model=loaded.eval(),
        processor=processor,
        source=source,
        sha256=checkpoint_sha256(local) if local.is_dir() else None,
        family=family,
    )
