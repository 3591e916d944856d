"""LoRA from scratch: a frozen linear layer plus a trainable low-rank update, W = W0 + (alpha/r)·B·A.

`LoRALinear` is the layer, `inject_lora` puts it into a model in place of named linear layers,
`merge_lora` folds the update back into plain `nn.Linear` weights, and `train_adapters` is a small
plain-torch training loop (AdamW, warmup then cosine decay, gradient clipping: the schedule the book's
`sft.train_sft` asks TRL's SFTTrainer for; TRL's own default is linear decay) that trains whatever
parameters of a model are left trainable, ours or peft's, on the same batches. The names follow the
equation: `W0`, `A`, `B`, `alpha`, `rank`, `scaling`.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ftcourse import profiles

ALL_LINEAR = "all-linear"  # every nn.Linear except the output layer (lm_head), as in peft
ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP = ("gate_proj", "up_proj", "down_proj")
TARGET_SETS: dict[str, tuple[str, ...]] = {"attention": ATTENTION, "mlp": MLP, "all": ATTENTION + MLP}
IGNORE_INDEX = -100  # label of tokens that do not count in the loss (prompt, padding)

# How big the Part II runs are, per profile: small enough on the cpu profile for a chapter to run in about
# a minute on two cores, real sizes on a DGX Spark. `records` training conversations, `eval_per_family`
# held-out tasks per task family (on spark: held-out rows, four per "family"), `reply_tokens` the length of
# a reply generated to a held-out hub prompt (the task world's exact match generates its own, short ones).
RUN_SIZES: dict[str, dict[str, Any]] = {
    "cpu": {
        "records": 400, "batch_size": 8, "steps": 60, "learning_rate": 5e-3, "eval_per_family": 25,
        # the ablation and comparison chapters: many short runs
        "sweep_batch_size": 4, "sweep_steps": 30, "sweep_eval_per_family": 10, "sweep_heldout": 32,
        "reply_tokens": 16,
    },
    "spark": {
        "records": 4000, "batch_size": 8, "steps": 400, "learning_rate": 2e-4, "eval_per_family": 200,
        "sweep_batch_size": 8, "sweep_steps": 200, "sweep_eval_per_family": 50, "sweep_heldout": 256,
        "reply_tokens": 256,
    },
    # FTCOURSE_SIZES=minimal (the spark stand-ins in CI): a smoke test of every code path, nothing measured
    "minimal": {
        "records": 24, "batch_size": 4, "steps": 3, "learning_rate": 2e-4, "eval_per_family": 1,
        "sweep_batch_size": 4, "sweep_steps": 2, "sweep_eval_per_family": 1, "sweep_heldout": 8,
        "reply_tokens": 16,
    },
}  # fmt: skip


def run_sizes(profile: Any) -> dict[str, Any]:
    """The Part II run sizes for `profile` (a Profile, minimal under FTCOURSE_SIZES=minimal, or a name)."""
    if isinstance(profile, str):
        if profile not in RUN_SIZES:
            raise ValueError(f"no Part II run sizes for profile {profile!r}; known: {sorted(RUN_SIZES)}")
        return dict(RUN_SIZES[profile])
    return dict(profiles.run_sizes(RUN_SIZES, profile))


def check_rank(rank: int, alpha: float) -> None:
    """Raise a ValueError unless `rank` is a positive integer and `alpha` a positive number."""
    if isinstance(rank, bool) or not isinstance(rank, int) or rank <= 0:
        raise ValueError(f"LoRA rank must be a positive integer (1, 8, 16, ...), got {rank!r}")
    if not isinstance(alpha, int | float) or alpha <= 0:
        raise ValueError(f"LoRA alpha must be a positive number (often rank or 2*rank), got {alpha!r}")


class LoRALinear(nn.Module):
    """y = W0·x + (alpha/r)·B·A·x, with W0 frozen, A (r × in) random and B (out × r) zero at the start."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float, use_rslora: bool = False) -> None:
        super().__init__()
        check_rank(rank, alpha)
        if not isinstance(base, nn.Linear):
            raise TypeError(f"LoRALinear wraps an nn.Linear, got {type(base).__name__}")
        self.base = base  # holds W0 (and the bias, if any); never trained
        for parameter in base.parameters():
            parameter.requires_grad_(False)
        self.rank, self.alpha, self.use_rslora = rank, alpha, use_rslora
        # rsLoRA divides by sqrt(r) instead of r, so the update does not shrink as the rank grows.
        self.scaling = alpha / math.sqrt(rank) if use_rslora else alpha / rank
        # Adapters stay in float32 on a bf16/fp16 base, as peft does (autocast_adapter_dtype=True).
        dtype = base.weight.dtype if base.weight.dtype.is_floating_point else torch.float32
        if dtype in (torch.float16, torch.bfloat16):
            dtype = torch.float32
        device = base.weight.device
        self.A = nn.Parameter(torch.empty(rank, base.in_features, device=device, dtype=dtype))
        self.B = nn.Parameter(torch.zeros(base.out_features, rank, device=device, dtype=dtype))
        # A as nn.Linear initialises its weight (peft's default for lora_A); B = 0 so that W = W0 at step 0.
        nn.init.kaiming_uniform_(self.A, a=math.sqrt(5))

    @property
    def W0(self) -> torch.Tensor:
        """The frozen pretrained weight, shape (out, in)."""
        return self.base.weight

    def delta_weight(self) -> torch.Tensor:
        """The learned update ΔW = (alpha/r)·B·A, shape (out, in)."""
        return self.scaling * (self.B @ self.A)

    def merged_weight(self) -> torch.Tensor:
        """W0 + ΔW in the base layer's dtype: the weight of the equivalent plain linear layer."""
        return (self.W0.to(self.A.dtype) + self.delta_weight()).to(self.W0.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """W0·x (+ bias) plus the low-rank path, computed as B·(A·x) so no (out × in) matrix is formed."""
        result = self.base(x)  # (..., out), in the base layer's dtype
        update = F.linear(F.linear(x.to(self.A.dtype), self.A), self.B)  # (..., r), then (..., out)
        # peft's order: on a bf16/fp16 base the sum is taken in the adapter's float32 and rounded to the
        # base dtype once. Rounding the update to bf16 first would round twice, and a few ulps per layer
        # add up to visible differences in the logits.
        return (result + update * self.scaling).to(result.dtype)

    def extra_repr(self) -> str:
        """Shown by print(model)."""
        kind = "rsLoRA" if self.use_rslora else "LoRA"
        return f"{kind} rank={self.rank}, alpha={self.alpha}, scaling={self.scaling:.4g}"


def linear_names(model: nn.Module) -> list[str]:
    """Names of the model's nn.Linear layers, without the output layer (what `all-linear` selects)."""
    output = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    return [name for name, m in model.named_modules() if isinstance(m, nn.Linear) and m is not output]


def resolve_targets(model: nn.Module, targets: str | Iterable[str]) -> list[str]:
    """Full names of the linear layers `targets` selects: `all-linear`, or name suffixes like `q_proj`."""
    if isinstance(targets, str):
        targets = linear_names(model) if targets == ALL_LINEAR else [targets]
    targets = list(targets)
    if not targets:
        raise ValueError("targets is empty: name at least one linear layer, e.g. ['q_proj', 'v_proj']")
    modules = dict(model.named_modules())
    chosen: list[str] = []
    for target in targets:
        matches = [name for name in modules if name == target or name.endswith("." + target)]
        if not matches:
            suffixes = sorted({name.rsplit(".", 1)[-1] for name in linear_names(model)})
            raise ValueError(
                f"target {target!r} matches no module of {type(model).__name__}. Its linear layers end in: "
                f"{', '.join(suffixes)}; pass some of those, or {ALL_LINEAR!r}."
            )
        for name in matches:
            module = modules[name]
            if isinstance(module, LoRALinear):
                raise ValueError(f"{name!r} already has an adapter; inject into the base model only once")
            if not isinstance(module, nn.Linear):
                raise TypeError(
                    f"target {target!r} selects {name!r}, a {type(module).__name__}, not an nn.Linear: LoRA "
                    f"here adapts linear layers only. Name its projections instead, e.g. {name}.<proj>."
                )
            if name not in chosen:
                chosen.append(name)
    return chosen


def inject_adapters(
    model: nn.Module, targets: str | Iterable[str], make_layer: Callable[[nn.Linear], nn.Module]
) -> list[str]:
    """Freeze `model` and replace each targeted linear layer with `make_layer(layer)`; returns their names."""
    names = resolve_targets(model, targets)
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        setattr(parent, child, make_layer(getattr(parent, child)))
    return names


def inject_lora(
    model: nn.Module, targets: str | Iterable[str], rank: int, alpha: float, use_rslora: bool = False
) -> list[str]:
    """Replace the targeted linear layers of `model` in place with LoRALinear; returns the names replaced."""
    check_rank(rank, alpha)
    return inject_adapters(model, targets, lambda layer: LoRALinear(layer, rank, alpha, use_rslora))


def adapter_layers(model: nn.Module) -> dict[str, LoRALinear]:
    """The model's LoRALinear layers (DoRALinear included) by name."""
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every adapter into a plain nn.Linear with the merged weight (in place); returns the model."""
    for name, layer in adapter_layers(model).items():
        merged = nn.Linear(
            layer.base.in_features,
            layer.base.out_features,
            bias=layer.base.bias is not None,
            device=layer.W0.device,
            dtype=layer.W0.dtype,
        )
        with torch.no_grad():
            merged.weight.copy_(layer.merged_weight())
            if layer.base.bias is not None:
                merged.bias.copy_(layer.base.bias)
        merged.requires_grad_(False)
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name), child, merged)
    return model


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts of `model`."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return trainable, sum(p.numel() for p in model.parameters())


def lora_parameters(d_out: int, d_in: int, rank: int) -> int:
    """Trainable numbers of one LoRA update of a (d_out × d_in) weight: r·(d_in + d_out)."""
    check_rank(rank, 1)
    return rank * (d_in + d_out)


def load_peft_weights(model: nn.Module, peft_model: nn.Module, adapter: str = "default") -> int:
    """Copy A and B (and DoRA's m) from a peft model with the same targets into ours; returns the count."""
    peft_base = peft_model.get_base_model() if hasattr(peft_model, "get_base_model") else peft_model
    layers = adapter_layers(model)
    if not layers:
        raise ValueError("the model has no LoRA layers: call inject_lora (or inject_dora) first")
    for name, layer in layers.items():
        try:
            source = peft_base.get_submodule(name)
        except AttributeError as error:
            raise ValueError(
                f"the peft model has no layer {name!r}: were both given the same targets?"
            ) from error
        if not hasattr(source, "lora_A") or adapter not in source.lora_A:
            raise ValueError(f"peft layer {name!r} has no LoRA adapter named {adapter!r}")
        with torch.no_grad():
            layer.A.copy_(source.lora_A[adapter].weight)
            layer.B.copy_(source.lora_B[adapter].weight)
            if hasattr(layer, "m"):
                layer.m.copy_(source.lora_magnitude_vector[adapter].weight)
    return len(layers)


# Training: tokenized chat batches made once, then one loop for our layers and peft's alike.


def tokenize_chat(tokenizer: Any, messages: Sequence[Mapping[str, str]], max_length: int = 256) -> dict:
    """Token ids of one conversation and labels that count the last assistant reply only (-100 elsewhere)."""
    if not messages or messages[-1]["role"] != "assistant":
        raise ValueError("each conversation must end with an assistant message (the reply to learn)")
    prompt = tokenizer.apply_chat_template(list(messages[:-1]), tokenize=False, add_generation_prompt=True)
    full = tokenizer.apply_chat_template(list(messages), tokenize=False)
    if not full.startswith(prompt):
        raise ValueError("the chat template does not render the prompt as a prefix of the conversation")
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    reply = full[len(prompt) :]
    end = tokenizer.eos_token or ""
    # Train up to and including the end-of-turn token, as TRL's assistant mask does; not what follows it.
    if end and end in reply:
        reply = reply[: reply.index(end) + len(end)]
    reply_ids = tokenizer(reply, add_special_tokens=False)["input_ids"]
    ids = (prompt_ids + reply_ids)[:max_length]
    labels = ([IGNORE_INDEX] * len(prompt_ids) + reply_ids)[:max_length]
    return {"input_ids": ids, "labels": labels}


def chat_batches(
    tokenizer: Any,
    records: Iterable[Mapping[str, Any]],
    batch_size: int,
    seed: int = 0,
    max_length: int = 256,
    device: str | torch.device = "cpu",
) -> list[dict[str, torch.Tensor]]:
    """Shuffled, right-padded batches (input_ids, attention_mask, labels) of `messages` records, made once."""
    rows = [tokenize_chat(tokenizer, record["messages"], max_length) for record in records]
    # A reply cut off entirely by max_length has nothing to learn from; it would only dilute the batch.
    rows = [row for row in rows if any(label != IGNORE_INDEX for label in row["labels"])]
    if not rows:
        raise ValueError("no records to train on")
    order = torch.randperm(len(rows), generator=torch.Generator().manual_seed(seed)).tolist()
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    batches = []
    for start in range(0, len(order) - batch_size + 1, batch_size):  # full batches only
        chunk = [rows[i] for i in order[start : start + batch_size]]
        width = max(len(r["input_ids"]) for r in chunk)
        ids = torch.full((batch_size, width), pad_id)
        labels = torch.full((batch_size, width), IGNORE_INDEX)
        mask = torch.zeros((batch_size, width), dtype=torch.long)
        for i, row in enumerate(chunk):
            n = len(row["input_ids"])
            ids[i, :n], labels[i, :n], mask[i, :n] = (
                torch.tensor(row["input_ids"]),
                torch.tensor(row["labels"]),
                1,
            )
        batches.append(
            {"input_ids": ids.to(device), "attention_mask": mask.to(device), "labels": labels.to(device)}
        )
    if not batches:
        raise ValueError(f"{len(rows)} records make no full batch of {batch_size}; lower batch_size")
    return batches


def reply_loss(model: nn.Module, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """Mean next-token cross-entropy over the reply tokens of a batch (labels -100 do not count)."""
    # Ask for the final hidden states and apply the output layer to the reply positions only: the same
    # loss as on full logits, about a quarter cheaper, because prompts are most of every sequence.
    out = model(
        input_ids=batch["input_ids"],
        attention_mask=batch["attention_mask"],
        output_hidden_states=True,
        logits_to_keep=1,
    )
    hidden = out.hidden_states[-1][:, :-1]  # (B, T-1, d): position t predicts token t+1
    labels = batch["labels"][:, 1:]  # (B, T-1)
    counted = labels != IGNORE_INDEX
    logits = model.get_output_embeddings()(hidden[counted])  # (n_reply_tokens, V)
    return F.cross_entropy(logits.float(), labels[counted])


@dataclass
class AdapterRun:
    """What `train_adapters` did: the loss and wall time of every step."""

    losses: list[float] = field(default_factory=list)
    step_seconds: list[float] = field(default_factory=list)
    trainable_parameters: int = 0

    @property
    def seconds(self) -> float:
        """Total training time in seconds."""
        return float(sum(self.step_seconds))

    def median_step_ms(self, skip: int = 2) -> float:
        """Median milliseconds per step, leaving out the first `skip` steps (warm-up of the allocator)."""
        times = sorted(self.step_seconds[skip:] or self.step_seconds)
        return 1000 * times[len(times) // 2]


def train_adapters(
    model: nn.Module,
    batches: Sequence[Mapping[str, torch.Tensor]],
    *,
    steps: int,
    learning_rate: float = 2e-3,
    warmup_steps: int = 5,
    max_grad_norm: float = 1.0,
    on_step: Callable[[int, nn.Module], None] | None = None,
) -> AdapterRun:
    """Train the parameters of `model` that require grad for `steps` steps, cycling through `batches`."""
    from transformers import get_cosine_schedule_with_warmup

    parameters = [p for p in model.parameters() if p.requires_grad]
    if not parameters:
        raise ValueError("nothing to train: no parameter of the model requires grad (inject adapters first)")
    if steps <= 0:
        raise ValueError(f"steps must be positive, got {steps}")
    # Trainer's defaults: AdamW, betas (0.9, 0.999), eps 1e-8, no weight decay, clip the global norm at 1.
    optimizer = torch.optim.AdamW(parameters, lr=learning_rate, weight_decay=0.0)
    schedule = get_cosine_schedule_with_warmup(optimizer, warmup_steps, steps)
    run = AdapterRun(trainable_parameters=sum(p.numel() for p in parameters))
    was_training = model.training
    model.train()
    for step in range(steps):
        started = time.perf_counter()
        loss = reply_loss(model, batches[step % len(batches)])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(parameters, max_grad_norm)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        run.step_seconds.append(time.perf_counter() - started)
        run.losses.append(loss.item())
        if on_step is not None:
            on_step(step + 1, model)
    model.train(was_training)
    return run


@torch.no_grad()
def mean_loss(model: nn.Module, batches: Sequence[Mapping[str, torch.Tensor]]) -> float:
    """The reply-token loss of `model` averaged over `batches` (eval mode, no gradients)."""
    was_training = model.training
    model.eval()
    losses = [reply_loss(model, batch).item() for batch in batches]
    model.train(was_training)
    return float(sum(losses) / len(losses))


@torch.no_grad()
def example_losses(model: nn.Module, batches: Sequence[Mapping[str, torch.Tensor]]) -> list[float]:
    """The reply-token loss of each conversation in `batches` (eval mode): one number per held-out example."""
    was_training = model.training
    model.eval()
    losses: list[float] = []
    for batch in batches:
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        labels = batch["labels"][:, 1:]  # (B, T-1): position t predicts token t+1
        nll = F.cross_entropy(
            logits[:, :-1].float().transpose(1, 2), labels, ignore_index=IGNORE_INDEX, reduction="none"
        )  # (B, T-1), 0 where the label is ignored
        counted = (labels != IGNORE_INDEX).sum(dim=1)
        losses += (nll.sum(dim=1) / counted.clamp(min=1)).tolist()
    model.train(was_training)
    return losses


@dataclass(frozen=True)
class LoRASetting:
    """One cell of a LoRA ablation: rank, alpha, which layers, rsLoRA or not, and the seed of A."""

    rank: int
    alpha: float
    targets: str = "all"  # a key of TARGET_SETS
    use_rslora: bool = False
    seed: int = 0

    @property
    def scaling(self) -> float:
        """The factor in front of B·A: alpha/r, or alpha/sqrt(r) for rsLoRA."""
        return self.alpha / math.sqrt(self.rank) if self.use_rslora else self.alpha / self.rank


def train_setting(
    base: nn.Module,
    setting: LoRASetting,
    batches: Sequence[Mapping[str, torch.Tensor]],
    *,
    steps: int,
    learning_rate: float,
    warmup_steps: int = 3,
) -> tuple[nn.Module, AdapterRun]:
    """A copy of `base` with the LoRA of `setting`, trained on `batches`; returns (eval-mode model, run)."""
    if setting.targets not in TARGET_SETS:
        raise ValueError(f"targets must be one of {sorted(TARGET_SETS)}, got {setting.targets!r}")
    torch.manual_seed(setting.seed)  # the random A
    model = copy.deepcopy(base)
    inject_lora(model, TARGET_SETS[setting.targets], setting.rank, setting.alpha, setting.use_rslora)
    run = train_adapters(model, batches, steps=steps, learning_rate=learning_rate, warmup_steps=warmup_steps)
    return model.eval(), run
