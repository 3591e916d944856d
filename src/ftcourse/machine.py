"""Which CPU runs the book, and how fast it is: a fixed reference workload that chapter budgets scale by.

Machines of the same kind differ in CPU model. On a 2-core AMD EPYC with AVX2 only, torch has no fast
bfloat16 matmul (no AVX512-BF16), so anything computed in bfloat16 (a 4-bit base computing in bfloat16, the
spark stand-ins) is an order of magnitude slower than on a CPU with AVX512, and float32 kernels differ too.
A chapter's time limit therefore cannot be a fixed number of seconds. `reference_workload` times the three
kinds of work the chapters do (float32 matmuls, bfloat16 matmuls, a bitsandbytes 4-bit linear forward and
backward computing in float32, as the cpu profile's QLoRA does); `speed_factor` divides its time by the time
the same workload took on the machine the 90-second chapter budget was designed on, so `budget *
speed_factor` is that budget in this machine's seconds.

`python -m ftcourse.machine` prints the measurement as JSON (the test run calls it in a fresh process,
before the first chapter; the workload runs on one thread, so another process does not skew it).
"""

from __future__ import annotations

import json
import math
import os
import platform
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

# The flags that change which kernels torch and bitsandbytes run on a CPU.
KERNEL_FLAGS = (
    "avx2",
    "fma",
    "avx512f",
    "avx512_bf16",
    "avx512_vnni",
    "amx_bf16",
    "amx_tile",
    "asimd",
    "sve",
)

# Seconds each part of `reference_workload` took on the design machine, where the chapters' 90 s budgets
# were set: a 2-core AMD EPYC with AVX512 (avx512_bf16, avx512_vnni), torch 2.13 CPU, bitsandbytes 0.50.2, one
# thread; the fastest of 7 runs, steady across several such measurements (2026-12-07). `speed_factor` is about
# 1.0 there. Capping its kernels at AVX2 (ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2) left float32 and
# the float32 4-bit linear unchanged and made the bfloat16 part 60-75x slower: oneDNN's AVX2 path has no
# bfloat16 kernel. (That cap is an upper bound for a real AVX2-only CPU, where torch uses its own fallback.)
DESIGN_SECONDS = {"float32 matmul": 0.064, "bfloat16 matmul": 0.0029, "4-bit linear fwd+bwd": 0.0066}
DESIGN_CPU = "AMD EPYC, 2 cores, AVX512 with avx512_bf16"
# How much each part counts in the factor: roughly the share of the chapters' time spent in that kind of work.
# The cpu profile trains and evaluates the embedded model in float32; bfloat16 is the spark stand-ins'
# dtype, and 4-bit layers are a few chapters'.
PART_WEIGHTS = {"float32 matmul": 0.8, "bfloat16 matmul": 0.1, "4-bit linear fwd+bwd": 0.1}

# A measured factor outside these bounds is a broken measurement (a stalled process), not a machine.
FACTOR_BOUNDS = (0.25, 8.0)


@dataclass(frozen=True)
class ReferenceTiming:
    """The reference workload's time on this machine, part by part, and its ratio to the design machine."""

    cpu: str
    seconds: dict[str, float]
    factor: float

    @property
    def total_seconds(self) -> float:
        """The whole workload's time (the sum of its parts)."""
        return sum(self.seconds.values())


def cpu_model() -> str:
    """The CPU's model name as the operating system reports it (platform's name when /proc has none)."""
    try:
        for line in Path("/proc/cpuinfo").read_text(encoding="utf-8").splitlines():
            if line.lower().startswith(("model name", "cpu model")):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def cpu_flags() -> set[str]:
    """The CPU's feature flags (x86 `flags`, Arm `Features`), lower case; empty when unknown."""
    try:
        for line in Path("/proc/cpuinfo").read_text(encoding="utf-8").splitlines():
            if line.lower().startswith(("flags", "features")):
                return set(line.split(":", 1)[1].lower().split())
    except OSError:
        pass
    return set()


def cpu_description() -> str:
    """One line naming this CPU, its core count and the kernel-relevant flags it has and lacks."""
    flags = cpu_flags()
    have = [flag for flag in KERNEL_FLAGS if flag in flags]
    forced = os.environ.get("ATEN_CPU_CAPABILITY")
    listed = " ".join(have) or "none of " + ", ".join(KERNEL_FLAGS)
    text = f"{cpu_model()}, {os.cpu_count()} cores, flags: {listed}"
    if forced:
        text += f" (torch forced to ATEN_CPU_CAPABILITY={forced})"
    return text


def _best_seconds(work: Callable[[], object], repeats: int) -> float:
    # The fastest of several runs: another process can only slow a run down, never speed it up, so the
    # minimum is the machine's speed and the median would be partly the neighbours' load.
    work()  # warm-up: first-call allocations and kernel selection are not the machine's speed
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        work()
        times.append(time.perf_counter() - start)
    return min(times)


def _matmul_work(dtype, size: int, count: int) -> Callable[[], object]:
    import torch

    generator = torch.Generator().manual_seed(0)
    a = torch.randn(size, size, generator=generator).to(dtype)
    b = torch.randn(size, size, generator=generator).to(dtype)

    def work() -> object:
        out = a
        for _ in range(count):
            out = (out @ b) * (1.0 / size**0.5)
        return out

    return work


def _linear_4bit_work(features: int, tokens: int, count: int) -> Callable[[], object]:
    import bitsandbytes as bnb
    import torch

    torch.manual_seed(0)
    # float32 compute, as ftcourse.qlora.compute_dtype gives the cpu profile (bfloat16 is the part above)
    layer = bnb.nn.Linear4bit(
        features, features, bias=False, compute_dtype=torch.float32, quant_type="nf4"
    ).to("cpu")  # .to quantizes the weight
    layer.support_avx512bf16_for_cpu = False  # the guard the book sets (bitsandbytes' CPU repack bug)
    x = torch.randn(tokens, features)

    def work() -> object:
        for _ in range(count):
            inputs = x.clone().requires_grad_(True)
            layer(inputs).float().square().mean().backward()
        return inputs.grad

    return work


def reference_workload(repeats: int = 7) -> dict[str, float]:
    """The best seconds of each part of the fixed workload on this machine, on one thread."""
    import torch

    # One thread: a core's speed is what differs between CPU models, and a two-thread matmul is stalled by
    # any other process that holds one of the two cores, which would make the factor measure the load.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _time_parts(repeats)
    finally:
        torch.set_num_threads(threads)


def _time_parts(repeats: int) -> dict[str, float]:
    import torch

    parts = {
        "float32 matmul": _matmul_work(torch.float32, 512, 24),
        "bfloat16 matmul": _matmul_work(torch.bfloat16, 256, 16),
        "4-bit linear fwd+bwd": _linear_4bit_work(512, 256, 2),
    }
    return {name: _best_seconds(work, repeats) for name, work in parts.items()}


def speed_factor(
    seconds: dict[str, float],
    design: dict[str, float] = DESIGN_SECONDS,
    weights: dict[str, float] = PART_WEIGHTS,
) -> float:
    """This machine's time per unit of design-machine time: the weighted geometric mean of the parts' ratios.

    A geometric mean, so a CPU a hundred times slower at one part (bfloat16 matmuls without AVX512-BF16)
    raises the factor by that ratio to the power of its weight, not a hundredfold; bounded by FACTOR_BOUNDS.
    """
    ratios = {name: seconds[name] / design[name] for name in design}
    if any(ratio <= 0 for ratio in ratios.values()):
        raise ValueError(f"speed_factor: every part needs a positive time, got {seconds}")
    total_weight = sum(weights[name] for name in design)
    log_factor = sum(weights[name] * math.log(ratios[name]) for name in design) / total_weight
    low, high = FACTOR_BOUNDS
    return min(max(math.exp(log_factor), low), high)


def measure(repeats: int = 7) -> ReferenceTiming:
    """Time the reference workload here and compare it with the design machine."""
    seconds = reference_workload(repeats)
    return ReferenceTiming(cpu=cpu_description(), seconds=seconds, factor=speed_factor(seconds))


def main() -> None:
    """Print `measure()` as one JSON object (what the test run reads)."""
    timing = measure()
    print(json.dumps({**asdict(timing), "total_seconds": timing.total_seconds, "design_cpu": DESIGN_CPU}))


if __name__ == "__main__":
    main()
