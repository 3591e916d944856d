"""The printed book (`make pdf`): _build/pdf/ftcourse.pdf, opened with pypdf and read like a reader would.

`make pdf` builds Sphinx's single-page HTML (reusing the executed chapters) and prints it with the same
Chromium the browser test drives (book/_ext/ftcourse_book.py, `print_pdf`). Here: every part and every
numbered chapter opens a page with its heading and the site's number, the math was typeset (no TeX source
left in the text), the figures are in it, and the PDF is not older than the build it was printed from.

Without a PDF these tests skip locally and fail in CI (`CI=true`), where `make test` prints it first.
"""

from __future__ import annotations

import re
import unicodedata

import pytest
import yaml
from test_site import IN_CI, SITE_ROOT, expected_numbers, ftcourse_book

PDF = SITE_ROOT / ftcourse_book.PDF_PATH
SINGLE = SITE_ROOT / ftcourse_book.SINGLE_HTML / "index.html"
# Math in the sources: $$...$$, $...$ and ```{math} blocks.
MATH = re.compile(r"\$\$(.+?)\$\$|(?<![\\$])\$([^$\n]+?)\$|```\{math\}(.+?)```", re.S)
TEX_COMMAND = re.compile(r"\\[A-Za-z]{2,}")


def _normal(text: str) -> str:
    """NFKC (the PDF's "ﬁ" ligature is "fi"), runs of white space made one space, and a line broken
    after a hyphen ("fine-⏎tuning") joined again."""
    text = re.sub(r"(?<=\w)-\s+(?=\w)", "-", unicodedata.normalize("NFKC", text))
    return re.sub(r"\s+", " ", text).strip()


def _require_pdf() -> None:
    for path in (PDF, SINGLE):
        if not path.is_file():
            reason = f"no {path.relative_to(SITE_ROOT)} (run `make pdf`)"
            if IN_CI:
                pytest.fail(f"{reason}; CI must test the PDF (make test prints it before this test)")
            pytest.skip(reason)


@pytest.fixture(scope="module")
def pages() -> list[str]:
    """The text of each page, normalized."""
    _require_pdf()
    from pypdf import PdfReader

    return [_normal(page.extract_text() or "") for page in PdfReader(PDF).pages]


def _toc() -> dict:
    return yaml.safe_load((SITE_ROOT / "_toc.yml").read_text(encoding="utf-8"))


def _title(docname: str) -> str:
    text = (SITE_ROOT / f"{docname}.md").read_text(encoding="utf-8")
    heading = re.search(r"^# (.+)$", text, flags=re.M)
    assert heading, f"{docname}.md has no `# Title` line"
    return _normal(heading.group(1).replace("`", ""))


def test_the_pdf_is_printed_from_the_current_single_page_build():
    _require_pdf()
    assert PDF.stat().st_mtime >= SINGLE.stat().st_mtime, f"{PDF} is older than {SINGLE}: run `make pdf`"


def test_each_numbered_chapter_opens_a_page_with_its_number_and_title(pages):
    numbered = {name: number for name, number in expected_numbers().items() if number and "." not in number}
    assert numbered, "the toc numbers no chapter: nothing to look for"
    missing = []
    for name, number in numbered.items():
        heading = f"{number}. {_title(name)}"
        if not any(page.startswith(heading) for page in pages):
            missing.append(heading)
    assert not missing, f"chapters whose numbered heading opens no page of {PDF.name}: {missing}"


def test_each_part_has_a_heading_page(pages):
    headings, number = [], 0
    for part in _toc().get("parts") or []:
        if part.get("numbered"):
            number += 1
            headings.append(ftcourse_book.part_caption(number, part["caption"]))
        else:
            headings.append(part["caption"])
    missing = [h for h in headings if not any(page.startswith(_normal(h)) for page in pages)]
    assert not missing, f"parts without their heading page: {missing}"


def test_page_count_fits_the_book(pages):
    toc_pages = sum(
        1 for _ in re.finditer(r"^\s*-?\s*(file|glob):", (SITE_ROOT / "_toc.yml").read_text(), re.M)
    )
    # Each part heading and each chapter starts a page; the chapters are longer than one page.
    assert len(pages) >= toc_pages + len(_toc().get("parts") or []), f"only {len(pages)} pages"
    empty = [i + 1 for i, page in enumerate(pages) if not page]
    assert len(empty) <= len(pages) // 20, f"pages with no text at all: {empty}"


def test_no_tex_source_is_left(pages):
    commands = set()
    for source in sorted((SITE_ROOT / "book").rglob("*.md")):
        for match in MATH.finditer(source.read_text(encoding="utf-8")):
            commands.update(TEX_COMMAND.findall("".join(group or "" for group in match.groups())))
    assert r"\frac" in commands, (
        f"found no \\frac in the book's math ({sorted(commands)[:10]}): pattern broken"
    )
    text = "\n".join(pages)
    left = sorted(c for c in commands if re.search(re.escape(c) + r"(?![A-Za-z])", text))
    assert not left, f"TeX commands printed as text (MathJax did not typeset them): {left}"
    assert "$$" not in text, "a $$ display-math delimiter is printed as text"


def test_figures_are_in_the_pdf():
    _require_pdf()
    from pypdf import PdfReader

    html = SINGLE.read_text(encoding="utf-8")
    rasters = set(re.findall(r"""<img\b[^>]*\bsrc="([^"]+\.(?:png|jpe?g))""", html))
    assert rasters, f"{SINGLE} has no PNG or JPEG figure: nothing to look for"
    images = 0
    for page in PdfReader(PDF).pages:
        objects = (page.get("/Resources") or {}).get("/XObject") or {}
        images += sum(1 for ref in objects.values() if ref.get_object().get("/Subtype") == "/Image")
    assert images >= len(rasters), f"{len(rasters)} figures in the single page, {images} images in the PDF"
