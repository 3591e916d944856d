"""forgetting.py: the data is what the chat template says, snapshots measure what evaluate measures."""

from __future__ import annotations

import dataclasses
import json
import math
from itertools import islice

import pytest
import torch

from ftcourse import data, evaluate, forgetting, heldout, profiles, sft
from ftcourse.toy import tasks
from ftcourse.toy.corpus import pretraining_documents

CPU = profiles.PROFILES["cpu"]
TINY = dataclasses.replace(forgetting.RUN_SIZES["cpu"], steps=2, batch_size=2, every=1, eval_per_family=1)
TEXTS = ("max: 3 9 5\nso the answer is\n9\nadd: 2 + 2 =\n4",)


@pytest.fixture(scope="module")
def tokenizer():
    return profiles.load_tokenizer(profile=CPU)


@pytest.fixture(scope="module")
def base():
    return profiles.load_base(profile=CPU)


@pytest.fixture(scope="module")
def questions():
    return forgetting.probe(TINY, TEXTS, CPU)


def test_prompt_completion_is_the_chat_template_split_at_the_reply(tokenizer):
    record = data.load_records("messages", "train", size=4, profile=CPU)[0]
    row = forgetting.prompt_completion(record, tokenizer)
    full = tokenizer.apply_chat_template(record["messages"], tokenize=False)
    assert full == row["prompt"] + row["completion"] + "\n"  # the template ends a turn with a newline
    assert row["prompt"].endswith("<|im_start|>assistant\n")
    assert row["completion"] == record["messages"][-1]["content"] + "<|im_end|>"


def test_prompt_completion_rejects_a_record_without_a_reply(tokenizer):
    with pytest.raises(ValueError, match="got roles \\['user'\\]"):
        forgetting.prompt_completion({"messages": [{"role": "user", "content": "hi"}]}, tokenizer)


def test_replay_texts_are_pieces_of_the_first_pretraining_documents():
    pieces = forgetting.replay_texts(6, lines_per_text=4, profile=CPU)
    recipe = evaluate._toy_recipe(CPU)
    first = list(islice(pretraining_documents(recipe["n_docs"], seed=recipe["seed"]), 5))
    assert len(pieces) == 6
    assert all(len(piece.split("\n")) <= 4 for piece in pieces)
    assert all(any(piece in document for document in first) for piece in pieces)


def test_training_data_mixes_the_stated_fraction(tokenizer):
    sizes = dataclasses.replace(TINY, steps=5, batch_size=4)
    rows = forgetting.training_data(tokenizer, sizes, replay_fraction=0.25, profile=CPU)
    assert len(rows) == 20
    assert sum(row["prompt"] == "" for row in rows) == 5
    with pytest.raises(ValueError, match="replay_fraction must be in \\[0, 1\\), got 1.5"):
        forgetting.training_data(tokenizer, sizes, replay_fraction=1.5, profile=CPU)


def test_probe_scores_the_training_source_and_declares_the_raw_form_a_capability_check(questions):
    assert questions.test.source == profiles.TASK_WORLD and questions.test.split == "test"
    assert list(questions.test.rows) == tasks.build_tasks("test", TINY.eval_per_family)
    assert list(questions.validation.rows) == tasks.build_tasks("validation", TINY.eval_per_family)
    assert not questions.test.capability and not questions.validation.capability
    assert questions.raw.capability and questions.raw.rows == questions.test.rows  # cpu: the same questions
    assert questions.raw_items == questions.items


def _source_log(monkeypatch, tmp_path) -> object:
    log = tmp_path / "sources.jsonl"
    monkeypatch.setenv(profiles.SOURCE_LOG_ENV, str(log))
    return lambda: [json.loads(line) for line in log.read_text().splitlines()] if log.is_file() else []


def test_snapshot_scores_the_task_and_checks_the_raw_form_as_a_capability(
    base, tokenizer, questions, monkeypatch, tmp_path
):
    read = _source_log(monkeypatch, tmp_path)
    forgetting.snapshot(base, tokenizer, questions)
    entries = read()
    assert [e["use"] for e in entries] == ["score", "score", "capability"]  # test, validation, raw form
    assert {e["source"] for e in entries} == {profiles.TASK_WORLD}


def test_snapshot_agrees_with_separate_measurements(base, tokenizer, questions):
    shot = forgetting.snapshot(base, tokenizer, questions, step=7)
    test, validation = list(questions.test.rows), list(questions.validation.rows)
    assert shot.step == 7 and shot.schema == "tasks"
    assert shot.task == evaluate.exact_match(base, tokenizer, test).overall
    assert shot.validation == evaluate.exact_match(base, tokenizer, validation).overall
    assert shot.raw == evaluate.exact_match(base, tokenizer, test, form="raw").overall
    # The same function on the same text: a float32 sum of n token losses, good to n·eps relative, and exp
    # of their mean turns that into |mean NLL|·n·eps relative on the perplexity.
    total, n_tokens = evaluate.token_nll(base, tokenizer, TEXTS)
    rel = abs(total / n_tokens) * n_tokens * torch.finfo(torch.float32).eps
    assert shot.perplexity == pytest.approx(evaluate.perplexity(base, tokenizer, TEXTS), rel=rel)
    assert shot.heldout.tokens == (n_tokens,) and len(shot.validation_hits) == len(validation)


def _shot(step: int, task: float, validation: float, raw: float = 0.5) -> forgetting.Snapshot:
    return forgetting.Snapshot(step, task, validation, raw, 10.0)


def test_document_nll_keeps_each_document_and_agrees_with_token_nll(base, tokenizer):
    texts = list(TEXTS) + ["add: 1 + 2 =\n3\ncount: cat dog\n2"]
    heldout = forgetting.document_nll(base, tokenizer, texts)
    total, n_tokens = evaluate.token_nll(base, tokenizer, texts)
    assert len(heldout.nll) == 2 and sum(heldout.tokens) == n_tokens
    # float32 sums of n token losses in another order: good to n·eps relative
    rel = n_tokens * torch.finfo(torch.float32).eps
    summed = sum(m * n for m, n in zip(heldout.nll, heldout.tokens, strict=True))
    assert summed == pytest.approx(total, rel=rel)
    assert heldout.perplexity == pytest.approx(evaluate.perplexity(base, tokenizer, texts), rel=10 * rel)
    newline = tokenizer("\n", add_special_tokens=False)["input_ids"][0]
    ids = tokenizer(texts)["input_ids"]
    assert list(heldout.breaks) == [row[1:].count(newline) for row in ids]
    split = evaluate.nll_at_token(base, tokenizer, texts, "\n")  # one document at a time, unpadded
    assert heldout.at_breaks == pytest.approx(split["at"], rel=1e-4)
    assert heldout.elsewhere == pytest.approx(split["elsewhere"], rel=1e-4)


def test_held_out_split_by_hand():
    before = forgetting.HeldOutNLL(nll=(1.0, 1.0), tokens=(4, 2), break_nll=(1.0, 0.0), breaks=(1, 0))
    after = forgetting.HeldOutNLL(nll=(2.0, 2.0), tokens=(4, 2), break_nll=(5.0, 0.0), breaks=(1, 0))
    assert after.perplexity == pytest.approx(math.exp(12 / 6))
    assert after.at_breaks == 5.0 and after.elsewhere == pytest.approx((12 - 5) / 5)
    assert after.elsewhere_per_document() == pytest.approx((3 / 3, 4 / 2))
    # summed NLL rose from 6 to 12; at the one line break from 1 to 5: two thirds of the rise
    assert after.share_at_breaks(before) == pytest.approx(4 / 6)


def _measured(step: int, task: list[bool], raw: list[bool], nll: list[float]) -> forgetting.Snapshot:
    n = len(nll)
    heldout = forgetting.HeldOutNLL(tuple(nll), (10,) * n, (0.0,) * n, (0,) * n)
    return forgetting.Snapshot(
        step, sum(task) / len(task), 0.0, sum(raw) / len(raw), heldout.perplexity, tuple(task), tuple(raw),
        heldout=heldout,
    )  # fmt: skip


def _task_set(rows: tuple, capability: bool = False) -> heldout.HeldOut:
    return heldout.HeldOut(profiles.TASK_WORLD, "test", "tasks", rows, capability)


def test_compare_tests_each_measure_at_its_unit_and_reading_follows_the_tests():
    questions = tuple(tasks.Task("add", f"q{i}", "", str(i), f"add: {i}", item=f"{i}+0") for i in range(12))
    probe = forgetting.Probe(
        _task_set(questions), _task_set(()), _task_set(questions, capability=True), ("doc",) * 12
    )
    start = _measured(0, [False] * 12, [True] * 12, [2.0] * 12)
    learned = _measured(10, [True] * 12, [True] * 12, [2.0] * 12)
    comparison = forgetting.compare(learned, start, probe)
    assert comparison.task.unit == "item" and comparison.task.n_units == 12
    assert comparison.nll.unit == "document" and comparison.nll.n_units == 12
    said = comparison.verdicts("tuned", "base")
    assert said["task"].outcome == "higher" and said["raw"].outcome == "no detectable difference"
    assert forgetting.reading(comparison) == "learns the task, with no detectable loss of the old skills"
    paid = _measured(10, [True] * 12, [True] * 12, [2.0 + 0.1 * (i + 1) for i in range(12)])
    said = forgetting.compare(paid, start, probe).verdicts("tuned", "base")
    assert said["nll"].outcome == "higher" and said["nll"].winner == "base"  # a loss: lower is better
    assert "nats per token" in said["nll"].text
    assert forgetting.reading(forgetting.compare(paid, start, probe)) == "learns the task and pays for it"
    with pytest.raises(ValueError, match="compare needs snapshots taken by `snapshot`"):
        forgetting.compare(_shot(0, 0.1, 0.1), start, probe)


def test_probe_items_join_rephrasings_of_one_item(questions):
    items = questions.items
    assert len(items) == len(questions.test)
    pairs = zip(items, questions.test.rows, strict=True)
    assert all(label.split("/")[0] == task.family for label, task in pairs)


# A hub-shaped held-out set: chat rows with a category, scored by the likelihood of each reference reply.
HUB = "example/hub-chat"


def _hub_probe(n: int = 6) -> forgetting.Probe:
    rows = [
        {**r, "category": "Open QA" if i % 2 else "Chat"}
        for i, r in enumerate(data.task_records("test", "messages", 4))
    ]
    test = heldout.HeldOut(HUB, "test", "messages", tuple(rows[:n]))
    validation = heldout.HeldOut(HUB, "test", "messages", tuple(rows[n : 2 * n]))
    return forgetting.Probe(test, validation, heldout.capability_tasks(1), TEXTS, reply_tokens=3)


def test_snapshot_on_hub_rows_scores_reference_replies_and_logs_their_source(
    base, tokenizer, monkeypatch, tmp_path
):
    read = _source_log(monkeypatch, tmp_path)
    probe = _hub_probe()
    shot = forgetting.snapshot(base, tokenizer, probe)
    uses = {(e["use"], e["source"]) for e in read()}
    assert ("score", HUB) in uses and ("capability", profiles.TASK_WORLD) in uses
    assert ("score", profiles.TASK_WORLD) not in uses  # the task-world questions only as a capability check
    expected = heldout.row_scores(base, tokenizer, probe.test.rows, "messages")
    assert shot.schema == "messages" and shot.task_hits == pytest.approx(expected)
    assert shot.task == pytest.approx(sum(expected) / len(expected)) and shot.task < 0  # a log-probability
    assert shot.raw == evaluate.exact_match(base, tokenizer, list(probe.raw.rows), form="raw").overall
    assert probe.items[:2] == ("Chat/0", "Open QA/1") and len(probe.raw_items) == len(probe.raw)


def test_hub_comparisons_speak_in_nats_per_token_per_row():
    probe = _hub_probe()
    nll = forgetting.HeldOutNLL((2.0,) * 12, (10,) * 12, (0.0,) * 12, (0,) * 12)
    raw = (True,) * len(probe.raw)
    shot = dict(
        validation=-1.0, raw=1.0, perplexity=nll.perplexity, raw_hits=raw, heldout=nll, schema="messages"
    )
    start = forgetting.Snapshot(0, -2.0, task_hits=(-2.0,) * 6, **shot)
    tuned = forgetting.Snapshot(10, -1.0, task_hits=tuple(-1.0 + 0.01 * i for i in range(6)), **shot)
    comparison = forgetting.compare(tuned, start, probe)
    assert comparison.task.unit == "held-out row" and comparison.task.n_units == 6
    said = comparison.verdicts("tuned", "base")["task"]
    assert said.outcome == "higher" and "nats per token" in said.text and "points" not in said.text
    table = forgetting.remedies_table([forgetting.ForgettingRun("full", 1e-5, [start, tuned])], start, "full")
    assert table.loc["full", "task log-prob"] == -1.0 and "task EM %" not in table.columns
    assert (
        forgetting.comparison_table({"tuned": comparison}).columns[0] == "task log-prob, nats/token (per row)"
    )
    assert forgetting.score_text(-1.23456, "messages") == "-1.235" and forgetting.score_text(0.5) == "50%"


def test_early_stopping_and_matched_accuracy_by_hand():
    run = forgetting.ForgettingRun(
        "r", 1e-3, [_shot(0, 0.1, 0.9), _shot(10, 0.5, 0.4), _shot(20, 0.6, 0.6), _shot(30, 0.7, 0.6)]
    )
    assert run.early_stopped.step == 20  # step 0 is not a trained checkpoint; ties go to the earlier one
    assert run.final.step == 30
    assert run.first_reaching(0.55).step == 20 and run.first_reaching(0.8) is None


def test_remedies_table_by_hand():
    start = _shot(0, 0.2, 0.1, raw=0.9)
    run = forgetting.ForgettingRun(
        "full", 1e-3, [start, _shot(10, 0.5, 0.5, raw=0.6), _shot(20, 0.4, 0.3, 0.3)]
    )
    table = forgetting.remedies_table([run], start, early_stopping_of="full")
    assert table.loc["full", "raw change (points)"] == "-60"
    assert table.loc["full + early stopping", "step"] == 10
    assert table.loc["base model", "raw EM %"] == 90
    with pytest.raises(ValueError, match="early_stopping_of='LoRA' is not one of \\['full'\\]"):
        forgetting.remedies_table([run], start, early_stopping_of="LoRA")


def test_train_tracked_snapshots_every_step_offline_and_leaves_the_base_alone(
    base, tokenizer, questions, no_network
):
    before = {name: p.clone() for name, p in base.named_parameters()}
    start = forgetting.snapshot(base, tokenizer, questions)
    run = forgetting.train_tracked(
        "full", base, tokenizer, questions, start, learning_rate=1e-3, sizes=TINY, profile=CPU
    )
    assert no_network == []
    assert [s.step for s in run.snapshots] == [0, 1, 2]
    assert run.trainable == run.total == sum(p.numel() for p in base.parameters())
    assert all(torch.equal(before[name], p) for name, p in base.named_parameters())
    lora = forgetting.train_tracked(
        "LoRA",
        base,
        tokenizer,
        questions,
        start,
        learning_rate=1e-3,
        sizes=TINY,
        profile=CPU,
        peft_config=sft.lora_config(lora_rank=8, lora_alpha=16),
        replay_fraction=0.5,
    )
    assert lora.trainable == 155_648 and len(lora.snapshots) == 3


def test_forgetting_sizes_follow_the_minimal_setting():
    minimal = dataclasses.replace(CPU, minimal=True)
    assert forgetting.forgetting_sizes(minimal) is forgetting.RUN_SIZES["minimal"]
    assert forgetting.forgetting_sizes(CPU) is forgetting.RUN_SIZES["cpu"]


@pytest.mark.parametrize("name", sorted(forgetting.RUN_SIZES))
def test_every_table_sweeps_three_rates_and_measures_the_last_step(name):
    sizes = forgetting.RUN_SIZES[name]
    assert len(sizes.learning_rates) == 3  # the chapter reads them as low, middle and high
    assert sorted(sizes.learning_rates) == list(sizes.learning_rates)
    assert sizes.steps % sizes.every == 0  # the final snapshot is the model after the last step
