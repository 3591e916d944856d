"""Reward models: a language model with a scalar head, trained on preference pairs and used as a judge.

- `train_reward_model`: TRL's RewardTrainer on (prompt, chosen, rejected) records (Bradley-Terry loss);
- `reward_scores`: the trained model's score for each (prompt, reply), formatted with the chat template;
- `reward_judge`: the cpu profile's judge, a reward model trained on the task world's preference pairs.

Measuring with a judge (verdicts, win rate, the judge's accuracy) lives in `ftcourse.evaluate`.
"""

from __future__ import annotations

import dataclasses
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch.nn.utils.rnn import pad_sequence

from ftcourse.profiles import Profile, active_profile, judge_training, resolve_model, stay_offline
from ftcourse.sft import TrainingRun

Turn = str | Sequence[Mapping[str, str]]  # a chat turn: plain text, or already a list of messages

JUDGE_PAIRS_PER_FAMILY = 150  # training pairs per task family for the reward-model judge
JUDGE_STEPS = 40  # training steps of the reward-model judge on the cpu profile
MAX_LENGTH = 256  # tokens of prompt and reply the reward model reads on the cpu profile (the pairs fit)


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


# How the reward model trains under each profile. Full fine-tuning of Llama-3.1-8B with activation
# checkpointing off would hold bf16 weights, gradients and two Adam moments plus every layer's activations;
# LoRA with checkpointing keeps the weights frozen. `ftcourse.memory.fit_check(..., objective="reward")`
# sizes both (the rlhf chapter prints them).
REWARD_SETTINGS: dict[str, dict[str, Any]] = {
    "cpu": {"lora_rank": None, "activation_checkpointing": False},
    "spark": {"lora_rank": 16, "activation_checkpointing": True},
}


def reward_settings(profile: Profile | None = None) -> dict[str, Any]:
    """The reward model's training settings for `profile`: LoRA rank (None: full) and checkpointing."""
    profile = profile or active_profile()
    return dict(REWARD_SETTINGS.get(profile.name, REWARD_SETTINGS["cpu"]))


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
    lora_rank: int | None = -1,
    activation_checkpointing: bool | None = None,
    max_length: int | None = None,
    allow_truncation: bool = False,
) -> TrainingRun:
    """A TrainingRun whose model is the base model with a scalar head, trained by TRL's RewardTrainer.

    `lora_rank` None trains every weight (full fine-tuning); a rank trains a LoRA adapter on all linear
    layers plus the new head. The default -1 picks per profile (`reward_settings`): full fine-tuning of the
    5M-parameter toy on the cpu profile; rank 16 with activation checkpointing for the 8B model on spark.
    `max_length=None` is MAX_LENGTH on the cpu profile and fitted to the pairs on a hub profile
    (`data.fit_lengths`: 95% of them whole); what it cuts is printed and kept in the recipe.
    """
    from datasets import Dataset
    from transformers import PrinterCallback
    from trl import RewardConfig, RewardTrainer

    from ftcourse import data

    if not records:
        raise ValueError("train_reward_model needs at least one preference record (prompt, chosen, rejected)")
    if steps < 1 or batch_size < 1:
        raise ValueError(
            f"steps and batch_size must be at least 1, got steps={steps}, batch_size={batch_size}"
        )
    profile = profile or active_profile()
    stay_offline(profile)  # no telemetry, no hub lookups on a profile without network
    settings = reward_settings(profile)
    lora_rank = settings["lora_rank"] if lora_rank == -1 else lora_rank
    if activation_checkpointing is None:
        activation_checkpointing = settings["activation_checkpointing"]
    if lora_rank is not None and lora_rank < 1:
        raise ValueError(f"lora_rank must be None (full fine-tuning) or at least 1, got {lora_rank}")
    if max_length is None and not profile.uses_network:
        max_length = MAX_LENGTH
    lengths = data.sequence_lengths(records, tokenizer)
    truncation = data.fit_lengths(lengths, max_length, "the reward model's pairs", allow_truncation)
    peft_config = None
    if lora_rank is not None:
        from peft import LoraConfig

        from ftcourse.sft import DEFAULT_TARGETS

        # SEQ_CLS: peft keeps the new score head trainable (modules_to_save), beside the LoRA factors.
        peft_config = LoraConfig(
            r=lora_rank, lora_alpha=2 * lora_rank, target_modules=list(DEFAULT_TARGETS), task_type="SEQ_CLS"
        )
    recipe = {
        "method": "reward model ("
        + ("full fine-tuning" if lora_rank is None else f"LoRA rank {lora_rank}")
        + ", scalar head)",
        "activation_checkpointing": activation_checkpointing,
        "learning_rate": learning_rate,
        "steps": steps,
        "batch_size": batch_size,
        "scheduler": "cosine",
        "warmup_steps": max(1, steps // 10),
        "max_length": truncation.max_length,
        "truncation": dataclasses.asdict(truncation),
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
            max_length=truncation.max_length,
            # TRL turns it on by default; the toy needs no memory saving, the 8B on a Spark does
            activation_checkpointing=activation_checkpointing,
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
            peft_config=peft_config,
        )
        if not progress:
            trainer.remove_callback(PrinterCallback)  # with tqdm off, the Trainer prints every log line
        started = time.perf_counter()
        trainer.train()
        seconds = time.perf_counter() - started
    losses = [(log["step"], log["loss"]) for log in trainer.state.log_history if "loss" in log]
    model = trainer.model
    n_params = sum(p.numel() for p in model.parameters())
    n_trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    model.eval()
    return TrainingRun(model, losses, seconds, n_trainable, n_params, recipe)


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

    with judge_training("reward-model judge"):  # the judge's data is not what the chapter's runs train on
        records = task_records("train", "preference", per_family=JUDGE_PAIRS_PER_FAMILY)
    train_kwargs.setdefault("max_length", MAX_LENGTH)  # the task world's pairs fit, with any tokenizer
    return train_reward_model(tokenizer, records, profile=profile, **train_kwargs).model
