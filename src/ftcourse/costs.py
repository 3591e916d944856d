"""What a run costs on a DGX Spark, estimated: seconds per training step, download and export sizes.

Nothing here was measured on a Spark. Time comes from a roofline: a step takes at least its matmul FLOPs
over the GPU's bf16 throughput times an assumed utilisation, and at least the bytes of weights it must read
over the memory bandwidth; the larger of the two is the estimate. Each constant says where it comes from.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ftcourse import memory

# NVIDIA's headline figure for GB10: 1 PFLOP of FP4 with 2:4 sparsity (DGX Spark product page and user guide).
GB10_FP4_SPARSE_TFLOPS = 1000.0
# NVIDIA publishes no dense bf16 figure. Assumed: Blackwell tensor cores halve the rate for dense (no
# sparsity), again from FP4 to FP8, and again from FP8 to bf16, so bf16 dense = 1/8 of the headline.
GB10_BF16_DENSE_TFLOPS = GB10_FP4_SPARSE_TFLOPS / 8
# LPDDR5x bandwidth of the 128 GB unified memory, as NVIDIA specifies it.
GB10_MEMORY_GB_PER_S = 273.0
# Assumed share of peak a fine-tuning step reaches: an assumption, not a measurement.
ASSUMED_UTILISATION = 0.35
# Assumed sustained read speed of the Spark's NVMe drive when loading safetensors shards.
ASSUMED_DISK_GB_PER_S = 3.0

# Bytes per decoder-linear weight as stored: bf16, or NF4 with one 8-bit (double-quantized) scale per 64.
METHOD_WEIGHT_BYTES = {"full": 2.0, "lora": 2.0, "dora": 2.0, "qlora": 0.5 + 1 / 64}
# GGUF types by their block layout: q8_0 stores 32 int8 and one f16 scale (34 bytes per 32 weights).
GGUF_BITS_PER_WEIGHT = {"f16": 16.0, "q8_0": 34 * 8 / 32, "q4_0": 18 * 8 / 32}


@dataclass(frozen=True)
class StepCost:
    """One training step's estimated work and time on a GB10."""

    flops: float
    weight_bytes_read: float
    compute_s: float
    memory_s: float

    @property
    def seconds(self) -> float:
        """The roofline estimate: the slower of compute and weight traffic."""
        return max(self.compute_s, self.memory_s)

    @property
    def bound(self) -> str:
        """Which limit sets the estimate."""
        return "compute" if self.compute_s >= self.memory_s else "memory bandwidth"


def matmul_params(model: str | Any) -> int:
    """Parameters that take part in a matrix multiply per token: the decoder's linears and the lm_head."""
    arch = memory.architecture(model)
    return arch.linear_params() + arch.vocab_size * arch.hidden_size


def forward_flops(model: str | Any, seq_len: int, sequences: int) -> float:
    """FLOPs of one forward pass: 2 per matmul weight per token, plus causal attention's scores and mixing."""
    arch = memory.architecture(model)
    tokens = seq_len * sequences
    dense = 2.0 * matmul_params(arch) * tokens
    # QK^T and the weighted sum over values: 2 x 2 x seq_len x q_width per token and layer, halved
    # by the causal mask.
    attention = 2.0 * arch.num_layers * seq_len * arch.q_width * tokens
    return dense + attention


def step_cost(
    model: str | Any,
    method: str,
    seq_len: int,
    batch_size: int,
    gradient_accumulation_steps: int = 1,
    gradient_checkpointing: bool = True,
    utilisation: float = ASSUMED_UTILISATION,
) -> StepCost:
    """Estimated FLOPs, weight traffic and time of one optimizer step (all its micro-batches).

    QLoRA's dequantization work is not counted: it adds memory traffic and compute this estimate omits.
    """
    if method not in memory.METHODS:
        raise ValueError(f"method: expected one of {memory.METHODS}, got {method!r}")
    for name, value in (
        ("seq_len", seq_len),
        ("batch_size", batch_size),
        ("gradient_accumulation_steps", gradient_accumulation_steps),
    ):
        if value <= 0:
            raise ValueError(f"{name} must be positive, got {value}")
    forward = forward_flops(model, seq_len, batch_size * gradient_accumulation_steps)
    # Backward: gradients with respect to activations cost one forward; full fine-tuning adds the
    # weight gradients (another forward). Adapters' own weight gradients are negligible.
    backward = 2 * forward if method == "full" else forward
    recompute = forward if gradient_checkpointing else 0.0
    flops = forward + backward + recompute
    # Every micro-batch reads the weights in its forward, its backward and (checkpointing) its recomputation.
    passes = (3 if gradient_checkpointing else 2) * gradient_accumulation_steps
    arch = memory.architecture(model)
    weight_bytes = passes * (arch.linear_params() * METHOD_WEIGHT_BYTES[method] + arch.other_params() * 2.0)
    compute_s = flops / (GB10_BF16_DENSE_TFLOPS * 1e12 * utilisation)
    memory_s = weight_bytes / (GB10_MEMORY_GB_PER_S * 1e9)
    return StepCost(flops, weight_bytes, compute_s, memory_s)


def download_gb(model: str | Any) -> float:
    """Size of the model's bf16 safetensors files in GB (2 bytes per parameter)."""
    return memory.architecture(model).total_params() * 2 / 1e9


def gguf_gb(model: str | Any, gguf_type: str) -> float:
    """Approximate size of a GGUF file of the model when every weight is stored as `gguf_type`, in GB."""
    if gguf_type not in GGUF_BITS_PER_WEIGHT:
        raise ValueError(f"gguf_type: expected one of {sorted(GGUF_BITS_PER_WEIGHT)}, got {gguf_type!r}")
    return memory.architecture(model).total_params() * GGUF_BITS_PER_WEIGHT[gguf_type] / 8 / 1e9


def load_seconds(model: str | Any) -> float:
    """Seconds to read the bf16 safetensors from disk at the assumed drive speed."""
    return download_gb(model) / ASSUMED_DISK_GB_PER_S


def run_estimate(
    model: str,
    method: str,
    seq_len: int,
    batch_size: int,
    steps: int,
    gradient_accumulation_steps: int = 1,
    gradient_checkpointing: bool = True,
) -> dict[str, Any]:
    """One training run's estimated step time, bound, total minutes (load included) and download size."""
    cost = step_cost(model, method, seq_len, batch_size, gradient_accumulation_steps, gradient_checkpointing)
    minutes = (steps * cost.seconds + load_seconds(model)) / 60
    return {
        "TFLOP per step": cost.flops / 1e12,
        "s per step": cost.seconds,
        "bound by": cost.bound,
        "steps": steps,
        "minutes (load + train)": minutes,
        "download (GB)": download_gb(model),
    }
