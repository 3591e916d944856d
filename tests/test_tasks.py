"""The task world: deterministic, correct answers, splits that never share an item."""

from __future__ import annotations

import pytest

from ftcourse.toy.tasks import FAMILIES, SPLITS, build_tasks, countries, item_of, raw_text, split_of


def test_same_arguments_give_same_tasks():
    assert build_tasks("test", 20) == build_tasks("test", 20)


def test_every_family_is_present_in_every_split():
    for split in SPLITS:
        families = {t.family for t in build_tasks(split, 10)}
        assert families == set(FAMILIES), split


@pytest.mark.parametrize("split", SPLITS)
def test_answers_are_correct(split):
    capital_of = dict(countries())
    for task in build_tasks(split, 40):
        if task.family == "max":
            numbers = task.raw_prompt.removeprefix("max: ").split()
            assert task.answer == str(max(int(n) for n in numbers)) and " ".join(numbers) in task.prompt
        elif task.family == "count":
            assert task.answer == str(len(task.raw_prompt.removeprefix("count: ").split()))
        elif task.family == "add":
            a, b = (int(x) for x in task.raw_prompt.removeprefix("add: ").strip().split(" + "))
            assert task.answer == str(a + b)
        else:
            country = task.raw_prompt.removeprefix("capital: ").strip()
            assert task.answer == capital_of[country]
        assert task.answer not in task.distractors


def test_splits_share_no_prompt_and_no_item():
    prompts = {s: {t.prompt for t in build_tasks(s, 200)} for s in SPLITS}
    items = {s: {t.raw_prompt for t in build_tasks(s, 200)} for s in SPLITS}
    for a, b in (("train", "validation"), ("train", "test"), ("validation", "test")):
        assert not prompts[a] & prompts[b]
        assert not items[a] & items[b]


def test_split_of_is_stable_and_roughly_60_20_20():
    keys = [f"key{i}" for i in range(5000)]
    shares = {s: sum(split_of(k) == s for k in keys) / len(keys) for s in SPLITS}
    assert split_of("key1") == split_of("key1")
    assert 0.55 < shares["train"] < 0.65 and 0.15 < shares["test"] < 0.25


def test_raw_form_puts_the_answer_on_its_own_line():
    assert raw_text("count", "cat dog", "2") == "count: cat dog\n2"
    task = build_tasks("train", 1)[0]
    assert task.raw_prompt.endswith("\n")


def test_bad_arguments_are_refused_with_the_choices():
    with pytest.raises(ValueError, match="split must be one of"):
        build_tasks("dev", 5)
    with pytest.raises(ValueError, match="at least 1"):
        build_tasks("train", 0)


def _subject(task) -> str:
    return task.raw_prompt.split(": ", 1)[1].removesuffix("\n")


def test_item_of_ignores_order_where_the_answer_does():
    assert item_of("add", "26 + 6") == item_of("add", "6+26") == "6+26"
    assert item_of("max", "41 3 17") == item_of("max", "3 17 41") == "3 17 41"
    assert item_of("count", "dog cat") == item_of("count", "cat dog")
    assert item_of("capital", "Ostrel") == "Ostrel"
    assert item_of("add", "6 + 26") != item_of("add", "6 + 25")


@pytest.mark.parametrize("split", ["validation", "test"])
def test_no_held_out_task_has_a_twin_in_training_not_even_reordered(split):
    # Recompute each item from the raw form (not the stored Task.item), so a wrong item would show here.
    def items(s: str, n: int) -> set[tuple[str, str]]:
        return {(t.family, item_of(t.family, _subject(t))) for t in build_tasks(s, n)}

    train = items("train", 200)
    held_out = items(split, 50)
    assert len(held_out) > 100  # the check sees real tasks of every family
    assert not train & held_out
    for task in build_tasks(split, 50):
        assert task.item == item_of(task.family, _subject(task))


def test_the_test_split_does_hold_commuted_twins_of_its_own_which_evaluation_clusters():
    add = [t for t in build_tasks("test", 50) if t.family == "add"]
    swapped = {_subject(t) for t in add} & {" + ".join(_subject(t).split(" + ")[::-1]) for t in add}
    assert len({t.item for t in add}) < len(add) and swapped  # the same pair, asked both ways round
