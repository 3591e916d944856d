"""Merging an adapter into its base: W = W0 + (alpha / r) * B @ A, checked before and after.

Before: the base folder is a Llama that `ftcourse.gguf` can export (checked before anything is loaded),
and every tensor of the adapter file lands in a module of the base (an adapter for a deeper model would
otherwise merge half its layers and drop the rest without a word). After: `max_logit_difference`
compares the merged model with the adapted one on the same token ids.
"""

from __future__ import annotations

import copy
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open

from ftcourse.atomic import atomic_folder
from ftcourse.gguf import ExportError, check_model_dir

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"


def merge_adapter(peft_model: torch.nn.Module, keep_adapter: bool = True) -> torch.nn.Module:
    """The plain model with the adapter folded into its weights (a merged copy unless keep_adapter=False)."""
    # merge_and_unload rewrites the base model in place; a copy keeps the adapted model usable, so
    # that the merged logits can be compared with it. The copy doubles memory: keep_adapter=False
    # for a large model.
    if not keep_adapter:
        return peft_model.merge_and_unload()
    source = copy.deepcopy(peft_model)
    # Trainers patch `model.forward` with closures over the *original* model's forward (TRL's fused LM
    # head does). deepcopy does not copy closures, so the copy would still run the original, adapter and
    # all. Dropping the patch restores the class's own forward; accelerate's device hooks (_hf_hook)
    # are copied correctly and stay.
    for module in source.modules():
        if "forward" in module.__dict__ and not hasattr(module, "_hf_hook"):
            del module.forward
    return source.merge_and_unload()


@torch.no_grad()
def max_logit_difference(
    model_a: torch.nn.Module, model_b: torch.nn.Module, input_ids: torch.Tensor
) -> float:
    """Largest |logit_a - logit_b| over every position and vocabulary entry."""
    model_a.eval()
    model_b.eval()
    logits_a = model_a(input_ids=input_ids).logits.float()
    logits_b = model_b(input_ids=input_ids).logits.float()
    return (logits_a - logits_b).abs().max().item()


def is_adapter_dir(path: str | os.PathLike) -> bool:
    """True when path is a folder holding a PEFT adapter (adapter_config.json)."""
    return (Path(path).expanduser() / ADAPTER_CONFIG).is_file()


def read_adapter_config(adapter_dir: str | os.PathLike) -> dict:
    """adapter_config.json of an adapter folder, after checking that its weights file is readable."""
    adapter_dir = Path(adapter_dir).expanduser()
    try:
        config = json.loads((adapter_dir / ADAPTER_CONFIG).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ExportError(f"{adapter_dir / ADAPTER_CONFIG} is not valid JSON ({error}).") from error
    weights = adapter_dir / ADAPTER_WEIGHTS
    if not weights.is_file():
        raise ExportError(f"{adapter_dir} has no {ADAPTER_WEIGHTS}: save the adapter with save_pretrained.")
    try:
        with safe_open(weights, framework="pt") as reader:
            if not list(reader.keys()):
                raise ExportError(f"{weights} holds no tensors.")
    except SafetensorError as error:
        raise ExportError(f"{weights} is not a readable safetensors file ({error}).") from error
    return config


@dataclass
class LoadedAdapter:
    """An adapter loaded onto its base: the PEFT model, the tokenizer, and what the reader should know."""

    model: Any
    tokenizer: Any
    base_dir: Path
    notes: list[str] = field(default_factory=list)


def load_adapter(
    adapter_dir: str | os.PathLike, base_model_dir: str | os.PathLike | None = None
) -> LoadedAdapter:
    """The adapter on its local base model; raises ExportError unless every adapter tensor found a module."""
    from peft import PeftConfig, PeftModel
    from peft.auto import MODEL_TYPE_TO_PEFT_MODEL_MAPPING
    from transformers import AutoModelForCausalLM, AutoTokenizer

    adapter_dir = Path(adapter_dir).expanduser()
    recorded = read_adapter_config(adapter_dir).get("base_model_name_or_path")
    base = base_model_dir if base_model_dir is not None else recorded
    if not base or not Path(base).expanduser().is_dir():
        raise ExportError(
            f"{adapter_dir} holds an adapter whose base model {base!r} is not a local folder; "
            f"pass the base model folder (--base BASE_DIR on the command line)."
        )
    base = Path(base).expanduser()
    notes = []
    if recorded and base_model_dir is not None and Path(recorded).expanduser().resolve() != base.resolve():
        notes.append(
            f"the adapter records base model {recorded!r}, but {str(base)!r} was given; every adapter tensor "
            f"fits it, so the merge went ahead"
        )
    try:
        check_model_dir(base)  # a base we could not export is refused before it is loaded
    except ExportError as error:
        raise ExportError(f"The base model folder cannot be used: {error}") from error

    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    config = PeftConfig.from_pretrained(adapter_dir)
    config.inference_mode = True
    peft_class = MODEL_TYPE_TO_PEFT_MODEL_MAPPING.get(config.task_type, PeftModel)
    try:
        peft_model = peft_class(model, config, "default")
        loaded = peft_model.load_adapter(adapter_dir, "default")
    except (ValueError, RuntimeError) as error:  # shapes that do not fit, target modules not found
        raise ExportError(f"The adapter in {adapter_dir} does not fit the base {base}: {error}") from error
    missing = [key for key in loaded.missing_keys if "lora_" in key]
    if loaded.unexpected_keys or missing:
        found = loaded.unexpected_keys or missing
        raise ExportError(
            f"The adapter in {adapter_dir} does not fit the base {base}: "
            f"{len(loaded.unexpected_keys)} adapter tensors have no module in the base "
            f"and {len(missing)} adapted modules got no tensor (e.g. {found[0]}). Was it trained on a "
            f"different model? Pass the base it was trained on with --base."
        )
    tokenizer_dir = adapter_dir if (adapter_dir / "tokenizer.json").is_file() else base
    return LoadedAdapter(peft_model.eval(), AutoTokenizer.from_pretrained(tokenizer_dir), base, notes)


def save_merged(model: Any, tokenizer: Any, hf_dir: str | os.PathLike) -> Path:
    """Merge a PEFT model (a plain one is saved as is) and save it with its tokenizer as one folder."""
    if hasattr(model, "merge_and_unload"):  # a PEFT model: llama.cpp wants one plain weight per layer
        model = merge_adapter(model)
    with atomic_folder(hf_dir) as tmp:  # never a folder with new weights and an old tokenizer
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    return Path(hf_dir).expanduser()
