"""Hub-schema records made from the task world."""

from __future__ import annotations

import pytest

from ftcourse.data import SCHEMAS, load_records, task_records


@pytest.mark.parametrize("schema", sorted(SCHEMAS))
def test_records_have_exactly_the_schema_columns(schema):
    records = task_records("train", schema, 5)
    assert len(records) == 20
    assert all(tuple(r) == SCHEMAS[schema] for r in records)


def test_messages_are_a_user_then_an_assistant_turn():
    record = task_records("test", "messages", 1)[0]
    assert [m["role"] for m in record["messages"]] == ["user", "assistant"]


def test_preference_pairs_differ_and_feedback_alternates():
    for record in task_records("train", "preference", 10):
        assert record["chosen"][0]["content"] != record["rejected"][0]["content"]
    labels = [r["label"] for r in task_records("train", "feedback", 3)]
    assert labels == [True, False] * 6


def test_load_records_on_cpu_is_a_dataset_of_generated_tasks(monkeypatch):
    monkeypatch.delenv("FTCOURSE_PROFILE", raising=False)
    dataset = load_records("alpaca", "validation", size=8)
    assert dataset.column_names == list(SCHEMAS["alpaca"])
    assert len(dataset) == 8


def test_unknown_schema_names_the_choices():
    with pytest.raises(ValueError, match="schema must be one of"):
        task_records("train", "sharegpt", 1)
