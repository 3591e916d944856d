"""ftcourse.lora against peft on the same inputs, and against cases worked by hand."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from adapter_fixtures import (
    ALPHA,
    ATOL,
    RANK,
    TARGETS,
    assert_equal_to_peft,
    grads_by_layer,
    peft_and_ours,
    sample_input_ids,
    tiny_llama,
)
from torch import nn

from ftcourse import lora

# peft 0.21 asks transformers 5.23 for a renamed attribute; the warning is theirs, not ours.
pytestmark = pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing:FutureWarning")


@pytest.fixture(scope="module")
def base() -> nn.Module:
    return tiny_llama()


@pytest.fixture(scope="module")
def input_ids() -> torch.Tensor:
    return sample_input_ids()


@pytest.mark.parametrize("use_rslora", [False, True])
def test_outputs_and_grads_equal_peft(base, input_ids, use_rslora):
    theirs, ours = peft_and_ours(base, use_rslora=use_rslora)
    logits_ours = assert_equal_to_peft(theirs, ours, input_ids, {"A", "B"})
    assert not torch.allclose(logits_ours, base(input_ids=input_ids).logits, atol=1e-3)  # the update matters


def ulps_apart(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """|actual - expected| in units in the last place (ulps) of `expected` in `dtype`, elementwise."""
    expected64 = expected.double()
    # A dtype with p mantissa bits (eps = 2^-p) spaces its numbers in [2^k, 2^(k+1)) by eps * 2^k.
    info = torch.finfo(dtype)
    ulp = info.eps * torch.exp2(torch.floor(torch.log2(expected64.abs().clamp_min(info.tiny))))
    return (actual.double() - expected64).abs() / ulp


def assert_low_precision_equal_to_peft(dtype: torch.dtype, use_dora: bool) -> None:
    """On a `dtype` base with float32 adapters (peft's autocast_adapter_dtype), ours equals peft's.

    Tolerances from the dtype: both sides do the same operations in the same order, so they round the same
    float32 numbers to `dtype` the same way, and the logits may be at most one ulp of `dtype` apart. The
    gradients of A, B (and m) are float32 but flow back through `dtype` activations, each of which carries a
    relative rounding error up to eps(dtype): they may differ by one such rounding of their own scale.
    Rounding the low-rank update to `dtype` before adding it (the order this package used before) puts the
    logits up to hundreds of ulps apart and the gradients 1.1 to 24 eps(dtype) apart, so both checks fail.
    """
    base = tiny_llama().to(dtype)
    theirs, ours = peft_and_ours(base, use_dora=use_dora)
    trained = {n: p for n, p in ours.named_parameters() if p.requires_grad}
    assert trained and all(p.dtype == torch.float32 for p in trained.values())  # adapters stay float32
    ids = sample_input_ids()
    logits_theirs, logits_ours = theirs(input_ids=ids).logits, ours(input_ids=ids).logits
    assert logits_ours.dtype == logits_theirs.dtype == dtype
    assert ulps_apart(logits_ours, logits_theirs, dtype).max().item() <= 1
    with torch.no_grad():  # the update matters: far more than one ulp from the base model's logits
        assert ulps_apart(base(input_ids=ids).logits, logits_theirs, dtype).max().item() > 100
    logits_theirs.float().square().mean().backward()
    logits_ours.float().square().mean().backward()
    g_theirs, g_ours = grads_by_layer(theirs), grads_by_layer(ours)
    assert set(g_ours) == set(g_theirs) and len(g_ours) == len(TARGETS) * len(base.model.layers)
    eps = torch.finfo(dtype).eps
    for layer, grads in g_ours.items():
        assert set(grads) == ({"A", "B", "m"} if use_dora else {"A", "B"})
        for key, grad in grads.items():
            reference = g_theirs[layer][key]
            assert grad.dtype == torch.float32
            assert (grad - reference).abs().max() <= eps * reference.abs().max(), (layer, key)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_outputs_and_grads_equal_peft_on_a_half_precision_base(dtype):
    assert_low_precision_equal_to_peft(dtype, use_dora=False)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_base_adds_the_update_in_float32_and_rounds_once(dtype):
    # W0·x in the base dtype, the update B·A·x in float32, their sum rounded to the base dtype once.
    torch.manual_seed(0)
    base = nn.Linear(64, 32, dtype=dtype)
    layer = lora.LoRALinear(base, rank=4, alpha=8)
    with torch.no_grad():
        layer.B.copy_(0.05 * torch.randn_like(layer.B))
    x = torch.randn(16, 64).to(dtype)
    with torch.no_grad():
        out = layer(x)
        update = (x.float() @ layer.A.T) @ layer.B.T
        rounded_once = (base(x).float() + layer.scaling * update).to(dtype)
        rounded_twice = base(x) + (layer.scaling * update).to(dtype)  # the update rounded first
    assert out.dtype == dtype
    assert ulps_apart(out, rounded_once, dtype).max().item() <= 1  # float32 sums in another order
    assert (out != rounded_twice).any()  # the test can tell the two orders apart on this input


def test_scaling_worked_by_hand():
    base = nn.Linear(2, 2, bias=False)
    with torch.no_grad():
        base.weight.copy_(torch.eye(2))
    layer = lora.LoRALinear(base, rank=1, alpha=2)  # scaling alpha/r = 2
    with torch.no_grad():
        layer.A.copy_(torch.tensor([[1.0, 0.0]]))
        layer.B.copy_(torch.tensor([[0.0], [1.0]]))
    # ΔW = 2 · [[0], [1]] · [[1, 0]] = [[0, 0], [2, 0]], so y = x + (0, 2·x1)
    y = layer(torch.tensor([[1.0, 2.0]]))
    torch.testing.assert_close(y, torch.tensor([[1.0, 4.0]]))
    rs = lora.LoRALinear(nn.Linear(2, 2), rank=4, alpha=2, use_rslora=True)
    assert rs.scaling == pytest.approx(1.0)  # alpha / sqrt(4)


def test_initial_update_is_zero_and_A_as_peft(base, input_ids):
    model = copy.deepcopy(base)
    lora.inject_lora(model, "all-linear", RANK, ALPHA)
    torch.testing.assert_close(
        model(input_ids=input_ids).logits, base(input_ids=input_ids).logits, atol=0, rtol=0
    )
    layer = model.model.layers[0].mlp.down_proj
    bound = 1 / math.sqrt(
        layer.base.in_features
    )  # kaiming_uniform(a=sqrt 5) draws from U(-1/sqrt(in), 1/sqrt(in))
    assert layer.A.abs().max() <= bound and layer.A.abs().max() > 0.5 * bound
    assert torch.count_nonzero(layer.B) == 0


def test_merged_equals_unmerged(base, input_ids):
    _, ours = peft_and_ours(base, use_rslora=True)
    with torch.no_grad():
        before = ours(input_ids=input_ids).logits
        lora.merge_lora(ours)
        after = ours(input_ids=input_ids).logits
    assert not lora.adapter_layers(ours)
    assert type(ours.model.layers[0].self_attn.q_proj) is nn.Linear
    torch.testing.assert_close(after, before, atol=ATOL, rtol=0)


def test_parameter_counts(base):
    model = copy.deepcopy(base)
    names = lora.inject_lora(model, TARGETS, RANK, ALPHA)
    expected = 0
    for name in names:
        layer = model.get_submodule(name)
        expected += lora.lora_parameters(layer.base.out_features, layer.base.in_features, RANK)
    trainable, total = lora.count_parameters(model)
    assert trainable == expected == 2 * RANK * ((32 + 32) + (32 + 16) + (48 + 32))
    assert total == sum(p.numel() for p in base.parameters()) + trainable
    assert lora.lora_parameters(4096, 4096, 16) == 131072  # r(d + k) for r=16, d=k=4096


def test_all_linear_skips_output_layer(base):
    names = lora.linear_names(base)
    assert "lm_head" not in names and len(names) == 7 * len(base.model.layers)


def test_bad_input_is_explained(base):
    model = copy.deepcopy(base)
    with pytest.raises(ValueError, match=r"'qproj' matches no module.*q_proj"):
        lora.inject_lora(model, ["qproj"], RANK, ALPHA)
    with pytest.raises(ValueError, match="rank must be a positive integer"):
        lora.inject_lora(model, TARGETS, 0, ALPHA)
    with pytest.raises(ValueError, match="rank must be a positive integer"):
        lora.LoRALinear(nn.Linear(2, 2), rank=-1, alpha=1)
    with pytest.raises(TypeError, match=r"'model.layers.0.mlp'.*LlamaMLP.*not an nn.Linear"):
        lora.inject_lora(model, ["layers.0.mlp"], RANK, ALPHA)
    with pytest.raises(ValueError, match="already has an adapter"):
        lora.inject_lora(model, ["q_proj"], RANK, ALPHA)
        lora.inject_lora(model, ["q_proj"], RANK, ALPHA)


class _ChatTokenizer:
    """Characters as tokens and a ChatML-like template: enough to check which labels count."""

    eos_token, pad_token_id = "|", 0

    def apply_chat_template(self, messages, tokenize=False, add_generation_prompt=False):
        text = "".join(f"<{m['role'][0]}>{m['content']}|\n" for m in messages)
        return text + ("<a>" if add_generation_prompt else "")

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [ord(c) % 60 + 1 for c in text]}


def test_only_the_reply_counts_in_the_loss():
    messages = [{"role": "user", "content": "2+2"}, {"role": "assistant", "content": "4"}]
    row = lora.tokenize_chat(_ChatTokenizer(), messages)
    counted = [
        i for i, label in zip(row["input_ids"], row["labels"], strict=True) if label != lora.IGNORE_INDEX
    ]
    assert counted == [ord(c) % 60 + 1 for c in "4|"]  # the reply and its end-of-turn token, not the "\n"
    batches = lora.chat_batches(_ChatTokenizer(), [{"messages": messages}] * 5, batch_size=2)
    assert len(batches) == 2 and batches[0]["attention_mask"].sum(1).tolist() == [len(row["input_ids"])] * 2


def test_training_ours_and_peft_gives_one_loss_curve(base, no_network):
    theirs, ours = peft_and_ours(base)
    generator = torch.Generator().manual_seed(3)
    batches = []
    for _ in range(2):
        ids = torch.randint(1, 64, (4, 8), generator=generator)
        labels = ids.clone()
        labels[:, :5] = lora.IGNORE_INDEX  # a "prompt" of five tokens
        batches.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels})
    run_theirs = lora.train_adapters(theirs, batches, steps=4, learning_rate=1e-2, warmup_steps=1)
    run_ours = lora.train_adapters(ours, batches, steps=4, learning_rate=1e-2, warmup_steps=1)
    assert run_ours.trainable_parameters == run_theirs.trainable_parameters
    assert run_ours.losses[-1] < run_ours.losses[0]  # it learns
    assert run_ours.losses == pytest.approx(run_theirs.losses, abs=1e-4)
    assert no_network == []


def test_train_setting_and_mean_loss(base):
    batches = [
        {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}
        for ids in torch.randint(1, 64, (2, 4, 6), generator=torch.Generator().manual_seed(5))
    ]
    setting = lora.LoRASetting(rank=2, alpha=4, targets="attention", use_rslora=True)
    assert setting.scaling == pytest.approx(4 / math.sqrt(2))
    model, run = lora.train_setting(base, setting, batches, steps=3, learning_rate=1e-2, warmup_steps=1)
    assert not model.training and len(run.losses) == 3
    assert {n.rsplit(".", 1)[-1] for n in lora.adapter_layers(model)} == set(lora.ATTENTION)
    assert not lora.adapter_layers(base)  # the base model is left alone
    assert lora.mean_loss(model, batches) < lora.mean_loss(base, batches)
    with pytest.raises(ValueError, match="targets must be one of"):
        lora.train_setting(
            base, lora.LoRASetting(2, 4, targets="everything"), batches, steps=1, learning_rate=1e-3
        )
    with pytest.raises(ValueError, match="no Part II run sizes"):
        lora.run_sizes("laptop")


def test_example_losses_are_each_conversations_own_reply_loss(base):
    ids = torch.randint(1, 64, (3, 7), generator=torch.Generator().manual_seed(6))
    labels = ids.clone()
    labels[:, :3] = lora.IGNORE_INDEX  # a prompt of three tokens
    labels[2, 5:] = lora.IGNORE_INDEX  # the third reply is shorter (right padding)
    mask = torch.ones_like(ids)
    mask[2, 5:] = 0
    batch = {"input_ids": ids, "attention_mask": mask, "labels": labels}
    losses = lora.example_losses(base, [batch])
    assert len(losses) == 3
    for row, loss in enumerate(losses):  # the same as reply_loss on that conversation alone
        alone = {key: value[row : row + 1] for key, value in batch.items()}
        with torch.no_grad():
            assert loss == pytest.approx(lora.reply_loss(base, alone).item(), rel=1e-5)


def test_run_sizes_follow_the_profile_and_minimal_sizes():
    from dataclasses import replace

    from ftcourse import profiles

    assert lora.run_sizes(profiles.PROFILES["cpu"]) == lora.RUN_SIZES["cpu"]
    assert lora.run_sizes("spark") == lora.RUN_SIZES["spark"]
    minimal = replace(profiles.PROFILES["spark"], minimal=True)  # what FTCOURSE_SIZES=minimal gives
    assert lora.run_sizes(minimal) == lora.RUN_SIZES["minimal"]
    assert set(lora.RUN_SIZES["minimal"]) == set(lora.RUN_SIZES["cpu"])  # every chapter's key is there
