"""A command's click options, made from its stage config (pgexport.config): the option names,
defaults, help, choices and ranges are the config's fields, so the CLI cannot drift from the
Python API or from recipes."""

from __future__ import annotations

import dataclasses
import types
import typing
from pathlib import Path

import click

from pgexport.config import INPUT_OPTIONS, is_power_of_two, option_fields, shown_bounds


class CommaList(click.ParamType):
    """`1,4` -> (1, 4): a list given as one comma-separated value."""

    name = "list"

    def __init__(self, item: type, choices=None, bounds=None, container: type = tuple):
        self.item, self.choices, self.bounds, self.container = item, choices, bounds, container

    def convert(self, value, param, ctx):
        if isinstance(value, (tuple, list)):
            return self.container(value)
        try:
            items = self.container(self.item(part.strip()) for part in str(value).split(",") if part.strip())
        except ValueError:
            kind = "integers" if self.item is int else "values"
            self.fail(f"{value!r}: expected comma-separated {kind}", param, ctx)
        for item in items:
            if self.choices and item not in self.choices:
                self.fail(f"{item!r} is not one of {', '.join(self.choices)}", param, ctx)
            if self.bounds and not (self.bounds[0] <= item <= self.bounds[1]):
                self.fail(f"{item} is not in the range {shown_bounds(self.bounds)}", param, ctx)
        return items


class PowerOfTwo(click.IntRange):
    """An int in a range that must also be a power of two: refused by click (exit 2) like one out of range."""

    name = "power of two"

    def convert(self, value, param, ctx):
        number = super().convert(value, param, ctx)
        if not is_power_of_two(number):
            self.fail(f"{number} is not a power of two", param, ctx)
        return number


def _base(hint):
    """int for `int | None`, (tuple, int) for `tuple[int, ...]`..."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        hint = next(arg for arg in typing.get_args(hint) if arg is not type(None))
    if typing.get_origin(hint) in (tuple, list):
        return typing.get_origin(hint), typing.get_args(hint)[0]
    return None, hint


def _click_option(f: dataclasses.Field, hint):
    meta, container, item = f.metadata, *_base(hint)
    flag = meta.get("flag") or "--" + f.name.replace("_", "-")
    help_text, choices, bounds = meta["help"], meta.get("choices"), meta.get("bounds")
    if item is bool:
        if f.default:
            return click.option(f"{flag}/--no-{flag[2:]}", f.name, default=True, show_default=True, help=help_text)
        return click.option(flag, f.name, is_flag=True, help=help_text)
    if container and meta.get("comma"):
        default = ",".join(map(str, f.default)) if f.default else None
        return click.option(flag, f.name, type=CommaList(item, choices, bounds, container), default=default,
                            show_default=default is not None, help=help_text)
    if choices:
        kind = click.Choice(choices)
    elif bounds and item is int and meta.get("power_of_two"):
        kind = PowerOfTwo(*bounds)
    elif bounds and item is int:
        kind = click.IntRange(*bounds)
    elif bounds and item is float:
        kind = click.FloatRange(*bounds)
    elif item is str and f.name in INPUT_OPTIONS:  # a path, or for `reference` a hub id: any string
        kind = click.Path(path_type=str)
    else:
        kind = item
    if container:
        return click.option(flag, f.name, type=kind, multiple=True, help=help_text)
    return click.option(flag, f.name, type=kind, default=f.default, show_default=f.default is not None, help=help_text)


def cli_options(cls, skip: tuple[str, ...] = ()):
    """A decorator adding one click option per field of the config class `cls` (its own fields
    first, then inherited ones), each passed to the command under the field's name."""
    fields = [f for f in option_fields(cls) if f.metadata.get("cli", True) and f.name not in skip]
    field_hints = typing.get_type_hints(cls)

    def decorate(command):
        for f in reversed(fields):
            command = _click_option(f, field_hints[f.name])(command)
        return command

    return decorate


def config_from(cls, options: dict):
    """Pop `cls`'s fields out of a command's keyword arguments and build the config (None -> default
    for optional lists, so `--dtype` left out means the config's default)."""
    values = {}
    for f in dataclasses.fields(cls):
        if f.name in options and not f.metadata.get("internal"):
            value = options.pop(f.name)
            if isinstance(value, Path):
                value = str(value)
            if isinstance(value, tuple) and not value and f.default is None:
                value = None
            values[f.name] = value
    return cls(**values)


def run_options(pickle: str = "weights. Never runs remote code"):
    """--force, --allow-pickle and --json: the options of one invocation the onnx, quantize and
    coreml commands take."""
    options = [
        click.option("--force", is_flag=True, help="Replace an existing output folder (only once the new one is complete)."),
        click.option("--allow-pickle", is_flag=True, help=f"Allow non-safetensors (pickle) {pickle}."),
        click.option("--json", "as_json", is_flag=True, help="Print the manifest as JSON instead of tables."),
    ]

    def decorate(command):
        for option in reversed(options):
            command = option(command)
        return command

    return decorate


def reads_checkpoint(default_output: str, output_help: str, name: str = "model"):
    """MODEL (a checkpoint folder or hub id; omitted: the demo model) and -o/--output: how every
    command that starts from a checkpoint (onnx, coreml, distill) takes its input and output."""
    argument = click.argument(name, required=False)
    output = click.option("-o", "--output", type=click.Path(path_type=Path), default=Path(default_output),
                          show_default=True, help=output_help)
    return lambda command: argument(output(command))
