"""Numbers one page glued, read back for another: the claims ledger and the self-check pages quote them.

myst-nb's glue pastes a value only inside the page that glued it. A glue output carries its value as the
`text/plain` repr of its mime bundle (under myst-nb's `application/papermill.record/` prefix when glued
with `display=False`). This module reads those values from an executed copy of the chapter, found in

1. the session store that the chapter runner (conftest.py) fills as each chapter passes, named by the
   environment variable FTCOURSE_GLUE_STORE: this run's values, and the only copy under the spark
   stand-ins, whose runs are never cached; else
2. the book's execution cache, which holds every chapter that `pytest` or the book build executed.

A chapter found in neither has not run, and a page that quotes it fails with `ChapterNotRun`, which says
what to run: it never shows a placeholder instead of a number. A name that the chapter did not glue is a
`KeyError`, so a renamed glue name cannot go unnoticed. The book build reads the quoting pages after the
chapters they quote (book/_ext/ftcourse_book.py, `reading_order`).
"""

from __future__ import annotations

import ast
import importlib.util
import os
import re
import string
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

GLUE_PREFIX = "application/papermill.record/"
EXTENSION = Path("book") / "_ext" / "ftcourse_book.py"
CACHE_ENV = "FTCOURSE_CLAIMS_CACHE"  # read another build's cache folder instead (e.g. to preview a page)
STORE_ENV = "FTCOURSE_GLUE_STORE"  # = ftcourse_book.GLUE_STORE_ENV (tests/test_claims.py checks)
_NUMPY_REPR = re.compile(r"^np\.(?:float|int|uint|bool)\w*\((.*)\)$")


def parse_plain(text: str) -> Any:
    """The Python value behind a `text/plain` repr ('0.5', "'a'", 'np.float64(1.5)'); else the text itself."""
    text = text.strip()
    match = _NUMPY_REPR.match(text)
    if match:
        text = match.group(1)
    elif text in ("np.True_", "np.False_"):
        return text == "np.True_"
    if text in ("nan", "inf", "-inf"):  # repr of a float that literal_eval cannot read back
        return float(text)
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def glue_values(notebook: Any) -> dict[str, Any]:
    """Every value an executed notebook glued, by glue name (figures come back as their text repr)."""
    values: dict[str, Any] = {}
    for cell in notebook["cells"]:
        for output in cell.get("outputs", []) if cell["cell_type"] == "code" else []:
            scrapbook = (output.get("metadata") or {}).get("scrapbook")
            if not scrapbook:
                continue
            prefix = scrapbook.get("mime_prefix", "")
            plain = (output.get("data") or {}).get(prefix + "text/plain")
            if plain is not None:
                values[scrapbook["name"]] = parse_plain("".join(plain) if isinstance(plain, list) else plain)
    return values


def book_root(start: str | Path = ".") -> Path | None:
    """The book's repository root (the folder with `_toc.yml` and the book extension) at or above `start`."""
    here = Path(start).resolve()
    for folder in (here, *here.parents):
        if (folder / "_toc.yml").is_file() and (folder / EXTENSION).is_file():
            return folder
    return None


def _book_extension(root: str | Path) -> Any:
    """The book's Sphinx extension module (it owns the cache key and the store's file names)."""
    path = Path(root) / EXTENSION
    if not path.is_file():
        raise FileNotFoundError(f"root: {root} has no {EXTENSION}; pass the book's repository root.")
    spec = importlib.util.spec_from_file_location("_ftcourse_book_for_claims", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # type: ignore[union-attr]
    return module


def book_cache_path(root: str | Path) -> Path:
    """The execution cache folder for the current package, pins and profile (the book extension's rule)."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV])
    return Path(_book_extension(root).execution_cache_path(Path(root)))


def store_file(store: str | Path, chapter: str | Path) -> Path:
    """Where the session store keeps a chapter's executed notebook (= ftcourse_book.glue_store_file)."""
    return Path(store) / (Path(chapter).as_posix().replace("/", "__") + ".ipynb")


def stored_notebook(store: str | Path, chapter: str | Path) -> Any | None:
    """The executed notebook the session store holds for `chapter` (a path from the root); None if none."""
    import nbformat

    path = store_file(store, chapter)
    return nbformat.read(str(path), as_version=4) if path.is_file() else None


class ChapterNotRun(LookupError):
    """A page quotes a chapter that has no executed copy in this run's store or the execution cache."""


def cached_notebook(cache_path: str | Path, source: str | Path) -> Any | None:
    """The newest executed notebook that the cache holds for `source` (a chapter's path); None if none."""
    cache_path, source = Path(cache_path), Path(source).resolve()
    if not (cache_path / "global.db").is_file():
        return None  # no cache yet: do not create one just by looking
    from jupyter_cache import get_cache

    cache = get_cache(str(cache_path))
    records = [r for r in cache.list_cache_records() if Path(r.uri).resolve() == source]
    if not records:
        return None
    newest = max(records, key=lambda record: record.created)
    return cache.get_cache_bundle(newest.pk).nb


@dataclass
class ChapterValues:
    """The glued values of one chapter, or None when the chapter has not run (neither stored nor cached)."""

    chapter: str  # path from the book root, e.g. "book/part2/dora.md"
    values: Mapping[str, Any] | None
    found_in: str = "the execution cache"  # where the values were read: the session store or the cache

    @property
    def measured(self) -> bool:
        """True when the chapter ran (this session stored it, or the execution cache holds it)."""
        return self.values is not None

    def not_run(self, name: str) -> ChapterNotRun:
        """The error a page raises when it quotes `name` from a chapter that has not run."""
        return ChapterNotRun(
            f"{self.chapter} has not run, so its value {name!r} is unknown: there is no executed copy in "
            f"this session's glue store (${STORE_ENV}) or in the book's execution cache. A page that "
            f"quotes a chapter must run after it. Run the chapter first (`pytest {self.chapter}`, then "
            "this page; `pytest book` runs them in the toc's order), or build the book, which reads such "
            "pages after the chapters they quote."
        )

    def value(self, name: str) -> Any:
        """The value glued under `name`: ChapterNotRun if the chapter has not run, KeyError if none."""
        if self.values is None:
            raise self.not_run(name)
        if name not in self.values:
            known = ", ".join(sorted(self.values)) or "nothing"
            raise KeyError(
                f"{self.chapter} glued no value named {name!r} (it glues: {known}). "
                "The chapter renamed or dropped it: update the page that quotes it."
            )
        return self.values[name]

    def text(self, name: str, spec: str = "") -> str:
        """The glued value formatted with `spec` (ignored for text); ChapterNotRun if it has not run."""
        value = self.value(name)
        if spec and isinstance(value, (int, float)) and not isinstance(value, bool):
            return format(value, spec)
        return str(value)

    def fill(self, template: str) -> str:
        """`template` with its `{name:spec}` fields filled from the glued values (errors as value())."""
        for name in template_fields(template):
            self.value(name)  # not run, or a name the chapter did not glue: the clear error, not format_map's
        return template.format_map(self.values or {})


def template_fields(template: str) -> list[str]:
    """The glue names a `fill` template quotes, in order: `"{em:.1f}% of {n}"` gives `["em", "n"]`."""
    return [field for _, field, _, _ in string.Formatter().parse(template) if field]


def chapter_values(
    chapter: str | Path, root: str | Path, cache_path: str | Path | None = None
) -> ChapterValues:
    """The glued values of `chapter` (a path from `root`): this session's run if stored, else the cache's."""
    root = Path(root)
    source = root / chapter
    if not source.is_file():
        raise FileNotFoundError(f"chapter: {source} does not exist; give a path from the book root.")
    name = Path(chapter).as_posix()
    store = os.environ.get(STORE_ENV)
    if store:
        notebook = stored_notebook(store, name)
        if notebook is not None:
            return ChapterValues(name, glue_values(notebook), found_in="this session's glue store")
    notebook = cached_notebook(cache_path if cache_path is not None else book_cache_path(root), source)
    return ChapterValues(name, None if notebook is None else glue_values(notebook))
