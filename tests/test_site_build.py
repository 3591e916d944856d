"""The versioned site, its citations, its switcher and its search, on a tiny book (tests/site_fixture.py).

The whole book takes long to build, so these checks build a three-page book with the real `_config.yml`
and book extension (`jupyter-book build -W -n`, a few seconds, nothing executes), lay it out as
`make book` does (`ftcourse_book.py site`: v<version>/, latest/, versions.json, a root page) and read it:
first as files, then in Chromium. tests/test_site.py checks the same things on the real book in CI.
"""

from __future__ import annotations

import functools
import http.server
import json
import re
import sys
import threading
from html import unescape
from pathlib import Path

import pytest
import yaml
from site_fixture import VERSION, build_tiny_site, cite_urls, resolve_in_site, write_tiny_book

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "book" / "_ext"))
import ftcourse_book  # noqa: E402

SITE_URL = yaml.safe_load((REPO / "_config.yml").read_text(encoding="utf-8"))["html"]["baseurl"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    """The tiny book, built and laid out as a site; returns its root."""
    pytest.importorskip("jupyter_book")
    root = write_tiny_book(tmp_path_factory.mktemp("tiny-book"))
    done = build_tiny_site(root)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return root


def _site(root: Path) -> Path:
    return root / "_build" / "site"


def test_the_site_has_a_folder_per_version_a_latest_copy_and_a_root_page(tiny):
    site = _site(tiny)
    for folder in (ftcourse_book.version_dir(VERSION), ftcourse_book.LATEST):
        assert (site / folder / "book" / "part1" / "alpha.html").is_file(), f"{folder}/ lacks the chapter"
    versions = json.loads((site / "versions.json").read_text(encoding="utf-8"))
    assert versions == [{"version": VERSION, "path": f"v{VERSION}/", "latest": True}]
    index = (site / "index.html").read_text(encoding="utf-8")
    assert re.search(r"<title>[^<]+</title>", index), "the root page has no title"
    assert (
        'rel="icon" href="latest/_static/logo.svg"' in index and (site / "latest/_static/logo.svg").is_file()
    )
    assert 'url=latest/"' in index and (site / ".nojekyll").is_file()
    built = (tiny / "_build" / "html" / "index.html").read_text(encoding="utf-8")
    assert "<title>" in built and 'rel="icon"' in built, "the build's own index.html lacks title or icon"


def test_an_older_release_stays_and_latest_follows_the_newest(tiny, tmp_path):
    html, site = tiny / "_build" / "html", tmp_path / "site"
    ftcourse_book.assemble_site(html, site, "0.1.0", "Book")
    versions = ftcourse_book.assemble_site(html, site, "0.2.0", "Book")
    assert versions == ["0.2.0", "0.1.0"] and (site / "v0.1.0" / "index.html").is_file()
    listed = json.loads((site / "versions.json").read_text(encoding="utf-8"))
    assert [(v["version"], v["latest"]) for v in listed] == [("0.2.0", True), ("0.1.0", False)]


def test_versions_sort_by_number_with_prereleases_first():
    names = ["v0.10.0", "v0.9.1", "v1.0.0rc1", "v1.0.0", "latest"]
    ordered = sorted(
        (n for n in names if ftcourse_book._VERSION_DIR.match(n)), key=ftcourse_book._version_key
    )
    assert ordered == ["v0.9.1", "v0.10.0", "v1.0.0rc1", "v1.0.0"]


def test_every_cite_url_names_the_version_and_resolves_in_the_site(tiny):
    site = _site(tiny)
    urls = cite_urls(site / ftcourse_book.version_dir(VERSION))
    assert len(urls) >= 5, f"expected page and section citations, found {sorted(urls)}"
    base = ftcourse_book.versioned_base(SITE_URL, VERSION)
    problems = [f"{url}: not under {base}" for url in urls if not url.startswith(base)]
    for url in urls:
        problems += resolve_in_site(site, SITE_URL, url)
    assert not problems, "citations that do not resolve:\n  " + "\n  ".join(problems)


def test_every_numbered_section_has_a_cite_link_and_its_own_entry(tiny):
    page = (_site(tiny) / f"v{VERSION}" / "book" / "part1" / "alpha.html").read_text(encoding="utf-8")
    sections = re.findall(r'<section id="([^"]+)">\s*<h[2-6]><span class="section-number">([\d.]+)\. ', page)
    assert [number for _, number in sections] == ["1.1", "1.2", "1.2.1"], sections
    for anchor, number in sections:
        assert f'<a class="ftcourse-cite-link" href="#cite-{anchor}"' in page, f"{number}: no cite link"
        entry = re.search(
            rf'<div class="ftcourse-cite ftcourse-cite-section" id="cite-{anchor}".*?</pre>', page, re.S
        )
        assert entry, f"section {number} has no cite entry"
        text = unescape(entry.group(0))
        key = f"ftcourse{ftcourse_book.citation_metadata(REPO)['year']}sec{number.replace('.', '-')}"
        assert (
            f"@incollection{{{key}," in text and f"Section {number}" in text and f"Version {VERSION}" in text
        )
    appendix = (_site(tiny) / f"v{VERSION}" / "book" / "appendix" / "extra.html").read_text(encoding="utf-8")
    assert "ftcourse-cite-link" not in appendix, "an unnumbered section got a cite link"


# --- in the browser ------------------------------------------------------------------------------------


class _Quiet(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format, *args):  # noqa: A002 (the base class's name)
        pass


@pytest.fixture(scope="module")
def browser_page(tiny):
    """A Chromium page on the tiny site served at 127.0.0.1, with the console errors and failed requests."""
    if not Path(ftcourse_book.CHROMIUM).is_file():
        pytest.skip(f"no Chromium at {ftcourse_book.CHROMIUM}: browser checks of the tiny site skipped")
    sync_api = pytest.importorskip("playwright.sync_api")
    server = http.server.ThreadingHTTPServer(
        ("127.0.0.1", 0), functools.partial(_Quiet, directory=str(_site(tiny)))
    )
    threading.Thread(target=server.serve_forever, daemon=True).start()
    problems: list[str] = []
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=ftcourse_book.CHROMIUM, args=ftcourse_book.CHROMIUM_ARGS
        )
        context = browser.new_context(viewport={"width": 1280, "height": 900}, service_workers="block")
        context.route(
            "**/*", lambda r: r.continue_() if r.request.url.startswith("http://127.0.0.1:") else r.abort()
        )
        page = context.new_page()
        page.on("console", lambda m: m.type == "error" and problems.append(m.text))
        page.on("response", lambda r: r.status >= 400 and problems.append(f"{r.url} ({r.status})"))
        # net::ERR_ABORTED is a request the browser dropped because the page moved on (a redirect, the
        # next test's navigation): not a failure of the site. A missing file shows as a 404 above.
        page.on(
            "requestfailed",
            lambda r: "ABORTED" in (r.failure or "") or problems.append(f"{r.url} ({r.failure})"),
        )
        yield page, f"http://127.0.0.1:{server.server_address[1]}/", problems
        browser.close()
    server.shutdown()
    server.server_close()


def test_root_page_leads_to_the_latest_version_with_a_title_and_no_404(browser_page):
    page, base, problems = browser_page
    page.goto(base, wait_until="load")
    page.wait_for_url(re.compile(r"/latest/book/preface\.html$"), timeout=15_000)
    assert page.title(), "the first page has no title"
    assert not problems, f"errors or failed requests: {problems}"


def test_the_cite_link_opens_the_sections_entry(browser_page):
    page, base, problems = browser_page
    page.goto(f"{base}v{VERSION}/book/part1/alpha.html", wait_until="load")
    entry = page.locator("#cite-first-section")
    assert not entry.is_visible(), "the section's entry shows before its link is clicked"
    page.click("h2 a.ftcourse-cite-link >> nth=0")
    assert entry.is_visible(), "clicking 'cite' did not open the section's entry"
    text = entry.inner_text()
    url = ftcourse_book.versioned_base(SITE_URL, VERSION) + "cite/sec-1-1.html"
    assert "Section 1.1" in text and url in text and "@incollection" in text, text
    page.goto(url.replace(SITE_URL, base), wait_until="load")  # the permalink, as a reader follows it
    page.wait_for_url(re.compile(r"alpha\.html#first-section$"), timeout=15_000)
    assert not problems, f"errors or failed requests: {problems}"


def test_the_version_switcher_lists_the_versions_and_keeps_the_page(browser_page):
    page, base, problems = browser_page
    page.goto(f"{base}v{VERSION}/book/part1/alpha.html", wait_until="load")
    select = page.wait_for_selector(".ftcourse-versions select", timeout=15_000)
    options = select.eval_on_selector_all("option", "els => els.map(e => [e.textContent, e.value])")
    assert options == [[f"{VERSION} (latest)", f"{base}v{VERSION}/book/part1/alpha.html"]], options
    assert not problems, f"errors or failed requests: {problems}"


def test_a_search_for_a_listed_term_ranks_its_page_first(browser_page):
    page, base, _ = browser_page
    for term in ("Wilson", "McNemar"):
        page.goto(f"{base}v{VERSION}/search.html?q={term}", wait_until="load")
        page.wait_for_selector("#search-results ul.search li a", timeout=30_000)
        first = page.eval_on_selector("#search-results ul.search li a", "a => a.href")
        assert "/book/part1/alpha.html" in first, f"the first result for {term!r} is {first}"


def test_a_wide_display_equation_is_fitted_to_the_column(browser_page):
    page, base, _ = browser_page
    page.set_viewport_size({"width": 560, "height": 900})
    page.goto(f"{base}v{VERSION}/book/part1/alpha.html", wait_until="load")
    page.wait_for_function("() => document.querySelector('mjx-container[display=\"true\"]')", timeout=30_000)
    seen = page.evaluate(
        """async () => { await MathJax.startup.promise; await new Promise(r => setTimeout(r, 200));
        const m = document.querySelector('mjx-container[display="true"]');
        return {width: window.ftcourseMathWidth(m), column: m.clientWidth,
                scale: m.dataset.ftcourseScale || null};
        }"""
    )
    page.set_viewport_size({"width": 1280, "height": 900})
    assert seen["scale"] is not None, f"the equation ({seen}) was not measured and fitted"
    assert seen["width"] <= seen["column"] or float(seen["scale"]) == 0.8, seen


def test_every_module_has_a_summary_for_the_api_index():
    """book/api/index.md lists each module with the first paragraph of its docstring (`ftcourse-modules`)."""
    missing = [m for m in ftcourse_book.package_modules(REPO) if not ftcourse_book.module_summary(m)]
    assert not missing, f"modules without a docstring to summarise in the API index: {missing}"
