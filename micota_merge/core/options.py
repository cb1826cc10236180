"""Stage options as one pydantic model per stage: it makes the click flags and reads a `--config` YAML.

Every default, bound and help text lives once, in the model's field; the CLI, the pipeline's typed
sections and the sweep's probe all validate through the same model. The precedence is open-r1's:
model default < the YAML given with `--config` (or a pipeline section) < a flag on the command line.
Flags are generated with a default of None, so "the user typed it" is simply "it is not None".

A field's command-line spelling is tuned with `json_schema_extra=cli(...)`: a short flag, a plain
`--flag` for a bool that is only ever switched on, a parameter type from `PARAM_TYPES`, a metavar; and
`transport=True` marks an option that says how requests travel rather than what is computed (left out
of every "same input" decision, see `transport_fields`).
"""

from __future__ import annotations

import inspect
import types
import typing
from typing import Any, Callable, Literal, Optional

import click
from pydantic import BaseModel, ConfigDict, ValidationError

from micota_merge.core.errors import UserError


def cli(
    *,
    short: Optional[str] = None,
    flag: bool = False,
    type: Optional[str] = None,  # noqa: A002  (click's own word for it)
    metavar: Optional[str] = None,
    transport: bool = False,
    name: Optional[str] = None,
) -> dict:
    """A field's command-line details, for `Field(json_schema_extra=cli(...))`."""
    spec = {
        "short": short,
        "flag": flag,
        "type": type,
        "metavar": metavar,
        "transport": transport,
        "name": name,
    }
    return {"cli": {k: v for k, v in spec.items() if v}}


class StageOptions(BaseModel):
    """The base of every stage's options model: an unknown key is a mistake, named with the closest valid one."""

    model_config = ConfigDict(extra="forbid")


def _spec(field) -> dict:
    extra = field.json_schema_extra
    return dict(extra.get("cli", {})) if isinstance(extra, dict) else {}


class _Backend(click.ParamType):
    """--backend: "auto" or a name in the backend registry (micota_merge.generation.backends), read when the
    option is parsed, so a backend registered by a plugin is a choice too; "hf" passes as transformers."""

    name = "backend"

    def __init__(self, auto: bool = True, remote: bool = True):
        self.auto, self.remote = auto, remote

    def choices(self) -> list[str]:
        from micota_merge.generation import backends

        return (["auto"] if self.auto else []) + backends.names(remote=None if self.remote else False)

    def get_metavar(self, param, ctx=None) -> str:
        return "[" + "|".join(self.choices()) + "]"

    def convert(self, value, param, ctx):
        from micota_merge.generation import backends

        choices = self.choices()
        try:
            name = backends.canonical(value)
        except UserError:
            name = None
        if name not in choices:
            self.fail(f"{value!r} is not one of {', '.join(choices)}", param, ctx)
        return name


class _JsonObject(click.ParamType):
    """A JSON object on the command line: --chat-template-kwargs '{"enable_thinking": false}'."""

    name = "json"

    def convert(self, value, param, ctx):
        import json

        if isinstance(value, dict):
            return value
        try:
            parsed = json.loads(value)
        except ValueError:
            parsed = None
        if not isinstance(parsed, dict):
            self.fail(f"{value!r} is not a JSON object; write it as '{{\"enable_thinking\": false}}'", param, ctx)
        return parsed


# Named parameter types a field may ask for with cli(type=...): made when the flag is made.
PARAM_TYPES: dict[str, Callable[[], click.ParamType]] = {
    "backend": lambda: _Backend(),
    "local-backend": lambda: _Backend(remote=False),
    "json": lambda: _JsonObject(),
}


def template_switches(kwargs: Optional[dict]) -> dict:
    """The switches as an identity or record entry, only when set: results written before the option
    existed (records, caches, checkpoints, runs) keep their identities."""
    return {"chat_template_kwargs": dict(kwargs)} if kwargs else {}


def chat_template_kwargs_field() -> Any:
    """The thinking switch of every stage that applies a chat template (generate and the sweep's probe,
    eval, distill, align): one declaration, so the option reads and means the same everywhere."""
    from pydantic import Field

    return Field(
        default_factory=dict,
        description='Keyword arguments for the chat template, e.g. {"enable_thinking": false} for a hybrid '
        "model's non-thinking mode (Qwen3); passed to local templates, lm-eval and servers alike, and part of "
        "what identifies the result. A prompt the template ends with an empty think block is prompt: never "
        "graded, never trained on.",
        json_schema_extra=cli(type="json", metavar="JSON"),
    )


def _unwrap_optional(ann):
    if typing.get_origin(ann) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(ann) if a is not type(None)]
        if len(args) == 1:
            ann = args[0]
    if typing.get_origin(ann) is typing.Annotated:  # strict.Int / strict.Float: the flag's type is the number's
        ann = typing.get_args(ann)[0]
    return ann


def flag_name(name: str) -> str:
    return "--" + name.replace("_", "-")


def ordered_fields(model: type[BaseModel]) -> list[str]:
    """The model's fields, its own first, then those of each base (shared option groups come last)."""
    order: list[str] = []
    for cls in model.__mro__:
        if not (isinstance(cls, type) and issubclass(cls, BaseModel)):
            continue
        for name in inspect.get_annotations(cls):
            if name in model.model_fields and name not in order:
                order.append(name)
    return order + [n for n in model.model_fields if n not in order]


def default_of(model: type[BaseModel], name: str) -> Any:
    """A field's default: code that must agree with a stage's default reads it here instead of repeating it."""
    return model.model_fields[name].get_default(call_default_factory=True)


def transport_fields(model: type[BaseModel]) -> tuple[str, ...]:
    """Options that say how requests travel (servers, concurrency, replicas), never what is answered."""
    return tuple(n for n, f in model.model_fields.items() if _spec(f).get("transport"))


def _help(field) -> str:
    text = field.description or ""
    if field.is_required():
        return text + "  [required]"
    default = field.get_default(call_default_factory=True)
    if default not in (None, [], (), "") and not _spec(field).get("flag"):
        shown = "on" if default is True else "off" if default is False else default
        text += f"  [default: {shown}]"
    return text


def click_options(model: type[BaseModel], skip: tuple[str, ...] = ()):
    """A decorator adding one click option per field of `model` (bools get --x/--no-x unless cli(flag=True))."""

    def decorate(fn):
        for name in reversed(ordered_fields(model)):
            if name in skip:
                continue
            field = model.model_fields[name]
            spec = _spec(field)
            ann = _unwrap_optional(field.annotation)
            flag = flag_name(spec.get("name", name))
            decls = [flag] + ([spec["short"]] if spec.get("short") else [])
            kw: dict[str, Any] = {"default": None, "help": _help(field)}
            if spec.get("metavar"):
                kw["metavar"] = spec["metavar"]
            if ann is bool and spec.get("flag"):
                kw["is_flag"] = True
            elif ann is bool:
                decls = [f"{flag}/--no-{flag[2:]}"]
            elif spec.get("type"):
                kw["type"] = PARAM_TYPES[spec["type"]]()
            elif typing.get_origin(ann) is Literal:
                kw["type"] = click.Choice([str(a) for a in typing.get_args(ann)])
            elif typing.get_origin(ann) is list:
                kw["multiple"] = True
                kw.setdefault("metavar", "X[,X...]")
                kw["help"] += " (repeat the flag or separate with commas)"
            else:
                kw["type"] = {int: int, float: float}.get(ann, str)
            fn = click.option(*decls, name, **kw)(fn)
        return fn

    return decorate


def _field_error(model: type[BaseModel], e: ValidationError, from_flags: set[str], source: str) -> str:
    """One line: a problem in a flag names the flag, one in the YAML names the file and key."""
    from micota_merge.merge.recipe import format_validation_error

    err = e.errors()[0]
    top = str(err["loc"][0]) if err["loc"] else ""
    if top in from_flags or (not source and top in model.model_fields):
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "missing":
            return f"{flag_name(top)} is required"
        return f"{flag_name(top)}: {msg}"
    msg = format_validation_error(source or "options", e, model)
    for name, field in model.model_fields.items():
        if field.is_required():  # a missing required field is a missing flag for most users
            msg = msg.replace(
                f"{name}: required field is missing", f"{flag_name(name)} is required (or `{name}:` in --config)"
            )
    return msg


def resolve(
    model: type[BaseModel],
    flags: dict[str, Any],
    config_file: str | None = None,
    label: str = "",
    base: Optional[dict[str, Any]] = None,
) -> BaseModel:
    """Build `model` from its defaults, then `base` (a pipeline section), then the YAML `config_file`,
    then the flags that were given; a problem is one UserError line naming the flag or key."""
    from micota_merge.merge.recipe import read_yaml

    values: dict[str, Any] = dict(base or {})
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
    given = set()
    for name, value in flags.items():
        if value is None or (isinstance(value, tuple) and not value):
            continue
        if isinstance(value, tuple):
            value = [part.strip() for v in value for part in str(v).split(",") if part.strip()]
        values[name] = value
        given.add(name)
    try:
        return model.model_validate(values)
    except ValidationError as e:
        raise UserError(_field_error(model, e, given, source)) from None


# Dtype names, once: what merged weights may be written in, and what a model may be loaded in.
WeightDtype = Literal["float32", "float16", "bfloat16"]
ModelDtype = Literal["auto", "bfloat16", "float16", "float32"]
WEIGHT_DTYPES: tuple[str, ...] = typing.get_args(WeightDtype)
MODEL_DTYPES: tuple[str, ...] = typing.get_args(ModelDtype)
