"""MkDocs hooks: the generated pages, and the markers on the command blocks.

* `reference/cli.md` is rendered from the commands' own parsers at every build
  (`jobs.cli_reference`), and `changelog.md` is CHANGELOG.md: neither is a file in docs/,
  so neither can drift.
* Every shell block in the docs carries a marker on the line above its fence (an HTML
  comment, see reference/docs-tests.md): `<!-- run -->` / `<!-- run: FLAGS -->` (a test runs
  it at tiny size, FLAGS appended to its sized commands) or `<!-- needs: gpu, weights -->`
  (what it needs that a test machine does not have). `needs` markers become a visible note.
"""

from __future__ import annotations

import re
import sys
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

NEEDS = {
    "gpu": "a GPU",
    "cloud": "a cloud account",
    "weights": "model weights you download",
    "data": "a data set you download",
    "network": "a package index (network access)",
}
SHELL_LANGUAGES = {"bash", "sh", "shell", "console"}
MARKER = re.compile(r"^\s*<!--\s*(run|ci|needs)(?::\s*(.*?))?\s*-->\s*$")
FENCE = re.compile(r"^(\s*)(```+|~~~+)\s*([\w+-]*)")


@dataclass
class Block:
    """One fenced code block of a page, with the marker on the line above it (if any)."""

    page: str
    line: int  # 1-based line of the opening fence
    language: str
    code: str
    marker: str | None  # "run" | "ci" | "needs" | None
    argument: str  # FLAGS of run or ci, the needs list


def blocks(text: str, page: str = "") -> list[Block]:
    lines = text.splitlines()
    out, i = [], 0
    while i < len(lines):
        match = FENCE.match(lines[i])
        if not match:
            i += 1
            continue
        indent, fence, language = match.groups()
        end = i + 1
        while end < len(lines) and not lines[end].strip().startswith(fence):
            end += 1
        code = "\n".join(line[len(indent):] if line.startswith(indent) else line.lstrip() for line in lines[i + 1:end])
        marker = MARKER.match(lines[i - 1]) if i > 0 else None
        out.append(Block(page, i + 1, language.lower(), code, marker.group(1) if marker else None,
                         (marker.group(2) or "") if marker else ""))
        i = end + 1
    return out


def needs_of(argument: str) -> list[str]:
    """The needs words of a marker; ValueError for a word that is not one of NEEDS."""
    words = [w.strip() for w in argument.split(",") if w.strip()]
    unknown = [w for w in words if w not in NEEDS]
    if unknown or not words:
        raise ValueError(f"needs: {argument!r}: each word must be one of {', '.join(NEEDS)}")
    return words


def on_files(files, config):
    from mkdocs.structure.files import File

    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    from jobs.cli_reference import render

    files.append(File.generated(config, "reference/cli.md", content=render()))
    files.append(File.generated(config, "changelog.md", content=(ROOT / "CHANGELOG.md").read_text()))
    return files


def vote_schema_table() -> str:
    """The Parquet vote schema, from the one `VoteRow` definition."""
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    from dataclasses import fields

    from pipeline.runs.storage import VoteRow

    rows = ["| column | Arrow type | note |", "|---|---|---|"]
    for column in fields(VoteRow):
        rows.append(f"| `{column.name}` | `{column.metadata['arrow']}` | {column.metadata.get('note', '')} |")
    return "\n".join(rows)


GENERATED = {"vote-schema": vote_schema_table}


def on_page_markdown(markdown, page, config, files):
    """A `needs` marker becomes a visible note above its block; `<!-- generated: NAME -->`
    becomes the generated text."""
    for name, make in GENERATED.items():
        if f"<!-- generated: {name} -->" in markdown:
            markdown = markdown.replace(f"<!-- generated: {name} -->", make())
    lines = markdown.splitlines()
    for index, line in enumerate(lines):
        match = MARKER.match(line)
        if match and match.group(1) == "needs":
            indent = line[: len(line) - len(line.lstrip())]
            words = " and ".join(NEEDS[w] for w in needs_of(match.group(2) or ""))
            lines[index] = f"{indent}*Needs {words}; not run by the tests.*\n"
    return "\n".join(lines)
