"""Citing the book and the papers it cites: CITATION.cff, the bibliography and the "Cite this section" text.

The boxes themselves are built by book/_ext/ftcourse_book.py; the browser test (tests/test_site.py) checks
that each built chapter page shows one. Here: the inputs they are built from agree with each other, the
entries they print match a hand-written case, and references.bib holds exactly the works the book cites,
each with a DOI or an arXiv id.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "book" / "_ext"))

import ftcourse_book  # noqa: E402  (lives in book/_ext, not in the package)

BIB = REPO / "references.bib"
# A citation in MyST ({cite}`a`, {cite:p}`a,b`, {cite:t}`a`, ...) or in reST (:cite:p:`a`).
CITE_ROLE = re.compile(r"(?:\{cite(?::\w+)?\}|:cite(?::\w+)?:)`([^`]+)`")
# Papers that have neither a DOI nor an arXiv id, each with the reason; they must carry a `url` instead.
# (Software, documentation and announcements are @misc entries with a url, a year and a note.)
NO_IDENTIFIER = {
    "radford2019gpt2": "the GPT-2 report was published by OpenAI only, with no DOI and no arXiv id",
}
ARXIV_ID = re.compile(r"^\d{4}\.\d{4,5}(v\d+)?$|^[a-z-]+(\.[A-Z]{2})?/\d{7}$")
DOI = re.compile(r"^10\.\d{4,9}/\S+$")
# The first link inside a howpublished field: \url{https://...}
WEB_URL = re.compile(r"\\url\{(https://[^}]+)\}")


def _config() -> dict:
    return yaml.safe_load((REPO / "_config.yml").read_text(encoding="utf-8"))


def _cff() -> dict:
    return yaml.safe_load((REPO / "CITATION.cff").read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def bibliography():
    from pybtex.database import parse_file

    return parse_file(str(BIB), bib_format="bibtex")


def cited_keys(root: Path = REPO) -> dict[str, list[str]]:
    """Every key cited in book/**/*.md, with the pages that cite it."""
    found: dict[str, list[str]] = {}
    for page in sorted((root / "book").rglob("*.md")):
        if any(part.startswith(".") or part == "_build" for part in page.relative_to(root).parts):
            continue
        for match in CITE_ROLE.finditer(page.read_text(encoding="utf-8")):
            for key in match.group(1).split(","):
                found.setdefault(key.strip(), []).append(page.relative_to(root).as_posix())
    return found


# --- CITATION.cff and the configuration it must agree with ------------------------------------------


def test_citation_file_version_is_the_package_version():
    cff, package = str(_cff()["version"]), ftcourse_book.book_version(REPO)
    assert cff == package, (
        f"CITATION.cff says version {cff} but pyproject.toml says {package}: set `version: {package}` in"
        " CITATION.cff (and `date-released` to the release day)"
    )


def test_citation_file_url_is_the_sites_base_url():
    base = _config()["html"]["baseurl"]
    assert base.startswith("https://") and base.endswith("/"), (
        f"html.baseurl {base!r}: an https URL ending in /"
    )
    assert _cff()["url"] == base, f"CITATION.cff url {_cff()['url']!r} differs from _config.yml html.baseurl"
    assert _cff()["repository-code"] == _config()["repository"]["url"]


def test_citation_metadata_reads_the_files():
    meta = ftcourse_book.citation_metadata(REPO)
    assert meta["version"] == ftcourse_book.book_version(REPO)
    assert meta["year"] == str(_cff()["date-released"])[:4]
    assert meta["title"] == _cff()["title"]
    assert meta["authors"] and all("name" in a or "family" in a for a in meta["authors"])


def test_citation_metadata_names_what_is_missing(tmp_path):
    (tmp_path / "pyproject.toml").write_text('[project]\nname = "x"\nversion = "1.0"\n', encoding="utf-8")
    (tmp_path / "CITATION.cff").write_text("cff-version: 1.2.0\ntitle: A book\n", encoding="utf-8")
    with pytest.raises(ValueError, match="authors, date-released, version"):
        ftcourse_book.citation_metadata(tmp_path)
    (tmp_path / "CITATION.cff").unlink()
    with pytest.raises(FileNotFoundError, match="CITATION.cff is missing"):
        ftcourse_book.citation_metadata(tmp_path)


# --- the "Cite this section" entries, against hand-written ones -------------------------------------

META = {
    "title": "A Book on Fine-Tuning",
    "authors": [{"family": "Lovelace", "given": "Ada Augusta"}, {"name": "The R&D team"}],
    "year": "2026",
    "version": "0.3.1",
}
URL = "https://example.org/book/part2/lora.html"


def test_cite_entries_for_a_numbered_section():
    bibtex, apa = ftcourse_book.cite_entries(META, "5", "Rank, alpha & 100% targets", URL, "book/part2/lora")
    assert bibtex == (
        "@incollection{ftcourse2026sec5,\n"
        "  author    = {Lovelace, Ada Augusta and {The R\\&D team}},\n"
        "  title     = {{Rank, alpha \\& 100\\% targets}},\n"
        "  booktitle = {{A Book on Fine-Tuning}},\n"
        "  year      = {2026},\n"
        "  version   = {0.3.1},\n"
        "  note      = {Version 0.3.1, Section 5. \\url{https://example.org/book/part2/lora.html}},\n"
        "}"
    )
    assert apa == (
        "Lovelace, A. A., & The R&D team. (2026). Rank, alpha & 100% targets. In *A Book on Fine-Tuning*"
        " (Version 0.3.1, Section 5). https://example.org/book/part2/lora.html"
    )


def test_cite_entries_for_an_unnumbered_page():
    meta = {**META, "authors": [{"name": "ftcourse contributors"}]}
    bibtex, apa = ftcourse_book.cite_entries(meta, None, "Why fine-tune?", URL, "book/appendix/Quick-Ref")
    assert bibtex.startswith("@incollection{ftcourse2026book-appendix-quick-ref,\n")
    assert "Section" not in bibtex and f"  note      = {{Version 0.3.1. \\url{{{URL}}}}},\n" in bibtex
    assert apa == (
        "ftcourse contributors. (2026). Why fine-tune? In *A Book on Fine-Tuning* (Version 0.3.1)."
        " https://example.org/book/part2/lora.html"
    )


# --- the BibTeX as the standard styles print it ------------------------------------------------------

SECTION_URL = "https://example.org/book/v0.3.1/cite/sec-24-3.html"


def _section_entry() -> str:
    return ftcourse_book.cite_entries(META, "24.3", "Paired tests", SECTION_URL, "book/part5/evaluating")[0]


def test_the_entry_fills_every_field_each_style_prints():
    """plain.bst and apalike.bst (`incollection`) and biblatex's `incollection` driver (authoryear) print
    author, title, booktitle, year and note, and neither BibTeX style prints `url` or `version`: so the
    version, section and URL must be in `note`."""
    from pybtex.database import parse_string

    entry = parse_string(_section_entry(), "bibtex").entries["ftcourse2026sec24-3"]
    assert entry.type == "incollection"
    fields = {name.lower() for name in entry.fields} | ({"author"} if entry.persons.get("author") else set())
    for style, reads in ftcourse_book.STYLE_FIELDS.items():
        assert set(reads) <= fields, f"{style} prints {reads}; the entry lacks {set(reads) - fields}"
        assert "url" not in reads and "version" not in reads, f"{style}: update the note logic"
    note = entry.fields["note"]
    assert "Version 0.3.1" in note and "Section 24.3" in note and f"\\url{{{SECTION_URL}}}" in note
    assert "url" not in {name.lower() for name in entry.fields}, "a url field: biblatex prints the URL twice"
    assert "#" not in SECTION_URL and "#" not in note, (
        "a # in a BibTeX field breaks biblatex: use a permalink"
    )


@pytest.mark.parametrize("style", ["plain", "apalike"])
def test_bibtex_prints_author_titles_version_year_and_url(style, tmp_path):
    """Runs the real BibTeX with the standard style on the entry and reads the .bbl it writes."""
    import shutil
    import subprocess

    if not shutil.which("bibtex") or not shutil.which("kpsewhich"):
        pytest.skip(
            "no BibTeX here (Debian: apt-get install texlive-binaries texlive-base): fields checked above"
        )
    if subprocess.run(["kpsewhich", f"{style}.bst"], capture_output=True, text=True).stdout.strip() == "":
        pytest.skip(f"no {style}.bst (Debian: texlive-base)")
    (tmp_path / "refs.bib").write_text(_section_entry() + "\n", encoding="utf-8")
    (tmp_path / "doc.aux").write_text(
        f"\\citation{{ftcourse2026sec24-3}}\n\\bibstyle{{{style}}}\n\\bibdata{{refs}}\n", encoding="utf-8"
    )
    run = subprocess.run(["bibtex", "doc"], cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert run.returncode in (0, 1), run.stdout + run.stderr  # 1: warnings (no publisher), not errors
    bbl = " ".join((tmp_path / "doc.bbl").read_text(encoding="utf-8").replace("~", " ").split())
    for what in ("Ada Augusta Lovelace" if style == "plain" else "Lovelace", "The R\\&D team",
                 "Paired tests", "A Book on Fine-Tuning", "Version 0.3.1", "Section 24.3", "2026",
                 f"\\url{{{SECTION_URL}}}"):  # fmt: skip
        assert what.lower() in bbl.lower(), f"{style} does not print {what!r}: {bbl}"
    assert "error" not in run.stdout.lower(), run.stdout


def test_pages_have_distinct_titles():
    """Two pages titled alike ("Self-check") would cite alike; each toc page's title is its own."""
    toc = (REPO / "_toc.yml").read_text(encoding="utf-8")
    titles: dict[str, str] = {}
    for name in re.findall(r"^\s*(?:-\s*)?(?:file|root):\s*(\S+)", toc, flags=re.M):
        title = re.search(r"^# (.+)$", (REPO / f"{name}.md").read_text(encoding="utf-8"), flags=re.M)
        assert title, f"{name}.md has no title"
        assert title.group(1) not in titles, f"{name} and {titles.get(title.group(1))} share a title"
        titles[title.group(1)] = name


def test_cite_box_escapes_html_and_carries_number_and_url():
    box = ftcourse_book.cite_box_html(META, "12", "<Tags> & more", URL, "x")
    assert box.startswith('<details class="ftcourse-cite" id="cite-this-section" data-section="12"')
    assert f'data-url="{URL}"' in box and "<summary>Cite this section</summary>" in box
    assert "&lt;Tags&gt; &amp; more" in box and "<Tags>" not in box
    assert "<em>A Book on Fine-Tuning</em>" in box


@pytest.mark.parametrize(
    ("number", "expected"),
    [(1, "I"), (4, "IV"), (5, "V"), (9, "IX"), (14, "XIV"), (40, "XL"), (1994, "MCMXCIV")],
)
def test_roman(number, expected):
    assert ftcourse_book.roman(number) == expected


def test_roman_rejects_zero():
    with pytest.raises(ValueError, match="got 0"):
        ftcourse_book.roman(0)


def test_part_caption():
    assert ftcourse_book.part_caption(3, "Supervised fine-tuning") == "Part III: Supervised fine-tuning"


def test_page_url_joins_without_double_slashes():
    assert ftcourse_book.page_url("https://a.org/b/", "/c/d.html") == "https://a.org/b/c/d.html"
    assert ftcourse_book.page_url("https://a.org/b", "c/d.html") == "https://a.org/b/c/d.html"


# --- stable labels ------------------------------------------------------------------------------------


def test_every_toc_page_opens_with_a_label_over_its_title():
    toc = (REPO / "_toc.yml").read_text(encoding="utf-8")
    files = re.findall(r"^\s*(?:-\s*)?(?:file|root):\s*(\S+)", toc, flags=re.M)
    assert len(files) > 10, f"read only {files} from _toc.yml"
    labels: dict[str, str] = {}
    for name in files:
        text = (REPO / f"{name}.md").read_text(encoding="utf-8")
        title = re.search(r"^# .+$", text, flags=re.M)
        assert title, f"{name}.md has no `# Title` line"
        before = text[: title.start()].rstrip("\n").rsplit("\n", 1)[-1]
        label = re.fullmatch(r"\(([\w-]+)\)=", before)
        assert label, f"{name}.md: put a label such as `({Path(name).name})=` on the line above its title"
        assert label.group(1) not in labels, f"label {label.group(1)} is used by {labels.get(label.group(1))}"
        labels[label.group(1)] = name


# --- the bibliography ---------------------------------------------------------------------------------


def test_every_entry_has_a_doi_or_an_arxiv_id(bibliography):
    lacking = []
    for key, entry in bibliography.entries.items():
        fields = {name.lower(): value.strip() for name, value in entry.fields.items()}
        doi, eprint = fields.get("doi", ""), fields.get("eprint", "")
        if doi:
            assert DOI.match(doi), (
                f"{key}: doi {doi!r} is not a DOI (10.NNNN/...; no https://doi.org/ prefix)"
            )
        if eprint:
            assert fields.get("archiveprefix", "").lower() == "arxiv", f"{key}: eprint without archivePrefix"
            assert ARXIV_ID.match(eprint), f"{key}: eprint {eprint!r} is not an arXiv id such as 2106.09685"
        if key in NO_IDENTIFIER:
            assert not (doi or eprint), f"{key} now has an identifier: remove it from NO_IDENTIFIER"
            assert fields.get("url", "").startswith("https://"), f"{key} ({NO_IDENTIFIER[key]}) needs a url"
        elif entry.type.lower() == "misc" and not (doi or eprint):
            # software, documentation, announcements: where it is, and which version or date it holds for
            link = fields.get("url", "") or " ".join(WEB_URL.findall(fields.get("howpublished", "")))
            assert link.startswith("https://"), f"{key}: a @misc source needs an https url or howpublished"
            assert fields.get("year") and fields.get("note"), (
                f"{key}: a @misc source needs a year and a note naming the version, page or section cited"
            )
        elif not (doi or eprint):
            lacking.append(key)
    assert not lacking, f"entries with neither `doi` nor `eprint` (arXiv id) in references.bib: {lacking}"


def test_every_cited_key_is_in_the_bibliography(bibliography):
    cited = cited_keys()
    assert len(cited) > 10, f"found only {sorted(cited)} cited: is the citation pattern broken?"
    unknown = {key: pages for key, pages in cited.items() if key not in bibliography.entries}
    assert not unknown, f"cited but not in references.bib (key: pages): {unknown}"


def test_every_bibliography_entry_is_cited(bibliography):
    cited = cited_keys()
    uncited = sorted(key for key in bibliography.entries if key not in cited)
    assert not uncited, (
        f"entries in references.bib that no page cites: {uncited}. Cite each where the book relies on it,"
        " or remove it"
    )


def test_bibliography_keys_are_unique():
    keys = re.findall(r"^@\w+\{([^,\s]+),", BIB.read_text(encoding="utf-8"), flags=re.M)
    duplicates = sorted({key for key in keys if keys.count(key) > 1})
    assert not duplicates, f"keys defined twice in references.bib: {duplicates}"


def test_cite_pattern_reads_every_form():
    text = "{cite}`a` {cite:p}`b, c` {cite:t}`d` :cite:p:`e` {cite:ps}`f`"
    keys = [key.strip() for match in CITE_ROLE.finditer(text) for key in match.group(1).split(",")]
    assert keys == ["a", "b", "c", "d", "e", "f"]
