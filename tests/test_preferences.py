"""The task world's preference pairs and feedback records (ftcourse.toy.preferences)."""

from __future__ import annotations

import pytest

from ftcourse.toy import preferences as toy_prefs
from ftcourse.toy.tasks import build_tasks


@pytest.fixture(scope="module")
def tasks():
    return {t.family: t for t in build_tasks("train", 3)}


def test_verbose_answers_by_hand(tasks):
    add = tasks["add"]
    a_plus_b = add.raw_prompt.split(": ", 1)[1].strip()
    assert toy_prefs.verbose_answer(add) == f"{a_plus_b} = {add.answer}."
    capital = tasks["capital"]
    country = capital.raw_prompt.split(": ", 1)[1].strip()
    assert toy_prefs.verbose_answer(capital) == f"The capital of {country} is {capital.answer}."
    for task in tasks.values():
        verbose = toy_prefs.verbose_answer(task)
        assert task.answer in verbose and len(verbose) > len(task.answer) + 5


def test_pair_kinds(tasks):
    for task in tasks.values():
        correct = toy_prefs.make_pair(task, "correct")
        assert correct.chosen == task.answer and correct.rejected != task.answer
        assert correct.rejected in task.distractors
        concise = toy_prefs.make_pair(task, "concise")
        assert concise.chosen == task.answer and concise.rejected == toy_prefs.verbose_answer(task)
    record = toy_prefs.make_pair(tasks["max"], "correct").record()
    assert record["prompt"] == [{"role": "user", "content": tasks["max"].prompt}]
    assert record["chosen"][0]["role"] == record["rejected"][0]["role"] == "assistant"
    with pytest.raises(ValueError, match="kind must be one of"):
        toy_prefs.make_pair(tasks["max"], "polite")


def test_pairs_are_deterministic_and_split_clean():
    first = toy_prefs.preference_pairs("train", 4)
    assert first == toy_prefs.preference_pairs("train", 4)
    assert len(first) == 4 * 4 * len(toy_prefs.KINDS)
    assert {p.kind for p in first} == set(toy_prefs.KINDS)
    test_prompts = {p.task.prompt for p in toy_prefs.preference_pairs("test", 4)}
    assert not test_prompts & {p.task.prompt for p in first}
    only = toy_prefs.preference_pairs("train", 2, kinds=("correct",))
    assert {p.kind for p in only} == {"correct"}
    with pytest.raises(ValueError, match="kinds must be"):
        toy_prefs.preference_pairs("train", 2, kinds=("nice",))


def test_feedback_is_imbalanced_one_to_four():
    pairs = toy_prefs.preference_pairs("train", 5)  # 40 pairs
    records = toy_prefs.feedback_records(pairs, desirable_per_undesirable=0.25)
    labels = [r["label"] for r in records]
    assert labels.count(False) == len(pairs) and labels.count(True) == len(pairs) // 4
    assert labels[: len(pairs) // 4] != [True] * (len(pairs) // 4)  # shuffled, not all praise first
    liked = {r["completion"][0]["content"] for r in records if r["label"]}
    assert liked <= {p.chosen for p in pairs}
    assert set(records[0]) == {"prompt", "completion", "label"}
    with pytest.raises(ValueError, match="desirable_per_undesirable"):
        toy_prefs.feedback_records(pairs, 0.0)


def test_period_and_sentence_pairs_prefer_the_longer_reply(tasks):
    for task in tasks.values():
        period = toy_prefs.make_pair(task, "period")
        assert (period.chosen, period.rejected) == (task.answer + ".", task.answer)
        sentence = toy_prefs.make_pair(task, "sentence")
        assert (sentence.chosen, sentence.rejected) == (toy_prefs.verbose_answer(task), task.answer)
    assert set(toy_prefs.TRAIN_KINDS) <= set(toy_prefs.KINDS)
    assert set(toy_prefs.HELDOUT_KINDS) <= set(toy_prefs.KINDS)
    assert "period" in toy_prefs.TRAIN_KINDS and "concise" in toy_prefs.HELDOUT_KINDS
