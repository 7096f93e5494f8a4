"""Checks on the saved packages that need no Core ML runtime (so they run on Linux): inputs,
outputs, states, deployment target, and the ops that carry the design (state read / slice update /
state write; the compression's constexpr ops)."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

# Core ML specification version of each deployment target (iOS18 and macOS15 are both 9).
SPEC_VERSION = {"iOS17": 8, "iOS18": 9, "macOS15": 9}
# The op a compressed weight decompresses through, per --compress (iOS18 opset).
COMPRESSION_OPS = {"int8": "constexpr_blockwise_shift_scale", "int4": "constexpr_blockwise_shift_scale",
                   "palettize4": "constexpr_lut_to_dense"}
STATEFUL_OPS = ("read_state", "slice_update", "write_state")
_FLOAT16, _INT32 = 65552, 131104  # ArrayFeatureType.ArrayDataType values


def program_ops(spec) -> Counter:
    """Op types in the main function of an ML program spec."""
    function = spec.mlProgram.functions["main"]
    return Counter(op.type for op in function.block_specializations[function.opset].operations)


def _array(feature):
    return feature.type.multiArrayType


def _ranges(array) -> list[tuple[int, int]]:
    bounds = array.shapeRange.sizeRanges
    return [(b.lowerBound, b.upperBound) for b in bounds] if bounds else [(d, d) for d in array.shape]


def load_spec(path: Path):
    import coremltools as ct

    return ct.models.MLModel(str(path), skip_model_load=True).get_spec()


def check_vision(spec, expected: dict) -> list[str]:
    problems = []
    inputs = {f.name: f for f in spec.description.input}
    image = inputs.get("image")
    if image is None or image.type.WhichOneof("Type") != "imageType":
        problems.append("vision_encoder: input 'image' is not an ImageType")
    else:
        size = expected["image_size"]
        if (image.type.imageType.width, image.type.imageType.height) != (size, size):
            problems.append(f"vision_encoder: image is {image.type.imageType.width}x{image.type.imageType.height}, expected {size}x{size}")
        if image.type.imageType.colorSpace != 20:  # RGB
            problems.append("vision_encoder: image colour space is not RGB")
    outputs = {f.name: f for f in spec.description.output}
    if "image_features" not in outputs:
        problems.append("vision_encoder: no output 'image_features'")
    elif list(_array(outputs["image_features"]).shape) not in ([], [1, expected["num_image_tokens"], expected["hidden_size"]]):
        problems.append(f"vision_encoder: image_features shape {list(_array(outputs['image_features']).shape)}")
    return problems


def check_decoder(spec, expected: dict) -> list[str]:
    problems = []
    context = expected["max_context"]
    inputs = {f.name: f for f in spec.description.input}
    want = {
        "input_ids": (_INT32, [(1, 1), (1, context)]),
        "image_features": (_FLOAT16, [(1, 1), (1, expected["num_image_tokens"]), (expected["hidden_size"],) * 2]),
        "attention_mask": (_FLOAT16, [(1, 1), (1, 1), (1, context), (1, context)]),
    }
    for name, (dtype, ranges) in want.items():
        if name not in inputs:
            problems.append(f"decoder: no input {name!r}")
            continue
        array = _array(inputs[name])
        if array.dataType != dtype:
            problems.append(f"decoder: input {name} has data type {array.dataType}, expected {dtype}")
        if _ranges(array) != ranges:
            problems.append(f"decoder: input {name} shape ranges {_ranges(array)}, expected {ranges}")
    outputs = {f.name: f for f in spec.description.output}
    if "logits" not in outputs:
        problems.append("decoder: no output 'logits'")
    states = {s.name: s for s in spec.description.state}
    for name in ("key_cache", "value_cache"):
        if name not in states:
            problems.append(f"decoder: no state {name!r}")
            continue
        array = states[name].type.stateType.arrayType
        if list(array.shape) != list(expected["state_shape"]) or array.dataType != _FLOAT16:
            problems.append(f"decoder: state {name} is {list(array.shape)} (type {array.dataType}), expected fp16 {expected['state_shape']}")
    ops = program_ops(spec)
    missing = [op for op in STATEFUL_OPS if not ops[op]]
    if missing:
        problems.append(f"decoder: stateful ops missing: {missing}")
    layers = expected["state_shape"][0]
    if ops["slice_update"] < 2 * layers or ops["write_state"] < 2 * layers:
        problems.append(f"decoder: {ops['slice_update']} slice_update / {ops['write_state']} write_state for {layers} layers (expected 2 each per layer)")
    return problems


def check_spec(folder: Path, expected: dict) -> list[str]:
    """Every problem with the packages in `folder` against `expected` (from the manifest); [] when fine."""
    folder = Path(folder)
    problems = []
    for package, check in (("vision_encoder", check_vision), ("decoder", check_decoder)):
        path = folder / f"{package}.mlpackage"
        if not path.is_dir():
            problems.append(f"{package}: {path.name} missing")
            continue
        spec = load_spec(path)
        if spec.WhichOneof("Type") != "mlProgram":
            problems.append(f"{package}: not an ML program")
            continue
        if spec.specificationVersion < SPEC_VERSION[expected["target"]]:
            problems.append(f"{package}: specification version {spec.specificationVersion} is below {expected['target']}'s {SPEC_VERSION[expected['target']]}")
        metadata = spec.description.metadata.userDefined
        for key in ("pgexport.version", "pgexport.source_sha256", "pgexport.license"):
            if key not in metadata:
                problems.append(f"{package}: metadata {key} missing")
        if not spec.description.metadata.shortDescription or not spec.description.metadata.license:
            problems.append(f"{package}: description or license missing")
        compression_op = COMPRESSION_OPS.get(expected["compress"])
        if compression_op and not program_ops(spec)[compression_op]:
            problems.append(f"{package}: --compress {expected['compress']} but no {compression_op} op")
        problems += check(spec, expected)
    return problems
