"""Held-out sets (ftcourse.heldout) and the source log that checks chapters score what they trained on."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
import torch

from ftcourse import evaluate, heldout, profiles
from ftcourse.toy.tasks import build_tasks

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def toy():
    return profiles.load_base(), profiles.load_tokenizer()


def _root_conftest():
    sys.path.insert(0, str(ROOT / "tests"))
    from test_book import _root_conftest

    return _root_conftest()


def test_cpu_heldout_set_is_the_task_worlds_test_split_scored_by_exact_match(toy):
    model, tokenizer = toy
    held = heldout.heldout_set("messages", per_family=2)
    assert held.source == profiles.TASK_WORLD and held.schema == "tasks" and held.split == "test"
    assert list(held.rows) == build_tasks("test", 2) and len(held) == len(build_tasks("test", 2))
    assert held.measure == heldout.SCORE_WORDS["tasks"]
    report = heldout.score(model, tokenizer, held)
    assert report == evaluate.exact_match(model, tokenizer, list(held.rows))  # the same function on cpu


def test_reply_logprob_equals_a_hand_computed_mean_over_the_reply_tokens(toy):
    model, tokenizer = toy
    prompt = [{"role": "user", "content": "What is 2 + 3?"}]
    reply = [{"role": "assistant", "content": "5"}]
    full = tokenizer.apply_chat_template(prompt + reply, tokenize=True, return_dict=True)["input_ids"]
    head = tokenizer.apply_chat_template(prompt, tokenize=True, add_generation_prompt=True, return_dict=True)[
        "input_ids"
    ]
    assert full[: len(head)] == head  # the reply's tokens follow the generation prompt
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([full])).logits[0].float()
    by_hand = [
        torch.log_softmax(logits[position - 1], -1)[full[position]].item()
        for position in range(len(head), len(full))
    ]  # each reply token, predicted from the position before it
    assert heldout.reply_logprob(model, tokenizer, prompt, reply) == pytest.approx(
        sum(by_hand) / len(by_hand), abs=1e-5
    )


def test_row_scores_sign_and_difference_by_schema(toy):
    model, tokenizer = toy
    prompt = [{"role": "user", "content": "What is 2 + 3?"}]
    good, bad = [{"role": "assistant", "content": "5"}], [{"role": "assistant", "content": "7"}]
    liked = heldout.reply_logprob(model, tokenizer, prompt, good)
    other = heldout.reply_logprob(model, tokenizer, prompt, bad)
    pair = heldout.row_scores(
        model, tokenizer, [{"prompt": prompt, "chosen": good, "rejected": bad}], "preference"
    )
    feedback = heldout.row_scores(
        model, tokenizer, [{"prompt": prompt, "completion": bad, "label": False}], "feedback"
    )
    assert pair == [pytest.approx(liked - other, abs=1e-6)] and feedback == [pytest.approx(-other, abs=1e-6)]
    with pytest.raises(ValueError, match="'messages', 'preference' or 'feedback'"):
        heldout.row_scores(model, tokenizer, [], "alpaca")


def test_reply_report_reads_like_an_accuracy_report():
    report = heldout.ReplyReport(
        {"Chat": -1.0, "Open QA": -3.0}, -2.0, 3, (-1.0, -2.5, -3.5), ("Chat", "Open QA", "Open QA"),
        (), ("0", "1", "2"),
    )  # fmt: skip
    rows = report.with_intervals()
    assert rows["Chat"] == (-1.0, -1.0, -1.0)  # one row: no spread
    low, high = rows["overall"][1:]
    assert -3.5 <= low <= -2.0 <= high <= -1.0
    assert report.as_row() == {"Chat": -1.0, "Open QA": -3.0, "overall": -2.0}
    assert report.clusters() == ("Chat/0", "Open QA/1", "Open QA/2")
    with pytest.raises(ValueError, match="no rows of family 'Brainstorm'"):
        report.interval("Brainstorm")


def test_note_source_logs_train_score_and_declared_capability(tmp_path, monkeypatch):
    log = tmp_path / "sources.jsonl"
    profiles.note_source("score", "a", "before the log exists: nothing written")
    monkeypatch.setenv(profiles.SOURCE_LOG_ENV, str(log))
    profiles.note_source("train", "hub/a", "messages")
    profiles.note_source("score", "hub/a", "likelihood")
    with profiles.capability_check("raw form"):
        profiles.note_source("score", profiles.TASK_WORLD)
    profiles.note_source("score", profiles.TASK_WORLD, "exact match")  # after the block: a score again
    with profiles.judge_training("reward-model judge"):
        profiles.note_source("train", profiles.TASK_WORLD, "preference")
    entries = [json.loads(line) for line in log.read_text().splitlines()]
    assert [(e["use"], e["source"]) for e in entries] == [
        ("train", "hub/a"), ("score", "hub/a"), ("capability", "task world"), ("score", "task world"),
        ("judge", "task world"),
    ]  # fmt: skip
    assert entries[2]["what"] == "raw form"
    with pytest.raises(ValueError, match="use must be one of"):
        profiles.note_source("evaluate", "hub/a")


def test_source_mismatches_flag_scores_on_a_source_the_chapter_did_not_train_on():
    conftest = _root_conftest()
    assert conftest.SOURCE_LOG_ENV == profiles.SOURCE_LOG_ENV
    train = {"use": "train", "source": "hub/a", "what": "messages"}
    toy_score = {"use": "score", "source": "task world", "what": "exact match"}
    assert conftest.source_mismatches([train, toy_score]) == ["scored exact match on 'task world'"]
    assert conftest.source_mismatches([train, {**toy_score, "use": "capability"}]) == []
    assert conftest.source_mismatches([train, {**toy_score, "source": "hub/a"}]) == []
    assert conftest.source_mismatches([toy_score]) == []  # trained nothing: nothing to match
    assert conftest.read_source_log(Path("/nonexistent/log.jsonl")) == []


MISMATCHED_CELL = """from ftcourse import profiles

profiles.note_source("train", "owner/hub-dataset", "messages")
profiles.note_source("score", profiles.TASK_WORLD, "exact match")
"""


def test_chapter_runner_fails_a_chapter_that_scores_what_it_did_not_train_on(tmp_path):
    """A throwaway book with one chapter, run by a copy of conftest.py: the source check fails it."""
    sys.path.insert(0, str(ROOT / "tests"))
    from test_book import run_throwaway_chapter

    dropped = (profiles.SOURCE_LOG_ENV, "FTCOURSE_EXECUTION_CACHE")
    env = {k: v for k, v in os.environ.items() if k not in dropped}
    env |= {"FTCOURSE_EXECUTION_CACHE": "0", "FTCOURSE_SPEED_FACTOR": "1"}
    title = "Trains on one source, scores another"
    done = run_throwaway_chapter(tmp_path, "mixed", title, MISMATCHED_CELL, env)
    assert done.returncode == 1, done.stdout[-3000:]
    expected = "book/mixed.md trained on ['owner/hub-dataset'] but scored exact match on 'task world'"
    assert expected in done.stdout
    assert "ftcourse.heldout.heldout_set" in done.stdout  # the message names the way out
