"""Fixtures shared by the export tests: test_merge, test_gguf, test_llamacpp, test_ollama, test_export,
test_cli.

Every test takes the model folder from the `export_model_dir` fixture: by default the book's embedded
model (`ftcourse.toy.model_dir()`). Set FTCOURSE_EXPORT_MODEL_DIR to run the same tests on another
Llama folder. llama-cpp-python is a test dependency: without it the llama.cpp tests fail (they never skip).
Import with `from export_fixtures import *` so that pytest sees the fixtures.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from ftcourse import gguf as ftgguf
from ftcourse import llamacpp, toy

CONVERSATION = [
    {"role": "system", "content": "You answer in one line."},
    {"role": "user", "content": "Name a colour."},
    {"role": "assistant", "content": "Blue."},
    {"role": "user", "content": "And another?"},
]
# Tolerances, with what was measured while writing them (the embedded model; a 2-layer fixture passes too).
F16_MAX_LOGIT_DIFF = llamacpp.CHECK_TOLERANCES["f16"].max_abs_logit_diff  # measured 0.005-0.015
Q8_0_MIN_ARGMAX_AGREEMENT = llamacpp.CHECK_TOLERANCES["q8_0"].min_argmax_agreement  # measured 0.96-1.0
MERGE_MAX_LOGIT_DIFF = 1e-4  # STACK-NOTES measured ~5e-6 for merge_and_unload

__all__ = [
    "CONVERSATION",
    "F16_MAX_LOGIT_DIFF",
    "MERGE_MAX_LOGIT_DIFF",
    "Q8_0_MIN_ARGMAX_AGREEMENT",
    "copy_model_dir",
    "edit_config",
    "export_gguf_files",
    "export_hf",
    "export_model_dir",
    "export_prompts",
    "load_model",
    "save_adapter",
]


@pytest.fixture(scope="session")
def export_model_dir() -> Path:
    """The Llama folder every export test uses; FTCOURSE_EXPORT_MODEL_DIR points it elsewhere."""
    if os.environ.get("FTCOURSE_EXPORT_MODEL_DIR"):
        return Path(os.environ["FTCOURSE_EXPORT_MODEL_DIR"])
    return toy.model_dir()  # the book's embedded model, as shipped


def load_model(model_dir: Path):
    """(model, tokenizer) from a folder, in eval mode."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoModelForCausalLM.from_pretrained(model_dir).eval(), AutoTokenizer.from_pretrained(model_dir)


@pytest.fixture(scope="session")
def export_hf(export_model_dir):
    """(model, tokenizer) loaded with transformers; tests must not modify them."""
    return load_model(export_model_dir)


@pytest.fixture(scope="session")
def export_prompts(export_hf) -> list[str]:
    """A ChatML prompt and plain text, with special tokens, digits, punctuation and unseen words."""
    tokenizer = export_hf[1]
    chat = tokenizer.apply_chat_template(CONVERSATION, tokenize=False, add_generation_prompt=True)
    return [chat, "Kalo miten ravo, said 42.", "Once upon a time, there was", "Numbers: 3.14 and 2718!"]


@pytest.fixture(scope="session")
def export_gguf_files(export_model_dir, tmp_path_factory) -> dict[str, Path]:
    """f16, q8_0 (our writer) and Q4_K_M (llama.cpp's quantizer) files of the fixture model."""
    out = tmp_path_factory.mktemp("export_gguf")
    files = {q: ftgguf.write_gguf(export_model_dir, out / f"model-{q}.gguf", q) for q in ("f16", "q8_0")}
    files["Q4_K_M"] = llamacpp.quantize_gguf(files["f16"], out / "model-Q4_K_M.gguf", "Q4_K_M")
    return files


def copy_model_dir(src: Path, dst: Path) -> Path:
    """A copy of a model folder that a test may damage."""
    shutil.copytree(src, dst)
    return dst


def edit_config(model_dir: Path, **changes) -> Path:
    """Rewrite model_dir/config.json with changes (a value of None deletes the key)."""
    config = json.loads((model_dir / "config.json").read_text())
    config.update(changes)
    config = {k: v for k, v in config.items() if v is not None}
    (model_dir / "config.json").write_text(json.dumps(config))
    return model_dir


def save_adapter(model_dir: Path, out: Path, seed: int = 2, **lora) -> Path:
    """A random (non-zero) LoRA adapter for the model in model_dir, saved to out."""
    import torch
    from peft import LoraConfig, get_peft_model

    model, _ = load_model(model_dir)
    torch.manual_seed(seed)
    options = {"r": 4, "target_modules": ["q_proj", "v_proj"], "init_lora_weights": False, **lora}
    adapted = get_peft_model(model, LoraConfig(**options))
    adapted.save_pretrained(out)
    return out
