"""fit_check against measured GPU steps, by-hand arithmetic, and clear errors; the CLI; the CPU probe."""

from __future__ import annotations

from pathlib import Path

import pytest

from ftcourse import memory
from ftcourse.memory import GIB, fit_check

MEASUREMENTS = (
    Path(__file__).resolve().parents[1] / "benchmarks" / "results" / "gpu-memory-h100-2026-11-23.jsonl"
)
ROWS = memory.load_measurements(MEASUREMENTS)


@pytest.mark.parametrize("row", ROWS, ids=lambda r: f"{r['model']}-{r['method']}-{r['seq']}")
def test_peak_within_15_percent_of_h100_measurement(row):
    estimate = fit_check(row["model"], row["method"], seq_len=row["seq"], lora_rank=row["rank"])
    assert estimate.peak_gib == pytest.approx(row["peak_alloc_gib"], rel=0.15)
    # The parts that exist before the first step are exact arithmetic: 1% (the rows are rounded to 0.01).
    assert estimate.loaded_bytes / GIB == pytest.approx(row["loaded_gib"], rel=0.01, abs=0.01)
    assert estimate.prepared_bytes / GIB == pytest.approx(row["prepared_gib"], rel=0.01, abs=0.01)
    assert (estimate.params, estimate.trainable) == (row["params"], row["trainable"])


def test_parameter_counts_match_transformers_on_a_small_config():
    from transformers import LlamaConfig, LlamaForCausalLM

    config = {
        "hidden_size": 64,
        "intermediate_size": 160,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "vocab_size": 300,
        "tie_word_embeddings": False,
    }
    model = LlamaForCausalLM(LlamaConfig(**config))
    assert memory.architecture(config).total_params() == sum(p.numel() for p in model.parameters())
    assert memory.architecture(model.config).total_params() == sum(p.numel() for p in model.parameters())


def test_full_bf16_by_hand():
    # 1000 parameters in bf16, AdamW in bf16 at the optimizer step: weights, grads, 2 states, 1 foreach temp.
    arch = memory.Architecture("tiny", 8, 16, 1, 2, 2, 10, True)
    estimate = fit_check(arch, "full", seq_len=1, device="cpu", keep_logits=False)
    n = arch.total_params()
    assert estimate.parts["weights"] == 2 * n
    assert estimate.parts["optimizer states"] == 4 * n
    assert estimate.phases["optimizer step"] == pytest.approx(2 * n * 4 + 2 * 2 * max(10 * 8, 16 * 8))


def test_lora_trainable_and_logits_by_hand():
    arch = memory.ARCHITECTURES["llama-3.1-8b"]
    estimate = fit_check(arch, "lora", seq_len=512, lora_rank=8, targets=["q_proj", "v_proj"])
    assert estimate.trainable == 32 * 8 * ((4096 + 4096) + (4096 + 1024))
    # bf16 logits kept by the caller, then three fp32 buffers over the vocabulary in the loss backward.
    kept_logits = 512 * 128256 * 2
    assert estimate.parts["logits and loss buffers"] == kept_logits + 3 * 512 * 128256 * 4


def test_settings_move_the_estimate_the_right_way():
    base = fit_check("llama-3.1-8b", "lora", seq_len=1024).peak_bytes
    assert fit_check("llama-3.1-8b", "lora", seq_len=2048).peak_bytes > base
    assert fit_check("llama-3.1-8b", "lora", seq_len=1024, batch_size=2).peak_bytes > base
    assert fit_check("llama-3.1-8b", "lora", seq_len=1024, gradient_checkpointing=False).peak_bytes > base
    assert fit_check("llama-3.1-8b", "qlora", seq_len=1024).peak_bytes < base
    full = fit_check("llama-3.1-8b", "full", seq_len=1024)
    assert (
        fit_check("llama-3.1-8b", "full", seq_len=1024, optimizer="adamw-8bit").peak_bytes < full.peak_bytes
    )


def test_double_quant_saves_about_three_eighths_bit_per_weight():
    plain = memory.quantized_bytes(4096, 4096, double_quant=False)
    double = memory.quantized_bytes(4096, 4096, double_quant=True)
    bits = 8 * (plain - double) / 4096**2
    assert bits == pytest.approx(0.5 - 8 / 64 - 32 / (64 * 256), abs=0.01)


def test_70b_qlora_fits_a_spark():
    estimate = fit_check("llama-3.1-70b", "qlora", seq_len=2048)
    assert estimate.verdict == "fits"
    assert fit_check("llama-3.1-70b", "full", seq_len=2048).verdict == "does not fit"


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"model": "llama-9"}, "model: unknown name"),
        ({"lora_rank": 0}, "lora_rank must be a positive"),
        ({"seq_len": -5}, "seq_len must be a positive"),
        ({"method": "prefix"}, "method must be one of"),
        ({"targets": ["attn"]}, "targets:"),
        ({"device_gb": 0}, "device_gb must be positive"),
    ],
)
def test_bad_input_names_the_argument(kwargs, message):
    arguments = {"model": "llama-3.1-8b", "method": "lora", **kwargs}
    with pytest.raises(ValueError, match=message):
        fit_check(arguments.pop("model"), arguments.pop("method"), **arguments)


def test_cli_prints_table_and_rejects_nonsense(capsys):
    from ftcourse import cli

    assert cli.main(["fit-check", "llama-3.1-70b", "--method", "qlora", "--seq-len", "2048"]) == 0
    out = capsys.readouterr().out
    assert "k-bit fp32 upcasts" in out and "fits" in out
    assert cli.main(["fit-check", "llama-9b"]) == 2
    assert "unknown name" in capsys.readouterr().err
    assert cli.main(["fit-check", "llama-3.1-8b", "--lora-rank", "0"]) == 2
    assert "lora_rank" in capsys.readouterr().err


def test_cpu_probe_measures_a_real_step_within_reach_of_the_estimate(no_network):
    config = {
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "num_key_value_heads": 2,
        "vocab_size": 8000,
        "tie_word_embeddings": False,
    }
    result = memory.measure(config, "full", seq_len=256, batch_size=4, gradient_checkpointing=False, steps=1)
    estimate = fit_check(
        config,
        "full",
        seq_len=256,
        batch_size=4,
        gradient_checkpointing=False,
        weights_dtype="fp32",
        device="cpu",
    )
    # Resident memory also holds allocator slack and autograd bookkeeping: 35% either way on a tiny model.
    assert result["peak_above_baseline_bytes"] == pytest.approx(estimate.peak_bytes, rel=0.35)
    assert result["loss"] > 0
    assert no_network == []


def test_cpu_probes_are_all_of_them_except_at_minimal_sizes():
    from dataclasses import replace

    from ftcourse import profiles

    cpu = profiles.PROFILES["cpu"]
    assert memory.cpu_probes(cpu) == memory.CPU_PROBES and len(memory.CPU_PROBES) == 3
    assert memory.cpu_probes(profiles.PROFILES["spark"]) == memory.CPU_PROBES
    assert memory.cpu_probes(replace(cpu, minimal=True)) == memory.CPU_PROBES[:1]
