"""Merging an adapter into its base: W = W0 + (alpha / r) * B @ A, checked before and after.

Two ways: `load_adapter` + `save_merged` merge in memory with peft (the whole base in float32), and
`merge_streaming` merges shard by shard in the base's dtype, so that a 70B adapter merges in 128 GB;
`merge_into_folder` (what `ftcourse export` calls) streams whenever the adapter allows it.

Before: the base folder is a Llama that `ftcourse.gguf` can export (checked before anything is loaded),
and every tensor of the adapter file lands in a module of the base (an adapter for a deeper model would
otherwise merge half its layers and drop the rest without a word). After: `max_logit_difference`
compares the merged model with the adapted one on the same token ids.
"""

from __future__ import annotations

import copy
import json
import math
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open

from ftcourse.atomic import atomic_folder, atomic_output
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
    if not isinstance(config, dict):
        raise ExportError(
            f"{adapter_dir / ADAPTER_CONFIG} holds a {type(config).__name__}, not a JSON object; save the "
            f"adapter again with save_pretrained."
        )
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


def _local_base(adapter_dir: Path, base_model_dir: Any, recorded: Any, how: str) -> Path:
    """The base model folder an adapter merges into: the one given, else the one it records; it must exist."""
    base = base_model_dir if base_model_dir is not None else recorded
    if not base or not Path(base).expanduser().is_dir():
        raise ExportError(
            f"{adapter_dir} holds an adapter whose base model {base!r} is not a local folder; "
            f"pass the base model folder ({how})."
        )
    return Path(base).expanduser()


def load_adapter(
    adapter_dir: str | os.PathLike, base_model_dir: str | os.PathLike | None = None
) -> LoadedAdapter:
    """The adapter on its local base model; raises ExportError unless every adapter tensor found a module."""
    from peft import PeftConfig, PeftModel
    from peft.auto import MODEL_TYPE_TO_PEFT_MODEL_MAPPING
    from transformers import AutoModelForCausalLM, AutoTokenizer

    adapter_dir = Path(adapter_dir).expanduser()
    recorded = read_adapter_config(adapter_dir).get("base_model_name_or_path")
    base = _local_base(adapter_dir, base_model_dir, recorded, "--base BASE_DIR on the command line")
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


# A streaming merge: one shard in memory at a time ------------------------------------------------------
#
# `load_adapter` + `save_merged` hold the whole base in float32: 32 GB for 8B, about 280 GB for 70B, more
# than a 128 GB DGX Spark has. `merge_streaming` never builds the model: it reads the base's safetensors
# shards one at a time, adds W0 + s·B·A to each adapted weight (s = alpha/r, or alpha/sqrt(r) for rsLoRA),
# writes the merged shard, and lets it go before reading the next. Peak memory: a few times one shard (the
# shard's mapped pages, the merged tensors, one float32 update) plus the adapter, whatever the model's size;
# tests/test_merge_streaming.py measures it.

BASE_INDEX = "model.safetensors.index.json"
BASE_SINGLE = "model.safetensors"
PEFT_PREFIX = "base_model.model."  # peft's save format: base_model.model.<module>.lora_A.weight
LORA_SUFFIXES = {".lora_A.weight": "A", ".lora_B.weight": "B"}
WEIGHT_FILE_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".h5", ".msgpack")
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "chat_template.jinja",
)
# adapter_config.json options whose merge is not W0 + s·B·A: refused, rather than merged wrongly.
UNSUPPORTED_OPTIONS = {
    "use_dora": "DoRA rescales each merged column by its magnitude m (merge it in memory: load_adapter)",
    "lora_bias": "a LoRA bias adds a bias term to the merged layer",
    "modules_to_save": "whole modules saved beside the adapter replace the base's",
    "rank_pattern": "per-module ranks change the scaling alpha/r module by module",
    "alpha_pattern": "per-module alphas change the scaling alpha/r module by module",
    "trainable_token_indices": "trained token rows replace rows of the embedding",
    "target_parameters": "adapters on bare parameters (MoE experts) are not nn.Linear weights",
    "layer_replication": "replicated layers change the base's layer list",
    "use_qalora": "QA-LoRA merges into a grouped-quantized weight",
    "use_bdlora": "BD-LoRA's B is block-diagonal",
    "alora_invocation_tokens": "an activated LoRA acts only after its invocation tokens: no merge",
}


@dataclass
class StreamingMerge:
    """What merge_streaming wrote: the folder, its shards, how many weights changed, the largest shard."""

    out_dir: Path
    shards: list[str]
    merged_weights: int
    largest_shard_bytes: int
    adapter_bytes: int
    notes: list[str] = field(default_factory=list)


def lora_scaling(config: dict) -> float:
    """The factor s in W = W0 + s·B·A: alpha / r, or alpha / sqrt(r) with use_rslora (peft's rule)."""
    rank, alpha = config["r"], config["lora_alpha"]
    return alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank


def merged_weight(
    W0: torch.Tensor, A: torch.Tensor, B: torch.Tensor, scaling: float, fan_in_fan_out: bool
) -> torch.Tensor:
    """W0 + scaling·B·A computed in float32 and rounded once to W0's dtype, in peft's order of operations."""
    # peft (LoraLayer.get_delta_weight, then merge): delta = transpose(B @ A) * scaling in float32, then
    # W0 += delta, which torch computes in float32 and rounds once into W0's dtype. The same operations in
    # the same order give the same bits.
    delta = B.float() @ A.float()  # (out, r) @ (r, in) -> (out, in)
    if fan_in_fan_out:  # GPT-2's Conv1D stores W as (in, out)
        delta = delta.T
    delta = delta * scaling
    delta += W0  # float32 + W0, promoted: one rounding at the cast below
    return delta.to(W0.dtype).contiguous()  # a transposed delta would be saved as a strided view


def _base_weight_map(base_dir: Path) -> dict[str, str]:
    """tensor name -> shard file name, from the index (sharded) or model.safetensors (one file)."""
    index = base_dir / BASE_INDEX
    if index.is_file():
        try:
            return dict(json.loads(index.read_text(encoding="utf-8"))["weight_map"])
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError) as error:
            raise ExportError(f"{index} is not a safetensors index with a weight_map ({error}).") from error
    if (base_dir / BASE_SINGLE).is_file():
        with safe_open(base_dir / BASE_SINGLE, framework="pt") as reader:
            return dict.fromkeys(reader.keys(), BASE_SINGLE)
    raise ExportError(
        f"{base_dir} has neither {BASE_INDEX} nor {BASE_SINGLE}: the streaming merge reads safetensors "
        f"weights only. Save the base with save_pretrained (safetensors is the default)."
    )


def _adapter_pairs(adapter_dir: Path) -> dict[str, dict[str, torch.Tensor]]:
    """module name -> {"A": lora_A, "B": lora_B}, from peft's keys; raises ExportError on any other key."""
    from safetensors.torch import load_file

    pairs: dict[str, dict[str, torch.Tensor]] = {}
    unknown = []
    for key, tensor in load_file(adapter_dir / ADAPTER_WEIGHTS).items():
        suffix = next((s for s in LORA_SUFFIXES if key.endswith(s)), None)
        if not key.startswith(PEFT_PREFIX) or suffix is None:
            unknown.append(key)
            continue
        pairs.setdefault(key[len(PEFT_PREFIX) : -len(suffix)], {})[LORA_SUFFIXES[suffix]] = tensor
    if unknown:
        raise ExportError(
            f"{adapter_dir / ADAPTER_WEIGHTS} holds {len(unknown)} tensors that are not LoRA A/B weights "
            f"of a linear layer (e.g. {unknown[0]}); the streaming merge would leave them unused. Embedding "
            f"adapters and saved modules need the in-memory merge (load_adapter, save_merged)."
        )
    if halves := [name for name, pair in pairs.items() if set(pair) != {"A", "B"}]:
        raise ExportError(
            f"{adapter_dir / ADAPTER_WEIGHTS} has lora_A without lora_B (or the reverse): {halves[0]}."
        )
    return pairs


def _same_base(recorded: str, base: Path) -> bool:
    """True when the adapter's base_model_name_or_path names the folder base (a path, or a hub id)."""
    if Path(recorded).expanduser().is_dir():
        return Path(recorded).expanduser().resolve() == base.resolve()
    # a hub id: the hub cache's folder models--org--name, or a download folder named after the model
    parts = base.resolve().parts
    return (
        "models--" + recorded.replace("/", "--") in parts or recorded.rstrip("/").split("/")[-1] == base.name
    )


def _copy_side_files(base_dir: Path, adapter_dir: Path, out: Path) -> None:
    """Config, generation config and tokenizer files of the base (the adapter's tokenizer if it has one)."""
    for path in sorted(base_dir.iterdir()):
        if path.is_file() and not path.name.startswith(".") and not path.name.endswith(WEIGHT_FILE_SUFFIXES):
            if path.name != BASE_INDEX:
                shutil.copy2(path, out / path.name)
    if (adapter_dir / "tokenizer.json").is_file():  # as load_adapter: a tokenizer saved with the adapter wins
        for name in TOKENIZER_FILES:
            if (adapter_dir / name).is_file():
                shutil.copy2(adapter_dir / name, out / name)


def merge_streaming(
    adapter_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    base_model_dir: str | os.PathLike | None = None,
    *,
    allow_other_base: bool = False,
) -> StreamingMerge:
    """Merge a LoRA adapter into its base shard by shard (peak ~ one shard + adapter); raises ExportError."""
    from safetensors.torch import save_file

    adapter_dir = Path(adapter_dir).expanduser()
    config = read_adapter_config(adapter_dir)
    # 1. Everything is checked before a byte is written: options, base folder, names and shapes.
    if config.get("peft_type", "LORA") != "LORA":
        raise ExportError(
            f"{adapter_dir} is a {config['peft_type']} adapter; the streaming merge merges LoRA."
        )
    if used := [f"{key} ({why})" for key, why in UNSUPPORTED_OPTIONS.items() if config.get(key)]:
        raise ExportError(
            f"{adapter_dir}/adapter_config.json sets {'; '.join(used)}. The streaming merge computes "
            f"W0 + s·B·A only, so it refuses rather than merge it wrongly."
        )
    recorded = config.get("base_model_name_or_path")
    base = _local_base(
        adapter_dir, base_model_dir, recorded, "base_model_dir, or --base BASE_DIR on the command line"
    )
    notes = []
    if recorded and not _same_base(recorded, base):
        if not allow_other_base:
            raise ExportError(
                f"The adapter in {adapter_dir} was trained on {recorded!r}, but the base given is "
                f"{str(base)!r}. Merging into another model gives a model nobody trained. If that folder "
                f"is the same model under another name, pass allow_other_base=True."
            )
        notes.append(f"the adapter records base model {recorded!r}; merged into {str(base)!r} as asked")
    weight_map = _base_weight_map(base)
    pairs = _adapter_pairs(adapter_dir)
    targets = {f"{name}.weight": name for name in pairs}
    if missing := [key for key in targets if key not in weight_map]:
        tied = " (tied to the embedding?)" if any("lm_head" in key for key in missing) else ""
        raise ExportError(
            f"The adapter in {adapter_dir} adapts {len(missing)} modules the base {base} does not have, "
            f"e.g. {missing[0]}{tied}. Was it trained on a different model?"
        )
    scaling, fan_in_fan_out = lora_scaling(config), bool(config.get("fan_in_fan_out"))
    for key, name in targets.items():
        with safe_open(base / weight_map[key], framework="pt") as reader:
            shape = tuple(reader.get_slice(key).get_shape())
        A, B = pairs[name]["A"], pairs[name]["B"]
        out_features, in_features = shape[::-1] if fan_in_fan_out else shape
        if len(shape) != 2 or A.shape != (config["r"], in_features) or B.shape != (out_features, config["r"]):
            raise ExportError(
                f"The adapter in {adapter_dir} does not fit the base {base}: {key} is {list(shape)}, "
                f"but lora_A is {list(A.shape)} and lora_B {list(B.shape)} (r = {config['r']}; expected A "
                f"[r, in], B [out, r]). Was it trained on a different model?"
            )
    # 2. One shard at a time: read, merge the adapted weights, write, let go.
    shards = list(dict.fromkeys(weight_map.values()))
    merged = largest = total = 0
    with atomic_folder(out_dir) as stage:
        for shard in shards:
            tensors: dict[str, torch.Tensor] = {}
            with safe_open(base / shard, framework="pt") as reader:
                metadata = reader.metadata() or {"format": "pt"}
                for key in reader.keys():
                    W0 = reader.get_tensor(key)
                    if key in targets:
                        pair = pairs[targets[key]]
                        W0 = merged_weight(W0, pair["A"], pair["B"], scaling, fan_in_fan_out)
                        merged += 1
                    tensors[key] = W0
            shard_bytes = sum(t.numel() * t.element_size() for t in tensors.values())
            largest, total = max(largest, shard_bytes), total + shard_bytes
            with atomic_output(stage / shard) as tmp:
                save_file(tensors, tmp, metadata=metadata)
            del tensors  # the next shard is read only after this one is on disk
        if merged != len(targets):  # an index naming a tensor that its shard lacks
            raise ExportError(f"{base}: the index lists adapted weights that no shard holds.")
        if (base / BASE_INDEX).is_file():
            index = json.loads((base / BASE_INDEX).read_text(encoding="utf-8"))
            index.setdefault("metadata", {})["total_size"] = total  # tensor bytes, as transformers counts
            (stage / BASE_INDEX).write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")
        _copy_side_files(base, adapter_dir, stage)
    adapter_bytes = sum(t.numel() * t.element_size() for pair in pairs.values() for t in pair.values())
    return StreamingMerge(Path(out_dir).expanduser(), shards, merged, largest, adapter_bytes, notes)


def streaming_refusal(adapter_dir: str | os.PathLike) -> str | None:
    """Why merge_streaming would refuse this adapter's options or tensors, or None when it can merge it."""
    adapter_dir = Path(adapter_dir).expanduser()
    config = read_adapter_config(adapter_dir)
    if config.get("peft_type", "LORA") != "LORA":
        return f"a {config['peft_type']} adapter"
    if used := [f"{key}: {why}" for key, why in UNSUPPORTED_OPTIONS.items() if config.get(key)]:
        return "; ".join(used)
    with safe_open(adapter_dir / ADAPTER_WEIGHTS, framework="pt") as reader:
        other = [
            k for k in reader.keys() if not (k.startswith(PEFT_PREFIX) and k.endswith(tuple(LORA_SUFFIXES)))
        ]
    return f"tensors other than lora_A/lora_B of linear layers, e.g. {other[0]}" if other else None


def merge_into_folder(
    adapter_dir: str | os.PathLike, hf_dir: str | os.PathLike, base_model_dir: str | os.PathLike | None = None
) -> tuple[Path, list[str]]:
    """The adapter merged into its base as a plain folder, streamed when possible; (folder, notes)."""
    adapter_dir = Path(adapter_dir).expanduser()
    reason = streaming_refusal(adapter_dir)
    if reason is not None:  # DoRA, embedding adapters, saved modules: peft's merge, whole model in float32
        loaded = load_adapter(adapter_dir, base_model_dir)
        note = f"merged in memory in float32 (about 4 bytes per parameter), since the adapter has {reason}"
        return save_merged(loaded.model, loaded.tokenizer, hf_dir), [*loaded.notes, note]
    recorded = read_adapter_config(adapter_dir).get("base_model_name_or_path")
    base = base_model_dir if base_model_dir is not None else recorded
    if base and Path(base).expanduser().is_dir():
        try:
            check_model_dir(base)  # a base we could not export is refused before any work, as in load_adapter
        except ExportError as error:
            raise ExportError(f"The base model folder cannot be used: {error}") from error
    # a base given explicitly is the reader's word that it is the adapter's model (shapes are still checked)
    result = merge_streaming(adapter_dir, hf_dir, base, allow_other_base=base_model_dir is not None)
    return result.out_dir, result.notes
