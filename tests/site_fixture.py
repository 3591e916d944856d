"""A tiny book built with the real _config.yml and book extension (tests/test_site_build.py).

Three text-only pages (nothing executes): a preface, a numbered chapter with two sections, a long display
equation and a term listed in `ftcourse_search_terms`, and an appendix page. Built with `jupyter-book
build -W -n` and laid out as a versioned site with `ftcourse_book.py site`, as `make book` does.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
VERSION = "9.8.7"

PREFACE = """(preface)=
# Preface

A tiny book for the site tests. Read {doc}`part1/alpha` first.
"""
CHAPTER = """(alpha)=
# Alpha chapter

Intro text.

## First section

The Wilson interval is named after its author; McNemar's test too.

$$
\\mathcal{L}_{\\mathrm{DPO}}(\\pi_\\theta; \\pi_{\\mathrm{ref}})
= -\\mathbb{E}_{(x, y_w, y_l) \\sim \\mathcal{D}}
\\left[\\log \\sigma\\left(\\beta \\log \\frac{\\pi_\\theta(y_w \\mid x)}{\\pi_{\\mathrm{ref}}(y_w \\mid x)}
- \\beta \\log \\frac{\\pi_\\theta(y_l \\mid x)}{\\pi_{\\mathrm{ref}}(y_l \\mid x)}\\right)\\right]
$$

## Second section & more

### A subsection

Text.
"""
APPENDIX = """(extra)=
# Extra appendix

## Unnumbered section

Text.
"""
TOC = {
    "format": "jb-book",
    "root": "book/preface",
    "parts": [
        {"caption": "Foundations", "numbered": True, "chapters": [{"file": "book/part1/alpha"}]},
        {"caption": "Appendices", "chapters": [{"file": "book/appendix/extra"}]},
    ],
}


def write_tiny_book(root: Path) -> Path:
    """Write the tiny book's sources under `root`; returns root."""
    config = yaml.safe_load((REPO / "_config.yml").read_text(encoding="utf-8"))
    config["execute"]["execute_notebooks"] = "off"
    config["bibtex_bibfiles"] = ["references.bib"]
    config["sphinx"]["config"]["ftcourse_search_terms"] = {"book/part1/alpha": ["Wilson", "McNemar"]}
    (root / "book" / "part1").mkdir(parents=True)
    (root / "book" / "appendix").mkdir(parents=True)
    (root / "_config.yml").write_text(yaml.safe_dump(config, sort_keys=False), encoding="utf-8")
    (root / "_toc.yml").write_text(yaml.safe_dump(TOC, sort_keys=False), encoding="utf-8")
    (root / "pyproject.toml").write_text(f'[project]\nname = "tiny"\nversion = "{VERSION}"\n', "utf-8")
    cff = yaml.safe_load((REPO / "CITATION.cff").read_text(encoding="utf-8"))
    cff["version"] = VERSION
    (root / "CITATION.cff").write_text(yaml.safe_dump(cff, sort_keys=False), encoding="utf-8")
    (root / "references.bib").write_text("", encoding="utf-8")
    (root / "book" / "preface.md").write_text(PREFACE, encoding="utf-8")
    (root / "book" / "part1" / "alpha.md").write_text(CHAPTER, encoding="utf-8")
    (root / "book" / "appendix" / "extra.md").write_text(APPENDIX, encoding="utf-8")
    shutil.copytree(REPO / "_static", root / "_static")
    shutil.copytree(REPO / "book" / "_extra", root / "book" / "_extra")
    shutil.copytree(
        REPO / "book" / "_ext", root / "book" / "_ext", ignore=shutil.ignore_patterns("__pycache__")
    )
    return root


def build_tiny_site(root: Path) -> subprocess.CompletedProcess:
    """Build the tiny book's HTML (-W -n) and lay it out as a versioned site; returns the last process."""
    bin_dir = Path(sys.executable).parent
    build = subprocess.run(
        [str(bin_dir / "jupyter-book"), "build", "-W", "-n", "--keep-going", "--all", str(root)],
        capture_output=True, text=True, timeout=600, cwd=root,
    )  # fmt: skip
    if build.returncode != 0:
        return build
    return subprocess.run(
        [sys.executable, str(root / "book" / "_ext" / "ftcourse_book.py"), "site",
         str(root / "_build" / "html"), str(root / "_build" / "site")],
        capture_output=True, text=True, timeout=120, cwd=root,
    )  # fmt: skip


def cite_urls(version_root: Path) -> dict[str, list[str]]:
    """Every citation URL on the pages under `version_root` (the cite boxes' and section entries'
    `data-url`): {url: [pages that cite it]}."""
    from html import unescape

    found: dict[str, list[str]] = {}
    for page in sorted(version_root.rglob("*.html")):
        for url in CITE_URL.findall(page.read_text(encoding="utf-8")):
            found.setdefault(unescape(url), []).append(page.relative_to(version_root).as_posix())
    return found


def resolve_in_site(site: Path, site_url: str, url: str) -> list[str]:
    """Problems with a published URL looked up in the built site (`site` holds v<version>/, latest/);
    a permalink's redirect is followed once, to a page that must have the anchor."""
    from html import unescape

    if not url.startswith(site_url):
        return [f"{url}: not under the site's address {site_url}"]
    path = site / url.removeprefix(site_url).split("#")[0]
    if not path.is_file():
        return [f"{url}: no {path.relative_to(site)} in the site"]
    refresh = re.search(r'http-equiv="refresh" content="0; url=([^"]+)"', path.read_text(encoding="utf-8"))
    if not refresh:
        return []
    target, _, anchor = unescape(refresh.group(1)).partition("#")
    page = (path.parent / target).resolve()
    if not page.is_file():
        return [f"{url} redirects to {target}, which is not in the site"]
    if anchor and f'id="{anchor}"' not in page.read_text(encoding="utf-8"):
        return [f"{url} redirects to #{anchor}, which {page.name} does not have"]
    return []


CITE_URL = re.compile(r'class="ftcourse-cite[^"]*"[^>]*\bdata-url="([^"]+)"')
