"""Build recipes: the typed schema of `pgexport build RECIPE.yaml`, validated before any work.

A recipe is serialized dataclasses: each stage is `stage` (its kind), `name` (its folder in the
build, default the kind), where it reads from (`input` or `artifacts`), and the fields of the
kind's config (pgexport.config: the same names, defaults and ranges as the CLI's options and the
Python API's keywords). Every error names the key and the allowed values.

    checkpoint: null              # local folder or hub id; null: the demo model in the package
    allow_pickle: false
    output: out/build             # `pgexport build -o` overrides it
    stages:                       # run in this order
      - {stage: onnx, validate: false}                        # fp32 graphs of the checkpoint
      - {stage: quantize, name: q4, input: onnx, methods: [q4], validate: false}
      - {stage: coreml, name: coreml-int4, compress: int4}
      - {stage: distill, name: student, epochs: 1}            # a smaller checkpoint
      - {stage: onnx, name: student-onnx, input: student, int8: true}
      - {stage: validate}                      # parity of every ONNX artifact above, against its checkpoint
      - {stage: bench, batches: [1]}           # latency on this machine
      - {stage: verify}                        # every file of the build against manifest.json
    gates:
      max_total_bytes: 100000000
      parity: {int8: {min_token_agreement: 0.75}}   # per dtype; unset fields keep pgexport's defaults
      max_per_token_ms: 50                     # and max_ttft_ms: medians, every benchmarked row

`input`: onnx, coreml and distill read a checkpoint (the recipe's, or a distill stage's student);
quantize reads an ONNX artifact (default: the nearest onnx stage before it, so each variant is made
from the fp32 export; name a quantize stage to add to its variants).
`artifacts`: the stages validate and bench measure (default: every ONNX artifact before them).

Every number has a sane range (its field's `bounds`; NaN and infinities are in none), and YAML
anchors and aliases are refused: a recipe never needs them, and a few hundred bytes of nested
aliases expand to gigabytes. A new stage kind is one config in pgexport.config, one entry in
STAGES, and one runner in pgexport.build.runners.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
import reprlib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from pgexport.config import (
    BenchConfig, CoremlConfig, DistillConfig, ExportConfig, QuantizeConfig, ValidateConfig, VerifyConfig, in_bounds, option,
    option_fields, options_of, shown_bounds,
)
from pgexport.config import check as check_config
from pgexport.errors import BadInputError, UnsupportedError

NAME = re.compile(r"^[a-z0-9][a-z0-9_.-]*$")
RESERVED_NAMES = {"stages", "manifest.json"}  # the build folder's own entries
MAX_RECIPE_BYTES = 1 << 20
MAX_DEPTH = 16  # of nested lists and mappings (a recipe needs 4)


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


# kind -> config. The one name -> thing map; pgexport.build.runners runs each kind (tests cover every entry).
STAGES = {"onnx": ExportConfig, "quantize": QuantizeConfig, "coreml": CoremlConfig, "distill": DistillConfig,
          "validate": ValidateConfig, "bench": BenchConfig, "verify": VerifyConfig}
CHECKPOINT_READERS = ("onnx", "coreml", "distill")  # `input`: the recipe's checkpoint or a distill stage
ARTIFACT_READERS = ("quantize",)  # `input`: an ONNX artifact stage
CHECKS = ("validate", "bench")  # `artifacts`: the stages they measure
ONNX_ARTIFACTS = ("onnx", "quantize")  # stages whose output is an ONNX artifact
ARTIFACTS = (*ONNX_ARTIFACTS, "coreml", "distill")  # stages whose output is a folder another stage reads


@dataclass(frozen=True)
class Stage:
    """One stage of a recipe: its kind, its folder name, where it reads from, and its config."""

    kind: str
    name: str
    config: object
    input: str | None = None  # CHECKPOINT_READERS: a distill stage (None: the recipe's checkpoint); quantize: an ONNX artifact stage
    artifacts: tuple[str, ...] = ()  # CHECKS: the stages measured (empty: every ONNX artifact stage before)

    def to_dict(self) -> dict:
        """The stage as a recipe writes it, every default filled in."""
        entry = {"stage": self.kind, "name": self.name}
        if self.kind not in CHECKS and self.kind != "verify":
            entry["input"] = self.input
        if self.kind in CHECKS:
            entry["artifacts"] = list(self.artifacts)
        return {**entry, **options_of(self.config)}


def stage(kind: str, name: str | None = None, input: str | None = None, artifacts=(), **options) -> Stage:
    """A Stage from Python: `stage("quantize", "q4", input="onnx", methods=("q4",))`."""
    return Stage(kind, name or kind, STAGES[kind](**options), input, tuple(artifacts))


@dataclass(frozen=True)
class ParityGate:
    """Overrides of one dtype's parity thresholds (pgexport.validate.Thresholds); None keeps the default."""

    max_rel_diff: float | None = option(None, "max |logit difference| over the reference range", bounds=(0, 1))
    min_cosine: float | None = option(None, "least logit cosine", bounds=(-1, 1))
    min_token_agreement: float | None = option(None, "least greedy-token agreement", bounds=(0, 1))
    max_exact_match_drop: float | None = option(None, "most held-out exact-match drop, in points", bounds=(0, 100))


@dataclass(frozen=True)
class Gates:
    """What a build must meet to exit 0."""

    max_total_bytes: int | None = option(None, "every file the build folder lists", bounds=(1, 10**13))
    parity: dict[str, ParityGate] = field(default_factory=dict)  # dtype -> thresholds (validate stage)
    max_ttft_ms: float | None = option(None, "median time to first token, every benchmarked row (bench stage)",
                                       bounds=(0, 3_600_000))
    max_per_token_ms: float | None = option(None, "median time per output token, every benchmarked row (bench stage)",
                                            bounds=(0, 3_600_000))


DEFAULT_STAGES = (Stage("onnx", "onnx", ExportConfig(validate=False)), Stage("validate", "validate", ValidateConfig()),
                  Stage("verify", "verify", VerifyConfig()))


@dataclass(frozen=True)
class Recipe:
    checkpoint: str | None = None
    allow_pickle: bool = False
    output: str = "out/build"
    stages: tuple[Stage, ...] = DEFAULT_STAGES
    gates: Gates = field(default_factory=Gates)

    def to_dict(self) -> dict:
        """The resolved recipe, every default filled in: written into the build manifest."""
        return {"checkpoint": self.checkpoint, "allow_pickle": self.allow_pickle, "output": self.output,
                "stages": [stage.to_dict() for stage in self.stages], "gates": dataclasses.asdict(self.gates)}

    def named(self, name: str) -> Stage:
        return next(stage for stage in self.stages if stage.name == name)


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
        if data is None:  # an empty file is a mistake, not a request for the default recipe
            raise RecipeError("the recipe is empty: name its stages (see examples/recipes/demo.yaml)")
        return check_recipe(_build(Recipe, data, ""))
    except yaml.YAMLError as error:
        raise RecipeError(f"{path}: not valid YAML: {_yaml_problem(error)}") from None
    except RecipeError as error:
        raise RecipeError(f"{path}: {error}") from None


def _yaml_problem(error: yaml.YAMLError) -> str:
    mark = getattr(error, "problem_mark", None)
    problem = getattr(error, "problem", None) or str(error).splitlines()[0]
    return f"line {mark.line + 1}: {problem}" if mark else problem


def check_recipe(recipe: Recipe) -> Recipe:
    """Cross-field rules: unique names, what each stage reads exists before it, gates that have a
    stage to decide them."""
    from pgexport.validate import THRESHOLDS

    kinds: dict[str, str] = {}  # name -> kind, of the stages so far
    resolved = list(recipe.stages)
    if not recipe.stages:
        raise RecipeError(f"stages: empty; allowed stages: {', '.join(STAGES)}")
    for index, stage in enumerate(recipe.stages):
        where = f"stages[{index}]"
        if not NAME.match(stage.name) or stage.name in RESERVED_NAMES:
            raise RecipeError(
                f"{where}.name: {shown(stage.name)} is not a folder name pgexport can use "
                f"(lowercase letters, digits, '_', '-', '.'; not {', '.join(sorted(RESERVED_NAMES))})"
            )
        if stage.name in kinds:
            raise RecipeError(f"{where}.name: {shown(stage.name)} is used twice; each stage needs its own name")
        _check_config(stage.config, where)
        _check_reads(stage, kinds, where)
        if stage.kind in ARTIFACT_READERS and stage.input is None:  # the nearest export before it
            stage = dataclasses.replace(stage, input=[n for n, k in kinds.items() if k == "onnx"][-1])
            resolved[index] = stage
        if stage.kind == "verify" and index != len(recipe.stages) - 1:
            raise RecipeError(f"{where}: verify checks the finished build folder, so it must be the last stage")
        kinds[stage.name] = stage.kind
    for dtype, gate in recipe.gates.parity.items():
        if dtype not in THRESHOLDS:
            raise RecipeError(f"gates.parity.{_key(dtype)}: unknown dtype; allowed: {', '.join(THRESHOLDS)}")
        _check_config(gate, f"gates.parity.{dtype}")
    _check_config(recipe.gates, "gates")
    needs = {"parity": "validate", "max_ttft_ms": "bench", "max_per_token_ms": "bench"}
    for key, kind in needs.items():
        if getattr(recipe.gates, key) and not any(s.kind == kind for s in recipe.stages):
            raise RecipeError(f"gates.{key}: no {kind} stage measures it; add {{stage: {kind}}} to stages")
    return dataclasses.replace(recipe, stages=tuple(resolved))


def _check_reads(stage: Stage, kinds: dict[str, str], where: str) -> None:
    """`input` and `artifacts` name earlier stages of the right kind."""
    before = lambda allowed: [name for name, kind in kinds.items() if kind in allowed]  # noqa: E731
    if stage.kind in CHECKPOINT_READERS and stage.input is not None and kinds.get(stage.input) != "distill":
        raise RecipeError(f"{where}.input: {shown(stage.input)} is not a distill stage before it; allowed: "
                          f"{before(('distill',)) or 'none'} (or leave it out: the recipe's checkpoint)")
    if stage.kind in ARTIFACT_READERS:
        if not before(("onnx",)):
            raise RecipeError(f"{where}: {stage.kind} needs an onnx stage before it")
        if stage.input is not None and kinds.get(stage.input) not in ONNX_ARTIFACTS:
            raise RecipeError(f"{where}.input: {shown(stage.input)} is not an ONNX artifact stage before it; "
                              f"allowed: {before(ONNX_ARTIFACTS)}")
    if stage.kind in CHECKS:
        allowed = before(ONNX_ARTIFACTS + (("coreml",) if stage.kind == "validate" else ()))
        if not before(ONNX_ARTIFACTS) and not stage.artifacts:
            raise RecipeError(f"{where}: {stage.kind} needs an artifact stage ({', '.join(ONNX_ARTIFACTS)}) before it")
        unknown = [name for name in stage.artifacts if name not in allowed]
        if unknown:
            raise RecipeError(f"{where}.artifacts: {unknown} are not artifact stages before it; allowed: {allowed}")


def _check_config(options, where: str) -> None:
    """Choices and ranges of one dataclass (a stage's config, the gates, a parity gate)."""
    for f in dataclasses.fields(options):
        value, bounds = getattr(options, f.name), f.metadata.get("bounds")
        values = value if isinstance(value, (tuple, list)) else (value,)
        if bounds and any(item is not None and not in_bounds(item, bounds) for item in values):
            raise RecipeError(f"{where}.{f.name}: {shown(list(value) if isinstance(value, tuple) else value)} "
                              f"is out of range {shown_bounds(bounds)}")
    try:
        check_config(options)
    except BadInputError as error:
        raise RecipeError(f"{where}: {error}") from None


def did_you_mean(key, cls, allowed: list[str]) -> str:
    """" (did you mean 'x'?)" for a key written as the CLI spells an option (`method` for `methods`,
    `eval-file` for `eval_file`) or close to an allowed one; "" when nothing is near."""
    if not isinstance(key, str):
        return ""
    spelled = {f.metadata["flag"].lstrip("-").replace("-", "_"): f.name
               for f in dataclasses.fields(cls) if f.metadata.get("flag")}
    key = key.lstrip("-").replace("-", "_")
    match = spelled.get(key) or (key if key in allowed else None) or next(iter(difflib.get_close_matches(key, allowed, 1)), None)
    return f" (did you mean {match!r}?)" if match else ""


def _build(cls, data, where: str, exclude: tuple[str, ...] = ()):
    """`cls(**data)` with every key and value checked against the dataclass's field types."""
    allowed = [f.name for f in dataclasses.fields(cls) if not f.metadata.get("internal") and f.name not in exclude]
    if not isinstance(data, dict):
        raise RecipeError(f"{where or 'recipe'}: expected a mapping of {', '.join(allowed)}, got {shown(data)}")
    hints = typing.get_type_hints(cls)
    for key in data:
        if key not in allowed:
            raise RecipeError(f"{where or 'recipe'}: unknown key {shown(key)}{did_you_mean(key, cls, allowed)}; "
                              f"allowed: {', '.join(allowed)}")
    values = {key: _value(hints[key], value, f"{where}.{key}".lstrip(".")) for key, value in data.items()}
    try:
        return cls(**values)
    except (BadInputError, UnsupportedError) as error:  # a rule across fields (a block size that is not a power of two)
        raise RecipeError(f"{where or 'recipe'}: {error}") from None


def _stage(data, where: str) -> Stage:
    if not isinstance(data, dict) or "stage" not in data:
        raise RecipeError(f"{where}: expected a mapping with a 'stage' key; allowed stages: {', '.join(STAGES)}")
    kind = data["stage"]
    if not isinstance(kind, str) or kind not in STAGES:
        raise RecipeError(f"{where}.stage: unknown stage {shown(kind)}; allowed: {', '.join(STAGES)}")
    reads = ("artifacts",) if kind in CHECKS else () if kind == "verify" else ("input",)
    options = {key: value for key, value in data.items() if key not in ("stage", "name", *reads)}
    known = {f.name for f in dataclasses.fields(STAGES[kind])}
    unknown = [key for key in options if key not in known]
    if unknown:
        allowed = ["name", *reads, *(f.name for f in option_fields(STAGES[kind]))]
        raise RecipeError(f"{where}: unknown key {shown(unknown[0])}{did_you_mean(unknown[0], STAGES[kind], allowed)}; "
                          f"allowed: {', '.join(allowed)}")
    name = _value(str, data.get("name", kind), f"{where}.name")
    source = data.get("input")
    if source is not None:
        source = _value(str, source, f"{where}.input")
    artifacts = _value(tuple[str, ...], data.get("artifacts", []), f"{where}.artifacts")
    return Stage(kind, name, _build(STAGES[kind], options, where), source, artifacts)


def _value(hint, value, where: str):
    """Check one value against a field's type hint and convert lists to tuples (for tuple fields)."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if type(None) in args and value is None:
            return None
        options = [arg for arg in args if arg is not type(None)]
        if options == [Stage]:
            return _stage(value, where)
        return _value(options[0], value, where)
    if hint is Stage:
        return _stage(value, where)
    if origin in (tuple, list):
        if not isinstance(value, list):
            raise RecipeError(f"{where}: expected a list, got {shown(value)}")
        return origin(_value(args[0], item, f"{where}[{index}]") for index, item in enumerate(value))
    if origin is dict or hint is dict:
        if not isinstance(value, dict):
            raise RecipeError(f"{where}: expected a mapping, got {shown(value)}")
        return {str(key): _value(args[1], item, f"{where}.{_key(key)}") for key, item in value.items()} if args else value
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
