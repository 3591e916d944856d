"""Where the memory goes: a fit-check that models one training step, and a CPU peak-memory probe.

`fit_check("llama-3.1-70b", "qlora", seq_len=2048)` adds up every tensor a training step holds at its
worst moment (weights, 4-bit constants, the k-bit preparation's fp32 upcasts, adapters, gradients,
optimizer states, kept activations, the fp32 logits and their loss buffers) and compares the peak with a
device. The model follows what PyTorch, transformers, peft and bitsandbytes actually allocate; the
peaks it predicts are checked against measured GPU steps in `tests/test_memory.py`.
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
METHODS = ("full", "lora", "qlora")
OPTIMIZERS = ("adamw", "adamw-8bit", "paged-adamw", "paged-adamw-8bit")
LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
DTYPE_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}


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


def architecture(model: str | Architecture | Mapping[str, Any] | Any) -> Architecture:
    """The Architecture for a table name, an Architecture, a config dict, or a transformers config."""
    if isinstance(model, Architecture):
        return model
    if isinstance(model, str):
        key = model.strip().lower()
        if key not in ARCHITECTURES:
            raise ValueError(
                f"model: unknown name {model!r}. Known: {', '.join(ARCHITECTURES)}; "
                "or pass a transformers config (AutoConfig.from_pretrained(...)) or its dict."
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
        """Device memory left at the peak, GiB (negative: does not fit)."""
        return (self.device_bytes - self.peak_bytes) / GIB

    @property
    def verdict(self) -> str:
        """'fits', 'tight' (within the allocator margin) or 'does not fit'."""
        if self.peak_bytes <= (1 - ALLOCATOR_MARGIN) * self.device_bytes:
            return "fits"
        return "tight" if self.peak_bytes <= self.device_bytes else "does not fit"

    def rows(self) -> list[tuple[str, float]]:
        """(component, GiB) at the peak moment, then the peak and the headroom."""
        rows = [(name, value / GIB) for name, value in self.parts.items()]
        return rows + [("peak", self.peak_gib), ("headroom", self.headroom_gib)]

    def table(self) -> str:
        """The breakdown as a plain-text table, with the verdict."""
        width = max(len(name) for name, _ in self.rows())
        lines = [f"{self.model}, {self.method}: " + ", ".join(f"{k}={v}" for k, v in self.settings.items())]
        lines += [f"  {name:<{width}}  {gib:9.2f} GiB" for name, gib in self.rows()]
        lines.append(
            f"  peak at: {self.peak_phase}; device {self.device_bytes / GIB:.1f} GiB: {self.verdict}"
        )
        return "\n".join(lines + [f"  note: {note}" for note in self.notes])


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


def fit_check(
    model: str | Architecture | Mapping[str, Any] | Any,
    method: str = "qlora",
    *,
    seq_len: int = 2048,
    batch_size: int = 1,
    lora_rank: int = 16,
    targets: str | Sequence[str] = "all-linear",
    gradient_checkpointing: bool = True,
    optimizer: str = "adamw",
    device_gb: float = SPARK_GB,
    weights_dtype: str = "bf16",
    double_quant: bool = True,
    device: str = "cuda",
    keep_logits: bool = True,
) -> MemoryEstimate:
    """The memory breakdown of one training step and a verdict against `device_gb` (decimal GB)."""
    arch = architecture(model)
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if optimizer not in OPTIMIZERS:
        raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {optimizer!r}")
    if weights_dtype not in DTYPE_BYTES:
        raise ValueError(f"weights_dtype must be one of {sorted(DTYPE_BYTES)}, got {weights_dtype!r}")
    if device not in ("cuda", "cpu"):
        raise ValueError(f"device must be 'cuda' or 'cpu', got {device!r}")
    for name, value in (("seq_len", seq_len), ("batch_size", batch_size), ("lora_rank", lora_rank)):
        _check_positive(name, value)
    if not device_gb > 0:
        raise ValueError(f"device_gb must be positive, got {device_gb!r}")
    adapted = _targets(targets) if method != "full" else ()
    w = DTYPE_BYTES[weights_dtype]
    h, v, layers, tokens = arch.hidden_size, arch.vocab_size, arch.num_layers, batch_size * seq_len
    shapes = arch.linear_shapes()
    notes: list[str] = []

    # Weights as loaded, then what the preparation adds.
    if method == "qlora":
        linear_bytes = layers * sum(quantized_bytes(o, i, double_quant) for o, i in shapes.values())
        weights = arch.linear_params() / 2  # two 4-bit codes per byte
        constants = linear_bytes - weights
        # prepare_model_for_kbit_training casts every non-4-bit parameter (embeddings, norms, lm_head)
        # to fp32.
        upcast = arch.other_params() * (4 - w)
        weights += arch.other_params() * w
        params = arch.linear_params() // 2 + arch.other_params()
    else:
        weights, constants, upcast = arch.total_params() * w, 0.0, 0.0
        params = arch.total_params()
    adapter_params = layers * sum(lora_rank * sum(shapes[t]) for t in adapted)
    trainable = arch.total_params() if method == "full" else adapter_params
    adapters = 4.0 * adapter_params  # peft keeps adapters in fp32
    train_bytes = w if method == "full" else 4  # dtype of the trainable tensors
    gradients = trainable * train_bytes
    if optimizer.endswith("8bit"):
        states = trainable * (2 + 2 * 4 / 256)  # two uint8 states, fp32 absmax per 256 values each
        optimizer_temp = 0.0  # fused kernel
    else:
        states = trainable * 2 * train_bytes  # exp_avg and exp_avg_sq in the parameters' dtype
        if device == "cuda":  # foreach AdamW: sqrt(exp_avg_sq) for every parameter at once
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

    # Activations. The residual stream takes the embedding's dtype: fp32 after the k-bit upcast.
    act = 4 if method == "qlora" else w
    trainable_linear = {t: method == "full" or t in adapted for t in LINEARS}
    fp32_lora_input = 4 if method != "full" and act != 4 else 0  # peft casts a 16-bit input to fp32 for A
    q, kv, i_size = arch.q_width, arch.kv_width, arch.intermediate_size
    gqa = arch.num_kv_heads < arch.num_heads
    kernel = "flash" if act == 2 or device == "cpu" else ("math" if gqa else "efficient")
    per_token = {  # elements per token one decoder layer saves for backward, excluding its input
        "attention norm out": h * any(trainable_linear[t] for t in ("q_proj", "k_proj", "v_proj")),
        "q, k, v after RoPE": q + 2 * (q if kernel == "math" else kv),
        "attention out": q * (kernel != "math") + q * trainable_linear["o_proj"],
        "mid residual": h,
        "mlp norm out": h * (trainable_linear["gate_proj"] or trainable_linear["up_proj"]),
        "gate, up, silu": 3 * i_size,
        "mlp product": i_size * trainable_linear["down_proj"],
        "lora A outputs": lora_rank * len(adapted),
        "norm inputs (full)": 2 * h * (method == "full"),
    }
    layer_bytes = tokens * act * sum(per_token.values())
    layer_bytes += tokens * fp32_lora_input * sum(shapes[t][1] for t in adapted)
    scores = batch_size * arch.num_heads * seq_len**2 * 4 if kernel == "math" else 0.0
    layer_bytes += scores  # the math kernel saves the softmax over every query-key pair
    dequant = 2 * max(o * i for o, i in shapes.values()) if method == "qlora" else 0.0
    layer_transient = max(3 * tokens * i_size * act + dequant, 2 * scores)
    layer_input = tokens * h * act
    if gradient_checkpointing:
        kept = layers * layer_input  # each layer's input, recomputed from in backward
        recomputed = layer_bytes
    else:
        kept = layers * (layer_input + layer_bytes)
        recomputed = 0.0
    kept += 3 * tokens * h * act  # final norm: input, normalised copy, lm_head input

    # Logits: lm_head output in its weight's dtype, then fp32 for the loss. In backward the saved
    # log-softmax, its incoming gradient and the outgoing gradient are all fp32 over the vocabulary.
    logit_bytes = 4 if method == "qlora" else w
    held_logits = tokens * v * logit_bytes if keep_logits else 0.0
    loss_buffers = 3 * tokens * v * 4
    workspace = CUBLAS_WORKSPACE if device == "cuda" else 0.0

    resident = weights + constants + upcast + adapters + states + workspace
    head_grads = 0.0  # full fine-tuning: lm_head's and the final norm's gradients exist from here on
    if method == "full":
        head_grads = (0 if arch.tie_embeddings else v * h * w) + h * w
    phases = {
        "loss backward": resident + kept + held_logits + loss_buffers,
        "layer backward": resident + head_grads + kept + recomputed + layer_transient + held_logits,
        "optimizer step": resident + gradients + optimizer_temp + held_logits,
    }
    peak_phase = max(phases, key=phases.get)
    parts = {
        "weights": weights,
        "quantization constants": constants,
        "k-bit fp32 upcasts": upcast,
        "adapters (fp32)": adapters,
        "optimizer states": states,
        "gradients": {"optimizer step": gradients, "layer backward": head_grads}.get(peak_phase, 0.0),
        "optimizer temporaries": optimizer_temp if peak_phase == "optimizer step" else 0.0,
        "kept activations": kept if peak_phase != "optimizer step" else 0.0,
        "recomputed layer": recomputed + layer_transient if peak_phase == "layer backward" else 0.0,
        "logits and loss buffers": held_logits + (loss_buffers if peak_phase == "loss backward" else 0.0),
        "workspace": workspace,
    }
    settings = {
        "seq_len": seq_len,
        "batch_size": batch_size,
        "lora_rank": lora_rank if method != "full" else None,
        "gradient_checkpointing": gradient_checkpointing,
        "optimizer": optimizer,
        "device": device,
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
        estimate = fit_check(
            row["model"], row["method"], seq_len=row["seq"], lora_rank=row["rank"], **settings
        )
        table.append(
            {
                "model": row["model"],
                "method": row["method"],
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
    if method not in ("full", "lora"):
        raise ValueError(f"the CPU probe measures 'full' or 'lora', got {method!r}")
    torch.manual_seed(0)
    reset_peak_rss()  # the peak of importing the libraries is not the step's
    baseline = int(rss_mib() * 2**20)
    model = LlamaForCausalLM(LlamaConfig(**config, use_cache=False))
    model.config._attn_implementation = "sdpa"
    if method == "lora":
        lora = LoraConfig(
            r=lora_rank, lora_alpha=2 * lora_rank, lora_dropout=0.0, target_modules=list(LINEARS)
        )
        model = get_peft_model(model, lora)
    if gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if method == "lora":
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
    parser.add_argument("model", help=f"one of {', '.join(ARCHITECTURES)}, or a folder with config.json")
    parser.add_argument("--method", choices=METHODS, default="qlora")
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--lora-rank", type=int, default=16)
    parser.add_argument(
        "--targets", default="all-linear", help="'all-linear' or a comma list such as q_proj,v_proj"
    )
    parser.add_argument("--no-gradient-checkpointing", action="store_true")
    parser.add_argument("--optimizer", choices=OPTIMIZERS, default="adamw")
    parser.add_argument("--weights-dtype", choices=sorted(DTYPE_BYTES), default="bf16")
    parser.add_argument("--no-double-quant", action="store_true")
    parser.add_argument("--device-gb", type=float, default=SPARK_GB, help="device memory, decimal GB")


def add_fit_check_command(commands: Any) -> None:
    """The `ftcourse fit-check` sub-command (registered in cli.SUBCOMMANDS)."""
    parser = commands.add_parser("fit-check", help="will a training step fit? a memory breakdown")
    add_fit_check_arguments(parser)
    parser.set_defaults(run=run_fit_check)


def run_fit_check(args: argparse.Namespace) -> int:
    """Print the fit-check table for parsed arguments; exit status 0 if it fits, 1 if not, 2 on bad input."""
    try:
        model: Any = args.model
        if os.path.isdir(model):
            with open(os.path.join(model, "config.json")) as handle:
                model = json.load(handle)
        targets = (
            args.targets if args.targets == "all-linear" else [t.strip() for t in args.targets.split(",")]
        )
        estimate = fit_check(
            model,
            args.method,
            seq_len=args.seq_len,
            batch_size=args.batch_size,
            lora_rank=args.lora_rank,
            targets=targets,
            gradient_checkpointing=not args.no_gradient_checkpointing,
            optimizer=args.optimizer,
            device_gb=args.device_gb,
            weights_dtype=args.weights_dtype,
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
    probe.add_argument("--method", choices=("full", "lora"), required=True)
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
