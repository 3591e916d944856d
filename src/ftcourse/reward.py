"""Reward models: a language model with a scalar head, trained on preference pairs and used as a judge.

- `train_reward_model`: TRL's RewardTrainer on (prompt, chosen, rejected) records (Bradley-Terry loss);
- `reward_scores`: the trained model's score for each (prompt, reply), formatted with the chat template;
- `reward_judge`: the cpu profile's judge, a reward model trained on the task world's preference pairs.

Measuring with a judge (verdicts, win rate, the judge's accuracy) lives in `ftcourse.evaluate`.
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch.nn.utils.rnn import pad_sequence

from ftcourse.profiles import Profile, active_profile, resolve_model, stay_offline
from ftcourse.sft import TrainingRun

Turn = str | Sequence[Mapping[str, str]]  # a chat turn: plain text, or already a list of messages

JUDGE_PAIRS_PER_FAMILY = 150  # training pairs per task family for the reward-model judge
JUDGE_STEPS = 40  # training steps of the reward-model judge on the cpu profile


def as_messages(turn: Turn, role: str) -> list[dict[str, str]]:
    """A chat turn as a list of message dicts, whether it arrives as plain text or already as messages."""
    if isinstance(turn, str):
        return [{"role": role, "content": turn}]
    return [dict(message) for message in turn]


def turn_text(turn: Turn) -> str:
    """The text of a turn: the string itself, or the content of its last message."""
    return turn if isinstance(turn, str) else turn[-1]["content"]


def _device(model: Any) -> torch.device:
    # PEFT wrappers and plain modules both answer `.device`; test stubs may not.
    return getattr(model, "device", torch.device("cpu"))


@contextmanager
def quiet_progress(show: bool) -> Iterator[None]:
    """A context that hides the progress bars of datasets and transformers unless `show`; yields nothing."""
    import datasets
    from transformers.utils import logging as transformers_logging

    were_on = not datasets.are_progress_bars_disabled(), transformers_logging.is_progress_bar_enabled()
    if not show:
        datasets.disable_progress_bars()
        transformers_logging.disable_progress_bar()
    try:
        yield
    finally:
        if were_on[0]:
            datasets.enable_progress_bars()
        if were_on[1]:
            transformers_logging.enable_progress_bar()


def train_reward_model(
    tokenizer: Any,
    records: Sequence[Mapping[str, Any]],
    *,
    steps: int = JUDGE_STEPS,
    batch_size: int = 16,
    learning_rate: float = 3e-4,
    seed: int = 0,
    model_path: str | None = None,
    profile: Profile | None = None,
    progress: bool = False,
) -> TrainingRun:
    """A TrainingRun whose model is the base model with a scalar head, trained by TRL's RewardTrainer."""
    from datasets import Dataset
    from transformers import PrinterCallback
    from trl import RewardConfig, RewardTrainer

    if not records:
        raise ValueError("train_reward_model needs at least one preference record (prompt, chosen, rejected)")
    if steps < 1 or batch_size < 1:
        raise ValueError(
            f"steps and batch_size must be at least 1, got steps={steps}, batch_size={batch_size}"
        )
    profile = profile or active_profile()
    stay_offline(profile)  # no telemetry, no hub lookups on a profile without network
    recipe = {
        "method": "reward model (full fine-tuning, scalar head)",
        "learning_rate": learning_rate,
        "steps": steps,
        "batch_size": batch_size,
        "scheduler": "cosine",
        "warmup_steps": max(1, steps // 10),
        "max_length": 256,
        "seed": seed,
        "dtype": profile.dtype,
    }
    with tempfile.TemporaryDirectory() as scratch, quiet_progress(progress):
        config = RewardConfig(
            output_dir=scratch,
            max_steps=steps,
            per_device_train_batch_size=batch_size,
            learning_rate=learning_rate,
            lr_scheduler_type="cosine",
            warmup_steps=recipe["warmup_steps"],
            logging_steps=max(1, steps // 10),
            save_strategy="no",
            report_to="none",
            seed=seed,
            max_length=256,
            activation_checkpointing=False,  # TRL turns it on by default; a tiny model needs no memory saving
            use_cpu=profile.device == "cpu",
            bf16=profile.dtype == "bfloat16",
            disable_tqdm=not progress,
            model_init_kwargs={"dtype": profile.dtype, "local_files_only": not profile.uses_network},
        )
        # Given a path, TRL loads AutoModelForSequenceClassification with num_labels=1: the pretrained body
        # plus a new linear head that reads the hidden state of the last non-pad token. It also copies the
        # tokenizer's pad id into the model config, which is how the head finds that token.
        trainer = RewardTrainer(
            model=model_path or resolve_model("lora", profile),
            args=config,
            train_dataset=Dataset.from_list(list(records)),
            processing_class=tokenizer,
        )
        if not progress:
            trainer.remove_callback(PrinterCallback)  # with tqdm off, the Trainer prints every log line
        started = time.perf_counter()
        trainer.train()
        seconds = time.perf_counter() - started
    losses = [(log["step"], log["loss"]) for log in trainer.state.log_history if "loss" in log]
    model = trainer.model
    n_params = sum(p.numel() for p in model.parameters())
    model.eval()
    return TrainingRun(model, losses, seconds, n_params, n_params, recipe)


@torch.no_grad()
def reward_scores(
    reward_model: Any,
    tokenizer: Any,
    prompts: Sequence[Turn],
    replies: Sequence[Turn],
    batch_size: int = 64,
) -> list[float]:
    """The reward model's scalar score for each (prompt, reply), formatted with the chat template."""
    if len(prompts) != len(replies):
        raise ValueError(f"need one reply per prompt; got {len(prompts)} prompts and {len(replies)} replies")
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    texts = [
        tokenizer.apply_chat_template(as_messages(p, "user") + as_messages(r, "assistant"), tokenize=False)
        for p, r in zip(prompts, replies, strict=True)
    ]
    # add_special_tokens=False: the chat template already wrote every special token, as in TRL's training.
    encoded = tokenizer(texts, add_special_tokens=False)["input_ids"]
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    scores: list[float] = []
    for start in range(0, len(encoded), batch_size):
        rows = [torch.tensor(ids) for ids in encoded[start : start + batch_size]]
        input_ids = pad_sequence(rows, batch_first=True, padding_value=pad_id).to(_device(reward_model))
        # Right padding with an explicit mask: the head reads the last token whose mask is 1.
        mask = pad_sequence([torch.ones_like(r) for r in rows], batch_first=True).to(input_ids.device)
        logits = reward_model(input_ids=input_ids, attention_mask=mask).logits  # (B, 1)
        scores += logits[:, 0].float().tolist()
    return scores


def reward_judge(tokenizer: Any, profile: Profile | None = None, **train_kwargs: Any) -> Any:
    """A reward model trained now on the task world's training preference pairs, ready to judge."""
    from ftcourse.data import task_records

    records = task_records("train", "preference", per_family=JUDGE_PAIRS_PER_FAMILY)
    return train_reward_model(tokenizer, records, profile=profile, **train_kwargs).model
