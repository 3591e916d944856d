"""Supervised fine-tuning with TRL: one entry point for every PEFT method (or none), and the book's quick run.

`train_sft` builds TRL's `SFTTrainer` for a chat (`messages`) dataset and trains a *copy* of the model you
pass, so the model you hold stays the base model. `peft_config=None` is full fine-tuning; any peft config
(LoRA, DoRA, IA3, prompt tuning, ...) trains only that method's parameters. `lora_sft` is the LoRA recipe
every chapter uses, and `quick_sft` trains that recipe once per checkout and reloads it from a cache.
Before training, `train_sft` measures what max_length cuts from the training rows and stops above
`data.TRUNCATION_LIMIT` of them; on a hub profile it also chooses max_length from those lengths.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import shutil
import tempfile
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ftcourse import data
from ftcourse.profiles import Profile, active_profile, resolve_model, run_sizes, stay_offline

DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
CACHE_ENV = "FTCOURSE_CACHE"  # overrides where quick_sft keeps its trained adapters
# max_length on a profile without the hub, where no caller names one: every toy row is far shorter. A hub
# profile measures it from the training rows instead (pick_max_length).
FIXED_MAX_LENGTH = 256

# The LoRA recipe of the book's quick run, per profile. The embedded model has 5M parameters and learns
# at a rate ten times what an 8B model takes (2e-4 is the usual LoRA rate there; 2e-5 barely moves the toy).
# On a hub profile (spark, and its minimal sizes) the run measures max_length from its training rows; the
# number here is then the length the appendix's memory plan assumes, and run.recipe holds the one used.
QUICK_RECIPES: dict[str, dict[str, Any]] = {
    "cpu": {
        "lora_rank": 16,
        "lora_alpha": 32,
        "learning_rate": 2e-3,
        "steps": 150,
        "batch_size": 16,
        "max_length": 256,
    },
    "spark": {
        "lora_rank": 16,
        "lora_alpha": 32,
        "learning_rate": 2e-4,
        "steps": 500,
        "batch_size": 4,
        "max_length": 1024,
    },
    # FTCOURSE_SIZES=minimal (the spark stand-ins in CI): every code path for a few steps, nothing measured
    "minimal": {
        "lora_rank": 8,
        "lora_alpha": 16,
        "learning_rate": 2e-4,
        "steps": 4,
        "batch_size": 4,
        "max_length": 256,
    },
}

# The SFT pipeline chapter's runs: the shortened run (validation every `eval_steps`, a checkpoint every
# `save_steps`, resumed from the first one), and the short runs of the gradient-checkpointing, alpha and
# gradient-explosion sections.
PIPELINE_SIZES: dict[str, dict[str, int]] = {
    "cpu": {
        "steps": 60,
        "batch_size": 8,
        "eval_steps": 10,
        "save_steps": 30,
        "validation_records": 48,
        "checkpointing_steps": 4,
        "alpha_steps": 20,
        "explosion_steps": 15,
        "logging_steps": 5,
    },
    "spark": {
        "steps": 200,
        "batch_size": 4,
        "eval_steps": 20,
        "save_steps": 100,
        "validation_records": 200,
        "checkpointing_steps": 10,
        "alpha_steps": 50,
        "explosion_steps": 30,
        "logging_steps": 10,
    },
    "minimal": {
        "steps": 4,
        "batch_size": 2,
        "eval_steps": 2,
        "save_steps": 2,
        "validation_records": 8,
        "checkpointing_steps": 2,
        "alpha_steps": 2,
        "explosion_steps": 3,
        "logging_steps": 1,
    },
}


@dataclass
class TrainingRun:
    """What a training run produced: the trained model, its loss curves, its recipe, and how long it took."""

    model: Any
    losses: list[tuple[int, float]] = field(default_factory=list)  # (step, training loss)
    seconds: float = 0.0
    trainable_parameters: int = 0
    total_parameters: int = 0
    recipe: dict[str, Any] = field(default_factory=dict)  # every hyperparameter the run used
    eval_losses: list[tuple[int, float]] = field(default_factory=list)  # (step, validation loss)
    log_history: list[dict[str, Any]] = field(default_factory=list)  # the Trainer's raw log
    output_dir: str | None = None  # where checkpoints went, when the caller asked to keep them
    truncation: data.Truncation | None = None  # what max_length cut from the training rows


def every_n_steps(every: int, fn: Callable[[Any, int], Any]) -> Any:
    """A Trainer callback calling `fn(model, step)` every `every` steps; `.results` holds (step, value)."""
    from transformers import TrainerCallback

    if every < 1:
        raise ValueError(f"every must be a positive number of steps, got {every}")

    class EveryNSteps(TrainerCallback):
        def __init__(self) -> None:
            self.results: list[tuple[int, Any]] = []

        def on_step_end(self, args, state, control, model=None, **kwargs):
            if state.global_step % every == 0:
                was_training = model.training
                model.eval()
                self.results.append((state.global_step, fn(model, state.global_step)))
                model.train(was_training)
            return control

    return EveryNSteps()


def lora_config(
    lora_rank: int = 16,
    lora_alpha: int = 32,
    targets: Sequence[str] = DEFAULT_TARGETS,
    dropout: float = 0.0,
    **kwargs: Any,
) -> Any:
    """The book's peft `LoraConfig` (extra kwargs such as `use_dora=True` go to LoraConfig)."""
    from peft import LoraConfig

    return LoraConfig(
        r=lora_rank,
        lora_alpha=lora_alpha,
        lora_dropout=dropout,
        target_modules=list(targets),
        task_type="CAUSAL_LM",
        **kwargs,
    )


def _peft_recipe(peft_config: Any) -> dict[str, Any]:
    """The hyperparameters of a peft config worth recording (method, and rank/alpha/targets for LoRA)."""
    if peft_config is None:
        return {"method": "full"}
    method = str(getattr(peft_config, "peft_type", type(peft_config).__name__)).split(".")[-1].lower()
    if getattr(peft_config, "use_dora", False):
        method = "dora"
    recipe: dict[str, Any] = {"method": method}
    for name, key in (("r", "lora_rank"), ("lora_alpha", "lora_alpha"), ("lora_dropout", "lora_dropout")):
        if hasattr(peft_config, name):
            recipe[key] = getattr(peft_config, name)
    targets = getattr(peft_config, "target_modules", None)
    if targets is not None:
        recipe["targets"] = targets if isinstance(targets, str) else sorted(targets)
    if hasattr(peft_config, "num_virtual_tokens"):
        recipe["num_virtual_tokens"] = peft_config.num_virtual_tokens
    return recipe


def pick_max_length(lengths: Sequence[int], profile: Profile, fixed: int = FIXED_MAX_LENGTH) -> int:
    """max_length where the caller names none: measured from the row `lengths` on a hub profile, else `fixed`.

    Measured means `data.length_limit`: the smallest multiple of 64 tokens that holds 95% of the rows whole.
    Hub conversations run to thousands of tokens, so any fixed number either cuts many of them or pads
    every batch to a length few rows need.
    """
    return data.length_limit(lengths) if profile.uses_network else fixed


_LENGTHS: dict[tuple[Any, ...], list[int]] = {}  # token lengths per (dataset fingerprint, tokenizer)


def _training_lengths(dataset: Any, tokenizer: Any) -> list[int]:
    """`data.sequence_lengths` of a training set; remembered per `datasets.Dataset` fingerprint and tokenizer.

    Chapters train on the same dataset many times; its lengths are counted once (a list is counted anew).
    """
    fingerprint = getattr(dataset, "_fingerprint", None)
    if fingerprint is None:
        return data.sequence_lengths(dataset, tokenizer)
    template = getattr(tokenizer, "chat_template", None)
    key = (fingerprint, id(tokenizer), getattr(tokenizer, "name_or_path", ""), len(tokenizer), str(template))
    if key not in _LENGTHS:
        if len(_LENGTHS) >= 64:  # a chapter uses a handful of datasets; keep memory bounded all the same
            _LENGTHS.pop(next(iter(_LENGTHS)))
        _LENGTHS[key] = data.sequence_lengths(dataset, tokenizer)
    return _LENGTHS[key]


def train_sft(
    model: Any,
    tokenizer: Any,
    dataset: Any,
    *,
    peft_config: Any = None,
    eval_dataset: Any = None,
    learning_rate: float = 2e-3,
    steps: int | None = None,
    batch_size: int = 16,
    gradient_accumulation_steps: int = 1,
    lr_scheduler_type: str = "cosine",
    warmup_steps: int = 5,
    max_length: int | None = None,
    allow_truncation: bool = False,
    assistant_only_loss: bool = True,
    packing: bool = False,
    gradient_checkpointing: bool = False,
    neftune_noise_alpha: float | None = None,
    max_grad_norm: float = 1.0,
    logging_steps: int = 5,
    eval_steps: int | None = None,
    callbacks: Sequence[Any] = (),
    output_dir: str | os.PathLike | None = None,
    save_steps: int | None = None,
    resume_from_checkpoint: str | bool | None = None,
    copy_model: bool = True,
    seed: int = 0,
    profile: Profile | None = None,
    progress: bool = True,
    extra_args: Mapping[str, Any] | None = None,
) -> TrainingRun:
    """Train a copy of `model` with TRL's SFTTrainer; returns the run (peft_config=None: full fine-tuning).

    The input model is never modified unless `copy_model=False` (for models too big to copy, such as a
    4-bit 70B). `eval_dataset` with `eval_steps` evaluates the validation loss during training;
    `output_dir` with `save_steps` keeps checkpoints there, and `resume_from_checkpoint` resumes from one.
    `extra_args` go to `SFTConfig` unchanged.

    `max_length=None` is the profile's choice (`pick_max_length`): measured from the training rows on a hub
    profile, FIXED_MAX_LENGTH otherwise. Whatever it is, the training rows are counted first
    (`data.check_lengths`): more than `data.TRUNCATION_LIMIT` of them longer than max_length raises
    `data.TruncationError` before any trainer is built, unless `allow_truncation=True`; when any row is cut,
    one line says how many, and `run.truncation` keeps the count. Packing with TRL's default "bfd"
    strategy cuts each row at max_length as padding does, so the same check applies; the "bfd_split" and
    "wrapped" strategies carry the overflow into other rows and lose nothing, so they are not checked
    (`run.truncation` is None). The validation rows are not checked.
    """
    from transformers.trainer_callback import PrinterCallback
    from trl import SFTConfig, SFTTrainer

    profile = profile or active_profile()
    stay_offline(profile)  # no telemetry, no hub lookups on a profile without network
    steps = steps or profile.sft_steps
    lengths = _training_lengths(dataset, tokenizer)
    measured = max_length is None and profile.uses_network
    if max_length is None:
        max_length = pick_max_length(lengths, profile)
    truncation = None
    if not packing or (extra_args or {}).get("packing_strategy", "bfd") == "bfd":
        truncation = data.fit_lengths(lengths, max_length, "the training dataset", allow_truncation)
    if eval_dataset is not None and eval_steps is None:
        eval_steps = max(1, steps // 10)
    recipe: dict[str, Any] = {
        **_peft_recipe(peft_config),
        "learning_rate": learning_rate,
        "steps": steps,
        "batch_size": batch_size,
        "gradient_accumulation_steps": gradient_accumulation_steps,
        "scheduler": lr_scheduler_type,
        "warmup_steps": warmup_steps,
        "max_length": max_length,
        **({"max_length_measured": True} if measured else {}),  # absent on cpu: its recipes stay the same
        "assistant_only_loss": assistant_only_loss,
        "packing": packing,
        "gradient_checkpointing": gradient_checkpointing,
        "neftune_noise_alpha": neftune_noise_alpha,
        "max_grad_norm": max_grad_norm,
        "seed": seed,
        "dtype": profile.dtype,
    }
    trainee = copy.deepcopy(model) if copy_model else model
    keep = output_dir is not None
    scratch = Path(output_dir) if keep else Path(tempfile.mkdtemp(prefix="ftcourse-sft-"))
    try:
        options: dict[str, Any] = {
            "output_dir": str(scratch),
            "max_steps": steps,
            "per_device_train_batch_size": batch_size,
            "per_device_eval_batch_size": batch_size,
            "gradient_accumulation_steps": gradient_accumulation_steps,
            "learning_rate": learning_rate,
            "lr_scheduler_type": lr_scheduler_type,
            "warmup_steps": warmup_steps,
            "logging_steps": logging_steps,
            "save_strategy": "steps" if keep and save_steps else "no",
            "save_steps": save_steps or 500,
            "eval_strategy": "steps" if eval_dataset is not None else "no",
            "eval_steps": eval_steps,
            "report_to": "none",
            "seed": seed,
            "data_seed": seed,
            "assistant_only_loss": assistant_only_loss,  # needs {% generation %} markers in the template
            "max_length": max_length,
            "packing": packing,
            "activation_checkpointing": gradient_checkpointing,  # TRL turns it on by default; ours is off
            "neftune_noise_alpha": neftune_noise_alpha,
            "max_grad_norm": max_grad_norm,
            "use_cpu": profile.device == "cpu",
            "bf16": profile.dtype == "bfloat16",
            "disable_tqdm": not progress,
            **(extra_args or {}),
        }
        config = SFTConfig(**options)
        with data.progress_bars(progress), warnings.catch_warnings():
            # peft reads the model's old `is_gradient_checkpointing` name, which transformers 5 deprecates.
            warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated")
            trainer = SFTTrainer(
                model=trainee,
                args=config,
                train_dataset=dataset,
                eval_dataset=eval_dataset,
                processing_class=tokenizer,
                peft_config=peft_config,
                callbacks=list(callbacks) or None,
            )
            if not progress:
                trainer.remove_callback(PrinterCallback)  # without a bar, Trainer prints every log as a dict
            started = time.perf_counter()
            trainer.train(resume_from_checkpoint=resume_from_checkpoint)
            seconds = time.perf_counter() - started
    finally:
        if not keep:
            shutil.rmtree(scratch, ignore_errors=True)
    history = list(trainer.state.log_history)
    losses = [(log["step"], log["loss"]) for log in history if "loss" in log]
    eval_losses = [(log["step"], log["eval_loss"]) for log in history if "eval_loss" in log]
    trained = trainer.model
    if hasattr(trained, "get_nb_trainable_parameters"):
        trainable, total = trained.get_nb_trainable_parameters()
    else:
        total = sum(p.numel() for p in trained.parameters())
        trainable = sum(p.numel() for p in trained.parameters() if p.requires_grad)
    trained.eval()
    return TrainingRun(
        trained,
        losses,
        seconds,
        trainable,
        total,
        recipe,
        eval_losses,
        history,
        str(scratch) if keep else None,
        truncation,
    )


def lora_sft(
    model: Any,
    tokenizer: Any,
    dataset: Any,
    *,
    lora_rank: int = 16,
    lora_alpha: int = 32,
    targets: Sequence[str] = DEFAULT_TARGETS,
    learning_rate: float = 2e-3,
    steps: int | None = None,
    batch_size: int = 16,
    seed: int = 0,
    profile: Profile | None = None,
    progress: bool = True,
    **train_kwargs: Any,
) -> TrainingRun:
    """LoRA SFT of a copy of `model` on a `messages` dataset, loss on the assistant's tokens only.

    `model` itself is left untouched: the returned run's `.model` is a new PeftModel around a copy.
    Other keyword arguments go to `train_sft`.
    """
    return train_sft(
        model,
        tokenizer,
        dataset,
        peft_config=lora_config(lora_rank, lora_alpha, targets),
        learning_rate=learning_rate,
        steps=steps,
        batch_size=batch_size,
        seed=seed,
        profile=profile,
        progress=progress,
        **train_kwargs,
    )


# --- the book's shared quick run, trained once and cached -------------------------------------------------


def cache_root() -> Path:
    """Where quick_sft keeps adapters: $FTCOURSE_CACHE, else the checkout's _build/ftcourse-cache."""
    override = os.environ.get(CACHE_ENV, "").strip()
    if override:
        return Path(override).expanduser()
    repo = Path(__file__).resolve().parents[2]  # src/ftcourse/sft.py -> the checkout, for an editable install
    if (repo / "pyproject.toml").is_file() and os.access(repo, os.W_OK):
        return repo / "_build" / "ftcourse-cache"
    return Path.home() / ".cache" / "ftcourse"


def _weights_fingerprint(model_ref: str) -> str:
    """sha256 of a local model folder's safetensors files, or the hub id itself for a remote model."""
    folder = Path(model_ref)
    if not folder.is_dir():
        return f"hub:{model_ref}"
    digest = hashlib.sha256()
    for path in sorted(folder.glob("*.safetensors")):
        with path.open("rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def quick_recipe(profile: Profile | None = None, seed: int = 0) -> dict[str, Any]:
    """The quick run's full recipe on `profile`: LoRA settings, data size and seed.

    On a hub profile the run measures max_length from its training rows (`pick_max_length`), and the
    recipe says so; `max_length` is then the length the memory plan assumes, and the run's own recipe
    records the length it used.
    """
    profile = profile or active_profile()
    recipe = {
        **run_sizes(QUICK_RECIPES, profile),
        "targets": list(DEFAULT_TARGETS),
        "dataset": "messages/train, load_records' default size",
        "seed": seed,
    }
    if profile.uses_network:
        recipe["max_length_rule"] = (
            f"measured: the smallest multiple of 64 tokens holding {1 - data.TRUNCATION_LIMIT:.0%} of the "
            "training rows whole"
        )
    return recipe


def pipeline_sizes(profile: Profile | None = None) -> dict[str, int]:
    """The SFT pipeline chapter's run sizes for `profile` ('minimal' under FTCOURSE_SIZES=minimal)."""
    return dict(run_sizes(PIPELINE_SIZES, profile or active_profile()))


def quick_cache_dir(profile: Profile | None = None, seed: int = 0) -> Path:
    """The cache folder of the quick run: keyed by a hash of its recipe and of the base weights."""
    profile = profile or active_profile()
    key = json.dumps(
        {
            "recipe": quick_recipe(profile, seed),
            "weights": _weights_fingerprint(resolve_model("lora", profile)),
        },
        sort_keys=True,
    )
    return cache_root() / f"quick-sft-{profile.name}-{hashlib.sha256(key.encode()).hexdigest()[:16]}"


def load_adapter(base: Any, adapter_dir: str | os.PathLike) -> Any:
    """`base` wrapped in the saved LoRA adapter from `adapter_dir` (a PeftModel in eval mode)."""
    from peft import PeftModel

    adapter_dir = Path(adapter_dir)
    if not (adapter_dir / "adapter_model.safetensors").is_file():
        raise FileNotFoundError(
            f"{adapter_dir} holds no adapter_model.safetensors; save one with model.save_pretrained(folder)."
        )
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated")  # peft's read
        model = PeftModel.from_pretrained(base, str(adapter_dir), is_trainable=False, local_files_only=True)
    model.eval()
    return model


def quick_sft(profile: Profile | None = None, seed: int = 0, progress: bool = False) -> TrainingRun:
    """The book's shared quick LoRA SFT: trained once, then reloaded from its cache.

    The adapter, the loss curve and the recipe are cached as safetensors + JSON under `quick_cache_dir`.
    The returned model is a fresh base model wrapped in that adapter; reloading gives identical outputs.
    """
    from ftcourse import profiles

    profile = profile or active_profile()
    stay_offline(profile)  # no telemetry, no hub lookups on a profile without network
    folder = quick_cache_dir(profile, seed)
    base = profiles.load_base(profile=profile)
    if (folder / "run.json").is_file() and (folder / "adapter_model.safetensors").is_file():
        saved = json.loads((folder / "run.json").read_text())
        model = load_adapter(base, folder)
        profiles.note_source("train", profiles.training_source("messages", profile), "quick SFT (cached)")
        cut = saved.get("truncation")  # absent from entries cached before runs counted it
        return TrainingRun(
            model,
            [tuple(x) for x in saved["losses"]],
            saved["seconds"],
            saved["trainable_parameters"],
            saved["total_parameters"],
            saved["recipe"],
            truncation=data.Truncation(**cut) if cut else None,
        )
    recipe = quick_recipe(profile, seed)
    tokenizer = profiles.load_tokenizer(profile=profile)
    records = data.load_records("messages", "train", profile=profile)
    run = lora_sft(
        base,
        tokenizer,
        records,
        lora_rank=recipe["lora_rank"],
        lora_alpha=recipe["lora_alpha"],
        targets=recipe["targets"],
        learning_rate=recipe["learning_rate"],
        steps=recipe["steps"],
        batch_size=recipe["batch_size"],
        max_length=None if profile.uses_network else recipe["max_length"],  # None: measured from the rows
        seed=seed,
        profile=profile,
        progress=progress,
        copy_model=False,  # `base` was loaded for this run alone
        logging_steps=min(5, max(1, recipe["steps"] // 2)),  # a 4-step minimal run still logs a curve
    )
    run.recipe = {**run.recipe, **recipe, "max_length": run.recipe["max_length"], "examples": len(records)}
    summary = {
        "losses": run.losses,
        "seconds": run.seconds,
        "trainable_parameters": run.trainable_parameters,
        "total_parameters": run.total_parameters,
        "recipe": run.recipe,
        "truncation": asdict(run.truncation) if run.truncation else None,
    }
    save_cached_adapter(run.model, summary, folder)
    return run


def save_cached_adapter(model: Any, summary: Mapping[str, Any], folder: Path) -> Path:
    """Write an adapter and its `run.json` summary as one cache entry; returns `folder`.

    Both go into a temporary sibling folder that is renamed into place, so a reader never sees half an
    entry. When another process has cached the same run first, its entry is kept.
    """
    folder.parent.mkdir(parents=True, exist_ok=True)
    partial = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    try:
        model.save_pretrained(str(partial), safe_serialization=True)
        (partial / "run.json").write_text(json.dumps(dict(summary), indent=1))
        try:
            os.rename(partial, folder)  # atomic; fails if another process cached the same run first
        except OSError:
            if not (folder / "run.json").is_file():
                raise
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    return folder


# --- packing: the same loss, if attention stays inside each example ----------------------------------------


def packing_losses(model: Any, tokenizer: Any, records: Sequence[Mapping[str, Any]]) -> dict[str, float]:
    """Loss of one batch of `messages` records collated three ways by TRL's collator.

    `padded`: one row per record, right-padded, with an attention mask. `packed`: all records in one
    row with position ids restarting at each record (TRL's padding-free packing); the model then keeps
    attention inside each record. `packed, positions not reset`: the same row without position ids, so
    every token attends to the records before it. Labels are the assistant tokens in all three.
    """
    import torch
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    examples = []
    for record in records:
        table = data.assistant_mask(tokenizer, record["messages"])
        ids = [i for _, i, _ in table]
        examples.append({"input_ids": ids, "labels": [i if counted else -100 for _, i, counted in table]})
    # Llama 3.1 has no pad token; the collators pad by position, so EOS serves
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    padded = DataCollatorForLanguageModeling(pad_token_id=pad_id)(examples)
    packed = DataCollatorForLanguageModeling(pad_token_id=pad_id, padding_free=True)(examples)
    naive = {"input_ids": packed["input_ids"], "labels": packed["labels"]}
    model.eval()
    with torch.no_grad():
        # use_cache=False matters: with a cache the model ignores the restarting position ids (TRL sets it).
        return {
            name: model(**{k: v for k, v in batch.items() if k != "seq_idx"}, use_cache=False).loss.item()
            for name, batch in [
                ("padded", padded),
                ("packed", packed),
                ("packed, positions not reset", naive),
            ]
        }
