"""Every stage's options are declared once (pgexport.config): the CLI command, the Python function
and the recipe stage accept the same options with the same defaults."""

import dataclasses
import inspect

import pytest

from pgexport.cli import main
from pgexport.config import make, options_of
from pgexport.recipe import STAGES, load_recipe

# Options of one invocation, not of the stage: where to write, overwrite, pickles, output format.
RUN_OPTIONS = {"model", "artifact", "targets", "teacher", "output", "force", "allow_pickle", "as_json", "json_path",
               "markdown_path", "plot_path", "stop_after", "resume"}


def api(kind):
    from pgexport.bench import bench
    from pgexport.coreml.convert import to_coreml
    from pgexport.distill.train import distill
    from pgexport.manifest import verify
    from pgexport.pipeline import export_onnx, quantize_artifact
    from pgexport.validate import validate_artifact

    return {"onnx": export_onnx, "quantize": quantize_artifact, "coreml": to_coreml, "distill": distill,
            "validate": validate_artifact, "bench": bench, "verify": verify}[kind]


def options(cls):
    return [f for f in dataclasses.fields(cls) if not f.metadata.get("internal")]


# The fewest arguments each command parses with: its defaults are what it then receives.
REQUIRED_ARGS = {"quantize": ["a", "-o", "b"], "validate": ["a"], "bench": ["t"], "verify": ["a"]}


def cli_values(kind: str) -> dict:
    """The values a command's function receives when no option is given."""
    command = main.commands[kind]
    with command.make_context(kind, list(REQUIRED_ARGS.get(kind, []))) as ctx:
        return dict(ctx.params)


def test_every_kind_has_a_command_and_a_function():
    assert set(STAGES) == {"onnx", "quantize", "coreml", "distill", "validate", "bench", "verify"}
    for kind in STAGES:
        assert kind in main.commands, kind
        assert callable(api(kind))


@pytest.mark.parametrize("kind", sorted(STAGES))
def test_cli_options_are_the_config_fields_with_its_defaults(kind):
    cls = STAGES[kind]
    values = {name: value for name, value in cli_values(kind).items() if name not in RUN_OPTIONS}
    assert set(values) == {f.name for f in options(cls)}, "CLI options that are not config fields, or missing ones"
    for f in options(cls):
        default, expected = values[f.name], f.default
        if isinstance(expected, (tuple, list)) or isinstance(default, (tuple, list)):
            default, expected = tuple(default or ()), tuple(expected or ())
        assert default == expected, f"--{f.name}: CLI default {default!r} != config default {expected!r}"


@pytest.mark.parametrize("kind", sorted(STAGES))
def test_python_api_takes_the_config_or_its_fields(kind):
    cls = STAGES[kind]
    signature = inspect.signature(api(kind))
    if not options(cls):  # verify: no options
        assert "config" not in signature.parameters
        return
    assert "config" in signature.parameters, f"{api(kind).__name__} takes no config"
    assert any(p.kind is p.VAR_KEYWORD for p in signature.parameters.values()), f"{api(kind).__name__} takes no **options"
    defaults = {f.name: f.default for f in options(cls)}
    assert make(cls, None, **defaults) == cls()  # keywords build the same config as the defaults
    with pytest.raises(TypeError):
        make(cls, None, not_an_option=1)


@pytest.mark.parametrize("kind", sorted(STAGES))
def test_recipe_stage_is_the_serialized_config(kind):
    cls = STAGES[kind]
    stages = [{"stage": "onnx"}] if kind in ("quantize", "validate", "bench") else []
    given = {f.name: options_of(cls()).get(f.name) for f in options(cls)}
    recipe = load_recipe({"stages": [*stages, {"stage": kind, "name": "x", **given}]})
    assert recipe.stages[-1].config == cls()
    written = recipe.stages[-1].to_dict()
    assert {k: v for k, v in written.items() if k not in ("stage", "name", "input", "artifacts")} == given
    # and every option not given keeps the same default
    assert load_recipe({"stages": [*stages, {"stage": kind, "name": "x"}]}).stages[-1].config == cls()
