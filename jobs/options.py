"""Command-line options built from settings models, so each option is declared once.

A `pipeline.config.Settings` field becomes `--field-name` (or the field's own `flag`), with
its help text, its default shown, choices for literals and --x/--no-x for booleans. Values
from the command line override the YAML file's; validation is the model's, and an error
names the flag beside the YAML key. Mistyped flags get a "did you mean".
"""

from __future__ import annotations

import argparse
import difflib
import re
import types
import typing
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel
from pydantic.fields import FieldInfo
from pydantic_core import PydanticUndefined

from pipeline.config import ConfigError, Settings, load_config


class Parser(argparse.ArgumentParser):
    """argparse with exact flags only (no silent abbreviations) and suggestions for typos."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("allow_abbrev", False)
        kwargs.setdefault("formatter_class", argparse.RawDescriptionHelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> typing.NoReturn:
        """One line, exit 2: the problem, a "did you mean" where a close flag or choice exists,
        and where the full usage is (never the 27 lines of usage before the one that matters)."""
        hints = []
        if message.startswith("unrecognized arguments:"):
            known = [s for action in self._actions for s in action.option_strings if s.startswith("--")]
            for word in message.split(":", 1)[1].split():
                if word.startswith("-"):
                    close = difflib.get_close_matches(word.split("=")[0], known, n=1, cutoff=0.6)
                    if close:
                        hints.append(f"{word}: did you mean {close[0]}?")
        choice = re.search(r"invalid choice: '?([^'\s]*)'? \(choose from (.*)\)", message)
        if choice:
            choices = [c.strip(" '\"") for c in choice.group(2).split(",")]
            close = difflib.get_close_matches(choice.group(1), choices, n=1, cutoff=0.5)
            if close:
                hints.append(f"did you mean {close[0]}?")
        if hints:
            message = f"{message} ({'; '.join(hints)})"
        self.exit(2, f"{self.prog}: error: {message}; see {self.prog} --help\n")


def _unwrap(annotation: Any) -> tuple[Any, bool]:
    """(the annotation without Optional/Annotated, whether None is allowed)."""
    optional = False
    while True:
        origin = typing.get_origin(annotation)
        if origin is typing.Annotated:
            annotation = typing.get_args(annotation)[0]
        elif origin in (typing.Union, types.UnionType):
            args = [a for a in typing.get_args(annotation) if a is not type(None)]
            optional = optional or len(args) < len(typing.get_args(annotation))
            annotation = args[0] if len(args) == 1 else annotation
            if len(args) != 1:
                return annotation, optional
        else:
            return annotation, optional


def _is_union(kind: Any) -> bool:
    return typing.get_origin(kind) in (typing.Union, types.UnionType)


def _word_choices(kind: Any) -> list[str] | None:
    """Choices of a union of bool and literals (e.g. `bool | Literal["auto"]`), else None."""
    if not _is_union(kind):
        return None
    words: list[str] = []
    for arg in typing.get_args(kind):
        if arg is bool:
            words += ["true", "false"]
        elif typing.get_origin(arg) is Literal and all(isinstance(v, str) for v in typing.get_args(arg)):
            words += list(typing.get_args(arg))
        else:
            return None
    return words


def _word(text: str) -> Any:
    return {"true": True, "false": False}.get(text.lower(), text)


def _extra(field: FieldInfo) -> dict[str, Any]:
    return field.json_schema_extra if isinstance(field.json_schema_extra, dict) else {}


def cli_fields(model: type[BaseModel], all_fields: bool, prefix: str = "") -> Iterator[tuple[str, FieldInfo]]:
    """(dotted name, field) of every field that has a flag: all leaf fields when `all_fields`,
    else only those declaring one; nested models are walked."""
    for name, field in model.model_fields.items():
        extra = _extra(field)
        dotted = f"{prefix}{name}"
        if extra.get("cli") is False:
            continue
        inner, _ = _unwrap(field.annotation)
        if isinstance(inner, type) and issubclass(inner, BaseModel):
            yield from cli_fields(inner, all_fields, prefix=f"{dotted}.")
        elif (typing.get_origin(inner) is dict or inner is dict
              or (_is_union(inner) and _word_choices(inner) is None)):
            continue  # mappings and unions of shapes are YAML-only
        elif all_fields or extra.get("flag"):
            yield dotted, field


def flag_of(name: str, field: FieldInfo) -> str:
    from pipeline.errors import cli_flag

    return _extra(field).get("flag") or cli_flag(name)


def flags(model: type[BaseModel], all_fields: bool = True) -> dict[str, str]:
    """dotted field name -> its command-line flag."""
    return {name: flag_of(name, field) for name, field in cli_fields(model, all_fields)}


def _default_text(field: FieldInfo) -> str:
    if field.default is PydanticUndefined or field.is_required():
        return ""
    default = field.default
    if default is None:
        return ""
    if isinstance(default, bool):
        return " (default on)" if default else " (default off)"
    if isinstance(default, float) and default >= 1000:
        default = f"{default:,g}"
    elif isinstance(default, int) and not isinstance(default, bool) and default >= 10_000:
        default = f"{default:,}"
    return f" (default {default})"


def add_settings_arguments(parser: argparse.ArgumentParser, model: type[BaseModel], *, all_fields: bool = True,
                           groups: dict[str, str] | None = None) -> None:
    """Add one option per flagged field of `model`; every default is None on the command line
    so that the YAML file (then the model) supplies what the user did not type. `groups`
    (name -> description) orders the --help sections."""
    made: dict[str, argparse._ArgumentGroup] = {
        name: parser.add_argument_group(name, description) for name, description in (groups or {}).items()
    }
    for name, field in cli_fields(model, all_fields):
        extra = _extra(field)
        group_name = extra.get("group") or (name.rsplit(".", 1)[0] if "." in name else None)
        target: Any = parser
        if group_name:
            if group_name not in made:
                made[group_name] = parser.add_argument_group(group_name, (groups or {}).get(group_name))
            target = made[group_name]
        kind, _ = _unwrap(field.annotation)
        help_text = (field.description or "") + _default_text(field)
        kwargs: dict[str, Any] = {"dest": name.replace(".", "__"), "default": None, "help": help_text}
        if kind is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        elif _word_choices(kind) is not None:
            kwargs["choices"] = [_word(w) for w in _word_choices(kind)]
            kwargs["type"] = _word
            kwargs["metavar"] = "{" + ",".join(_word_choices(kind)) + "}"
        else:
            kwargs["metavar"] = extra.get("metavar")
            if typing.get_origin(kind) is Literal:
                kwargs["choices"] = list(typing.get_args(kind))
                kwargs.pop("metavar")
            elif typing.get_origin(kind) in (list, tuple):
                item, _ = _unwrap(typing.get_args(kind)[0])
                kwargs["nargs"] = "+"
                kwargs["type"] = _scalar(item)
            else:
                kwargs["type"] = _scalar(kind)
        target.add_argument(flag_of(name, field), **kwargs)


def _scalar(kind: Any) -> Any:
    if kind in (int, float):
        return kind
    return str  # str, Path and anything else: the model converts and validates


def overrides(args: argparse.Namespace, model: type[BaseModel], *, all_fields: bool = True) -> dict[str, Any]:
    """dotted field -> value the user typed (None when not given)."""
    return {name: getattr(args, name.replace(".", "__"), None) for name, _ in cli_fields(model, all_fields)}


def load_settings(model: type[Settings], args: argparse.Namespace, *, all_fields: bool = True,
                  config: str | Path | None = None, extra: dict[str, Any] | None = None) -> Any:
    """Settings from --config (if any) with the typed flags on top (and `extra`: fields
    without a flag, such as positional arguments); errors name the flag too."""
    source = config if config is not None else getattr(args, "config", None)
    try:
        return load_config(model, source, {**overrides(args, model, all_fields=all_fields), **(extra or {})})
    except ConfigError as error:
        known = flags(model, all_fields=all_fields)
        raise error.with_flag(known.get(re.sub(r"\[\d+\]", "", error.field))) from None
