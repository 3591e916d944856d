"""Tests for ftcourse.toy.standin (the Llama-3.1-shaped stand-in and hub-shaped datasets), and for what
ftcourse.gguf and ftcourse.ollama do with a Llama 3.1 architecture: llama3 RoPE, llama-bpe, BOS, template."""

from __future__ import annotations

import json

import gguf
import numpy as np
import pytest
import torch
from test_ollama import render_go_template

from ftcourse import gguf as ftgguf
from ftcourse import llamacpp, ollama, profiles
from ftcourse.toy import standin

HUB_COLUMNS = {  # from the dataset cards: columns in the hub's order, and the splits
    "yahma/alpaca-cleaned": (["output", "input", "instruction"], ["train"]),
    "HuggingFaceH4/no_robots": (["prompt", "prompt_id", "messages", "category"], ["train", "test"]),
    "trl-lib/ultrafeedback_binarized": (
        ["chosen", "rejected", "score_chosen", "score_rejected"],
        ["train", "test"],
    ),
    "trl-lib/kto-mix-14k": (["prompt", "completion", "label"], ["train", "test"]),
    "Salesforce/wikitext": (["text"], ["train", "validation", "test"]),
}
TEXTS = [  # Unicode, digits (Llama 3 splits them in threes), code, whitespace runs, contractions
    "Hello world!  Two  spaces,\ttab\n\nand lines",
    "Ünïcödé naïve — 数字 と 東京, Привет 🙂",
    "1234567 3.14159 -42 2026-12-01",
    "def f(x):\n    return x**2  # ok\n\n\n\tdone",
    "   leading and trailing   \r\n",
    "I'M DONE, you'LL see'S it's",
]


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return standin.build_standins(tmp_path_factory.mktemp("standin") / "s")


@pytest.fixture(scope="module")
def hf(root):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = root / "model"
    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32), AutoTokenizer.from_pretrained(
        folder
    )


@pytest.fixture(scope="module")
def f16_file(root, tmp_path_factory):
    return ftgguf.write_gguf(root / "model", tmp_path_factory.mktemp("gguf") / "standin-f16.gguf", "f16")


def _conversation(system: bool = True) -> list[dict[str, str]]:
    turns = [{"role": "user", "content": "What is 12 + 30?"}, {"role": "assistant", "content": "42"}]
    return ([{"role": "system", "content": "Answer briefly."}] if system else []) + turns


# --- the stand-in itself ---------------------------------------------------------------------------------


def test_model_has_llama_3_1_architecture(hf):
    model, tokenizer = hf
    config = model.config

    assert (
        config.rope_parameters["rope_type"] == "llama3" and config.rope_parameters["rope_theta"] == 500000.0
    )
    assert config.num_attention_heads == 2 * config.num_key_value_heads  # grouped-query attention
    assert not config.tie_word_embeddings
    assert model.lm_head.weight.data_ptr() != model.model.embed_tokens.weight.data_ptr()
    assert config.pad_token_id is None and tokenizer.pad_token is None  # as Llama 3.1: nothing to pad with
    ids = tokenizer.convert_tokens_to_ids
    assert config.eos_token_id == [ids("<|end_of_text|>"), ids("<|eom_id|>"), ids("<|eot_id|>")]
    assert config.vocab_size == len(tokenizer) and config.vocab_size % 64 == 0


def test_saved_weights_are_bfloat16(root):
    from safetensors import safe_open

    with safe_open(root / "model" / "model.safetensors", framework="pt") as reader:
        assert {reader.get_tensor(name).dtype for name in reader.keys()} == {torch.bfloat16}


def test_tokenizer_splits_like_llama_3_and_adds_bos_once(hf):
    tokenizer = hf[1]
    bos = tokenizer.convert_tokens_to_ids("<|begin_of_text|>")
    # Llama 3's regex: digits in runs of at most three, so no token spans more than 3 digits
    pieces = tokenizer.convert_ids_to_tokens(tokenizer("1234567", add_special_tokens=False)["input_ids"])
    assert "".join(pieces) == "1234567" and max(len(p) for p in pieces) <= 3
    assert tokenizer("hi")["input_ids"][0] == bos and tokenizer("hi")["input_ids"].count(bos) == 1
    for text in TEXTS:  # byte-level: every string survives encode/decode
        assert tokenizer.decode(tokenizer(text, add_special_tokens=False)["input_ids"]) == text
    # the template writes BOS itself; apply_chat_template adds no second one
    chat_ids = tokenizer.apply_chat_template(_conversation(), tokenize=True, return_dict=True)["input_ids"]
    assert chat_ids[0] == bos and chat_ids.count(bos) == 1
    assert standin.LLAMA3_PATTERN == ftgguf.LLAMA3_PATTERN


def test_chat_template_has_llama_3_1_layout_and_assistant_mask(hf):
    tokenizer = hf[1]
    text = tokenizer.apply_chat_template(_conversation(system=False), tokenize=False)
    assert text == (
        "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\n"
        "Cutting Knowledge Date: December 2023\nToday Date: 26 Jul 2024\n\n<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nWhat is 12 + 30?<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n42<|eot_id|>"
    )
    out = tokenizer.apply_chat_template(
        _conversation(), tokenize=True, return_dict=True, return_assistant_tokens_mask=True
    )
    masked = [i for i, m in zip(out["input_ids"], out["assistant_masks"], strict=True) if m]
    assert tokenizer.decode(masked) == "42<|eot_id|>"  # the loss sees the answer and its end of turn


def test_datasets_have_the_hub_columns_and_nesting(root):
    from datasets import load_dataset

    for hub_id, (columns, splits) in HUB_COLUMNS.items():
        config = "wikitext-2-raw-v1" if hub_id == "Salesforce/wikitext" else None
        data = load_dataset(str(root / "datasets" / hub_id), config)
        assert sorted(data) == sorted(splits), hub_id
        for split in splits:
            assert data[split].column_names == columns, (hub_id, split)
            assert 20 <= len(data[split]) <= 200, (hub_id, split)
    no_robots = load_dataset(str(root / "datasets" / "HuggingFaceH4/no_robots"), split="train")
    assert set(no_robots[0]["messages"][0]) == {"content", "role"} and len(no_robots[0]["prompt_id"]) == 64
    assert {m["role"] for row in no_robots for m in row["messages"]} == {"system", "user", "assistant"}
    feedback = load_dataset(str(root / "datasets" / "trl-lib/kto-mix-14k"), split="train")
    assert feedback.features["label"].dtype == "bool" and feedback[0]["completion"][0]["role"] == "assistant"
    prefs = load_dataset(str(root / "datasets" / "trl-lib/ultrafeedback_binarized"), split="test")
    assert prefs[0]["chosen"][0] == prefs[0]["rejected"][0]  # implicit prompt: the shared first turn
    assert prefs.features["score_chosen"].dtype in ("float64", "float32")


def test_standin_environment_points_spark_at_local_folders(root):
    env = standin.standin_environment(root)
    assert env[profiles.PROFILE_ENV] == "spark" and env[profiles.MODEL_ENV] == str(root / "model")
    assert env["HF_HUB_OFFLINE"] == "1"
    profile = profiles.active_profile(env)
    assert profile.name == "spark" and profile.device == "cpu" and profile.dtype == "bfloat16"
    assert profile.sft_steps == profiles.MINIMAL_SIZES["sft_steps"]  # FTCOURSE_SIZES=minimal
    assert profiles.resolve_model("lora", profile, env) == str(root / "model")
    assert profiles.resolve_model("qlora", profile, env) == str(root / "model")
    for hub_id in profile.datasets.values():
        assert profiles.resolve_dataset(hub_id, env) == str(root / "datasets" / hub_id)
    assert profiles.resolve_dataset("yahma/alpaca-cleaned", {}) == "yahma/alpaca-cleaned"  # default: the hub
    with pytest.raises(ValueError, match="FTCOURSE_DATASETS.*no folder 'someone/else'"):
        profiles.resolve_dataset("someone/else", env)
    with pytest.raises(ValueError, match="FTCOURSE_SIZES='tiny' is not a size setting"):
        profiles.active_profile({**env, profiles.SIZES_ENV: "tiny"})
    spark = profiles.PROFILES["spark"]
    assert profiles.active_profile({profiles.PROFILE_ENV: "spark"}) == spark  # unset: sizes as they are


# --- GGUF of a Llama 3.1 architecture --------------------------------------------------------------------


def test_llama3_rope_factors_match_transformers_and_a_hand_case(hf):
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    config = ftgguf.read_llama_config(hf[0].config.name_or_path)
    factors = ftgguf.llama3_rope_factors(config)
    scaled, _ = ROPE_INIT_FUNCTIONS["llama3"](hf[0].config, "cpu")
    head_dim, theta = config["head_dim"], config["rope_theta"]
    plain = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    # llama.cpp divides each base frequency by its factor; transformers stores the divided frequency
    np.testing.assert_allclose(factors, (plain / scaled.double()).numpy(), rtol=1e-5)
    # all three bands are present: unscaled (1), blended, scaled by `factor` (8)
    assert factors[0] == 1.0 and factors[-1] == 8.0 and ((factors > 1) & (factors < 8)).any()
    # by hand, head_dim 4: the second pair turns at theta**-0.5, so theta = (W / 2pi)**2 gives wavelength W.
    # Llama 3.1's bands are W < 8192/4 (kept), W > 8192/1 (slowed 8x), and between: smooth = (8192/W - 1)/3,
    # factor 1 / ((1 - smooth)/8 + smooth): W 4096 -> smooth 1/3 -> 12/5; W 6144 -> smooth 1/9 -> 9/2.
    for wavelength, expected in [(1000, 1.0), (4096, 2.4), (6144, 4.5), (10000, 8.0)]:
        hand = {**config, "head_dim": 4, "rope_theta": (wavelength / (2 * np.pi)) ** 2}
        assert ftgguf.llama3_rope_factors(hand).tolist() == pytest.approx([1.0, expected], rel=1e-6)


def test_gguf_declares_llama_bpe_bos_and_rope_freqs(f16_file, hf):
    tokenizer = hf[1]
    fields = ftgguf.read_metadata(f16_file)
    keys = gguf.Keys.Tokenizer

    assert fields[keys.PRE] == "llama-bpe"
    assert fields[keys.ADD_BOS] is True and fields[keys.BOS_ID] == tokenizer.bos_token_id
    assert fields[keys.EOS_ID] == tokenizer.convert_tokens_to_ids("<|eot_id|>")
    assert fields["llama.rope.freq_base"] == 500000.0 and fields["llama.context_length"] == 131072
    assert (
        fields[keys.CHAT_TEMPLATE].startswith("{{- bos_token }}")
        and "{%- generation %}" not in fields[keys.CHAT_TEMPLATE]  # plain Jinja has no such tag
    )
    rope = [t for t in gguf.GGUFReader(f16_file).tensors if t.name == "rope_freqs.weight"]
    assert len(rope) == 1
    np.testing.assert_array_equal(
        rope[0].data, ftgguf.llama3_rope_factors(ftgguf.check_model_dir(hf[0].config.name_or_path))
    )


def test_llama_cpp_tokenizes_exactly_like_transformers(f16_file, hf):
    tokenizer = hf[1]
    texts = [
        *TEXTS,
        tokenizer.apply_chat_template(_conversation(), tokenize=False, add_generation_prompt=True),
    ]
    llm = llamacpp.open_llama(f16_file, n_ctx=64, vocab_only=True)
    try:
        for text in texts:
            ids = tokenizer(text, add_special_tokens=False)["input_ids"]
            assert llm.tokenize(text.encode(), add_bos=False, special=True) == ids, text
            assert llm.detokenize(ids, special=True).decode() == text
        # BOS as transformers adds it (the post-processor), and as the file tells llama.cpp to add it
        assert llm.tokenize(b"hi", add_bos=True, special=True) == tokenizer("hi")["input_ids"]
    finally:
        llm.close()


def test_llama_cpp_logits_and_greedy_tokens_match_transformers(f16_file, hf, root, tmp_path, monkeypatch):
    model, tokenizer = hf
    chat = tokenizer.apply_chat_template(_conversation()[:2], tokenize=False, add_generation_prompt=True)
    prompts = [chat, "The numbers 12 and 345 add to", "Привет 🙂 " * 8]
    report = llamacpp.compare_with_llama_cpp(model, tokenizer, f16_file, prompts, max_new_tokens=12)
    tolerance = llamacpp.check_tolerance("f16")  # max |dlogit| < 0.05, argmax agreement >= 98%

    assert llamacpp.check_comparison(report, tolerance) == [], report.max_abs_logit_diff
    assert all(p.first_divergence is None for p in report.prompts)  # all 12 greedy tokens equal
    # control: the same file without llama3 RoPE scaling (all factors 1) is measurably wrong
    monkeypatch.setattr(
        ftgguf, "llama3_rope_factors", lambda config: np.ones(config["head_dim"] // 2, np.float32)
    )
    unscaled = ftgguf.write_gguf(root / "model", tmp_path / "unscaled.gguf", "f16")
    wrong = llamacpp.compare_with_llama_cpp(model, tokenizer, unscaled, prompts, max_new_tokens=1)
    assert wrong.max_abs_logit_diff > 10 * max(report.max_abs_logit_diff, 1e-3)


def test_writer_refuses_other_rope_and_pre_tokenizers_with_the_converter_command(root, tmp_path):
    from export_fixtures import copy_model_dir, edit_config

    folder = copy_model_dir(root / "model", tmp_path / "yarn")
    edit_config(folder, rope_parameters={"rope_type": "yarn", "rope_theta": 1e6, "factor": 4.0})
    with pytest.raises(ftgguf.ExportError, match=r"rope_type 'yarn'.*convert_hf_to_gguf\.py"):
        ftgguf.write_gguf(folder, tmp_path / "yarn.gguf")
    folder = copy_model_dir(root / "model", tmp_path / "regex")
    tok_json = json.loads((folder / "tokenizer.json").read_text())
    tok_json["pre_tokenizer"]["pretokenizers"][0]["pattern"]["Regex"] = r"\s+|\S+"
    (folder / "tokenizer.json").write_text(json.dumps(tok_json))
    with pytest.raises(ftgguf.ExportError, match=r"'gpt-2' or 'llama-bpe'.*convert_hf_to_gguf\.py"):
        ftgguf.write_gguf(folder, tmp_path / "regex.gguf")
    assert not (tmp_path / "regex.gguf").exists()


# --- Ollama ----------------------------------------------------------------------------------------------


def test_modelfile_for_llama_3_uses_its_template_and_stops(f16_file, hf, tmp_path):
    tokenizer = hf[1]
    text = ollama.modelfile_text(f16_file)
    assert f'TEMPLATE """{ollama.LLAMA3_OLLAMA_TEMPLATE}"""' in text
    assert [line for line in text.splitlines() if line.startswith("PARAMETER stop")] == [
        f'PARAMETER stop "{token}"' for token in ollama.LLAMA3_STOP
    ]
    for system in (True, False):  # Ollama adds BOS as a token (add_bos_token): the template starts after it
        conversation = _conversation(system)[:2] if not system else _conversation()[:2]
        messages = [{"Role": m["role"], "Content": m["content"]} for m in conversation]
        data = {"System": conversation[0]["content"] if system else "", "Messages": messages}
        expected = tokenizer.apply_chat_template(conversation, tokenize=False, add_generation_prompt=True)
        assert "<|begin_of_text|>" + render_go_template(ollama.LLAMA3_OLLAMA_TEMPLATE, data) == expected
    with pytest.raises(ollama.ModelfileError, match="neither ChatML"):
        ollama.chat_format("{{ messages }}")


def test_llama_cpp_chat_generation_sends_one_bos_and_matches_transformers(f16_file, hf):
    from ftcourse import evaluate

    model, tokenizer = hf
    prompts = [
        tokenizer.apply_chat_template(conversation, tokenize=False, add_generation_prompt=True)
        for conversation in (_conversation()[:2], _conversation(system=False)[:1])
    ]
    assert all(p.startswith("<|begin_of_text|>") for p in prompts)  # the template writes the BOS
    ours = llamacpp.generate_with_llama_cpp(f16_file, prompts, max_new_tokens=8)
    theirs = evaluate.generate(model, tokenizer, prompts, max_new_tokens=8)
    # a random model emits stray bytes: transformers decodes them as U+FFFD, llama.cpp drops them
    assert [evaluate.first_answer(r) for r in ours] == [
        evaluate.first_answer(r.replace("\ufffd", "")) for r in theirs
    ]
