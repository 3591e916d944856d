"""ftcourse.claims reads glued values back from an execution cache written the way conftest.py writes it."""

from __future__ import annotations

import sys
from pathlib import Path

import nbformat
import numpy as np
import pytest
from jupyter_cache import get_cache
from jupyter_cache.base import CacheBundleIn

from ftcourse import claims

ROOT = Path(__file__).resolve().parents[1]
CHAPTER = "book/partX/toy.md"


def glue_output(name: str, value: object, display: bool = False) -> dict:
    """The output that myst_nb.glue(name, value, display) leaves in a cell (same mime layout)."""
    prefix = "" if display else claims.GLUE_PREFIX
    return nbformat.v4.new_output(
        "display_data",
        data={prefix + "text/plain": repr(value)},
        metadata={"scrapbook": {"name": name, "mime_prefix": prefix}},
    )


@pytest.fixture(scope="module")
def book(tmp_path_factory) -> tuple[Path, Path]:
    """A book root with one chapter and its executed notebook cached the way conftest.cache_executed does."""
    root = tmp_path_factory.mktemp("book")
    source = root / CHAPTER
    source.parent.mkdir(parents=True)
    source.write_text("# a chapter\n", encoding="utf-8")
    cell = nbformat.v4.new_code_cell("glue(...)")
    cell.outputs = [
        glue_output("em", np.float64(62.5)),
        glue_output("verdict", "within noise"),
        glue_output("n_test", 100, display=True),
        nbformat.v4.new_output("stream", name="stdout", text="not a glue output\n"),
    ]
    notebook = nbformat.v4.new_notebook(cells=[nbformat.v4.new_markdown_cell("text"), cell])
    cache_path = root / "cache"
    cache = get_cache(str(cache_path))
    cache.cache_notebook_bundle(CacheBundleIn(notebook, str(source)), check_validity=False, overwrite=True)
    return root, cache_path


def test_a_cached_chapter_gives_back_its_glued_values(book):
    root, cache_path = book
    chapter = claims.chapter_values(CHAPTER, root, cache_path)
    assert chapter.measured
    assert chapter.value("em") == 62.5 and isinstance(chapter.value("em"), float)
    assert chapter.value("n_test") == 100
    assert chapter.text("em", ".0f") == "62"  # hand-worked: 62.5 rounds to the even 62
    assert chapter.text("verdict", ".0f") == "within noise"  # a format spec does not apply to text


def test_a_sentence_is_filled_from_the_glued_values(book, tmp_path):
    root, cache_path = book
    chapter = claims.chapter_values(CHAPTER, root, cache_path)
    assert (
        chapter.fill("{em:.1f}% on {n_test} questions, {verdict}") == "62.5% on 100 questions, within noise"
    )
    with pytest.raises(KeyError, match="glued no value named 'em_lora'"):
        chapter.fill("{em_lora:.1f}")
    missing = claims.chapter_values(CHAPTER, root, tmp_path / "none")
    assert missing.fill("{em:.1f}%") == missing.missing_text()


def test_a_name_the_chapter_did_not_glue_is_a_clear_error(book):
    root, cache_path = book
    chapter = claims.chapter_values(CHAPTER, root, cache_path)
    with pytest.raises(
        KeyError, match=r"book/partX/toy.md glued no value named 'em_dora'.*em, n_test, verdict"
    ):
        chapter.text("em_dora")


def test_a_chapter_missing_from_the_cache_says_so_and_never_gives_a_number(book, tmp_path):
    root, _ = book
    empty = tmp_path / "no-cache"
    chapter = claims.chapter_values(CHAPTER, root, empty)
    assert not chapter.measured
    assert chapter.text("em", ".1f") == "not measured in this build (book/partX/toy.md has not run)"
    with pytest.raises(LookupError, match="no executed copy"):
        chapter.value("em")
    assert not empty.exists()  # looking did not create a cache


def test_a_chapter_that_does_not_exist_is_named(book):
    root, cache_path = book
    with pytest.raises(FileNotFoundError, match="book/partX/nope.md does not exist"):
        claims.chapter_values("book/partX/nope.md", root, cache_path)


@pytest.mark.parametrize(
    ("text", "value"),
    [
        ("np.float64(16.59375)", 16.59375),
        ("'1.9e-06'", "1.9e-06"),
        ("np.True_", True),
        ("3", 3),
        ("<Figure size 640x480 with 1 Axes>", "<Figure size 640x480 with 1 Axes>"),
    ],
)
def test_plain_reprs_parse_back(text, value):
    assert claims.parse_plain(text) == value


def test_the_cache_path_is_the_book_extensions():
    sys.path.insert(0, str(ROOT / "book" / "_ext"))
    import ftcourse_book

    assert claims.book_root(ROOT / "book" / "appendix") == ROOT
    assert claims.book_cache_path(ROOT) == ftcourse_book.execution_cache_path(ROOT)


def test_a_cache_folder_can_be_named_in_the_environment(book, monkeypatch):
    root, cache_path = book
    monkeypatch.setenv(claims.CACHE_ENV, str(cache_path))
    assert claims.book_cache_path(ROOT) == cache_path
    assert claims.chapter_values(CHAPTER, root).value("n_test") == 100
