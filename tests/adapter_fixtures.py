"""Shared by the adapter tests: a tiny random Llama, and a peft model with our copy of its adapters."""

from __future__ import annotations

import copy

import torch
from torch import nn

from ftcourse import dora, lora

TARGETS = ["q_proj", "v_proj", "down_proj"]  # square and non-square weights
RANK, ALPHA = 4, 12  # alpha != rank, so that a wrong scaling (alpha, 1/r, alpha/sqrt(r)) changes the output
ATOL = 1e-5  # float32, same inputs; the two sides add the same terms in the same order up to rounding


def tiny_llama() -> nn.Module:
    """A randomly initialised two-layer Llama, small enough to build in milliseconds."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    return LlamaForCausalLM(config).eval()


def peft_and_ours(base: nn.Module, use_rslora: bool = False, use_dora: bool = False):
    """A peft model with non-zero B (trained-looking) and our model with A, B (and m) copied from it."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(
        r=RANK, lora_alpha=ALPHA, target_modules=TARGETS, lora_dropout=0.0, use_rslora=use_rslora,
        use_dora=use_dora,
    )  # fmt: skip
    theirs = get_peft_model(copy.deepcopy(base), config)
    with torch.no_grad():  # B = 0 would make every comparison trivially equal
        generator = torch.Generator().manual_seed(2)
        for name, parameter in theirs.named_parameters():
            if "lora_B" in name:
                parameter.copy_(0.3 * torch.randn(parameter.shape, generator=generator))
            if "lora_magnitude_vector" in name:
                parameter.mul_(1 + 0.2 * torch.rand(parameter.shape, generator=generator))
    ours = copy.deepcopy(base)
    inject = dora.inject_dora if use_dora else lora.inject_lora
    inject(ours, TARGETS, RANK, ALPHA, use_rslora=use_rslora)
    assert lora.load_peft_weights(ours, theirs) == 3 * len(base.model.layers)
    return theirs, ours


def grads_by_layer(model: nn.Module) -> dict[str, dict[str, torch.Tensor]]:
    """Gradients of A, B (and m) per adapted layer, for ours and for peft under one naming."""
    out: dict[str, dict[str, torch.Tensor]] = {}
    for name, parameter in model.named_parameters():
        if parameter.grad is None:
            continue
        for theirs, mine in (("lora_A.default.weight", "A"), ("lora_B.default.weight", "B"),
                             ("lora_magnitude_vector.default.weight", "m")):  # fmt: skip
            if name.endswith(theirs):
                name = name.removesuffix(theirs) + mine
        layer = name.removeprefix("base_model.model.").rsplit(".", 1)
        out.setdefault(layer[0], {})[layer[1]] = parameter.grad
    return out


def sample_input_ids() -> torch.Tensor:
    """The token ids every adapter test feeds: three rows of ten, drawn with a fixed seed."""
    return torch.randint(0, 64, (3, 10), generator=torch.Generator().manual_seed(1))


def assert_equal_to_peft(
    theirs: nn.Module, ours: nn.Module, ids: torch.Tensor, parameters: set[str]
) -> torch.Tensor:
    """Our logits equal peft's (ATOL), and so do the gradients of `parameters` in each adapted layer.

    Returns our logits, for checks of their own. `parameters` names the trained tensors per layer, in
    our naming: {"A", "B"} for LoRA, {"A", "B", "m"} for DoRA.
    """
    logits_theirs = theirs(input_ids=ids).logits
    logits_ours = ours(input_ids=ids).logits
    torch.testing.assert_close(logits_ours, logits_theirs, atol=ATOL, rtol=0)
    logits_theirs.square().mean().backward()
    logits_ours.square().mean().backward()
    g_theirs, g_ours = grads_by_layer(theirs), grads_by_layer(ours)
    assert set(g_ours) == set(g_theirs) and len(g_ours) == len(TARGETS) * 2  # two layers
    for layer, grads in g_ours.items():
        assert set(grads) == parameters
        for key, grad in grads.items():
            torch.testing.assert_close(grad, g_theirs[layer][key], atol=ATOL, rtol=1e-4)
    return logits_ours.detach()
