"""The table of contents, the chapter files and the chapter runner in conftest.py agree.

The `book_toc` fixture comes from the repository's conftest.py.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FRONT_MATTER_HELP = (
    "A chapter with code starts with MyST-notebook front matter: `jupytext: text_representation: "
    "format_name: myst` and `kernelspec: name: python3` (copy the block at the top of "
    "book/part1/why-fine-tune.md)."
)


def rel(path: Path) -> str:
    return path.relative_to(ROOT).as_posix()


def test_every_toc_entry_exists(book_toc):
    missing = book_toc.missing()
    assert not missing, (
        f"_toc.yml lists {missing}, but no .md or .ipynb file exists there. Create the file or fix the "
        "entry: entries are paths from the repository root, written without the suffix."
    )


def test_toc_has_notebook_chapters(book_toc):
    assert book_toc.notebooks(), "No chapter in _toc.yml is a notebook, so pytest would run no chapter."


def test_pages_with_code_cells_are_notebooks(book_toc):
    for entry in book_toc.entries:
        source = book_toc.source(entry)
        if source is None or source.suffix != ".md":
            continue
        has_code = "```{code-cell}" in source.read_text(encoding="utf-8")
        assert not has_code or book_toc.is_notebook(source), (
            f"{rel(source)} has code cells but is not a notebook: neither the book nor pytest would run "
            f"them. {FRONT_MATTER_HELP}"
        )


def test_notebook_chapters_name_a_kernel(book_toc):
    for source in book_toc.notebooks():
        if source.suffix != ".md":
            continue
        kernel = (book_toc.front_matter(source).get("kernelspec") or {}).get("name")
        assert kernel, f"{rel(source)} names no kernel. {FRONT_MATTER_HELP}"


def test_every_notebook_under_book_is_listed(book_toc):
    listed = set(book_toc.notebooks())
    for source in sorted((ROOT / "book").rglob("*.md")):
        parts = source.relative_to(ROOT).parts
        if any(part.startswith((".", "_")) for part in parts):
            continue
        if book_toc.is_notebook(source):
            assert source.resolve() in listed, (
                f"{rel(source)} is a notebook but _toc.yml does not list it, so it is neither built nor "
                "tested. Add it to _toc.yml (see README.md, 'Adding a chapter')."
            )


def test_notebook_rule_matches_myst_nb(book_toc):
    """conftest.py must treat a page as a notebook exactly when the book build executes it."""
    read = pytest.importorskip("myst_nb.core.read")
    for entry in book_toc.entries:
        source = book_toc.source(entry)
        if source is not None and source.suffix == ".md":
            text = source.read_text(encoding="utf-8")
            assert book_toc.is_notebook(source) == read.is_myst_markdown_notebook(text), rel(source)


def test_pytest_collects_every_notebook_chapter(book_toc):
    """Plain `pytest` (testpaths from pyproject.toml) must collect each notebook chapter once."""
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider", "--ignore=tests"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    collected = [line.split("::")[0] for line in result.stdout.splitlines() if "::" in line]
    for source in book_toc.notebooks():
        count = collected.count(rel(source))
        assert count == 1, (
            f"{rel(source)} is a notebook chapter in _toc.yml but pytest collected it {count} times. "
            "Chapters must lie under a folder in `testpaths` (pyproject.toml), i.e. under book/."
        )
