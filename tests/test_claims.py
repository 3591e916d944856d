"""ftcourse.claims reads glued values back from an execution cache written the way conftest.py writes it."""

from __future__ import annotations

import ast
import math
import re
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
    with pytest.raises(claims.ChapterNotRun, match="book/partX/toy.md has not run"):
        missing.fill("{em:.1f}%")


def test_a_name_the_chapter_did_not_glue_is_a_clear_error(book):
    root, cache_path = book
    chapter = claims.chapter_values(CHAPTER, root, cache_path)
    with pytest.raises(
        KeyError, match=r"book/partX/toy.md glued no value named 'em_dora'.*em, n_test, verdict"
    ):
        chapter.text("em_dora")


def test_a_chapter_that_has_not_run_is_an_error_that_says_what_to_run(book, tmp_path, monkeypatch):
    """Never a placeholder sentence in place of a number: the page fails and names the chapter."""
    root, _ = book
    monkeypatch.delenv(claims.STORE_ENV, raising=False)
    empty = tmp_path / "no-cache"
    chapter = claims.chapter_values(CHAPTER, root, empty)
    assert not chapter.measured
    for read in (
        lambda: chapter.text("em", ".1f"),
        lambda: chapter.fill("{em}"),
        lambda: chapter.value("em"),
    ):
        with pytest.raises(
            claims.ChapterNotRun, match=r"book/partX/toy.md has not run.*pytest book/partX/toy.md"
        ):
            read()
    assert issubclass(claims.ChapterNotRun, LookupError)
    assert not empty.exists()  # looking did not create a cache


def test_the_session_store_is_read_before_the_cache(book, tmp_path, monkeypatch):
    """Under the spark stand-ins nothing is cached: a page finds the values in the runner's store."""
    root, cache_path = book
    sys.path.insert(0, str(ROOT / "book" / "_ext"))
    import ftcourse_book

    assert claims.STORE_ENV == ftcourse_book.GLUE_STORE_ENV
    cell = nbformat.v4.new_code_cell("glue(...)")
    cell.outputs = [glue_output("em", np.float64(12.5)), glue_output("verdict", "fresh")]
    executed = nbformat.v4.new_notebook(cells=[cell])
    store = tmp_path / "store"
    written = ftcourse_book.store_glued(store, root, root / CHAPTER, executed)
    assert written == ftcourse_book.glue_store_file(store, CHAPTER) == claims.store_file(store, CHAPTER)
    assert written.is_file()

    monkeypatch.setenv(claims.STORE_ENV, str(store))
    fresh = claims.chapter_values(CHAPTER, root, tmp_path / "no-cache")  # no cache at all: the store serves
    assert fresh.value("em") == 12.5 and fresh.found_in == "this session's glue store"
    assert claims.chapter_values(CHAPTER, root, cache_path).value("verdict") == "fresh"  # store first
    monkeypatch.setenv(claims.STORE_ENV, str(tmp_path / "empty-store"))
    assert claims.chapter_values(CHAPTER, root, cache_path).value("verdict") == "within noise"  # then cache


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
        ("np.float64(inf)", float("inf")),
        ("-inf", float("-inf")),
        ("3", 3),
        ("<Figure size 640x480 with 1 Axes>", "<Figure size 640x480 with 1 Axes>"),
    ],
)
def test_plain_reprs_parse_back(text, value):
    assert claims.parse_plain(text) == value


def test_a_nan_parses_back_as_a_float_so_a_page_can_format_it():
    """An empty comparison glues nan (0 of 0); the page formats it with `:.0f` like any other number."""
    for text in ("nan", "np.float64(nan)"):
        value = claims.parse_plain(text)
        assert isinstance(value, float) and math.isnan(value) and format(value, ".0f") == "nan"


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


# ---------------------------------------------------------------------------------------------------
# The pages that quote chapters: a number in an answer is glued, and every quoted glue name exists.

QUOTING_PAGES = sorted(ROOT.glob("book/part*/self-check.md")) + [ROOT / "book/appendix/claims-ledger.md"]
_CODE_CELL = re.compile(r"^```\{code-cell\}[^\n]*\n(.*?)^```\s*$", re.S | re.M)
_ANSWER = re.compile(r"^:::\{dropdown\} Answer\s*\n(.*?)^:::\s*$", re.S | re.M)
# Ledger paragraphs that state what this book found (paper paragraphs quote the paper, with a citation).
_LEDGER_OWN = re.compile(
    r"^\*\*(Measured in this book|Recomputed here|What the toy can test)\b.*?(?=^\s*$)", re.S | re.M
)
# What is not prose: roles ({glue:text}`x`, {cite}`y`, {doc}`z` with the section titles it names), inline
# code, math, links' targets.
_NOT_PROSE = re.compile(
    r"\{doc\}`[^`]*`(?:,? (?:and )?\"[^\"]+\")*"  # a page and the section titles it names
    r"|\{[\w:.-]+\}`[^`]*`|``.*?``|`[^`]*`|\$\$.*?\$\$|\$[^$]*\$|\]\([^)]*\)",
    re.S,
)
_NUMBER = re.compile(r"(?<![\w.])\d+(?:,\d{3})*(?:\.\d+)?(?![\w])")
# A count written in words is typed all the same: "over three seeds".
_COUNT_IN_WORDS = re.compile(
    r"\b(?:two|three|four|five|six|seven|eight|nine|ten|eleven|twelve|twenty|hundred)\s+"
    r"(?:seeds?|steps?|runs?|questions?|pairs?|examples?|batches|copies|methods|chapters|epochs?)\b",
    re.I,
)
# Digits that are names or conventions, not results. Each entry: (pattern, why it may be typed).
ALLOWED_NUMBERS = [
    (r"\b(?:Llama|LLaMA)[- ]?\d(?:\.\d)?(?:[- ]\d+B)?\b", "a model family's name"),
    (r"\b\d+(?:\.\d+)?\s?[BM]\b", "a model's size in its name (8B, 70B, 175 B)"),
    (r"\bMistral[- ]7B(?: v0\.3)?\b|\bv0\.3\b", "a model's name"),
    (r"\bGPT-\d\b|\btext-davinci-003\b|\bH100\b|\bAlpacaEval \d\b", "a model, a GPU or a benchmark's name"),
    (r"\b(?:bf16|fp16|fp32|int8|int4|NF4|FP4|q8_0|q4_0|Q4_K_M|f16)\b", "a number format's name"),
    (r"(?<![\d.])\d+-bit\b|(?<![\d.])\d+ bits?\b", "a number format's width"),
    (r"\b(?:[Ss]ection|§|Table|Figure|Eq\.|Appendix)\s?[A-Z]?\d+(?:\.\d+)*", "a locator in a cited paper"),
    (r"\b95%", "the confidence level of every interval in the book"),
    (r"\bTRL 1\.x\b", "a library version"),
    (r"\(question \d+\)", "a cross-reference to another question"),
    (r"\bp < 0\.05\b", "the conventional significance level"),
    (r"\b16 levels\b", "what 4 bits can hold"),
    (r"\bStart at 8–16\b", "the usual starting ranks: a practitioner's rule, not a result"),
    (r"“[^”]*”", "a source's own words, quoted (the source is named beside the quote)"),
]


def code_cells(text: str) -> list[str]:
    """The sources of a MyST page's code cells (their option lines, `:tags:` etc., dropped)."""
    return [
        "\n".join(ln for ln in cell.splitlines() if not ln.startswith(":"))
        for cell in _CODE_CELL.findall(text)
    ]


def code_literals(text: str) -> set[str]:
    """Every number written in the page's code: the inputs of what the page recomputes."""
    found: set[str] = set()
    for cell in code_cells(text):
        for literal in re.findall(r"(?<![\w.])\d[\d_]*(?:\.\d+)?(?![\w])", cell):
            literal = literal.replace("_", "")
            found |= {literal, literal.removesuffix(".0")}  # 100.0 in code is 100 in prose
    return found


def typed_numbers(prose: str, allowed_literals: set[str]) -> list[str]:
    """Numbers in `prose` that come from no glue role, allow-listed name or input of the page's code."""
    prose = _NOT_PROSE.sub(" ", prose)
    for pattern, _ in ALLOWED_NUMBERS:
        prose = re.sub(pattern, " ", prose)
    typed = [f"{m.group(0)!r} (a count in words)" for m in _COUNT_IN_WORDS.finditer(prose)]
    for match in _NUMBER.finditer(prose):
        if match.group(0).replace(",", "") in allowed_literals:
            continue
        start = max(0, match.start() - 40)
        typed.append(f"{match.group(0)!r} in “…{prose[start : match.end() + 20].strip()}…”")
    return typed


def _prose_to_check(page: Path, text: str) -> list[str]:
    prose = _CODE_CELL.sub("", text)
    if page.name == "self-check.md":
        return _ANSWER.findall(prose)
    return [m.group(0) for m in _LEDGER_OWN.finditer(prose)]


def test_digit_scan_catches_a_typed_number_and_passes_glued_ones():
    """Hand-worked: a typed 1.51 is caught; glue roles, math, model names and code inputs pass."""
    literals = code_literals("```{code-cell} ipython3\nfit_check('x', seq_len=2048)\n```\n")
    assert typed_numbers("went from 0.00 to 1.51 nats", literals) == [
        "'0.00' in “…went from 0.00 to 1.51 nats…”",
        "'1.51' in “…went from 0.00 to 1.51 nats…”",
    ]
    clean = "Llama 3.1 8B at 2048 tokens in bf16: {glue:text}`peak:.1f` GB, $\\beta = 0.1$, a 95% interval"
    assert typed_numbers(clean, literals) == []
    assert typed_numbers("pooled over two seeds", set()) == ["'two seeds' (a count in words)"]


@pytest.mark.parametrize("page", QUOTING_PAGES, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_answers_type_no_measured_number(page):
    """Every number in an answer (or a ledger entry of the book's own) is glued or an input of its code."""
    text = page.read_text(encoding="utf-8")
    literals = code_literals(text)
    blocks = _prose_to_check(page, text)
    assert blocks, f"{page.name}: found no answers to check; has the page's layout changed?"
    typed = [hit for block in blocks for hit in typed_numbers(block, literals)]
    assert not typed, (
        f"{page.relative_to(ROOT)} types numbers that no glue gives: {typed}. Quote a chapter's glued "
        "value ({glue:text} of a name filled by claims.chapter_values(...).fill), recompute it in a cell, "
        "or, for a name or convention, add it to ALLOWED_NUMBERS with the reason."
    )


def chapter_glue_names(source: Path) -> tuple[set[str], list[re.Pattern], set[str]]:
    """What a chapter glues, read from its code: literal names, f-string name patterns, and (for names glued
    from a variable) every string literal of its code, which must then hold the name."""
    names, patterns, literals = set(), [], set()
    dynamic = False
    for cell in code_cells(source.read_text(encoding="utf-8")):
        try:
            tree = ast.parse(cell)
        except SyntaxError:
            continue
        for node in ast.walk(tree):
            if isinstance(node, ast.Constant) and isinstance(node.value, str):
                literals.add(node.value)
            if not (isinstance(node, ast.Call) and getattr(node.func, "id", None) == "glue" and node.args):
                continue
            first = node.args[0]
            if isinstance(first, ast.Constant) and isinstance(first.value, str):
                names.add(first.value)
            elif isinstance(first, ast.JoinedStr):
                parts = [re.escape(v.value) if isinstance(v, ast.Constant) else r".+" for v in first.values]
                patterns.append(re.compile("".join(parts) + r"\Z"))
            else:
                dynamic = True
    return names, patterns, (literals if dynamic else set())


def quoted_glue_names(text: str) -> list[tuple[str, str, str]]:
    """(chapter path, glue name, how it is quoted) for every name a page's code reads from a chapter."""
    quoted = []
    for cell in code_cells(text):
        tree = ast.parse(cell)
        chapters: dict[str, str] = {}  # variable -> chapter path
        table: dict[str, str] = {}  # key of a {key: path} dict used with chapter_values
        for node in ast.walk(tree):
            if isinstance(node, ast.Assign) and isinstance(node.value, ast.Call):
                call = node.value
                if getattr(call.func, "attr", None) == "chapter_values" and isinstance(
                    call.args[0], ast.Constant
                ):
                    chapters[node.targets[0].id] = call.args[0].value
            if isinstance(node, ast.Dict):
                for key, value in zip(node.keys, node.values, strict=True):
                    if isinstance(value, ast.Constant) and str(value.value).startswith("book/"):
                        table[key.value] = value.value
        quoted.append((chapters, table, tree))
    found = []
    chapters = {k: v for c, _, _ in quoted for k, v in c.items()}
    table = {k: v for _, t, _ in quoted for k, v in t.items()}
    for _, _, tree in quoted:
        for node in ast.walk(tree):
            if not (
                isinstance(node, ast.Call) and getattr(node.func, "attr", None) in ("fill", "text", "value")
            ):
                continue
            owner = node.func.value
            if isinstance(owner, ast.Name) and owner.id in chapters:
                path = chapters[owner.id]
            elif isinstance(owner, ast.Subscript) and isinstance(owner.slice, ast.Constant):
                path = table.get(owner.slice.value)
            else:
                continue
            if path is None or not node.args or not isinstance(node.args[0], ast.Constant):
                continue
            argument = node.args[0].value
            names = claims.template_fields(argument) if node.func.attr == "fill" else [argument]
            found += [(path, name, argument) for name in names]
    return found


@pytest.mark.parametrize("page", QUOTING_PAGES, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_every_quoted_glue_name_is_glued_by_its_chapter(page):
    """Each name a page quotes (a `{name}` field of a fill template) is one its chapter glues: a renamed
    glue fails here, without running anything."""
    quoted = quoted_glue_names(page.read_text(encoding="utf-8"))
    assert quoted, f"{page.name} quotes no chapter; has its code changed shape?"
    missing = []
    for path, name, template in quoted:
        names, patterns, literals = chapter_glue_names(ROOT / path)
        if name in names or name in literals or any(p.match(name) for p in patterns):
            continue
        missing.append(f"{name!r} from {path} (in “{template[:60]}…”)")
    assert not missing, f"{page.relative_to(ROOT)} quotes names its chapters do not glue: {missing}"


@pytest.mark.parametrize("page", QUOTING_PAGES, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_templates_type_no_number(page):
    """The text around a template's fields is typed: it may hold names and conventions, never a result."""
    typed = []
    for _, _, template in quoted_glue_names(page.read_text(encoding="utf-8")):
        text = re.sub(r"\{[^{}]*\}", " ", template)
        # a setting that the glue name itself carries (`at alpha 15` beside `{em_15}`) is the chapter's own
        named = {digits for field in claims.template_fields(template) for digits in re.findall(r"\d+", field)}
        typed += typed_numbers(text, named)
    assert not typed, f"{page.relative_to(ROOT)}: typed numbers in templates: {sorted(set(typed))}"


@pytest.mark.parametrize("page", QUOTING_PAGES, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_every_glue_role_of_a_page_is_glued_on_it(page):
    """A {glue:text} role (or {glue:md} block) names a value this page glues: myst-nb pastes only those."""
    text = page.read_text(encoding="utf-8")
    used = set(re.findall(r"\{glue:\w*\}`([\w]+)", text)) | set(re.findall(r"```\{glue:\w+\}\s+(\w+)", text))
    names, patterns, literals = chapter_glue_names(page)
    unknown = sorted(n for n in used if n not in names | literals and not any(p.match(n) for p in patterns))
    assert used and not unknown, f"{page.relative_to(ROOT)} pastes values it never glues: {unknown}"


_SECTION_REFERENCE = re.compile(r"\{doc\}`([^`]+)`((?:,? (?:and )?\"[^\"]+\")+)")


@pytest.mark.parametrize("page", QUOTING_PAGES, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_every_section_an_answer_points_to_exists(page):
    """`See {doc}`dpo`, "Training"`: the chapter still has a heading of that name (a renamed section
    would send the reader nowhere)."""
    text = _CODE_CELL.sub("", page.read_text(encoding="utf-8"))
    missing = []
    for target, titles in _SECTION_REFERENCE.findall(text):
        source = (page.parent / target).with_suffix(".md")
        headings = {
            line.lstrip("#").strip()
            for line in source.read_text(encoding="utf-8").splitlines()
            if line.startswith("#") and not line.startswith("#|")
        }
        for title in re.findall(r"\"([^\"]+)\"", titles):
            if " ".join(title.split()) not in headings:
                missing.append(f"{target}: {' '.join(title.split())!r}")
    assert not missing, f"{page.relative_to(ROOT)} points to sections that do not exist: {missing}"
