"""Supervised fine-tuning with TRL: a quick LoRA SFT run, the way every chapter trains."""

from __future__ import annotations

import tempfile
import time
from dataclasses import dataclass, field
from typing import Any

from ftcourse.profiles import Profile, active_profile

DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass
class TrainingRun:
    """What a training run produced: the adapted model, its loss curve, and how long it took."""

    model: Any
    losses: list[tuple[int, float]] = field(default_factory=list)  # (step, training loss)
    seconds: float = 0.0
    trainable_parameters: int = 0
    total_parameters: int = 0


def lora_sft(
    model: Any,
    tokenizer: Any,
    dataset: Any,
    *,
    lora_rank: int = 16,
    lora_alpha: int = 32,
    learning_rate: float = 2e-3,
    steps: int | None = None,
    batch_size: int = 16,
    seed: int = 0,
    profile: Profile | None = None,
    progress: bool = True,
) -> TrainingRun:
    """LoRA SFT of `model` on a `messages` dataset, loss on the assistant's tokens only."""
    import datasets
    from peft import LoraConfig
    from transformers.trainer_callback import PrinterCallback
    from trl import SFTConfig, SFTTrainer

    profile = profile or active_profile()
    peft_config = LoraConfig(
        r=lora_rank,
        lora_alpha=lora_alpha,
        lora_dropout=0.0,
        target_modules=list(DEFAULT_TARGETS),
        task_type="CAUSAL_LM",
    )
    with tempfile.TemporaryDirectory() as scratch:
        config = SFTConfig(
            output_dir=scratch,
            max_steps=steps or profile.sft_steps,
            per_device_train_batch_size=batch_size,
            learning_rate=learning_rate,
            lr_scheduler_type="cosine",
            warmup_steps=5,
            logging_steps=5,
            save_strategy="no",
            report_to="none",
            seed=seed,
            assistant_only_loss=True,  # needs {% generation %} markers in the chat template
            max_length=256,
            use_cpu=profile.device == "cpu",
            bf16=profile.dtype == "bfloat16",
            disable_tqdm=not progress,
        )
        bars_were_on = datasets.is_progress_bar_enabled()
        if not progress:
            datasets.disable_progress_bars()  # TRL tokenizes the dataset with datasets.map
        trainer = SFTTrainer(
            model=model,
            args=config,
            train_dataset=dataset,
            processing_class=tokenizer,
            peft_config=peft_config,
        )
        if not progress:
            trainer.remove_callback(PrinterCallback)  # without a bar, Trainer prints every log as a dict
        started = time.perf_counter()
        trainer.train()
        seconds = time.perf_counter() - started
        if bars_were_on:
            datasets.enable_progress_bars()
    losses = [(log["step"], log["loss"]) for log in trainer.state.log_history if "loss" in log]
    trainable, total = trainer.model.get_nb_trainable_parameters()
    trainer.model.eval()
    return TrainingRun(trainer.model, losses, seconds, trainable, total)
