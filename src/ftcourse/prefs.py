"""Preference optimization: sequence log-probabilities and the DPO, SimPO, ORPO and KTO losses, from scratch.

The losses take per-sequence log-probabilities from `sequence_logprobs` and return a `PreferenceLoss`: the
scalar the optimizer minimises plus what TRL's trainers log (rewards, margins, accuracy). Symbols follow the
chapters: `beta`, SimPO's target margin `gamma`, ORPO's weight `lam`, KTO's reference point `z0`.
These functions exist to be read and tested against TRL; `preference_trainer` trains with TRL itself.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from ftcourse.profiles import Profile, active_profile
from ftcourse.sft import _offline_environment as offline_environment  # no hub calls on a no-network profile
from ftcourse.sft import lora_config

BATCH_KEYS = ("input_ids", "attention_mask", "completion_mask")


@dataclass(frozen=True)
class SequenceLogprobs:
    """Per-sequence log-probabilities: over the completion tokens, and over every real token (for ORPO's NLL)."""

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
            f"batch is missing {missing}; it needs {list(BATCH_KEYS)} (TRL's DPO/KTO collators produce them), "
            f"got keys {sorted(batch)}"
        )
    shapes = {k: tuple(batch[k].shape) for k in BATCH_KEYS}
    if len(set(shapes.values())) != 1:
        raise ValueError(f"input_ids, attention_mask and completion_mask must have one shape (B, T), got {shapes}")
    empty = (batch["completion_mask"][:, 1:].sum(dim=1) == 0).nonzero().flatten().tolist()
    if empty:
        raise ValueError(f"rows {empty} have no completion tokens to score: check the completion_mask")


def sequence_logprobs(model: torch.nn.Module, batch: Mapping[str, torch.Tensor]) -> SequenceLogprobs:
    """Log-probabilities of each row's completion under `model`, prompt and padding masked, summed and counted."""
    _check_batch(batch)
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
    """A loss value and what trainers log with it: implicit rewards of each side, their margin and accuracy."""

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
    """DPO: mean of -log sigmoid(beta * ((c - c_ref) - (r - r_ref))) on summed log-probs; rewards beta * (c - c_ref)."""
    _same_shape(chosen=chosen_logps, rejected=rejected_logps, ref_chosen=ref_chosen_logps, ref_rejected=ref_rejected_logps)
    chosen_logratios = chosen_logps - ref_chosen_logps  # log pi(y_w|x) / pi_ref(y_w|x)
    rejected_logratios = rejected_logps - ref_rejected_logps
    loss = -F.logsigmoid(beta * (chosen_logratios - rejected_logratios)).mean()
    return PreferenceLoss(loss, beta * chosen_logratios.detach(), beta * rejected_logratios.detach())


def simpo_loss(
    chosen_avg_logps: torch.Tensor, rejected_avg_logps: torch.Tensor, beta: float = 2.0, gamma: float = 1.0
) -> PreferenceLoss:
    """SimPO: mean of -log sigmoid(beta * (c_avg - r_avg) - gamma) on per-token averages; rewards beta * avg."""
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
    log_odds = (chosen_avg_logps - rejected_avg_logps) - (log1mexp(chosen_avg_logps) - log1mexp(rejected_avg_logps))
    ratio = F.logsigmoid(log_odds)
    loss = nll - lam * ratio.mean()
    extra = {"nll_loss": nll.item(), "log_odds_ratio": ratio.mean().item(), "log_odds_chosen": log_odds.mean().item()}
    return PreferenceLoss(loss, lam * chosen_avg_logps.detach(), lam * rejected_avg_logps.detach(), extra)


def kto_reference_point(kl_logps: torch.Tensor, kl_ref_logps: torch.Tensor) -> torch.Tensor:
    """KTO's z0: the batch-mean log-ratio on mismatched (prompt, completion) pairs, detached, clamped at 0."""
    _same_shape(kl=kl_logps, kl_ref=kl_ref_logps)
    return (kl_logps - kl_ref_logps).mean().detach().clamp(min=0)


def kto_loss(
    logps: torch.Tensor,
    ref_logps: torch.Tensor,
    labels: torch.Tensor,
    z0: torch.Tensor,
    beta: float = 0.1,
    desirable_weight: float = 1.0,
    undesirable_weight: float = 1.0,
) -> PreferenceLoss:
    """KTO on unpaired rows: desirable ones pay w_D (1 - sigmoid(beta (r - z0))), undesirable ones
    w_U (1 - sigmoid(beta (z0 - r))), with r = log pi/pi_ref summed over the completion; mean over rows."""
    _same_shape(logps=logps, ref_logps=ref_logps, labels=labels)
    good = labels.bool()
    logratios = logps - ref_logps
    chosen_losses = desirable_weight * (1 - torch.sigmoid(beta * (logratios[good] - z0)))
    rejected_losses = undesirable_weight * (1 - torch.sigmoid(beta * (z0 - logratios[~good])))
    loss = torch.cat([chosen_losses, rejected_losses]).mean()
    rewards = beta * logratios.detach()
    return PreferenceLoss(loss, rewards[good], rewards[~good], {"kl": float(z0)})


# Training with TRL: one entry point for the four methods.

METHODS: tuple[str, ...] = ("dpo", "simpo", "orpo", "kto")
NEEDS_REFERENCE: dict[str, bool] = {"dpo": True, "simpo": False, "orpo": False, "kto": True}
NEEDS_PAIRS: dict[str, bool] = {"dpo": True, "simpo": True, "orpo": True, "kto": False}
# Each method's strength (beta; ORPO's lambda is TRL's `beta` too) and SimPO's margin, as the chapters use them.
METHOD_DEFAULTS: dict[str, dict[str, float]] = {
    "dpo": {"beta": 0.1},
    "simpo": {"beta": 2.0, "gamma": 1.0},
    "orpo": {"beta": 0.1},
    "kto": {"beta": 0.1},
}


def _config(method: str, options: dict[str, Any], beta: float, gamma: float, kto_weights: tuple[float, float]):
    """The TRL config object for `method`, with the shared training options."""
    if method == "dpo":
        from trl import DPOConfig

        return DPOConfig(**options, beta=beta, loss_type=["sigmoid"])
    if method == "kto":
        from trl import KTOConfig

        return KTOConfig(**options, beta=beta, desirable_weight=kto_weights[0], undesirable_weight=kto_weights[1])
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")  # trl.experimental warns on import otherwise
    if method == "simpo":
        from trl.experimental.cpo import CPOConfig

        # cpo_alpha=0 drops CPO's extra NLL term: the default 1.0 would be "CPO-SimPO", not SimPO.
        return CPOConfig(**options, loss_type="simpo", cpo_alpha=0.0, beta=beta, simpo_gamma=gamma,
                         remove_unused_columns=False)
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
    max_length: int = 128,
    logging_steps: int = 2,
    seed: int = 0,
    output_dir: str,
    profile: Profile | None = None,
    callbacks: Sequence[Any] = (),
) -> Any:
    """A TRL trainer for `method` ('dpo', 'simpo', 'orpo', 'kto') on `dataset`, ready to `.train()`.

    `peft_config="lora"` trains a new LoRA adapter (the book's recipe) on top of `model`; the reference of
    DPO and KTO is then `model` itself with the adapter switched off. `peft_config=None` is full fine-tuning;
    DPO and KTO then need `ref_model`, a frozen copy (TRL would reload one from the hub name otherwise).
    """
    from transformers.trainer_callback import PrinterCallback

    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    profile = profile or active_profile()
    offline_environment(profile)
    defaults = METHOD_DEFAULTS[method]
    beta = defaults["beta"] if beta is None else beta
    gamma = defaults.get("gamma", 0.0) if gamma is None else gamma
    if peft_config == "lora":
        peft_config = lora_config()
    if peft_config is None and NEEDS_REFERENCE[method] and ref_model is None:
        raise ValueError(
            f"full fine-tuning with {method!r} needs a frozen reference: pass ref_model=copy.deepcopy(model)"
        )
    options: dict[str, Any] = {
        "output_dir": output_dir,
        "max_steps": steps,
        "per_device_train_batch_size": batch_size,
        "learning_rate": learning_rate,
        "lr_scheduler_type": "constant_with_warmup",
        "warmup_steps": max(1, steps // 10),
        "logging_steps": logging_steps,
        "save_strategy": "no",
        "report_to": "none",
        "seed": seed,
        "data_seed": seed,
        "max_length": max_length,
        "activation_checkpointing": False,  # TRL's default is on; a tiny model needs no memory saving
        "use_cpu": profile.device == "cpu",
        "bf16": profile.dtype == "bfloat16",
        "disable_tqdm": True,
    }
    extra = {"ref_model": ref_model} if NEEDS_REFERENCE[method] else {}
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
    return trainer


# Measuring a trained policy on held-out pairs.


def collate_pairs(tokenizer: Any, records: Sequence[Mapping[str, Any]]) -> dict[str, torch.Tensor]:
    """A pair batch in `sequence_logprobs`' format: all chosen rows, then all rejected rows, right-padded.

    Tokenized the way TRL's DPOTrainer does it: the prompt with the generation prompt, then the completion
    is whatever the full conversation adds after it.
    """
    rows, masks = [], []
    for side in ("chosen", "rejected"):
        for record in records:
            prompt = tokenizer.apply_chat_template(list(record["prompt"]), add_generation_prompt=True)
            full = tokenizer.apply_chat_template(list(record["prompt"]) + list(record[side]))
            prompt, full = _ids(prompt), _ids(full)
            if full[: len(prompt)] != prompt:
                raise ValueError(f"the chat template renders the prompt differently inside {side!r}: {record}")
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


@torch.no_grad()
def pair_logprobs(
    model: Any, tokenizer: Any, records: Sequence[Mapping[str, Any]], batch_size: int = 32
) -> tuple[SequenceLogprobs, SequenceLogprobs]:
    """(chosen, rejected) log-probabilities of held-out pair records under `model`, in batches."""
    parts: list[tuple[SequenceLogprobs, SequenceLogprobs]] = []
    for start in range(0, len(records), batch_size):
        batch = collate_pairs(tokenizer, records[start : start + batch_size])
        parts.append(sequence_logprobs(model, batch).halves())
    joined = []
    for side in (0, 1):
        fields = zip(*[(p[side].total, p[side].n_tokens, p[side].all_total, p[side].all_tokens) for p in parts])
        joined.append(SequenceLogprobs(*(torch.cat(list(f)) for f in fields)))
    return joined[0], joined[1]


def implicit_reward_accuracy(peft_model: Any, tokenizer: Any, records: Sequence[Mapping[str, Any]]) -> float:
    """Fraction of pairs whose DPO implicit reward log pi/pi_ref is higher for `chosen` (reference: adapter off).

    Method-neutral: it asks whether training moved the chosen reply up relative to the rejected one,
    measured against the model training started from, whatever loss did the moving. Ties count as misses.
    """
    chosen, rejected = pair_logprobs(peft_model, tokenizer, records)
    with peft_model.disable_adapter():
        ref_chosen, ref_rejected = pair_logprobs(peft_model, tokenizer, records)
    margins = (chosen.total - ref_chosen.total) - (rejected.total - ref_rejected.total)
    return (margins > 0).float().mean().item()
