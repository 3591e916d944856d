"""Pytest wiring for the book: every notebook chapter listed in `_toc.yml` runs as a test.

pytest calls `pytest_collect_file` for every file under `testpaths` (see pyproject.toml). When the file
is a chapter that `_toc.yml` lists *and* a notebook, we hand back a `ChapterFile`. Its single item
converts the MyST Markdown with jupytext into a hidden `.<name>.nbmake.ipynb` beside the source, runs
it with nbmake's `NotebookItem` (the kernel starts in the chapter's folder, as in the book build, so
relative paths behave the same) and deletes the converted notebook afterwards.

A `.md` page is a notebook exactly when myst-nb would execute it: its front matter names the jupytext
format `myst` (or `file_format: mystnb`). Text-only pages such as the preface are not collected.
At the end of the run, the terminal summary lists each chapter's wall time against the budget.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml
from nbmake.pytest_items import NotebookItem

ROOT = Path(__file__).resolve().parent
TOC_PATH = ROOT / "_toc.yml"
SOURCE_SUFFIXES = (".md", ".ipynb", ".rst")
CHAPTER_BUDGET_S = float(os.environ.get("FTCOURSE_CHAPTER_BUDGET_S", "90"))
GENERATED_SUFFIX = ".nbmake.ipynb"

_WALL_TIMES = pytest.StashKey[dict[str, tuple[float, bool]]]()  # chapter -> (seconds, passed)
_TOC = pytest.StashKey["BookToc"]()


def front_matter(path: Path) -> dict:
    """The YAML block between the leading `---` lines of a Markdown file ({} when there is none)."""
    lines = path.read_text(encoding="utf-8").splitlines()
    if not lines or not lines[0].startswith("---"):
        return {}
    block = []
    for line in lines[1:]:
        if line.startswith("---") or line.startswith("..."):
            break
        block.append(line)
    try:
        meta = yaml.safe_load("\n".join(block))
    except yaml.YAMLError:
        return {}
    return meta if isinstance(meta, dict) else {}


def is_notebook(path: Path) -> bool:
    """True for an `.ipynb`, or for a `.md` that myst-nb reads as a notebook (same rule as myst-nb)."""
    if path.suffix == ".ipynb":
        return True
    if path.suffix != ".md":
        return False
    meta = front_matter(path)
    if meta.get("file_format") == "mystnb":
        return True
    jupytext = meta.get("jupytext") or {}
    return (jupytext.get("text_representation") or {}).get("format_name") == "myst"


@dataclass(frozen=True)
class BookToc:
    """The `file:` entries of a jb-book `_toc.yml`, in reading order, and where their sources lie."""

    root: Path
    entries: tuple[str, ...]

    front_matter = staticmethod(front_matter)
    is_notebook = staticmethod(is_notebook)

    @classmethod
    def load(cls, toc_path: Path = TOC_PATH) -> BookToc:
        toc = yaml.safe_load(toc_path.read_text(encoding="utf-8"))
        entries: list[str] = [toc["root"]]

        def walk(node: dict) -> None:
            if "file" in node:
                entries.append(node["file"])
            for key in ("parts", "chapters", "sections"):
                for child in node.get(key) or []:
                    walk(child)

        walk(toc)
        return cls(root=toc_path.parent, entries=tuple(entries))

    def source(self, entry: str) -> Path | None:
        """The file behind a toc entry (written with or without its suffix); None when it is missing."""
        base = self.root / entry
        if base.suffix in SOURCE_SUFFIXES and base.is_file():
            return base
        for suffix in SOURCE_SUFFIXES:
            candidate = base.with_name(base.name + suffix)
            if candidate.is_file():
                return candidate
        return None

    def missing(self) -> list[str]:
        return [entry for entry in self.entries if self.source(entry) is None]

    def notebooks(self) -> list[Path]:
        """Sources of the toc entries that execute as notebooks, in reading order."""
        sources = (self.source(entry) for entry in self.entries)
        return [path.resolve() for path in sources if path is not None and is_notebook(path)]


def _book_toc(config: pytest.Config) -> BookToc | None:
    if _TOC not in config.stash:
        try:
            config.stash[_TOC] = BookToc.load()
        except (OSError, KeyError, TypeError, yaml.YAMLError):
            return None  # tests/test_book.py reports a missing or broken _toc.yml
    return config.stash[_TOC]


class ChapterItem(NotebookItem):
    """Runs one chapter with nbmake; a MyST source is converted to a throwaway .ipynb first."""

    def __init__(self, parent: pytest.File, source: Path) -> None:
        if source.suffix == ".md":
            notebook = source.with_name(f".{source.stem}{GENERATED_SUFFIX}")
        else:
            notebook = source
        super().__init__(parent, str(notebook))
        self.source = source
        self.notebook = notebook

    def runtest(self) -> None:
        import jupytext  # imported here so that collecting the unit tests stays fast

        start, passed = time.perf_counter(), False
        try:
            if self.notebook != self.source:
                jupytext.write(jupytext.read(self.source), self.notebook)
            super().runtest()
            passed = True
        finally:
            if self.notebook != self.source:
                self.notebook.unlink(missing_ok=True)
            chapter = self.source.relative_to(ROOT).as_posix()
            wall_times = self.config.stash.setdefault(_WALL_TIMES, {})
            wall_times[chapter] = (time.perf_counter() - start, passed)

    def reportinfo(self):
        return self.path, 0, f"chapter {self.source.relative_to(ROOT).as_posix()}"


class ChapterFile(pytest.File):
    def collect(self):
        yield ChapterItem.from_parent(self, source=self.path)


def pytest_collect_file(file_path: Path, parent: pytest.Collector) -> pytest.Collector | None:
    if file_path.suffix not in (".md", ".ipynb") or file_path.name.endswith(GENERATED_SUFFIX):
        return None
    toc = _book_toc(parent.config)
    if toc is None or file_path.resolve() not in toc.notebooks():
        return None
    return ChapterFile.from_parent(parent, path=file_path)


def pytest_collection_modifyitems(session: pytest.Session, config: pytest.Config, items: list) -> None:
    """Run unit tests first, then the chapters in reading order."""
    toc = _book_toc(config)
    order = {path: index for index, path in enumerate(toc.notebooks())} if toc else {}

    def key(item: pytest.Item) -> tuple[int, int]:
        if isinstance(item, ChapterItem):
            return (1, order.get(item.source.resolve(), len(order)))
        return (0, 0)

    items.sort(key=key)  # stable: unit tests keep their own order


def pytest_terminal_summary(terminalreporter, exitstatus: int, config: pytest.Config) -> None:
    wall_times = config.stash.get(_WALL_TIMES, {})
    if not wall_times:
        return
    terminalreporter.section(f"chapter wall times (budget {CHAPTER_BUDGET_S:.0f} s each)")
    for chapter, (seconds, passed) in wall_times.items():
        verdict = "FAILED" if not passed else "OVER BUDGET" if seconds > CHAPTER_BUDGET_S else "ok"
        terminalreporter.write_line(f"{seconds:8.1f} s  {verdict:<11}  {chapter}")
    total = sum(seconds for seconds, _ in wall_times.values())
    terminalreporter.write_line(f"{total:8.1f} s  total for {len(wall_times)} chapter(s)")


@pytest.fixture(scope="session")
def book_toc() -> BookToc:
    """The book's table of contents (tests/test_book.py checks it)."""
    return BookToc.load()
