"""Where the memory goes: a fit-check that models one training step, and a CPU peak-memory probe.

`fit_check("llama-3.1-70b", "qlora", seq_len=2048)` adds up every tensor a training step holds at its
worst moment (weights, 4-bit constants, the k-bit preparation's fp32 upcasts, adapters, gradients,
optimizer states, kept activations, the logits and their loss buffers) and compares the peak with a
device. `method` is how the weights train (full, lora, dora, qlora); `objective` is what TRL's trainer
optimises (sft, dpo, simpo, orpo, kto, reward, grpo), which decides how many sequences go through the
model, whether a reference model or a KV cache is held, and how the loss meets the vocabulary.
The model follows what PyTorch, transformers, peft, TRL and bitsandbytes allocate. Its constants were
fitted to 13 measured H100 steps (sft objective only): agreement with those rows is a fit, not a
validation; `tests/test_memory.py` checks the new terms by hand and against held-out CPU probes.
`python -m ftcourse.memory measure ...` runs real steps on the CPU in a fresh process and prints the
peak resident memory as JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

GIB = 2**30
SPARK_GB = 128.0  # DGX Spark: 128 GB (decimal, as sold) of memory shared by CPU and GPU
# Verdict margin: the CUDA caching allocator holds more than it hands out. In the shared H100 rows
# reserved exceeds allocated by up to ~18% (on a small model); a peak within 85% of the device "fits".
ALLOCATOR_MARGIN = 0.15
CUBLAS_WORKSPACE = 2 * 32 * 2**20  # one 32 MiB cuBLAS workspace per calling thread: forward and autograd
METHODS = ("full", "lora", "dora", "qlora")
# What the step optimises. "sft" is the model's own next-token loss (what the H100 rows measured); the others
# follow TRL 1.16's trainers: see OBJECTIVE_NOTES.
OBJECTIVES = ("sft", "dpo", "simpo", "orpo", "kto", "reward", "grpo")
PAIRED = ("dpo", "simpo", "orpo", "reward")  # chosen and rejected go through the model as one batch
WITH_REFERENCE = ("dpo", "kto")  # the losses compare the policy with a frozen reference
REFERENCES = ("auto", "copy", "adapter-off", "none")
OPTIMIZERS = ("adamw", "adamw-8bit", "paged-adamw", "paged-adamw-8bit")
LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
DTYPE_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}
# How the loss meets the vocabulary. "transformers": the model's own loss (logits, then three fp32 buffers
# over the vocabulary in the backward). "chunked": TRL 1.16's fused LM head (`add_fused_lm_head` in
# trl/trainer/utils.py, used by its SFT, DPO, KTO and GRPO trainers) projects 4096 tokens x 32768 vocabulary
# entries at a time and never holds the whole logits. "materialized": TRL's CPO/ORPO trainers take
# `outputs.logits` whole.
LOSS_KERNELS = ("transformers", "chunked", "materialized", "none")
OBJECTIVE_KERNEL = {
    "sft": "transformers",
    "dpo": "chunked",
    "kto": "chunked",
    "grpo": "chunked",
    "simpo": "materialized",
    "orpo": "materialized",
    "reward": "none",  # a scalar head, no vocabulary projection
}
FUSED_TOKENS, FUSED_VOCAB = 4096, 32768  # trl.kernels.chunked_logprob: TOKEN_CHUNK_SIZE, the vocabulary tile
OBJECTIVE_NOTES = {
    "dpo": "chosen and rejected rows in one batch (2 x batch_size sequences); the reference pass runs under "
    "no_grad after the policy's forward, while the policy's saved activations still exist",
    "simpo": "chosen and rejected rows in one batch; no reference; TRL's CPO trainer holds the whole logits",
    "orpo": "chosen and rejected rows in one batch; no reference; whole logits, plus the chosen half's NLL",
    "kto": "one completion per example, plus a KL batch of mismatched completions scored without gradients "
    "(before the forward), and reference passes over both (after it)",
    "reward": "a scalar head instead of lm_head (no vocabulary logits); chosen and rejected in one batch",
    "grpo": "generation first: a KV cache for batch_size completions (num_generations per prompt) of seq_len "
    "tokens; TRL generates per-device batch x gradient accumulation steps completions at once, so pass that "
    "product as batch_size when accumulating; beta = 0 (TRL's default) keeps no reference",
}
# Memory a device spends before training starts. These are assumptions, not measurements: check yours with
# `free -g` (Spark) or torch.cuda.mem_get_info() and pass reserved_gb.
SPARK_RESERVED_GB = 8.0  # DGX OS with its desktop (~6 GB assumed) and one CUDA context (~1-2 GB assumed)


@dataclass(frozen=True)
class Device:
    """A machine to fit a step into: memory as sold, what is taken before training, and its kernels."""

    name: str
    memory_gb: float  # decimal GB, as sold
    reserved_gb: float  # taken before the step: operating system, CUDA context (an assumption)
    kind: str  # "cuda" or "cpu": which attention kernels and optimizer loop the step uses
    assumption: str


DEVICES: dict[str, Device] = {
    "spark": Device(
        "DGX Spark",
        SPARK_GB,
        SPARK_RESERVED_GB,
        "cuda",
        f"128 GB unified memory shared by CPU and GPU; assumed {SPARK_RESERVED_GB:g} GB taken by the OS, its "
        "desktop and the CUDA context (measure with `free -g`, set --reserved-gb)",
    ),
    "h100": Device(
        "H100 80GB",
        81559 * 2**20 / 1e9,  # 81559 MiB as the driver reports it
        0.5,
        "cuda",
        "81559 MiB of HBM3; assumed 0.5 GB for the CUDA context, outside PyTorch's allocator",
    ),
}


def device_preset(name: str) -> Device:
    """The Device for a preset name ('spark', 'h100')."""
    key = name.strip().lower()
    if key not in DEVICES:
        raise ValueError(f"device: unknown preset {name!r}; known: {', '.join(DEVICES)} (or give device_gb)")
    return DEVICES[key]


@dataclass(frozen=True)
class Architecture:
    """The shapes of a Llama-style decoder that decide its memory."""

    name: str
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    vocab_size: int
    tie_embeddings: bool
    head_dim: int = 0  # 0: hidden_size // num_heads
    qkv_bias: bool = False  # Qwen2 has biases on q, k, v

    @property
    def head_width(self) -> int:
        """Width of one attention head."""
        return self.head_dim or self.hidden_size // self.num_heads

    def linear_shapes(self) -> dict[str, tuple[int, int]]:
        """(out_features, in_features) of each linear projection in one decoder layer."""
        h, i, q, kv = self.hidden_size, self.intermediate_size, self.q_width, self.kv_width
        return {
            "q_proj": (q, h),
            "k_proj": (kv, h),
            "v_proj": (kv, h),
            "o_proj": (h, q),
            "gate_proj": (i, h),
            "up_proj": (i, h),
            "down_proj": (h, i),
        }

    @property
    def q_width(self) -> int:
        """Width of the query projection (heads x head width)."""
        return self.num_heads * self.head_width

    @property
    def kv_width(self) -> int:
        """Width of the key and value projections (key-value heads x head width)."""
        return self.num_kv_heads * self.head_width

    def linear_params(self) -> int:
        """Weights in all decoder-layer linear projections (the ones QLoRA stores in 4 bit)."""
        return self.num_layers * sum(o * i for o, i in self.linear_shapes().values())

    def other_params(self) -> int:
        """Embeddings, lm_head (if untied), norms and biases: the parameters that stay 16- or 32-bit."""
        embeddings = self.vocab_size * self.hidden_size * (1 if self.tie_embeddings else 2)
        norms = (2 * self.num_layers + 1) * self.hidden_size
        biases = self.num_layers * (self.q_width + 2 * self.kv_width) if self.qkv_bias else 0
        return embeddings + norms + biases

    def total_params(self) -> int:
        """All parameters, each counted once."""
        return self.linear_params() + self.other_params()


# Shapes from each model's published config.json.
ARCHITECTURES: dict[str, Architecture] = {
    a.name: a
    for a in (
        Architecture("llama-3.2-1b", 2048, 8192, 16, 32, 8, 128256, True, head_dim=64),
        Architecture("llama-3.2-3b", 3072, 8192, 28, 24, 8, 128256, True, head_dim=128),
        Architecture("llama-3.1-8b", 4096, 14336, 32, 32, 8, 128256, False),
        Architecture("llama-3.1-70b", 8192, 28672, 80, 64, 8, 128256, False),
        Architecture("mistral-7b-v0.3", 4096, 14336, 32, 32, 8, 32768, False),
        Architecture("qwen2.5-7b", 3584, 18944, 28, 28, 4, 152064, False, qkv_bias=True),
    )
}


# Hub names of the models the book names, accepted offline: the Instruct models share the base models' shapes.
HUB_NAMES: dict[str, str] = {
    f"{org}/{prefix}{name}{suffix}".lower(): key
    for key, org, names in (
        ("llama-3.2-1b", "meta-llama", ("Llama-3.2-1B",)),
        ("llama-3.2-3b", "meta-llama", ("Llama-3.2-3B",)),
        ("llama-3.1-8b", "meta-llama", ("Llama-3.1-8B",)),
        ("llama-3.1-70b", "meta-llama", ("Llama-3.1-70B",)),
        ("mistral-7b-v0.3", "mistralai", ("Mistral-7B-v0.3",)),
        ("qwen2.5-7b", "Qwen", ("Qwen2.5-7B",)),
    )
    for name in names
    for prefix in ("", "Meta-")
    for suffix in ("", "-Instruct")
}


def known_name(model: str) -> str | None:
    """The ARCHITECTURES key for a table name or a hub name of a known model, else None."""
    key = model.strip().lower()
    if key in ARCHITECTURES:
        return key
    if key in HUB_NAMES:
        return HUB_NAMES[key]
    bare = key.rsplit("/", 1)[-1].removeprefix("meta-").removesuffix("-instruct")
    return bare if bare in ARCHITECTURES else None


def architecture(model: str | Architecture | Mapping[str, Any] | Any) -> Architecture:
    """The Architecture for a table or hub name, an Architecture, a config dict, or a transformers config."""
    if isinstance(model, Architecture):
        return model
    if isinstance(model, str):
        key = known_name(model)
        if key is None:
            raise ValueError(
                f"model: unknown name {model!r}. Known: {', '.join(ARCHITECTURES)} (hub names "
                "such as 'meta-llama/Llama-3.1-8B-Instruct' too); for another model pass its config.json as "
                "a dict or a transformers config (AutoConfig.from_pretrained(...))."
            )
        return ARCHITECTURES[key]
    config = dict(model) if isinstance(model, Mapping) else model.to_dict()
    needed = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "vocab_size")
    missing = [k for k in needed if not config.get(k)]
    if missing:
        raise ValueError(f"model: the config lacks {missing}; a Llama-style decoder config is needed.")
    heads = int(config["num_attention_heads"])
    return Architecture(
        name=str(config.get("_name_or_path") or config.get("model_type") or "config"),
        hidden_size=int(config["hidden_size"]),
        intermediate_size=int(config["intermediate_size"]),
        num_layers=int(config["num_hidden_layers"]),
        num_heads=heads,
        num_kv_heads=int(config.get("num_key_value_heads") or heads),
        vocab_size=int(config["vocab_size"]),
        tie_embeddings=bool(config.get("tie_word_embeddings", False)),
        head_dim=int(config.get("head_dim") or 0),
        qkv_bias=bool(config.get("attention_bias", False)) or config.get("model_type") == "qwen2",
    )


def dora_magnitude_params(
    model: str | Architecture | Any, targets: str | Sequence[str] = "all-linear"
) -> int:
    """DoRA's magnitude vectors: one number per output row of every adapted linear layer."""
    arch = architecture(model)
    shapes = arch.linear_shapes()
    return arch.num_layers * sum(shapes[t][0] for t in _targets(targets))


def dora_norm_scratch_bytes(
    model: str | Architecture | Any, targets: str | Sequence[str] = "all-linear"
) -> float:
    """fp32 scratch of DoRA's weight norm for the widest adapted layer (peft's dora.py, every forward).

    An in x in identity pushed through A and B, the lora weight, the base weight cast to fp32, its scaled
    update and their sum: in^2 + 4 out*in numbers.
    """
    shapes = architecture(model).linear_shapes()
    return 4.0 * max(i * i + 4 * o * i for o, i in (shapes[t] for t in _targets(targets)))


# Plain words for the table (the keys of MemoryEstimate.parts stay short, for code).
PART_LABELS = {
    "weights": "model weights",
    "reference copy": "frozen reference model (a second copy of the weights)",
    "quantization constants": "4-bit scales (quantization constants)",
    "k-bit fp32 upcasts": "embeddings, norms, lm_head made fp32 by QLoRA's preparation",
    "adapters (fp32)": "adapter weights (fp32)",
    "optimizer states": "AdamW's two running averages (optimizer states)",
    "gradients": "gradients",
    "optimizer temporaries": "scratch of the optimizer step",
    "kept activations": "activations saved for the backward pass",
    "recomputed layer": "one layer's activations, recomputed during backward",
    "logits and loss buffers": "vocabulary-sized logits and loss buffers",
    "no-grad pass": "a forward pass without gradients (reference, KL batch or prompt)",
    "kv cache": "KV cache of the generated completions",
    "dora weight norm": "DoRA's per-layer weight-norm scratch",
    "autocast copies": "16-bit copies of the weights made by autocast",
    "workspace": "cuBLAS scratch space (workspace)",
}
PHASE_LABELS = {
    "loss backward": "the start of the backward pass (loss)",
    "layer backward": "the backward pass through one layer",
    "optimizer step": "the optimizer step",
    "reference forward": "the reference model's forward pass",
    "kl forward": "the KL batch's forward pass",
    "generation": "generation (sampling completions)",
    "forward": "the end of the forward pass",
}


@dataclass
class MemoryEstimate:
    """A fit-check: bytes per component at the step's worst moment, the peak, and a verdict."""

    model: str
    method: str
    settings: dict[str, Any]
    parts: dict[str, float]  # component -> bytes held at the peak moment
    phases: dict[str, float]  # moment of the step -> total bytes then
    device_bytes: float
    params: int  # parameters as PyTorch counts them (a 4-bit matrix counts two per byte)
    trainable: int
    loaded_bytes: float  # after loading
    prepared_bytes: float  # after the PEFT / k-bit preparation
    notes: list[str] = field(default_factory=list)
    objective: str = "sft"
    reserved_bytes: float = 0.0  # taken before the step (OS, CUDA context): an assumption of the device
    device_name: str = ""
    precision: str = ""  # the dtypes the estimate assumes, in words

    @property
    def usable_bytes(self) -> float:
        """Device memory the step can use: the device's memory less what is reserved before it."""
        return self.device_bytes - self.reserved_bytes

    @property
    def peak_bytes(self) -> float:
        """Bytes at the worst moment of the step."""
        return max(self.phases.values())

    @property
    def peak_phase(self) -> str:
        """The moment of the step where the peak happens."""
        return max(self.phases, key=self.phases.get)

    @property
    def peak_gib(self) -> float:
        """The peak in GiB."""
        return self.peak_bytes / GIB

    @property
    def headroom_gib(self) -> float:
        """Usable device memory left at the peak, GiB (negative: does not fit)."""
        return (self.usable_bytes - self.peak_bytes) / GIB

    @property
    def verdict(self) -> str:
        """'fits', 'tight' (within the allocator margin) or 'does not fit', against the usable memory."""
        if self.peak_bytes <= (1 - ALLOCATOR_MARGIN) * self.usable_bytes:
            return "fits"
        return "tight" if self.peak_bytes <= self.usable_bytes else "does not fit"

    def rows(self) -> list[tuple[str, float]]:
        """(component in plain words, GiB) for each non-zero component at the peak, then peak and headroom."""
        rows = [(PART_LABELS.get(name, name), value / GIB) for name, value in self.parts.items() if value > 0]
        return rows + [("peak", self.peak_gib), ("headroom", self.headroom_gib)]

    def table(self) -> str:
        """The breakdown as a plain-text table in GiB (2^30 bytes), with the device and the verdict."""
        rows = self.rows()
        width = max(len(name) for name, _ in rows)
        head = f"{self.model}, {self.method}" + (f", {self.objective}" if self.objective != "sft" else "")
        lines = [head + ": " + ", ".join(f"{k}={v}" for k, v in self.settings.items())]
        if self.precision:
            lines.append(f"  precision: {self.precision}")
        lines += [f"  {name:<{width}}  {_gib_text(gib)} GiB" for name, gib in rows]
        device = self.device_name or "device"
        usable = f"{self.device_bytes / 1e9:.0f} GB = {self.device_bytes / GIB:.1f} GiB"
        if self.reserved_bytes:
            usable += (
                f", less {self.reserved_bytes / 1e9:g} GB reserved: {self.usable_bytes / GIB:.1f} GiB usable"
            )
        lines.append(f"  peak at {PHASE_LABELS.get(self.peak_phase, self.peak_phase)}; {device} {usable}")
        lines.append(f"  verdict: {self.verdict}")
        return "\n".join(lines + [f"  note: {note}" for note in self.notes])


def _gib_text(gib: float) -> str:
    """A GiB figure for the table: two decimals, more for small parts so that none reads 0.00."""
    return f"{gib:9.2f}" if abs(gib) >= 0.01 else f"{gib:9.4f}"


def _check_positive(name: str, value: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ValueError(f"{name} must be a positive whole number, got {value!r}")


def _targets(targets: str | Sequence[str]) -> tuple[str, ...]:
    if targets == "all-linear":
        return LINEARS
    chosen = (targets,) if isinstance(targets, str) else tuple(targets)
    unknown = [t for t in chosen if t not in LINEARS]
    if unknown or not chosen:
        raise ValueError(f"targets: {unknown or 'empty'} not among {LINEARS} (or pass 'all-linear')")
    return chosen


def quantized_bytes(out_features: int, in_features: int, double_quant: bool, blocksize: int = 64) -> float:
    """Bytes of one bitsandbytes 4-bit matrix: packed codes, absmax constants, codebooks."""
    n = out_features * in_features
    blocks = -(-n // blocksize)
    if not double_quant:
        return n / 2 + 4 * blocks + 4 * 16  # fp32 absmax per block, the 16-entry code
    # uint8 absmax per block; fp32 absmax per 256 of those; the 256-entry 8-bit code; the fp32 offset
    return n / 2 + blocks + 4 * -(-blocks // 256) + 4 * 256 + 4 + 4 * 16


def kv_cache_bytes(arch: Architecture, sequences: int, seq_len: int, dtype_bytes: int = 2) -> float:
    """Keys and values of every layer for `sequences` sequences of `seq_len` tokens."""
    return 2.0 * arch.num_layers * arch.kv_width * sequences * seq_len * dtype_bytes


def _reference(objective: str, method: str, reference: str) -> str:
    """Which reference the step keeps: 'copy', 'adapter-off' or 'none' (TRL's choice for 'auto')."""
    if reference not in REFERENCES:
        raise ValueError(f"reference must be one of {REFERENCES}, got {reference!r}")
    if objective not in WITH_REFERENCE:
        if reference not in ("auto", "none"):
            raise ValueError(f"objective {objective!r} uses no reference model; leave reference='auto'")
        return "none"
    if (
        reference == "auto"
    ):  # TRL: with a PEFT model and no ref_model, the reference is the adapter switched off
        return "copy" if method == "full" else "adapter-off"
    if reference == "adapter-off" and method == "full":
        raise ValueError("reference='adapter-off' needs an adapter method (lora, dora, qlora), not 'full'")
    return reference


def resolve_device(
    device: str, device_gb: float | None = None, reserved_gb: float | None = None
) -> tuple[str, str, float, float]:
    """(kernel kind, name, memory GB, reserved GB) for a preset, or for 'cuda'/'cpu' with `device_gb`.

    A preset given another `device_gb` is a different machine: its name and reserve no longer apply.
    """
    if device in DEVICES:
        preset = DEVICES[device]
        if device_gb is None or device_gb == preset.memory_gb:
            reserved = preset.reserved_gb if reserved_gb is None else reserved_gb
            return preset.kind, preset.name, preset.memory_gb, reserved
        kind = preset.kind
    elif device in ("cuda", "cpu"):
        kind = device
    else:
        raise ValueError(f"device must be one of {(*DEVICES, 'cuda', 'cpu')}, got {device!r}")
    memory_gb = SPARK_GB if device_gb is None else device_gb
    return kind, f"{memory_gb:g} GB device", memory_gb, 0.0 if reserved_gb is None else reserved_gb


def _precision_words(method: str, weights_dtype: str, mixed_precision: bool) -> str:
    """The dtypes an estimate assumes, in words."""
    if method == "full" and mixed_precision:
        return (
            f"mixed: fp32 master weights, fp32 gradients and fp32 AdamW moments (16 bytes per parameter), "
            f"{weights_dtype} compute under autocast"
        )
    if method == "full":
        return (
            f"{weights_dtype} weights, {weights_dtype} gradients and {weights_dtype} AdamW moments, no fp32 "
            "master copy (a model loaded in this dtype under a plain Trainer; mixed_precision=True for the "
            "usual fp32 master setup)"
        )
    base = "4-bit NF4" if method == "qlora" else weights_dtype
    return f"{base} frozen base; fp32 adapters, gradients and AdamW moments (as peft keeps them)"


def fit_check(
    model: str | Architecture | Mapping[str, Any] | Any,
    method: str = "qlora",
    *,
    objective: str = "sft",
    seq_len: int = 2048,
    batch_size: int = 1,
    lora_rank: int = 16,
    targets: str | Sequence[str] = "all-linear",
    gradient_checkpointing: bool = True,
    optimizer: str = "adamw",
    device_gb: float | None = None,
    weights_dtype: str = "bf16",
    double_quant: bool = True,
    device: str = "spark",
    keep_logits: bool = True,
    mixed_precision: bool = False,
    reference: str = "auto",
    loss_kernel: str = "auto",
    reserved_gb: float | None = None,
) -> MemoryEstimate:
    """The memory breakdown of one training step and a verdict against a device.

    `method` is how the weights train (full, lora, dora, qlora); `objective` what the step optimises (sft,
    dpo, simpo, orpo, kto, reward, grpo). `device` is a preset of DEVICES ('spark', 'h100') or 'cuda'/'cpu'
    with `device_gb` (decimal GB); `reserved_gb` is what the OS and CUDA context take before training.
    """
    arch = architecture(model)
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if objective not in OBJECTIVES:
        raise ValueError(f"objective must be one of {OBJECTIVES}, got {objective!r}")
    if optimizer not in OPTIMIZERS:
        raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {optimizer!r}")
    if weights_dtype not in DTYPE_BYTES:
        raise ValueError(f"weights_dtype must be one of {sorted(DTYPE_BYTES)}, got {weights_dtype!r}")
    kind, device_name, device_gb, reserved_gb = resolve_device(device, device_gb, reserved_gb)
    for name, value in (("seq_len", seq_len), ("batch_size", batch_size), ("lora_rank", lora_rank)):
        _check_positive(name, value)
    if not device_gb > 0:
        raise ValueError(f"device_gb must be positive, got {device_gb!r}")
    if not 0 <= reserved_gb < device_gb:
        raise ValueError(
            f"reserved_gb must be at least 0 and below device_gb ({device_gb:g}), got {reserved_gb!r}"
        )
    kernel_name = OBJECTIVE_KERNEL[objective] if loss_kernel == "auto" else loss_kernel
    if kernel_name not in LOSS_KERNELS:
        raise ValueError(f"loss_kernel must be 'auto' or one of {LOSS_KERNELS}, got {loss_kernel!r}")
    if (kernel_name == "none") != (objective == "reward"):
        raise ValueError("loss_kernel 'none' (no vocabulary projection) goes with objective='reward' only")
    ref = _reference(objective, method, reference)
    adapted = _targets(targets) if method != "full" else ()
    w = DTYPE_BYTES[weights_dtype]
    h, v, layers = arch.hidden_size, arch.vocab_size, arch.num_layers
    rows_per_example = 2 if objective in PAIRED else 1
    sequences = batch_size * rows_per_example  # rows through the model in one forward
    tokens = sequences * seq_len
    shapes = arch.linear_shapes()
    notes: list[str] = [OBJECTIVE_NOTES[objective]] if objective in OBJECTIVE_NOTES else []

    # Parameters outside the decoder's linear layers. A reward model swaps lm_head for a scalar head.
    other = arch.other_params()
    if objective == "reward":
        other += h - (0 if arch.tie_embeddings else v * h)
    total = arch.linear_params() + other

    # Weights as loaded, then what the preparation adds.
    master = 4 if method == "full" and mixed_precision else w  # bytes of each trained weight as stored
    if method == "qlora":
        linear_bytes = layers * sum(quantized_bytes(o, i, double_quant) for o, i in shapes.values())
        weights = arch.linear_params() / 2  # two 4-bit codes per byte
        constants = linear_bytes - weights
        # prepare_model_for_kbit_training casts every non-4-bit parameter (embeddings, norms, lm_head)
        # to fp32.
        upcast = other * (4 - w)
        weights += other * w
        params = arch.linear_params() // 2 + other
    else:
        weights, constants, upcast = total * master, 0.0, 0.0
        params = total
    adapter_params = layers * sum(lora_rank * sum(shapes[t]) for t in adapted)
    magnitudes = dora_magnitude_params(arch, targets) if method == "dora" else 0
    trainable = total if method == "full" else adapter_params + magnitudes
    adapters = 4.0 * (adapter_params + magnitudes)  # peft keeps adapters (and DoRA's magnitudes) in fp32
    train_bytes = master if method == "full" else 4  # dtype of the trainable tensors
    gradients = trainable * train_bytes
    if optimizer.endswith("8bit"):
        states = trainable * (2 + 2 * 4 / 256)  # two uint8 states, fp32 absmax per 256 values each
        optimizer_temp = 0.0  # fused kernel
    else:
        states = trainable * 2 * train_bytes  # exp_avg and exp_avg_sq in the trained parameters' dtype
        if kind == "cuda":  # foreach AdamW: sqrt(exp_avg_sq) for every parameter at once
            optimizer_temp = trainable * train_bytes
        else:  # per-parameter loop: sqrt and the divided copy of the largest tensor
            if method == "full":
                largest = max(v * h, *(o * i for o, i in shapes.values()))
            else:
                largest = lora_rank * max(max(shapes[t]) for t in adapted)
            optimizer_temp = 2 * train_bytes * largest
    if optimizer.startswith("paged"):
        notes.append(
            "paged optimizer states may move to host memory under pressure; on a DGX Spark host "
            "and GPU share the same memory, so paging frees nothing there"
        )
    # Mixed precision: autocast's 16-bit copies of the weights are saved for the backward pass.
    autocast_copies = total * w if method == "full" and mixed_precision else 0.0
    reference_copy = (weights + constants) if ref == "copy" else 0.0  # frozen, in the loaded dtype
    if method == "full" and mixed_precision and ref == "copy":
        reference_copy = total * w  # the reference needs no fp32 master copy

    # Activations. The residual stream takes the embedding's dtype: fp32 after the k-bit upcast.
    act = 4 if method == "qlora" else w
    trainable_linear = {t: method == "full" or t in adapted for t in LINEARS}
    fp32_lora_input = 4 if method != "full" and act != 4 else 0  # peft casts a 16-bit input to fp32 for A
    q, kv, i_size = arch.q_width, arch.kv_width, arch.intermediate_size
    gqa = arch.num_kv_heads < arch.num_heads
    attention = "flash" if act == 2 or kind == "cpu" else ("math" if gqa else "efficient")
    per_token = {  # elements per token one decoder layer saves for backward, excluding its input
        "attention norm out": h * any(trainable_linear[t] for t in ("q_proj", "k_proj", "v_proj")),
        "q, k, v after RoPE": q + 2 * (q if attention == "math" else kv),
        "attention out": q * (attention != "math") + q * trainable_linear["o_proj"],
        "mid residual": h,
        "mlp norm out": h * (trainable_linear["gate_proj"] or trainable_linear["up_proj"]),
        "gate, up, silu": 3 * i_size,
        "mlp product": i_size * trainable_linear["down_proj"],
        "lora A outputs": lora_rank * len(adapted),
        "norm inputs (full)": 2 * h * (method == "full"),
    }
    layer_bytes = tokens * act * sum(per_token.values())
    layer_bytes += tokens * fp32_lora_input * sum(shapes[t][1] for t in adapted)
    if (
        method == "dora"
    ):  # (m/|W'| - 1) * base_out + (m/|W'|) * lora_out saves both outputs (base dtype, fp32)
        layer_bytes += tokens * (act + 4) * sum(shapes[t][0] for t in adapted)
    scores = sequences * arch.num_heads * seq_len**2 * 4 if attention == "math" else 0.0
    layer_bytes += scores  # the math kernel saves the softmax over every query-key pair
    dequant = 2 * max(o * i for o, i in shapes.values()) if method == "qlora" else 0.0
    layer_transient = max(3 * tokens * i_size * act + dequant, 2 * scores)
    dora_norm = dora_norm_scratch_bytes(arch, targets) if method == "dora" else 0.0
    layer_input = tokens * h * act
    if gradient_checkpointing:
        kept = layers * layer_input  # each layer's input, recomputed from in backward
        recomputed = layer_bytes
    else:
        kept = layers * (layer_input + layer_bytes)
        recomputed = 0.0
    kept += 3 * tokens * h * act  # final norm: input, normalised copy, lm_head input

    # The loss over the vocabulary.
    logit_bytes = 4 if method == "qlora" else w  # lm_head's output dtype (fp32 after the k-bit upcast)
    kernel_tile = min(tokens, FUSED_TOKENS) * min(v, FUSED_VOCAB) * act
    if kernel_name == "transformers":  # logits, then fp32 log-softmax, its gradient and the outgoing gradient
        held_logits = tokens * v * logit_bytes if keep_logits else 0.0
        loss_buffers = 3 * tokens * v * 4
    elif kernel_name == "chunked":  # one tile of logits at a time; fp32 gradient of the hidden states
        held_logits = 0.0
        loss_buffers = kernel_tile + tokens * h * 4 + (v * h * 4 if method == "full" else 0.0)
    elif kernel_name == "materialized":  # whole logits; their gradient and the log-softmax's saved output
        held_logits = tokens * v * logit_bytes
        loss_buffers = 2 * tokens * v * logit_bytes
        if objective == "orpo":  # the chosen half's NLL: a contiguous copy and its log-softmax
            loss_buffers += 2 * (tokens / 2) * v * logit_bytes
    else:  # a scalar head: one number per token
        held_logits, loss_buffers = 0.0, tokens * 4.0
    workspace = CUBLAS_WORKSPACE if kind == "cuda" else 0.0

    def nograd_pass(rows: int) -> float:
        """Working set of a forward without gradients over `rows` sequences: one layer at a time."""
        t = rows * seq_len
        layer = 3 * t * i_size * act + dequant + (rows * arch.num_heads * seq_len**2 * 4 if scores else 0)
        return 2 * t * h * act + layer + min(t, FUSED_TOKENS) * min(v, FUSED_VOCAB) * act + dora_norm

    resident = weights + constants + upcast + adapters + states + workspace + reference_copy
    head_grads = 0.0  # full fine-tuning: lm_head's and the final norm's gradients exist from here on
    if method == "full":
        head = h if objective == "reward" else (0 if arch.tie_embeddings else v * h)
        head_grads = (head + h) * train_bytes
    phases = {
        "loss backward": resident + autocast_copies + kept + held_logits + loss_buffers,
        "layer backward": resident
        + autocast_copies
        + head_grads
        + kept
        + recomputed
        + max(layer_transient, dora_norm if gradient_checkpointing else 0.0)
        + held_logits,
        "optimizer step": resident
        + gradients
        + optimizer_temp
        + (held_logits if kernel_name == "transformers" else 0.0),
    }
    if dora_norm and not gradient_checkpointing:  # the last layer's weight norm, on top of every saved tensor
        phases["forward"] = resident + autocast_copies + kept - 3 * tokens * h * act + dora_norm
    no_grad = 0.0
    if ref != "none":  # after the policy's forward: its saved activations are still there
        no_grad = nograd_pass(sequences)
        phases["reference forward"] = resident + autocast_copies + kept + held_logits + no_grad
    if objective == "kto":  # the KL batch, scored without gradients before the policy's forward
        phases["kl forward"] = resident + nograd_pass(batch_size)
    kv_cache = 0.0
    if objective == "grpo":  # sampling the completions: the KV cache grows to the full length
        kv_cache = kv_cache_bytes(arch, batch_size, seq_len, act)
        phases["generation"] = resident + kv_cache + nograd_pass(batch_size) - kernel_tile
    peak_phase = max(phases, key=phases.get)
    at_backward = peak_phase in ("loss backward", "layer backward", "reference forward", "forward")
    holds_logits = peak_phase in ("loss backward", "layer backward", "reference forward") or (
        peak_phase == "optimizer step" and kernel_name == "transformers"
    )
    parts = {
        "weights": weights,
        "reference copy": reference_copy,
        "quantization constants": constants,
        "k-bit fp32 upcasts": upcast,
        "adapters (fp32)": adapters,
        "optimizer states": states,
        "gradients": {"optimizer step": gradients, "layer backward": head_grads}.get(peak_phase, 0.0),
        "optimizer temporaries": optimizer_temp if peak_phase == "optimizer step" else 0.0,
        "autocast copies": autocast_copies if at_backward else 0.0,
        "kept activations": kept if at_backward else 0.0,
        "recomputed layer": (recomputed + max(layer_transient, dora_norm if gradient_checkpointing else 0.0))
        if peak_phase == "layer backward"
        else 0.0,
        "dora weight norm": dora_norm if peak_phase == "forward" else 0.0,
        "no-grad pass": no_grad if peak_phase == "reference forward" else 0.0,
        "kv cache": kv_cache if peak_phase == "generation" else 0.0,
        "logits and loss buffers": (held_logits if holds_logits else 0.0)
        + (loss_buffers if peak_phase == "loss backward" else 0.0),
        "workspace": workspace,
    }
    if peak_phase == "forward":
        parts["kept activations"] = kept - 3 * tokens * h * act
    if peak_phase == "kl forward":
        parts["no-grad pass"] = nograd_pass(batch_size)
    if peak_phase == "generation":
        parts["no-grad pass"] = nograd_pass(batch_size) - kernel_tile
    settings = {
        "objective": objective if objective != "sft" else None,
        "seq_len": seq_len,
        "batch_size": batch_size,
        "lora_rank": lora_rank if method != "full" else None,
        "gradient_checkpointing": gradient_checkpointing,
        "optimizer": optimizer,
        "device": device,
        "reference": ref if objective in WITH_REFERENCE else None,
        "loss": kernel_name if kernel_name != OBJECTIVE_KERNEL[objective] else None,
    }
    loaded = weights + constants
    return MemoryEstimate(
        model=arch.name,
        method=method,
        settings={k: s for k, s in settings.items() if s is not None},
        parts=parts,
        phases=phases,
        device_bytes=device_gb * 1e9,
        params=params,
        trainable=trainable,
        loaded_bytes=loaded,
        prepared_bytes=loaded + upcast + adapters,
        notes=notes,
        objective=objective,
        reserved_bytes=reserved_gb * 1e9,
        device_name=device_name,
        precision=_precision_words(method, weights_dtype, mixed_precision),
    )


def load_measurements(path: str | os.PathLike) -> list[dict[str, Any]]:
    """Rows of a JSON-lines measurement file (such as benchmarks/results/*.jsonl), one dict per line."""
    rows = []
    with open(path) as handle:
        for number, line in enumerate(handle, 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as error:
                    raise ValueError(f"{path}, line {number}: not JSON ({error.msg})") from error
    return rows


def compare(rows: Sequence[Mapping[str, Any]], **settings: Any) -> list[dict[str, Any]]:
    """Each measured row beside fit_check's estimate for its settings: peak, error, the peak's moment."""
    table = []
    for row in rows:
        objective = row.get("objective", "sft")
        estimate = fit_check(
            row["model"],
            row["method"],
            objective=objective,
            seq_len=row["seq"],
            lora_rank=row["rank"],
            **settings,
        )
        table.append(
            {
                "model": row["model"],
                "method": row["method"] + ("" if objective == "sft" else f" {objective}"),
                "seq_len": row["seq"],
                "measured GiB": row["peak_alloc_gib"],
                "estimate GiB": round(estimate.peak_gib, 2),
                "error %": round(100 * (estimate.peak_gib / row["peak_alloc_gib"] - 1), 1) + 0.0,  # no "-0.0"
                "peak at": estimate.peak_phase,
            }
        )
    return table


# --- the CPU probe: real steps in a fresh process, peak resident memory ---------------------------------


# Small configurations the memory chapter measures on the CPU: the embedded model's shapes and a wider
# random-init Llama with a 16k vocabulary. One or two steps each, a few seconds of CPU per probe.
MID_LLAMA = {
    "hidden_size": 384,
    "intermediate_size": 1024,
    "num_hidden_layers": 4,
    "num_attention_heads": 6,
    "num_key_value_heads": 2,
    "head_dim": 64,
    "vocab_size": 16000,
    "tie_word_embeddings": False,
}
CPU_PROBES = (
    {
        "config": "embedded",
        "method": "full",
        "seq_len": 256,
        "batch_size": 8,
        "gradient_checkpointing": False,
    },
    {"config": "mid", "method": "full", "seq_len": 256, "batch_size": 2, "gradient_checkpointing": False},
    {"config": "mid", "method": "lora", "seq_len": 256, "batch_size": 2, "gradient_checkpointing": True},
    # Held out: LoRA and DoRA without checkpointing, where DoRA's saved outputs show (no DoRA row was fitted).
    {"config": "mid", "method": "lora", "seq_len": 256, "batch_size": 2, "gradient_checkpointing": False},
    {"config": "mid", "method": "dora", "seq_len": 256, "batch_size": 2, "gradient_checkpointing": False},
)
# How many of CPU_PROBES a chapter runs: all, or under FTCOURSE_SIZES=minimal (a smoke test of the code
# path) the first, since each probe is a fresh Python process that imports torch, transformers and peft.
RUN_SIZES = {
    "cpu": {"probes": len(CPU_PROBES)},
    "spark": {"probes": len(CPU_PROBES)},
    "minimal": {"probes": 1},
}


def cpu_probes(profile: Any = None) -> tuple[dict[str, Any], ...]:
    """The CPU probes the memory chapter measures under the profile (default: the active one)."""
    from ftcourse import profiles  # here, not at the top: the fit-check command line needs no torch

    return CPU_PROBES[: profiles.run_sizes(RUN_SIZES, profile)["probes"]]


def probe_config(name: str) -> dict[str, Any]:
    """LlamaConfig fields for a CPU probe: 'embedded' (the shipped model's shapes) or 'mid'."""
    if name == "mid":
        return dict(MID_LLAMA)
    if name != "embedded":
        raise ValueError(f"probe config must be 'embedded' or 'mid', got {name!r}")
    from ftcourse.toy import model_dir

    with open(model_dir() / "config.json") as handle:
        config = json.load(handle)
    return {k: config[k] for k in (*MID_LLAMA,) if k in config}


def _status_kib(field_name: str) -> int:
    """A memory figure of this process from /proc/self/status (VmRSS now, VmHWM peak), in KiB."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field_name + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field_name} line; memory is measured on Linux only")


def rss_mib() -> float:
    """Resident memory of this process now, in MiB."""
    return _status_kib("VmRSS") / 1024


def reset_peak_rss() -> None:
    """Reset this process's peak-resident-memory counter (Linux: write 5 to /proc/self/clear_refs)."""
    with open("/proc/self/clear_refs", "w") as clear_refs:
        clear_refs.write("5")


def peak_rss_mib() -> float:
    """Peak resident memory of this process since start or the last `reset_peak_rss`, in MiB."""
    return _status_kib("VmHWM") / 1024


def measure_here(
    config: Mapping[str, Any],
    method: str,
    *,
    seq_len: int,
    batch_size: int = 1,
    lora_rank: int = 16,
    gradient_checkpointing: bool = True,
    steps: int = 2,
) -> dict[str, Any]:
    """Run `steps` training steps of a random-init fp32 Llama in this process; peak RSS above baseline."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    if method not in ("full", "lora", "dora"):
        raise ValueError(f"the CPU probe measures 'full', 'lora' or 'dora', got {method!r}")
    torch.manual_seed(0)
    reset_peak_rss()  # the peak of importing the libraries is not the step's
    baseline = int(rss_mib() * 2**20)
    model = LlamaForCausalLM(LlamaConfig(**config, use_cache=False))
    model.config._attn_implementation = "sdpa"
    if method in ("lora", "dora"):
        lora = LoraConfig(
            r=lora_rank,
            lora_alpha=2 * lora_rank,
            lora_dropout=0.0,
            target_modules=list(LINEARS),
            use_dora=method == "dora",
        )
        model = get_peft_model(model, lora)
    if gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if method != "full":
            model.enable_input_require_grads()
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    ids = torch.randint(0, int(config["vocab_size"]), (batch_size, seq_len))
    for _ in range(steps):
        out = model(input_ids=ids, labels=ids)
        out.loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        loss = float(out.loss)
    peak = int(peak_rss_mib() * 2**20)
    return {
        "method": method,
        "seq_len": seq_len,
        "batch_size": batch_size,
        "lora_rank": lora_rank,
        "gradient_checkpointing": gradient_checkpointing,
        "steps": steps,
        "loss": round(loss, 3),
        "baseline_bytes": baseline,
        "peak_rss_bytes": peak,
        "peak_above_baseline_bytes": peak - baseline,
    }


def measure(
    config: Mapping[str, Any],
    method: str,
    *,
    seq_len: int,
    batch_size: int = 1,
    lora_rank: int = 16,
    gradient_checkpointing: bool = True,
    steps: int = 2,
    timeout_s: float = 300,
) -> dict[str, Any]:
    """`measure_here` in a fresh Python process (a process keeps memory it freed), returned as a dict."""
    command = [
        sys.executable,
        "-m",
        "ftcourse.memory",
        "measure",
        "--config",
        json.dumps(dict(config)),
        "--method",
        method,
        "--seq-len",
        str(seq_len),
        "--batch-size",
        str(batch_size),
        "--lora-rank",
        str(lora_rank),
        "--steps",
        str(steps),
    ]
    if not gradient_checkpointing:
        command.append("--no-gradient-checkpointing")
    # Large blocks straight from mmap and back on free, so resident memory follows live tensors.
    env = {
        **os.environ,
        "MALLOC_MMAP_THRESHOLD_": "65536",
        "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"),
    }
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=timeout_s, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"the memory probe failed (exit {done.returncode}): {done.stderr.strip()[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


# --- command line ----------------------------------------------------------------------------------------


def add_fit_check_arguments(parser: argparse.ArgumentParser) -> None:
    """The arguments of `ftcourse fit-check`."""
    parser.add_argument(
        "model",
        nargs="?",
        help=f"one of {', '.join(ARCHITECTURES)}, a hub name of one of them (such as "
        "meta-llama/Llama-3.1-8B-Instruct), or a folder with config.json; for other models see --config",
    )
    parser.add_argument(
        "--config",
        metavar="FOLDER",
        help="a folder holding the model's config.json (or the file itself): any Llama-style model, offline",
    )
    parser.add_argument("--method", choices=METHODS, default="qlora", help="how the weights train")
    parser.add_argument(
        "--objective", choices=OBJECTIVES, default="sft", help="what the step optimises (TRL's trainers)"
    )
    parser.add_argument(
        "--reference",
        choices=REFERENCES,
        default="auto",
        help="DPO/KTO reference: auto = a frozen copy for full fine-tuning, else the adapter switched off",
    )
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--batch-size", type=int, default=1, help="examples per step (pairs for DPO-like)")
    parser.add_argument("--lora-rank", type=int, default=16)
    parser.add_argument(
        "--targets", default="all-linear", help="'all-linear' or a comma list such as q_proj,v_proj"
    )
    parser.add_argument("--no-gradient-checkpointing", action="store_true")
    parser.add_argument("--optimizer", choices=OPTIMIZERS, default="adamw")
    parser.add_argument("--weights-dtype", choices=sorted(DTYPE_BYTES), default="bf16")
    parser.add_argument(
        "--mixed-precision",
        action="store_true",
        help="full fine-tuning with fp32 master weights, gradients and AdamW moments (16 bytes a parameter)",
    )
    parser.add_argument("--no-double-quant", action="store_true")
    parser.add_argument(
        "--device",
        choices=(*DEVICES, "cuda", "cpu"),
        default="spark",
        help="; ".join(f"{k}: {d.assumption}" for k, d in DEVICES.items()).replace("%", "%%")
        + "; cuda/cpu: give --device-gb",
    )
    parser.add_argument("--device-gb", type=float, help="device memory, decimal GB (overrides the preset)")
    parser.add_argument(
        "--reserved-gb", type=float, help="memory taken before training (OS, CUDA context), decimal GB"
    )


def add_fit_check_command(commands: Any) -> None:
    """The `ftcourse fit-check` sub-command (registered in cli.SUBCOMMANDS)."""
    parser = commands.add_parser("fit-check", help="will a training step fit? a memory breakdown")
    add_fit_check_arguments(parser)
    parser.set_defaults(run=run_fit_check)


def _cli_model(args: argparse.Namespace) -> Any:
    """The model a fit-check command line names: a known name, or a config.json from a folder or a file."""
    source = args.config or (args.model if args.model and os.path.isdir(args.model) else None)
    if source is None:
        if not args.model:
            raise ValueError("name a model (such as llama-3.1-8b) or give --config FOLDER")
        if known_name(args.model) is None:
            raise ValueError(
                f"unknown model {args.model!r}. Known names: {', '.join(ARCHITECTURES)}, and their hub names "
                "(meta-llama/Llama-3.1-8B-Instruct, ...). For any other model, download only its config.json "
                "and pass --config FOLDER (the folder that holds it); nothing is fetched from the network."
            )
        return args.model
    path = os.path.join(source, "config.json") if os.path.isdir(source) else source
    if not os.path.isfile(path):
        raise ValueError(f"--config {source!r}: no config.json there; give the folder that holds it")
    with open(path) as handle:
        return json.load(handle)


def run_fit_check(args: argparse.Namespace) -> int:
    """Print the fit-check table for parsed arguments; exit status 0 if it fits, 1 if not, 2 on bad input."""
    try:
        targets = (
            args.targets if args.targets == "all-linear" else [t.strip() for t in args.targets.split(",")]
        )
        estimate = fit_check(
            _cli_model(args),
            args.method,
            objective=args.objective,
            reference=args.reference,
            seq_len=args.seq_len,
            batch_size=args.batch_size,
            lora_rank=args.lora_rank,
            targets=targets,
            gradient_checkpointing=not args.no_gradient_checkpointing,
            optimizer=args.optimizer,
            device=args.device,
            device_gb=args.device_gb,
            reserved_gb=args.reserved_gb,
            weights_dtype=args.weights_dtype,
            mixed_precision=args.mixed_precision,
            double_quant=not args.no_double_quant,
        )
    except (ValueError, OSError) as error:
        print(f"ftcourse fit-check: {error}", file=sys.stderr)
        return 2
    print(estimate.table())
    return 0 if estimate.verdict != "does not fit" else 1


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m ftcourse.memory measure|fit-check ...`."""
    parser = argparse.ArgumentParser(prog="python -m ftcourse.memory")
    commands = parser.add_subparsers(dest="command", required=True)
    add_fit_check_arguments(commands.add_parser("fit-check", help="estimate a training step's peak memory"))
    probe = commands.add_parser("measure", help="measure real CPU training steps in this process")
    probe.add_argument("--config", required=True, help="LlamaConfig fields as JSON")
    probe.add_argument("--method", choices=("full", "lora", "dora"), required=True)
    probe.add_argument("--seq-len", type=int, required=True)
    probe.add_argument("--batch-size", type=int, default=1)
    probe.add_argument("--lora-rank", type=int, default=16)
    probe.add_argument("--steps", type=int, default=2)
    probe.add_argument("--no-gradient-checkpointing", action="store_true")
    args = parser.parse_args(argv)
    if args.command == "fit-check":
        return run_fit_check(args)
    result = measure_here(
        json.loads(args.config),
        args.method,
        seq_len=args.seq_len,
        batch_size=args.batch_size,
        lora_rank=args.lora_rank,
        gradient_checkpointing=not args.no_gradient_checkpointing,
        steps=args.steps,
    )
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
