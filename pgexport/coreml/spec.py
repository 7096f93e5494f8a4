"""Checks on the saved packages against the contract (pgexport.contract: COREML_VISION,
COREML_DECODER) that need no Core ML runtime, so they run on Linux: inputs,
outputs, states, deployment target, and the ops that carry the design (state read / slice update /
state write; the compression's constexpr ops)."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

from pgexport.contract import COREML_DECODER, COREML_RANGE_DIMS, COREML_SEG_DECODER, COREML_VISION, IMAGE, Tensor

# Core ML specification version of each deployment target (iOS18 and macOS15 are both 9).
SPEC_VERSION = {"iOS17": 8, "iOS18": 9, "macOS15": 9}
# The op a compressed weight decompresses through, per --compress (iOS18 opset).
COMPRESSION_OPS = {"int8": "constexpr_blockwise_shift_scale", "int4": "constexpr_blockwise_shift_scale",
                   "palettize4": "constexpr_lut_to_dense"}
STATEFUL_OPS = ("read_state", "slice_update", "write_state")
ARRAY_TYPES = {"float16": 65552, "float32": 65568, "int32": 131104}  # the contract's dtypes as ArrayFeatureType.ArrayDataType


def program_ops(spec) -> Counter:
    """Op types in the main function of an ML program spec."""
    function = spec.mlProgram.functions["main"]
    return Counter(op.type for op in function.block_specializations[function.opset].operations)


def _array(feature):
    return feature.type.multiArrayType


def _ranges(array) -> list[tuple[int, int]]:
    bounds = array.shapeRange.sizeRanges
    return [(b.lowerBound, b.upperBound) for b in bounds] if bounds else [(d, d) for d in array.shape]


def dim_sizes(expected: dict) -> dict[str, int]:
    """The size of each fixed named dim of the packages' tensors, from `expected` (the manifest's
    spec_check.expected)."""
    return {"image_size": expected["image_size"], "image_tokens": expected["num_image_tokens"],
            "hidden_size": expected["hidden_size"], "vocab_size": expected["vocab_size"],
            "max_context": expected["max_context"]}


def tensor_ranges(tensor: Tensor, sizes: dict[str, int]) -> list[tuple[int, int]]:
    """A contract tensor's (lowest, highest) size per axis: a range dim (COREML_RANGE_DIMS) from 1
    to the size of its bound, any other from `sizes`."""
    def bounds(dim):
        if isinstance(dim, int):
            return dim, dim
        if dim in COREML_RANGE_DIMS:
            return 1, sizes[COREML_RANGE_DIMS[dim]]
        return sizes[dim], sizes[dim]

    return [bounds(dim) for dim in tensor.dims]


def load_spec(path: Path):
    import coremltools as ct

    return ct.models.MLModel(str(path), skip_model_load=True).get_spec()


def check_vision(spec, expected: dict) -> list[str]:
    problems, name = [], COREML_VISION.name
    inputs = {f.name: f for f in spec.description.input}
    image = inputs.get(IMAGE)
    if image is None or image.type.WhichOneof("Type") != "imageType":
        problems.append(f"{name}: input {IMAGE!r} is not an ImageType")
    else:
        size = expected["image_size"]
        if (image.type.imageType.width, image.type.imageType.height) != (size, size):
            problems.append(f"{name}: {IMAGE} is {image.type.imageType.width}x{image.type.imageType.height}, expected {size}x{size}")
        if image.type.imageType.colorSpace != 20:  # RGB
            problems.append(f"{name}: {IMAGE} colour space is not RGB")
    outputs = {f.name: f for f in spec.description.output}
    sizes = dim_sizes(expected)
    for tensor in COREML_VISION.outputs:
        if tensor.name not in outputs:
            problems.append(f"{name}: no output {tensor.name!r}")
            continue
        shape = list(_array(outputs[tensor.name]).shape)
        if shape not in ([], [high for _, high in tensor_ranges(tensor, sizes)]):
            problems.append(f"{name}: {tensor.name} shape {shape}")
    return problems


def check_decoder(spec, expected: dict) -> list[str]:
    problems, name, sizes = [], COREML_DECODER.name, dim_sizes(expected)
    inputs = {f.name: f for f in spec.description.input}
    for tensor in COREML_DECODER.inputs:
        if tensor.name not in inputs:
            problems.append(f"{name}: no input {tensor.name!r}")
            continue
        array, dtype, ranges = _array(inputs[tensor.name]), ARRAY_TYPES[tensor.dtype], tensor_ranges(tensor, sizes)
        if array.dataType != dtype:
            problems.append(f"{name}: input {tensor.name} has data type {array.dataType}, expected {dtype}")
        if _ranges(array) != ranges:
            problems.append(f"{name}: input {tensor.name} shape ranges {_ranges(array)}, expected {ranges}")
    outputs = {f.name: f for f in spec.description.output}
    for tensor in COREML_DECODER.outputs:
        if tensor.name not in outputs:
            problems.append(f"{name}: no output {tensor.name!r}")
    states = {s.name: s for s in spec.description.state}
    for tensor in COREML_DECODER.states:
        if tensor.name not in states:
            problems.append(f"{name}: no state {tensor.name!r}")
            continue
        array = states[tensor.name].type.stateType.arrayType
        if list(array.shape) != list(expected["state_shape"]) or array.dataType != ARRAY_TYPES[tensor.dtype]:
            problems.append(f"{name}: state {tensor.name} is {list(array.shape)} (type {array.dataType}), "
                            f"expected fp16 {expected['state_shape']}")
    ops = program_ops(spec)
    missing = [op for op in STATEFUL_OPS if not ops[op]]
    if missing:
        problems.append(f"{name}: stateful ops missing: {missing}")
    layers = expected["state_shape"][0]
    if ops["slice_update"] < 2 * layers or ops["write_state"] < 2 * layers:
        problems.append(f"{name}: {ops['slice_update']} slice_update / {ops['write_state']} write_state for {layers} layers "
                        "(expected 2 each per layer)")
    return problems


def check_seg_decoder(spec, expected: dict) -> list[str]:
    """seg_decoder.mlpackage: its fixed-shape input and output, as the contract has them."""
    problems, name = [], COREML_SEG_DECODER.name
    for kind, features, tensors in (("input", spec.description.input, COREML_SEG_DECODER.inputs),
                                    ("output", spec.description.output, COREML_SEG_DECODER.outputs)):
        found = {f.name: f for f in features}
        for tensor in tensors:
            if tensor.name not in found:
                problems.append(f"{name}: no {kind} {tensor.name!r}")
                continue
            array = _array(found[tensor.name])
            if array.dataType != ARRAY_TYPES[tensor.dtype]:
                problems.append(f"{name}: {kind} {tensor.name} has data type {array.dataType}, expected {ARRAY_TYPES[tensor.dtype]}")
            if list(array.shape) not in ([], list(tensor.dims)):
                problems.append(f"{name}: {kind} {tensor.name} shape {list(array.shape)}, expected {list(tensor.dims)}")
    return problems


def check_spec(folder: Path, expected: dict) -> list[str]:
    """Every problem with the packages in `folder` against `expected` (from the manifest); [] when fine.
    The seg decoder's package is checked when `expected` says the export made one."""
    folder = Path(folder)
    problems = []
    checks = [(COREML_VISION, check_vision), (COREML_DECODER, check_decoder)]
    if expected.get("seg_decoder"):
        checks.append((COREML_SEG_DECODER, check_seg_decoder))
    for contract, check in checks:
        package, path = contract.name, folder / contract.filename
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
        if compression_op and contract.compressed and not program_ops(spec)[compression_op]:
            problems.append(f"{package}: --compress {expected['compress']} but no {compression_op} op")
        problems += check(spec, expected)
    return problems
