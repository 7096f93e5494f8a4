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

A new stage kind is one dataclass here, one entry in STAGES, and one function in pgexport.build.
"""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

from pgexport.errors import BadInputError
from pgexport.exporters.onnx import DEFAULT_OPSET, MAX_OPSET, MIN_OPSET

NAME = re.compile(r"^[a-z0-9][a-z0-9_.-]*$")
RESERVED_NAMES = {"stages", "manifest.json"}  # the build folder's own entries


class RecipeError(BadInputError):
    """A recipe that cannot be built as written: the message names the key and the allowed values."""


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
        minimum = {"prompt_tokens": 1, "new_tokens": 2, "warmup": 0, "runs": 1, "threads": 1}
        for key, least in minimum.items():
            value = getattr(self, key)
            if value is not None and value < least:
                raise RecipeError(f"{where}.{key}: {value} is too small; allowed: {least} or more")
        if not self.batches or min(self.batches) < 1:
            raise RecipeError(f"{where}.batches: {list(self.batches)}; allowed: a list of batch sizes, each 1 or more")


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
    import yaml

    path = Path(source)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as error:
        raise RecipeError(f"cannot read recipe {path}: {error}") from error
    except yaml.YAMLError as error:
        raise RecipeError(f"{path}: not valid YAML: {str(error).splitlines()[0]}") from error
    if data is None:
        data = {}
    try:
        return check_recipe(_build(Recipe, data, ""))
    except RecipeError as error:
        raise RecipeError(f"{path}: {error}") from None


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
                f"{where}.name: {stage.name!r} is not a folder name pgexport can use "
                f"(lowercase letters, digits, '_', '-', '.'; not {', '.join(sorted(RESERVED_NAMES))})"
            )
        if stage.name in names:
            raise RecipeError(f"{where}.name: {stage.name!r} is used twice; each stage needs its own name")
        names.add(stage.name)
        if hasattr(stage, "check"):
            stage.check(where)
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
    for dtype in recipe.gates.parity:
        if dtype not in THRESHOLDS:
            raise RecipeError(f"gates.parity.{dtype}: unknown dtype; allowed: {', '.join(THRESHOLDS)}")
    needs = {"parity": (ValidateStage, "validate"), "max_ttft_ms": (BenchStage, "bench"),
             "max_per_token_ms": (BenchStage, "bench")}
    for key, (cls, kind) in needs.items():
        if getattr(recipe.gates, key) and not any(isinstance(s, cls) for s in recipe.stages):
            raise RecipeError(f"gates.{key}: no {kind} stage measures it; add {{stage: {kind}}} to stages")
    for key in ("max_total_bytes", "max_ttft_ms", "max_per_token_ms"):
        value = getattr(recipe.gates, key)
        if value is not None and value < 0:
            raise RecipeError(f"gates.{key}: {value} is negative")
    return recipe


def _artifact_kinds() -> list[str]:
    return [kind for kind, cls in STAGES.items() if cls in ARTIFACT_STAGES]


def _build(cls, data, where: str):
    """`cls(**data)` with every key and value checked against the dataclass's field types."""
    if not isinstance(data, dict):
        fields = ", ".join(f.name for f in dataclasses.fields(cls))
        raise RecipeError(f"{where or 'recipe'}: expected a mapping of {fields}, got {data!r}")
    hints = typing.get_type_hints(cls)
    allowed = [f.name for f in dataclasses.fields(cls)]
    for key in data:
        if key not in allowed:
            hint = "; latency gates are max_ttft_ms and max_per_token_ms" if cls is Gates and "latency" in str(key) else ""
            raise RecipeError(f"{where or 'recipe'}: unknown key {key!r}; allowed: {', '.join(allowed)}{hint}")
    return cls(**{key: _value(hints[key], value, f"{where}.{key}".lstrip(".")) for key, value in data.items()})


def _stage(data, where: str):
    if not isinstance(data, dict) or "stage" not in data:
        raise RecipeError(f"{where}: expected a mapping with a 'stage' key; allowed stages: {', '.join(STAGES)}")
    kind = data["stage"]
    if kind not in STAGES:
        raise RecipeError(f"{where}.stage: unknown stage {kind!r}; allowed: {', '.join(STAGES)}")
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
            raise RecipeError(f"{where}: expected a list, got {value!r}")
        return tuple(_value(args[0], item, f"{where}[{index}]") for index, item in enumerate(value))
    if origin is dict:
        if not isinstance(value, dict):
            raise RecipeError(f"{where}: expected a mapping, got {value!r}")
        return {str(key): _value(args[1], item, f"{where}.{key}") for key, item in value.items()}
    if dataclasses.is_dataclass(hint):
        return _build(hint, value, where)
    expected = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}[hint]
    # YAML gives bools for yes/no: refuse them where numbers are expected, and ints are valid floats.
    ok = isinstance(value, hint) and not (hint in (int, float) and isinstance(value, bool))
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        value, ok = float(value), True
    if not ok:
        raise RecipeError(f"{where}: expected {expected}, got {value!r}")
    return value
