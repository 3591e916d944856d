"""A PEFT LoRA adapter as a GGUF LoRA file, which llama.cpp (and Ollama's ADAPTER) applies at load time.

    adapter_config.json + adapter_model.safetensors -> checked against the base folder -> B of q/k permuted
    -> write_lora_gguf: general.type "adapter", adapter.type "lora", adapter.lora.alpha,
    one pair <base tensor>.lora_a (r, in) and <base tensor>.lora_b (out, r) per adapted matrix

llama.cpp adds (alpha / r) * B (A x) to the output of every matrix that has a pair (`llama-adapter.cpp`,
`llm_build_lora_mm`), which is peft's W0 x + (alpha / r) B A x. The base GGUF stays as it is, so one base
file serves many adapters, each a few MiB.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import gguf
import numpy as np
import torch
from safetensors import safe_open

from ftcourse import merge
from ftcourse.atomic import atomic_output
from ftcourse.gguf import ExportError, check_model_dir, expected_llama_shapes, permute_qk

LORA_GGUF_TYPES = {"f32": gguf.GGMLQuantizationType.F32, "f16": gguf.GGMLQuantizationType.F16}
PEFT_PREFIX = "base_model.model."


def read_lora_pairs(adapter_dir: Path) -> dict[str, dict[str, np.ndarray]]:
    """Base tensor name (model.layers.0.self_attn.q_proj.weight) -> {"A": (r, in), "B": (out, r)}."""
    pairs: dict[str, dict[str, np.ndarray]] = {}
    with safe_open(adapter_dir / merge.ADAPTER_WEIGHTS, framework="pt") as reader:
        for key in reader.keys():
            if "lora_embedding" in key or "lora_magnitude" in key:
                raise ExportError(
                    f"{adapter_dir} adapts embeddings or holds DoRA magnitudes ({key}): a GGUF LoRA file "
                    f"here carries plain LoRA on linear layers only. Merge and export the model instead."
                )
            for side in ("A", "B"):
                suffix = f".lora_{side}.weight"
                if key.endswith(suffix):
                    name = key.removeprefix(PEFT_PREFIX).removesuffix(suffix) + ".weight"
                    pairs.setdefault(name, {})[side] = reader.get_tensor(key).to(torch.float32).numpy()
    if incomplete := [name for name, pair in pairs.items() if len(pair) != 2]:
        raise ExportError(f"{adapter_dir}: {incomplete[0]} has lora_A or lora_B but not both.")
    return pairs


def lora_alpha_for_llama_cpp(config: dict) -> float:
    """The adapter.lora.alpha that makes llama.cpp's alpha / r equal peft's scaling."""
    alpha, rank = float(config.get("lora_alpha", 8)), int(config.get("r", 8))
    # rsLoRA scales by alpha / sqrt(r); llama.cpp always divides by r, so store alpha * sqrt(r).
    return alpha * math.sqrt(rank) if config.get("use_rslora") else alpha


def write_lora_gguf(
    adapter_dir: str | os.PathLike,
    out_path: str | os.PathLike,
    base_model_dir: str | os.PathLike,
    dtype: str = "f16",
) -> Path:
    """Write a PEFT LoRA adapter folder as a GGUF LoRA file for the base in base_model_dir; its path."""
    if dtype not in LORA_GGUF_TYPES:
        raise ExportError(f"A GGUF LoRA file is written in {' or '.join(LORA_GGUF_TYPES)}, not {dtype!r}.")
    adapter_dir = Path(adapter_dir).expanduser()
    config = merge.read_adapter_config(adapter_dir)
    if config.get("peft_type", "LORA") != "LORA":
        raise ExportError(f"{adapter_dir} is a {config['peft_type']} adapter; a GGUF LoRA file holds LoRA.")
    if used := [f"{key} ({why})" for key, why in merge.UNSUPPORTED_OPTIONS.items() if config.get(key)]:
        raise ExportError(f"{adapter_dir}/adapter_config.json sets {'; '.join(used)}: not a plain LoRA pair.")
    base = check_model_dir(base_model_dir)
    expected = _base_shapes(base)
    pairs = read_lora_pairs(adapter_dir)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, base["num_hidden_layers"])
    tensors = []
    for name, pair in sorted(pairs.items()):
        if name not in expected:
            raise ExportError(f"{adapter_dir} adapts {name}, which the base model has no weight for.")
        A, B = pair["A"], pair["B"]  # noqa: N806  (the paper's names)
        out_features, in_features = expected[name]
        if A.shape[1] != in_features or B.shape[0] != out_features or A.shape[0] != B.shape[1]:
            raise ExportError(
                f"{name}: A {A.shape} and B {B.shape} do not fit the base's {expected[name]}: wrong base?"
            )
        # B A changes W's rows; the rows of W_q and W_k are permuted for llama.cpp's RoPE, so B's must be too.
        if name.endswith("q_proj.weight"):
            B = permute_qk(B, base["num_attention_heads"])  # noqa: N806
        elif name.endswith("k_proj.weight"):
            B = permute_qk(B, base["num_key_value_heads"])  # noqa: N806
        gguf_name = names.get_name(name, try_suffixes=(".weight",))
        tensors += [(f"{gguf_name}.lora_a", A), (f"{gguf_name}.lora_b", B)]

    np_dtype = np.float16 if dtype == "f16" else np.float32
    with atomic_output(out_path) as tmp:
        writer = gguf.GGUFWriter(tmp, arch=gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.LLAMA])
        try:
            writer.add_type(gguf.GGUFType.ADAPTER)
            writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
            writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, lora_alpha_for_llama_cpp(config))
            for gguf_name, array in tensors:
                writer.add_tensor(gguf_name, array.astype(np_dtype))
            writer.write_header_to_file()
            writer.write_kv_data_to_file()
            writer.write_tensors_to_file()
        finally:
            writer.close()
    return Path(out_path).expanduser()


def _base_shapes(config: dict) -> dict[str, tuple[int, ...]]:
    """Tensor name -> (out, in) of the base model's linear layers."""
    return {name: shape for name, shape in expected_llama_shapes(config).items() if len(shape) == 2}
