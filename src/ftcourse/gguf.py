"""Our GGUF writer and reader: a Hugging Face Llama folder, checked, then written as one GGUF file.

    check_model_dir -> read_llama_config + tensor table -> permute_qk -> write_gguf (f32, f16, q8_0)

Llama 2-style models with a GPT-2 byte-level tokenizer (the embedded model) and Llama 3.1-style ones
(llama3-scaled RoPE, written as llama.cpp's `rope_freqs` tensor; the `llama-bpe` pre-tokenizer; a BOS
added as tokenizer.json's post-processor adds it) are written; anything else is refused with the command
of llama.cpp's own converter. A model folder is checked completely before a byte is written: config.json
against the weights (layer count, heads x head dim, KV heads, every tensor present with its shape,
nothing unexpected), and every file readable. `gguf_stats` and `read_metadata` read a written file back.
"""

from __future__ import annotations

import io
import json
import os
import re
import sys
from collections.abc import Iterator
from contextlib import redirect_stderr
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import torch
from safetensors import SafetensorError, safe_open

from ftcourse.atomic import atomic_output

SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM",)
# Types our own Python writer produces; everything else (Q4_K_M, Q5_K_M, Q6_K, ...) goes through llama.cpp.
PYTHON_GGUF_TYPES = {
    "f32": (gguf.GGMLQuantizationType.F32, gguf.LlamaFileType.ALL_F32),
    "f16": (gguf.GGMLQuantizationType.F16, gguf.LlamaFileType.MOSTLY_F16),
    "q8_0": (gguf.GGMLQuantizationType.Q8_0, gguf.LlamaFileType.MOSTLY_Q8_0),
}
REQUIRED_FILES = ("config.json", "tokenizer.json", "tokenizer_config.json")
REQUIRED_CONFIG_KEYS = (
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "vocab_size",
    "rms_norm_eps",
    "max_position_embeddings",
)
SAFETENSORS_INDEX = "model.safetensors.index.json"
# llama.cpp's converter, which handles what this writer refuses. It ships in the llama-cpp-python source
# distribution, and imports sentencepiece before it looks at any tokenizer, a Llama 3 one included. Checked
# with 0.3.36: it reads a Llama 3.1 config (llama3 RoPE) and tokenizer; it accepts a BPE tokenizer only
# when the token ids of its test string match a known model's, so a newly trained one (the stand-in's,
# the embedded model's) stops there with "BPE pre-tokenizer was not recognized", while Meta's passes.
CONVERTER_COMMAND = (
    "pip download --no-binary :all: --no-deps llama-cpp-python==0.3.36 && "
    "tar xzf llama_cpp_python-0.3.36.tar.gz && pip install sentencepiece && "
    "python llama_cpp_python-0.3.36/vendor/llama.cpp/convert_hf_to_gguf.py MODEL_DIR "
    "--outfile model-f16.gguf --outtype f16"
)
# What to do when that converter stops on a newly trained BPE tokenizer. It hashes the token ids of a fixed
# test string (get_vocab_base_pre in its conversion code) and knows only the hashes of published models;
# the warning it prints before stopping shows the hash as "chkhsh: ...".
PRETOKENIZER_ADVICE = (
    'If that converter stops with "BPE pre-tokenizer was not recognized" (a tokenizer trained by you: its '
    "test-string hash is in no list), find the pre-tokenizer your tokenizer.json really uses (its "
    "\"pre_tokenizer\" entry; a GPT-2 byte-level one is llama.cpp's 'gpt-2', Llama 3's regex is "
    '\'llama-bpe\'), add `if chkhsh == "<the chkhsh it printed>": res = "<that name>"` to '
    "get_vocab_base_pre() in the converter, convert again, and check that llama.cpp's token ids equal "
    "transformers' on digits, spaces, apostrophes and emoji (llama_cpp.Llama(...).tokenize) before you "
    "trust the file."
)
CONVERTER_ADVICE = f"{CONVERTER_COMMAND}\n{PRETOKENIZER_ADVICE}"
# The pre-tokenizer regex of Llama 3 (meta-llama/Llama-3.1-8B tokenizer.json), llama.cpp's "llama-bpe".
LLAMA3_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
    r"\s*[\r\n]+|\s+(?!\S)|\s+"
)
LLAMA3_ROPE_KEYS = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")


class ExportError(RuntimeError):
    """A model, file or environment that the export cannot handle, explained for the reader."""


# --- 1. Reading and checking a Hugging Face model folder -------------------------------------------


def _read_json(path: Path) -> dict:
    """A JSON object from path, or an ExportError naming the file and the problem."""
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ExportError(f"{path} is not valid JSON ({error}); save the folder again.") from error
    if not isinstance(value, dict):
        raise ExportError(f"{path} holds a {type(value).__name__}, not a JSON object; save the folder again.")
    return value


def read_llama_config(model_dir: str | os.PathLike) -> dict:
    """config.json of a Llama model, with the values llama.cpp needs checked and filled in."""
    model_dir = Path(model_dir).expanduser()
    if not model_dir.is_dir():
        raise ExportError(f"{model_dir} is not a folder; give a Hugging Face model folder (save_pretrained).")
    for name in REQUIRED_FILES:
        if not (model_dir / name).is_file():
            raise ExportError(
                f"{model_dir} has no {name}. A model folder for export needs {', '.join(REQUIRED_FILES)} "
                f"and *.safetensors: save both model and tokenizer with save_pretrained(folder)."
            )
    config = _read_json(model_dir / "config.json")
    architectures = config.get("architectures") or [config.get("model_type", "unknown")]
    if architectures[0] not in SUPPORTED_ARCHITECTURES:
        raise ExportError(
            f"Cannot export architecture {architectures[0]!r}: this GGUF writer supports "
            f"{', '.join(SUPPORTED_ARCHITECTURES)} only. For other architectures use llama.cpp's "
            f"converter: {CONVERTER_ADVICE}"
        )
    if missing := [key for key in REQUIRED_CONFIG_KEYS if not isinstance(config.get(key), (int, float))]:
        raise ExportError(
            f"{model_dir}/config.json lacks {', '.join(missing)} (or they are not numbers): a Llama config "
            f"needs {', '.join(REQUIRED_CONFIG_KEYS)}."
        )
    # transformers 5 keeps RoPE settings in rope_parameters; older configs have rope_theta at top level.
    rope = config.get("rope_parameters") or config.get("rope_scaling") or {}
    rope = {"rope_theta": config.get("rope_theta", 10000.0), **rope}
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    unsupported = {
        f"rope_type {rope_type!r}": rope_type not in ("default", "llama3"),
        "a llama3 rope without " + ", ".join(LLAMA3_ROPE_KEYS): rope_type == "llama3"
        and any(not isinstance(rope.get(key), (int, float)) for key in LLAMA3_ROPE_KEYS),
        "attention_bias": config.get("attention_bias", False),
        "mlp_bias": config.get("mlp_bias", False),
        "hidden_act": config.get("hidden_act", "silu") != "silu",
    }
    if found := [key for key, bad in unsupported.items() if bad]:
        raise ExportError(
            f"{model_dir}/config.json uses {', '.join(found)}, which this writer does not handle. "
            f"llama.cpp's converter does: {CONVERTER_ADVICE}"
        )
    config["rope_theta"] = float(rope["rope_theta"])
    config["rope_llama3"] = (
        {key: float(rope[key]) for key in LLAMA3_ROPE_KEYS} if rope_type == "llama3" else None
    )
    config.setdefault("num_key_value_heads", config["num_attention_heads"])
    config["head_dim"] = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
    n_heads, n_kv_heads, head_dim = (
        config["num_attention_heads"],
        config["num_key_value_heads"],
        config["head_dim"],
    )
    if n_heads % n_kv_heads or head_dim % 2:
        raise ExportError(
            f"{model_dir}/config.json: {n_heads} attention heads cannot share {n_kv_heads} KV heads evenly, "
            f"or head_dim {head_dim} is odd (RoPE rotates pairs)."
        )
    return config


def weight_files(model_dir: str | os.PathLike) -> list[Path]:
    """The safetensors files that hold the model: the one file, or those the shard index lists."""
    model_dir = Path(model_dir).expanduser()
    found = sorted(model_dir.glob("*.safetensors"))
    if (model_dir / SAFETENSORS_INDEX).is_file():
        weight_map = _read_json(model_dir / SAFETENSORS_INDEX).get("weight_map")
        if not isinstance(weight_map, dict):
            raise ExportError(f"{model_dir / SAFETENSORS_INDEX} has no weight_map; save the folder again.")
        listed = sorted({model_dir / name for name in weight_map.values()})
        if missing := [p.name for p in listed if not p.is_file()]:
            raise ExportError(f"{model_dir / SAFETENSORS_INDEX} lists missing shards: {', '.join(missing)}.")
        if extra := [p.name for p in found if p not in listed]:
            raise ExportError(
                f"{model_dir} holds {', '.join(extra)}, which its shard index does not list: remove it."
            )
        return listed
    if not found:
        raise ExportError(f"{model_dir} has no *.safetensors weights: save the model with save_pretrained.")
    if len(found) > 1:
        raise ExportError(
            f"{model_dir} holds {len(found)} safetensors files ({', '.join(p.name for p in found)}) and no "
            f"{SAFETENSORS_INDEX}: one model folder holds one model; move the extra file out."
        )
    return found


def read_tensor_shapes(model_dir: str | os.PathLike) -> dict[str, tuple[int, ...]]:
    """Tensor name -> shape, from the safetensors headers (no weights are read)."""
    shapes: dict[str, tuple[int, ...]] = {}
    for file in weight_files(model_dir):
        if file.stat().st_size == 0:
            raise ExportError(f"{file} is empty: save the model again.")
        try:
            with safe_open(file, framework="pt") as reader:
                for name in reader.keys():
                    if name in shapes:
                        raise ExportError(f"Tensor {name!r} appears twice, the second time in {file}.")
                    shapes[name] = tuple(reader.get_slice(name).get_shape())
        except SafetensorError as error:
            raise ExportError(
                f"{file} is not a readable safetensors file ({error}): save the model again."
            ) from error
    return shapes


def expected_llama_shapes(config: dict) -> dict[str, tuple[int, ...]]:
    """Every tensor name a Llama with this config has, and its shape (out, in) as nn.Linear stores it."""
    hidden, inter, vocab = config["hidden_size"], config["intermediate_size"], config["vocab_size"]
    q_rows = config["num_attention_heads"] * config["head_dim"]
    kv_rows = config["num_key_value_heads"] * config["head_dim"]
    shapes = {"model.embed_tokens.weight": (vocab, hidden), "model.norm.weight": (hidden,)}
    if not config.get("tie_word_embeddings", False):
        shapes["lm_head.weight"] = (vocab, hidden)
    for i in range(config["num_hidden_layers"]):
        layer = f"model.layers.{i}"
        shapes |= {
            f"{layer}.input_layernorm.weight": (hidden,),
            f"{layer}.post_attention_layernorm.weight": (hidden,),
            f"{layer}.self_attn.q_proj.weight": (q_rows, hidden),
            f"{layer}.self_attn.k_proj.weight": (kv_rows, hidden),
            f"{layer}.self_attn.v_proj.weight": (kv_rows, hidden),
            f"{layer}.self_attn.o_proj.weight": (hidden, q_rows),
            f"{layer}.mlp.gate_proj.weight": (inter, hidden),
            f"{layer}.mlp.up_proj.weight": (inter, hidden),
            f"{layer}.mlp.down_proj.weight": (hidden, inter),
        }
    return shapes


def _listed(names: list[str], limit: int = 4) -> str:
    """A few names, and how many more."""
    return ", ".join(names[:limit]) + (f" and {len(names) - limit} more" if len(names) > limit else "")


def check_model_dir(model_dir: str | os.PathLike) -> dict:
    """The folder's checked Llama config; raises ExportError unless config and weights agree exactly."""
    model_dir = Path(model_dir).expanduser()
    config = read_llama_config(model_dir)
    found = read_tensor_shapes(model_dir)
    found = {name: shape for name, shape in found.items() if not name.endswith("rotary_emb.inv_freq")}
    expected = expected_llama_shapes(config)
    if config.get("tie_word_embeddings", False) and found.pop("lm_head.weight", None):
        # Some writers store the tied copy. llama.cpp will reuse the embedding, so it must be the same.
        tensors = dict(iter_hf_tensors(model_dir))
        if not np.array_equal(tensors["lm_head.weight"], tensors.get("model.embed_tokens.weight")):
            raise ExportError(
                f"{model_dir}/config.json says tie_word_embeddings, but lm_head.weight differs from "
                f"model.embed_tokens.weight: the output layer would be replaced. Fix tie_word_embeddings."
            )
    summary = (
        f"config.json says {config['num_hidden_layers']} layers, {config['num_attention_heads']} heads x "
        f"{config['head_dim']} dims, {config['num_key_value_heads']} KV heads"
    )
    if missing := [name for name in expected if name not in found]:
        raise ExportError(f"{model_dir}: {summary}, but the weights lack {_listed(missing)}.")
    if unexpected := [name for name in found if name not in expected]:
        raise ExportError(
            f"{model_dir}: the weights hold tensors a plain Llama with this config does not have: "
            f"{_listed(unexpected)}. (Bias tensors need attention_bias/mlp_bias, which this writer does not "
            f"handle; other extra tensors mean config.json and weights come from different models.)"
        )
    if wrong := [f"{n} {found[n]} (expected {shape})" for n, shape in expected.items() if found[n] != shape]:
        raise ExportError(f"{model_dir}: {summary}, but the tensor shapes disagree: {_listed(wrong, 3)}.")
    return config


def iter_hf_tensors(model_dir: str | os.PathLike) -> Iterator[tuple[str, np.ndarray]]:
    """(name, float32 array) for every tensor in the folder's safetensors files."""
    for file in weight_files(model_dir):
        try:
            with safe_open(file, framework="pt") as reader:
                for name in reader.keys():
                    # via torch, because numpy has no bfloat16
                    yield name, reader.get_tensor(name).float().numpy()
        except SafetensorError as error:
            raise ExportError(
                f"{file} is not a readable safetensors file ({error}): save the model again."
            ) from error


# --- 2. The Q/K permutation --------------------------------------------------------------------


def permute_qk(weight: np.ndarray, n_heads: int) -> np.ndarray:
    """Reorder q_proj/k_proj rows from HF's RoPE layout to llama.cpp's."""
    # HF rotates the pairs (x_i, x_{i+d/2}) of each head ("rotate_half"); llama.cpp's LLAMA RoPE
    # rotates neighbours (x_{2i}, x_{2i+1}). Interleaving the two halves of every head's rows makes
    # the same rotation. Without it the model still talks, but logits are off by whole units.
    head_dim = weight.shape[0] // n_heads
    return (
        weight.reshape(n_heads, 2, head_dim // 2, *weight.shape[1:])  # (heads, half, d/2, in)
        .swapaxes(1, 2)  # (heads, d/2, half, in): row 2i = x_i, row 2i+1 = x_{i+d/2}
        .reshape(weight.shape)
    )


def llama3_rope_factors(config: dict) -> np.ndarray:
    """llama.cpp's rope_freqs tensor for a llama3-scaled RoPE: what divides each pair's base frequency."""
    # Llama 3.1 stretches its 8192-token RoPE to 131072 positions (Meta's reference code,
    # apply_scaling): pairs whose wavelength is short (< original / high_freq_factor) keep their
    # frequency, long ones (> original / low_freq_factor) are slowed by `factor`, and those between are
    # blended. transformers bakes this into inv_freq; llama.cpp divides theta by these factors instead.
    scaling, head_dim = config["rope_llama3"], config["head_dim"]
    freqs = 1.0 / config["rope_theta"] ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    wavelength = 2 * np.pi / freqs
    original, factor = scaling["original_max_position_embeddings"], scaling["factor"]
    low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
    smooth = (original / wavelength - low) / (high - low)
    blended = 1.0 / ((1 - smooth) / factor + smooth)
    factors = np.where(
        wavelength < original / high, 1.0, np.where(wavelength > original / low, factor, blended)
    )
    return factors.astype(np.float32)


# --- 3. Tokenizer metadata ---------------------------------------------------------------------


@dataclass
class GGUFVocab:
    """What llama.cpp needs to rebuild the tokenizer: tokens, their kinds, merges, special ids."""

    tokens: list[str]
    token_types: list[int]
    merges: list[str]
    eos_id: int
    pad_id: int | None
    bos_id: int
    add_bos: bool
    chat_template: str | None
    pre: str = "gpt-2"  # llama.cpp's name for the pre-tokenizer: "gpt-2" or "llama-bpe"


def _special_token_id(tok_config: dict, key: str, token_to_id: dict[str, int]) -> int | None:
    """Id of a special token named in tokenizer_config.json (a string or an AddedToken dict)."""
    value = tok_config.get(key)
    if isinstance(value, dict):
        value = value.get("content")
    return token_to_id.get(value) if value else None


def gguf_chat_template(template: str) -> str:
    """The chat template without transformers' {% generation %} markers, which plain Jinja rejects."""
    # The markers only tell TRL which tokens are the assistant's; they render nothing. Runners that
    # compile the embedded template with plain jinja2 fail on them ("unknown tag 'generation'"):
    # llama-cpp-python before its PR #2226 (2026) refused to load such a model, and other jinja2-based
    # servers still may. llama.cpp and llama-cpp-python 0.3.36 ignore the tag; without it every reader
    # works. An `if true` block keeps any whitespace-control dashes exactly as they were.
    template = re.sub(r"\{%(-?)\s*generation\s*(-?)%\}", r"{%\1 if true \2%}", template)
    return re.sub(r"\{%(-?)\s*endgeneration\s*(-?)%\}", r"{%\1 endif \2%}", template)


def gguf_pre_tokenizer(tok_json: dict) -> str | None:
    """llama.cpp's name for tokenizer.json's pre-tokenizer ('gpt-2' or 'llama-bpe'), or None if neither."""
    # llama.cpp's converter recognises a vocabulary by hashing the ids of a test string, so it refuses
    # any newly trained one; we read the pre-tokenizer's definition instead, and accept exactly two.
    pre = tok_json.get("pre_tokenizer") or {}
    if pre.get("type") == "ByteLevel" and pre.get("use_regex", True) and not pre.get("add_prefix_space"):
        return "gpt-2"  # GPT-2's regex, built into ByteLevel
    steps = pre.get("pretokenizers") or []
    if pre.get("type") == "Sequence" and len(steps) == 2:
        split, byte_level = steps
        if (
            split.get("type") == "Split"
            and (split.get("pattern") or {}).get("Regex") == LLAMA3_PATTERN
            and split.get("behavior") == "Isolated"
            and not split.get("invert")
            and byte_level.get("type") == "ByteLevel"
            and not byte_level.get("use_regex", True)
            and not byte_level.get("add_prefix_space")
        ):
            return "llama-bpe"
    return None


def _post_processor_adds(tok_json: dict, bos_id: int | None) -> bool:
    """Whether tokenizer.json's post-processor puts the BOS token before every text (Llama 3 does)."""
    post = tok_json.get("post_processor") or {}
    steps = post.get("processors", []) if post.get("type") == "Sequence" else [post]
    for step in steps:
        if step.get("type") == "TemplateProcessing" and step.get("single"):
            first = step["single"][0].get("SpecialToken", {}).get("id")
            tokens = step.get("special_tokens", {}).get(first, {}).get("ids", [])
            return bos_id is not None and tokens == [bos_id]
    return False


def read_gguf_vocab(model_dir: str | os.PathLike, vocab_size: int) -> GGUFVocab:
    """Read tokenizer.json/tokenizer_config.json into the GGUF 'gpt2' tokenizer layout."""
    model_dir = Path(model_dir)
    tok_json = _read_json(model_dir / "tokenizer.json")
    tok_config = _read_json(model_dir / "tokenizer_config.json")
    bpe = tok_json["model"]
    pre_name = gguf_pre_tokenizer(tok_json)
    if bpe.get("type") != "BPE" or pre_name is None:
        raise ExportError(
            f"{model_dir}/tokenizer.json is neither a GPT-2 style byte-level BPE nor Llama 3's (model "
            f"{bpe.get('type')!r}, pre-tokenizer {json.dumps(tok_json.get('pre_tokenizer'))[:160]}); this "
            f"writer declares llama.cpp's 'gpt-2' or 'llama-bpe' pre-tokenizer only. llama.cpp's converter "
            f"knows many more: {CONVERTER_ADVICE}"
        )
    id_to_token = {i: t for t, i in bpe["vocab"].items()}
    added = {a["id"]: a for a in tok_json.get("added_tokens", [])}
    id_to_token.update({i: a["content"] for i, a in added.items()})
    if max(id_to_token) >= vocab_size:
        raise ExportError(f"Tokenizer has id {max(id_to_token)} but the model's vocab_size is {vocab_size}.")

    tokens, token_types = [], []
    for i in range(vocab_size):
        if i not in id_to_token:  # embedding rows no token uses (vocab padded for speed)
            tokens.append(f"[PAD{i}]")
            token_types.append(gguf.TokenType.UNUSED)
            continue
        tokens.append(id_to_token[i])
        if i not in added:
            token_types.append(gguf.TokenType.NORMAL)
        else:  # special added tokens (<|im_end|>) are CONTROL, as llama.cpp's own converter marks them
            token_types.append(gguf.TokenType.CONTROL if added[i]["special"] else gguf.TokenType.USER_DEFINED)
    # tokenizers >= 0.20 saves merges as pairs; GGUF wants "left right" strings.
    merges = [m if isinstance(m, str) else " ".join(m) for m in bpe["merges"]]

    token_to_id = {t: i for i, t in id_to_token.items()}
    eos_id = _special_token_id(tok_config, "eos_token", token_to_id)
    if eos_id is None:
        raise ExportError(
            f"{model_dir}/tokenizer_config.json names no eos_token: generation could never stop."
        )
    pad_id = _special_token_id(tok_config, "pad_token", token_to_id)
    bos_id = _special_token_id(tok_config, "bos_token", token_to_id)
    # With no BOS key llama.cpp assumes id 11 for 'gpt2' vocabularies, an ordinary token. We name a
    # special token instead (as Qwen's GGUFs do) and keep add_bos false, so no BOS is ever added.
    add_bos = bos_id is not None and bool(
        tok_config.get("add_bos_token", _post_processor_adds(tok_json, bos_id))
    )
    bos_id = bos_id if bos_id is not None else (pad_id if pad_id is not None else eos_id)

    template_file = model_dir / "chat_template.jinja"  # transformers 5 saves the template here
    template = template_file.read_text() if template_file.is_file() else tok_config.get("chat_template")
    return GGUFVocab(
        tokens,
        token_types,
        merges,
        eos_id,
        pad_id,
        bos_id,
        add_bos,
        gguf_chat_template(template) if isinstance(template, str) else None,
        pre_name,
    )


# --- 4. Writing GGUF ---------------------------------------------------------------------------


def _add_model_metadata(writer: gguf.GGUFWriter, config: dict, name: str, file_type: int) -> None:
    """Hyperparameters llama.cpp reads to build the Llama graph."""
    writer.add_name(name)
    writer.add_context_length(config["max_position_embeddings"])
    writer.add_embedding_length(config["hidden_size"])
    writer.add_block_count(config["num_hidden_layers"])
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_head_count(config["num_attention_heads"])
    writer.add_head_count_kv(config["num_key_value_heads"])
    writer.add_key_length(config["head_dim"])
    writer.add_value_length(config["head_dim"])
    writer.add_rope_dimension_count(config["head_dim"])
    writer.add_rope_freq_base(config["rope_theta"])
    writer.add_layer_norm_rms_eps(config["rms_norm_eps"])
    writer.add_vocab_size(config["vocab_size"])
    writer.add_file_type(file_type)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)


def _add_tokenizer_metadata(writer: gguf.GGUFWriter, vocab: GGUFVocab) -> None:
    """Tokenizer and chat template, so the GGUF file is self-contained."""
    writer.add_tokenizer_model("gpt2")  # llama.cpp's name for byte-level BPE
    writer.add_tokenizer_pre(vocab.pre)
    writer.add_token_list(vocab.tokens)
    writer.add_token_types(vocab.token_types)
    writer.add_token_merges(vocab.merges)
    writer.add_eos_token_id(vocab.eos_id)
    writer.add_bos_token_id(vocab.bos_id)
    if vocab.pad_id is not None:
        writer.add_pad_token_id(vocab.pad_id)
    writer.add_add_bos_token(vocab.add_bos)
    writer.add_add_eos_token(False)
    if vocab.chat_template:
        writer.add_chat_template(vocab.chat_template)


F16_MAX = float(np.finfo(np.float16).max)  # 65504: a larger weight becomes inf in a f16 file


def _check_f16_range(name: str, array: np.ndarray, qtype: gguf.GGMLQuantizationType) -> None:
    """Raise ExportError if a weight would overflow f16 (f16 values, or q8_0's f16 block scale max/127)."""
    limit = F16_MAX * (127 if qtype == gguf.GGMLQuantizationType.Q8_0 else 1)
    largest = float(np.abs(array).max()) if array.size else 0.0
    if largest > limit:
        raise ExportError(
            f"Tensor {name!r} holds a weight of magnitude {largest:.3g}, beyond what a "
            f"{qtype.name} file can store ({limit:g}; the largest f16 value is {F16_MAX:g}): "
            f"it would be written as inf. Export f32 (--quant f32) or find why training produced it."
        )


def _encode_tensor(
    array: np.ndarray, qtype: gguf.GGMLQuantizationType
) -> tuple[np.ndarray, gguf.GGMLQuantizationType | None]:
    """Array in the requested GGUF type, and the raw type to declare for quantized bytes."""
    if array.ndim == 1 or qtype == gguf.GGMLQuantizationType.F32:
        return array.astype(np.float32), None  # norms stay f32, as in llama.cpp's own converter
    if qtype == gguf.GGMLQuantizationType.Q8_0 and array.shape[-1] % 32 == 0:  # Q8_0 blocks hold 32 values
        return gguf.quants.quantize(array, qtype), qtype
    return array.astype(np.float16), None


def check_gguf_type(dtype: str) -> str:
    """The writer's name for dtype ('f32', 'f16', 'q8_0'); raises ExportError for any other type."""
    if dtype.lower() not in PYTHON_GGUF_TYPES:
        raise ExportError(
            f"write_gguf writes {', '.join(PYTHON_GGUF_TYPES)}; got {dtype!r}. "
            f"Use llamacpp.quantize_gguf for llama.cpp types such as Q4_K_M."
        )
    return dtype.lower()


def write_gguf(
    model_dir: str | os.PathLike,
    out_path: str | os.PathLike,
    dtype: str = "f16",
    *,
    name: str | None = None,
    permute: bool = True,
    progress: bool = False,
) -> Path:
    """Write a checked Hugging Face Llama folder as one GGUF file (dtype 'f32', 'f16' or 'q8_0'); its path."""
    qtype, file_type = PYTHON_GGUF_TYPES[check_gguf_type(dtype)]
    model_dir = Path(model_dir).expanduser()
    config = check_model_dir(model_dir)  # config and weights agree, before a byte is written
    vocab = read_gguf_vocab(model_dir, config["vocab_size"])
    n_layers, n_heads, n_kv_heads = (
        config[k] for k in ("num_hidden_layers", "num_attention_heads", "num_key_value_heads")
    )
    tensor_names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, n_layers)

    with atomic_output(out_path) as tmp:
        writer = gguf.GGUFWriter(tmp, arch=gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.LLAMA])
        try:
            _add_model_metadata(writer, config, name or model_dir.name, file_type)
            _add_tokenizer_metadata(writer, vocab)
            if config["rope_llama3"]:  # llama3 RoPE scaling: llama.cpp reads it from this tensor
                writer.add_tensor(
                    gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ROPE_FREQS] + ".weight", llama3_rope_factors(config)
                )
            for hf_name, array in iter_hf_tensors(model_dir):
                if hf_name.endswith("rotary_emb.inv_freq"):  # recomputed by llama.cpp from rope_freq_base
                    continue
                if hf_name == "lm_head.weight" and config.get("tie_word_embeddings", False):
                    continue  # llama.cpp reuses token_embd for a tied output layer
                if not np.isfinite(array).all():
                    raise ExportError(f"{model_dir}: tensor {hf_name!r} holds NaN or infinite values.")
                if array.ndim > 1 and qtype != gguf.GGMLQuantizationType.F32:
                    _check_f16_range(hf_name, array, qtype)
                gguf_name = tensor_names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
                if permute and hf_name.endswith("q_proj.weight"):
                    array = permute_qk(array, n_heads)
                elif permute and hf_name.endswith("k_proj.weight"):
                    array = permute_qk(array, n_kv_heads)  # K has only the KV heads under GQA
                data, raw_dtype = _encode_tensor(array, qtype)
                writer.add_tensor(gguf_name, data, raw_dtype=raw_dtype)
            writer.write_header_to_file()
            writer.write_kv_data_to_file()
            writer.write_tensors_to_file(progress=progress)
        finally:
            writer.close()
    return Path(out_path).expanduser()


# --- 5. Reading a GGUF file back ---------------------------------------------------------------


def read_metadata(gguf_path: str | os.PathLike) -> dict[str, Any]:
    """Every key-value field of a GGUF file, as Python values (the token list included)."""
    return {name: field.contents() for name, field in gguf.GGUFReader(gguf_path).fields.items()}


def q8_0_round_trip(weight: np.ndarray) -> np.ndarray:
    """The weight after Q8_0 quantization and dequantization, exactly as write_gguf stores it."""
    q8_0 = gguf.GGMLQuantizationType.Q8_0
    return gguf.quants.dequantize(gguf.quants.quantize(weight, q8_0), q8_0)


@dataclass(frozen=True)
class GGUFStats:
    """What a GGUF file holds: its size on disk, its weights, and the types they are stored in."""

    path: Path
    file_bytes: int
    tensor_bytes: int
    n_weights: int
    weights_per_type: dict[str, int]  # tensor type name (F16, Q8_0, Q4_K, ...) -> weights stored in it

    @property
    def bits_per_weight(self) -> float:
        """Bits per weight over the whole file, metadata (tokenizer, template) included."""
        return 8 * self.file_bytes / self.n_weights

    @property
    def tensor_bits_per_weight(self) -> float:
        """Bits per weight of the tensor data alone."""
        return 8 * self.tensor_bytes / self.n_weights


def gguf_stats(gguf_path: str | os.PathLike) -> GGUFStats:
    """Read a GGUF file's tensor table: how many weights, how many bytes, in which types."""
    tensors = gguf.GGUFReader(gguf_path).tensors
    per_type: dict[str, int] = {}
    for tensor in tensors:
        per_type[tensor.tensor_type.name] = per_type.get(tensor.tensor_type.name, 0) + int(tensor.n_elements)
    return GGUFStats(
        Path(gguf_path),
        Path(gguf_path).stat().st_size,
        sum(int(t.n_bytes) for t in tensors),
        sum(int(t.n_elements) for t in tensors),
        per_type,
    )


def load_gguf_with_transformers(gguf_path: str | os.PathLike, progress: bool = False) -> torch.nn.Module:
    """Read a GGUF file back into a transformers model: an independent second reader of our file."""
    from transformers import AutoModelForCausalLM

    gguf_path = Path(gguf_path)
    # transformers dequantizes to float32 and undoes the Q/K permutation itself. It draws a progress bar
    # over the tensors that no setting turns off; without `progress`, only that bar's lines are dropped.
    captured = io.StringIO()
    with redirect_stderr(captured if not progress else sys.stderr):
        model = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    kept = [line for line in re.split(r"[\r\n]+", captured.getvalue()) if line and "GGUF tensors" not in line]
    if kept:
        print("\n".join(kept), file=sys.stderr)
    return model
