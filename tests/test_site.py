"""The built site, read in a real browser as a reader reads it (Debian's Chromium, driven by Playwright).

The versioned site in `_build/site` (`make book` lays `_build/html` out there as v<version>/ and latest/,
with versions.json and a root page) is served on 127.0.0.1 and every page of `_toc.yml` is opened once,
under v<version>/; the tests below then check what that crawl saw. Nothing here downloads a browser:
Playwright drives the system Chromium through `executable_path`. Requests for any host other than
127.0.0.1 are recorded and refused.

Without a built site (run `make book`), a browser or Playwright, these tests skip locally and fail in CI
(`CI=true`), where `make test` builds the site first. `FTCOURSE_SITE_ROOT` points them at another
checkout's build (a folder with `_toc.yml`, `_config.yml`, `pyproject.toml` and `_build/site`).
"""

from __future__ import annotations

import functools
import http.server
import os
import re
import sys
import threading
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from fnmatch import fnmatch
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import urldefrag, urlsplit

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
SITE_ROOT = Path(os.environ.get("FTCOURSE_SITE_ROOT", REPO)).resolve()
SCREENSHOTS = SITE_ROOT / "_build" / "screenshots"
sys.path.insert(0, str(REPO / "book" / "_ext"))
import ftcourse_book  # noqa: E402  (the book's Sphinx extension: browser flags, citation helpers)
from site_fixture import cite_urls, resolve_in_site  # noqa: E402

SITE = SITE_ROOT / ftcourse_book.SITE_DIR
VERSION = ftcourse_book.book_version(SITE_ROOT)
HTML = SITE / ftcourse_book.version_dir(VERSION)  # this release's pages, as published
SITE_URL = yaml.safe_load((SITE_ROOT / "_config.yml").read_text(encoding="utf-8"))["html"]["baseurl"]
# A search for each term lists this page among its first five results.
SEARCH_RANKS = {"Wilson": "book/part5/evaluating", "McNemar": "book/part5/evaluating"}

# The same browser and flags as the PDF printer (book/_ext/ftcourse_book.py), measured to run offline.
CHROMIUM, CHROMIUM_ARGS = ftcourse_book.CHROMIUM, ftcourse_book.CHROMIUM_ARGS
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")
# What must never appear in a cell's output on the site.
OUTPUT_PROBLEMS = {
    "a Python warning": re.compile(r"\b[A-Z]\w*Warning\b:"),
    "a traceback": re.compile(r"Traceback \(most recent call last\)"),
    "an installed-package path": re.compile(r"/site-packages/|/dist-packages/"),
    "a temporary path": re.compile(r"(?<![\w.])/tmp/"),
    "a virtual-environment path": re.compile(r"\.venv\b"),
    "the repository's absolute path": re.compile(re.escape(str(REPO)) + "|" + re.escape(str(SITE_ROOT))),
}
SEARCH_TERM = "LoRA"


def _unavailable(reason: str) -> None:
    if IN_CI:
        pytest.fail(f"{reason}; CI must run the browser test (make test builds the site, then runs it)")
    pytest.skip(reason)


def toc_docnames(root: Path = SITE_ROOT) -> list[str]:
    """Every page `_toc.yml` puts in the book, in reading order, globs expanded against the build."""
    toc = yaml.safe_load((root / "_toc.yml").read_text(encoding="utf-8"))
    names: list[str] = []

    def walk(node: dict) -> None:
        if "file" in node:
            names.append(str(node["file"]).removesuffix(".md").removesuffix(".ipynb"))
        if "glob" in node:
            built = sorted(p.relative_to(HTML).with_suffix("").as_posix() for p in HTML.rglob("*.html"))
            names.extend(name for name in built if fnmatch(name, node["glob"]))
        for key in ("parts", "chapters", "sections"):
            for child in node.get(key) or []:
                walk(child)

    walk({"file": toc["root"], **{k: v for k, v in toc.items() if k != "root"}})
    return names


@dataclass
class PageVisit:
    """What the browser saw on one page."""

    url: str
    status: int | None = None
    console_errors: list[str] = field(default_factory=list)
    failed_requests: list[str] = field(default_factory=list)
    math_nodes: int = 0
    math_containers: int = 0
    math_errors: int = 0
    broken_images: list[str] = field(default_factory=list)
    images: int = 0
    output_text: str = ""
    links: list[str] = field(default_factory=list)
    footer: str = ""
    notebook_download: str | None = None
    edit_link: str | None = None
    issues_link: str | None = None
    title_number: str = ""
    section_numbers: list[str] = field(default_factory=list)
    sidebar_captions: list[str] = field(default_factory=list)
    cite: dict | None = None
    numbered_headings: list[str] = field(default_factory=list)  # anchors of numbered section headings
    cite_links: list[str] = field(default_factory=list)  # the cite links' targets (#cite-<anchor>)
    cite_entries: list[str] = field(default_factory=list)  # ids of the section cite entries
    versions: list[str] = field(default_factory=list)  # the version switcher's options
    wide_math: list[dict] = field(default_factory=list)  # display equations wider than the column


@dataclass
class Crawl:
    """The results of opening every toc page once, plus the search check and every request made."""

    base: str
    pages: dict[str, PageVisit]
    requests: list[str]
    search_results: list[str]
    search_target_text: str
    search_target_url: str
    ranked: dict[str, list[str]] = field(default_factory=dict)  # SEARCH_RANKS term: first five results
    section_cite: dict = field(default_factory=dict)  # what clicking a section's "cite" link showed
    root: dict = field(default_factory=dict)  # the site's root page: where it led, its title, its errors


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format, *args):  # noqa: A002 (the base class's name)
        pass


@pytest.fixture(scope="module")
def site():
    """Serve _build/site on 127.0.0.1 (a free port); yields the base URL of this version's pages."""
    if not (HTML / "index.html").is_file():
        _unavailable(f"no built site at {HTML} (run `make book`)")
    handler = functools.partial(_QuietHandler, directory=str(SITE))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/{ftcourse_book.version_dir(VERSION)}/"
    finally:
        server.shutdown()
        server.server_close()


def _page_script() -> str:
    """JavaScript that reports math, images, cell output, links and buttons of the open page."""
    return """async () => {
        const mathNodes = document.querySelectorAll('.math').length;
        if (mathNodes && window.MathJax && MathJax.startup && MathJax.startup.promise) {
            await MathJax.startup.promise;
        }
        const images = [...document.querySelectorAll('img')];
        await Promise.all(images.map(img => img.complete ? null : new Promise(r => {
            img.addEventListener('load', r); img.addEventListener('error', r); })));
        const notebook = document.querySelector('a.btn-download-notebook-button');
        const edit = document.querySelector('a.btn-source-edit-button');
        const issues = document.querySelector('a.btn-source-issues-button');
        const number = h => (h.querySelector('.section-number')?.innerText || '').trim();
        const box = document.querySelector('details.ftcourse-cite');
        let cite = null;
        if (box) {
            const wasOpen = box.open;
            box.open = true;  // as a reader's click does; innerText only sees what is shown
            cite = {
                section: box.dataset.section, url: box.dataset.url,
                summary: box.querySelector('summary')?.innerText || '',
                apa: box.querySelector('.ftcourse-cite-apa')?.innerText || '',
                bibtex: box.querySelector('pre')?.innerText || '',
                copyButton: !!box.querySelector('button.copybtn'),
                underTitle: box.previousElementSibling?.tagName === 'H1', wasOpen,
            };
            box.open = wasOpen;
        }
        await new Promise(r => requestAnimationFrame(() => setTimeout(r, 50)));  // the equation fitting
        const wideMath = [...document.querySelectorAll('mjx-container[display="true"]')]
            .filter(m => m.dataset.ftcourseScale || window.ftcourseMathWidth?.(m) > m.clientWidth + 1)
            .map(m => {
                const item = Array.from(MathJax.startup.document.math).find(i => i.typesetRoot === m);
                return {tex: item ? item.math.trim().slice(0, 80) : '', width: window.ftcourseMathWidth(m),
                        column: m.clientWidth, scale: m.dataset.ftcourseScale || null};
            });
        for (let i = 0; i < 40 && !document.querySelector('.ftcourse-versions select'); i++) {
            await new Promise(r => setTimeout(r, 50));  // the switcher appears once versions.json is read
        }
        const headings = [...document.querySelectorAll('article section > :is(h2,h3,h4,h5,h6)')]
            .filter(h => h.querySelector('.section-number'));
        return {
            numberedHeadings: headings.map(h => h.parentElement.id),
            citeLinks: [...document.querySelectorAll('a.ftcourse-cite-link')]
                .map(a => a.getAttribute('href')),
            citeEntries: [...document.querySelectorAll('div.ftcourse-cite-section')].map(d => d.id),
            versions: [...document.querySelectorAll('.ftcourse-versions option')].map(o => o.dataset.version),
            wideMath,
            titleNumber: number(document.querySelector('article h1') || document.body),
            sectionNumbers: [...document.querySelectorAll('article section > h2')].map(number),
            sidebarCaptions: [...document.querySelectorAll('.bd-sidebar-primary p.caption .caption-text')]
                .map(e => e.innerText.trim()),
            cite,
            mathNodes,
            mathContainers: document.querySelectorAll('mjx-container').length,
            mathErrors: document.querySelectorAll('mjx-merror, [data-mjx-error]').length,
            images: images.length,
            brokenImages: images.filter(i => !(i.complete && i.naturalWidth > 0)).map(i => i.src),
            // textContent, not innerText: outputs of hidden cells (solutions in closed dropdowns) count too
            outputText: [...document.querySelectorAll('.cell_output')].map(e => e.textContent).join('\\n'),
            links: [...document.querySelectorAll('a[href]')].map(a => a.href),
            footer: [...document.querySelectorAll('footer, .bd-footer-content')]
                .map(e => e.innerText).join('\\n'),
            notebookDownload: notebook ? notebook.href : null,
            editLink: edit ? edit.href : null,
            issuesLink: issues ? issues.href : null,
        };
    }"""


@pytest.fixture(scope="module")
def crawl(site) -> Crawl:
    """Open every toc page and the search page once in Chromium; the tests assert on what was seen."""
    if not Path(CHROMIUM).is_file():
        _unavailable(f"no Chromium at {CHROMIUM} (Debian: apt-get install -y chromium; `make env` does it)")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        _unavailable("Playwright is not installed (pip install -e '.[test]')")

    requests: list[str] = []
    pages: dict[str, PageVisit] = {}
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        context = browser.new_context(viewport={"width": 1280, "height": 900}, service_workers="block")

        def route(route):
            requests.append(route.request.url)
            if urlsplit(route.request.url).hostname == "127.0.0.1":
                route.continue_()
            else:
                route.abort()

        context.route("**/*", route)
        page = context.new_page()
        current: list[PageVisit] = []
        page.on(
            "console", lambda m: current and m.type == "error" and current[-1].console_errors.append(m.text)
        )
        page.on("pageerror", lambda e: current and current[-1].console_errors.append(f"uncaught: {e}"))
        page.on(
            "requestfailed",
            lambda r: (
                current
                # a redirect page's icon request is cut short by the redirect itself: not a failure
                and not (r.url.endswith("logo.svg") and "ABORTED" in (r.failure or ""))
                and current[-1].failed_requests.append(f"{r.url} ({r.failure})")
            ),
        )
        page.on(
            "response",
            lambda r: (
                current and r.status >= 400 and current[-1].failed_requests.append(f"{r.url} ({r.status})")
            ),
        )
        for docname in toc_docnames():
            visit = PageVisit(url=site + docname + ".html")
            current.append(visit)
            response = page.goto(visit.url, wait_until="load")
            visit.status = response.status if response else None
            seen = page.evaluate(_page_script())
            visit.math_nodes, visit.math_containers = seen["mathNodes"], seen["mathContainers"]
            visit.math_errors, visit.images = seen["mathErrors"], seen["images"]
            visit.broken_images, visit.output_text = seen["brokenImages"], seen["outputText"]
            visit.links, visit.footer = seen["links"], seen["footer"]
            visit.notebook_download, visit.edit_link = seen["notebookDownload"], seen["editLink"]
            visit.issues_link = seen["issuesLink"]
            visit.title_number, visit.section_numbers = seen["titleNumber"], seen["sectionNumbers"]
            visit.sidebar_captions, visit.cite = seen["sidebarCaptions"], seen["cite"]
            visit.numbered_headings, visit.cite_links = seen["numberedHeadings"], seen["citeLinks"]
            visit.cite_entries, visit.versions = seen["citeEntries"], seen["versions"]
            visit.wide_math = seen["wideMath"]
            pages[docname] = visit

        search = PageVisit(url=f"{site}search.html?q={SEARCH_TERM}")
        current.append(search)
        page.goto(search.url, wait_until="load")
        page.wait_for_selector("#search-results ul.search li a, #search-results p", timeout=30_000)
        page.wait_for_function(
            "() => !document.querySelector('#search-results h2') ||"
            " document.querySelector('#search-results p')?.innerText.length > 0",
            timeout=30_000,
        )
        results = page.eval_on_selector_all("#search-results ul.search li a", "els => els.map(e => e.href)")
        target_text, target_url = "", ""
        if results:
            page.click("#search-results ul.search li a >> nth=0")
            page.wait_for_load_state("load")
            target_url = page.url
            target_text = (
                page.inner_text("article") if page.query_selector("article") else page.inner_text("body")
            )
        pages["search"] = search
        ranked = {}
        for term in SEARCH_RANKS:
            page.goto(f"{site}search.html?q={term}", wait_until="load")
            page.wait_for_selector("#search-results ul.search li a, #search-results p", timeout=30_000)
            ranked[term] = page.eval_on_selector_all(
                "#search-results ul.search li a", "els => els.slice(0, 5).map(e => e.href)"
            )
        section_cite = _click_a_section_cite(page, site, pages)
        root = PageVisit(url=site.rsplit("/", 2)[0] + "/")  # the site's root, above v<version>/
        current.append(root)
        page.goto(root.url, wait_until="load")
        page.wait_for_url(re.compile(r"/latest/.+\.html"), timeout=15_000)
        root_seen = {"url": page.url, "title": page.title(), "problems": root.failed_requests}

        SCREENSHOTS.mkdir(parents=True, exist_ok=True)
        for name in _screenshot_pages(list(pages)):
            page.goto(site + name + ".html", wait_until="load")
            page.evaluate(_page_script())
            page.screenshot(path=str(SCREENSHOTS / (name.replace("/", "_") + ".png")), full_page=False)
        browser.close()
    return Crawl(site, pages, requests, results, target_text, target_url, ranked, section_cite, root_seen)


def _click_a_section_cite(page, site: str, pages: dict[str, PageVisit]) -> dict:
    """Open the first chapter with numbered sections, click its first "cite" link, read what opens."""
    name = next((n for n, v in pages.items() if v.cite_links), None)
    if name is None:
        return {}
    page.goto(site + name + ".html", wait_until="load")
    link = page.locator("a.ftcourse-cite-link").first
    target = (link.get_attribute("href") or "").lstrip("#")
    entry = page.locator(f"[id='{target}']")
    hidden_before = not entry.is_visible()
    link.click()
    return {
        "page": name, "target": target, "hidden_before": hidden_before, "shown": entry.is_visible(),
        "text": entry.inner_text() if entry.is_visible() else "", "url": entry.get_attribute("data-url"),
    }  # fmt: skip


def _screenshot_pages(docnames: list[str]) -> list[str]:
    """Three pages for a human look: the preface, a chapter (LoRA's when it exists) and an API page."""
    docnames = [name for name in docnames if name != "search"]
    api = [name for name in docnames if name.startswith("book/api/ftcourse.")]
    chapters = [name for name in docnames if name not in api and name != docnames[0] and "/api/" not in name]
    chapter = next((name for name in chapters if "lora" in name), chapters[0] if chapters else None)
    module = next((name for name in api if name.endswith(".lora")), api[0] if api else None)
    return [name for name in (docnames[0], chapter, module) if name]


def _problems(pages: dict[str, PageVisit], attribute: str) -> dict[str, list]:
    return {name: getattr(visit, attribute) for name, visit in pages.items() if getattr(visit, attribute)}


def test_every_toc_page_loads(crawl):
    missing = {
        name: visit.status for name, visit in crawl.pages.items() if name != "search" and visit.status != 200
    }
    assert not missing, f"pages that did not load (HTTP status): {missing}"


def test_no_console_errors(crawl):
    errors = _problems(crawl.pages, "console_errors")
    assert not errors, f"console errors: {errors}"


def test_no_failed_requests(crawl):
    failed = _problems(crawl.pages, "failed_requests")
    assert not failed, f"requests that failed or answered >= 400: {failed}"


def test_no_request_leaves_localhost(crawl):
    assert crawl.requests, "the crawl recorded no requests at all: the recorder is broken"
    outside = sorted({url for url in crawl.requests if urlsplit(url).hostname != "127.0.0.1"})
    assert not outside, f"requests to other hosts (refused): {outside}"


def test_math_is_typeset(crawl):
    with_math = {name: v for name, v in crawl.pages.items() if v.math_nodes}
    assert with_math, "no page has math: the check would pass vacuously"
    bad = {
        name: f"{v.math_containers} MathJax containers for {v.math_nodes} math nodes, {v.math_errors} errors"
        for name, v in with_math.items()
        if v.math_containers < v.math_nodes or v.math_errors
    }
    assert not bad, f"math not typeset: {bad}"


def test_every_image_loads(crawl):
    assert sum(v.images for v in crawl.pages.values()), "no images seen: the check would pass vacuously"
    broken = _problems(crawl.pages, "broken_images")
    assert not broken, f"images that did not load: {broken}"


def test_cell_outputs_hold_no_warnings_tracebacks_or_build_paths(crawl):
    found = []
    for name, visit in crawl.pages.items():
        for what, pattern in OUTPUT_PROBLEMS.items():
            for match in pattern.finditer(visit.output_text):
                line_start = visit.output_text.rfind("\n", 0, match.start()) + 1
                line_end = visit.output_text.find("\n", match.end())
                line = visit.output_text[line_start : line_end if line_end >= 0 else None]
                found.append(f"{name}: {what}: {line.strip()[:160]!r}")
    assert not found, "cell output a reader should not see:\n  " + "\n  ".join(found)


def test_search_finds_lora_and_its_first_result_contains_it(crawl):
    assert crawl.search_results, f"searching the site for {SEARCH_TERM!r} found nothing"
    assert SEARCH_TERM in crawl.search_target_text, (
        f"the first search result for {SEARCH_TERM!r}, {crawl.search_target_url}, does not contain it"
    )


def _ids(html: str) -> set[str]:
    return set(re.findall(r"""\bid=["']([^"']+)["']""", html))


def test_every_internal_link_and_citation_resolves(crawl):
    targets: dict[str, set[str]] = {}
    for name, visit in crawl.pages.items():
        for link in visit.links:
            if urlsplit(link).hostname != "127.0.0.1":
                continue
            url, fragment = urldefrag(link)
            targets.setdefault(url, set())
            if fragment:
                targets[url].add(f"{fragment}\t{name}")
    assert any("bibliography" in url for url in targets), "no link to the bibliography: citations unchecked"
    broken = []
    for url, fragments in sorted(targets.items()):
        try:
            with urllib.request.urlopen(url, timeout=30) as response:
                body = response.read().decode("utf-8", errors="replace")
        except urllib.error.HTTPError as error:
            broken.append(f"{url}: HTTP {error.code}")
            continue
        ids = _ids(body)
        for entry in sorted(fragments):
            fragment, source = entry.split("\t")
            if urllib.parse.unquote(fragment) not in ids:
                broken.append(f"{url}#{fragment} (linked from {source}): no such anchor")
    assert not broken, "links that do not resolve:\n  " + "\n  ".join(broken)


def test_api_reference_has_a_page_per_module(crawl):
    for module in ftcourse_book.package_modules(SITE_ROOT):
        docname = f"{ftcourse_book.API_DIR.as_posix()}/{module}"
        assert docname in crawl.pages, f"{module} has no API page in the toc-built site"
        assert crawl.pages[docname].status == 200
        body = (HTML / f"{docname}.html").read_text(encoding="utf-8")
        assert f'id="module-{module}"' in body, f"{docname}.html does not document module {module}"
    index = shown_text((HTML / ftcourse_book.API_DIR / "index.html").read_text(encoding="utf-8"))

    def plain(text: str) -> str:  # white space and Sphinx's smart quotes and dashes aside
        for fancy, ascii_text in (("’", "'"), ("‘", "'"), ("“", '"'), ("”", '"'), ("–", "--"), ("—", "---")):
            text = text.replace(fancy, ascii_text)
        return "".join(text.replace("`", "").split())

    index = plain(index)
    unlisted = [
        module
        for module in ftcourse_book.package_modules(SITE_ROOT)
        if plain(f"{module}: {ftcourse_book.module_summary(module)}") not in index
    ]
    assert not unlisted, f"modules the API index does not list with their summary: {unlisted}"


def test_every_page_shows_the_version_and_links_the_repository(crawl):
    version = ftcourse_book.book_version(SITE_ROOT)
    pages = {name: visit for name, visit in crawl.pages.items() if name != "search"}
    no_version = [name for name, v in pages.items() if f"version {version}" not in v.footer]
    assert not no_version, f"pages whose footer does not show ftcourse version {version}: {no_version}"
    no_edit = [name for name, v in pages.items() if not (v.edit_link and "/edit/" in v.edit_link)]
    assert not no_edit, f"pages without an edit button: {no_edit}"
    no_issues = [name for name, v in pages.items() if not (v.issues_link and "/issues/" in v.issues_link)]
    assert not no_issues, f"pages without an issue button: {no_issues}"


def test_every_chapter_offers_its_notebook(crawl):
    from myst_nb.core.read import is_myst_markdown_notebook

    sources = {name: SITE_ROOT / f"{name}.md" for name in crawl.pages}
    toc_notebooks = [
        name
        for name, source in sources.items()
        if source.is_file() and is_myst_markdown_notebook(source.read_text(encoding="utf-8"))
    ]
    assert toc_notebooks, "no notebook chapter in the site"
    missing = [name for name in toc_notebooks if not crawl.pages[name].notebook_download]
    assert not missing, f"chapters without an .ipynb download: {missing}"
    for name in toc_notebooks:
        with urllib.request.urlopen(crawl.pages[name].notebook_download, timeout=30) as response:
            assert b'"cells"' in response.read(), f"{name}: the .ipynb download is not a notebook"


def test_screenshots_written(crawl):
    shots = sorted(SCREENSHOTS.glob("*.png"))
    assert len(shots) >= 3, f"expected three screenshots in {SCREENSHOTS}, found {[p.name for p in shots]}"


def test_built_pages_load_nothing_from_the_network(site):
    """Pages load scripts and styles only from the build itself, and MathJax from the local copy."""
    remote = re.compile(r"""<(?:script|link)\b[^>]*\b(?:src|href)="(https?:)?//[^"]*\.(?:js|css)\b""")
    mathjax = re.compile(r"""<script\b[^>]*\bsrc="[^"]*mathjax/tex-chtml-full\.js""")
    for page in sorted(HTML.rglob("*.html")):
        text = page.read_text(encoding="utf-8")
        found = remote.search(text)
        assert found is None, f"{page.relative_to(HTML)} loads {found.group(0)!r} from the network"
        if 'class="math' in text:
            assert mathjax.search(text), f"{page.relative_to(HTML)} has math but no local MathJax"
    assert (HTML / "mathjax" / "tex-chtml-full.js").is_file(), "local MathJax was not copied into the build"


class _ShownText(HTMLParser):
    """The text of an HTML page that a reader sees as prose or output: everything but cells' code."""

    VOID = {"area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta", "source", "wbr"}

    def __init__(self) -> None:
        super().__init__()
        self.depth = 0  # > 0 inside a cell's input (its code), whose text is not a claim
        self.parts: list[str] = []

    def handle_starttag(self, tag, attrs):
        if tag in self.VOID:
            return
        if self.depth or "cell_input" in (dict(attrs).get("class") or "").split():
            self.depth += 1

    def handle_endtag(self, tag):
        if self.depth and tag not in self.VOID:
            self.depth -= 1

    def handle_data(self, data):
        if not self.depth:
            self.parts.append(data)


def shown_text(html: str) -> str:
    """What a reader reads on a page, cell code left out (tests/test_site.py's unmeasured-claims check)."""
    parser = _ShownText()
    parser.feed(html)
    return " ".join(parser.parts)


def test_shown_text_leaves_out_cell_code_only():
    html = (
        '<p>Answer: 1.5 nats.</p><div class="cell docutils container"><div class="cell_input docutils '
        'container"><pre><span>x</span> = "not measured in this build"<br></pre></div>'
        '<div class="cell_output docutils container"><pre>printed</pre></div></div>'
    )
    text = shown_text(html)
    assert "Answer: 1.5 nats." in text and "printed" in text
    assert ftcourse_book.NOT_MEASURED not in text


def test_no_page_quotes_a_chapter_that_had_not_run(site):
    """A self-check or the claims ledger built before its chapters ran would say so; none may (issue 19)."""
    unmeasured = [
        page.relative_to(HTML).as_posix()
        for page in sorted(HTML.rglob("*.html"))
        if ftcourse_book.NOT_MEASURED in shown_text(page.read_text(encoding="utf-8"))
    ]
    assert not unmeasured, (
        f"{unmeasured} say {ftcourse_book.NOT_MEASURED!r}: they ran before a chapter they quote. The book "
        "extension reads such pages after their chapters; rebuild with `make book` (it builds with --all)."
    )


def expected_numbers(root: Path = SITE_ROOT) -> dict[str, str | None]:
    """The number each toc page should carry: chapters of `numbered` parts count on across parts (1, 2, ...,
    the sections under a chapter 1.1, 1.2, ...); pages of unnumbered parts (the appendices) get none."""
    toc = yaml.safe_load((root / "_toc.yml").read_text(encoding="utf-8"))
    numbers: dict[str, str | None] = {str(toc["root"]): None}
    chapter = 0

    def walk(node: dict, prefix: str | None) -> None:
        for index, child in enumerate(node.get("sections") or [], start=1):
            if "file" in child:
                numbers[str(child["file"])] = f"{prefix}.{index}" if prefix else None
                walk(child, numbers[str(child["file"])])

    for part in toc.get("parts") or []:
        for child in part.get("chapters") or []:
            if "file" not in child:
                continue
            number = None
            if part.get("numbered"):
                chapter += 1
                number = str(chapter)
            numbers[str(child["file"])] = number
            walk(child, number)
    return numbers


def _cited_pages(crawl) -> dict[str, PageVisit]:
    return {
        name: visit
        for name, visit in crawl.pages.items()
        if name != "search" and not any(fnmatch(name, pattern) for pattern in ftcourse_book.CITE_SKIP)
    }


def test_chapters_and_their_sections_are_numbered_as_the_toc_says(crawl):
    numbers = expected_numbers()
    assert sum(1 for n in numbers.values() if n) >= 2, f"the toc numbers fewer than two chapters: {numbers}"
    wrong = []
    for name, visit in crawl.pages.items():
        if name == "search" or name not in numbers:
            continue
        expected = numbers[name]
        shown = visit.title_number.rstrip(".")
        if shown != (expected or ""):
            wrong.append(f"{name}: title numbered {shown!r}, expected {expected!r}")
        sections = [n.rstrip(".") for n in visit.section_numbers]
        want = [f"{expected}.{i}" for i in range(1, len(sections) + 1)] if expected else [""] * len(sections)
        if sections != want:
            wrong.append(f"{name}: sections numbered {sections}, expected {want}")
    assert not wrong, "numbering differs from _toc.yml:\n  " + "\n  ".join(wrong)


def test_the_sidebar_numbers_the_parts(crawl):
    toc = yaml.safe_load((SITE_ROOT / "_toc.yml").read_text(encoding="utf-8"))
    want, number = [], 0
    for part in toc.get("parts") or []:
        if part.get("numbered"):
            number += 1
            want.append(ftcourse_book.part_caption(number, part["caption"]))
        else:
            want.append(part["caption"])
    first = crawl.pages[toc_docnames()[1]]
    assert first.sidebar_captions == want, f"sidebar part captions {first.sidebar_captions}, expected {want}"


def test_every_chapter_page_has_a_cite_box_with_its_section_number_and_url(crawl):
    base = ftcourse_book.versioned_base(SITE_URL, VERSION)
    numbers = expected_numbers()
    pages = _cited_pages(crawl)
    assert any(numbers.get(name) for name in pages), (
        f"no numbered chapter among {sorted(pages)}: toc walk broken"
    )
    problems = []
    for name, visit in pages.items():
        cite = visit.cite
        if not cite:
            problems.append(f"{name}: no 'Cite this section' box")
            continue
        url, number = ftcourse_book.page_url(base, f"{name}.html"), numbers.get(name)
        checks = {
            "summary reads 'Cite this section'": cite["summary"].strip() == "Cite this section",
            f"data-section is {number!r}": cite["section"] == (number or ""),
            f"URL is {url}": cite["url"] == url
            and url in cite["apa"]
            and f"\\url{{{url}}}" in cite["bibtex"],
            f"APA names the version {VERSION}": f"Version {VERSION}" in cite["apa"],
            "BibTeX is an @incollection entry": cite["bibtex"].startswith("@incollection{"),
            "the box sits under the title, closed": cite["underTitle"] and not cite["wasOpen"],
            "the BibTeX has a copy button": cite["copyButton"],
        }
        if number:
            checks[f"APA says Section {number}"] = f"Section {number})" in cite["apa"]
            checks[f"BibTeX says Section {number}"] = (
                f"Version {VERSION}, Section {number}." in cite["bibtex"]
            )
        else:
            checks["an unnumbered page cites no section"] = "Section" not in cite["apa"]
        problems += [f"{name}: {what}" for what, ok in checks.items() if not ok]
    assert not problems, "citation boxes that are wrong:\n  " + "\n  ".join(problems)
    skipped_with_box = [name for name, v in crawl.pages.items() if name not in pages and v.cite]
    assert not skipped_with_box, f"API or bibliography pages with a citation box: {skipped_with_box}"


def test_every_cite_url_names_the_version_and_resolves_in_the_site(site):
    """Every page's and every section's citation names v<version>/ and exists in the published layout."""
    urls = cite_urls(HTML)
    assert len(urls) > 20, f"found only {len(urls)} citation URLs in {HTML}"
    base = ftcourse_book.versioned_base(SITE_URL, VERSION)
    problems = [f"{url}: not under {base}" for url in urls if not url.startswith(base)]
    for url in urls:
        problems += resolve_in_site(SITE, SITE_URL, url)
    assert not problems, "citations that do not resolve:\n  " + "\n  ".join(problems[:40])


def test_every_numbered_section_has_a_cite_link_and_its_own_entry(crawl):
    problems = []
    for name, visit in crawl.pages.items():
        want = [f"cite-{anchor}" for anchor in visit.numbered_headings]
        if [link.lstrip("#") for link in visit.cite_links] != want or visit.cite_entries != want:
            problems.append(f"{name}: sections {visit.numbered_headings}, links {visit.cite_links}")
    assert any(v.numbered_headings for v in crawl.pages.values()), "no numbered section seen"
    assert not problems, "numbered sections without their cite link and entry:\n  " + "\n  ".join(problems)


def test_a_sections_cite_link_opens_its_entry_with_the_versioned_url(crawl):
    seen = crawl.section_cite
    assert seen, "no page has a section cite link"
    assert seen["hidden_before"] and seen["shown"], (
        f"clicking 'cite' on {seen['page']} did not open it: {seen}"
    )
    url = seen["url"] or ""
    assert url.startswith(ftcourse_book.versioned_base(SITE_URL, VERSION)) and url in seen["text"], seen
    assert "@incollection" in seen["text"] and f"Version {VERSION}, Section " in seen["text"], seen["text"]


def test_every_page_has_the_version_switcher(crawl):
    missing = [n for n, v in crawl.pages.items() if n != "search" and VERSION not in v.versions]
    assert not missing, f"pages whose version switcher does not list {VERSION}: {missing}"


def test_a_search_lists_the_page_that_teaches_the_term_in_its_first_five(crawl):
    wrong = {
        term: results
        for term, results in crawl.ranked.items()
        if not any(f"/{SEARCH_RANKS[term]}.html" in url for url in results)
    }
    assert not wrong, f"searches whose first five results miss the page that teaches the term: {wrong}"


def test_the_site_root_has_a_title_and_leads_to_the_latest_version(crawl):
    assert "/latest/" in crawl.root["url"] and crawl.root["title"], crawl.root
    assert not crawl.root["problems"], f"the root page's failed requests: {crawl.root['problems']}"


def test_display_equations_fit_the_text_column(crawl):
    """MathJax 3 does not break lines: an equation wider than the column is set smaller (down to 80 %,
    book/_ext/static/ftcourse-site.js); one still too wide must be broken in its chapter's source."""
    overflowing = [
        f"{name}: {m['width']} px in a {m['column']} px column at scale {m['scale']}: {m['tex']!r}"
        for name, visit in crawl.pages.items()
        for m in visit.wide_math
        if m["width"] > m["column"] + 1
    ]
    assert not overflowing, "display equations to break:\n  " + "\n  ".join(overflowing)
