"""ftcourse.grpo: reward functions by hand, TRL's GRPOTrainer offline, and the measurements of the signal."""

from __future__ import annotations

import json
import tempfile

import pytest
import torch

from ftcourse import grpo, profiles
from ftcourse.evaluate import chat_prompt
from ftcourse.toy.tasks import build_tasks


@pytest.fixture(scope="module")
def tokenizer():
    return profiles.load_tokenizer()


@pytest.fixture(scope="module")
def base():
    return profiles.load_base()


@pytest.fixture(scope="module")
def scratch():
    with tempfile.TemporaryDirectory() as folder:
        yield folder


def test_exact_match_reward_by_hand():
    completions = [
        [{"role": "assistant", "content": "22"}],
        [{"role": "assistant", "content": "23\nmore"}],
        "22",
    ]
    assert grpo.exact_match_reward(completions, ["22", "22", "22"]) == [1.0, 0.0, 1.0]


def test_first_number_reward_reads_the_leading_whole_number():
    completions = ["25ue24", " 25", "250", "2", "x25", [{"role": "assistant", "content": "25 is it"}]]
    assert grpo.first_number_reward(completions, ["25"] * 6) == [1.0, 1.0, 0.0, 0.0, 0.0, 1.0]
    # Exact match refuses the reply that runs on after the right number; the first-number reward accepts it.
    assert grpo.exact_match_reward(["25ue24"], ["25"]) == [0.0]


def test_grpo_trainer_steps_offline(tokenizer, scratch, no_network):
    trainer = grpo.grpo_trainer(
        profiles.load_base(), tokenizer, build_tasks("train", 2), steps=1, batch_size=4, output_dir=scratch
    )
    trainer.train()
    assert trainer.state.global_step == 1
    assert no_network == []
    assert trainer.reward_funcs[0] is grpo.exact_match_reward
    signal = grpo.training_signal(trainer.state.log_history)
    assert 0.0 <= signal["zero_variance_share"] <= 1.0 and "kl" not in signal  # beta = 0 logs no KL
    with pytest.raises(ValueError, match="multiple of num_generations"):
        grpo.grpo_trainer(None, tokenizer, [], batch_size=6, num_generations=4, output_dir=scratch)
    with pytest.raises(ValueError, match="at least 2"):
        grpo.grpo_trainer(None, tokenizer, [], batch_size=4, num_generations=1, output_dir=scratch)
    with pytest.raises(ValueError, match="at least one task"):
        grpo.grpo_trainer(None, tokenizer, [], batch_size=4, output_dir=scratch)


def test_grpo_trainer_passes_the_reward_function_and_beta(tokenizer, scratch, no_network):
    trainer = grpo.grpo_trainer(
        profiles.load_base(),
        tokenizer,
        build_tasks("train", 2),
        steps=1,
        batch_size=4,
        beta=0.05,
        reward_function=grpo.first_number_reward,
        output_dir=scratch,
    )
    assert trainer.reward_funcs[0] is grpo.first_number_reward
    assert trainer.beta == 0.05 and trainer.ref_model is None  # with LoRA the reference is the adapter off
    trainer.train()
    assert "kl" in grpo.training_signal(trainer.state.log_history)


def test_zero_variance_share_is_the_chance_of_a_unanimous_group():
    assert grpo.zero_variance_share(0.5, 2) == pytest.approx(0.5)
    assert grpo.zero_variance_share(0.0, 8) == 1.0 and grpo.zero_variance_share(1.0, 8) == 1.0
    assert grpo.zero_variance_share(0.25, 4) == pytest.approx(0.25**4 + 0.75**4)
    with pytest.raises(ValueError, match="success rate"):
        grpo.zero_variance_share(1.5, 4)


def test_expected_dead_groups_averages_per_question():
    sampled = grpo.SampledRewards((1.0, 1.0, 0.0, 1.0), ("a", "a", "b", "b"), 2)
    expected = (grpo.zero_variance_share(1.0, 4) + grpo.zero_variance_share(0.5, 4)) / 2
    assert grpo.expected_dead_groups(sampled, 4) == pytest.approx(expected)


def test_sampled_rewards_label_each_reply_with_its_question_and_rescore_the_same_replies(base, tokenizer):
    tasks = [t for t in build_tasks("test", 2) if t.family == "add"]
    sampled = grpo.sampled_rewards(base, tokenizer, tasks, samples=3, max_completion_length=4)
    assert len(sampled.rewards) == len(sampled.replies) == 3 * len(tasks)
    assert sampled.questions[:3] == (f"add/{tasks[0].item}",) * 3
    again = grpo.sampled_rewards(base, tokenizer, tasks, samples=3, max_completion_length=4)
    assert again.replies == sampled.replies  # the seed fixes the samples
    rescored = grpo.rescored(sampled, tasks, grpo.first_number_reward)
    answers = [t.answer for t in tasks for _ in range(3)]
    assert rescored.rewards == tuple(grpo.first_number_reward(list(sampled.replies), answers))


def test_end_of_turn_probability_is_the_softmax_at_the_answer(base, tokenizer):
    task = build_tasks("test", 1)[0]
    ids = tokenizer(chat_prompt(tokenizer, task) + task.answer, add_special_tokens=False, return_tensors="pt")
    with torch.no_grad():
        by_hand = base(**ids).logits[0, -1].softmax(-1)[tokenizer.eos_token_id].item()
    assert grpo.end_of_turn_probability(base, tokenizer, [task]) == pytest.approx(by_hand, rel=1e-5)


def test_first_token_kl_is_zero_for_a_fresh_adapter(base, tokenizer):
    from peft import get_peft_model

    from ftcourse.sft import lora_config

    model = get_peft_model(profiles.load_base(), lora_config())  # lora_B starts at zero: same as the base
    assert grpo.first_token_kl(model, tokenizer, build_tasks("test", 1)) == pytest.approx(0.0, abs=1e-6)


def test_resolvable_difference_follows_the_normal_approximation():
    differences = [0.1, -0.1] * 50  # sd = 0.1005, n = 100
    sd = (sum(d**2 for d in differences) / 99) ** 0.5
    assert grpo.resolvable_difference(differences) == pytest.approx((1.96 + 0.8416) * sd / 10)
    with pytest.raises(ValueError, match="two units"):
        grpo.resolvable_difference([0.1])


def test_training_signal_needs_a_logged_step():
    with pytest.raises(ValueError, match="no GRPO step"):
        grpo.training_signal([{"train_runtime": 1.0}])


def test_grpo_trains_and_scores_on_the_task_world_on_every_profile(
    base, tokenizer, scratch, monkeypatch, tmp_path
):
    # GRPO's reward checks an answer: its prompts and its held-out questions are the task world's, and say so
    log = tmp_path / "sources.jsonl"
    monkeypatch.setenv(profiles.SOURCE_LOG_ENV, str(log))
    tasks = build_tasks("train", 1)
    grpo.grpo_trainer(base, tokenizer, tasks, steps=1, batch_size=4, output_dir=scratch)
    grpo.sampled_rewards(base, tokenizer, tasks[:1], samples=1, max_completion_length=2)
    logged = [json.loads(line) for line in log.read_text().splitlines()]
    assert [(e["use"], e["source"]) for e in logged] == [
        ("train", profiles.TASK_WORLD),
        ("score", profiles.TASK_WORLD),
    ]
