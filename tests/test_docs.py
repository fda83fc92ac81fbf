"""The documentation stays true: the Python examples of README.md and docs/getting-started.md run as written, the
README stays short, and every relative link of README.md and docs/ points to a file (and heading) that exists.

The examples run in this process, one fresh namespace per file, the blocks of a file in order (a block may use the
names of the blocks before it), in a temporary working directory (they write ``out/`` and saved models).
"""

from __future__ import annotations

import os
import re
import textwrap
import unicodedata
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE_FILES = ("README.md", "docs/getting-started.md")
README_MAX_LINES = 160

FENCE = re.compile(r"^\s*(`{3,}|~{3,})\s*([\w+-]*)")
LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
HEADING = re.compile(r"^(#{1,6})\s+(.*?)\s*#*\s*$")


def fenced_blocks(text: str) -> list[tuple[int, str, str]]:
    """``(first line number of the code, language, code)`` of each fenced block, in order (code dedented)."""
    blocks, lines, i = [], text.split("\n"), 0
    while i < len(lines):
        opening = FENCE.match(lines[i])
        if not opening:
            i += 1
            continue
        fence, language, start = opening.group(1), opening.group(2).lower(), i + 1
        i += 1
        while i < len(lines) and not lines[i].strip().startswith(fence):
            i += 1
        blocks.append((start + 1, language, textwrap.dedent("\n".join(lines[start:i]))))
        i += 1
    return blocks


def python_blocks(text: str) -> list[tuple[int, str]]:
    return [(line, code) for line, language, code in fenced_blocks(text) if language in ("python", "py")]


def run_examples(path: Path, text: str | None = None) -> dict:
    """Execute the Python blocks of the Markdown file ``path`` in order in one namespace; return the namespace.

    Each block is compiled under the Markdown file's name with its own line numbers, so a failure's traceback
    points at the line of the page.
    """
    text = path.read_text(encoding="utf-8") if text is None else text
    namespace: dict = {"__name__": f"docs_example_{path.stem}"}
    for line, code in python_blocks(text):
        exec(compile("\n" * (line - 1) + code, str(path), "exec"), namespace)  # noqa: S102 - the docs' own code
    return namespace


def prose(text: str) -> str:
    """``text`` with fenced code blocks and inline code spans blanked out (line numbers kept)."""
    lines = text.split("\n")
    for line, _, code in fenced_blocks(text):
        for k in range(line - 1, line - 1 + len(code.split("\n"))):
            lines[k] = ""
    return re.sub(r"(`+)(.+?)\1", "", "\n".join(lines), flags=re.S)  # a code span may continue on the next line


def slugs(heading: str) -> tuple[str, str]:
    """The anchor of a Markdown heading as MkDocs writes it (Python-Markdown's ``toc``: runs of spaces and hyphens
    become one hyphen) and as GitHub writes it (each space becomes a hyphen)."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link in a heading: its text
    text = unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode("ascii")
    text = re.sub(r"[^\w\s-]", "", text).strip().lower()
    return re.sub(r"[-\s]+", "-", text), re.sub(r"\s", "-", text)


def anchors(path: Path) -> set[str]:
    """The anchors of the headings of the Markdown file ``path`` (not of ``#`` lines inside code blocks) that MkDocs
    and GitHub write alike, so that a link to one works on the site and in the repository."""
    text = path.read_text(encoding="utf-8")
    lines = text.split("\n")
    for line, _, code in fenced_blocks(text):
        for k in range(line - 1, line - 1 + len(code.split("\n"))):
            lines[k] = ""
    both = (slugs(m.group(2)) for m in map(HEADING.match, lines) if m)
    return {mkdocs for mkdocs, github in both if mkdocs == github}


def doc_files() -> list[Path]:
    return [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]


def broken_links(path: Path) -> list[str]:
    """Each relative link of ``path`` whose file (or heading, for a link into a Markdown file) does not exist."""
    problems = []
    for target in LINK.findall(prose(path.read_text(encoding="utf-8"))):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target, re.I) or target.startswith("//"):
            continue  # https:, mailto:, ...
        file_part, _, anchor = target.partition("#")
        resolved = (path.parent / file_part).resolve() if file_part else path
        if not resolved.exists():
            problems.append(f"{target} (no file {os.path.relpath(resolved, ROOT)})")
        elif anchor and resolved.suffix == ".md" and anchor not in anchors(resolved):
            problems.append(f"{target} (no heading #{anchor} in {os.path.relpath(resolved, ROOT)})")
    return problems


@pytest.mark.parametrize("name", EXAMPLE_FILES)
def test_python_examples_run_as_written(name, tmp_path, monkeypatch):
    path = ROOT / name
    assert python_blocks(path.read_text(encoding="utf-8")), f"{name} has no ```python block"
    monkeypatch.chdir(tmp_path)
    run_examples(path)
    assert (tmp_path / "out" / "model_micro.tflite").is_file(), f"{name}'s example wrote no micro file"


def test_a_broken_example_fails_with_the_line_of_the_page(tmp_path):
    page = tmp_path / "page.md"
    text = "# Page\n\n```python\nvalue = 1\n```\n\nText.\n\n```python\nvalue + undefined_name\n```\n"
    with pytest.raises(NameError) as info:
        run_examples(page, text)
    frame = info.traceback[-1]
    assert (Path(frame.path).name, frame.lineno + 1) == ("page.md", 10)
    assert run_examples(page, text.replace("value + undefined_name", "value += 1"))["value"] == 2


def test_readme_is_short():
    lines = (ROOT / "README.md").read_text(encoding="utf-8").count("\n")
    assert lines <= README_MAX_LINES, f"README.md has {lines} lines; at most {README_MAX_LINES}, the rest goes to docs/"


def test_relative_links_point_to_existing_files():
    problems = {os.path.relpath(p, ROOT): broken_links(p) for p in doc_files()}
    assert not {name: links for name, links in problems.items() if links}


def test_the_link_check_sees_a_broken_link(tmp_path):
    (tmp_path / "other.md").write_text("# Other page\n\n## A `code` heading\n", encoding="utf-8")
    page = tmp_path / "page.md"
    page.write_text(
        "[ok](other.md) [ok](other.md#a-code-heading) `[not a link](missing.md)` [web](https://example.org)\n"
        "[gone](missing.md) [no heading](other.md#nowhere)\n\n```\n[in code](missing2.md)\n```\n",
        encoding="utf-8",
    )
    assert broken_links(page) == [
        "missing.md (no file " + os.path.relpath(tmp_path / "missing.md", ROOT) + ")",
        "other.md#nowhere (no heading #nowhere in " + os.path.relpath(tmp_path / "other.md", ROOT) + ")",
    ]
