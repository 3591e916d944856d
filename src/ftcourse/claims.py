"""Numbers one page glued, read back for another: the claims ledger and the self-check pages quote them.

myst-nb's glue pastes a value only inside the page that glued it. The book's execution cache holds every
chapter that `pytest` (conftest.py) or the book build executed, as a notebook with its outputs; a glue
output carries its value as the `text/plain` repr of its mime bundle (under myst-nb's
`application/papermill.record/` prefix when glued with `display=False`). This module reads those values.

A chapter that is not in the cache (not run yet in this build, or run with FTCOURSE_EXECUTION_CACHE=0)
gives the sentence `not measured in this build (...)`, naming the chapter: never a number. A name that a
cached chapter did not glue is an error, so a renamed glue name cannot go unnoticed.
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
_NUMPY_REPR = re.compile(r"^np\.(?:float|int|uint|bool)\w*\((.*)\)$")


def parse_plain(text: str) -> Any:
    """The Python value behind a `text/plain` repr ('0.5', "'a'", 'np.float64(1.5)'); else the text itself."""
    text = text.strip()
    match = _NUMPY_REPR.match(text)
    if match:
        text = match.group(1)
    elif text in ("np.True_", "np.False_"):
        return text == "np.True_"
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


def book_cache_path(root: str | Path) -> Path:
    """The execution cache folder for the current package, pins and profile (the book extension's rule)."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV])
    path = Path(root) / EXTENSION
    if not path.is_file():
        raise FileNotFoundError(f"root: {root} has no {EXTENSION}; pass the book's repository root.")
    spec = importlib.util.spec_from_file_location("_ftcourse_book_for_claims", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # type: ignore[union-attr]
    return Path(module.execution_cache_path(Path(root)))


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
    """The glued values of one chapter, or None when the chapter has no cached run in this build."""

    chapter: str  # path from the book root, e.g. "book/part2/dora.md"
    values: Mapping[str, Any] | None

    @property
    def measured(self) -> bool:
        """True when the chapter ran in this build (its cache entry exists)."""
        return self.values is not None

    def missing_text(self) -> str:
        """What a page shows instead of a number when the chapter has not run in this build."""
        return f"not measured in this build ({self.chapter} has not run)"

    def value(self, name: str) -> Any:
        """The value glued under `name`; LookupError when the chapter has not run or glued no such name."""
        if self.values is None:
            raise LookupError(
                f"{self.chapter} has no executed copy in the execution cache, so {name!r} is unknown. "
                "Run the chapter first (pytest, FTCOURSE_EXECUTION_CACHE left on), or use text() for a page."
            )
        if name not in self.values:
            known = ", ".join(sorted(self.values)) or "nothing"
            raise KeyError(
                f"{self.chapter} glued no value named {name!r} (it glues: {known}). "
                "The chapter renamed or dropped it: update the page that quotes it."
            )
        return self.values[name]

    def text(self, name: str, spec: str = "") -> str:
        """The glued value formatted with `spec` (ignored for text), or the not-measured sentence."""
        if self.values is None:
            return self.missing_text()
        value = self.value(name)
        if spec and isinstance(value, (int, float)) and not isinstance(value, bool):
            return format(value, spec)
        return str(value)

    def fill(self, template: str) -> str:
        """`template` with `{name:spec}` fields filled from the glued values, or the not-measured sentence."""
        if self.values is None:
            return self.missing_text()
        names = [field for _, field, _, _ in string.Formatter().parse(template) if field]
        for name in names:
            self.value(name)  # a name the chapter did not glue: the clear KeyError, not format_map's
        return template.format_map(self.values)


def chapter_values(
    chapter: str | Path, root: str | Path, cache_path: str | Path | None = None
) -> ChapterValues:
    """The glued values of `chapter` (a path from `root`) as this build's execution cache holds them."""
    root = Path(root)
    source = root / chapter
    if not source.is_file():
        raise FileNotFoundError(f"chapter: {source} does not exist; give a path from the book root.")
    notebook = cached_notebook(cache_path if cache_path is not None else book_cache_path(root), source)
    return ChapterValues(Path(chapter).as_posix(), None if notebook is None else glue_values(notebook))
