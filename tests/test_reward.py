"""ftcourse.reward: the reward model trains, scores what its docstring says, and stays off the network."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from ftcourse import evaluate, profiles, reward
from ftcourse.data import task_records


@pytest.fixture(scope="module")
def tokenizer():
    return profiles.load_tokenizer()


class LastTokenRewardModel(torch.nn.Module):
    """A stand-in reward model: the score is the id of the last real token, read through the mask."""

    def forward(self, input_ids, attention_mask):
        last = attention_mask.sum(dim=1) - 1  # right padding: the last 1 of the mask is the last real token
        return SimpleNamespace(logits=input_ids.gather(1, last[:, None]).float())


def test_reward_scores_read_each_conversation_through_the_chat_template_and_ignore_padding(tokenizer):
    prompts = ["What is 2 + 2?", [{"role": "user", "content": "Largest of: 3 9"}]]
    replies = ["4", [{"role": "assistant", "content": "the largest number is 9"}]]  # different lengths
    scores = reward.reward_scores(LastTokenRewardModel(), tokenizer, prompts, replies, batch_size=2)
    by_hand = []
    for prompt, reply in zip(prompts, replies, strict=True):
        messages = reward.as_messages(prompt, "user") + reward.as_messages(reply, "assistant")
        text = tokenizer.apply_chat_template(messages, tokenize=False)
        by_hand.append(float(tokenizer(text, add_special_tokens=False)["input_ids"][-1]))
    assert scores == by_hand  # padding the shorter row did not move its last token
    assert reward.reward_scores(LastTokenRewardModel(), tokenizer, prompts, replies, batch_size=1) == by_hand
    with pytest.raises(ValueError, match="one reply per prompt"):
        reward.reward_scores(LastTokenRewardModel(), tokenizer, prompts, replies[:1])


def test_turn_helpers_accept_text_or_messages():
    assert reward.as_messages("hi", "user") == [{"role": "user", "content": "hi"}]
    assert reward.turn_text([{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]) == "b"
    assert reward.turn_text("plain") == "plain"


def test_reward_model_trains_a_few_steps_without_touching_the_network(tokenizer, no_network):
    run = reward.train_reward_model(tokenizer, task_records("train", "preference", 2), steps=2, batch_size=4)
    assert no_network == []
    assert run.losses and all(math.isfinite(loss) for _, loss in run.losses)
    assert run.model.config.num_labels == 1 and not run.model.training
    accuracy = evaluate.judge_accuracy(run.model, tokenizer, task_records("validation", "preference", 2))
    assert 0.0 <= accuracy <= 1.0


def test_train_reward_model_refuses_empty_records_and_zero_steps(tokenizer):
    with pytest.raises(ValueError, match="at least one preference record"):
        reward.train_reward_model(tokenizer, [])
    with pytest.raises(ValueError, match="steps and batch_size"):
        reward.train_reward_model(tokenizer, task_records("train", "preference", 1), batch_size=0)


def test_reward_settings_full_on_the_toy_lora_with_checkpointing_on_spark():
    toy = reward.reward_settings(profiles.PROFILES["cpu"])
    assert toy == {"lora_rank": None, "activation_checkpointing": False}
    spark = reward.reward_settings(profiles.PROFILES["spark"])
    assert spark["lora_rank"] and spark["activation_checkpointing"] is True


def test_reward_model_with_lora_trains_the_adapter_and_the_head_only(tokenizer, no_network):
    records = task_records("train", "preference", 2)
    run = reward.train_reward_model(tokenizer, records, steps=1, batch_size=4, lora_rank=4)
    assert no_network == []
    assert "LoRA rank 4" in run.recipe["method"]
    assert 0 < run.trainable_parameters < run.total_parameters
    trainable = [name for name, p in run.model.named_parameters() if p.requires_grad]
    assert any("lora_" in name for name in trainable) and any("score" in name for name in trainable)
    assert all("lora_" in name or "score" in name for name in trainable)
    with pytest.raises(ValueError, match="lora_rank"):
        reward.train_reward_model(tokenizer, records, steps=1, lora_rank=0)


def test_reward_model_max_length_is_fitted_to_hub_pairs_and_fixed_on_cpu(tokenizer, monkeypatch):
    from ftcourse import data
    from ftcourse.toy import standin

    records = task_records("train", "preference", 1)
    cpu = reward.train_reward_model(tokenizer, records, steps=1, batch_size=4)
    assert cpu.recipe["max_length"] == reward.MAX_LENGTH and cpu.recipe["truncation"]["rows_cut"] == 0
    for key, value in standin.standin_environment().items():
        monkeypatch.setenv(key, value)
    hub_tokenizer = profiles.load_tokenizer()
    pairs = list(data.load_records("preference", "train", size=4))
    hub = reward.train_reward_model(hub_tokenizer, pairs, steps=1, batch_size=2)
    assert hub.recipe["max_length"] == data.length_limit(data.sequence_lengths(pairs, hub_tokenizer))
    with pytest.raises(data.TruncationError, match="the reward model's pairs"):
        reward.train_reward_model(hub_tokenizer, pairs, steps=1, batch_size=2, max_length=4)
