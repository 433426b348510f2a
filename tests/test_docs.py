"""The documentation: the site builds strictly, the command-line reference holds every flag of
every command, every shell block is run by a test or marked with what it needs, the README's
set-up and test commands are CI's, and the user docs carry no project history."""

from __future__ import annotations

import importlib.util
import re
import shlex
import subprocess
import sys

import pytest

from docs_support import DOCS, ROOT, SIZED, all_blocks, ci_commands, commands, hooks, normalise, page_name, pages, shell_blocks


def test_mkdocs_build_is_strict_clean(tmp_path):
    if importlib.util.find_spec("mkdocs") is None or importlib.util.find_spec("mkdocstrings") is None:
        pytest.skip("mkdocs is not installed (pip install -e \".[docs]\")")
    result = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
                            cwd=ROOT, capture_output=True, text=True, timeout=240,
                            env={**__import__("os").environ, "NO_MKDOCS_2_WARNING": "1", "PYTHONPATH": str(ROOT)})
    assert result.returncode == 0, result.stderr[-4000:]
    cli = (tmp_path / "site" / "reference" / "cli" / "index.html").read_text()
    assert "--n-max" in cli and "--max-queries" in cli  # the generated page is in the site
    assert "Needs model weights you download" in (tmp_path / "site" / "guides" / "diffusion" / "index.html").read_text()


def _sections(page: str) -> dict[str, str]:
    parts = re.split(r"^## dsmooth (\S+)\n", page, flags=re.M)
    return dict(zip(parts[1::2], parts[2::2]))


def test_cli_reference_holds_every_flag_of_every_command():
    from jobs.cli import COMMANDS, command_parser
    from jobs.cli_reference import render, settings_model
    from jobs.options import flags

    sections = _sections(render())
    assert set(sections) == set(COMMANDS)
    missing = []
    for name in COMMANDS:
        shown = set(re.findall(r"`(--?[A-Za-z0-9][\w-]*)`", sections[name]))
        _, parser = command_parser(name)
        expected = {s for action in parser._actions for s in action.option_strings if s not in ("-h", "--help")}
        model = settings_model(name)
        if model is not None:  # every declared setting with a flag, whatever the parser did
            expected |= set(flags(model).values())
        missing += [f"dsmooth {name} {flag}" for flag in sorted(expected - shown)]
    assert not missing, f"not in the CLI reference: {missing}"


def test_cli_reference_gives_yaml_keys_and_defaults():
    from jobs.cli_reference import render

    certify = _sections(render())["certify"]
    row = next(line for line in certify.splitlines() if line.startswith("| `--n-max`"))
    assert "`n_max`" in row
    api = _sections(render())["certify-api"]
    assert any(line.startswith("| `--max-queries`") and "`budget.max_queries`" in line for line in api.splitlines())
    assert "(default 0.001)" in certify


def test_every_shell_block_is_run_or_marked():
    unmarked, bad = [], []
    for block in shell_blocks():
        where = f"{block.page}:{block.line}"
        if block.marker is None:
            unmarked.append(where)
        elif block.marker == "needs":
            try:
                hooks.needs_of(block.argument)
            except ValueError as error:
                bad.append(f"{where}: {error}")
        else:
            try:
                shlex.split(block.argument)
            except ValueError as error:
                bad.append(f"{where}: {error}")
    assert not unmarked, f"shell blocks with no <!-- run --> / <!-- ci --> / <!-- needs: ... --> marker: {unmarked}"
    assert not bad, bad


def test_ci_blocks_are_the_commands_ci_runs():
    """The README's set-up and test commands are exactly .ci/run's (its `dsmooth` commands
    are run by tests/test_docs_commands.py)."""
    ci = ci_commands()
    blocks = [b for b in shell_blocks() if b.marker == "ci"]
    assert any(b.page == "README.md" for b in blocks)
    missing = [f"{b.page}:{b.line}: {normalise(c)}" for b in blocks for c in commands(b.code)
               if c[0] != "dsmooth" and normalise(c) not in ci]
    assert not missing, f"not commands of .ci/run: {missing}"
    readme = [b for b in blocks if b.page == "README.md"]
    assert [normalise(c) for c in commands(readme[0].code)] == [
        'pip install torch===2.13.0 torchvision==0.28.0 -e .[dev]', "dsmooth demo"]
    assert {normalise(c) for c in commands(readme[1].code)} == {"python -m pytest -q"}


def test_every_dsmooth_command_in_the_docs_uses_real_flags():
    from jobs.cli import COMMANDS, command_parser

    parsers: dict = {}
    wrong = []
    for block in shell_blocks():
        for tokens in commands(block.code):
            start = next((i for i, t in enumerate(tokens) if t == "dsmooth"), None)
            if start is None:
                continue
            args = tokens[start + 1:]
            if not args or args[0].startswith("-"):
                continue
            if args[0] not in COMMANDS:
                wrong.append(f"{block.page}:{block.line}: no command {args[0]!r}")
                continue
            if args[0] not in parsers:
                parsers[args[0]] = {s for a in command_parser(args[0])[1]._actions for s in a.option_strings}
            tiny = shlex.split(block.argument) if block.marker in ("run", "ci") and args[0] in SIZED else []
            for token in args[1:] + tiny:
                flag = token.split("=", 1)[0]
                if flag.startswith("--") and flag not in parsers[args[0]]:
                    wrong.append(f"{block.page}:{block.line}: dsmooth {args[0]} has no {flag}")
    assert not wrong, wrong


def test_readme_is_a_short_front_door():
    readme = (ROOT / "README.md").read_text()
    assert len(readme) <= 12_000, len(readme)
    for link in re.findall(r"\]\(((?:docs/)[^)#]+)", readme):
        generated = link in ("docs/reference/cli.md", "docs/changelog.md")
        assert generated or (ROOT / link).is_file(), f"README links to a missing page: {link}"


HISTORY = [
    (r"\bissue[s]? #?\d+", "an issue number"),
    (r"\b(commit|sha) [0-9a-f]{7,40}\b", "a commit"),
    (r"\bgit show [0-9a-f]{7,}", "a commit"),
    (r"\bat hand\b", "'at hand'"),
    (r"/work/|/home/|/root/", "a machine path"),
    (r"huggingface-cli", "huggingface-cli (the installed huggingface-hub ships `hf`)"),
    (r"\bTarget \([ab]\)", "a project target"),
]


def test_user_docs_carry_no_history():
    found = []
    for path in pages():
        text = path.read_text()
        for pattern, what in HISTORY:
            for match in re.finditer(pattern, text, flags=re.I):
                found.append(f"{page_name(path)}: {what}: {match.group(0)!r}")
    assert not found, found


def test_placeholder_pages_other_guides_fill_are_in_the_nav():
    nav = (ROOT / "mkdocs.yml").read_text()
    for page in ("guides/vlm-chat-apis.md", "guides/cluster-sizing.md", "design/code-map.md"):
        assert page in nav and (DOCS / page).is_file(), page


def test_python_blocks_marked_run_are_whole_scripts():
    for block in all_blocks():
        if block.language == "python" and block.marker == "run":
            compile(block.code, f"{block.page}:{block.line}", "exec")
