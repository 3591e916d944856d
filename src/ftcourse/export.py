"""Deployment: merge an adapter, write GGUF, quantize it, and check llama.cpp against transformers.

The path from a fine-tuned Hugging Face model to a file that llama.cpp (and so Ollama) can run:

    merge_adapter -> save_pretrained -> write_gguf(f16) -> write_gguf(q8_0) -> quantize_gguf(Q4_K_M)

Every step is checked numerically with `compare_with_llama_cpp`: the same token ids go through
transformers and through llama.cpp, and the logits must agree. The Ollama side (Modelfile, client)
lives in `ftcourse.modelfile`; `export_pipeline` runs the whole chain.
"""

from __future__ import annotations

import copy
import io
import json
import logging
import os
import re
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, redirect_stderr
from dataclasses import dataclass, field
from pathlib import Path

import gguf
import numpy as np
import torch
from safetensors import safe_open

logger = logging.getLogger(__name__)

SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM",)
LLAMA_CPP_INSTALL = 'CMAKE_ARGS="-DGGML_NATIVE=OFF -DLLAVA_BUILD=OFF" pip install llama-cpp-python==0.3.36'
# Types our own Python writer produces; everything else (Q4_K_M, Q5_K_M, Q6_K, ...) goes through llama.cpp.
PYTHON_GGUF_TYPES = {
    "f32": (gguf.GGMLQuantizationType.F32, gguf.LlamaFileType.ALL_F32),
    "f16": (gguf.GGMLQuantizationType.F16, gguf.LlamaFileType.MOSTLY_F16),
    "q8_0": (gguf.GGMLQuantizationType.Q8_0, gguf.LlamaFileType.MOSTLY_Q8_0),
}
REQUIRED_FILES = ("config.json", "tokenizer.json", "tokenizer_config.json")
SMALL_MODEL_BYTES = 256 * 2**20  # below this, llama.cpp runs on one thread (see open_llama)


class ExportError(RuntimeError):
    """A model, file or environment that the export cannot handle, explained for the reader."""


# --- 1. Merging an adapter --------------------------------------------------------------------


def merge_adapter(peft_model: torch.nn.Module, keep_adapter: bool = True) -> torch.nn.Module:
    """Fold LoRA-style adapter weights into the base weights: W = W0 + (alpha / r) * B @ A."""
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


# --- 2. Reading a Hugging Face model folder ---------------------------------------------------


def read_llama_config(model_dir: str | os.PathLike) -> dict:
    """config.json of a Llama model, with the values llama.cpp needs checked and filled in."""
    model_dir = Path(model_dir)
    for name in REQUIRED_FILES:
        if not (model_dir / name).is_file():
            raise ExportError(
                f"{model_dir} has no {name}. A model folder for export needs {', '.join(REQUIRED_FILES)} "
                f"and *.safetensors: save both model and tokenizer with save_pretrained(folder)."
            )
    config = json.loads((model_dir / "config.json").read_text())
    architectures = config.get("architectures") or [config.get("model_type", "unknown")]
    if architectures[0] not in SUPPORTED_ARCHITECTURES:
        raise ExportError(
            f"Cannot export architecture {architectures[0]!r}: this GGUF writer supports "
            f"{', '.join(SUPPORTED_ARCHITECTURES)} only. For other architectures use llama.cpp's "
            f"convert_hf_to_gguf.py."
        )
    # transformers 5 keeps RoPE settings in rope_parameters; older configs have rope_theta at top level.
    rope = config.get("rope_parameters") or {"rope_theta": config.get("rope_theta", 10000.0)}
    unsupported = {
        "rope type": rope.get("rope_type", "default") != "default",
        "attention_bias": config.get("attention_bias", False),
        "mlp_bias": config.get("mlp_bias", False),
        "hidden_act": config.get("hidden_act", "silu") != "silu",
    }
    if found := [key for key, bad in unsupported.items() if bad]:
        raise ExportError(
            f"{model_dir}/config.json uses {', '.join(found)}, which this writer does not handle."
        )
    config["rope_theta"] = float(rope["rope_theta"])
    config.setdefault("num_key_value_heads", config["num_attention_heads"])
    config["head_dim"] = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
    return config


def iter_hf_tensors(model_dir: str | os.PathLike) -> Iterator[tuple[str, np.ndarray]]:
    """(name, float32 array) for every tensor in the folder's safetensors files."""
    files = sorted(Path(model_dir).glob("*.safetensors"))
    if not files:
        raise ExportError(f"{model_dir} has no *.safetensors weights: save the model with save_pretrained.")
    for file in files:
        with safe_open(file, framework="pt") as reader:
            for name in reader.keys():
                # via torch, because numpy has no bfloat16
                yield name, reader.get_tensor(name).float().numpy()


# --- 3. The Q/K permutation -------------------------------------------------------------------


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


# --- 4. Tokenizer metadata --------------------------------------------------------------------


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


def read_gguf_vocab(model_dir: str | os.PathLike, vocab_size: int) -> GGUFVocab:
    """Read tokenizer.json/tokenizer_config.json into the GGUF 'gpt2' tokenizer layout."""
    model_dir = Path(model_dir)
    tok_json = json.loads((model_dir / "tokenizer.json").read_text())
    tok_config = json.loads((model_dir / "tokenizer_config.json").read_text())
    bpe = tok_json["model"]
    pre = tok_json.get("pre_tokenizer") or {}
    # We declare llama.cpp's "gpt-2" pre-tokenizer (llama.cpp's converter refuses unknown vocabularies);
    # that is only right for a byte-level BPE that splits with GPT-2's regex and adds no prefix space.
    if bpe.get("type") != "BPE" or pre.get("type") != "ByteLevel" or pre.get("add_prefix_space"):
        raise ExportError(
            f"{model_dir}/tokenizer.json is not a GPT-2 style byte-level BPE "
            f"(model {bpe.get('type')!r}, pre-tokenizer {pre.get('type')!r}, add_prefix_space "
            f"{pre.get('add_prefix_space')!r}); this writer declares llama.cpp's 'gpt-2' pre-tokenizer only."
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
    add_bos = bos_id is not None and bool(tok_config.get("add_bos_token", False))
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
    )


# --- 5. Writing GGUF --------------------------------------------------------------------------


@contextmanager
def atomic_output(out_path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside out_path; rename it to out_path only if the block succeeds."""
    out_path = Path(out_path)
    tmp = out_path.with_name(f".{out_path.name}.{os.getpid()}.partial")
    try:
        out_path.parent.mkdir(parents=True, exist_ok=True)
        tmp.touch()  # fail now, with a clear message, rather than after minutes of work
    except OSError as error:
        raise ExportError(
            f"Cannot write {out_path}: {error.strerror}. Choose an output folder you can write to."
        ) from error
    try:
        yield tmp
        # Same folder, so the rename is atomic: readers see the old file or the whole new one, never half.
        os.replace(tmp, out_path)
    finally:
        tmp.unlink(missing_ok=True)


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
    writer.add_tokenizer_pre("gpt-2")
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


def _encode_tensor(
    array: np.ndarray, qtype: gguf.GGMLQuantizationType
) -> tuple[np.ndarray, gguf.GGMLQuantizationType | None]:
    """Array in the requested GGUF type, and the raw type to declare for quantized bytes."""
    if array.ndim == 1 or qtype == gguf.GGMLQuantizationType.F32:
        return array.astype(np.float32), None  # norms stay f32, as in llama.cpp's own converter
    if qtype == gguf.GGMLQuantizationType.Q8_0 and array.shape[-1] % 32 == 0:  # Q8_0 blocks hold 32 values
        return gguf.quants.quantize(array, qtype), qtype
    return array.astype(np.float16), None


def write_gguf(
    model_dir: str | os.PathLike,
    out_path: str | os.PathLike,
    dtype: str = "f16",
    *,
    name: str | None = None,
    permute: bool = True,
    progress: bool = False,
) -> Path:
    """Write a Hugging Face Llama folder as one GGUF file (dtype 'f32', 'f16' or 'q8_0')."""
    if dtype.lower() not in PYTHON_GGUF_TYPES:
        raise ExportError(
            f"write_gguf writes {', '.join(PYTHON_GGUF_TYPES)}; got {dtype!r}. "
            f"Use quantize_gguf for llama.cpp types such as Q4_K_M."
        )
    qtype, file_type = PYTHON_GGUF_TYPES[dtype.lower()]
    model_dir = Path(model_dir)
    config = read_llama_config(model_dir)
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
            for hf_name, array in iter_hf_tensors(model_dir):
                if hf_name.endswith("rotary_emb.inv_freq"):  # recomputed by llama.cpp from rope_freq_base
                    continue
                gguf_name = tensor_names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
                if gguf_name is None:
                    raise ExportError(
                        f"Tensor {hf_name!r} has no llama.cpp name: is this a plain Llama model?"
                    )
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
    return Path(out_path)


# --- 6. Quantizing with llama.cpp -------------------------------------------------------------


def llama_cpp_available() -> bool:
    """True when llama-cpp-python can be imported."""
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        return False
    return True


def _import_llama_cpp():
    """The llama_cpp module, or an ExportError that says how to install it."""
    try:
        import llama_cpp
    except ImportError as error:
        raise ExportError(
            f"llama-cpp-python is not installed. It builds from source (4-10 min on 2 cores):\n"
            f"    {LLAMA_CPP_INSTALL}"
        ) from error
    return llama_cpp


def open_llama(gguf_path: str | os.PathLike, **options):
    """A llama_cpp.Llama for the file, quiet, and on one thread when the model is small."""
    llama_cpp = _import_llama_cpp()
    if Path(gguf_path).stat().st_size < SMALL_MODEL_BYTES:
        # A few MiB of weights take well under a millisecond per token; a second thread costs more in
        # wake-ups and barriers than it saves, and on a busy CPU its spin-waits make a step 100x slower.
        options = {"n_threads": 1, "n_threads_batch": 1, **options}
    return llama_cpp.Llama(model_path=str(gguf_path), verbose=False, **options)


def quantize_gguf(
    f16_path: str | os.PathLike, out_path: str | os.PathLike, quant: str = "Q4_K_M", verbose: bool = False
) -> Path:
    """Quantize a f16/f32 GGUF with llama.cpp's own quantizer (K-quants such as Q4_K_M)."""
    llama_cpp = _import_llama_cpp()
    ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{quant.upper()}", None)
    if ftype is None:
        known = sorted(
            n.removeprefix("LLAMA_FTYPE_MOSTLY_")
            for n in dir(llama_cpp)
            if n.startswith("LLAMA_FTYPE_MOSTLY_")
        )
        raise ExportError(f"llama.cpp has no quantization type {quant!r}; known: {', '.join(known)}.")
    if not Path(f16_path).is_file():
        raise ExportError(f"No GGUF file at {f16_path}: write one first with write_gguf(..., dtype='f16').")
    if "_K" in quant.upper():
        # K-quants pack 256 values per block; narrower rows make llama.cpp fall back to older types.
        narrow = [t.name for t in gguf.GGUFReader(f16_path).tensors if len(t.shape) == 2 and t.shape[0] % 256]
        if narrow:
            logger.warning(
                "Rows of %s are not a multiple of 256: llama.cpp will not use %s for them.", narrow, quant
            )
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = ftype
    # llama.cpp logs every tensor; llama-cpp-python routes its log through this logger.
    logging.getLogger("llama-cpp-python").setLevel(logging.DEBUG if verbose else logging.ERROR)
    with atomic_output(out_path) as tmp:
        status = llama_cpp.llama_model_quantize(str(f16_path).encode(), str(tmp).encode(), params)
        if status != 0:
            raise ExportError(
                f"llama.cpp could not quantize {f16_path} to {quant} (status {status}); "
                f"rerun with verbose=True to see its log."
            )
    return Path(out_path)


# --- 7. Checking the GGUF file against transformers ------------------------------------------


@dataclass
class PromptComparison:
    """transformers vs llama.cpp on one prompt: logits on the prompt, then greedy continuations."""

    prompt_ids: list[int]
    max_abs_logit_diff: float
    argmax_agreement: float
    hf_tokens: list[int]
    gguf_tokens: list[int]
    first_divergence: int | None  # index into the generated tokens; None when all are equal
    gap_at_divergence: float | None  # transformers' top-1 minus top-2 logit there: small = a near tie


@dataclass
class GGUFComparison:
    """One GGUF file compared with the transformers model on several prompts."""

    gguf_path: Path
    prompts: list[PromptComparison] = field(default_factory=list)

    @property
    def max_abs_logit_diff(self) -> float:
        return max(p.max_abs_logit_diff for p in self.prompts)

    @property
    def argmax_agreement(self) -> float:
        """Fraction of all prompt positions where both pick the same next token."""
        n = sum(len(p.prompt_ids) for p in self.prompts)
        return sum(p.argmax_agreement * len(p.prompt_ids) for p in self.prompts) / n

    @property
    def greedy_equal(self) -> bool:
        return all(p.first_divergence is None for p in self.prompts)

    def greedy_equal_except_ties(self, tie_gap: float) -> bool:
        """Greedy tokens equal, or first different where transformers' top two logits were < tie_gap apart."""
        # If every logit is within eps of the other side, the argmax can only flip where the top two
        # logits are within 2 * eps: such a divergence is rounding, not a conversion error.
        return all(p.first_divergence is None or p.gap_at_divergence < tie_gap for p in self.prompts)

    def summary(self) -> str:
        diverged = [p.first_divergence for p in self.prompts if p.first_divergence is not None]
        return (
            f"{self.gguf_path.name}: max |dlogit| {self.max_abs_logit_diff:.3g}, "
            f"argmax agreement {self.argmax_agreement:.1%}, greedy equal on "
            f"{len(self.prompts) - len(diverged)}/{len(self.prompts)} prompts"
            + (f" (first divergence at token {min(diverged)})" if diverged else "")
        )


@torch.no_grad()
def _hf_logits_and_greedy(
    model: torch.nn.Module, ids: list[int], max_new_tokens: int
) -> tuple[np.ndarray, list[int], list[float]]:
    """Prompt logits (T, V), greedy tokens, and the top-1/top-2 gap at each greedy step."""
    out = model(input_ids=torch.tensor([ids]), use_cache=True)
    prompt_logits = out.logits[0].float().numpy()
    tokens, gaps = [], []
    for _ in range(max_new_tokens):  # no stop on EOS: both sides must produce the same number of tokens
        top2 = out.logits[0, -1].float().topk(2)
        tokens.append(int(top2.indices[0]))
        gaps.append(float(top2.values[0] - top2.values[1]))
        out = model(
            input_ids=top2.indices[:1].view(1, 1), past_key_values=out.past_key_values, use_cache=True
        )
    return prompt_logits, tokens, gaps


def _llama_cpp_logits_and_greedy(llm, ids: list[int], max_new_tokens: int) -> tuple[np.ndarray, list[int]]:
    """The same as _hf_logits_and_greedy, computed by llama.cpp."""
    llm.reset()
    llm.eval(ids)  # exactly these ids: llama.cpp adds no BOS on this path
    prompt_logits = np.array(llm.scores[: len(ids)], dtype=np.float32)
    tokens = []
    for _ in range(max_new_tokens):
        tokens.append(int(np.argmax(llm.scores[llm.n_tokens - 1])))
        llm.eval([tokens[-1]])
    return prompt_logits, tokens


def compare_with_llama_cpp(
    model: torch.nn.Module,
    tokenizer,
    gguf_path: str | os.PathLike,
    prompts: Sequence[str | Sequence[int]],
    max_new_tokens: int = 16,
) -> GGUFComparison:
    """Feed the same token ids to transformers and to llama.cpp and compare logits and greedy tokens."""
    # Special tokens written in a prompt (<|im_start|>) become their ids; nothing else is added.
    all_ids = [
        list(p) if not isinstance(p, str) else tokenizer(p, add_special_tokens=False)["input_ids"]
        for p in prompts
    ]
    n_ctx = max(len(ids) for ids in all_ids) + max_new_tokens + 1
    model.eval()
    llm = open_llama(gguf_path, logits_all=True, n_ctx=n_ctx)
    report = GGUFComparison(Path(gguf_path))
    try:
        for ids in all_ids:
            hf_logits, hf_tokens, gaps = _hf_logits_and_greedy(model, ids, max_new_tokens)
            cpp_logits, cpp_tokens = _llama_cpp_logits_and_greedy(llm, ids, max_new_tokens)
            if cpp_logits.shape != hf_logits.shape:
                raise ExportError(
                    f"{gguf_path} gives logits of shape {cpp_logits.shape}, transformers {hf_logits.shape}."
                )
            pairs = enumerate(zip(hf_tokens, cpp_tokens, strict=True))
            divergence = next((i for i, (a, b) in pairs if a != b), None)
            report.prompts.append(
                PromptComparison(
                    prompt_ids=ids,
                    max_abs_logit_diff=float(np.abs(hf_logits - cpp_logits).max()),
                    argmax_agreement=float((hf_logits.argmax(-1) == cpp_logits.argmax(-1)).mean()),
                    hf_tokens=hf_tokens,
                    gguf_tokens=cpp_tokens,
                    first_divergence=divergence,
                    gap_at_divergence=None if divergence is None else gaps[divergence],
                )
            )
    finally:
        llm.close()
    return report


def generate_with_llama_cpp(
    gguf_path: str | os.PathLike,
    prompts: Sequence[str],
    max_new_tokens: int = 16,
    *,
    prefix_ids: Sequence[int] = (),
    n_ctx: int = 512,
) -> list[str]:
    """Greedy replies from llama.cpp alone: its tokenizer, its model, its sampler, as a server runs them."""
    llm = open_llama(gguf_path, n_ctx=n_ctx)
    replies = []
    try:
        for prompt in prompts:
            # A string prompt gets a BOS only if the file says add_bos_token=true (ours says false).
            # prefix_ids puts tokens in front anyway: what a runtime that adds a BOS token would send.
            ids = llm.tokenize(prompt.encode(), add_bos=False, special=True)
            request = [*prefix_ids, *ids] if prefix_ids else prompt
            llm.reset()  # no reuse of the previous prompt's cache: every prompt starts clean
            # temperature 0 selects llama.cpp's greedy sampler; generation stops at the file's EOS token.
            completion = llm.create_completion(request, max_tokens=max_new_tokens, temperature=0.0)
            replies.append(completion["choices"][0]["text"])
    finally:
        llm.close()
    return replies


def exact_match_with_llama_cpp(gguf_path: str | os.PathLike, tokenizer, tasks: Sequence, **options):
    """evaluate.exact_match, with the replies generated by llama.cpp from the GGUF file."""
    from ftcourse.evaluate import chat_prompt, score_replies

    prompts = [chat_prompt(tokenizer, task) for task in tasks]
    return score_replies(generate_with_llama_cpp(gguf_path, prompts, **options), tasks)


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


# --- 8. The whole pipeline --------------------------------------------------------------------


@dataclass
class ExportResult:
    """Where export_pipeline put things, and what it skipped and why."""

    hf_dir: Path
    gguf_files: dict[str, Path]
    modelfile: Path | None = None
    skipped: dict[str, str] = field(default_factory=dict)
    ollama_model: str | None = None
    ollama_error: str | None = None

    @property
    def sizes(self) -> dict[str, int]:
        """File size in bytes per GGUF type."""
        return {quant: path.stat().st_size for quant, path in self.gguf_files.items()}

    def table(self) -> str:
        """A small text table of files and sizes, for printing."""
        rows = [
            f"{quant:>8}  {size / 2**20:8.2f} MiB  {self.gguf_files[quant]}"
            for quant, size in self.sizes.items()
        ]
        rows += [f"{quant:>8}  skipped: {why}" for quant, why in self.skipped.items()]
        if self.modelfile:
            rows.append(f"{'Modelfile':>8}  {self.modelfile}")
        if self.ollama_model or self.ollama_error:
            rows.append(f"{'ollama':>8}  {self.ollama_model or 'not registered: ' + str(self.ollama_error)}")
        return "\n".join(rows)


def _is_adapter_dir(path: Path) -> bool:
    return (path / "adapter_config.json").is_file()


def _load_adapter_dir(adapter_dir: Path, base_model_dir: str | os.PathLike | None):
    """(PEFT model, tokenizer) from an adapter folder and a local base model folder."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if base_model_dir is None:
        base_model_dir = json.loads((adapter_dir / "adapter_config.json").read_text()).get(
            "base_model_name_or_path"
        )
    if not base_model_dir or not Path(base_model_dir).is_dir():
        raise ExportError(
            f"{adapter_dir} holds an adapter whose base model {base_model_dir!r} is not a local folder; "
            f"pass the base model folder (--base BASE_DIR on the command line)."
        )
    base = AutoModelForCausalLM.from_pretrained(base_model_dir, dtype=torch.float32)
    tokenizer_dir = adapter_dir if (adapter_dir / "tokenizer.json").is_file() else Path(base_model_dir)
    return PeftModel.from_pretrained(base, adapter_dir), AutoTokenizer.from_pretrained(tokenizer_dir)


def prepare_hf_dir(
    model_or_dir, out_dir: str | os.PathLike, tokenizer=None, base_model_dir: str | os.PathLike | None = None
) -> Path:
    """A plain (merged) Hugging Face folder for the model: reused if given, else saved under out_dir/hf."""
    model = model_or_dir
    if isinstance(model_or_dir, (str, os.PathLike)):
        path = Path(model_or_dir)
        if not _is_adapter_dir(path):
            read_llama_config(path)  # fail early, before any work, if the folder cannot be exported
            return path
        model, tokenizer = _load_adapter_dir(path, base_model_dir)
    if tokenizer is None:
        raise ExportError(
            "Exporting a model object needs its tokenizer: export_pipeline(model, out_dir, tokenizer=tok)."
        )
    if hasattr(model, "merge_and_unload"):  # a PEFT model: llama.cpp wants one plain weight per layer
        model = merge_adapter(model)
    hf_dir = Path(out_dir) / "hf"
    model.save_pretrained(hf_dir)
    tokenizer.save_pretrained(hf_dir)
    return hf_dir


def export_pipeline(
    model_or_dir,
    out_dir: str | os.PathLike,
    quants: Sequence[str] = ("f16", "q8_0", "Q4_K_M"),
    *,
    tokenizer=None,
    base_model_dir: str | os.PathLike | None = None,
    ollama_name: str | None = None,
    system_prompt: str | None = None,
    progress: bool = True,
) -> ExportResult:
    """Merge (if PEFT) -> HF folder -> GGUF f16 -> q8_0 -> Q4_K_M -> Modelfile -> Ollama (if named)."""
    from tqdm.auto import tqdm

    from ftcourse import modelfile

    out_dir = Path(out_dir)
    # Our writer's types in lower case (f16, q8_0), llama.cpp's in upper case (Q4_K_M), each once.
    names = [q.lower() if q.lower() in PYTHON_GGUF_TYPES else q.upper() for q in quants]
    # f16 is always written: it is the input llama.cpp's quantizer expects.
    gguf_types = list(dict.fromkeys(["f16", *names]))
    bar = tqdm(total=len(gguf_types) + 2 + bool(ollama_name), desc="export", disable=not progress)
    bar.set_postfix_str("merge / save HF folder")
    result = ExportResult(
        hf_dir=prepare_hf_dir(model_or_dir, out_dir, tokenizer, base_model_dir), gguf_files={}
    )
    bar.update()
    for quant in gguf_types:
        bar.set_postfix_str(quant)
        path = out_dir / f"model-{quant}.gguf"
        if quant in PYTHON_GGUF_TYPES:
            result.gguf_files[quant] = write_gguf(result.hf_dir, path, quant, name=out_dir.name)
        elif llama_cpp_available():
            result.gguf_files[quant] = quantize_gguf(result.gguf_files["f16"], path, quant)
        else:
            result.skipped[quant] = f"llama-cpp-python is not installed ({LLAMA_CPP_INSTALL})"
        bar.update()
    # The Modelfile points at q8_0 when there is one: on small models Q4_K_M visibly changes the output.
    bar.set_postfix_str("Modelfile")
    served = result.gguf_files.get("q8_0", result.gguf_files["f16"])
    result.modelfile = modelfile.write_modelfile(out_dir / "Modelfile", served, system=system_prompt)
    bar.update()
    if ollama_name:
        bar.set_postfix_str("ollama")
        try:
            result.ollama_model = modelfile.register_with_ollama(served, ollama_name, system=system_prompt)
        except modelfile.OllamaUnavailable as error:
            result.ollama_error = str(error)  # the files are written; only the registration is missing
        bar.update()
    bar.close()
    return result
