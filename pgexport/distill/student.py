"""A smaller PaliGemma student, built from the teacher's own layers.

The student has the teacher's config with fewer decoder layers (and optionally fewer vision
layers). Every weight is copied from the teacher: embeddings (tied with the LM head), projector,
vision embeddings, post-layernorm, head and final norm as they are, and student layer i from
teacher layer map[i]. A student that starts as a pruned teacher recovers in far fewer steps than
one trained from scratch.
"""

from __future__ import annotations

import copy
import re

from transformers import PaliGemmaForConditionalGeneration

from pgexport.errors import BadInputError

# Where each tower's numbered layers live in PaliGemmaForConditionalGeneration's state dict.
LAYER_PATTERNS = {
    "decoder": re.compile(r"^(.*\.language_model\.layers\.)(\d+)(\..*)$"),
    "vision": re.compile(r"^(.*\.vision_tower\.encoder\.layers\.)(\d+)(\..*)$"),
}


def every_kth(teacher_layers: int, student_layers: int) -> list[int]:
    """Teacher layers 0, k, 2k, ... with k = teacher_layers // student_layers (4 -> 2: [0, 2])."""
    step = teacher_layers // student_layers
    return [i * step for i in range(student_layers)]


def layer_map(tower: str, teacher_layers: int, student_layers: int | None, given: list[int] | None) -> list[int]:
    """The teacher layer each student layer starts from; BadInputError for a student larger than the teacher."""
    if given is not None:
        given = list(given)
        if student_layers is not None and student_layers != len(given):
            raise BadInputError(f"{tower} layer map {given} has {len(given)} entries but {student_layers} layers were asked for")
        bad = [i for i in given if not 0 <= i < teacher_layers]
        if bad:
            raise BadInputError(f"{tower} layer map {given}: teacher layer(s) {bad} out of range 0..{teacher_layers - 1}")
        student_layers = len(given)
    if student_layers is None:
        student_layers = teacher_layers
    if student_layers < 1:
        raise BadInputError(f"a student needs at least one {tower} layer, got {student_layers}")
    if student_layers > teacher_layers:
        raise BadInputError(f"student larger than the teacher: {student_layers} {tower} layers, the teacher has {teacher_layers}")
    return given if given is not None else every_kth(teacher_layers, student_layers)


def student_config(teacher_config, decoder_map: list[int], vision_map: list[int]):
    """The teacher's config with the mapped layer counts (Gemma2's per-layer attention types follow the map)."""
    config = copy.deepcopy(teacher_config)
    text, vision = config.text_config, config.vision_config
    text.num_hidden_layers = len(decoder_map)
    if getattr(text, "layer_types", None):  # Gemma2: sliding / full attention alternate per layer
        text.layer_types = [text.layer_types[i] for i in decoder_map]
    vision.num_hidden_layers = len(vision_map)
    return config


def teacher_key(student_key: str, maps: dict[str, list[int]]) -> str:
    """The teacher state-dict key a student key is copied from."""
    for tower, pattern in LAYER_PATTERNS.items():
        match = pattern.match(student_key)
        if match:
            return f"{match.group(1)}{maps[tower][int(match.group(2))]}{match.group(3)}"
    return student_key


def init_student(teacher, decoder_map: list[int], vision_map: list[int]) -> PaliGemmaForConditionalGeneration:
    """A student whose every weight is a copy of the teacher's (layers by the maps), in train mode."""
    student = PaliGemmaForConditionalGeneration(student_config(teacher.config, decoder_map, vision_map))
    maps = {"decoder": decoder_map, "vision": vision_map}
    source = teacher.state_dict()
    student.load_state_dict({key: source[teacher_key(key, maps)].clone() for key in student.state_dict()}, strict=True)
    student.generation_config = copy.deepcopy(teacher.generation_config)
    return student.train()


def parameter_count(model) -> int:
    """Distinct parameters (the tied embedding / LM head counted once)."""
    return sum(p.numel() for p in model.parameters())
