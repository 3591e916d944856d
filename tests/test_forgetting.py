"""forgetting.py: the data is what the chat template says, snapshots measure what evaluate measures."""

from __future__ import annotations

import dataclasses
import math
from itertools import islice

import pytest
import torch

from ftcourse import data, evaluate, forgetting, profiles, sft
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


def test_snapshot_agrees_with_separate_measurements(base, tokenizer, questions):
    shot = forgetting.snapshot(base, tokenizer, questions, step=7)
    test, validation = list(questions.test), list(questions.validation)
    assert shot.step == 7
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


def test_compare_tests_each_measure_at_its_unit_and_reading_follows_the_tests():
    probe = forgetting.Probe(
        tuple(tasks.Task("add", f"q{i}", "", str(i), f"add: {i}", item=f"{i}+0") for i in range(12)),
        (),
        ("doc",) * 12,
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
    assert all(label.split("/")[0] == task.family for label, task in zip(items, questions.test, strict=True))


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
