"""YAML configs as typed dataclasses, validated before any work starts.

Every job's config is a dataclass; `parse_config` turns a YAML mapping into it and every
error names the offending field by its dotted path (`sweep.sigmas[1]`), because a typo
found after an hour of certification is an hour lost.
"""

from __future__ import annotations

import dataclasses
import types
from pathlib import Path
from typing import Any, Literal, TypeVar, Union, get_args, get_origin, get_type_hints

import yaml

T = TypeVar("T")


class ConfigError(ValueError):
    """A bad config value; `field` is its dotted path."""

    def __init__(self, field: str, message: str) -> None:
        self.field = field
        self.message = message
        super().__init__(f"config field '{field}': {message}" if field else message)


def _join(path: str, key: str | int) -> str:
    if isinstance(key, int):
        return f"{path}[{key}]"
    return f"{path}.{key}" if path else key


def _coerce(value: Any, hint: Any, path: str) -> Any:
    origin = get_origin(hint)
    if hint is Any:
        return value
    if origin in (Union, types.UnionType):
        options = get_args(hint)
        if value is None:
            if type(None) in options:
                return None
            raise ConfigError(path, "must not be empty")
        errors = []
        for option in (o for o in options if o is not type(None)):
            try:
                return _coerce(value, option, path)
            except ConfigError as error:
                errors.append(str(error))
        raise ConfigError(path, f"{value!r} fits none of the allowed types ({'; '.join(errors)})")
    if origin is Literal:
        if value not in get_args(hint):
            raise ConfigError(path, f"{value!r} is not one of {list(get_args(hint))}")
        return value
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            value = [value]  # a scalar where a list is expected means a one-element list
        (item_hint, *_) = get_args(hint) or (Any,)
        return [_coerce(item, item_hint, _join(path, i)) for i, item in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(path, f"must be a mapping, got {type(value).__name__}")
        _, value_hint = get_args(hint) or (Any, Any)
        return {key: _coerce(item, value_hint, _join(path, str(key))) for key, item in value.items()}
    if dataclasses.is_dataclass(hint):
        return parse_config(hint, value, path)
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(path, f"must be true or false, got {value!r}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(path, f"must be an integer, got {value!r}")
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(path, f"must be a number, got {value!r}")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise ConfigError(path, f"must be a string, got {value!r}")
        return value
    if hint is Path:
        if not isinstance(value, (str, Path)):
            raise ConfigError(path, f"must be a path, got {value!r}")
        return Path(value)
    return value


def parse_config(cls: type[T], data: Any, path: str = "") -> T:
    """Build dataclass `cls` from a mapping; unknown, missing and mistyped fields are errors.

    After construction the dataclass's own `validate()` (if any) checks value ranges.
    """
    if isinstance(data, cls):
        return data
    if not isinstance(data, dict):
        raise ConfigError(path, f"must be a mapping, got {type(data).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ConfigError(_join(path, unknown[0]), f"unknown field (known: {', '.join(sorted(fields))})")
    hints = get_type_hints(cls)
    values = {}
    for name, field in fields.items():
        if name in data:
            values[name] = _coerce(data[name], hints[name], _join(path, name))
        elif field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING:
            raise ConfigError(_join(path, name), "is required")
    config = cls(**values)
    validate = getattr(config, "validate", None)
    if validate is not None:
        try:
            validate()  # raises ConfigError(field relative to this dataclass, message)
        except ConfigError as error:
            if not path:
                raise
            raise ConfigError(_join(path, error.field), error.message) from None
    return config


def read_yaml_mapping(path: str | Path) -> dict:
    """A YAML file's top-level mapping; a missing, invalid or non-mapping file is a ConfigError."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError("", f"config file {path} does not exist")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as error:
        raise ConfigError("", f"config file {path} is not valid YAML: {error}") from None
    if not isinstance(data, dict):
        raise ConfigError("", f"config file {path} must hold a mapping of fields")
    return data


def load_config(cls: type[T], source: str | Path | dict, overrides: dict | None = None) -> T:
    """Parse a YAML file (or an already-loaded mapping), with command-line overrides on top."""
    data = dict(source) if isinstance(source, dict) else read_yaml_mapping(source)
    data.update({key: value for key, value in (overrides or {}).items() if value is not None})
    return parse_config(cls, data)


def to_dict(config: Any) -> dict:
    """A plain, YAML/JSON-able dict of a config (paths as strings)."""

    def plain(value: Any) -> Any:
        if dataclasses.is_dataclass(value):
            return {f.name: plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
        if isinstance(value, (list, tuple)):
            return [plain(v) for v in value]
        if isinstance(value, dict):
            return {k: plain(v) for k, v in value.items()}
        if isinstance(value, Path):
            return str(value)
        return value

    return plain(config)


