"""The point of the embedded model: a short LoRA SFT must visibly change it (issue thresholds)."""

from __future__ import annotations

import pytest

from ftcourse import data, evaluate, profiles, sft
from ftcourse.toy.tasks import build_tasks

BASE_CEILING = 0.20  # the base model must do poorly on chat-form tasks...
TUNED_FLOOR = 0.80  # ...and a quick LoRA SFT must lift held-out accuracy far


@pytest.fixture(scope="module")
def before_and_after():
    profile = profiles.PROFILES["cpu"]
    tokenizer = profiles.load_tokenizer(profile=profile)
    model = profiles.load_base(profile=profile)
    tasks = build_tasks("test", per_family=profile.eval_per_family)
    base = evaluate.exact_match(model, tokenizer, tasks)
    run = sft.lora_sft(
        model, tokenizer, data.load_records("messages", "train", profile=profile), progress=False
    )
    tuned = evaluate.exact_match(run.model, tokenizer, tasks)
    with run.model.disable_adapter():
        base_again = evaluate.exact_match(run.model, tokenizer, tasks)
    return base, tuned, base_again, run


def test_base_model_fails_the_chat_form(before_and_after):
    base, *_ = before_and_after
    assert base.overall <= BASE_CEILING, base


def test_quick_lora_sft_lifts_held_out_accuracy(before_and_after):
    _, tuned, _, run = before_and_after
    assert tuned.overall >= TUNED_FLOOR, tuned
    assert 0 < run.trainable_parameters < 0.1 * run.total_parameters


def test_disabling_the_adapter_gives_the_base_model_back(before_and_after):
    base, _, base_again, _ = before_and_after
    assert base_again == base
