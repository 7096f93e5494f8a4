"""What a benchmark runs: the folders it times (`Target`:
an artifact or a checkpoint), and the jobs planned from them (`Job`: one target in one precision
and engine at one resolution), resized checkpoints included."""

from __future__ import annotations

import contextlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from pgexport.config import BenchConfig
from pgexport.errors import BadInputError

TORCH_DTYPES = ("fp32", "bf16", "fp16")
LATENCY_ONLY = "latency-only (untrained at this size)"


SEED = 0  # of the random inputs every target gets (the same for each)


def thread_count(config: BenchConfig) -> int:
    """The CPU threads a benchmark uses: the config's, else every CPU this process may run on."""
    return config.threads or len(os.sched_getaffinity(0))


@dataclass
class Target:
    """A folder to benchmark, classified once, before anything runs."""

    path: Path
    name: str  # as the user gave it
    kind: str  # "artifact" or "checkpoint"
    config: dict
    dtypes: tuple[str, ...]  # what the folder offers
    latency_only: str | None = None  # set on checkpoints resized by `resize_checkpoint`

    @property
    def native_resolution(self) -> int:
        return int(self.config["vision_config"]["image_size"])


def resolve_target(target: str | Path) -> Target:
    """Classify `target` as an artifact or a checkpoint folder, or raise BadInputError (exit 4)."""
    path = Path(target)
    config_path = path / "config.json"
    if not path.is_dir() or not config_path.is_file():
        raise BadInputError(f"{target}: not an artifact folder nor a PaliGemma checkpoint folder (no config.json)")
    try:
        config = json.loads(config_path.read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise BadInputError(f"{config_path}: unreadable ({error})") from error
    if config.get("model_type") != "paligemma":
        raise BadInputError(f"{target}: model_type is {config.get('model_type')!r}, not paligemma")
    latency_only = config.get("pgexport_variant")
    if (path / "manifest.json").is_file() and (path / "onnx").is_dir():
        from pgexport.manifest import read_manifest

        manifest = read_manifest(path)
        return Target(path, str(target), "artifact", config, tuple(manifest.get("dtypes", ["fp32"])), latency_only)
    if any(path.glob("*.safetensors")):
        return Target(path, str(target), "checkpoint", config, TORCH_DTYPES, latency_only)
    raise BadInputError(f"{target}: neither an artifact (manifest.json + onnx/) nor a checkpoint (*.safetensors)")


@contextlib.contextmanager
def quiet_transformers():
    """No tqdm bar from transformers while loading (it would break through the bench's own bar)."""
    from transformers.utils import logging

    enabled = logging.is_progress_bar_enabled()
    logging.disable_progress_bar()
    try:
        yield
    finally:
        if enabled:
            logging.enable_progress_bar()



def resize_checkpoint(checkpoint: str | Path, output: str | Path, resolution: int) -> Path:
    """Write a copy of `checkpoint` at `resolution` px: SigLIP's position embeddings interpolated
    (bicubic, transformers' own `interpolate_pos_encoding`), the processor resized to match.

    The copy is for latency only: the model was never trained at this size. Its config says so
    (`pgexport_variant`), and an artifact exported from it carries that config along.
    """
    import torch
    from transformers import AutoProcessor, PaliGemmaForConditionalGeneration

    with quiet_transformers():
        model = PaliGemmaForConditionalGeneration.from_pretrained(checkpoint, dtype=torch.float32, use_safetensors=True)
    tower = model.model.vision_tower
    embeddings = getattr(tower, "vision_model", tower).embeddings
    patch, native = embeddings.patch_size, embeddings.image_size
    if resolution % patch:
        raise BadInputError(f"resolution {resolution} is not a multiple of the patch size {patch}")
    positions = (resolution // patch) ** 2
    with torch.no_grad():
        probe = torch.zeros(1, positions, embeddings.embed_dim)
        weight = embeddings.interpolate_pos_encoding(probe, resolution, resolution)[0].clone()
    embeddings.position_embedding = torch.nn.Embedding.from_pretrained(weight, freeze=False)
    embeddings.image_size, embeddings.num_patches, embeddings.num_positions = resolution, positions, positions
    embeddings.position_ids = torch.arange(positions).expand((1, -1))
    model.config.vision_config.image_size = resolution
    model.config.text_config.num_image_tokens = positions
    model.config.pgexport_variant = f"{LATENCY_ONLY}: position embeddings interpolated from {native} to {resolution} px"
    output = Path(output)
    with quiet_transformers():
        model.save_pretrained(output)
    model.generation_config.save_pretrained(output)
    processor = AutoProcessor.from_pretrained(checkpoint)
    processor.image_processor.size = {"height": resolution, "width": resolution}
    processor.image_processor.image_seq_length = positions
    processor.image_seq_length = positions
    processor.save_pretrained(output)
    return output


@dataclass
class Job:
    """One loaded model to time: a target in one precision and engine, at one resolution."""

    target: Target
    dtype: str
    engine: str  # onnxruntime, pytorch-eager, pytorch-static-compiled
    resolution: int
    label: str = field(init=False)

    def __post_init__(self):
        suffix = f"@{self.resolution}" if self.target.latency_only else ""
        self.label = f"{self.target.name}{suffix} [{self.engine} {self.dtype}]"


def plan_jobs(targets: list[Target], settings: BenchConfig, workdir: Path) -> tuple[list[Job], list[dict]]:
    """Every (target, dtype, engine, resolution) to run, and what was skipped with its reason."""
    jobs, skipped = [], []
    for target in targets:
        resolutions = settings.resolutions or (target.native_resolution,)
        for resolution in resolutions:
            resolved = target
            if resolution != target.native_resolution:
                if target.kind == "artifact":
                    skipped.append({"target": target.name, "resolution": resolution, "reason":
                                    f"artifact graphs are fixed at {target.native_resolution} px; export a resized checkpoint "
                                    "(pgexport.bench.resize_checkpoint, then pgexport onnx --no-validate)"})
                    continue
                folder = resize_checkpoint(target.path, workdir / f"{len(jobs)}-{resolution}", resolution)
                resolved = Target(folder, target.name, "checkpoint", json.loads((folder / "config.json").read_text()),
                                  TORCH_DTYPES, LATENCY_ONLY)
            if target.kind == "artifact":
                for dtype in settings.dtypes or target.dtypes:
                    if dtype in target.dtypes:
                        jobs.append(Job(resolved, dtype, "onnxruntime", resolution))
                    else:
                        skipped.append({"target": target.name, "dtype": dtype,
                                        "reason": f"artifact has no {dtype} graphs (has {', '.join(target.dtypes)})"})
            else:  # the PyTorch reference: the requested torch precisions, or the device's usual one
                wanted = [d for d in (settings.dtypes or ()) if d in TORCH_DTYPES]
                for dtype in wanted or ["bf16" if settings.device == "cuda" else "fp32"]:
                    jobs.append(Job(resolved, dtype, "pytorch-eager", resolution))
                    if settings.device == "cuda":
                        jobs.append(Job(resolved, dtype, "pytorch-static-compiled", resolution))
    return jobs, skipped


