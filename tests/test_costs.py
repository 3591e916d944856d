"""The Spark cost estimates: FLOPs and weight traffic worked by hand on a tiny config, and the roofline."""

from __future__ import annotations

import pytest

from ftcourse import costs, memory

# hidden 4, MLP 8, one layer, 2 heads of width 2, 1 KV head, vocabulary 10, untied embeddings
TINY = {
    "hidden_size": 4,
    "intermediate_size": 8,
    "num_hidden_layers": 1,
    "num_attention_heads": 2,
    "num_key_value_heads": 1,
    "vocab_size": 10,
    "tie_word_embeddings": False,
}


def test_flops_of_a_tiny_model_by_hand():
    # linears: q 4x4 + k 2x4 + v 2x4 + o 4x4 + gate 8x4 + up 8x4 + down 4x8 = 144; lm_head 10x4 = 40
    assert costs.matmul_params(TINY) == 184
    # 6 tokens: 2 x 184 x 6 = 2208 dense; attention 2 x 1 layer x 3 positions x 4 wide x 6 tokens = 144
    assert costs.forward_flops(TINY, seq_len=3, sequences=2) == 2352
    lora = costs.step_cost(TINY, "lora", seq_len=3, batch_size=2, gradient_checkpointing=True)
    full = costs.step_cost(TINY, "full", seq_len=3, batch_size=2, gradient_checkpointing=True)
    assert lora.flops == 3 * 2352  # forward, activation gradients, recomputed forward
    assert full.flops == 4 * 2352  # plus the weight gradients
    # weights read three times: linears 144 x 2 bytes, the rest (80 embedding/head + 12 norm) x 2 bytes
    assert lora.weight_bytes_read == 3 * (144 * 2 + 92 * 2)


def test_accumulation_multiplies_work_and_traffic_and_the_roofline_takes_the_slower():
    one = costs.step_cost(TINY, "lora", seq_len=3, batch_size=2, gradient_accumulation_steps=1)
    four = costs.step_cost(TINY, "lora", seq_len=3, batch_size=2, gradient_accumulation_steps=4)
    assert four.flops == pytest.approx(4 * one.flops)
    assert four.weight_bytes_read == pytest.approx(4 * one.weight_bytes_read)
    assert one.seconds == max(one.compute_s, one.memory_s)
    assert one.bound == "memory bandwidth"  # a 184-weight model moves bytes, not FLOPs
    assert costs.step_cost("llama-3.1-8b", "lora", 512, 8).bound == "compute"


def test_qlora_reads_a_quarter_of_the_bf16_linear_bytes_plus_scales():
    bf16 = costs.step_cost("llama-3.1-70b", "lora", 256, 1)
    nf4 = costs.step_cost("llama-3.1-70b", "qlora", 256, 1)
    linear = memory.architecture("llama-3.1-70b").linear_params()
    assert bf16.weight_bytes_read - nf4.weight_bytes_read == pytest.approx(3 * linear * (2 - 0.5 - 1 / 64))


def test_sizes_and_bad_input():
    assert costs.download_gb("llama-3.1-8b") == pytest.approx(16.06, abs=0.01)  # 8.03 B parameters x 2 bytes
    assert costs.gguf_gb("llama-3.1-8b", "q8_0") == pytest.approx(
        costs.download_gb("llama-3.1-8b") * 8.5 / 16
    )
    with pytest.raises(ValueError, match="method"):
        costs.step_cost(TINY, "prompt", 3, 2)
    with pytest.raises(ValueError, match="batch_size must be positive"):
        costs.step_cost(TINY, "lora", 3, 0)
    with pytest.raises(ValueError, match="gguf_type"):
        costs.gguf_gb(TINY, "q3_K")
