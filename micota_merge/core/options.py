"""Stage options as one pydantic model: it makes the click flags and reads a `--config` YAML.

Every default lives once, in the model. The precedence is open-r1's: model default < the
YAML given with `--config` < a flag on the command line. Flags are generated with a default
of None, so "the user typed it" is simply "it is not None".
"""

from __future__ import annotations

import types
import typing
from typing import Any, Literal

import click
from pydantic import BaseModel, ValidationError

from micota_merge.core.errors import UserError


def _unwrap_optional(ann):
    if typing.get_origin(ann) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(ann) if a is not type(None)]
        if len(args) == 1:
            ann = args[0]
    if typing.get_origin(ann) is typing.Annotated:  # strict.Int / strict.Float: the flag's type is the number's
        ann = typing.get_args(ann)[0]
    return ann


def _flag_name(name: str) -> str:
    return "--" + name.replace("_", "-")


def click_options(model: type[BaseModel], skip: tuple[str, ...] = ()):
    """A decorator adding one click option per field of `model` (bools get --x/--no-x)."""

    def decorate(fn):
        for name, field in reversed(list(model.model_fields.items())):
            if name in skip:
                continue
            ann = _unwrap_optional(field.annotation)
            help_text = field.description or ""
            if not field.is_required() and field.default not in (None, [], ()):
                default = field.default
                shown = "on" if default is True else "off" if default is False else default
                help_text += f"  [default: {shown}]"
            elif field.is_required():
                help_text += "  [required, here or in --config]"
            flag = _flag_name(name)
            if ann is bool:
                opt = click.option(f"{flag}/--no-{flag[2:]}", name, default=None, help=help_text)
            elif typing.get_origin(ann) is Literal:
                opt = click.option(
                    flag, name, type=click.Choice([str(a) for a in typing.get_args(ann)]), default=None, help=help_text
                )
            elif typing.get_origin(ann) is list:
                opt = click.option(
                    flag,
                    name,
                    multiple=True,
                    default=None,
                    metavar="FILE[,FILE...]",
                    help=help_text + " (repeat the flag or separate with commas)",
                )
            else:
                typ = {int: int, float: float}.get(ann, str)
                opt = click.option(flag, name, type=typ, default=None, help=help_text)
            fn = opt(fn)
        return fn

    return decorate


def resolve(
    model: type[BaseModel], flags: dict[str, Any], config_file: str | None = None, label: str = "options"
) -> BaseModel:
    """Build `model` from defaults, then the YAML `config_file`, then the flags that were given."""
    from micota_merge.merge.recipe import format_validation_error, read_yaml

    values: dict[str, Any] = {}
    source = label
    if config_file:
        data = read_yaml(config_file)
        if data is None:
            data = {}
        if not isinstance(data, dict):
            raise UserError(f"{config_file}: a config is a YAML mapping of option names to values")
        # Recipes may spell keys like the flags (max-length) or like the fields (max_length).
        values.update({str(k).replace("-", "_"): v for k, v in data.items()})
        source = f"{config_file} (+ command-line flags)"
    for name, value in flags.items():
        if value is None or (isinstance(value, tuple) and not value):
            continue
        if isinstance(value, tuple):
            value = [part.strip() for v in value for part in str(v).split(",") if part.strip()]
        values[name] = value
    try:
        return model.model_validate(values)
    except ValidationError as e:
        msg = format_validation_error(source, e, model)
        # A missing required field is a missing flag for most users: name both ways to give it.
        for name, field in model.model_fields.items():
            if field.is_required():
                msg = msg.replace(
                    f"{name}: required field is missing", f"{_flag_name(name)} is required (or `{name}:` in --config)"
                )
        raise UserError(msg) from None
