"""Tests for ftcourse.qlora: the fit-check refusal, tensor byte counts, and the 4-bit training entry point."""

from __future__ import annotations

import pytest
import torch

from ftcourse import data, memory, profiles, qlora, quant

bnb = pytest.importorskip("bitsandbytes")


@pytest.fixture(scope="module")
def tokenizer():
    return profiles.load_tokenizer()


@pytest.fixture(scope="module")
def tiny_dataset():
    return data.load_records("messages", "train", size=32)


def test_require_fit_refuses_bf16_lora_of_70b_with_the_numbers():
    with pytest.raises(qlora.DoesNotFit) as caught:
        qlora.require_fit("llama-3.1-70b", "lora", seq_len=2048)
    estimate = memory.fit_check("llama-3.1-70b", "lora", seq_len=2048)
    message = str(caught.value)
    assert caught.value.estimate.peak_bytes == estimate.peak_bytes
    assert f"{estimate.peak_gib:.1f} GiB" in message and "does not fit" in message
    assert "method='qlora'" in message  # the advice names the fix


def test_require_fit_returns_the_estimate_when_it_fits():
    estimate = qlora.require_fit("llama-3.1-70b", "qlora", seq_len=2048)
    assert estimate.verdict == "fits"
    assert estimate.peak_bytes == memory.fit_check("llama-3.1-70b", "qlora", seq_len=2048).peak_bytes


def test_weight_bytes_counts_fp32_tensors_exactly():
    model = qlora.load_in("fp32")
    counted = qlora.weight_bytes(model)
    by_hand = sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])
    assert counted["total"] == by_hand
    decoder = sum(
        m.weight.numel() * 4
        for n, m in model.named_modules()
        if isinstance(m, torch.nn.Linear) and "layers" in n
    )
    assert counted["decoder linears"] == decoder
    assert counted["lm_head"] == model.lm_head.weight.numel() * 4


def test_weight_bytes_of_4bit_model_matches_nf4_storage_rate():
    model = qlora.load_in("4bit")
    layers = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert len(layers) == 7 * model.config.num_hidden_layers  # every decoder linear, not lm_head
    counted = qlora.weight_bytes(model)
    assert counted["decoder linears"] == sum(quant.linear4bit_bytes(m) for m in layers)
    weights = sum(m.in_features * m.out_features for m in layers)
    bits = 8 * counted["decoder linears"] / weights
    # 4.127 bits per weight for NF4 with double quant; each layer adds a small codebook and state (<3%).
    assert bits == pytest.approx(quant.bits_per_parameter(64, double_quant=True), rel=0.03)


def test_train_qlora_refuses_a_model_not_in_4bit(tokenizer, tiny_dataset):
    with pytest.raises(ValueError, match="not loaded in 4 bit"):
        qlora.train_qlora(profiles.load_base(), tokenizer, tiny_dataset, steps=1)


def test_train_qlora_rejects_an_unknown_size(tokenizer, tiny_dataset):
    with pytest.raises(ValueError, match="unknown size"):
        qlora.train_qlora(qlora.load_in("4bit"), tokenizer, tiny_dataset, step=1)


def test_load_qlora_model_refuses_before_loading(monkeypatch):
    def must_not_load(*args, **kwargs):
        raise AssertionError("load_4bit ran although the fit-check said no")

    monkeypatch.setattr(quant, "load_4bit", must_not_load)
    with pytest.raises(qlora.DoesNotFit, match="refusing to train"):
        qlora.load_qlora_model(device_gb=0.01)


def test_train_qlora_runs_the_4bit_recipe_offline(tokenizer, tiny_dataset, no_network):
    model = qlora.load_qlora_model()
    assert getattr(model, "is_loaded_in_4bit", False)
    # prepare_model_for_kbit_training: everything not quantized is fp32 and frozen.
    assert all(p.dtype == torch.float32 for n, p in model.named_parameters() if "norm" in n)
    with pytest.raises(qlora.DoesNotFit):  # the entry point refuses on its own, before any trainer
        qlora.train_qlora(model, tokenizer, tiny_dataset, steps=2, device_gb=0.01)
    run = qlora.train_qlora(model, tokenizer, tiny_dataset, steps=2, batch_size=4, logging_steps=1)
    assert run.losses and all(torch.isfinite(torch.tensor(loss)) for _, loss in run.losses)
    assert qlora.adapter_dtypes(run.model) == {"bfloat16": 2 * 7 * 4}  # TRL casts adapters on a k-bit base
    assert any(isinstance(m, bnb.nn.Linear4bit) for m in run.model.modules())
    assert no_network == []


def test_the_4bit_base_computes_in_the_profile_dtype():
    cpu, spark = profiles.PROFILES["cpu"], profiles.PROFILES["spark"]
    assert (qlora.compute_dtype(cpu), qlora.compute_dtype(spark)) == ("float32", "bfloat16")
    model = qlora.load_in("4bit", cpu)
    layers = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert layers and {m.compute_dtype for m in layers} == {torch.float32}  # the LoRA baseline's dtype


def test_compute_dtype_seconds_times_both_dtypes():
    seconds = qlora.compute_dtype_seconds(features=64, tokens=8, repeats=1)
    assert set(seconds) == {"bfloat16", "float32"} and all(s > 0 for s in seconds.values())


def test_device_switch_puts_the_embedded_model_on_cuda_in_bf16():
    switched = profiles.active_profile({"FTCOURSE_PROFILE": "cpu", "FTCOURSE_DEVICE": "cuda"})
    assert (switched.name, switched.device, switched.dtype) == ("cpu", "cuda", "bfloat16")
    assert not switched.uses_network  # still the embedded model, still offline
    assert qlora.run_sizes(switched) == qlora.RUN_SIZES["cpu"]


def test_unsloth_status_names_what_is_missing(monkeypatch):
    import importlib.util

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name: None if name == "unsloth" else real_find_spec(name)
    )
    usable, reason = qlora.unsloth_status()
    assert not usable and "not installed" in reason and qlora.UNSLOTH_PINS in reason
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: object())
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    usable, reason = qlora.unsloth_status()
    assert not usable and "no CUDA GPU" in reason


def test_load_fast_falls_back_to_peft_and_says_so(tokenizer, tiny_dataset, no_network, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    model, fast_tokenizer, path = qlora.load_fast()
    assert path == "peft"
    assert any(isinstance(m, bnb.nn.Linear4bit) for m in model.modules())
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {
        n for n, _ in model.named_parameters() if "lora_" in n
    }
    run = qlora.train_fast(model, fast_tokenizer, tiny_dataset, steps=2, batch_size=4, logging_steps=1)
    assert [step for step, _ in run.losses] == [1, 2]
    assert no_network == []


def test_run_sizes_have_a_minimal_entry_with_every_key():
    from dataclasses import replace

    minimal = replace(profiles.PROFILES["spark"], minimal=True)  # what FTCOURSE_SIZES=minimal gives
    assert qlora.run_sizes(minimal) == qlora.RUN_SIZES["minimal"]
    assert set(qlora.RUN_SIZES["minimal"]) == set(qlora.RUN_SIZES["cpu"]) == set(qlora.RUN_SIZES["spark"])


def test_fit_optimizer_names_match_the_fit_check_and_unknown_ones_are_refused():
    assert qlora.fit_optimizer(qlora.OPTIMIZER) == "paged-adamw-8bit"
    assert qlora.fit_optimizer("paged_adamw_32bit") == "paged-adamw"  # the QLoRA paper's optimizer
    assert all(name in memory.OPTIMIZERS for name in qlora.FIT_OPTIMIZERS.values())
    with pytest.raises(ValueError, match="paged_adamw_32bit"):
        qlora.fit_optimizer("sgd")


def test_train_qlora_refuses_an_optimizer_the_fit_check_cannot_price(tokenizer, tiny_dataset):
    model = qlora.load_qlora_model(profiles.PROFILES["cpu"])
    with pytest.raises(ValueError, match="fit-check can price"):
        qlora.train_qlora(
            model, tokenizer, tiny_dataset, profile=profiles.PROFILES["cpu"], optim="sgd", steps=1
        )
