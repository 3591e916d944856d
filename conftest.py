"""Pytest wiring for the book: every notebook chapter listed in `_toc.yml` runs as a test.

pytest calls `pytest_collect_file` for every file under `testpaths` (see pyproject.toml). When the file
is a chapter that `_toc.yml` lists *and* a notebook, we hand back a `ChapterFile`. Its single item reads
the MyST Markdown with myst-nb's own reader (the one the book build uses) into a hidden
`.<name>.nbmake.ipynb` beside the source, runs it with nbmake (the kernel starts in the chapter's folder,
as in the book build, so relative paths behave the same) and deletes the converted notebook afterwards.

One execution per chapter: a chapter that passes is stored in the book's jupyter-cache under the key of
the current package, pins and profile (`book/_ext/ftcourse_book.py`). The book build runs with
`execute_notebooks: cache`, finds the notebook by the hash of its code cells and renders the stored
outputs instead of executing the chapter again; a chapter whose code changed is executed by the build.

A `.md` page is a notebook exactly when myst-nb would execute it: its front matter names the jupytext
format `myst` (or `file_format: mystnb`). Text-only pages such as the preface are not collected.
Budgets travel across CPU models. Before the first chapter, the run times a fixed reference workload
(`ftcourse.machine`: float32 and bfloat16 matmuls, a bitsandbytes 4-bit linear forward and backward) in a
fresh process and divides it by the same workload's time on the machine the budgets were designed on. A
chapter's budget in this machine's seconds is its design budget times that speed factor; a chapter fails
only on a gross runaway, more than 3 x its scaled budget. At the end of the run, the terminal summary
names the CPU, the reference time and the factor, and lists each chapter's raw wall time, its scaled time
(raw / factor, in design-machine seconds), its CPU time and its verdict, with the totals.
FTCOURSE_SPEED_FACTOR=x skips the measurement and uses x.

Skips are never silent. Each chapter's kernel inherits FTCOURSE_SKIP_LOG naming a file of its own, where
`ftcourse.profiles.note_skip` appends one JSON line per thing the chapter could not run here (a CUDA-only
kernel, an Ollama server that is not there). The summary lists them by chapter: under the spark stand-ins
(`make spark-chapters`) in a "spark stand-in skips" section, which also names the unit tests skipped.
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import sys
import tempfile
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
# A chapter that runs longer than this multiple of its scaled budget fails: a runaway, not a slower CPU.
BUDGET_FAIL_FACTOR = 3.0
SPEED_FACTOR_ENV = "FTCOURSE_SPEED_FACTOR"
GENERATED_SUFFIX = ".nbmake.ipynb"
# = ftcourse.profiles.SKIP_LOG_ENV (tests/test_spark_path.py checks); a literal keeps torch out of conftest
SKIP_LOG_ENV = "FTCOURSE_SKIP_LOG"
SOURCE_LOG_ENV = "FTCOURSE_SOURCE_LOG"  # = ftcourse.profiles.SOURCE_LOG_ENV (tests/test_heldout.py checks)

sys.path.insert(0, str(ROOT / "book" / "_ext"))
import ftcourse_book  # noqa: E402  (the book's Sphinx extension: shares the execution-cache key)

# chapter -> (wall seconds, kernel CPU seconds or None, passed)
_WALL_TIMES = pytest.StashKey[dict[str, tuple[float, float | None, bool]]]()
_TOC = pytest.StashKey["BookToc"]()
# chapter -> the skips its kernel logged; and the session's folder of per-chapter skip logs
_SKIPS = pytest.StashKey[dict[str, list[dict]]]()
_SKIP_DIR = pytest.StashKey[Path]()
# the session's store of executed chapters, which the self-checks and the claims ledger read first
_GLUE_STORE = pytest.StashKey[Path]()
# this machine's speed against the design machine's (ftcourse.machine), measured once per session
_SPEED = pytest.StashKey["MachineSpeed"]()


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


def read_chapter(source: Path):
    """The notebook myst-nb builds from a MyST chapter (same cells, sources and metadata as the build)."""
    from myst_nb.core.read import read_myst_markdown_notebook
    from myst_parser.config.main import MdParserConfig

    config = yaml.safe_load((ROOT / "_config.yml").read_text(encoding="utf-8")) or {}
    parse = config.get("parse") or {}
    md_config = MdParserConfig(
        enable_extensions=set(parse.get("myst_enable_extensions") or []),
        dmath_double_inline=bool(parse.get("myst_dmath_double_inline", False)),
    )
    return read_myst_markdown_notebook(
        source.read_text(encoding="utf-8"), config=md_config, add_source_map=True, path=str(source)
    )


def cache_executed(source: Path, notebook, executed, cache_path: Path | None = None) -> bool:
    """Store an executed chapter in the book's jupyter-cache, keyed as the build looks it up; False if not."""
    import nbformat
    from jupyter_cache import get_cache
    from jupyter_cache.base import CacheBundleIn

    bundle = nbformat.from_dict(nbformat.convert(notebook, 4))
    ran = [cell for cell in executed.cells if cell.cell_type == "code"]
    code = [cell for cell in bundle.cells if cell.cell_type == "code"]
    if len(ran) != len(code):
        return False  # nbmake changed the cells: store nothing, the build will execute the chapter
    for cell, result in zip(code, ran, strict=True):
        cell.outputs = result.outputs
        cell.execution_count = result.execution_count
    for key in ("language_info", "widgets"):
        if key in executed.metadata:
            bundle.metadata[key] = executed.metadata[key]
    cache = get_cache(str(cache_path or ftcourse_book.execution_cache_path(ROOT)))
    bundle_in = CacheBundleIn(bundle, str(source), data={"executed_by": "pytest"})
    cache.cache_notebook_bundle(bundle_in, check_validity=False, overwrite=True)
    return True


def read_skip_log(path: Path) -> list[dict]:
    """The skips a chapter logged with profiles.note_skip (one JSON object a line); [] when it logged none."""
    if not path.is_file():
        return []
    skips = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            entry = json.loads(line)
        except json.JSONDecodeError:
            entry = None
        if not isinstance(entry, dict) or "what" not in entry:  # still reported: a skip must not vanish
            entry = {"what": f"line {number} of {path.name} is not a note_skip record", "why": line[:200]}
        skips.append(entry)
    return skips


def source_mismatches(entries: list[dict]) -> list[str]:
    """What a chapter scored on that it did not train on (entries: its profiles.note_source log).

    A chapter that trained on something must score on held-out data of the same source; capability
    checks (declared with profiles.capability_check) and chapters that train nothing are exempt.
    """
    trained = {e.get("source") for e in entries if e.get("use") == "train"}
    if not trained:
        return []
    scored = {}
    for entry in entries:
        if entry.get("use") == "score" and entry.get("source") not in trained:
            scored.setdefault(entry.get("source"), entry.get("what", ""))
    return [f"scored {what} on {source!r}" for source, what in scored.items()]


def read_source_log(path: Path) -> list[dict]:
    """The train/score/capability lines a chapter logged with profiles.note_source; [] when none."""
    if not path.is_file():
        return []
    lines = path.read_text(encoding="utf-8").splitlines()
    return [json.loads(line) for line in lines if line.strip()]


def minimal_sizes(environ=os.environ) -> bool:
    """True under FTCOURSE_SIZES=minimal: a smoke test of the code path, whose outputs are never cached."""
    return environ.get("FTCOURSE_SIZES", "").strip().lower() == "minimal"


def standins_active(environ=os.environ) -> bool:
    """True for the spark profile at minimal sizes: the environment `python -m ftcourse.toy.standin` sets."""
    return environ.get("FTCOURSE_PROFILE", "").strip().lower() == "spark" and minimal_sizes(environ)


def skip_summary_lines(skips: dict[str, list[dict]], unit_skips: list[tuple[str, str]]) -> list[str]:
    """The lines of the skip section: each chapter's skips (what, why), then the unit tests skipped."""
    lines = []
    for chapter, entries in skips.items():
        for entry in entries:
            lines.append(f"{chapter}: {entry.get('what', '?')}. {entry.get('why', '')}".rstrip())
    for test, reason in unit_skips:
        lines.append(f"{test} (unit test): {reason}")
    skipped = sum(1 for entries in skips.values() if entries)
    lines.append(
        f"{sum(len(e) for e in skips.values())} skip(s) in {skipped} of {len(skips)} chapter(s); "
        f"{len(unit_skips)} unit test(s) skipped"
    )
    return lines


def _skip_log_dir(config: pytest.Config) -> Path:
    if _SKIP_DIR not in config.stash:
        config.stash[_SKIP_DIR] = Path(tempfile.mkdtemp(prefix="ftcourse-skips-"))
    return config.stash[_SKIP_DIR]


def _glue_store_dir(config: pytest.Config) -> Path:
    """This session's store of executed chapters (ftcourse.claims reads it before the execution cache)."""
    if _GLUE_STORE not in config.stash:
        config.stash[_GLUE_STORE] = Path(tempfile.mkdtemp(prefix="ftcourse-glue-"))
    return config.stash[_GLUE_STORE]


def pytest_unconfigure(config: pytest.Config) -> None:
    if _GLUE_STORE in config.stash:
        shutil.rmtree(config.stash[_GLUE_STORE], ignore_errors=True)
    if _SKIP_DIR in config.stash:
        shutil.rmtree(config.stash[_SKIP_DIR], ignore_errors=True)


@dataclass(frozen=True)
class MachineSpeed:
    """The reference workload's result: this CPU, the parts' seconds, and the factor budgets scale by."""

    cpu: str
    seconds: dict[str, float]
    factor: float
    note: str = ""
    design_cpu: str = "the design machine"

    def budget(self, design_budget_s: float = CHAPTER_BUDGET_S) -> float:
        """The design budget in this machine's seconds."""
        return design_budget_s * self.factor

    def fail_limit(self, design_budget_s: float = CHAPTER_BUDGET_S) -> float:
        """The wall time over which a chapter fails here (a gross runaway)."""
        return BUDGET_FAIL_FACTOR * self.budget(design_budget_s)


def measure_speed(environ=os.environ) -> MachineSpeed:
    """Time `ftcourse.machine`'s reference workload in a fresh process (factor 1.0 and a note if it fails)."""
    import subprocess

    forced = environ.get(SPEED_FACTOR_ENV, "").strip()
    if forced:
        return MachineSpeed(
            cpu="(not measured)", seconds={}, factor=float(forced), note=f"{SPEED_FACTOR_ENV}={forced}"
        )
    command = [sys.executable, "-m", "ftcourse.machine"]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=600, check=True, cwd=ROOT)
        data = json.loads(done.stdout.strip().splitlines()[-1])
        return MachineSpeed(
            cpu=data["cpu"],
            seconds=data["seconds"],
            factor=float(data["factor"]),
            design_cpu=data["design_cpu"],
        )
    except (subprocess.SubprocessError, OSError, ValueError, KeyError, IndexError) as error:
        detail = getattr(error, "stderr", "") or str(error)
        return MachineSpeed(
            cpu="(unknown)",
            seconds={},
            factor=1.0,
            note=f"reference workload failed, factor 1.0: {detail[-300:]}",
        )


def machine_speed(config: pytest.Config) -> MachineSpeed:
    """This session's MachineSpeed, measured at the first call (before the first chapter runs)."""
    if _SPEED not in config.stash:
        config.stash[_SPEED] = measure_speed()
    return config.stash[_SPEED]


def _children_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


class ChapterItem(NotebookItem):
    """Runs one chapter with nbmake and stores the executed notebook for the book build."""

    def __init__(self, parent: pytest.File, source: Path) -> None:
        if source.suffix == ".md":
            notebook = source.with_name(f".{source.stem}{GENERATED_SUFFIX}")
        else:
            notebook = source
        super().__init__(parent, str(notebook))
        self.source = source
        self.notebook = notebook

    def runtest(self) -> None:
        import nbformat
        from nbmake.nb_run import NotebookRun
        from nbmake.pytest_items import NotebookFailedException

        speed = machine_speed(self.config)  # before the clock starts: the measurement is not the chapter's
        start, cpu_start, passed = time.perf_counter(), _children_cpu_seconds(), False
        chapter = self.source.relative_to(ROOT).as_posix()
        skip_log = _skip_log_dir(self.config) / (chapter.replace("/", "__") + ".jsonl")
        skip_log.unlink(missing_ok=True)
        previous_log = os.environ.get(SKIP_LOG_ENV)
        os.environ[SKIP_LOG_ENV] = str(skip_log)  # before the kernel starts: it inherits the environment
        source_log = skip_log.with_suffix(".sources.jsonl")
        source_log.unlink(missing_ok=True)
        os.environ[SOURCE_LOG_ENV] = str(source_log)
        os.environ[ftcourse_book.GLUE_STORE_ENV] = str(_glue_store_dir(self.config))
        try:
            if self.notebook != self.source:
                notebook = read_chapter(self.source)
                nbformat.write(notebook, str(self.notebook))
            else:
                notebook = nbformat.read(str(self.source), as_version=4)
            option = self.config.option
            result = NotebookRun(
                self.notebook,
                option.nbmake_timeout,
                verbose=bool(option.verbose),
                kernel=option.nbmake_kernel,
                find_import_errors=option.nbmake_find_import_errors,
            ).execute()
            if result.error is not None:
                raise NotebookFailedException(result)
            passed = True
            # every passing run, cached or not (the stand-ins' never are): the pages that quote it read it
            ftcourse_book.store_glued(_glue_store_dir(self.config), ROOT, self.source, result.nb)
            # outputs at minimal sizes (the stand-ins) are a smoke test, never the book's: not cached
            if os.environ.get("FTCOURSE_EXECUTION_CACHE", "1") != "0" and not minimal_sizes():
                cache_executed(self.source, notebook, result.nb)
        finally:
            os.environ.pop(SOURCE_LOG_ENV, None)
            if previous_log is None:
                os.environ.pop(SKIP_LOG_ENV, None)
            else:
                os.environ[SKIP_LOG_ENV] = previous_log
            self.config.stash.setdefault(_SKIPS, {})[chapter] = read_skip_log(skip_log)
            if self.notebook != self.source:
                self.notebook.unlink(missing_ok=True)
            seconds = time.perf_counter() - start
            cpu = _children_cpu_seconds() - cpu_start  # the kernel is a child of pytest, reaped at the end
            wall_times = self.config.stash.setdefault(_WALL_TIMES, {})
            wall_times[chapter] = (seconds, cpu if cpu > 0 else None, passed)
        sources = read_source_log(source_log)
        mismatches = source_mismatches(sources)
        if mismatches:
            trained = sorted({e["source"] for e in sources if e.get("use") == "train"})
            pytest.fail(
                f"{chapter} trained on {trained} but {'; '.join(mismatches)}. Score a held-out split of the "
                "training source (ftcourse.heldout.heldout_set and score), or declare a capability check "
                "(ftcourse.profiles.capability_check).",
                pytrace=False,
            )
        limit = speed.fail_limit()
        if seconds > limit:
            pytest.fail(
                f"{chapter} ran {seconds:.0f} s, more than {BUDGET_FAIL_FACTOR:g} x its "
                f"{CHAPTER_BUDGET_S:.0f} s budget scaled to this machine (speed factor {speed.factor:.2f}: "
                f"{speed.budget():.0f} s; limit {limit:.0f} s; CPU: {speed.cpu}). A runaway, not a slow CPU: "
                "make the chapter cheaper (fewer steps, seeds or evaluation items: use the profile's sizes). "
                "Its outputs were cached, so the book build will not run it again.",
                pytrace=False,
            )

    def repr_failure(self, excinfo, style=None):
        if excinfo.errisinstance(pytest.fail.Exception):  # the budget check: its message, not nbmake's
            return str(excinfo.value)
        return super().repr_failure(excinfo, style)

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


def _unit_test_skips(terminalreporter) -> list[tuple[str, str]]:
    """(test id, reason) of every skipped unit test of the run."""
    found = []
    for report in terminalreporter.stats.get("skipped", []):
        longrepr = report.longrepr
        reason = longrepr[2] if isinstance(longrepr, tuple) and len(longrepr) == 3 else str(longrepr)
        found.append((report.nodeid, reason.removeprefix("Skipped: ")))
    return found


def pytest_terminal_summary(terminalreporter, exitstatus: int, config: pytest.Config) -> None:
    _chapter_times_summary(terminalreporter, config)
    skips = config.stash.get(_SKIPS, {})
    if standins_active() and skips:
        terminalreporter.section("spark stand-in skips")
        for line in skip_summary_lines(skips, _unit_test_skips(terminalreporter)):
            terminalreporter.write_line(line)
    elif any(skips.values()):
        profile = os.environ.get("FTCOURSE_PROFILE") or "cpu"
        terminalreporter.section(f"chapter skips (profile {profile})")
        for line in skip_summary_lines({c: e for c, e in skips.items() if e}, []):
            terminalreporter.write_line(line)


def chapter_verdict(seconds: float, passed: bool, speed: MachineSpeed) -> str:
    """ok, OVER BUDGET (over the scaled budget), TOO SLOW (over the fail limit) or FAILED."""
    if not passed:
        return "FAILED"
    if seconds > speed.fail_limit():
        return "TOO SLOW"
    if seconds > speed.budget():
        return "OVER BUDGET"
    return "ok"


def _chapter_times_summary(terminalreporter, config: pytest.Config) -> None:
    wall_times = config.stash.get(_WALL_TIMES, {})
    if not wall_times:
        return
    speed = machine_speed(config)
    terminalreporter.section(
        f"chapter times (budget {CHAPTER_BUDGET_S:.0f} s each on the design machine; "
        f"here {speed.budget():.0f} s, over {speed.fail_limit():.0f} s fails)"
    )
    terminalreporter.write_line(f"CPU: {speed.cpu}")
    parts = ", ".join(f"{name} {value:.3f} s" for name, value in speed.seconds.items())
    terminalreporter.write_line(
        f"reference workload: {parts or '-'}; speed factor {speed.factor:.2f} against the design machine "
        f"({speed.design_cpu}){'; ' + speed.note if speed.note else ''}"
    )
    terminalreporter.write_line(f"{'raw wall':>10}  {'scaled':>9}  {'CPU':>9}  {'verdict':<11}  chapter")
    for chapter, (seconds, cpu, passed) in wall_times.items():
        verdict = chapter_verdict(seconds, passed, speed)
        cpu_text = f"{cpu:7.1f} s" if cpu is not None else f"{'-':>7}  "
        terminalreporter.write_line(
            f"{seconds:8.1f} s  {seconds / speed.factor:7.1f} s  {cpu_text}  {verdict:<11}  {chapter}"
        )
    total = sum(seconds for seconds, _, _ in wall_times.values())
    total_cpu = sum(cpu or 0.0 for _, cpu, _ in wall_times.values())
    terminalreporter.write_line(
        f"{total:8.1f} s  {total / speed.factor:7.1f} s  {total_cpu:7.1f} s  "
        f"total for {len(wall_times)} chapter(s)"
    )


@pytest.fixture(scope="session")
def book_toc() -> BookToc:
    """The book's table of contents (tests/test_book.py checks it)."""
    return BookToc.load()
