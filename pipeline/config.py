"""Settings: every option declared once, as a typed pydantic field with its help text.

A job's settings are a `Settings` model. Each field carries its type, default, range
(pydantic constraints) and help (`description`), so the YAML key, the command-line flag
(`jobs/options.py` builds argparse options from the fields) and the validation message all
come from one declaration. Values a user gives are checked before any work starts, and
every error names its field by dotted path (`sweep.sigmas[1]`), with a "did you mean"
for unknown keys: a typo found after an hour of certification is an hour lost.

Settings shared by several jobs (the noise level, the sample counts, the data selection)
are declared once here or in the job-independent modules, as annotated types.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar

import yaml
from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, TypeAdapter, ValidationError

T = TypeVar("T", bound="Settings")


class ConfigError(ValueError):
    """A bad setting; `field` is its dotted path, `flag` its command-line flag when known."""

    def __init__(self, field: str, message: str, flag: str | None = None) -> None:
        self.field = field
        self.message = message
        self.flag = flag
        where = f"config field '{field}': " if field else ""
        super().__init__(f"{where}{message}" + (f" ({flag})" if flag else ""))

    def with_flag(self, flag: str | None) -> ConfigError:
        return ConfigError(self.field, self.message, flag) if flag and not self.flag else self


class Settings(BaseModel):
    """Base of every job's settings: unknown keys are errors, assignments are validated."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, validate_default=False)


def option(default: Any = ..., *, help: str | None = None, flag: str | None = None, group: str | None = None,
           metavar: str | None = None, cli: bool = True, **constraints: Any) -> Any:
    """A settings field: `help` is its help text (default: the annotated type's description);
    `flag` overrides the command-line flag (default: --field-name); `cli=False` keeps a field
    YAML-only; `group` is its section in --help."""
    extra = {"flag": flag, "group": group, "metavar": metavar, "cli": cli}
    if help is not None:
        constraints["description"] = help
    schema_extra = {k: v for k, v in extra.items() if v is not None}
    if "default_factory" in constraints:
        return Field(json_schema_extra=schema_extra, **constraints)
    return Field(default, json_schema_extra=schema_extra, **constraints)


def _none_words(value: Any) -> Any:
    """'none' / 'null' / '' on a command line mean "no file" (e.g. --denoiser none)."""
    if isinstance(value, str) and value.strip().lower() in ("none", "null", ""):
        return None
    return value


def _path_text(value: Any) -> Any:
    import os

    return os.fspath(value) if isinstance(value, os.PathLike) else value


# The object stores a location may name (`pipeline.runs.fs.Location` opens them).
STORAGE_SCHEMES = ("s3", "gs", "gcs")


def location_problem(text: str) -> str | None:
    """Why `text` names no usable location (an unknown scheme, no bucket), or None: checked
    here for every setting that takes one, and by `Location.of` for every path it opens."""
    if "://" not in text or text.startswith("file://"):
        return None
    scheme, rest = text.split("://", 1)
    if scheme.lower() not in STORAGE_SCHEMES:
        return f"unknown storage scheme {scheme.lower()!r} in {text}: use a local path, s3://bucket/... or gs://bucket/..."
    if not rest.strip("/"):
        return f"{text}: no bucket given"
    return None


def _known_scheme(value: str) -> str:
    problem = location_problem(value)  # an unknown scheme (ftp://...) is refused here, before any work
    if problem:
        raise ValueError(problem)
    return value


# The largest noise level any job takes: sigma is in [0, 1] pixel units (the papers use 0.12-1.0),
# so a larger one is almost surely meant on the 0-255 scale.
MAX_SIGMA = 2.0


def _pixel_units(sigma: float) -> float:
    if sigma > MAX_SIGMA:
        raise ValueError(f"must be <= {MAX_SIGMA:g}: sigma is in [0, 1] pixel units, got {sigma:g}; "
                         f"did you mean sigma/255 = {sigma / 255:.3g}?")
    return sigma


# Shared setting types: validation and meaning declared once, used by every job.
Sigma = Annotated[float, Field(gt=0, allow_inf_nan=False, strict=True), AfterValidator(_pixel_units)]
Alpha = Annotated[float, Field(gt=0, lt=1, strict=True)]
# The smoothing noise (`pipeline.sampling.noise`, where each is defined; the names are checked
# equal there): the norm a run certifies follows from it. Gaussian unless said otherwise.
Noise = Annotated[Literal["gaussian", "uniform", "laplace"], Field(description=(
    "smoothing noise: gaussian (certifies l2 radii), uniform on [-2 sigma, 2 sigma]^d or laplace with scale "
    "sigma (both certify l1 radii; sigma = E|delta_i|, the convention of Yang et al. 2020)"))]
Seed = Annotated[int, Field(ge=0, strict=True)]
PositiveInt = Annotated[int, Field(ge=1, strict=True)]
NonNegativeInt = Annotated[int, Field(ge=0, strict=True)]
PositiveFloat = Annotated[float, Field(gt=0, allow_inf_nan=False, strict=True)]
NonNegativeFloat = Annotated[float, Field(ge=0, allow_inf_nan=False, strict=True)]
OptionalPath = Annotated[Path | None, BeforeValidator(_none_words)]
# A local path or an object-storage URI (s3://bucket/key, gs://bucket/key): kept as text,
# since Path("s3://b/k") would silently become the local folder "s3:/b/k".
Where = Annotated[str, BeforeValidator(_path_text), AfterValidator(_known_scheme), Field(min_length=1)]
OptionalWhere = Annotated[Where | None, BeforeValidator(_none_words)]


def check_value(kind: Any, value: Any, name: str) -> Any:
    """Validate one value against a shared setting type (e.g. `check_value(Sigma, s, "sigma")`),
    so library functions apply the same rule as configs: ValueError naming `name`."""
    if hasattr(value, "item") and not isinstance(value, (str, bytes)):
        value = value.item()  # numpy scalars are plain numbers here
    try:
        return TypeAdapter(kind).validate_python(value)
    except ValidationError as error:
        detail = error.errors()[0]
        raise ValueError(f"{name} {_message(detail)}") from None


def sound_noise_problem(sound: bool, noise: str) -> str | None:
    """Why `sound` cannot go with `noise`, or None: the sound construction
    (`pipeline.sampling.sound`) rounds a Gaussian to the 8-bit grid; other noises have none yet,
    and a radius of their kind over Gaussian votes would be wrong. One rule for configs and the
    engine (`dsmooth.Smooth` reaches the engine without a config)."""
    if sound and noise != "gaussian":
        from pipeline.errors import setting

        return f"{setting('sound', True)} is implemented for Gaussian noise only, not {noise}"
    return None


# -- errors ------------------------------------------------------------------------------------


def _path(loc: tuple[Any, ...]) -> str:
    text = ""
    for part in loc:
        if part == "[key]":  # pydantic's marker for a bad mapping key: the key names the field
            continue
        if isinstance(part, int):
            text += f"[{part}]"
        else:
            text += f".{part}" if text else str(part)
    return text


def _message(detail: Mapping[str, Any]) -> str:
    kind, message = detail["type"], str(detail["msg"])
    if kind == "missing":
        return "is required"
    if kind.startswith("literal"):
        expected = detail.get("ctx", {}).get("expected", "")
        return f"{detail['input']!r} is not one of {expected}"
    if message.startswith("Input should be"):
        message = "must be" + message[len("Input should be"):]
        for wordy, short in (("greater than or equal to", ">="), ("less than or equal to", "<="),
                             ("greater than", ">"), ("less than", "<")):
            message = message.replace(wordy, short)
        return f"{message}, got {detail['input']!r}"
    return message.removeprefix("Value error, ")


def _known_fields(model: type[BaseModel], loc: tuple[Any, ...]) -> list[str]:
    """Field names of the model that `loc` (minus its last part) points into."""
    for part in loc[:-1]:
        if isinstance(part, int) or str(part) not in model.model_fields:
            continue  # list positions and mapping keys
        field = model.model_fields.get(str(part))
        inner = _model_of(field.annotation) if field else None
        if inner is None:
            return []
        model = inner
    return sorted(model.model_fields)


def _model_of(annotation: Any) -> type[BaseModel] | None:
    import typing

    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in reversed(typing.get_args(annotation)):  # dict[K, V]: the values' model
        found = _model_of(arg)
        if found is not None:
            return found
    return None


def config_error(error: ValidationError, model: type[BaseModel], prefix: str = "") -> ConfigError:
    """The first problem of a ValidationError as a ConfigError (dotted field, plain words); an
    unknown key goes first, since it usually explains a "required" one (a typo)."""
    details = error.errors()
    detail = next((d for d in details if d["type"] == "extra_forbidden"), details[0])
    loc = tuple(detail["loc"])
    cause = detail.get("ctx", {}).get("error")
    if isinstance(cause, ConfigError):  # raised by a model validator, naming its own field
        field = ".".join(p for p in (prefix, _path(loc), cause.field) if p)
        return ConfigError(field, cause.message)
    field = ".".join(p for p in (prefix, _path(loc)) if p)
    if detail["type"] == "extra_forbidden":
        known = _known_fields(model, loc)
        close = difflib.get_close_matches(str(loc[-1]), known, n=1, cutoff=0.6)
        hint = f"did you mean '{close[0]}'?" if close else f"known: {', '.join(known)}"
        return ConfigError(field, f"unknown field; {hint}")
    return ConfigError(field, _message(detail))


def parse_config(cls: type[T], data: Any) -> T:
    """Build settings `cls` from a mapping; every problem is a ConfigError naming its field."""
    if isinstance(data, cls):
        return data
    if not isinstance(data, Mapping):
        raise ConfigError("", f"settings must be a mapping of fields, got {type(data).__name__}")
    try:
        return cls.model_validate(dict(data))
    except ValidationError as error:
        raise config_error(error, cls) from None


def yaml_problem(error: Exception) -> str:
    """A YAML error in one line: the problem and its line (a tag such as !!python/object is
    refused: settings files are data, never code)."""
    problem = str(getattr(error, "problem", None) or str(error).strip().splitlines()[0])
    mark = getattr(error, "problem_mark", None)
    where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else ""
    if "python/" in problem or "constructor for the tag" in problem:
        tag = re.search(r"tag '([^']+)'", problem)
        problem = (f"the tag {tag.group(1) if tag else ''} is refused: a settings file holds data only "
                   "(plain values, lists and mappings)")
    return problem + where


def read_yaml_mapping(path: str | Path) -> dict:
    """A YAML file's top-level mapping; a missing, invalid or non-mapping file is a ConfigError."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError("", f"config file {path} does not exist")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as error:
        raise ConfigError("", f"config file {path} is not valid YAML: {yaml_problem(error)}") from None
    if not isinstance(data, dict):
        raise ConfigError("", f"config file {path} must hold a mapping of fields")
    return data


def apply_overrides(data: dict, overrides: Mapping[str, Any] | None) -> dict:
    """`data` with dotted overrides set on top (None = not given): {"budget.max_queries": 30}."""
    merged = {key: (dict(value) if isinstance(value, dict) else value) for key, value in data.items()}
    for dotted, value in (overrides or {}).items():
        if value is None:
            continue
        *parents, leaf = dotted.split(".")
        node = merged
        for i, name in enumerate(parents):
            child = node.get(name)
            child = dict(child) if isinstance(child, dict) else ({} if child is None else child)
            if not isinstance(child, dict):
                raise ConfigError(".".join(parents[: i + 1]), "must be a mapping")
            node[name] = child
            node = child
        node[leaf] = value
    return merged


def load_config(cls: type[T], source: str | Path | Mapping | None, overrides: Mapping[str, Any] | None = None) -> T:
    """Settings from a YAML file (or a mapping, or nothing), dotted overrides on top."""
    if source is None:
        data: dict = {}
    elif isinstance(source, Mapping):
        data = dict(source)
    else:
        data = read_yaml_mapping(source)
    return parse_config(cls, apply_overrides(data, overrides))


def to_dict(config: BaseModel) -> dict:
    """A plain, YAML/JSON-able dict of settings (paths as strings)."""
    return config.model_dump(mode="json")
