"""What the docs tests share: the pages, their code blocks (parsed by docs/hooks.py, the same
code that renders the markers), the commands in a shell block, and a runner for a block."""

from __future__ import annotations

import importlib.util
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"


def _load_hooks():
    spec = importlib.util.spec_from_file_location("dsmooth_docs_hooks", DOCS / "hooks.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while it loads
    spec.loader.exec_module(module)
    return module


hooks = _load_hooks()


def pages() -> list[Path]:
    """README.md and every Markdown page of the site."""
    return [ROOT / "README.md", *sorted(DOCS.rglob("*.md"))]


def page_name(path: Path) -> str:
    return str(path.relative_to(ROOT))


def all_blocks() -> list:
    return [block for path in pages() for block in hooks.blocks(path.read_text(), page_name(path))]


def shell_blocks() -> list:
    return [b for b in all_blocks() if b.language in hooks.SHELL_LANGUAGES]


SEPARATORS = {"&&", "||", ";", "&", "|"}
KEYWORDS = {"do", "then", "else", "{", "}"}


def commands(code: str) -> list[list[str]]:
    """The simple commands of a shell block, as token lists: continuations joined, comments
    dropped, split at && ; & |, leading VAR=value assignments dropped, `$VAR` expanded when
    the block assigned VAR a command (the `C="dsmooth certify ..."; $C --flag` idiom)."""
    text = re.sub(r"\\\n\s*", " ", code)
    variables: dict[str, list[str]] = {}
    out: list[list[str]] = []
    for line in text.splitlines():
        lexer = shlex.shlex(line, posix=True, punctuation_chars="&|;")
        lexer.whitespace_split = True
        lexer.commenters = "#"
        current: list[str] = []
        for token in [*lexer, ";"]:
            if token in SEPARATORS or set(token) <= set("&|;"):
                while current and current[0] in KEYWORDS:
                    current.pop(0)
                while current and re.match(r"^[A-Za-z_][A-Za-z0-9_]*=", current[0]):
                    name, value = current.pop(0).split("=", 1)
                    if not current and value.split()[:1] == ["dsmooth"]:
                        variables[name] = shlex.split(value)
                if current and current[0].startswith("$") and current[0][1:] in variables:
                    current = variables[current[0][1:]] + current[1:]
                if current:
                    out.append(current)
                current = []
            else:
                current.append(token)
    return out


def ci_commands() -> set[str]:
    """.ci/run's commands, normalised (see `normalise`)."""
    found = set()
    for tokens in commands((ROOT / ".ci" / "run").read_text()):
        found.add(normalise(tokens[2:] if tokens[:1] == ["tier"] else tokens))  # `tier NAME COMMAND...`
    return found


def normalise(tokens: list[str]) -> str:
    """`python -m pip install -q X` and `pip install X` are one command."""
    tokens = list(tokens)
    if tokens[:3] == ["python", "-m", "pip"]:
        tokens = tokens[2:]
    if tokens[:2] == ["pip", "install"]:
        tokens = [t for t in tokens if t != "-q"]
    return " ".join(tokens)


# --- the runner ---------------------------------------------------------------------------

SIZED = ("certify", "certify-api", "demo", "train")

PRELUDE = r"""
set -euo pipefail
# a background command (the emulator) is a subshell running python: stop both when the block ends
trap 'for job in $(jobs -p); do pkill -TERM -P "$job" 2>/dev/null || true; kill "$job" 2>/dev/null || true; done; wait 2>/dev/null || true' EXIT
dsmooth() {
    case "$1" in
        certify|certify-api|demo|train) "$PY" -m jobs.cli "$@" "${TINY[@]}" ;;
        *) "$PY" -m jobs.cli "$@" ;;
    esac
}
python() {
    if [[ "${1:-}" == benchmarks/* ]]; then "$PY" "$@" "${TINY[@]}";
    elif [[ "${1:-}" == -m && "${2:-}" == pytest ]]; then echo "(the test suite itself: run by .ci/run)";
    else "$PY" "$@"; fi
}
pip() { echo "(set-up: checked against .ci/run)"; }
"""


def scratch(folder: Path) -> Path:
    """A working folder that holds the repository's data, models, examples and benchmarks
    (links), so a block's relative paths work and its outputs stay in the folder."""
    folder.mkdir(parents=True, exist_ok=True)
    for name in ("pipeline", "examples", "benchmarks"):
        (folder / name).symlink_to(ROOT / name)
    return folder


def run_block(block, folder: Path, timeout: float = 900) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PY": sys.executable, "HF_HUB_OFFLINE": "1",
           "TRANSFORMERS_OFFLINE": "1", "NO_COLOR": "1"}
    env.pop("RAY_ADDRESS", None)
    if block.language == "python":
        script = folder / f"block_{block.line}.py"
        script.write_text(block.code)
        argv = [sys.executable, str(script)]
    else:
        tiny = " ".join(shlex.quote(t) for t in shlex.split(block.argument))
        script = folder / f"block_{block.line}.sh"
        script.write_text(f"TINY=({tiny})\n{PRELUDE}\n{block.code}\n")
        argv = ["bash", str(script)]
    return subprocess.run(argv, cwd=folder, env=env, capture_output=True, text=True, timeout=timeout)
