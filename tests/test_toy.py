"""The embedded model: its shape, its tokenizer, and that the pretraining script works."""

from __future__ import annotations

import json

import pytest
from tokenizers import pre_tokenizers
from transformers import AutoConfig, AutoTokenizer

from ftcourse.toy import model_dir
from ftcourse.toy.pretrain import PretrainRecipe, pretrain
from ftcourse.toy.tokenizer import CHAT_TEMPLATE, IM_END


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(model_dir(), local_files_only=True)


def test_embedded_model_is_a_small_gqa_llama_with_k_quant_friendly_sizes():
    config = AutoConfig.from_pretrained(model_dir(), local_files_only=True)
    assert config.architectures == ["LlamaForCausalLM"]
    assert config.num_key_value_heads < config.num_attention_heads
    assert config.hidden_size % 256 == 0 and config.intermediate_size % 256 == 0
    assert (model_dir() / "model.safetensors").stat().st_size <= 30 * 2**20


def test_tokenizer_is_byte_level_bpe_with_gpt2_pre_tokenizer(tokenizer):
    spec = json.loads((model_dir() / "tokenizer.json").read_text())
    assert spec["model"]["type"] == "BPE"
    assert spec["pre_tokenizer"]["type"] == "ByteLevel" and spec["pre_tokenizer"]["use_regex"] is True
    assert spec["pre_tokenizer"]["add_prefix_space"] is False
    assert len(tokenizer) >= 2000  # a realistic vocabulary, not a few hundred tokens
    text = "The capital of Sertreim is Varmal, isn't it?  42 + 7"
    ours = tokenizer.backend_tokenizer.pre_tokenizer.pre_tokenize_str(text)
    gpt2 = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True).pre_tokenize_str(text)
    assert ours == gpt2


def test_no_bos_anywhere_and_chatml_with_generation_markers(tokenizer):
    assert tokenizer.bos_token is None
    assert tokenizer("cat dog").input_ids == tokenizer("cat dog", add_special_tokens=False).input_ids
    assert tokenizer.eos_token == IM_END and tokenizer.pad_token == "<|endoftext|>"
    assert tokenizer.chat_template == CHAT_TEMPLATE and "{% generation %}" in CHAT_TEMPLATE
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    encoded = tokenizer.apply_chat_template(messages, return_dict=True, return_assistant_tokens_mask=True)
    masked = [t for t, m in zip(encoded["input_ids"], encoded["assistant_masks"], strict=True) if m]
    assert tokenizer.decode(masked) == "hello<|im_end|>"


def test_pretraining_script_runs_at_reduced_size(tmp_path):
    recipe = PretrainRecipe(n_docs=200, num_layers=1, seq_len=64, batch_size=8, steps=12, warmup_steps=2)
    stats = pretrain(tmp_path, recipe, progress=False)
    saved = json.loads((tmp_path / "recipe.json").read_text())
    assert saved["recipe"]["steps"] == 12
    assert stats["final_loss"] < stats["initial_loss"] - 0.5  # it learns, even in 12 steps
    assert (tmp_path / "model.safetensors").is_file() and (tmp_path / "chat_template.jinja").is_file()
    config = AutoConfig.from_pretrained(tmp_path, local_files_only=True)
    assert config.num_hidden_layers == 1 and config.bos_token_id is None
