"""Quantization from scratch: int8 absmax and zero-point, blockwise scales, NF4, 4-bit packing, double quant.

Every function here is written to be read next to the equations of the quantization chapter, and the
4-bit ones are tested to give the same bytes as bitsandbytes (`tests/test_quant.py`). The last part
loads a model in 4 bit through bitsandbytes on a CPU, guarded against two bugs of bitsandbytes 0.50's CPU
kernels that appear on some CPUs and not on others, and measures on the running CPU whether they appear.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

NF4_OFFSET = 0.9677083  # outermost quantile, as in the QLoRA reference code: 1.845 standard deviations
# FP4 as bitsandbytes defines it: 1 sign, 2 exponent, 1 mantissa bit; codes in bit-pattern order, / 12.
FP4_CODE_ORDER = (
    0.0,
    0.0625,
    8.0,
    12.0,
    4.0,
    6.0,
    2.0,
    3.0,
    -0.0,
    -0.0625,
    -8.0,
    -12.0,
    -4.0,
    -6.0,
    -2.0,
    -3.0,
)


# --- int8 -------------------------------------------------------------------------------------------


def absmax_quantize(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8: q = round(127 x / max|x|); returns (q as int8, the scale max|x| / 127)."""
    scale = x.abs().max().clamp(min=1e-12) / 127
    return torch.round(x / scale).clamp(-127, 127).to(torch.int8), scale


def absmax_dequantize(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x ≈ q · scale, in fp32."""
    return q.float() * scale


def zeropoint_quantize(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Asymmetric 8 bit over [min, max]: q = round(x / s) + z in 0..255; returns (q as uint8, s, z)."""
    low, high = x.min(), x.max()
    scale = (high - low).clamp(min=1e-12) / 255
    zero = torch.round(-low / scale)
    return (torch.round(x / scale) + zero).clamp(0, 255).to(torch.uint8), scale, zero


def zeropoint_dequantize(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    """x ≈ (q - z) · s, in fp32."""
    return (q.float() - zero) * scale


def blockwise_roundtrip(x: torch.Tensor, blocksize: int, method: str = "absmax") -> torch.Tensor:
    """x quantized to int8 with one scale per block of `blocksize` values (flattened), then dequantized."""
    if blocksize <= 0:
        raise ValueError(f"blocksize must be positive, got {blocksize}")
    if method not in ("absmax", "zeropoint"):
        raise ValueError(f"method must be 'absmax' or 'zeropoint', got {method!r}")
    flat = x.reshape(-1).float()
    n = flat.numel()
    # Pad the last block by repeating its final value: that changes neither its absmax nor its range.
    padded = torch.cat([flat, flat[-1:].expand((-n) % blocksize)]).reshape(
        -1, blocksize
    )  # (blocks, blocksize)
    if method == "absmax":
        scale = padded.abs().amax(dim=1, keepdim=True).clamp(min=1e-12) / 127
        restored = torch.round(padded / scale).clamp(-127, 127) * scale
    else:
        low, high = padded.amin(dim=1, keepdim=True), padded.amax(dim=1, keepdim=True)
        scale = (high - low).clamp(min=1e-12) / 255
        zero = torch.round(-low / scale)
        restored = ((torch.round(padded / scale) + zero).clamp(0, 255) - zero) * scale
    return restored.reshape(-1)[:n].reshape(x.shape)


# --- 4-bit codebooks ---------------------------------------------------------------------------------


def nf4_quantiles(offset: float = NF4_OFFSET) -> torch.Tensor:
    """The 16 NF4 points before scaling, float64, sorted: 7 negative normal quantiles, 0, 8 positive ones."""
    if not 0.5 < offset < 1.0:
        raise ValueError(f"offset is the outermost quantile's probability, between 0.5 and 1; got {offset}")
    # Quantile points spaced evenly in probability between `offset` and 1/2 (fp32, as the reference does);
    # the two halves have different numbers of points so that 0 is a code and the type is asymmetric.
    positive = torch.special.ndtri(torch.linspace(offset, 0.5, 9)[:-1].double())
    negative = -torch.special.ndtri(torch.linspace(offset, 0.5, 8)[:-1].double())
    return torch.cat([positive, torch.zeros(1, dtype=torch.float64), negative]).sort().values


def nf4_code(offset: float = NF4_OFFSET) -> torch.Tensor:
    """The 16 NF4 values: normal quantiles, 8 positive, 7 negative and an exact zero, scaled to [-1, 1]."""
    # The reference rounds the quantiles to fp32 first and divides in fp32 (its `torch.Tensor(v)`): dividing
    # in float64 and rounding once would move the last bit of several values, and with them the midpoints.
    values = nf4_quantiles(offset).float()
    return values / values.max()


def fp4_code() -> torch.Tensor:
    """The 16 FP4 values in bitsandbytes' code order (index = 4-bit pattern), scaled to [-1, 1]."""
    return torch.tensor(FP4_CODE_ORDER) / 12.0


def code_for(quant_type: str) -> torch.Tensor:
    """The 16-entry codebook of 'nf4' or 'fp4', indexed by the stored 4-bit value."""
    if quant_type == "nf4":
        return nf4_code()
    if quant_type == "fp4":
        return fp4_code()
    raise ValueError(f"quant_type must be 'nf4' or 'fp4', got {quant_type!r}")


# --- 4-bit blockwise quantization, as bitsandbytes stores it -----------------------------------------


def quantize_4bit(
    x: torch.Tensor, quant_type: str = "nf4", blocksize: int = 64, code: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Blockwise 4-bit codes of x (flattened): (packed uint8, shape (ceil(n/2), 1); fp32 absmax per block).

    `code` replaces the codebook of `quant_type` with up to 16 values in [-1, 1] (to try a type of your own).
    """
    code = code_for(quant_type) if code is None else _checked_code(code)
    flat = x.reshape(-1).float()
    n = flat.numel()
    whole = n - n % blocksize
    blocks = flat[:whole].reshape(-1, blocksize)  # (blocks, blocksize)
    absmax = blocks.abs().amax(dim=1)
    # Whole blocks are multiplied by 1/absmax, the short last block is divided by its absmax: the two can
    # differ in the last bit, so this follows bitsandbytes exactly, to give the same code on a midpoint.
    scaled = (blocks * (1.0 / absmax.clamp(min=1e-38)).unsqueeze(1)).clamp(-1, 1).reshape(-1)
    if n % blocksize:  # the last, short block has its own absmax over its real values only
        last_absmax = flat[whole:].abs().amax().clamp(min=1e-38)
        absmax = torch.cat([absmax, last_absmax.reshape(1)])
        scaled = torch.cat([scaled, (flat[whole:] / last_absmax).clamp(-1, 1)])
    # Nearest code; a value exactly halfway between two codes (fp32 midpoint) takes the lower one.
    order = torch.argsort(code)
    sorted_code = code[order]
    midpoints = (sorted_code[:-1] + sorted_code[1:]) / 2
    if n % 2:  # an odd count is padded with a 0.0, stored as the code nearest zero
        scaled = torch.cat([scaled, torch.zeros(1)])
    index = order[torch.bucketize(scaled, midpoints)].to(torch.uint8)
    packed = (index[0::2] << 4) | index[1::2]  # first value in the high nibble
    return packed.unsqueeze(1), absmax


def dequantize_4bit(
    packed: torch.Tensor,
    absmax: torch.Tensor,
    shape: tuple[int, ...],
    quant_type: str = "nf4",
    blocksize: int = 64,
    code: torch.Tensor | None = None,
) -> torch.Tensor:
    """Values of `shape` from packed 4-bit codes and per-block absmax: code[index] · absmax[block], fp32.

    `code` defaults to our derived codebook (for NF4 and FP4 the same fp32 values as bitsandbytes' table).
    """
    flat = packed.reshape(-1)
    index = torch.stack([flat >> 4, flat & 0xF], dim=1).reshape(-1).long()
    n = int(torch.tensor(shape).prod())
    values = (code_for(quant_type) if code is None else code.float())[index[:n]]
    block = torch.arange(n) // blocksize
    return (values * absmax.float()[block]).reshape(shape)


def double_quantize(absmax: torch.Tensor, blocksize: int = 256) -> dict[str, torch.Tensor]:
    """Second-level quantization of the absmax constants: minus their mean, 8-bit blockwise (dynamic map)."""
    from bitsandbytes.functional import create_dynamic_map

    code = create_dynamic_map(signed=True)  # the 8-bit codebook bitsandbytes uses for constants
    offset = absmax.mean()
    centred = absmax - offset
    n = centred.numel()
    blocks = torch.nn.functional.pad(centred, (0, (-n) % blocksize)).reshape(-1, blocksize)
    absmax2 = blocks.abs().amax(dim=1)
    scaled = (blocks / absmax2.clamp(min=1e-38).unsqueeze(1)).reshape(-1)[:n]
    quantized = (scaled.unsqueeze(1) - code.unsqueeze(0)).abs().argmin(dim=1).to(torch.uint8)
    return {"quantized": quantized, "absmax2": absmax2, "offset": offset, "code": code}


def double_dequantize(state: dict[str, torch.Tensor], blocksize: int = 256) -> torch.Tensor:
    """The fp32 absmax constants back from double_quantize's output."""
    index = state["quantized"].long()
    block = torch.arange(index.numel()) // blocksize
    return state["code"][index] * state["absmax2"][block] + state["offset"]


def _checked_code(code: torch.Tensor) -> torch.Tensor:
    """A custom codebook as fp32, after checking it fits in 4 bits and in [-1, 1]."""
    code = torch.as_tensor(code, dtype=torch.float32).reshape(-1)
    if not 2 <= code.numel() <= 16:
        raise ValueError(f"a 4-bit codebook holds 2 to 16 values; got {code.numel()}")
    if code.abs().max() > 1:
        largest = code.abs().max().item()
        raise ValueError(f"codebook values must lie in [-1, 1] (they multiply the absmax); got {largest:.3g}")
    return code


def roundtrip_4bit(
    x: torch.Tensor, quant_type: str = "nf4", blocksize: int = 64, code: torch.Tensor | None = None
) -> torch.Tensor:
    """x through quantize_4bit and dequantize_4bit: what a 4-bit copy of x computes with."""
    packed, absmax = quantize_4bit(x, quant_type, blocksize, code)
    code = None if code is None else _checked_code(code)
    return dequantize_4bit(packed, absmax, tuple(x.shape), quant_type, blocksize, code)


def relative_error(x: torch.Tensor, approx: torch.Tensor) -> float:
    """RMS of (approx - x) divided by the RMS of x."""
    return float((approx.float() - x.float()).pow(2).mean().sqrt() / x.float().pow(2).mean().sqrt())


def bits_per_parameter(blocksize: int = 64, double_quant: bool = False, blocksize2: int = 256) -> float:
    """Bits per weight: 4 + 32/blocksize, or double-quantized 4 + 8/blocksize + 32/(blocksize·blocksize2)."""
    if double_quant:
        return 4 + 8 / blocksize + 32 / (blocksize * blocksize2)
    return 4 + 32 / blocksize


# --- bitsandbytes on the CPU: two bugs that depend on the CPU, measured and guarded -------------------


def _tensors(value: Any) -> Iterator[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        yield value
    elif hasattr(value, "__dict__"):
        for item in vars(value).values():
            yield from _tensors(item)


def linear4bit_bytes(layer: Any) -> int:
    """Bytes a bitsandbytes Linear4bit really holds: packed weight plus every tensor of its quant state."""
    weight = layer.weight
    return weight.numel() * weight.element_size() + sum(
        t.numel() * t.element_size() for t in _tensors(weight.quant_state)
    )


def safe_dequantize_4bit(packed: torch.Tensor, quant_state: Any) -> torch.Tensor:
    """bitsandbytes' dequantize_4bit, or ours where its CPU kernel is wrong (last dim % blocksize != 0)."""
    import bitsandbytes.functional as F

    shape = tuple(quant_state.shape)
    if packed.device.type == "cpu" and shape[-1] % quant_state.blocksize != 0:
        # bitsandbytes 0.50's CPU kernel walks blocks per row on some CPUs: wrong values there. Use ours.
        absmax = quant_state.absmax
        if quant_state.nested:
            absmax = F.dequantize_blockwise(absmax, quant_state.state2) + quant_state.offset
        values = dequantize_4bit(
            packed, absmax, shape, quant_state.quant_type, quant_state.blocksize, code=quant_state.code
        )
        return values.to(quant_state.dtype)
    return F.dequantize_4bit(packed, quant_state)


def kernel_error(reference: torch.Tensor, result: torch.Tensor) -> float:
    """Largest |result - reference|, in units of the reference's largest magnitude (0.0: identical)."""
    scale = reference.float().abs().max().clamp(min=torch.finfo(torch.float32).tiny)
    return float((result.float() - reference.float()).abs().max() / scale)


def kernel_is_right(error: float, terms: int = 1) -> bool:
    """Whether a relative `kernel_error` is within fp32 rounding of `terms` operations (a few eps each)."""
    return error <= 4 * terms * torch.finfo(torch.float32).eps


def avx512bf16_repack_error(seed: int = 0) -> float | None:
    """bitsandbytes' dequantize_4bit error after a Linear4bit's eval-mode AVX512-BF16 repack, on this CPU.

    Relative to the weight's largest magnitude (see `kernel_error`). None where bitsandbytes says the CPU
    has no AVX512-BF16: it never takes that path there, and the guard in `guard_linear4bit` costs nothing.
    """
    import bitsandbytes as bnb
    import bitsandbytes.functional as F

    if not F.has_avx512bf16():
        return None
    generator = torch.Generator().manual_seed(seed)
    layer = bnb.nn.Linear4bit(128, 64, bias=False, quant_type="nf4", compute_dtype=torch.float32)
    layer.weight = bnb.nn.Params4bit(
        torch.randn(64, 128, generator=generator), requires_grad=False, quant_type="nf4"
    )
    layer = layer.to("cpu")  # quantizes the weight
    before = F.dequantize_4bit(layer.weight.data, layer.weight.quant_state)
    layer.support_avx512bf16_for_cpu = True  # what bitsandbytes sets on such a CPU (the guard turns it off)
    layer.eval()
    with torch.no_grad():
        layer(torch.randn(3, 128, generator=generator))  # the first eval-mode call repacks in place
    after = F.dequantize_4bit(layer.weight.data, layer.weight.quant_state)
    return kernel_error(before, after)


def guard_linear4bit(model: torch.nn.Module) -> int:
    """Make every Linear4bit of `model` safe on a CPU; returns their number. Raises for an unsafe shape."""
    import bitsandbytes as bnb

    count = 0
    for name, module in model.named_modules():
        if isinstance(module, bnb.nn.Linear4bit):
            # bitsandbytes 0.50 repacks the weight in place in eval mode on AVX512-BF16 CPUs, and its
            # dequantize_4bit is then wrong (avx512bf16_repack_error); off, it costs nothing without one.
            module.support_avx512bf16_for_cpu = False
            blocksize = module.weight.quant_state.blocksize if module.weight.quant_state is not None else 64
            if module.weight.device.type == "cpu" and module.in_features % blocksize != 0:
                raise ValueError(
                    f"{name}: in_features={module.in_features} is not a multiple of the 4-bit block size "
                    f"{blocksize}; bitsandbytes 0.50 computes wrong outputs for such a Linear4bit on some "
                    "CPUs (the quantization chapter measures the one it runs on). "
                    "Keep this layer out of quantization (llm_int8_skip_modules) or run on a GPU."
                )
            count += 1
    return count


def load_4bit(
    model_dir: str | Path | None = None,
    quant_type: str = "nf4",
    double_quant: bool = True,
    compute_dtype: str = "bfloat16",
    device_map: str = "cpu",
    local_files_only: bool = True,
) -> Any:
    """A causal LM (default: the embedded model) loaded in 4 bit through bitsandbytes, guarded for the CPU."""
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig
    from transformers.utils import logging as hf_logging

    from ftcourse.toy import model_dir as embedded_dir

    code_for(quant_type)  # a clear error for an unknown type
    hf_logging.disable_progress_bar()
    config = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=quant_type,
        bnb_4bit_use_double_quant=double_quant,
        bnb_4bit_compute_dtype=getattr(torch, compute_dtype),
    )
    path = str(model_dir) if model_dir is not None else embedded_dir()
    model = AutoModelForCausalLM.from_pretrained(
        path,
        quantization_config=config,
        device_map=device_map,
        local_files_only=local_files_only,
        use_safetensors=True,
    )
    guard_linear4bit(model)
    model.eval()
    return model


def roundtrip_linears(model: torch.nn.Module, kind: str, blocksize: int = 64) -> int:
    """Replace each decoder linear weight by its bitsandbytes quantize-dequantize round trip; return how many.

    kind: 'int8' (bitsandbytes' row-wise absmax int8), 'fp4' or 'nf4' (blockwise 4 bit, fp32 absmax).
    The model then computes what a model stored that way computes, in fp32.
    """
    import bitsandbytes.functional as F

    if kind not in ("int8", "fp4", "nf4"):
        raise ValueError(f"kind must be 'int8', 'fp4' or 'nf4', got {kind!r}")
    count = 0
    with torch.no_grad():
        for name, module in model.named_modules():
            if isinstance(module, torch.nn.Linear) and name.split(".")[-1] != "lm_head":
                weight = module.weight.data.float()
                if kind == "int8":
                    q, row_scale, _ = F.int8_vectorwise_quant(weight)
                    restored = q.float() * row_scale.unsqueeze(1) / 127
                else:
                    packed, state = F.quantize_4bit(weight, blocksize=blocksize, quant_type=kind)
                    restored = safe_dequantize_4bit(packed, state)
                module.weight.data.copy_(restored.to(module.weight.dtype))
                count += 1
    return count
