"""Preference optimization: sequence log-probabilities and the DPO, SimPO, ORPO and KTO losses, from scratch.

The losses take per-sequence log-probabilities from `sequence_logprobs` and return a `PreferenceLoss`: the
scalar the optimizer minimises plus what TRL's trainers log (rewards, margins, accuracy). Symbols follow the
chapters: `beta`, SimPO's target margin `gamma`, ORPO's weight `lam`, KTO's reference point `z0`.
These functions exist to be read and tested against TRL; `preference_trainer` trains with TRL itself, and
`pair_rankings` / `pair_accuracies` measure a policy on held-out pairs. The book's standard runs (data,
training, evaluation, cache) are a pipeline over these: `ftcourse.train.preference_run`.
"""

from __future__ import annotations

import atexit
import json
import logging
import math
import os
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from ftcourse import data
from ftcourse.memory import peak_rss_mib, reset_peak_rss, rss_mib
from ftcourse.profiles import Profile, active_profile, stay_offline
from ftcourse.sft import lora_config

BATCH_KEYS = ("input_ids", "attention_mask", "completion_mask")


@dataclass(frozen=True)
class SequenceLogprobs:
    """Per-sequence log-probabilities over the completion tokens, and over every real token (ORPO's NLL)."""

    total: torch.Tensor  # (B,) sum of log p(token) over completion tokens
    n_tokens: torch.Tensor  # (B,) completion tokens in each row
    all_total: torch.Tensor  # (B,) the same sum over all non-padding tokens after the first (prompt too)
    all_tokens: torch.Tensor  # (B,) how many tokens that is

    @property
    def mean(self) -> torch.Tensor:
        """(B,) the length-normalised log-probability: total / n_tokens (SimPO's and ORPO's average)."""
        return self.total / self.n_tokens

    def halves(self) -> tuple[SequenceLogprobs, SequenceLogprobs]:
        """(chosen, rejected): a pair batch stacks all chosen rows first, then all rejected rows."""
        if self.total.shape[0] % 2:
            raise ValueError(f"a pair batch needs an even number of rows, got {self.total.shape[0]}")
        parts = [t.chunk(2) for t in (self.total, self.n_tokens, self.all_total, self.all_tokens)]
        return SequenceLogprobs(*(p[0] for p in parts)), SequenceLogprobs(*(p[1] for p in parts))


def _check_batch(batch: Mapping[str, torch.Tensor]) -> None:
    missing = [k for k in BATCH_KEYS if k not in batch]
    if missing:
        raise ValueError(
            f"batch is missing {missing}; it needs {list(BATCH_KEYS)} (TRL's DPO/KTO collators make them), "
            f"got keys {sorted(batch)}"
        )
    shapes = {k: tuple(batch[k].shape) for k in BATCH_KEYS}
    if len(set(shapes.values())) != 1:
        raise ValueError(
            f"input_ids, attention_mask and completion_mask must have one shape (B, T), got {shapes}"
        )
    empty = (batch["completion_mask"][:, 1:].sum(dim=1) == 0).nonzero().flatten().tolist()
    if empty:
        raise ValueError(f"rows {empty} have no completion tokens to score: check the completion_mask")


def sequence_logprobs(model: torch.nn.Module, batch: Mapping[str, torch.Tensor]) -> SequenceLogprobs:
    """Log-probabilities of each row's completion under `model` (prompt, padding masked): sums, counts."""
    _check_batch(batch)
    # Batches are collated on the CPU; a model placed on a GPU (device_map="auto") reads them there.
    first = next(iter(model.parameters()), None)
    if first is not None:
        batch = {key: batch[key].to(first.device) for key in BATCH_KEYS}
    input_ids = batch["input_ids"]
    logits = model(input_ids=input_ids, attention_mask=batch["attention_mask"], use_cache=False).logits
    # The logits at position t predict token t+1: drop the last position and the first token.
    logp = torch.log_softmax(logits[:, :-1].float(), dim=-1)  # (B, T-1, V)
    token_logp = logp.gather(-1, input_ids[:, 1:].unsqueeze(-1)).squeeze(-1)  # (B, T-1)
    completion = batch["completion_mask"][:, 1:].to(token_logp.dtype)
    attended = batch["attention_mask"][:, 1:].to(token_logp.dtype)
    return SequenceLogprobs(
        total=(token_logp * completion).sum(dim=1),
        n_tokens=completion.sum(dim=1),
        all_total=(token_logp * attended).sum(dim=1),
        all_tokens=attended.sum(dim=1),
    )


@dataclass(frozen=True)
class PreferenceLoss:
    """A loss value and what trainers log with it: implicit rewards of each side, margins and accuracy."""

    loss: torch.Tensor  # scalar: what the optimizer minimises
    chosen_rewards: torch.Tensor  # (B,) detached
    rejected_rewards: torch.Tensor  # (B,) detached
    extra: dict[str, float] = field(default_factory=dict)  # method-specific logs (nll, log_odds_ratio, kl)

    @property
    def margins(self) -> torch.Tensor:
        """(B,) chosen reward minus rejected reward."""
        return self.chosen_rewards - self.rejected_rewards

    @property
    def accuracy(self) -> float:
        """Fraction of pairs whose chosen reward is strictly higher (TRL's rewards/accuracies)."""
        return (self.chosen_rewards > self.rejected_rewards).float().mean().item()

    def metrics(self) -> dict[str, float]:
        """The logged values under TRL's names: rewards/chosen, rewards/rejected, rewards/margins, ..."""
        logs = {
            "loss": self.loss.item(),
            "rewards/chosen": self.chosen_rewards.mean().item(),
            "rewards/rejected": self.rejected_rewards.mean().item(),
            "rewards/margins": self.chosen_rewards.mean().item() - self.rejected_rewards.mean().item(),
        }
        if self.chosen_rewards.shape == self.rejected_rewards.shape:  # paired methods only
            logs["rewards/accuracies"] = self.accuracy
        return {**logs, **self.extra}


def _same_shape(**tensors: torch.Tensor) -> None:
    shapes = {name: tuple(t.shape) for name, t in tensors.items()}
    if len(set(shapes.values())) != 1:
        raise ValueError(f"log-probability tensors must share one shape (B,), got {shapes}")


def dpo_loss(
    chosen_logps: torch.Tensor,
    rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    beta: float = 0.1,
) -> PreferenceLoss:
    """DPO on summed log-probs: returns the loss and the rewards beta * (c - c_ref), beta * (r - r_ref).

    loss = mean of -log sigmoid(beta * ((c - c_ref) - (r - r_ref))).
    """
    _same_shape(
        chosen=chosen_logps,
        rejected=rejected_logps,
        ref_chosen=ref_chosen_logps,
        ref_rejected=ref_rejected_logps,
    )
    chosen_logratios = chosen_logps - ref_chosen_logps  # log pi(y_w|x) / pi_ref(y_w|x)
    rejected_logratios = rejected_logps - ref_rejected_logps
    loss = -F.logsigmoid(beta * (chosen_logratios - rejected_logratios)).mean()
    return PreferenceLoss(loss, beta * chosen_logratios.detach(), beta * rejected_logratios.detach())


SIMPO_GAMMA = 0.5  # TRL's CPOConfig.simpo_gamma default: one value for the loss, the trainer and the chapters


def simpo_loss(
    chosen_avg_logps: torch.Tensor,
    rejected_avg_logps: torch.Tensor,
    beta: float = 2.0,
    gamma: float = SIMPO_GAMMA,
) -> PreferenceLoss:
    """SimPO: mean of -log sigmoid(beta (c_avg - r_avg) - gamma) on per-token averages; rewards beta avg."""
    _same_shape(chosen=chosen_avg_logps, rejected=rejected_avg_logps)
    loss = -F.logsigmoid(beta * (chosen_avg_logps - rejected_avg_logps) - gamma).mean()
    return PreferenceLoss(loss, beta * chosen_avg_logps.detach(), beta * rejected_avg_logps.detach())


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x < 0, computed stably (two branches around -ln 2)."""
    return torch.where(x < -math.log(2), torch.log1p(-torch.exp(x)), torch.log(-torch.expm1(x)))


def orpo_nll(chosen: SequenceLogprobs, include_prompt: bool = False) -> torch.Tensor:
    """ORPO's SFT term: mean negative log-likelihood per token of the chosen rows.

    The paper scores the chosen completion only (`include_prompt=False`). TRL 1.x's ORPOTrainer also scores
    the prompt tokens (`include_prompt=True` reproduces it).
    """
    if include_prompt:
        return -chosen.all_total.sum() / chosen.all_tokens.sum()
    return -chosen.total.sum() / chosen.n_tokens.sum()


def orpo_loss(
    chosen_avg_logps: torch.Tensor, rejected_avg_logps: torch.Tensor, nll: torch.Tensor, lam: float = 0.1
) -> PreferenceLoss:
    """ORPO: nll - lam * mean(log sigmoid(log odds(y_w) - log odds(y_l))) on per-token averages.

    odds(y) = p / (1 - p) with log p the average log-probability, so log odds = avg - log(1 - exp(avg)).
    Rewards are lam * avg, as TRL logs them.
    """
    _same_shape(chosen=chosen_avg_logps, rejected=rejected_avg_logps)
    log_odds = (chosen_avg_logps - rejected_avg_logps) - (
        log1mexp(chosen_avg_logps) - log1mexp(rejected_avg_logps)
    )
    ratio = F.logsigmoid(log_odds)
    loss = nll - lam * ratio.mean()
    extra = {
        "nll_loss": nll.item(),
        "log_odds_ratio": ratio.mean().item(),
        "log_odds_chosen": log_odds.mean().item(),
    }
    return PreferenceLoss(loss, lam * chosen_avg_logps.detach(), lam * rejected_avg_logps.detach(), extra)


def kto_reference_point(kl_logps: torch.Tensor, kl_ref_logps: torch.Tensor) -> torch.Tensor:
    """KTO's z0: the batch-mean log-ratio on mismatched (prompt, completion) pairs, detached, clamped at 0."""
    _same_shape(kl=kl_logps, kl_ref=kl_ref_logps)
    return (kl_logps - kl_ref_logps).mean().detach().clamp(min=0)


def kto_loss(
    logps: torch.Tensor,
    ref_logps: torch.Tensor,
    labels: torch.Tensor,
    z0: torch.Tensor | float,
    beta: float = 0.1,
    desirable_weight: float = 1.0,
    undesirable_weight: float = 1.0,
) -> PreferenceLoss:
    """KTO on unpaired rows: desirable ones pay w_D (1 - sigmoid(beta (r - z0))), undesirable ones
    w_U (1 - sigmoid(beta (z0 - r))), with r = log pi/pi_ref summed over the completion; mean over rows.

    z0 is detached and clamped at 0 here too, whatever the caller passes: a KL estimate cannot be negative,
    and TRL's KTOTrainer clamps inside its loss the same way.
    """
    _same_shape(logps=logps, ref_logps=ref_logps, labels=labels)
    good = labels.bool()
    logratios = logps - ref_logps
    z0 = torch.as_tensor(z0, dtype=logratios.dtype, device=logratios.device).detach().clamp(min=0)
    chosen_losses = desirable_weight * (1 - torch.sigmoid(beta * (logratios[good] - z0)))
    rejected_losses = undesirable_weight * (1 - torch.sigmoid(beta * (z0 - logratios[~good])))
    loss = torch.cat([chosen_losses, rejected_losses]).mean()
    rewards = beta * logratios.detach()
    return PreferenceLoss(loss, rewards[good], rewards[~good], {"kl": float(z0)})


# Training with TRL: one entry point for the four methods.

METHODS: tuple[str, ...] = ("dpo", "simpo", "orpo", "kto")
NEEDS_REFERENCE: dict[str, bool] = {"dpo": True, "simpo": False, "orpo": False, "kto": True}
NEEDS_PAIRS: dict[str, bool] = {"dpo": True, "simpo": True, "orpo": True, "kto": False}
# Each method's strength (beta; ORPO's lambda is TRL's `beta` too) and SimPO's margin, as the chapters use.
METHOD_DEFAULTS: dict[str, dict[str, float]] = {
    "dpo": {"beta": 0.1},
    "simpo": {"beta": 2.0, "gamma": SIMPO_GAMMA},
    "orpo": {"beta": 0.1},
    "kto": {"beta": 0.1},
}


def _config(
    method: str, options: dict[str, Any], beta: float, gamma: float, kto_weights: tuple[float, float]
):
    """The TRL config object for `method`, with the shared training options."""
    if method == "dpo":
        from trl import DPOConfig

        return DPOConfig(**options, beta=beta, loss_type=["sigmoid"])
    if method == "kto":
        from trl import KTOConfig

        return KTOConfig(
            **options, beta=beta, desirable_weight=kto_weights[0], undesirable_weight=kto_weights[1]
        )
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")  # trl.experimental warns on import otherwise
    if method == "simpo":
        from trl.experimental.cpo import CPOConfig

        # cpo_alpha=0 drops CPO's extra NLL term: the default 1.0 would be "CPO-SimPO", not SimPO.
        return CPOConfig(
            **options,
            loss_type="simpo",
            cpo_alpha=0.0,
            beta=beta,
            simpo_gamma=gamma,
            remove_unused_columns=False,
        )
    from trl.experimental.orpo import ORPOConfig

    return ORPOConfig(**options, beta=beta, remove_unused_columns=False)


def _trainer_class(method: str) -> Any:
    """TRL's trainer class for `method` (SimPO is CPOTrainer with loss_type='simpo')."""
    if method == "dpo":
        from trl import DPOTrainer

        return DPOTrainer
    if method == "kto":
        from trl import KTOTrainer

        return KTOTrainer
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    if method == "simpo":
        from trl.experimental.cpo import CPOTrainer

        return CPOTrainer
    from trl.experimental.orpo import ORPOTrainer

    return ORPOTrainer


def trainer_options(
    profile: Profile, output_dir: str, steps: int, batch_size: int, learning_rate: float, seed: int
) -> dict[str, Any]:
    """The TrainingArguments every trainer of this module shares: the run's size, no checkpoints, no bars.

    TRL's defaults are for a GPU (bf16 on, activation checkpointing on). Here the profile decides bf16
    and the device; activation checkpointing stays off, as the book's runs fit without it.
    """
    return {
        "output_dir": output_dir,
        "max_steps": steps,
        "per_device_train_batch_size": batch_size,
        "learning_rate": learning_rate,
        "seed": seed,
        "save_strategy": "no",
        "report_to": "none",
        "activation_checkpointing": False,
        "use_cpu": profile.device == "cpu",
        "bf16": profile.dtype == "bfloat16",
        "disable_tqdm": True,
    }


LLAMA3_PAD_TOKEN = "<|finetune_right_pad_id|>"  # Llama 3.1 reserves it for padding, but sets no pad token


def set_pad_token(tokenizer: Any) -> Any:
    """Give a tokenizer without a pad token one (Llama 3.1's reserved pad token, else EOS); returns it.

    Padding positions are masked everywhere, so which token pads does not change a loss; a pad token that
    is not EOS keeps a real end-of-turn token from being mistaken for padding.
    """
    if tokenizer.pad_token is None:
        vocab = tokenizer.get_vocab()
        tokenizer.pad_token = LLAMA3_PAD_TOKEN if LLAMA3_PAD_TOKEN in vocab else tokenizer.eos_token
    return tokenizer


TOY_MAX_LENGTH = 128  # tokens of prompt and reply on the cpu profile: every task-world pair fits whole


def preference_trainer(
    method: str,
    model: Any,
    tokenizer: Any,
    dataset: Any,
    *,
    peft_config: Any = "lora",
    ref_model: Any = None,
    beta: float | None = None,
    gamma: float | None = None,
    kto_weights: tuple[float, float] = (1.0, 1.0),
    learning_rate: float = 1e-3,
    steps: int = 30,
    batch_size: int = 8,
    max_length: int | None = None,
    allow_truncation: bool = False,
    logging_steps: int = 2,
    seed: int = 0,
    output_dir: str,
    save_steps: int | None = None,
    progress: bool = False,
    profile: Profile | None = None,
    callbacks: Sequence[Any] = (),
) -> Any:
    """A TRL trainer for `method` ('dpo', 'simpo', 'orpo', 'kto') on `dataset`, ready to `.train()`.

    `peft_config="lora"` trains a new LoRA adapter (the book's recipe) on top of `model`; the reference of
    DPO and KTO is then `model` itself with the adapter switched off. `peft_config=None` is full fine-tuning;
    DPO and KTO then need `ref_model`, a frozen copy (TRL would reload one from the hub name otherwise).
    `max_length=None` is TOY_MAX_LENGTH on the cpu profile (the task world's pairs fit) and fitted to the
    rows on a hub profile (`data.fit_lengths`); what it cuts is printed when it cuts anything, and kept as
    the trainer's `truncation` (a `data.Truncation`). `save_steps` writes a checkpoint
    to `output_dir` every that many steps (None: no checkpoints); `progress` shows TRL's progress bars.
    """
    from transformers.trainer_callback import PrinterCallback

    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if save_steps is not None and save_steps < 1:
        raise ValueError(
            f"save_steps must be a positive number of steps or None (no checkpoints), got {save_steps}"
        )
    profile = profile or active_profile()
    stay_offline(profile)
    set_pad_token(tokenizer)  # TRL's CPO/ORPO collators cannot pad without one
    defaults = METHOD_DEFAULTS[method]
    beta = defaults["beta"] if beta is None else beta
    gamma = defaults.get("gamma", 0.0) if gamma is None else gamma
    if peft_config == "lora":
        peft_config = lora_config()
    already_peft = hasattr(model, "disable_adapter")  # a PeftModel: its adapter off is the reference
    if peft_config is None and NEEDS_REFERENCE[method] and ref_model is None and not already_peft:
        raise ValueError(
            f"full fine-tuning with {method!r} needs a frozen reference: pass ref_model=copy.deepcopy(model)"
        )
    if max_length is None and not profile.uses_network:
        max_length = TOY_MAX_LENGTH
    truncation = None
    if dataset is not None and len(dataset):
        rows = dataset.to_list()
        lengths = data.sequence_lengths(rows, tokenizer)
        truncation = data.fit_lengths(lengths, max_length, f"the {method} rows", allow_truncation)
        max_length = truncation.max_length
        if isinstance(rows[0]["prompt"], list):
            dataset = type(dataset).from_list(end_at_end_of_turn(rows, tokenizer))  # see there
    options: dict[str, Any] = {
        **trainer_options(profile, output_dir, steps, batch_size, learning_rate, seed),
        "lr_scheduler_type": "constant_with_warmup",
        "warmup_steps": max(1, steps // 10),
        "logging_steps": logging_steps,
        "data_seed": seed,
        "max_length": max_length or TOY_MAX_LENGTH,
        "save_strategy": "steps" if save_steps else "no",
        "save_steps": save_steps or 500,
        "disable_tqdm": not progress,
    }
    extra = {"ref_model": ref_model} if NEEDS_REFERENCE[method] else {}
    with data.progress_bars(progress):
        trainer = _trainer_class(method)(
            model=model,
            args=_config(method, options, beta, gamma, kto_weights),
            train_dataset=dataset,
            processing_class=tokenizer,
            peft_config=peft_config,
            callbacks=list(callbacks) or None,
            **extra,
        )
    trainer.remove_callback(PrinterCallback)  # with tqdm off, the Trainer prints every log as a dict
    trainer.truncation = truncation  # what max_length cut from the training rows (None without data)
    return trainer


# Measuring a trained policy on held-out pairs.


def _after_end_of_turn(tokenizer: Any, record: Mapping[str, Any], side: str) -> str:
    """What the chat template writes after the end-of-turn token (EOS) that closes `record[side]`.

    Empty when the template writes nothing after it, or when it does not close the reply with EOS as
    written (a template that trims the content, or ends turns with another token): nothing to remove then.
    """
    reply = record[side][-1]["content"]
    full = tokenizer.apply_chat_template(list(record["prompt"]) + list(record[side]), tokenize=False)
    for closed in (reply + tokenizer.eos_token, reply.strip() + tokenizer.eos_token):
        if closed in full:
            return full[full.rindex(closed) + len(closed) :]
    return ""


def end_at_end_of_turn(records: Sequence[Mapping[str, Any]], tokenizer: Any) -> list[dict[str, Any]]:
    """Records whose completions end at the end-of-turn token, as SFT trained them (TRL's plain-text form).

    A conversational record's completion is everything the template adds after the prompt, and ChatML adds
    a newline after `<|im_end|>`. SFT never trained that newline (it sits outside the `{% generation %}`
    block), so the SFT start scores it at about -9 to -17 nats, more than the reply itself: it would swamp
    every sequence log-probability. Here the prompt is rendered by the chat template and each reply is
    plain text; TRL's trainers append the EOS token (the end of turn) to a plain-text reply and nothing
    after it. Records whose template writes nothing after EOS (Llama 3.1's) come back unchanged.
    """
    replies = ("chosen", "rejected") if "chosen" in records[0] else ("completion",)
    if not isinstance(records[0]["prompt"], list) or not any(
        _after_end_of_turn(tokenizer, records[0], side) for side in replies
    ):
        return [dict(r) for r in records]
    out = []
    for record in records:
        text = {
            "prompt": tokenizer.apply_chat_template(
                list(record["prompt"]), add_generation_prompt=True, tokenize=False
            )
        }
        text |= {side: record[side][-1]["content"] for side in replies}
        out.append({**record, **text})
    return out


def collate_pairs(tokenizer: Any, records: Sequence[Mapping[str, Any]]) -> dict[str, torch.Tensor]:
    """A pair batch in `sequence_logprobs`' format: all chosen rows, then all rejected rows, right-padded.

    Tokenized the way TRL's DPOTrainer does it: the prompt with the generation prompt, then the completion
    is whatever the full conversation adds after it, up to and including the end-of-turn (EOS) token:
    what a template writes after it is no part of the reply (see `end_at_end_of_turn`). A record in
    plain-text form (a rendered prompt, a reply string) gets the EOS appended, as TRL does.
    """
    rows, masks = [], []
    for side in ("chosen", "rejected"):
        for record in records:
            if isinstance(record["prompt"], str):
                prompt = tokenizer(record["prompt"], add_special_tokens=False)["input_ids"]
                text = record["prompt"] + record[side] + tokenizer.eos_token
                full = tokenizer(text, add_special_tokens=False)["input_ids"]
            else:
                prompt = tokenizer.apply_chat_template(list(record["prompt"]), add_generation_prompt=True)
                full = tokenizer.apply_chat_template(list(record["prompt"]) + list(record[side]))
            prompt, full = _ids(prompt), _ids(full)
            if full[: len(prompt)] != prompt:
                raise ValueError(
                    f"the chat template renders the prompt differently inside {side!r}: {record}"
                )
            ends = [i for i in range(len(prompt), len(full)) if full[i] == tokenizer.eos_token_id]
            full = full[: ends[0] + 1] if ends else full
            rows.append(full)
            masks.append([0] * len(prompt) + [1] * (len(full) - len(prompt)))
    width = max(len(r) for r in rows)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    return {
        "input_ids": torch.tensor([r + [pad] * (width - len(r)) for r in rows]),
        "attention_mask": torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows]),
        "completion_mask": torch.tensor([m + [0] * (width - len(m)) for m in masks]),
    }


def _ids(encoded: Any) -> list[int]:
    """Token ids from apply_chat_template, which returns a list or a BatchEncoding depending on version."""
    return list(encoded["input_ids"] if isinstance(encoded, Mapping) else encoded)


PAIR_BATCH = {"task world": 32, "hub": 2}  # pairs per forward pass: hub pairs are long, Llama's vocab 128k


@torch.no_grad()
def pair_logprobs(
    model: Any, tokenizer: Any, records: Sequence[Mapping[str, Any]], batch_size: int | None = None
) -> tuple[SequenceLogprobs, SequenceLogprobs]:
    """(chosen, rejected) log-probabilities of held-out pair records under `model`, in batches.

    `batch_size=None` is PAIR_BATCH for the active profile's data: a batch's float32 log-softmax holds
    rows x tokens x vocabulary numbers, which for long hub pairs and Llama's vocabulary is gigabytes a pair.
    """
    if batch_size is None:
        batch_size = PAIR_BATCH["hub" if active_profile().uses_network else "task world"]
    parts: list[tuple[SequenceLogprobs, SequenceLogprobs]] = []
    for start in range(0, len(records), batch_size):
        batch = collate_pairs(tokenizer, records[start : start + batch_size])
        parts.append(sequence_logprobs(model, batch).halves())
    joined = []
    for side in (0, 1):
        fields = zip(
            *[(p[side].total, p[side].n_tokens, p[side].all_total, p[side].all_tokens) for p in parts],
            strict=True,
        )
        joined.append(SequenceLogprobs(*(torch.cat(list(f)) for f in fields)))
    return joined[0], joined[1]


def pair_rankings(
    model: Any, tokenizer: Any, records: Sequence[Mapping[str, Any]], batch_size: int | None = None
) -> dict[str, list[int]]:
    """Per held-out pair, 1 where `model` ranks the chosen reply first, else 0 (a tie is a miss).

    - `sequence`: by the whole reply's log-probability (summed over its tokens, end of turn included):
      which reply the model would rather produce.
    - `per_token`: by the average log-probability per token (SimPO's reward, length-normalised).
    """
    chosen, rejected = pair_logprobs(model, tokenizer, records, batch_size)
    return {
        "sequence": (chosen.total > rejected.total).int().tolist(),
        "per_token": (chosen.mean > rejected.mean).int().tolist(),
    }


def pair_accuracies(
    peft_model: Any, tokenizer: Any, records: Sequence[Mapping[str, Any]], batch_size: int | None = None
) -> dict[str, float]:
    """Rankings of held-out pairs by a trained policy, as fractions of pairs ranked chosen-first.

    - `implicit`: DPO's implicit reward, log pi/pi_ref summed over the completion, reference = adapter off.
      It asks whether training moved the chosen reply up relative to the rejected one, whatever loss did
      the moving. The start point scores 0 (every margin is exactly 0, and ties count as misses), so it
      cannot be compared with the SFT start: `pair_rankings` can.
    - `likelihood`: the policy's own average log-probability per token (SimPO's reward), no reference.
    """
    chosen, rejected = pair_logprobs(peft_model, tokenizer, records, batch_size)
    with peft_model.disable_adapter():
        ref_chosen, ref_rejected = pair_logprobs(peft_model, tokenizer, records, batch_size)
    margins = (chosen.total - ref_chosen.total) - (rejected.total - ref_rejected.total)
    return {
        "implicit": (margins > 0).float().mean().item(),
        "likelihood": (chosen.mean > rejected.mean).float().mean().item(),
    }


# KTO's paper recommends weights with lambda_D n_D / (lambda_U n_U) in [1, 4/3] for n_D desirable and n_U
# undesirable rows (Ethayarajh et al. 2024; TRL's KTOTrainer warns outside it, citing the paper's Eq. 8).
KTO_WEIGHT_RANGE = (1.0, 4 / 3)


def kto_label_counts(labels: Sequence[Any]) -> tuple[int, int]:
    """(n_D, n_U): how many rows are desirable (label true) and undesirable."""
    n_desirable = sum(bool(label) for label in labels)
    return n_desirable, len(labels) - n_desirable


def kto_weights(labels: Sequence[Any], ratio: float = 1.0) -> tuple[float, float]:
    """(lambda_D, lambda_U) from the data's labels, so that lambda_D n_D / (lambda_U n_U) = `ratio`.

    The rarer label is weighted up and the commoner one keeps weight 1: one thumbs-up per four
    thumbs-down gives (4, 1) at ratio 1, balanced data (1, 1). `ratio` must lie in `KTO_WEIGHT_RANGE`.
    """
    low, high = KTO_WEIGHT_RANGE
    if not low <= ratio <= high:
        raise ValueError(f"ratio must lie in the paper's range [{low}, {high:.4g}], got {ratio}")
    n_desirable, n_undesirable = kto_label_counts(labels)
    if not n_desirable or not n_undesirable:
        raise ValueError(f"KTO needs both labels: {n_desirable} desirable, {n_undesirable} undesirable rows")
    if n_desirable <= n_undesirable:
        return ratio * n_undesirable / n_desirable, 1.0
    return 1.0, n_desirable / (ratio * n_undesirable)


def kto_weight_ratio(weights: Sequence[float], labels: Sequence[Any]) -> float:
    """lambda_D n_D / (lambda_U n_U) for `weights` = (lambda_D, lambda_U) on rows with these labels."""
    n_desirable, n_undesirable = kto_label_counts(labels)
    return weights[0] * n_desirable / (weights[1] * n_undesirable)


def kto_weights_in_range(weights: Sequence[float], labels: Sequence[Any]) -> bool:
    """Whether lambda_D n_D / (lambda_U n_U) lies in the paper's range (to float64 rounding at the ends)."""
    low, high = KTO_WEIGHT_RANGE
    slack = 8 * sys.float_info.epsilon  # a few roundings in the weights and the ratio
    return low * (1 - slack) <= kto_weight_ratio(weights, labels) <= high * (1 + slack)


@torch.no_grad()
def trl_comparison(
    method: str, trainer: Any, n_rows: int = 4, adapter_from: Any = None
) -> dict[str, tuple[float, float]]:
    """Our loss and logged values next to TRL's on one batch of `trainer`'s data: {name: (ours, trl)}.

    The batch is TRL's own (its collator on its tokenized rows); ours reads the same tensors through
    `sequence_logprobs` and this module's loss. For DPO and KTO the reference is the adapter switched off.
    `adapter_from` (a trained PeftModel) copies its LoRA weights into the trainer's fresh adapter first, so
    the comparison runs on a trained policy. (Handing TRL the trained PeftModel itself would not do: TRL
    then keeps a copy of that adapter as the reference, and the policy equals its reference.)
    """
    model = trainer.model
    if adapter_from is not None:
        from peft import get_peft_model_state_dict, set_peft_model_state_dict

        set_peft_model_state_dict(model, get_peft_model_state_dict(adapter_from))
    model.eval()
    rows = [trainer.train_dataset[i] for i in range(n_rows)]
    args = trainer.args
    if method in ("simpo", "orpo"):
        raw = trainer.data_collator(rows)
        pad = getattr(trainer, "padding_value", None)  # ORPO's name for it; CPO calls it pad_token_id
        joined = trainer.concatenated_inputs(raw, padding_value=trainer.pad_token_id if pad is None else pad)
        batch = {
            "input_ids": joined["concatenated_input_ids"],
            "attention_mask": joined["concatenated_attention_mask"],
            "completion_mask": (joined["concatenated_labels"] != -100).long(),
        }
        trl_loss, logged = trainer.get_batch_loss_metrics(model, raw)
        chosen, rejected = sequence_logprobs(model, batch).halves()
        if method == "simpo":
            ours = simpo_loss(chosen.mean, rejected.mean, beta=args.beta, gamma=args.simpo_gamma)
        else:
            ours = orpo_loss(chosen.mean, rejected.mean, orpo_nll(chosen, include_prompt=True), lam=args.beta)
        logged = {k: float(v) for k, v in logged.items()}
    else:
        batch = trainer.data_collator(rows)
        trainer._metrics["eval"].clear()  # model.eval() makes TRL log under "eval"
        trl_loss = trainer.compute_loss(model, batch)
        logged = {k: v[-1] for k, v in trainer._metrics["eval"].items()}
        policy = sequence_logprobs(model, batch)
        with model.disable_adapter():
            ref = sequence_logprobs(model, batch)
        if method == "dpo":
            (c, r), (c_ref, r_ref) = policy.halves(), ref.halves()
            ours = dpo_loss(c.total, r.total, c_ref.total, r_ref.total, beta=args.beta)
        else:
            kl = {k: batch[f"KL_{k}"] for k in BATCH_KEYS}
            kl_policy = sequence_logprobs(model, kl).total
            with model.disable_adapter():
                kl_ref = sequence_logprobs(model, kl).total
            labels = torch.as_tensor(batch["label"], dtype=torch.bool)
            ours = kto_loss(
                policy.total,
                ref.total,
                labels,
                kto_reference_point(kl_policy, kl_ref),
                beta=args.beta,
                desirable_weight=args.desirable_weight,
                undesirable_weight=args.undesirable_weight,
            )
    return {"loss": (ours.loss.item(), float(trl_loss))} | {
        key: (value, logged[key]) for key, value in ours.metrics().items() if key != "loss" and key in logged
    }


# Cost of a training step, measured in a fresh process.


def _cuda_in_use(profile: Profile) -> bool:
    """Whether `profile` places models on a CUDA device that this process can see."""
    return profile.device == "cuda" and torch.cuda.is_available()


def _cuda_allocated_mib(peak: bool = False) -> float:
    """CUDA memory this process's tensors hold now (or at the peak since the last reset), in MiB."""
    held = torch.cuda.max_memory_allocated() if peak else torch.cuda.memory_allocated()
    return held / 2**20


def _one_step_cost(
    method: str, records: list[dict[str, Any]], full: bool, steps: int, batch_size: int, profile: Profile
) -> dict[str, float]:
    """In the current process: build the trainer for `method` on `records`, time `steps` steps (LoRA or full).

    Host memory is the resident set above its size at the start (peak counter reset there); on CUDA the
    memory PyTorch's allocator hands out is reported beside it, above its start, peak counter reset too.
    """
    import copy

    from datasets import Dataset
    from transformers.utils import logging as hf_logging

    from ftcourse import profiles, sft

    # This throwaway process trains on a slice of the data; TRL's advice about that slice's label balance
    # (KTO) is not the reader's concern. Errors still reach the parent as exceptions.
    hf_logging.set_verbosity_error()
    logging.getLogger("trl").setLevel(logging.ERROR)  # TRL logs through accelerate, i.e. stdlib logging
    on_cuda = _cuda_in_use(profile)
    if on_cuda:
        torch.cuda.reset_peak_memory_stats()
        start_cuda = _cuda_allocated_mib()
    reset_peak_rss()  # imports may have peaked above the resident set they leave: start the peak here
    start_rss = rss_mib()
    model = sft.quick_sft(profile=profile).model.merge_and_unload()  # the SFT start every run trains from
    for param in model.parameters():
        param.requires_grad_(full)
    ref = copy.deepcopy(model).eval() if full and NEEDS_REFERENCE[method] else None
    with tempfile.TemporaryDirectory() as scratch:
        trainer = preference_trainer(
            method,
            model,
            profiles.load_tokenizer(profile=profile),
            Dataset.from_list(records),
            peft_config=None if full else "lora",
            ref_model=ref,
            steps=steps,
            batch_size=batch_size,
            output_dir=scratch,
            profile=profile,
        )
        setup_rss = rss_mib()  # models (and the reference copy) loaded, trainer built
        if on_cuda:
            setup_cuda = _cuda_allocated_mib()
            torch.cuda.synchronize()
        wall, cpu = time.perf_counter(), time.process_time()
        trainer.train()
        if on_cuda:
            torch.cuda.synchronize()  # kernels run asynchronously: the step ends when the device is done
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    trainable = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
    cost = {
        "setup_mib": setup_rss - start_rss,
        "peak_mib": peak_rss_mib() - start_rss,
        "seconds_per_step": wall / steps,
        "cpu_seconds_per_step": cpu / steps,
        "trainable_parameters": float(trainable),
    }
    if on_cuda:
        cost["cuda_setup_mib"] = setup_cuda - start_cuda
        cost["cuda_peak_mib"] = _cuda_allocated_mib(peak=True) - start_cuda
    return cost


def _import_training_libraries() -> None:
    """Import what a measurement uses, so that the imports count in no measured figure."""
    import datasets  # noqa: F401
    import peft  # noqa: F401

    for method in METHODS:
        _trainer_class(method)


def _measure(request: tuple[str, list[dict[str, Any]], bool, int, int, Profile, int]) -> str:
    """One measurement in this process, as the JSON line `step_cost` reads: the figures or the error."""
    method, records, full, steps, batch_size, profile, threads = request
    torch.set_num_threads(threads)
    try:
        _import_training_libraries()
        result = {"ok": True, **_one_step_cost(method, records, full, steps, batch_size, profile)}
    except BaseException as error:  # noqa: BLE001 - every failure goes back to the parent as text
        result = {"ok": False, "error": f"{type(error).__name__}: {error}"}
    return json.dumps(result) + "\n"


def _interpreter_main(reply_fd: int, template: bool) -> None:
    """Entry point of a spawned interpreter: read pickled requests from stdin, reply one line each.

    `template=False`: measure the one request in this process, then exit. `template=True`: import the
    libraries once, then fork one child per request and measure there, until stdin closes. The template
    never loads a model, runs an OpenMP region or touches CUDA, so its forks start clean (unlike forks of
    a notebook kernel that has trained or used the GPU); each fork keeps the imports and nothing else.
    """
    import pickle

    with os.fdopen(reply_fd, "w") as replies:
        if not template:
            replies.write(_measure(pickle.load(sys.stdin.buffer)))
            return
        _import_training_libraries()
        while True:
            try:
                request = pickle.load(sys.stdin.buffer)
            except EOFError:
                return
            read_end, write_end = os.pipe()
            pid = os.fork()
            if pid == 0:  # the child: measure, report, leave without running the template's cleanup
                os.close(read_end)
                os.write(write_end, _measure(request).encode())
                os._exit(0)
            os.close(write_end)
            with os.fdopen(read_end) as pipe:
                reply = pipe.read()
            _, status = os.waitpid(pid, 0)
            if not reply:
                code = os.waitstatus_to_exitcode(status)
                reply = json.dumps({"ok": False, "error": f"the child died without a report ({code})"}) + "\n"
            replies.write(reply)
            replies.flush()


_TEMPLATE: dict[str, Any] = {}  # the running template interpreter: process, reply pipe, environment


def _start_interpreter(template: bool) -> tuple[Any, Any]:
    """Spawn a Python interpreter running `_interpreter_main`: (process, reply stream)."""
    import subprocess

    read_end, write_end = os.pipe()
    code = "import sys; from ftcourse.prefs import _interpreter_main; _interpreter_main(int(sys.argv[1]), {})"
    process = subprocess.Popen(
        [sys.executable, "-c", code.format(template), str(write_end)],
        stdin=subprocess.PIPE,
        pass_fds=(write_end,),
    )
    os.close(write_end)  # the interpreter holds its own copy: reads end when it closes it
    return process, os.fdopen(read_end)


def _stop_template() -> None:
    """Close the template interpreter's stdin (it exits) and wait for it."""
    process = _TEMPLATE.pop("process", None)
    if process is not None:
        process.stdin.close()
        _TEMPLATE.pop("replies").close()
        try:
            process.wait(timeout=30)
        except Exception:  # noqa: BLE001 - a template stuck in a measurement is ended, not waited on
            process.kill()


def _ask(process: Any, replies: Any, request: tuple[Any, ...]) -> dict[str, Any]:
    """Send one request to a spawned interpreter and read its reply line."""
    import pickle

    try:
        pickle.dump(request, process.stdin)
        process.stdin.flush()
    except BrokenPipeError:
        pass  # the interpreter died on start (its traceback is on stderr): the empty reply says so
    line = replies.readline()
    if not line:
        return {"ok": False, "error": f"the measuring interpreter died without a report ({process.poll()})"}
    return json.loads(line)


def step_cost(
    method: str,
    records: Sequence[Mapping[str, Any]],
    full: bool = False,
    steps: int = 2,
    batch_size: int = 8,
    profile: Profile | None = None,
    threads: int = 1,
    fresh_interpreter: bool | None = None,
) -> dict[str, float]:
    """Memory after setup and at the peak, above the start (MiB), and time per step, in a fresh process.

    The child loads the SFT start (the quick SFT run, merged) and trains `method` on the first
    `steps * batch_size` of `records` (a standard run's data: `ftcourse.train.train_records(method)`).

    A process keeps memory it has freed and reuses it, so each configuration runs in its own process,
    never a fork of the caller (a fork cannot use CUDA once the caller has, and inherits its models and
    OpenMP pool). `fresh_interpreter=True` spawns a new Python interpreter per call; the default does so
    on a CUDA profile and otherwise forks each measurement from one spawned template interpreter that
    has imported the libraries and done nothing else, so that the import bill (seconds) is paid once.
    The process resets its peak counter after the imports: peak resident set (VmHWM) minus the size at
    that point is what this configuration needed. On a CUDA profile `cuda_setup_mib` and `cuda_peak_mib`
    (torch.cuda's allocator, peak after reset_peak_memory_stats) come beside the host figures. The child
    runs `threads` CPU threads (one, as earlier builds measured). `full=True` trains every weight, with a
    frozen copy as the reference for DPO and KTO; otherwise a LoRA adapter, reference = adapter off.
    """
    profile = profile or active_profile()
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if threads < 1:
        raise ValueError(f"threads must be at least 1, got {threads}")
    if fresh_interpreter is None:
        fresh_interpreter = profile.device == "cuda"
    if len(records) < steps * batch_size:
        raise ValueError(
            f"{steps} steps of {batch_size} rows need {steps * batch_size} records, got {len(records)}"
        )
    request = (
        method,
        [dict(r) for r in records[: steps * batch_size]],
        full,
        steps,
        batch_size,
        profile,
        threads,
    )
    if fresh_interpreter:
        process, replies = _start_interpreter(template=False)
        with replies:
            result = _ask(process, replies, request)
            process.stdin.close()
            process.wait()
    else:
        environment = dict(os.environ)  # read by the profile's loaders: a changed one needs a new template
        running = _TEMPLATE.get("process")
        if running is None or running.poll() is not None or _TEMPLATE["environment"] != environment:
            _stop_template()
            if not _TEMPLATE.get("registered"):
                atexit.register(_stop_template)
            process, replies = _start_interpreter(template=True)
            _TEMPLATE.update(process=process, replies=replies, environment=environment, registered=True)
        result = _ask(_TEMPLATE["process"], _TEMPLATE["replies"], request)
    if not result.pop("ok"):
        raise RuntimeError(f"measuring {method} ({'full' if full else 'LoRA'}) failed: {result['error']}")
    return result
