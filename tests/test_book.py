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
                "tested. Add it to _toc.yml (see CONTRIBUTING.md, 'Adding a chapter')."
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


def _root_conftest():
    """The repository's conftest.py as a plain module (pytest registers it under its own name)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("ftcourse_root_conftest", ROOT / "conftest.py")
    if spec.name in sys.modules:
        return sys.modules[spec.name]
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


CHAPTER = """---
jupytext:
  text_representation:
    extension: .md
    format_name: myst
kernelspec:
  display_name: Python 3
  language: python
  name: python3
---

# A chapter

Some prose.

```{code-cell} ipython3
:tags: [remove-input]
x = 6 * 7
```

```{code-cell} ipython3
print(x)
```
"""


def _executed_copy(notebook):
    """What nbmake hands back: outputs, execution counts and timing metadata added to every code cell."""
    import copy

    import nbformat

    executed = copy.deepcopy(notebook)
    for count, cell in enumerate((c for c in executed.cells if c.cell_type == "code"), start=1):
        cell.execution_count = count
        cell.outputs = [nbformat.v4.new_output("stream", name="stdout", text=f"cell {count}\n")]
        cell.metadata["execution"] = {"iopub.status.busy": "2026-01-01T00:00:00Z"}  # nbclient's timing
    executed.metadata["language_info"] = {"name": "python"}
    return executed


def test_a_chapter_cached_by_pytest_is_found_by_the_build_until_its_code_changes(tmp_path):
    """The cache round trip the book build relies on, with the lookup myst-nb makes (jupyter-cache)."""
    from jupyter_cache import get_cache

    conftest = _root_conftest()
    source = tmp_path / "chapter.md"
    source.write_text(CHAPTER, encoding="utf-8")
    notebook = conftest.read_chapter(source)
    assert conftest.cache_executed(source, notebook, _executed_copy(notebook), cache_path=tmp_path / "cache")
    cache = get_cache(str(tmp_path / "cache"))

    # The build reads the same file again: it finds the stored outputs and merges them in.
    _, merged = cache.merge_match_into_notebook(conftest.read_chapter(source))
    outputs = [cell.outputs[0]["text"] for cell in merged.cells if cell.cell_type == "code"]
    assert outputs == ["cell 1\n", "cell 2\n"]
    assert merged.metadata["language_info"] == {"name": "python"}

    # Prose edits keep the match; a changed code cell or cell option does not.
    source.write_text(CHAPTER.replace("Some prose.", "Other prose."), encoding="utf-8")
    cache.match_cache_notebook(conftest.read_chapter(source))
    for changed in (CHAPTER.replace("6 * 7", "6 * 8"), CHAPTER.replace("remove-input", "remove-cell")):
        source.write_text(changed, encoding="utf-8")
        with pytest.raises(KeyError):
            cache.match_cache_notebook(conftest.read_chapter(source))


def test_the_cache_key_follows_profile_model_and_package(tmp_path, monkeypatch):
    sys.path.insert(0, str(ROOT / "book" / "_ext"))
    import ftcourse_book

    (tmp_path / "src" / "ftcourse").mkdir(parents=True)
    module = tmp_path / "src" / "ftcourse" / "lora.py"
    module.write_text("RANK = 8\n", encoding="utf-8")
    monkeypatch.delenv("FTCOURSE_PROFILE", raising=False)
    monkeypatch.delenv("FTCOURSE_MODEL", raising=False)
    base = ftcourse_book.execution_cache_key(tmp_path)
    assert base.startswith("cpu-")
    assert ftcourse_book.execution_cache_key(tmp_path) == base  # stable
    (tmp_path / "src" / "ftcourse" / "__pycache__").mkdir()
    (tmp_path / "src" / "ftcourse" / "__pycache__" / "lora.cpython-311.pyc").write_bytes(b"\0")
    assert ftcourse_book.execution_cache_key(tmp_path) == base  # bytecode is not an input
    module.write_text("RANK = 16\n", encoding="utf-8")
    changed = ftcourse_book.execution_cache_key(tmp_path)
    assert changed != base
    monkeypatch.setenv("FTCOURSE_PROFILE", "spark")
    assert ftcourse_book.execution_cache_key(tmp_path).startswith("spark-")
    monkeypatch.setenv("FTCOURSE_MODEL", "some/model")
    assert ftcourse_book.execution_cache_key(tmp_path) not in (base, changed)


# In a notebook, imports below a first cell and long prose strings are normal: the rest of ruff's rules hold.
CHAPTER_LINT_IGNORE = "E402,E501"


def test_chapter_code_cells_pass_ruff(book_toc, tmp_path):
    """Every chapter's code cells, read as a notebook (ruff lints .ipynb cells, not MyST Markdown)."""
    import nbformat

    read_chapter = _root_conftest().read_chapter

    written = []
    for source in book_toc.notebooks():
        if source.suffix != ".md":
            continue
        target = tmp_path / source.relative_to(ROOT).with_suffix(".ipynb")
        target.parent.mkdir(parents=True, exist_ok=True)
        nbformat.write(read_chapter(source), str(target))
        written.append(target)
    result = subprocess.run(
        [sys.executable, "-m", "ruff", "check", "--config", str(ROOT / "pyproject.toml"), "--no-cache",
         "--extend-ignore", CHAPTER_LINT_IGNORE, "--output-format", "concise", str(tmp_path)],
        capture_output=True, text=True, cwd=ROOT,
    )  # fmt: skip
    report = result.stdout.replace(str(tmp_path) + "/", "").replace(".ipynb:", ".md:")
    assert written and result.returncode == 0, f"ruff finds problems in chapter code cells:\n{report}"


# ---------------------------------------------------------------------------------------------------
# Reading order: myst-nb executes a page when Sphinx reads it, and Sphinx reads in alphabetical order.


def _book_extension():
    sys.path.insert(0, str(ROOT / "book" / "_ext"))
    import ftcourse_book

    return ftcourse_book


def test_pages_that_quote_chapters_are_read_after_them():
    """Hand-worked: Sphinx's alphabetical list puts the ledger and a self-check before their chapters."""
    ext = _book_extension()
    alphabetical = ["book/appendix/ledger", "book/part1/memory", "book/part1/self-check", "book/part1/why"]
    quotes = {"book/appendix/ledger": ["book/part1/memory", "book/part1/why", "book/part9/not-read"],
              "book/part1/self-check": ["book/part1/why", "book/part1/self-check"]}  # fmt: skip
    assert ext.reading_order(alphabetical, quotes) == [
        "book/part1/memory", "book/part1/why", "book/appendix/ledger", "book/part1/self-check",
    ]  # fmt: skip
    assert ext.reading_order(["b", "a"], {"a": ["b"], "b": ["a"]}) == ["b", "a"]  # a cycle keeps the order


def test_every_quoting_page_of_the_book_is_read_after_its_chapters(book_toc):
    """The real book: each self-check and the claims ledger comes after every chapter it names."""
    ext = _book_extension()
    docnames = sorted(entry for entry in book_toc.entries if book_toc.source(entry) is not None)
    quotes = {
        name: ext.quoted_chapters(book_toc.source(name).read_text(encoding="utf-8")) for name in docnames
    }
    readers = {name: names for name, names in quotes.items() if names}
    expected = {f"book/part{n}/self-check" for n in range(1, 6)} | {"book/appendix/claims-ledger"}
    assert set(readers) == expected, f"pages that quote chapters: {sorted(readers)}"
    order = ext.reading_order(docnames, quotes)
    assert sorted(order) == docnames
    for reader, chapters in readers.items():
        for chapter in chapters:
            assert chapter in docnames, f"{reader} quotes {chapter}, which _toc.yml does not list"
            assert order.index(chapter) < order.index(reader), f"{reader} would run before {chapter}"
    alphabetical_first = [c for r, cs in readers.items() for c in cs if docnames.index(c) > docnames.index(r)]
    assert alphabetical_first, (
        "the alphabetical order no longer puts a quoting page first: keep the test honest"
    )


_PAGE_HEAD = """---
jupytext:
  text_representation:
    extension: .md
    format_name: myst
kernelspec:
  display_name: Python 3
  language: python
  name: python3
{extra}---

# {title}

"""


def run_throwaway_chapter(
    tmp_path: Path, name: str, title: str, cell: str, env: dict[str, str]
) -> subprocess.CompletedProcess:
    """Run `book/<name>.md` (one code cell) in a throwaway book with a copy of the repository's conftest."""
    import shutil

    (tmp_path / "book" / "_ext").mkdir(parents=True)
    shutil.copy(ROOT / "conftest.py", tmp_path / "conftest.py")
    shutil.copy(ROOT / "book" / "_ext" / "ftcourse_book.py", tmp_path / "book" / "_ext")
    (tmp_path / "pytest.ini").write_text("[pytest]\n")
    (tmp_path / "_config.yml").write_text("title: test\n")
    (tmp_path / "_toc.yml").write_text(f"format: jb-book\nroot: book/{name}\n")
    page = _PAGE_HEAD.format(extra="", title=title) + f"```{{code-cell}} ipython3\n{cell}```\n"
    (tmp_path / "book" / f"{name}.md").write_text(page)
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", f"book/{name}.md"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip


_CHAPTER_CELL = """```{{code-cell}} ipython3
import pathlib
pathlib.Path({marker!r}).write_text("measured")
```
"""
_READER_CELL = """```{{code-cell}} ipython3
import pathlib
from myst_nb import glue
marker = pathlib.Path({marker!r})  # as claims.chapter_values("b/chapter.md", root) would read it
glue("quoted", marker.read_text() if marker.exists() else "not measured in this build", display=False)
```

Quoted: {{glue:text}}`quoted`.
"""


def _tiny_book(tmp_path: Path, reorder: bool) -> subprocess.CompletedProcess:
    """A three-page Sphinx + myst-nb project where the reader page sorts before the chapter it quotes."""
    src = tmp_path / "src"
    (src / "a").mkdir(parents=True)
    (src / "b").mkdir()
    marker = str(tmp_path / "chapter-ran.txt")
    (src / "index.md").write_text("# Tiny\n\n```{toctree}\nb/chapter\na/reader\n```\n", encoding="utf-8")
    (src / "b" / "chapter.md").write_text(
        _PAGE_HEAD.format(extra="", title="Chapter") + _CHAPTER_CELL.format(marker=marker), encoding="utf-8"
    )
    force = "mystnb:\n  execution_mode: force\n"
    (src / "a" / "reader.md").write_text(
        _PAGE_HEAD.format(extra=force, title="Reader") + _READER_CELL.format(marker=marker), encoding="utf-8"
    )
    hooks = ["doctree-resolved", "_no_unmeasured_page"]
    if reorder:
        hooks = ["env-before-read-docs", "_read_quoting_pages_last", *hooks]
    connects = "".join(
        f"    app.connect({event!r}, ftcourse_book.{handler})\n"
        for event, handler in zip(hooks[::2], hooks[1::2], strict=True)
    )
    (src / "conf.py").write_text(
        f"import sys\nsys.path.insert(0, {str(ROOT / 'book' / '_ext')!r})\nimport ftcourse_book\n"
        "extensions = ['myst_nb']\nnb_execution_mode = 'cache'\n"
        f"nb_execution_cache_path = {str(tmp_path / 'cache')!r}\nexclude_patterns = ['_build']\n"
        f"def setup(app):\n{connects}",
        encoding="utf-8",
    )
    return subprocess.run(
        [sys.executable, "-m", "sphinx", "-b", "html", "-W", "--keep-going", "-q", str(src),
         str(tmp_path / "html")],
        capture_output=True, text=True, timeout=300, cwd=tmp_path,
    )  # fmt: skip


def test_the_book_build_runs_a_quoting_page_after_its_chapter_and_fails_if_not(tmp_path):
    """myst-nb executes a page when Sphinx reads it; without the reordering the reader, which sorts first,
    runs before its chapter and the build fails; with it, the reader quotes the chapter's measurement."""
    pytest.importorskip("myst_nb")
    pytest.importorskip("ipykernel")
    unordered = _tiny_book(tmp_path / "unordered", reorder=False)
    assert unordered.returncode != 0, "the build should have failed: the reader ran before its chapter"
    assert "a/reader says 'not measured in this build'" in unordered.stderr, unordered.stderr[-2000:]

    ordered = _tiny_book(tmp_path / "ordered", reorder=True)
    assert ordered.returncode == 0, ordered.stdout[-2000:] + ordered.stderr[-2000:]
    html = (tmp_path / "ordered" / "html" / "a" / "reader.html").read_text(encoding="utf-8")
    assert 'Quoted: <span class="pasted-text">measured</span>' in html
