"""Every exercise in the book has a hint, a worked solution and a solution cell that executes (issue 20).

The format (one block per exercise, inside a chapter's `## Exercises` section):
`**Exercise N.**` text, a `{dropdown} Hint`, a `{dropdown} Solution`, then a code cell tagged `solution`.
The chapter runs (nbmake, and the spark stand-ins) execute those cells, so a solution that does not run
fails CI; this test checks that none is missing and that no exercise is left in the old list form.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

EXERCISE = re.compile(r"^\*\*Exercise (\d+)\.\*\*", re.MULTILINE)
HINT = re.compile(r"^(?::::|```)\{dropdown\} Hint\s*$", re.MULTILINE)
SOLUTION = re.compile(r"^(?::::|```)\{dropdown\} Solution\s*$", re.MULTILINE)
CELL = re.compile(r"^```\{code-cell\}[^\n]*\n((?::[^\n]*\n)*)", re.MULTILINE)
LIST_ITEM = re.compile(r"^\d+\. \S", re.MULTILINE)


def exercise_section(text: str) -> str | None:
    """The text of the page's `## Exercises` section (up to the next level-2 heading), or None."""
    match = re.search(r"^## Exercises[^\n]*\n(.*?)(?=^## |\Z)", text, re.MULTILINE | re.DOTALL)
    return match.group(1) if match else None


def exercise_problems(text: str) -> list[str]:
    """What is missing from the exercises of one page's text; empty when every exercise is complete."""
    section = exercise_section(text)
    if section is None:
        return []
    problems = []
    if LIST_ITEM.search(section):
        problems.append("exercises still written as a numbered list: use '**Exercise N.**' blocks")
    starts = list(EXERCISE.finditer(section))
    if not starts:
        problems.append("an Exercises section with no '**Exercise N.**' block")
    numbers = [int(m.group(1)) for m in starts]
    if numbers != list(range(1, len(numbers) + 1)):
        problems.append(f"exercises numbered {numbers}, expected 1..{len(numbers)}")
    for index, start in enumerate(starts):
        end = starts[index + 1].start() if index + 1 < len(starts) else len(section)
        block = section[start.start() : end]
        label = f"Exercise {start.group(1)}"
        hint, solution = HINT.search(block), SOLUTION.search(block)
        cells = [c for c in CELL.finditer(block) if re.search(r":tags:.*\bsolution\b", c.group(1))]
        if hint is None:
            problems.append(f"{label}: no '{{dropdown}} Hint'")
        if solution is None:
            problems.append(f"{label}: no '{{dropdown}} Solution'")
        if not cells:
            problems.append(f"{label}: no code cell tagged 'solution' (hide-cell, solution)")
        elif hint is not None and solution is not None and not (hint.start() < solution.start()):
            problems.append(f"{label}: the hint must come before the solution")
    return problems


def test_a_complete_exercise_passes_and_each_missing_part_is_named():
    cell = "```{code-cell} ipython3\n:tags: [hide-cell, solution]\n\nx = 1\n```\n"
    good = (
        "# T\n\n## Exercises\n\n**Exercise 1.** Do it.\n\n:::{dropdown} Hint\nh\n:::\n\n"
        ":::{dropdown} Solution\ns\n:::\n\n" + cell + "\n## Next\n"
    )
    assert exercise_problems(good) == []
    assert exercise_problems(good.replace(":::{dropdown} Hint", ":::{note}")) == [
        "Exercise 1: no '{dropdown} Hint'"
    ]
    assert "no code cell tagged" in exercise_problems(good.replace("solution]", "x]"))[0]
    assert "numbered list" in exercise_problems("## Exercises\n\n1. Do it.\n")[0]
    assert exercise_problems("# no exercises here\n") == []


def _pages() -> list[Path]:
    root = Path(__file__).resolve().parents[1]
    return sorted(p for p in (root / "book").rglob("*.md") if "_build" not in p.parts)


@pytest.mark.parametrize("page", _pages(), ids=lambda p: f"{p.parent.name}/{p.stem}")
def test_every_exercise_has_a_hint_and_an_executed_solution(page: Path):
    problems = exercise_problems(page.read_text(encoding="utf-8"))
    assert not problems, f"{page}:\n  " + "\n  ".join(problems)
