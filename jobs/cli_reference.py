"""The command-line reference (docs/reference/cli.md), generated from the parsers themselves.

Every `dsmooth COMMAND` parser is built exactly as `dsmooth COMMAND` builds it
(`jobs.cli.command_parser`, whose options come from the settings declarations), and each of
its options becomes a row: flag, value, YAML key, help with default. The docs site renders
this at build time (docs/hooks.py), so the reference cannot drift from the code;
`python -m jobs.cli_reference` prints it.
"""

from __future__ import annotations

import argparse
import importlib

from jobs.cli import COMMANDS, DESCRIPTION, command_parser

# command -> its settings model ("module:Class"): the source of the YAML keys of its --config.
SETTINGS_MODELS: dict[str, str] = {
    "certify": "pipeline.certify.config:CertifyConfig",
    "certify-api": "pipeline.apis.config:CertifyApiConfig",
    "demo": "pipeline.command_settings:DemoSettings",
    "reduce": "pipeline.command_settings:ReduceSettings",
    "api-emulator": "pipeline.command_settings:EmulatorSettings",
    "train": "pipeline.training.config:TrainConfig",
}


def settings_model(command: str) -> type | None:
    if command not in SETTINGS_MODELS:
        return None
    module, name = SETTINGS_MODELS[command].split(":")
    return getattr(importlib.import_module(module), name)


def yaml_keys(command: str) -> dict[str, str]:
    """flag -> YAML key (dotted) of the command's settings."""
    from jobs.options import flags

    model = settings_model(command)
    return {} if model is None else {flag: name for name, flag in flags(model).items()}


def _cell(text: str) -> str:
    return " ".join(str(text).split()).replace("|", "\\|").replace("<", "&lt;").replace(">", "&gt;")


def _value(action: argparse.Action) -> str:
    if action.nargs == 0:
        return ""
    if action.choices is not None:
        return "{" + ",".join(str(c).lower() if isinstance(c, bool) else str(c) for c in action.choices) + "}"
    metavar = action.metavar or action.dest.upper().replace("__", ".")
    if isinstance(metavar, tuple):
        metavar = " ".join(metavar)
    return f"{metavar} ..." if action.nargs in ("+", "*") else metavar


def _help(action: argparse.Action) -> str:
    text = action.help or ""
    if action.default not in (None, False, argparse.SUPPRESS) and "%(default)" not in text and "(default" not in text:
        text = f"{text} (default {action.default})"
    return text.replace("%(default)s", str(action.default)).replace("%%", "%")


def _groups(parser: argparse.ArgumentParser) -> list[tuple[str, str | None, list[argparse.Action]]]:
    out = []
    for group in parser._action_groups:  # argparse keeps the --help sections here, in order
        actions = [a for a in group._group_actions if a.help is not argparse.SUPPRESS
                   and not isinstance(a, (argparse._HelpAction, argparse._VersionAction))]
        if actions:
            out.append((group.title or "options", group.description, actions))
    return out


def render_command(name: str) -> str:
    module, parser = command_parser(name)
    keys = yaml_keys(name)
    lines = [f"## dsmooth {name}", "", COMMANDS[name][1][0].upper() + COMMANDS[name][1][1:] + ".", ""]
    doc = (module.__doc__ or "").strip()
    if doc:
        lines += ["```text", doc, "```", ""]
    positionals = [a for a in parser._actions if not a.option_strings]
    if positionals:
        lines += ["| argument | help |", "|---|---|"]
        lines += [f"| `{_cell(_value(a))}` | {_cell(_help(a))} |" for a in positionals]
        lines.append("")
    for title, description, actions in _groups(parser):
        options = [a for a in actions if a.option_strings]
        if not options:
            continue
        lines += [f"### {name}: {title}", ""]
        if description:
            lines += [_cell(description), ""]
        lines += ["| option | value | YAML key | help |", "|---|---|---|---|"]
        for action in options:
            shown = ", ".join(f"`{s}`" for s in action.option_strings)
            key = next((keys[s] for s in action.option_strings if s in keys), "")
            value = _value(action)
            lines.append(f"| {shown} | {f'`{_cell(value)}`' if value else ''} | "
                         f"{f'`{key}`' if key else ''} | {_cell(_help(action))} |")
        lines.append("")
    return "\n".join(lines)


def render() -> str:
    parts = [
        "# Command line",
        "",
        "Generated from the commands' own parsers (which are built from the settings "
        "declarations) each time the site is built: it lists every option of every command. "
        "Each setting with a YAML key can also be given in the file named by `--config`; a flag "
        "overrides the file. `dsmooth COMMAND --help` shows the same.",
        "",
        "```text",
        DESCRIPTION,
        "```",
        "",
    ]
    parts += [render_command(name) for name in COMMANDS]
    return "\n".join(parts) + "\n"


if __name__ == "__main__":
    print(render(), end="")
