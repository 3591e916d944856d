"""Online RL with a verifiable reward: GRPO on task-world questions, and what to measure about it.

- `exact_match_reward`, `first_number_reward`: reward functions TRL's `GRPOTrainer` calls (1.0 or 0.0);
- `grpo_trainer`: TRL's `GRPOTrainer` with that reward and a new LoRA adapter on a given model;
- `sampled_rewards`: the reward of `samples` replies per held-out question, sampled the way training samples,
  so a trained policy and its start can be compared question by question;
- `zero_variance_share`, `expected_dead_groups`: the share of groups whose replies all score alike (zero
  advantage, no gradient);
- `end_of_turn_probability`: what the model gives the end-of-turn token right after a correct answer;
- `first_token_kl`: how far training moved the policy from its start, at the first reply token;
- `resolvable_difference`: the smallest paired difference a number of questions can detect;
- `training_signal`: what the trainer's log says about that signal (zero-variance groups, clipping, KL).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ftcourse.profiles import TASK_WORLD, Profile, active_profile, note_source, stay_offline
from ftcourse.toy.tasks import Task


def exact_match_reward(completions: Sequence[Any], answer: Sequence[str], **_: Any) -> list[float]:
    """GRPO reward function: 1.0 where the completion's first answer equals the task's answer, else 0.0."""
    from ftcourse.evaluate import first_answer

    texts = [c[-1]["content"] if isinstance(c, list) else c for c in completions]  # chat or plain completions
    return [float(first_answer(text) == expected) for text, expected in zip(texts, answer, strict=True)]


def first_number_reward(completions: Sequence[Any], answer: Sequence[str], **_: Any) -> list[float]:
    """GRPO reward function: 1.0 where the completion starts with the task's answer as a whole number."""
    texts = [c[-1]["content"] if isinstance(c, list) else c for c in completions]  # chat or plain completions
    found = [re.match(r"\s*(-?\d+)", text) for text in texts]
    return [
        float(m is not None and m.group(1) == expected) for m, expected in zip(found, answer, strict=True)
    ]


def grpo_trainer(
    model: Any,
    tokenizer: Any,
    tasks: Sequence[Task],
    *,
    steps: int = 30,
    batch_size: int = 8,
    num_generations: int = 4,
    max_completion_length: int = 8,
    temperature: float = 0.7,
    learning_rate: float = 3e-4,
    beta: float = 0.0,
    reward_function: Callable[..., list[float]] = exact_match_reward,
    logging_steps: int = 2,
    seed: int = 0,
    output_dir: str,
    profile: Profile | None = None,
) -> Any:
    """TRL's GRPOTrainer on task-world `tasks` with the exact-match reward and a new LoRA adapter.

    Each step samples `num_generations` replies per prompt (`batch_size / num_generations` prompts), scores
    them with `exact_match_reward` and uses each reply's reward relative to its group as the advantage.
    The prompts are the task world's on every profile: the reward checks an answer, and the hub datasets
    of the spark profile have none to check.
    `beta` = 0 (TRL's default) keeps no reference model; with `beta` > 0 the reference is the adapter off.
    """
    from datasets import Dataset
    from transformers.trainer_callback import PrinterCallback
    from trl import GRPOConfig, GRPOTrainer

    from ftcourse.prefs import trainer_options
    from ftcourse.sft import lora_config

    if num_generations < 2:
        raise ValueError(f"num_generations must be at least 2 got {num_generations}")
    if batch_size % num_generations:
        raise ValueError(
            f"batch_size ({batch_size}) must be a multiple of num_generations ({num_generations})"
        )
    if not tasks:
        raise ValueError("grpo_trainer needs at least one task to sample prompts from")
    profile = profile or active_profile()
    stay_offline(profile)
    note_source("train", TASK_WORLD, "GRPO prompts")
    records = [{"prompt": [{"role": "user", "content": t.prompt}], "answer": t.answer} for t in tasks]
    config = GRPOConfig(
        **trainer_options(profile, output_dir, steps, batch_size, learning_rate, seed),
        num_generations=num_generations,
        max_completion_length=max_completion_length,
        temperature=temperature,
        beta=beta,
        logging_steps=logging_steps,
    )
    trainer = GRPOTrainer(
        model=model,
        reward_funcs=reward_function,
        args=config,
        train_dataset=Dataset.from_list(records),
        processing_class=tokenizer,
        peft_config=lora_config(),
    )
    trainer.remove_callback(PrinterCallback)
    return trainer


@dataclass(frozen=True)
class SampledRewards:
    """One reward per sampled reply, and the question each reply answers (its family and item)."""

    rewards: tuple[float, ...]
    questions: tuple[str, ...]  # a label per reply: `samples` replies to one question share it
    samples: int  # replies per question
    replies: tuple[str, ...] = ()  # the decoded replies, as the reward function read them

    @property
    def mean(self) -> float:
        """The mean reward over every sampled reply."""
        return sum(self.rewards) / len(self.rewards)


@torch.no_grad()
def sampled_rewards(
    model: Any,
    tokenizer: Any,
    tasks: Sequence[Task],
    *,
    samples: int = 4,
    temperature: float = 0.7,
    max_completion_length: int = 8,
    seed: int = 0,
    batch_size: int = 64,
    reward_function: Callable[..., list[float]] = exact_match_reward,
) -> SampledRewards:
    """The exact-match reward of `samples` replies per task, sampled as GRPOTrainer samples (no top-k)."""
    from ftcourse.evaluate import chat_prompt

    if samples < 1 or not tasks:
        raise ValueError(f"need at least one task and one sample per task, got {len(tasks)} and {samples}")
    note_source("score", TASK_WORLD, "sampled rewards")
    torch.manual_seed(seed)
    tokenizer.padding_side = "left"
    prompts = [chat_prompt(tokenizer, t) for t in tasks]
    rewards: list[float] = []
    replies: list[str] = []
    for start in range(0, len(prompts), batch_size):
        batch = tokenizer(
            prompts[start : start + batch_size], return_tensors="pt", padding=True, add_special_tokens=False
        ).to(model.device)
        out = model.generate(
            **batch,
            do_sample=True,
            temperature=temperature,
            top_k=0,
            top_p=1.0,
            max_new_tokens=max_completion_length,
            num_return_sequences=samples,
            pad_token_id=tokenizer.pad_token_id,
        )
        # As TRL does: cut at the end of turn, decode without special tokens, score with the same reward.
        texts = tokenizer.batch_decode(out[:, batch["input_ids"].shape[1] :], skip_special_tokens=True)
        answers = [t.answer for t in tasks[start : start + batch_size] for _ in range(samples)]
        rewards += reward_function(texts, answers)
        replies += texts
    questions = tuple(f"{t.family}/{t.item}" for t in tasks for _ in range(samples))
    return SampledRewards(tuple(rewards), questions, samples, tuple(replies))


def rescored(
    sampled: SampledRewards, tasks: Sequence[Task], reward_function: Callable[..., list[float]]
) -> SampledRewards:
    """The same sampled replies scored by another reward function (no new sampling)."""
    answers = [t.answer for t in tasks for _ in range(sampled.samples)]
    rewards = reward_function(list(sampled.replies), answers)
    return SampledRewards(tuple(rewards), sampled.questions, sampled.samples, sampled.replies)


@torch.no_grad()
def end_of_turn_probability(model: Any, tokenizer: Any, tasks: Sequence[Task]) -> float:
    """Mean probability of the end-of-turn token right after the correct answer: what exact match needs."""
    from ftcourse.evaluate import chat_prompt

    probabilities = []
    for task in tasks:
        ids = tokenizer(
            chat_prompt(tokenizer, task) + task.answer, add_special_tokens=False, return_tensors="pt"
        )
        logits = model(input_ids=ids["input_ids"].to(model.device)).logits[0, -1]  # (V,) the next token
        probabilities.append(logits.float().softmax(-1)[tokenizer.eos_token_id].item())
    return sum(probabilities) / len(probabilities)


@torch.no_grad()
def first_token_kl(model: Any, tokenizer: Any, tasks: Sequence[Task], temperature: float = 1.0) -> float:
    """Mean KL(policy || start) of the first reply token at `temperature`; the start is the adapter off."""
    from ftcourse.evaluate import chat_prompt

    tokenizer.padding_side = "left"
    batch = tokenizer([chat_prompt(tokenizer, t) for t in tasks], return_tensors="pt", padding=True,
                      add_special_tokens=False).to(model.device)  # fmt: skip
    policy = (model(**batch).logits[:, -1].float() / temperature).log_softmax(-1)  # (B, V)
    with model.disable_adapter():
        start = (model(**batch).logits[:, -1].float() / temperature).log_softmax(-1)
    return float((policy.exp() * (policy - start)).sum(-1).mean())


def resolvable_difference(per_unit: Sequence[float], power_z: float = 0.8416, alpha_z: float = 1.96) -> float:
    """The smallest mean difference a paired test over these units detects with 80% power at 5%, two-sided."""
    n = len(per_unit)
    if n < 2:
        raise ValueError(f"need at least two units to estimate their spread, got {n}")
    mean = sum(per_unit) / n
    sd = (sum((d - mean) ** 2 for d in per_unit) / (n - 1)) ** 0.5
    return (alpha_z + power_z) * sd / n**0.5


def zero_variance_share(success_rate: float, num_generations: int) -> float:
    """The chance that `num_generations` 0/1 rewards are all 0 or all 1: zero advantage, no gradient."""
    if not 0.0 <= success_rate <= 1.0 or num_generations < 1:
        raise ValueError(
            f"need a success rate in [0, 1] and one generation or more, got {success_rate}, {num_generations}"
        )
    return success_rate**num_generations + (1 - success_rate) ** num_generations


def expected_dead_groups(sampled: SampledRewards, num_generations: int) -> float:
    """The expected share of groups with zero reward variance, from each question's sampled success rate."""
    rates: dict[str, list[float]] = {}
    for question, value in zip(sampled.questions, sampled.rewards, strict=True):
        rates.setdefault(question, []).append(value)
    shares = [zero_variance_share(sum(v) / len(v), num_generations) for v in rates.values()]
    return sum(shares) / len(shares)


def training_signal(log_history: Sequence[Mapping[str, Any]]) -> dict[str, float]:
    """Means over GRPOTrainer's logged steps: zero-variance groups, clipped tokens, KL, entropy, reward."""
    keys = {
        "zero_variance_share": "frac_reward_zero_std",
        "clipped_share": "clip_ratio/region_mean",
        "kl": "kl",
        "entropy": "entropy",
        "reward": "reward",
    }
    logged = [log for log in log_history if "reward" in log]
    if not logged:
        raise ValueError("the log has no GRPO step (no 'reward' entry): train first, with logging_steps >= 1")
    signal = {}
    for name, key in keys.items():
        values = [float(log[key]) for log in logged if key in log]
        if values:
            signal[name] = sum(values) / len(values)
    return signal
