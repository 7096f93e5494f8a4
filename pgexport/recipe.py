"""Build recipes: the typed schema of `pgexport build RECIPE.yaml`, validated before any work.

A recipe is serialized dataclasses (one surface: the YAML keys are the field names, the same as
the Python API's and the CLI's option names). Every error names the key and the allowed values.

    checkpoint: null              # local folder or hub id; null: the demo model in the package
    allow_pickle: false
    output: out/build             # `pgexport build -o` overrides it
    stages:                       # run in this order; `name` is the stage's folder (default: its kind)
      - {stage: onnx}                          # fp32 graphs
      - {stage: onnx, name: onnx-int8, int8: true}
      - {stage: validate}                      # parity of every artifact above, against PyTorch
      - {stage: bench, batches: [1]}           # latency on this machine
      - {stage: verify}                        # every file of the build against manifest.json
    gates:
      max_total_bytes: 100000000
      parity: {int8: {min_token_agreement: 0.75}}   # per dtype; unset fields keep pgexport's defaults
      max_per_token_ms: 50                     # and max_ttft_ms: medians, every benchmarked row

Every number has a sane range (RANGES; NaN and infinities are in none), and YAML anchors and
aliases are refused: a recipe never needs them, and a few hundred bytes of nested aliases expand to
gigabytes. A new stage kind is one dataclass here, one entry in STAGES, and one function in
pgexport.build.
"""

from __future__ import annotations

import dataclasses
import re
import reprlib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from pgexport.errors import BadInputError
from pgexport.exporters.onnx import DEFAULT_OPSET, MAX_OPSET, MIN_OPSET

NAME = re.compile(r"^[a-z0-9][a-z0-9_.-]*$")
RESERVED_NAMES = {"stages", "manifest.json"}  # the build folder's own entries
MAX_RECIPE_BYTES = 1 << 20
MAX_DEPTH = 16  # of nested lists and mappings (a recipe needs 4)

# Every number a recipe sets -> its inclusive range; NaN and infinities are in none. Generous: they
# refuse typos (runs: 1000000000000) and gates that can never fail, not unusual builds. The opset's
# range is what the exporter supports (OnnxStage.check).
RANGES = {
    "batches": (1, 64),  # each
    "prompt_tokens": (1, 4096),
    "new_tokens": (2, 4096),  # the first token comes from prefill: at least one decode step
    "warmup": (0, 100),
    "runs": (1, 1000),
    "threads": (1, 1024),
    "max_total_bytes": (1, 10**13),
    "max_ttft_ms": (0, 3_600_000),
    "max_per_token_ms": (0, 3_600_000),
    "max_rel_diff": (0, 1),  # of the reference logit range
    "min_cosine": (-1, 1),
    "min_token_agreement": (0, 1),
    "max_exact_match_drop": (0, 100),  # points
}


class RecipeError(BadInputError):
    """A recipe that cannot be built as written: the message names the key and the allowed values."""


_SHORT = reprlib.Repr()
_SHORT.maxstring = _SHORT.maxother = 60


def shown(value) -> str:
    """`value` as an error message shows it: at most 80 characters, in bounded time however large it is."""
    text = _SHORT.repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _key(key) -> str:
    """A mapping key as a path shows it (`gates.parity.int8`), shortened like `shown` when long."""
    return str(key) if len(str(key)) <= 40 else shown(key)


def in_range(value, key: str) -> bool:
    """Whether `value` is a number (not a bool) within RANGES[key]; NaN never is."""
    least, most = RANGES[key]
    return isinstance(value, (int, float)) and not isinstance(value, bool) and least <= value <= most


def _allowed(key: str) -> str:
    least, most = RANGES[key]
    return f"{least:g}..{most:g}"


class RecipeLoader(yaml.SafeLoader):
    """yaml.safe_load without anchors and aliases, and at most MAX_DEPTH levels deep."""

    depth = 0

    def compose_node(self, parent, index):
        event = self.peek_event()
        line = event.start_mark.line + 1
        if isinstance(event, yaml.AliasEvent) or getattr(event, "anchor", None):
            raise RecipeError(f"line {line}: YAML anchors and aliases (&name, *name) are not allowed in a recipe")
        if self.depth >= MAX_DEPTH:
            raise RecipeError(f"line {line}: nested more than {MAX_DEPTH} levels deep")
        self.depth += 1
        try:
            return super().compose_node(parent, index)
        finally:
            self.depth -= 1


@dataclass(frozen=True)
class OnnxStage:
    """Export the checkpoint to an ONNX artifact folder (`pgexport onnx`; its gate runs in `validate`)."""

    name: str = "onnx"
    int8: bool = False
    opset: int = DEFAULT_OPSET

    def check(self, where: str) -> None:
        if not MIN_OPSET <= self.opset <= MAX_OPSET:
            raise RecipeError(f"{where}.opset: {self.opset} is not supported; allowed: {MIN_OPSET}..{MAX_OPSET}")


@dataclass(frozen=True)
class ValidateStage:
    """Parity of artifacts against the PyTorch checkpoint, with the recipe's parity gates."""

    name: str = "validate"
    artifacts: tuple[str, ...] = ()  # stage names; empty: every artifact stage before this one
    eval_file: str | None = None  # JSONL of held-out rows (the demo model uses its own split)


@dataclass(frozen=True)
class BenchStage:
    """Latency of artifacts on this machine (pgexport.bench.bench); cached per machine, not across machines."""

    name: str = "bench"
    artifacts: tuple[str, ...] = ()  # stage names; empty: every artifact stage before this one
    batches: tuple[int, ...] = (1,)
    prompt_tokens: int = 10
    new_tokens: int = 16
    warmup: int = 1
    runs: int = 3
    threads: int | None = None  # default: every usable CPU

    def check(self, where: str) -> None:
        sizes = list(self.batches)
        if not sizes or not all(in_range(size, "batches") for size in sizes) or len(set(sizes)) < len(sizes):
            raise RecipeError(
                f"{where}.batches: {shown(sizes)}; allowed: a list of batch sizes, each {_allowed('batches')}, none repeated"
            )


@dataclass(frozen=True)
class VerifyStage:
    """Every file of the build folder against the top-level manifest.json. Never cached: it is the check."""

    name: str = "verify"


# kind -> options. The one name -> thing map; pgexport.build runs each kind (tests cover every entry).
STAGES = {"onnx": OnnxStage, "validate": ValidateStage, "bench": BenchStage, "verify": VerifyStage}
Stage = typing.Union[tuple(STAGES.values())]
ARTIFACT_STAGES = (OnnxStage,)  # stages whose output is an artifact folder
CHECK_STAGES = (ValidateStage, BenchStage)  # stages that measure artifact stages (their `artifacts`)


@dataclass(frozen=True)
class ParityGate:
    """Overrides of one dtype's parity thresholds (pgexport.validate.Thresholds); None keeps the default."""

    max_rel_diff: float | None = None
    min_cosine: float | None = None
    min_token_agreement: float | None = None
    max_exact_match_drop: float | None = None  # in points (0..100)


@dataclass(frozen=True)
class Gates:
    """What a build must meet to exit 0."""

    max_total_bytes: int | None = None  # every file the build folder lists
    parity: dict[str, ParityGate] = field(default_factory=dict)  # dtype -> thresholds (validate stage)
    max_ttft_ms: float | None = None  # median time to first token, every benchmarked row (bench stage)
    max_per_token_ms: float | None = None  # median time per output token, every benchmarked row (bench stage)


@dataclass(frozen=True)
class Recipe:
    checkpoint: str | None = None
    allow_pickle: bool = False
    output: str = "out/build"
    stages: tuple[Stage, ...] = (OnnxStage(), ValidateStage(), VerifyStage())
    gates: Gates = field(default_factory=Gates)

    def to_dict(self) -> dict:
        """The resolved recipe, every default filled in: written into the build manifest."""
        data = dataclasses.asdict(self)
        data["stages"] = [{"stage": kind_of(stage), **dataclasses.asdict(stage)} for stage in self.stages]
        return data


def kind_of(stage) -> str:
    return next(kind for kind, cls in STAGES.items() if isinstance(stage, cls))


def load_recipe(source: str | Path | dict | Recipe) -> Recipe:
    """A Recipe from a YAML file, a dict of the same shape, or a Recipe; raises RecipeError."""
    if isinstance(source, Recipe):
        return check_recipe(source)
    if isinstance(source, dict):
        return check_recipe(_build(Recipe, source, ""))
    path = Path(source)
    try:
        if path.stat().st_size > MAX_RECIPE_BYTES:
            raise RecipeError(f"cannot read recipe {path}: larger than {MAX_RECIPE_BYTES} bytes")
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise RecipeError(f"cannot read recipe {path}: {error}") from error
    try:
        data = yaml.load(text, Loader=RecipeLoader)
        return check_recipe(_build(Recipe, {} if data is None else data, ""))
    except yaml.YAMLError as error:
        raise RecipeError(f"{path}: not valid YAML: {_yaml_problem(error)}") from None
    except RecipeError as error:
        raise RecipeError(f"{path}: {error}") from None


def _yaml_problem(error: yaml.YAMLError) -> str:
    mark = getattr(error, "problem_mark", None)
    problem = getattr(error, "problem", None) or str(error).splitlines()[0]
    return f"line {mark.line + 1}: {problem}" if mark else problem


def check_recipe(recipe: Recipe) -> Recipe:
    """Cross-field rules: unique names, stage order, gates that have a stage to decide them."""
    from pgexport.validate import THRESHOLDS

    names, artifacts = set(), []
    if not recipe.stages:
        raise RecipeError(f"stages: empty; allowed stages: {', '.join(STAGES)}")
    for index, stage in enumerate(recipe.stages):
        where = f"stages[{index}]"
        if not NAME.match(stage.name) or stage.name in RESERVED_NAMES:
            raise RecipeError(
                f"{where}.name: {shown(stage.name)} is not a folder name pgexport can use "
                f"(lowercase letters, digits, '_', '-', '.'; not {', '.join(sorted(RESERVED_NAMES))})"
            )
        if stage.name in names:
            raise RecipeError(f"{where}.name: {shown(stage.name)} is used twice; each stage needs its own name")
        names.add(stage.name)
        if hasattr(stage, "check"):
            stage.check(where)
        _check_numbers(stage, where)
        if isinstance(stage, CHECK_STAGES):
            if not artifacts:
                raise RecipeError(
                    f"{where}: {kind_of(stage)} needs an artifact stage ({', '.join(_artifact_kinds())}) before it"
                )
            unknown = [name for name in stage.artifacts if name not in artifacts]
            if unknown:
                raise RecipeError(f"{where}.artifacts: {unknown} are not artifact stages before it; allowed: {artifacts}")
        if isinstance(stage, VerifyStage) and index != len(recipe.stages) - 1:
            raise RecipeError(f"{where}: verify checks the finished build folder, so it must be the last stage")
        if isinstance(stage, ARTIFACT_STAGES):
            artifacts.append(stage.name)
    for dtype, gate in recipe.gates.parity.items():
        if dtype not in THRESHOLDS:
            raise RecipeError(f"gates.parity.{_key(dtype)}: unknown dtype; allowed: {', '.join(THRESHOLDS)}")
        _check_numbers(gate, f"gates.parity.{dtype}")
    _check_numbers(recipe.gates, "gates")
    needs = {"parity": (ValidateStage, "validate"), "max_ttft_ms": (BenchStage, "bench"),
             "max_per_token_ms": (BenchStage, "bench")}
    for key, (cls, kind) in needs.items():
        if getattr(recipe.gates, key) and not any(isinstance(s, cls) for s in recipe.stages):
            raise RecipeError(f"gates.{key}: no {kind} stage measures it; add {{stage: {kind}}} to stages")
    return recipe


def _check_numbers(options, where: str) -> None:
    """Each set number field of one dataclass (a stage, the gates, a parity gate) within RANGES."""
    for f in dataclasses.fields(options):
        value = getattr(options, f.name)
        if f.name in RANGES and value is not None and not isinstance(value, tuple) and not in_range(value, f.name):
            raise RecipeError(f"{where}.{f.name}: {shown(value)} is out of range {_allowed(f.name)}")


def _artifact_kinds() -> list[str]:
    return [kind for kind, cls in STAGES.items() if cls in ARTIFACT_STAGES]


def _build(cls, data, where: str):
    """`cls(**data)` with every key and value checked against the dataclass's field types."""
    if not isinstance(data, dict):
        fields = ", ".join(f.name for f in dataclasses.fields(cls))
        raise RecipeError(f"{where or 'recipe'}: expected a mapping of {fields}, got {shown(data)}")
    hints = typing.get_type_hints(cls)
    allowed = [f.name for f in dataclasses.fields(cls)]
    for key in data:
        if key not in allowed:
            hint = "; latency gates are max_ttft_ms and max_per_token_ms" if cls is Gates and "latency" in str(key) else ""
            raise RecipeError(f"{where or 'recipe'}: unknown key {shown(key)}; allowed: {', '.join(allowed)}{hint}")
    return cls(**{key: _value(hints[key], value, f"{where}.{key}".lstrip(".")) for key, value in data.items()})


def _stage(data, where: str):
    if not isinstance(data, dict) or "stage" not in data:
        raise RecipeError(f"{where}: expected a mapping with a 'stage' key; allowed stages: {', '.join(STAGES)}")
    kind = data["stage"]
    if not isinstance(kind, str) or kind not in STAGES:
        raise RecipeError(f"{where}.stage: unknown stage {shown(kind)}; allowed: {', '.join(STAGES)}")
    options = {key: value for key, value in data.items() if key != "stage"}
    options.setdefault("name", kind)
    return _build(STAGES[kind], options, where)


def _value(hint, value, where: str):
    """Check one value against a field's type hint and convert lists to tuples."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if type(None) in args and value is None:
            return None
        options = [arg for arg in args if arg is not type(None)]
        if all(dataclasses.is_dataclass(arg) for arg in options):  # the stage union
            return _stage(value, where)
        return _value(options[0], value, where)
    if origin is tuple:
        if not isinstance(value, list):
            raise RecipeError(f"{where}: expected a list, got {shown(value)}")
        return tuple(_value(args[0], item, f"{where}[{index}]") for index, item in enumerate(value))
    if origin is dict:
        if not isinstance(value, dict):
            raise RecipeError(f"{where}: expected a mapping, got {shown(value)}")
        return {str(key): _value(args[1], item, f"{where}.{_key(key)}") for key, item in value.items()}
    if dataclasses.is_dataclass(hint):
        return _build(hint, value, where)
    expected = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}[hint]
    # YAML gives bools for yes/no: refuse them where numbers are expected, and ints are valid floats.
    ok = isinstance(value, hint) and not (hint in (int, float) and isinstance(value, bool))
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        value, ok = float(value), True
    if not ok:
        raise RecipeError(f"{where}: expected {expected}, got {shown(value)}")
    return value
