"""QLoRA: LoRA on a base model stored in 4-bit NF4, the recipe that trains a 70B model on one 128 GB desk.

The recipe, step by step (Dettmers et al. 2023): load the base in 4 bit with bitsandbytes (NF4, double
quantization, bf16 compute on a GPU; see `compute_dtype`) through `ftcourse.quant.load_4bit`, which guards
bitsandbytes' CPU bugs; `prepare_model_for_kbit_training` (fp32 norms and embeddings, input gradients for
checkpointing); LoRA adapters on every linear; a paged 8-bit AdamW. Before any of it, `require_fit` asks
`ftcourse.memory.fit_check` whether the run fits and refuses, with the numbers, one that does not.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from ftcourse import memory, profiles, quant
from ftcourse.profiles import Profile, active_profile, check_model_folder, resolve_model
from ftcourse.sft import DEFAULT_TARGETS, TrainingRun, lora_config, train_sft

# Run sizes per profile. cpu: the embedded model, a few dozen steps; spark: batch 1 with accumulation.
RUN_SIZES: dict[str, dict[str, Any]] = {
    "cpu": {
        "steps": 50,
        "batch_size": 16,
        "gradient_accumulation_steps": 1,
        "learning_rate": 2e-3,
        "lora_rank": 16,
        "lora_alpha": 32,
        "max_length": 256,
        "gradient_checkpointing": False,  # a 5M-parameter model: recomputation would only cost time
        "eval_per_family": 25,
        "logging_steps": 5,
    },
    "spark": {
        "steps": 100,
        "batch_size": 1,
        "gradient_accumulation_steps": 16,
        "learning_rate": 2e-4,
        "lora_rank": 16,
        "lora_alpha": 32,
        "max_length": 1024,
        "gradient_checkpointing": True,
        "eval_per_family": 100,
        "logging_steps": 10,
    },
    # FTCOURSE_SIZES=minimal (the spark stand-ins in CI): the spark recipe's code path (batch 1 with
    # accumulation, gradient checkpointing) for two steps; nothing here is a measurement.
    "minimal": {
        "steps": 2,
        "batch_size": 1,
        "gradient_accumulation_steps": 2,
        "learning_rate": 2e-4,
        "lora_rank": 8,
        "lora_alpha": 16,
        "max_length": 256,
        "gradient_checkpointing": True,
        "eval_per_family": 2,
        "logging_steps": 1,
    },
}
OPTIMIZER = "paged_adamw_8bit"  # transformers' name; fit_check calls it "paged-adamw-8bit"


class DoesNotFit(ValueError):
    """A training run that the fit-check says cannot fit in the device's memory."""

    def __init__(self, estimate: memory.MemoryEstimate) -> None:
        self.estimate = estimate
        super().__init__(
            f"refusing to train: the fit-check puts the peak of one step at {estimate.peak_gib:.1f} GiB "
            f"({estimate.peak_phase}), and the device has "
            f"{estimate.usable_bytes / memory.GIB:.1f} GiB usable "
            f"({-estimate.headroom_gib:.1f} GiB short). "
            + ("Use QLoRA (method='qlora'), or " if estimate.method != "qlora" else "Try ")
            + f"a shorter seq_len, batch 1 with gradient accumulation, or gradient checkpointing.\n"
            f"{estimate.table()}"
        )


def run_sizes(profile: Profile | None = None) -> dict[str, Any]:
    """A copy of the QLoRA run sizes of `profile` (default: the active one; FTCOURSE_SIZES applies)."""
    return dict(profiles.run_sizes(RUN_SIZES, profile or active_profile()))


def compute_dtype(profile: Profile | None = None) -> str:
    """The dtype a 4-bit layer dequantizes to and multiplies in: the profile's (bf16 on a GPU, fp32 on cpu).

    The QLoRA recipe computes in bf16, which GPUs and the Spark's GB10 multiply natively. The cpu profile
    computes in float32, the dtype of its LoRA baseline, so that QLoRA and LoRA differ in how the base is
    stored and nothing else; and a CPU without bf16 matrix instructions (an AVX2-only x86) multiplies bf16
    through a slow fallback, which made the cpu profile's 4-bit run many times slower than its LoRA run.
    """
    return (profile or active_profile()).dtype


def compute_dtype_seconds(features: int = 512, tokens: int = 512, repeats: int = 5) -> dict[str, float]:
    """Median seconds of one forward and backward of a square NF4 Linear4bit here, in bf16 and in fp32."""
    import statistics
    import time

    import bitsandbytes as bnb

    seconds: dict[str, float] = {}
    for name, dtype in (("bfloat16", torch.bfloat16), ("float32", torch.float32)):
        generator = torch.Generator().manual_seed(0)
        layer = bnb.nn.Linear4bit(features, features, bias=False, compute_dtype=dtype, quant_type="nf4")
        layer = layer.to("cpu")  # quantizes the weight
        layer.support_avx512bf16_for_cpu = False  # the guard quant.load_4bit sets
        inputs = torch.randn(tokens, features, generator=generator).to(dtype)
        times = []
        for _ in range(repeats + 1):  # the first call is a warm-up
            start = time.perf_counter()
            x = inputs.clone().requires_grad_(True)
            layer(x).float().square().mean().backward()
            times.append(time.perf_counter() - start)
        seconds[name] = statistics.median(times[1:])
    return seconds


def device_memory_gb(profile: Profile | None = None) -> float:
    """Memory the profile's device has, in decimal GB: the GPU's on cuda, the machine's RAM on cpu."""
    profile = profile or active_profile()
    if profile.device == "cuda" and torch.cuda.is_available():
        return torch.cuda.get_device_properties(0).total_memory / 1e9
    import psutil

    return psutil.virtual_memory().total / 1e9


def require_fit(
    model: Any,
    method: str = "qlora",
    *,
    device_gb: float | None = None,
    device: str = "spark",
    **fit_settings: Any,
) -> memory.MemoryEstimate:
    """The fit-check of the run; raises DoesNotFit (with the breakdown) when its verdict is 'does not fit'."""
    estimate = memory.fit_check(model, method, device_gb=device_gb, device=device, **fit_settings)
    if estimate.verdict == "does not fit":
        raise DoesNotFit(estimate)
    return estimate


# transformers' `optim` names -> fit_check's optimizer names (what each keeps per trainable parameter)
FIT_OPTIMIZERS = {
    "paged_adamw_8bit": "paged-adamw-8bit",
    "paged_adamw_32bit": "paged-adamw",
    "adamw_torch": "adamw",
    "adamw_bnb_8bit": "adamw-8bit",
    "adamw_8bit": "adamw-8bit",
}


def fit_optimizer(optim: str) -> str:
    """fit_check's name for the Trainer optimizer `optim` ("paged_adamw_8bit" -> "paged-adamw-8bit")."""
    if optim not in FIT_OPTIMIZERS:
        known = sorted(FIT_OPTIMIZERS)
        raise ValueError(f"optim {optim!r} is not one the fit-check can price; use one of {known}")
    return FIT_OPTIMIZERS[optim]


def _fit_settings(sizes: Mapping[str, Any], optim: str = OPTIMIZER) -> dict[str, Any]:
    return {
        "seq_len": sizes["max_length"],
        "batch_size": sizes["batch_size"],
        "lora_rank": sizes["lora_rank"],
        "gradient_checkpointing": sizes["gradient_checkpointing"],
        "optimizer": fit_optimizer(optim),
    }


def load_qlora_model(
    profile: Profile | None = None,
    role: str = "qlora",
    gradient_checkpointing: bool | None = None,
    device_gb: float | None = None,
    model: str | None = None,
) -> Any:
    """The profile's model for `role` in 4-bit NF4, prepared for k-bit training; refuses one that cannot fit.

    The fit-check runs on the model's config before a single weight is read, so a 70B run that cannot fit
    fails in a second, not after reading the whole checkpoint. The base computes in `compute_dtype(profile)`.
    `model` (a hub id, or a local folder with config.json and safetensors) replaces the profile's model.
    """
    from peft import prepare_model_for_kbit_training
    from transformers import AutoConfig

    profile = profile or active_profile()
    sizes = run_sizes(profile)
    if gradient_checkpointing is not None:
        sizes["gradient_checkpointing"] = gradient_checkpointing
    if model is None:
        path = resolve_model(role, profile)
    elif Path(model).expanduser().is_dir():
        path = str(check_model_folder(Path(model).expanduser(), what=f"model={model!r}"))
    elif not profile.uses_network:
        raise ValueError(
            f"model={model!r} is not a local folder, and the {profile.name!r} profile never downloads: "
            "give a folder with config.json and safetensors weights."
        )
    else:
        path = model
    config = AutoConfig.from_pretrained(path, local_files_only=not profile.uses_network)
    require_fit(
        config,
        "qlora",
        device_gb=device_gb if device_gb is not None else device_memory_gb(profile),
        device=profile.device,
        **_fit_settings(sizes),
    )
    model = quant.load_4bit(
        path,
        compute_dtype=compute_dtype(profile),
        device_map="cpu" if profile.device == "cpu" else "auto",
        local_files_only=not profile.uses_network,
    )
    with warnings.catch_warnings():
        # peft reads the model's old `is_gradient_checkpointing` name, which transformers 5 deprecates.
        warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated")
        return prepare_model_for_kbit_training(
            model,
            use_gradient_checkpointing=sizes["gradient_checkpointing"],
            gradient_checkpointing_kwargs={"use_reentrant": False},
        )


def train_qlora(
    model: Any,
    tokenizer: Any,
    dataset: Any,
    *,
    profile: Profile | None = None,
    device_gb: float | None = None,
    progress: bool = False,
    seed: int = 0,
    optim: str = OPTIMIZER,
    allow_truncation: bool = False,
    **overrides: Any,
) -> TrainingRun:
    """A QLoRA SFT run of a 4-bit `model` (from `load_qlora_model`), trained in place; refuses a non-fit.

    `overrides` replace entries of the profile's RUN_SIZES (steps, batch_size, learning_rate, ...).
    max_length stays the planned one (the fit-check priced it); `train_sft` stops when it would cut more
    than `data.TRUNCATION_LIMIT` of the rows, unless `allow_truncation`.
    `optim` is the Trainer's optimizer name: the book's paged 8-bit AdamW by default; the QLoRA paper's
    script uses "paged_adamw_32bit", and "adamw_torch" is the plain AdamW of the LoRA baseline.
    """
    profile = profile or active_profile()
    sizes = {**run_sizes(profile), **overrides}
    unknown = set(overrides) - set(RUN_SIZES["cpu"])
    if unknown:
        raise ValueError(f"train_qlora: unknown size(s) {sorted(unknown)}; known: {sorted(RUN_SIZES['cpu'])}")
    if not getattr(model, "is_loaded_in_4bit", False):
        raise ValueError(
            "train_qlora: the model is not loaded in 4 bit; load it with qlora.load_qlora_model(), "
            "or train a 16/32-bit model with sft.train_sft()."
        )
    require_fit(
        model.config,
        "qlora",
        device_gb=device_gb if device_gb is not None else device_memory_gb(profile),
        device=profile.device,
        **_fit_settings(sizes, optim),
    )
    peft_config = lora_config(lora_rank=sizes["lora_rank"], lora_alpha=sizes["lora_alpha"])
    with warnings.catch_warnings():
        # bitsandbytes on a CPU: "Paged optimizers are not supported on CPU", then plain 8-bit AdamW steps.
        warnings.filterwarnings("ignore", message="Paged optimizers are not supported on CPU")
        return _train(
            model, tokenizer, dataset, peft_config, sizes, profile, progress, seed, optim, allow_truncation
        )


def _train(
    model: Any,
    tokenizer: Any,
    dataset: Any,
    peft_config: Any,
    sizes: Mapping[str, Any],
    profile: Profile,
    progress: bool,
    seed: int,
    optim: str = OPTIMIZER,
    allow_truncation: bool = False,
) -> TrainingRun:
    return train_sft(
        model,
        tokenizer,
        dataset,
        peft_config=peft_config,
        learning_rate=sizes["learning_rate"],
        steps=sizes["steps"],
        batch_size=sizes["batch_size"],
        gradient_accumulation_steps=sizes["gradient_accumulation_steps"],
        max_length=sizes["max_length"],
        allow_truncation=allow_truncation,
        gradient_checkpointing=sizes["gradient_checkpointing"],
        logging_steps=sizes["logging_steps"],
        copy_model=False,  # a 4-bit 70B is not copied; the caller loaded it for this run
        seed=seed,
        profile=profile,
        progress=progress,
        extra_args={"optim": optim},
    )


def train_lora(
    model: Any,
    tokenizer: Any,
    dataset: Any,
    *,
    profile: Profile | None = None,
    seed: int = 0,
    allow_truncation: bool = False,
    **overrides: Any,
) -> TrainingRun:
    """The same run as `train_qlora` on a 16/32-bit `model` (a copy), with plain AdamW: the LoRA baseline."""
    profile = profile or active_profile()
    sizes = {**run_sizes(profile), **overrides}
    return train_sft(
        model,
        tokenizer,
        dataset,
        peft_config=lora_config(lora_rank=sizes["lora_rank"], lora_alpha=sizes["lora_alpha"]),
        learning_rate=sizes["learning_rate"],
        steps=sizes["steps"],
        batch_size=sizes["batch_size"],
        gradient_accumulation_steps=sizes["gradient_accumulation_steps"],
        max_length=sizes["max_length"],
        allow_truncation=allow_truncation,
        gradient_checkpointing=sizes["gradient_checkpointing"],
        logging_steps=sizes["logging_steps"],
        seed=seed,
        profile=profile,
        progress=False,
    )


def load_in(precision: str, profile: Profile | None = None, role: str = "lora") -> Any:
    """The profile's model for `role` loaded in 'fp32', 'bf16', '8bit' or '4bit' (NF4, double quant)."""
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig
    from transformers.utils import logging as hf_logging

    profile = profile or active_profile()
    hf_logging.disable_progress_bar()
    path = resolve_model(role, profile)
    if precision == "4bit":
        return quant.load_4bit(
            path,
            compute_dtype=compute_dtype(profile),
            device_map="cpu" if profile.device == "cpu" else "auto",
            local_files_only=not profile.uses_network,
        )
    options: dict[str, Any] = {"local_files_only": not profile.uses_network, "use_safetensors": True}
    options["device_map"] = "cpu" if profile.device == "cpu" else "auto"
    if precision == "fp32":
        options["dtype"] = torch.float32
    elif precision == "bf16":
        options["dtype"] = torch.bfloat16
    elif precision == "8bit":
        options["quantization_config"] = BitsAndBytesConfig(load_in_8bit=True)
    else:
        raise ValueError(f"precision must be 'fp32', 'bf16', '8bit' or '4bit', got {precision!r}")
    return AutoModelForCausalLM.from_pretrained(path, **options)


def weight_bytes(model: torch.nn.Module) -> dict[str, int]:
    """Bytes the tensors hold: {'decoder linears', 'lm_head', 'other', 'total'}, quant states included."""
    import bitsandbytes as bnb

    parts = {"decoder linears": 0, "lm_head": 0, "other": 0}
    seen: set[int] = set()
    for name, module in model.named_modules():
        if not isinstance(module, torch.nn.Linear):  # bitsandbytes' Linear4bit and Linear8bitLt are Linears
            continue
        part = "lm_head" if name.split(".")[-1] == "lm_head" else "decoder linears"
        if isinstance(module, bnb.nn.Linear4bit):
            parts[part] += quant.linear4bit_bytes(module)
        else:
            scales = getattr(module.weight, "SCB", None)  # an 8-bit weight's per-row scales
            parts[part] += module.weight.numel() * module.weight.element_size()
            parts[part] += 0 if scales is None else scales.numel() * scales.element_size()
        seen.add(id(module.weight))
    for tensor in [*model.parameters(), *model.buffers()]:
        if id(tensor) not in seen:
            parts["other"] += tensor.numel() * tensor.element_size()
    return {**parts, "total": sum(parts.values())}


def adapter_dtypes(model: torch.nn.Module) -> dict[str, int]:
    """{dtype name: count} of the trainable (adapter) parameters of a trained PEFT model."""
    counts: dict[str, int] = {}
    for name, param in model.named_parameters():
        if "lora_" in name:
            key = str(param.dtype).removeprefix("torch.")
            counts[key] = counts.get(key, 0) + 1
    return counts


# --- Unsloth: the same QLoRA recipe with fused GPU kernels, where it can run -----------------------------

UNSLOTH_PINS = "transformers<=5.17, trl<=1.15, datasets<5"  # unsloth 2026.10.9, checked on this stack


def unsloth_status() -> tuple[bool, str]:
    """(usable, reason): Unsloth needs its package and a CUDA GPU; the reason says what is missing."""
    import importlib.util

    if importlib.util.find_spec("unsloth") is None:
        return False, (
            "the `unsloth` package is not installed: its current release pins "
            f"{UNSLOTH_PINS}, older than this book's stack, so installing it would downgrade the stack"
        )
    if not torch.cuda.is_available():
        return False, (
            "no CUDA GPU: Unsloth's speed comes from Triton kernels that run on NVIDIA GPUs; "
            "on a CPU it falls back to plain Hugging Face training, which is what the peft path runs anyway"
        )
    return True, f"Unsloth is installed and a CUDA GPU is present ({torch.cuda.get_device_name(0)})"


def load_fast(profile: Profile | None = None, role: str = "lora") -> tuple[Any, Any, str]:
    """(model with LoRA adapters, tokenizer, path taken): Unsloth's FastLanguageModel where usable, else peft.

    Both paths load the base in 4-bit NF4 and put rank-r LoRA adapters on every linear; the third item is
    'unsloth' or 'peft', so a caller can never mistake one for the other.
    """
    from peft import get_peft_model

    from ftcourse.profiles import load_tokenizer

    profile = profile or active_profile()
    sizes = run_sizes(profile)
    usable, _ = unsloth_status()
    if usable:
        from unsloth import FastLanguageModel

        model, tokenizer = FastLanguageModel.from_pretrained(
            model_name=resolve_model(role, profile), max_seq_length=sizes["max_length"], load_in_4bit=True
        )
        model = FastLanguageModel.get_peft_model(
            model,
            r=sizes["lora_rank"],
            lora_alpha=sizes["lora_alpha"],
            target_modules=list(DEFAULT_TARGETS),
            use_gradient_checkpointing="unsloth" if sizes["gradient_checkpointing"] else False,
        )
        return model, tokenizer, "unsloth"
    model = load_qlora_model(profile, role)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated")  # as above
        peft_model = get_peft_model(
            model, lora_config(lora_rank=sizes["lora_rank"], lora_alpha=sizes["lora_alpha"])
        )
    return peft_model, load_tokenizer(role, profile), "peft"


def train_fast(
    model: Any,
    tokenizer: Any,
    dataset: Any,
    *,
    profile: Profile | None = None,
    allow_truncation: bool = False,
    **overrides: Any,
) -> TrainingRun:
    """Train the adapters of a model from `load_fast` (either path) with TRL's SFTTrainer; returns the run."""
    profile = profile or active_profile()
    sizes = {**run_sizes(profile), **overrides}
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Paged optimizers are not supported on CPU")
        return train_sft(
            model,
            tokenizer,
            dataset,
            peft_config=None,  # the adapters are already in place
            learning_rate=sizes["learning_rate"],
            steps=sizes["steps"],
            batch_size=sizes["batch_size"],
            gradient_accumulation_steps=sizes["gradient_accumulation_steps"],
            max_length=sizes["max_length"],
            allow_truncation=allow_truncation,
            gradient_checkpointing=False,  # set at load time on both paths
            logging_steps=sizes["logging_steps"],
            copy_model=False,
            profile=profile,
            progress=False,
            extra_args={"optim": OPTIMIZER},
        )
