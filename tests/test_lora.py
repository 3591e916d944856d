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


def test_run_sizes_follow_the_profile_and_minimal_sizes():
    from dataclasses import replace

    from ftcourse import profiles

    assert lora.run_sizes(profiles.PROFILES["cpu"]) == lora.RUN_SIZES["cpu"]
    assert lora.run_sizes("spark") == lora.RUN_SIZES["spark"]
    minimal = replace(profiles.PROFILES["spark"], minimal=True)  # what FTCOURSE_SIZES=minimal gives
    assert lora.run_sizes(minimal) == lora.RUN_SIZES["minimal"]
    assert set(lora.RUN_SIZES["minimal"]) == set(lora.RUN_SIZES["cpu"])  # every chapter's key is there
